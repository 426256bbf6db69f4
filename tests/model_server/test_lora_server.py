"""LoRA adapters per request, end to end: the real app and loader (tiny model) over loopback, adapters in a GCS
emulator reached by the real google-cloud-storage client, and the images plain diffusers makes with them."""

from __future__ import annotations

import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import numpy as np
import pytest

from tests.model_server import loras
from tests.model_server.conftest import Lines
from tests.model_server.published import assert_close, pixels
from tests.servers import Server, gcs_emulator, serve_app

SEED = 7
MAX_RANK = 16  # the slot's rank here: A (4) + B (8) fit, B + C (12) do not


def request(lora: Any = None, **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "instances": [{"prompt": "a fox", "seed": SEED}],
        "parameters": {"num_inference_steps": 2, "width": 64, "height": 64, "output_format": "png", **parameters},
    }
    if lora is not None:
        body["parameters"]["lora"] = lora
    return body


def reference(adapters: list[tuple[Path, float]]) -> np.ndarray:
    """What plain diffusers makes with these adapters, as the server's request asks, in uint8 pixels."""
    import torch

    images = loras.diffusers_images(
        adapters,
        prompt="a fox",
        num_inference_steps=2,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=[torch.Generator("cpu").manual_seed(SEED)],
    )
    return np.asarray(images[0] * 255).round().astype(np.int16)


class Emulated(logging.Handler):
    """Every request line the GCS emulator answered ("GET /download/storage/v1/b/B/o/NAME?alt=media ...")."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())

    def touching(self, bucket: str, name: str = "") -> list[str]:
        """Requests for an object, its metadata or its bytes (or, without a name, for anything in the bucket)."""
        found = []
        for line in self.lines:
            path = unquote(line.split()[1].split("?")[0])  # '"GET /download/storage/v1/b/B/o/NAME?alt=media ...'
            if path.endswith(f"/b/{bucket}/o/{name}") if name else f"/b/{bucket}/" in path + "/":
                found.append(line)
        return found

    def downloads(self, bucket: str, name: str) -> int:
        return sum("alt=media" in line for line in self.touching(bucket, name))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The adapter files: tiny LoRAs of ranks 4, 8 and 12, an SD 1.5 one, and two that are no adapter at all."""
    folder = tmp_path_factory.mktemp("loras")
    made = {
        "a": loras.tiny_lora(folder / "a", seed=1, rank=4),
        "b": loras.tiny_lora(folder / "b", seed=2, rank=8),
        "c": loras.tiny_lora(folder / "c", seed=3, rank=12),
        "sd15": loras.sd15_lora(folder / "sd15"),
    }
    junk = folder / "junk.safetensors"
    junk.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00" + b"{not a header}  " + b"\x00" * 64)
    big = folder / "big.safetensors"
    big.write_bytes(made["c"].read_bytes() * 3)  # over the size limit below; refused before it is downloaded
    return {**made, "junk": junk, "big": big}


