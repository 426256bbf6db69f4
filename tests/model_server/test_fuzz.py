"""Bad requests of every kind against one real `python -m sdxl_server`, sent as raw bytes.

Each case: no 5xx, no hang (10 s), every 4xx in the JSON error shape, health answering within 1 s
while the case is in flight. At the end a valid request is still served and the log holds no traceback.
"""

from __future__ import annotations

import base64
import gzip
import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.model_server.rawhttp import exchange, request
from tests.model_server.test_images import encoded, gradient, png_header_only, raw_b64
from tests.servers import Server, server_process

HANG_S = 10.0
HEALTH_S = 1.0
STALL_S = 1  # the server's header and body timeouts here


@dataclass(frozen=True)
class Case:
    id: str
    raw: bytes
    may_succeed: bool = False  # odd but valid HTTP and JSON: 200 is a right answer too
    head: bool = False  # a HEAD request: 4xx without a body


def base(**parameters: Any) -> dict[str, Any]:
    """A valid, cheap body (1 step, 64x64), the point every case departs from."""
    params = {"num_inference_steps": 1, "width": 64, "height": 64, **parameters}
    return {"instances": [{"prompt": "a fox", "seed": 1}], "parameters": params}


def post(body: bytes | dict[str, Any] | list[Any], path: str = "/predict", **headers: str) -> bytes:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request("POST", path, content, headers)


def with_raw_value(field: str, raw: str) -> bytes:
    """The base body with `field` (instance.seed or a parameter) set to a raw JSON token."""
    marker = "__RAW__"
    body = base()
    if field == "seed":
        body["instances"][0]["seed"] = marker
    else:
        body["parameters"][field] = marker
    return post(json.dumps(body).replace(f'"{marker}"', raw).encode())


# Each numeric field at and past its edges, and in every wrong type (raw JSON tokens).
NUMBER_EDGES: dict[str, list[str]] = {
    "seed": ["-1", "4294967296", "18446744073709551616", "1.5", "1e309", "-1e309", "NaN", "9" * 5000, '"1"',
             "true", "[]", "{}"],
    "num_inference_steps": ["0", "151", "-1", "1.5", "1e309", "Infinity", "2147483648", '"1"', "false", "{}"],
    "guidance_scale": ["-0.001", "30.001", "1e309", "-Infinity", "NaN", '"5"', "true", "[5]"],
    "width": ["0", "56", "63", "65", "2056", "-64", "64.5", "1e309", '"64"', "false"],
    "height": ["7", "2049", "100000", "-1e309", "[]"],
    "num_images": ["0", "5", "-1", "1e20", "1.5", '"1"'],
    "quality": ["0", "101", "-1", "1e309", '"90"'],
    # Issue 15's numbers (strength without an image is refused whatever its value).
    "strength": ["0.5", "0", "-0.1", "1.001", "1e309", "NaN", '"0.5"', "true", "[0.5]"],
    "high_noise_frac": ["0", "1", "-1e309", "Infinity", '"0.8"', "false", "{}"],
    "refine_steps": ["0", "151", "1.5", "1e309", '"30"', "[]"],
}

NUMBER_CASES = [
    Case(f"{field}={raw[:12]}", with_raw_value(field, raw)) for field, raws in NUMBER_EDGES.items() for raw in raws
]

prompt_cases: dict[str, dict[str, Any]] = {
    "prompt-empty": {"prompt": ""},
    "prompt-blank": {"prompt": " \t\n"},
    "prompt-2001": {"prompt": "x" * 2001},
    "prompt-number": {"prompt": 7},
    "prompt-list": {"prompt": ["a"]},
    "prompt-object": {"prompt": {"a": 1}},
    "prompt-null": {"prompt": None},
    "prompt-and-text": {"prompt": "a", "text": "b"},
    "text-empty": {"text": ""},
    "negative-2001": {"prompt": "a", "negative_prompt": "x" * 2001},
    "prompt_2-number": {"prompt": "a", "prompt_2": 1},
    "style-unknown": {"prompt": "a", "style": "vaporwave"},
    "style-list": {"prompt": "a", "style": ["cinematic"]},
    "instance-unknown-field": {"prompt": "a", "promt": "a"},
    "instance-lora": {"prompt": "a", "lora_id": "x"},
}
PROMPT_CASES = [Case(name, post({"instances": [instance], "parameters": base()["parameters"]}))
                for name, instance in prompt_cases.items()]

