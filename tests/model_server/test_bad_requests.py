"""Malformed and out-of-range requests: a 4xx JSON error naming the field, and the server lives on."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
from PIL import Image

from tests.model_server.test_images import PNG, PNG_BYTES, encoded, gradient, png_header_only, raw_b64
from tests.servers import Server


def req(instance: dict[str, Any] | None = None, **parameters: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"instances": [{"prompt": "a fox", **(instance or {})}]}
    if parameters:
        body["parameters"] = parameters
    return body


BAD: list[tuple[str, Any, int, str]] = [
    # (id, body (bytes are sent raw), status, field)
    ("not-json", b'{"instances": [', 400, "body"),
    ("brackets-100000", b"[" * 100_000, 400, "body"),
    ("seed-5000-digits", b'{"instances": [{"prompt": "a fox", "seed": ' + b"7" * 5000 + b"}]}", 400, "body"),
    ("350000-empty-instances", b'{"instances":[' + b",".join([b"{}"] * 350_000) + b"]}", 400, "instances"),
    ("lora-id", req(lora_id="pixel-art"), 400, "parameters.lora_id"),
    ("not-utf8", b"\xff\xfe\x00", 400, "body"),
    ("json-array", b"[1, 2]", 400, "body"),
    ("json-string", b'"a fox"', 400, "body"),
    ("empty-object", {}, 400, "instances"),
    ("instances-not-a-list", {"instances": "a fox"}, 400, "instances"),
    ("instances-empty", {"instances": []}, 400, "instances"),
    ("instance-not-an-object", {"instances": ["a fox"]}, 400, "instances[0]"),
    ("missing-prompt", {"instances": [{"seed": 1}]}, 400, "instances[0].prompt"),
    ("empty-prompt", req({"prompt": ""}), 400, "instances[0].prompt"),
    ("blank-prompt", req({"prompt": "   "}), 400, "instances[0].prompt"),
    ("prompt-number", req({"prompt": 5}), 400, "instances[0].prompt"),
    ("prompt-1MB", req({"prompt": "x" * 1_000_000}), 400, "instances[0].prompt"),
    ("prompt-and-text", req({"text": "a fox"}), 400, "instances[0].text"),
    ("negative-list", req({"negative_prompt": ["blurry"]}), 400, "instances[0].negative_prompt"),
    ("unknown-instance-field", req({"promt": "typo"}), 400, "instances[0].promt"),
    ("unknown-style", req({"style": "vaporwave"}), 400, "instances[0].style"),
    ("style-number", req({"style": 3}), 400, "instances[0].style"),
    ("seed-negative", req({"seed": -1}), 400, "instances[0].seed"),
    ("seed-string", req({"seed": "42"}), 400, "instances[0].seed"),
    ("seed-huge", req({"seed": 2**40}), 400, "instances[0].seed"),
    ("seed-float", req({"seed": 1.5}), 400, "instances[0].seed"),
    ("seed-bool", req({"seed": True}), 400, "instances[0].seed"),
    ("steps-0", req(num_inference_steps=0), 400, "parameters.num_inference_steps"),
    ("steps-1e6", req(num_inference_steps=10**6), 400, "parameters.num_inference_steps"),
    ("steps-string", req(num_inference_steps="30"), 400, "parameters.num_inference_steps"),
    ("guidance-negative", req(guidance_scale=-1), 400, "parameters.guidance_scale"),
    ("guidance-1000", req(guidance_scale=1000), 400, "parameters.guidance_scale"),
    ("guidance-string", req(guidance_scale="high"), 400, "parameters.guidance_scale"),
    ("width-7", req(width=7), 400, "parameters.width"),
    ("width-100000", req(width=100000), 400, "parameters.width"),
    ("height-not-multiple-of-8", req(height=1001), 400, "parameters.height"),
    ("width-fraction", req(width=512.5), 400, "parameters.width"),
    ("steps-fraction", req(num_inference_steps=2.5), 400, "parameters.num_inference_steps"),
    ("num-images-0", req(num_images=0), 400, "parameters.num_images"),
    ("num-images-over-max", req(num_images=5), 400, "parameters.num_images"),
    ("fifty-instances", {"instances": [{"prompt": "a fox"}] * 50}, 400, "instances"),
    ("format-gif", req(output_format="gif"), 400, "parameters.output_format"),
    ("quality-0", req(quality=0), 400, "parameters.quality"),
    ("quality-101", req(quality=101), 400, "parameters.quality"),
    ("unknown-parameter", req(cfg=7), 400, "parameters.cfg"),
    ("parameters-list", {"instances": [{"prompt": "a fox"}], "parameters": [30]}, 400, "parameters"),
    ("unknown-top-level", {"instance": [{"prompt": "a fox"}]}, 400, "instances"),
    ("body-2MB", {"instances": [{"prompt": "a fox", "pad": "x" * 2_000_000}]}, 413, "body"),
    # Issue 15: input images and the generation modes' parameters.
    ("image-truncated-png", req({"image": raw_b64(PNG_BYTES[:300])}), 400, "instances[0].image"),
    ("image-truncated-jpeg", req({"image": encoded(gradient(), "JPEG")[:400]}), 400, "instances[0].image"),
    ("image-bomb-100000x100000", req({"image": raw_b64(png_header_only(100_000, 100_000))}), 400, "instances[0].image"),
    ("image-4096x4096", req({"image": encoded(Image.new("RGB", (4096, 4096), "navy"))}), 400, "instances[0].image"),
    ("image-gif", req({"image": encoded(gradient(), "GIF")}), 400, "instances[0].image"),
    ("image-bmp", req({"image": encoded(gradient(), "BMP")}), 400, "instances[0].image"),
    ("image-tiff", req({"image": encoded(gradient(), "TIFF")}), 400, "instances[0].image"),
    ("image-svg", req({"image": raw_b64(b'<svg xmlns="http://www.w3.org/2000/svg"/>')}), 400, "instances[0].image"),
    ("image-not-base64", req({"image": "not base64 at all"}), 400, "instances[0].image"),
    ("image-empty", req({"image": ""}), 400, "instances[0].image"),
    ("image-number", req({"image": 7}), 400, "instances[0].image"),
    ("image-1023x767", req({"image": encoded(Image.new("RGB", (1023, 767), "gray"))}), 400, "instances[0].image"),
    ("mask-other-size", req({"image": PNG, "mask_image": encoded(gradient((64, 64)))}), 400, "instances[0].mask_image"),
    ("mask-without-image", req({"mask_image": PNG}), 400, "instances[0].mask_image"),
    ("mixed-instances", {"instances": [{"prompt": "a", "image": PNG}, {"prompt": "b"}]}, 400, "instances[1].image"),
    ("scheduler-unknown", req(scheduler="plms"), 400, "parameters.scheduler"),
    ("strength-without-image", req(strength=0.5), 400, "parameters.strength"),
    ("strength-over-1", req({"image": PNG}, strength=1.5), 400, "parameters.strength"),
    ("refine-without-refiner", req(refine="expert_ensemble"), 400, "parameters.refine"),
    ("high-noise-frac-1", req(high_noise_frac=1), 400, "parameters.high_noise_frac"),
    ("refine-steps-0", req(refine_steps=0), 400, "parameters.refine_steps"),
    # Issue 16: adapters. Refused on the text, before the allow-list (this server has LoRA off: 403 after).
    ("lora-4-adapters", req(lora=[{"name": n} for n in "abcd"]), 400, "parameters.lora"),
    ("lora-string", req(lora="gs://bkt/loras/x.safetensors"), 400, "parameters.lora"),
    ("lora-unknown-key", req(lora={"name": "pixel", "alpha": 8}), 400, "parameters.lora[0].alpha"),
    ("lora-scale-5", req(lora=[{"name": "a"}, {"name": "b", "scale": 5}]), 400, "parameters.lora[1].scale"),
    ("lora-source-and-name", req(lora={"source": "org/repo", "name": "pixel"}), 400, "parameters.lora[0]"),
    ("lora-twice", req(lora=[{"source": "org/repo"}, {"source": "hf://org/repo"}]), 400, "parameters.lora[1]"),
    ("lora-metadata-ip", req(lora={"source": "http://169.254.169.254/x"}), 400, "parameters.lora[0].source"),
    ("lora-file", req(lora={"source": "file:///etc/passwd"}), 400, "parameters.lora[0].source"),
    ("lora-dotdot", req(lora={"source": "gs://bkt/l/../s.safetensors"}), 400, "parameters.lora[0].source"),
    ("lora-pickle", req(lora={"source": "hf://org/repo/x.ckpt"}), 400, "parameters.lora[0].source"),
    ("lora-weight-dotdot", req(lora={"source": "org/r", "weight_name": "../x"}), 400, "parameters.lora[0].weight_name"),
    ("lora-bad-name", req(lora={"name": "../x"}), 400, "parameters.lora[0].name"),
    ("lora-and-lora-id", req(lora={"name": "pixel"}, lora_id="org/repo"), 400, "parameters.lora_id"),
    ("lora-id-number", req(lora_id=7), 400, "parameters.lora_id"),
    ("instance-lora-id", req({"lora_id": "org/repo"}), 400, "instances[0].lora_id"),
]


@pytest.mark.parametrize(("body", "status", "field"), [case[1:] for case in BAD], ids=[case[0] for case in BAD])
def test_bad_request_gets_a_json_error_naming_the_field(
    model_server: Server, body: Any, status: int, field: str
) -> None:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        model_server.url + model_server.predict_route,
        content=content,
        headers={"content-type": "application/json"},
        timeout=30,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == status
    assert error["field"] == field
    assert field.split(".")[-1].split("[")[0] in error["message"]


def test_out_of_range_messages_say_what_is_allowed(model_server: Server) -> None:
    cases = {
        "num_inference_steps": (req(num_inference_steps=0), "greater than or equal to 1"),
        "width": (req(width=7), "multiple of 8 between 64 and 2048"),
        "style": (req({"style": "vaporwave"}), "cinematic"),
        "num_images": (req(num_images=5), "at most 4"),
        "output_format": (req(output_format="gif"), "'png', 'jpeg' or 'webp'"),
        "lora scale": (req(lora={"name": "a", "scale": 9}), "from -4 to 4"),
        "lora count": (req(lora=[{"name": "a"}] * 4), "1 to 3"),
        "lora pickle": (req(lora={"source": "gs://bkt/x.bin"}), "never pickle"),
        "lora twice": (req(lora=[{"name": "a"}, {"name": "A"}]), "give it once, with the sum of the scales"),
        "instance lora_id": (req({"lora_id": "org/repo"}), "give it in parameters.lora_id"),
    }
    for name, (body, allowed) in cases.items():
        message = model_server.predict(body).json()["error"]["message"]
        assert allowed in message, (name, message)


def test_after_every_bad_request_the_server_is_healthy_and_serves(model_server: Server) -> None:
    for case in BAD:
        body = case[1]
        content = body if isinstance(body, bytes) else json.dumps(body).encode()
        httpx.post(model_server.url + model_server.predict_route, content=content, timeout=30)
    assert model_server.health(timeout=1).status_code == 200
    good = model_server.predict(
        {
            "instances": [{"prompt": "a fox", "seed": 3}],
            "parameters": {"num_inference_steps": 2, "width": 64, "height": 64},
        }
    )
    assert good.status_code == 200
    assert len(good.json()["predictions"][0]["images"]) == 1


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("GET", "/p", 405), ("PUT", "/p", 405), ("DELETE", "/h", 405), ("POST", "/nope", 404), ("GET", "/", 404)],
)
def test_wrong_method_and_unknown_route_are_json_errors(
    model_server: Server, method: str, path: str, status: int
) -> None:
    response = httpx.request(method, model_server.url + path, json={}, timeout=10)
    assert response.status_code == status
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["code"] == status and path in error["message"]
    if status == 405:
        assert "allow" in response.headers and response.headers["allow"] in error["message"]


def test_whole_numbers_sent_as_doubles_are_accepted(model_server: Server) -> None:
    """What arrives through Vertex AI's predict: protobuf Values make every number a double."""
    body = {
        "instances": [{"prompt": "a fox", "seed": 7.0}],
        "parameters": {
            "num_inference_steps": 2.0,
            "width": 64.0,
            "height": 64.0,
            "num_images": 1.0,
            "quality": 80.0,
            "guidance_scale": 5,
        },
    }
    response = model_server.predict(body)
    assert response.status_code == 200, response.text
    assert response.json()["predictions"][0]["seeds"] == [7]