@pytest.fixture(scope="module")
def bucket(files: dict[str, Path]) -> Iterator[Emulated]:
    """gs://loras/ok/<name>.safetensors (the allowed prefix), and the same bytes where the allow-list must
    keep the server from ever asking: gs://loras/<name>, gs://loras/ok-evil/..., gs://other-bucket/ok/..."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    seen = Emulated()
    emulator_log = logging.getLogger("gcp_storage_emulator.server")
    level = emulator_log.level
    emulator_log.setLevel(logging.INFO)
    emulator_log.addHandler(seen)
    with gcs_emulator() as url, pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", url)
        client = storage.Client(project="test", credentials=AnonymousCredentials())
        allowed, other = client.create_bucket("loras"), client.create_bucket("other-bucket")
        for name, path in files.items():
            for where, prefix in ((allowed, "ok/"), (allowed, ""), (allowed, "ok-evil/"), (other, "ok/")):
                where.blob(f"{prefix}{name}.safetensors").upload_from_filename(str(path))
        allowed.blob(f"ok/folder/{loras.WEIGHT_NAME}").upload_from_filename(str(files["a"]))
        allowed.blob("ok/evict/d.safetensors").upload_from_filename(str(files["a"]))
        allowed.blob("ok/once/c.safetensors").upload_from_filename(str(files["c"]))  # first used by 4 at once
        seen.lines.clear()
        try:
            yield seen
        finally:
            emulator_log.removeHandler(seen)
            emulator_log.setLevel(level)


def lora_settings(cache: Path, **overrides: Any) -> Any:
    from sdxl_server.settings import Settings

    values: dict[str, Any] = {
        "model": "tiny",
        "warmup": ((64, 64),),
        "cache_dir": cache,
        "lora_sources": "gs://loras/ok,hf://good/",
        "lora_max_rank": MAX_RANK,
        "lora_max_bytes": 1_000_000,
        **overrides,
    }
    return Settings(**values)


@pytest.fixture(scope="module")
def server(bucket: Emulated, files: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The real app and loader with LoRA on: gs://loras/ok/ and hf://good/ allowed, slot rank 16."""
    from sdxl_server.app import create_app
    from sdxl_server.loader import load_generator

    assert files["c"].stat().st_size < 1_000_000 < files["big"].stat().st_size
    settings = lora_settings(tmp_path_factory.mktemp("lora-cache"))
    with serve_app(create_app(settings, load=load_generator)) as started:
        started.wait_until("ready")
        yield started


def ok(response: Any) -> np.ndarray:
    assert response.status_code == 200, response.text
    return pixels(response.json())


def gs(name: str) -> str:
    return f"gs://loras/ok/{name}.safetensors"


def test_a_gs_adapter_matches_plain_diffusers_and_lora_id_is_its_alias(
    server: Server, files: dict[str, Path], log_lines: Lines
) -> None:
    want = reference([(files["a"], 0.7)])
    assert_close(ok(server.predict(request({"source": gs("a"), "scale": 0.7}))), want)
    assert log_lines.one("predict")["loras"] == [f"{gs('a')}:0.7"]
    assert_close(ok(server.predict(request(lora_id=gs("a")))), reference([(files["a"], 1.0)]))
    # a folder source takes diffusers' default file name in it
    assert_close(ok(server.predict(request({"source": "gs://loras/ok/folder/", "scale": 0.7}))), want)


def test_two_adapters_combine_as_set_adapters_does(server: Server, files: dict[str, Path]) -> None:
    body = request([{"source": gs("a"), "scale": 0.8}, {"source": gs("b"), "scale": -0.5}])
    assert_close(ok(server.predict(body)), reference([(files["a"], 0.8), (files["b"], -0.5)]))


def test_an_adapter_then_none_then_the_adapter_again_gives_the_same_images(server: Server) -> None:
    base = ok(server.predict(request()))
    adapted = ok(server.predict(request({"source": gs("b")})))
    assert np.abs(adapted - base).max() > 10  # the adapter changes the image plainly
    assert np.array_equal(ok(server.predict(request())), base)  # the slot is zeroed: the base's image, exactly
    assert np.array_equal(ok(server.predict(request({"source": gs("b")}))), adapted)
    assert np.array_equal(ok(server.predict(request({"source": gs("b"), "scale": 0}))), base)


@pytest.mark.parametrize(
    "source",
    [
        "gs://other-bucket/ok/a.safetensors",
        "gs://loras/a.safetensors",
        "gs://loras/ok-evil/a.safetensors",
        "hf://evil/a",
        "evil/a",
    ],
)
def test_a_source_outside_the_allowed_prefixes_is_403_and_never_fetched(
    server: Server, bucket: Emulated, source: str, loopback_only: None
) -> None:
    response = server.predict(request({"source": source}))
    assert response.status_code == 403, response.text
    error = response.json()["error"]
    assert error["field"] == "parameters.lora[0].source"
    assert "not under an allowed prefix (SDXL_LORA_SOURCES)" in error["message"]
    assert "gs://loras/ok/" not in error["message"] and "hf://good/" not in error["message"]  # the operator's
    assert not bucket.touching("other-bucket") and not bucket.touching("loras", "a.safetensors")
    assert not bucket.touching("loras", "ok-evil/a.safetensors")