other_parameters: dict[str, dict[str, Any]] = {
    "format-gif": {"output_format": "gif"},
    "format-upper": {"output_format": "PNG"},
    "format-number": {"output_format": 1},
    "parameters-unknown": {"cfg": 7},
    "parameters-lora": {"lora_id": "x"},
    "parameters-negative-number": {"negative_prompt": 1},
}
PARAMETER_CASES = [Case(name, post(base(**extra))) for name, extra in other_parameters.items()]


def with_lora(raw: str, key: str = "lora") -> bytes:
    """The base body with parameters.lora (or lora_id) set to a raw JSON token."""
    return post(json.dumps(base(**{key: "__RAW__"})).replace('"__RAW__"', raw).encode())


# Issue 16: the fuzz server has LoRA off, so a well-formed adapter is a 403 and a malformed one a 400.
GS = "gs://bkt/loras/x.safetensors"
LORA_RAW: dict[str, str] = {
    "lora-scale-1e309": '{"name": "a", "scale": 1e309}',
    "lora-scale-NaN": '{"name": "a", "scale": NaN}',
    "lora-scale-string": '{"name": "a", "scale": "1"}',
    "lora-scale-9x5000": '{"name": "a", "scale": ' + "9" * 5000 + "}",
    "lora-null-item": "[null]",
    "lora-string": f'"{GS}"',
    "lora-true": "true",
    "lora-100000-items": "[" + ",".join(['{"name": "a"}'] * 100_000) + "]",
    "lora-deep": '[{"source": [[[[[["x"]]]]]]}]',
    "lora-source-nul": '{"source": "gs://bkt/loras/x\\u0000.safetensors"}',
    "lora-source-surrogate": '{"source": "gs://bkt/\\ud800.safetensors"}',
    "lora-source-1MB": '{"source": "gs://bkt/' + "x" * 1_000_000 + '.safetensors"}',
    "lora-id-object": '{"source": "org/repo"}',
}
LORA_VALUES: dict[str, Any] = {
    "lora-metadata-ip": {"lora": {"source": "http://169.254.169.254/computeMetadata/v1/?recursive=true"}},
    "lora-file-passwd": {"lora": {"source": "file:///etc/passwd"}},
    "lora-local-path": {"lora": {"source": "/etc/passwd"}},
    "lora-dotdot": {"lora": {"source": "gs://bkt/loras/../secret.safetensors"}},
    "lora-encoded-dotdot": {"lora": {"source": "gs://bkt/loras%2f..%2fsecret.safetensors"}},
    "lora-double-slash": {"lora": {"source": "gs://bkt/loras//x.safetensors"}},
    "lora-backslash": {"lora": {"source": "gs://bkt/loras\\..\\x.safetensors"}},
    "lora-lookalike": {"lora": {"source": "gs://bkt/lor\u0430s/x.safetensors"}},
    "lora-hf-dotdot": {"lora": {"source": "hf://org/../x"}},
    "lora-pickle": {"lora": {"source": "hf://org/repo/x.ckpt"}},
    "lora-upper-bucket": {"lora": {"source": "gs://BKT/x.safetensors"}},
    "lora-weight-name-dotdot": {"lora": {"source": "gs://bkt/loras/", "weight_name": "../../x.safetensors"}},
    "lora-4": {"lora": [{"name": n} for n in "abcd"]},
    "lora-empty-list": {"lora": []},
    "lora-twice": {"lora": [{"source": GS}, {"source": "GS://bkt/loras/x.safetensors"}]},
    "lora-source-and-name": {"lora": {"source": GS, "name": "a"}},
    "lora-unknown-key": {"lora": {"name": "a", "alpha": 8}},
    "lora-and-lora-id": {"lora": {"name": "a"}, "lora_id": "org/repo"},
    "lora-id-number": {"lora_id": 7},
    "lora-id-word": {"lora_id": "pixel-art"},
    # Well-formed, on a server without LoRA: refused (403), never fetched, never a 5xx.
    "lora-off-source": {"lora": {"source": GS, "scale": 0.5}},
    "lora-off-hub": {"lora": [{"source": "hf://org/repo"}, {"source": "org/other", "scale": -1}]},
    "lora-off-name": {"lora": {"name": "pixel-art"}},
    "lora-off-lora-id": {"lora_id": "org/repo"},
}
LORA_CASES = [
    *(Case(name, with_lora(raw, "lora_id" if name.startswith("lora-id") else "lora"))
      for name, raw in LORA_RAW.items()),
    *(Case(name, post(base(**extra))) for name, extra in LORA_VALUES.items()),
    Case("instance-lora-object", post({**base(), "instances": [{"prompt": "a", "lora": {"source": GS}}]})),
]