def test_an_image_of_100MB_is_413_at_the_default_limit(model_server: Server) -> None:
    body = b'{"instances": [{"prompt": "a fox", "image": "' + b"A" * 100_000_000 + b'"}]}'
    response = httpx.post(model_server.url + model_server.predict_route, content=body, timeout=60)
    assert response.status_code == 413 and response.json()["error"]["field"] == "body"
    assert model_server.health(timeout=1).status_code == 200


def test_an_image_of_100MB_under_a_raised_limit_is_400_on_the_field(tiny_pipeline: Any) -> None:
    """SDXL_MAX_REQUEST_BYTES raised to 200 MB: one image field is still capped (images.MAX_IMAGE_BYTES)."""
    from sdxl_server.app import create_app
    from sdxl_server.generator import Generator
    from sdxl_server.settings import Settings
    from tests.servers import serve_app

    settings = Settings(max_request_bytes=200_000_000, warmup=((64, 64),))
    app = create_app(settings, load=lambda _: Generator(tiny_pipeline))
    with serve_app(app) as server:
        server.wait_until("ready")
        body = b'{"instances": [{"prompt": "a fox", "image": "' + b"A" * 100_000_000 + b'"}]}'
        response = httpx.post(server.url + server.predict_route, content=body, timeout=120)
        assert response.status_code == 400, response.text[:300]
        error = response.json()["error"]
        assert error["field"] == "instances[0].image" and "JPEG or WebP" in error["message"]
        valid = {
            "instances": [{"prompt": "a fox", "seed": 1}],
            "parameters": {"num_inference_steps": 1, "width": 64, "height": 64},
        }
        assert server.predict(valid).status_code == 200