@pytest.mark.parametrize("source", ["gs://loras/ok/../a.safetensors", "gs://loras/ok/%2e%2e/a.safetensors"])
def test_dot_dot_tricks_are_refused_before_the_allow_list(server: Server, bucket: Emulated, source: str) -> None:
    response = server.predict(request({"source": source}))
    assert response.status_code in (400, 403), response.text
    assert response.json()["error"]["field"] == "parameters.lora[0].source"
    assert not bucket.touching("loras", "a.safetensors") and not bucket.touching("loras", "ok/../a.safetensors")


def test_a_second_source_outside_fetches_not_even_the_first(server: Server, bucket: Emulated) -> None:
    body = request([{"source": gs("c")}, {"source": "gs://other-bucket/ok/c.safetensors"}])
    response = server.predict(body)
    assert response.status_code == 403 and response.json()["error"]["field"] == "parameters.lora[1].source"
    assert not bucket.touching("loras", "ok/c.safetensors")


@pytest.mark.parametrize(
    ("lora", "field", "says"),
    [
        ({"source": gs("missing")}, "parameters.lora[0].source", "not found"),
        ({"source": "hf://good/missing"}, "parameters.lora[0].source", "not found"),
        ({"source": gs("big")}, "parameters.lora[0].source", "SDXL_LORA_MAX_BYTES"),
        ({"source": gs("junk")}, "parameters.lora[0].source", "not a valid .safetensors file"),
        ({"source": gs("sd15")}, "parameters.lora[0].source", "made for another model than SDXL"),
        (
            [{"source": gs("b")}, {"source": gs("c")}],
            "parameters.lora",
            "ranks 8 + 12 = 20 exceed SDXL_LORA_MAX_RANK=16",
        ),
        ({"name": "pixel"}, "parameters.lora[0].name", "no preloaded adapter"),
    ],
    ids=["gs-not-found", "hf-not-found-offline", "too-big", "not-safetensors", "sd15", "rank-sum", "unknown-name"],
)
def test_an_adapter_the_server_cannot_use_is_a_400_naming_the_field(
    server: Server, bucket: Emulated, lora: Any, field: str, says: str
) -> None:
    response = server.predict(request(lora))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["field"] == field and says in error["message"], error
    assert error["message"].startswith(f"{field}: "), error  # as every 400 says where, the store's too
    assert "Traceback" not in response.text
    if "big" in str(lora):
        assert bucket.downloads("loras", "ok/big.safetensors") == 0  # known from the object's metadata
    ok(server.predict(request({"source": gs("a")})))  # and the server serves the next request


def test_a_second_use_does_not_download_again(server: Server, bucket: Emulated) -> None:
    ok(server.predict(request({"source": gs("c"), "scale": 0.5})))
    downloads = bucket.downloads("loras", "ok/c.safetensors")
    assert downloads == 1
    ok(server.predict(request({"source": gs("c"), "scale": 0.3})))
    assert bucket.downloads("loras", "ok/c.safetensors") == downloads


def test_four_requests_for_a_new_adapter_at_once_download_it_once(server: Server, bucket: Emulated) -> None:
    body = request({"source": "gs://loras/ok/once/", "weight_name": "c.safetensors", "scale": 0.9})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: server.predict(body), range(4)))
    images = [ok(answer) for answer in answers]
    assert all(np.array_equal(image, images[0]) for image in images)
    assert bucket.downloads("loras", "ok/once/c.safetensors") == 1


def test_health_describes_lora(server: Server, files: dict[str, Path]) -> None:
    ok(server.predict(request({"source": gs("a")})))
    lora = server.health().json()["lora"]
    assert {k: lora[k] for k in ("max_rank", "max_adapters", "sources", "preloaded")} == {
        "max_rank": MAX_RANK,
        "max_adapters": 3,
        "sources": 2,
        "preloaded": [],
    }
    assert lora["cached"][0] == {"adapter": gs("a"), "bytes": files["a"].stat().st_size, "in_memory": True}