def with_image(image: Any, mask: Any = None, **parameters: Any) -> bytes:
    instance = {"prompt": "a fox", "seed": 1, "image": image}
    if mask is not None:
        instance["mask_image"] = mask
    return post({"instances": [instance], "parameters": {**base()["parameters"], **parameters}})


PNG_64 = encoded(gradient((64, 64)))
image_cases: dict[str, bytes] = {
    "image-not-base64": with_image("%%%"),
    "image-empty": with_image(""),
    "image-null-bytes": with_image(raw_b64(b"\x00" * 1000)),
    "image-number": with_image(7),
    "image-list": with_image([PNG_64]),
    "image-object": with_image({"b64": PNG_64}),
    "image-data-url-not-base64": with_image("data:image/png," + PNG_64),
    "image-data-url-text": with_image("data:text/plain;base64," + raw_b64(b"hello")),
    "image-truncated-png": with_image(PNG_64[:200]),
    "image-truncated-jpeg": with_image(encoded(gradient((64, 64)), "JPEG")[:300]),
    "image-truncated-webp": with_image(encoded(gradient((64, 64)), "WEBP")[:100]),
    "image-png-header-only": with_image(raw_b64(base64.b64decode(PNG_64)[:33])),
    "image-bomb-100000x100000": with_image(raw_b64(png_header_only(100_000, 100_000))),
    "image-bomb-10000x10000": with_image(raw_b64(png_header_only(10_000, 10_000))),
    "image-bomb-2048x2049": with_image(raw_b64(png_header_only(2048, 2049))),
    "image-bomb-0x0": with_image(raw_b64(png_header_only(0, 0))),
    "image-4096x4096": with_image(encoded(Image.new("RGB", (4096, 4096)))),
    "image-32x32": with_image(encoded(Image.new("RGB", (32, 32)))),
    "image-gif": with_image(encoded(gradient((64, 64)), "GIF")),
    "image-bmp": with_image(encoded(gradient((64, 64)), "BMP")),
    "image-tiff": with_image(encoded(gradient((64, 64)), "TIFF")),
    "image-ico": with_image(encoded(gradient((64, 64)), "ICO")),
    "image-pdf": with_image(encoded(gradient((64, 64)), "PDF")),
    "image-svg": with_image(raw_b64(b'<svg xmlns="http://www.w3.org/2000/svg" width="9999999" height="9999999"/>')),
    "image-1.4MB-garbage": with_image("QUJD" * 350_000),
    "image-100x64-no-size": post({"instances": [{"prompt": "a", "image": encoded(Image.new("RGB", (100, 64)))}]}),
    "mask-other-size": with_image(PNG_64, encoded(Image.new("L", (72, 64)))),
    "mask-bomb": with_image(PNG_64, raw_b64(png_header_only(100_000, 100_000))),
    "mask-gif": with_image(PNG_64, encoded(Image.new("L", (64, 64)), "GIF")),
    "mask-without-image": post({"instances": [{"prompt": "a", "mask_image": PNG_64}],
                                "parameters": base()["parameters"]}),
    "mixed-instances": post({**base(), "instances": [{"prompt": "a", "image": PNG_64}, {"prompt": "b"}]}),
    "mixed-masks": post({**base(), "instances": [{"prompt": "a", "image": PNG_64, "mask_image": PNG_64},
                                                 {"prompt": "b", "image": PNG_64}]}),
    "image-strength-0.01": with_image(PNG_64, strength=0.01),
    "image-expert-ensemble": with_image(PNG_64, refine="expert_ensemble"),
    "scheduler-unknown": post(base(scheduler="plms")),
    "scheduler-number": post(base(scheduler=2)),
    "scheduler-list": post(base(scheduler=["euler"])),
    "scheduler-spaces": post(base(scheduler="dpmpp 2m")),
    "refine-unknown": post(base(refine="yes")),
    "refine-true": post(base(refine=True)),
    "refine-no-refiner": post(base(refine="expert_ensemble")),
    "refine-base-image-no-refiner": post(base(refine="base-image")),
}
IMAGE_CASES = [Case(name, raw) for name, raw in image_cases.items()]

STRUCTURE_CASES = [
    Case("body-empty", post(b"")),
    Case("body-whitespace", post(b" \r\n\t ")),
    Case("body-null", post(b"null")),
    Case("body-true", post(b"true")),
    Case("body-number", post(b"1")),
    Case("body-string", post(b'"a fox"')),
    Case("body-array", post(b"[]")),
    Case("body-object-empty", post(b"{}")),
    Case("instances-null", post({"instances": None})),
    Case("instances-object", post({"instances": {"prompt": "a"}})),
    Case("instances-string", post({"instances": "a fox"})),
    Case("instances-empty", post({"instances": []})),
    Case("instances-[null]", post({"instances": [None]})),
    Case("instances-[[]]", post({"instances": [[]]})),
    Case("instances-[1]", post({"instances": [1]})),
    Case("instances-5", post({**base(), "instances": [{"prompt": "a"}] * 5})),
    Case("instances-350000-empty", post(b'{"instances":[' + b",".join([b"{}"] * 350_000) + b"]}")),
    Case("instances-2x3-images", post({**base(num_images=3), "instances": [{"prompt": "a"}] * 2})),
    Case("parameters-list", post({"instances": [{"prompt": "a"}], "parameters": [1]})),
    Case("parameters-string", post({"instances": [{"prompt": "a"}], "parameters": "fast"})),
    Case("top-level-unknown", post({**base(), "extra": 1})),
    Case("top-level-typo", post({"instance": [{"prompt": "a"}]})),
]

ENCODING_CASES = [
    Case("truncated", post(b'{"instances": [{"prompt": "a')),
    Case("trailing-garbage", post(json.dumps(base()).encode() + b"x")),
    Case("two-documents", post(json.dumps(base()).encode() * 2)),
    Case("single-quotes", post(b"{'instances': []}")),
    Case("trailing-comma", post(b'{"instances": [{"prompt": "a"},]}')),
    Case("comment", post(b'{"instances": [] /* x */}')),
    Case("utf16", post(json.dumps(base()).encode("utf-16")), may_succeed=True),  # json.loads detects it
    Case("latin1", post(b'{"instances": [{"prompt": "caf\xe9"}]}')),
    Case("invalid-utf8", post(b"\xff\xfe\xfd")),
    Case("nul-bytes", post(b"\x00" * 100)),
    Case("lone-surrogate", post(b'{"instances": [{"prompt": "\\ud800", "seed": 1}], "parameters": '
                                 b'{"num_inference_steps": 1, "width": 64, "height": 64}}'), may_succeed=True),
    Case("bad-escape", post(b'{"instances": [{"prompt": "\\x41"}]}')),
    Case("gzip-body", post(gzip.compress(json.dumps(base()).encode()), **{"content-encoding": "gzip"})),
    Case("bom", post(b"\xef\xbb\xbf" + json.dumps(base()).encode()), may_succeed=True),
    Case("content-type-text", post(json.dumps(base(quality=0)).encode(), **{"content-type": "text/plain"})),
    Case("content-type-form", post(b"instances=a", **{"content-type": "application/x-www-form-urlencoded"})),
    Case("content-type-garbage", post(b"{", **{"content-type": "\x01;;=="})),
]

NESTING_CASES = [
    Case("brackets-100000", post(b"[" * 100_000)),
    Case("brackets-balanced-5000", post(b"[" * 5000 + b"]" * 5000)),
    Case("objects-100000", post(b'{"a":' * 100_000)),
    Case("instances-deep", post(b'{"instances":' + b"[" * 2000 + b"]" * 2000 + b"}")),
    Case("parameters-depth-9", post({**base(), "parameters": {"a": [[[[[[[[1]]]]]]]]}})),
    Case("prompt-deep", post({"instances": [{"prompt": [[[[[[[[[["a"]]]]]]]]]]}]})),
]