def test_the_disk_budget_evicts_the_least_recently_used(
    bucket: Emulated, files: dict[str, Path], tmp_path: Path
) -> None:
    from sdxl_server.app import create_app
    from sdxl_server.loader import load_generator

    size = files["a"].stat().st_size  # a, folder/ and evict/d are the same bytes, three adapters on disk
    settings = lora_settings(tmp_path, lora_cache_bytes=2 * size + size // 2)
    sources = [gs("a"), "gs://loras/ok/folder/", "gs://loras/ok/evict/d.safetensors"]
    app = create_app(settings, load=load_generator)
    with serve_app(app) as small:
        small.wait_until("ready")
        # The store keeps a file used in the last two minutes (it may be being read): here, not at all.
        app.state.model.loras.store.in_use_s = 0
        before = bucket.downloads("loras", "ok/a.safetensors")
        for source in sources:
            ok(small.predict(request({"source": source})))
        cached = [entry["adapter"] for entry in small.health().json()["lora"]["cached"]]
        assert gs("a") not in cached and len(cached) == 2, cached
        ok(small.predict(request({"source": gs("a")})))
        assert bucket.downloads("loras", "ok/a.safetensors") == before + 2  # evicted, so fetched again


def held_proxy(upstream: str, release: threading.Event, *, refuse: bool = False) -> Any:
    """An ASGI app forwarding to the emulator, where a request about an object waits for `release` first: a slow
    bucket (or, with `refuse`, Cloud Storage's 403 for an account without storage.objects.get). Only metadata
    passes through it: the object's mediaLink names the emulator itself."""
    import anyio
    import httpx
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    async def app(scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        if "/o/" in request.url.path and refuse:
            message = "sdxl@p.iam.gserviceaccount.com does not have storage.objects.get access"
            error = {"error": {"code": 403, "message": message, "errors": [{"reason": "forbidden"}]}}
            await JSONResponse(error, status_code=403)(scope, receive, send)
            return
        if "/o/" in request.url.path:
            await anyio.to_thread.run_sync(lambda: release.wait(60))
        async with httpx.AsyncClient() as client:
            answer = await client.request(
                request.method,
                f"{upstream}{request.url.path}" + (f"?{request.url.query}" if request.url.query else ""),
                headers=[(k, v) for k, v in request.headers.items() if k.lower() != "content-length"],
                content=await request.body(),
            )
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "content-encoding")}
        await Response(answer.content, status_code=answer.status_code, headers=headers)(scope, receive, send)

    return app


def test_a_fetch_slower_than_the_time_limit_is_a_504_and_the_download_goes_on(
    bucket: Emulated, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sdxl_server.app import create_app
    from sdxl_server.loader import load_generator

    release = threading.Event()
    with serve_app(held_proxy(os.environ["STORAGE_EMULATOR_HOST"], release)) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        with serve_app(create_app(lora_settings(tmp_path, time_limit_s=2.0), load=load_generator)) as slow:
            slow.wait_until("ready")
            try:
                response = slow.predict(request({"source": gs("b")}))
            finally:
                release.set()
            assert response.status_code == 504, response.text
            message = response.json()["error"]["message"]
            assert "SDXL_TIME_LIMIT" in message and "fetching its LoRA adapters" in message
            deadline = time.monotonic() + 60
            while not slow.health().json()["lora"]["cached"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert [entry["adapter"] for entry in slow.health().json()["lora"]["cached"]] == [gs("b")]


def test_a_bucket_that_refuses_the_servers_account_is_a_502_saying_what_to_grant(
    bucket: Emulated, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from sdxl_server.app import create_app
    from sdxl_server.loader import load_generator

    with serve_app(held_proxy(os.environ["STORAGE_EMULATOR_HOST"], threading.Event(), refuse=True)) as proxy:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.url)
        with serve_app(create_app(lora_settings(tmp_path), load=load_generator)) as refused:
            refused.wait_until("ready")
            response = refused.predict(request({"source": gs("a")}))
            assert response.status_code == 502, response.text
            error = response.json()["error"]
            assert error["field"] == "parameters.lora[0].source" and "roles/storage.objectViewer" in error["message"]
            ok(refused.predict(request()))  # the server itself is fine