SIZE_CASES = [
    Case("body-1.6MB", post(b'{"instances": [{"prompt": "' + b"x" * 1_600_000 + b'"}]}')),
    Case("content-length-1e12", request("POST", "/predict", b"{}", {"content-length": "1000000000000"})),
    Case("numbers-1.4MB", post(b'{"instances":[{"prompt":"a"}],"pad":[' + b"1," * 700_000 + b"1]}")),
    Case("strings-1.4MB", post(b'{"instances":[{"prompt":"a"}],"pad":"' + b"\\u0041" * 230_000 + b'"}')),
]


def raw_lines(*lines: str, body: bytes = b"") -> bytes:
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


HEADER_CASES = [
    Case("content-length-short-stall", request("POST", "/predict", b"{", {"content-length": "100"})),
    Case("content-length-none-stall", raw_lines("POST /predict HTTP/1.1", "host: x", "transfer-encoding: chunked")),
    Case("content-length-negative", request("POST", "/predict", b"{}", {"content-length": "-1"})),
    Case("content-length-text", request("POST", "/predict", b"{}", {"content-length": "two"})),
    Case("content-length-float", request("POST", "/predict", b"{}", {"content-length": "2.0"})),
    Case("content-length-twice", raw_lines("POST /predict HTTP/1.1", "host: x", "content-length: 2",
                                           "content-length: 3", body=b"{}")),
    Case("content-length-and-chunked", raw_lines("POST /predict HTTP/1.1", "host: x", "content-length: 2",
                                                 "transfer-encoding: chunked", body=b"2\r\n{}\r\n0\r\n\r\n")),
    Case("chunked-bad-size", raw_lines("POST /predict HTTP/1.1", "host: x", "transfer-encoding: chunked",
                                       body=b"zz\r\n{}\r\n0\r\n\r\n")),
    Case("chunked-valid-bad-json", raw_lines("POST /predict HTTP/1.1", "host: x", "transfer-encoding: chunked",
                                             body=b"1\r\n{\r\n0\r\n\r\n")),
    Case("transfer-encoding-gzip", raw_lines("POST /predict HTTP/1.1", "host: x", "transfer-encoding: gzip",
                                             body=b"{}")),
    Case("header-1MB", request("GET", "/health", b"", {"x-big": "a" * 1_000_000})),
    Case("header-70KB", request("GET", "/health", b"", {"x-big": "a" * 70_000}), may_succeed=True),
    Case("headers-500", raw_lines("GET /health HTTP/1.1", "host: x", *(f"x-h{i}: {i}" for i in range(500))),
         may_succeed=True),
    Case("header-no-colon", raw_lines("GET /health HTTP/1.1", "host: x", "no colon here")),
    Case("header-space-in-name", raw_lines("GET /health HTTP/1.1", "host: x", "bad name: 1")),
    Case("header-non-ascii-name", raw_lines("GET /health HTTP/1.1", "host: x", "n\xe9: 1")),
    Case("header-folded", raw_lines("GET /health HTTP/1.1", "host: x", "x-a: 1", " folded"), may_succeed=True),
    Case("header-nul-value", raw_lines("GET /health HTTP/1.1", "host: x", "x-a: a\x00b")),
    Case("host-missing", raw_lines("GET /health HTTP/1.1")),
    Case("host-twice", raw_lines("GET /health HTTP/1.1", "host: x", "host: y")),
    Case("expect-continue", request("POST", "/predict", b"{", {"expect": "100-continue"})),
    Case("expect-unknown", request("POST", "/predict", b"{", {"expect": "teapot"})),
    Case("x-request-id-huge", request("POST", "/predict", b"{", {"x-request-id": "r" * 8000})),
    Case("connection-upgrade-ws", raw_lines("GET /predict HTTP/1.1", "host: x", "connection: upgrade",
                                            "upgrade: websocket")),
    Case("upgrade-h2c", raw_lines("GET /health HTTP/1.1", "host: x", "connection: Upgrade, HTTP2-Settings",
                                  "upgrade: h2c", "http2-settings: AAMAAABkAARAAAAAAAIAAAAA"), may_succeed=True),
    Case("http2-preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"),
    Case("http-0.9", b"GET /health\r\n"),
    Case("http-version-9", raw_lines("GET /health HTTP/9.9", "host: x"), may_succeed=True),
    Case("http-1.0-post-bad-json", b"POST /predict HTTP/1.0\r\ncontent-length: 1\r\n\r\n{"),
    Case("request-line-garbage", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64),  # a TLS hello
    Case("request-line-spaces", b"POST  /predict  HTTP/1.1\r\nhost: x\r\n\r\n"),
    Case("request-line-lf-only", b"GET /health HTTP/1.1\nhost: x\n\n", may_succeed=True),
    Case("request-line-16KB", raw_lines("GET /" + "a" * 16_000 + " HTTP/1.1", "host: x")),
    Case("target-non-ascii", raw_lines("GET /pr\xe9dict HTTP/1.1", "host: x")),
    Case("target-absolute", raw_lines("GET http://x/nope HTTP/1.1", "host: x")),
    Case("target-asterisk", raw_lines("OPTIONS * HTTP/1.1", "host: x")),
    Case("target-bad-percent", raw_lines("GET /%zz%e9%00 HTTP/1.1", "host: x")),
    Case("target-dotdot", raw_lines("GET /../../etc/passwd HTTP/1.1", "host: x")),
    Case("target-encoded-dotdot", raw_lines("GET /%2e%2e/%2e%2e/etc/passwd HTTP/1.1", "host: x")),
]

METHOD_CASES = [
    Case(f"{method}-predict", request(method, "/predict", b"{}"), head=method == "HEAD")
    for method in ("GET", "PUT", "PATCH", "DELETE", "OPTIONS", "HEAD", "TRACE", "FOO", "post")
] + [
    Case(f"{method}-health", request(method, "/health", b"{}"))
    for method in ("POST", "PUT", "DELETE")
] + [Case("CONNECT", raw_lines("CONNECT 127.0.0.1:80 HTTP/1.1", "host: x"))]

ROUTE_CASES = [
    Case(f"route-{path}", post(base(quality=0), path=path))
    for path in ("/", "/predict/", "//predict", "/PREDICT", "/health/x", "/v1/endpoints/e:predict", "/docs",
                 "/openapi.json", "/predict%00", "/predict;x")
] + [Case("route-query-bad-body", post(b"{", path="/predict?x=1&y"))]

CASES: list[Case] = [
    *NUMBER_CASES,
    *PROMPT_CASES,
    *PARAMETER_CASES,
    *LORA_CASES,
    *IMAGE_CASES,
    *STRUCTURE_CASES,
    *ENCODING_CASES,
    *NESTING_CASES,
    *SIZE_CASES,
    *HEADER_CASES,
    *METHOD_CASES,
    *ROUTE_CASES,
]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "SDXL_MODEL": "tiny",
        "SDXL_WARMUP": "64x64",
        "SDXL_HEADER_TIMEOUT": str(STALL_S),
        "SDXL_BODY_TIMEOUT": str(STALL_S),
    }
    with server_process(env, Path(tmp_path_factory.mktemp("fuzz"))) as started:
        started.wait_until("ready")
        yield started


def test_the_cases_are_distinct_and_enough() -> None:
    assert len({case.id for case in CASES}) == len(CASES)
    assert len({case.raw for case in CASES}) == len(CASES)
    assert len(CASES) >= 120


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_a_bad_request_gets_a_json_4xx_and_health_answers_meanwhile(server: Server, case: Case) -> None:
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(exchange, server.url, case.raw, timeout=HANG_S, head=case.head)
        assert server.health(timeout=HEALTH_S).status_code == 200  # while the case is in flight
        response = answer.result()  # the socket's timeout is the hang guard
    assert response.status is not None, "the server closed the connection without an answer"
    allowed = range(200, 500) if case.may_succeed else range(400, 500)
    assert response.status in allowed, (response.status, response.body[:300])
    if response.status >= 400 and not case.head:
        assert response.headers.get("content-type") == "application/json", response.body[:300]
        error = response.json()["error"]
        assert error["code"] == response.status and error["message"]


def test_after_all_cases_a_valid_request_is_served_and_nothing_crashed(server: Server) -> None:
    assert server.health(timeout=HEALTH_S).status_code == 200
    response = httpx.post(server.url + "/predict", json=base(), timeout=60)
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"][0]["images"]) == 1
    log = server.log()
    assert "Traceback" not in log and "Exception in ASGI application" not in log
