"""The model server as Vertex AI runs it: `python -m sdxl_server`, real HTTP on loopback."""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.servers import Server, server_process

CONTRACT_EXAMPLE = {
    "instances": [
        {
            "prompt": "a red fox in snow",
            "negative_prompt": "blurry",
            "style": "cinematic",
            "seed": 42,
            "prompt_2": None,
            "negative_prompt_2": None,
        }
    ],
    "parameters": {
        "num_inference_steps": 30,
        "guidance_scale": 5.0,
        "width": 1024,
        "height": 1024,
        "num_images": 1,
        "output_format": "jpeg",
        "quality": 90,
    },
}


def small(
    prompt: str = "a red fox in snow",
    *,
    seed: int | None = 7,
    steps: int = 3,
    size: int = 64,
    fmt: str = "png",
    **params: object,
) -> dict[str, object]:
    instance: dict[str, object] = {"prompt": prompt}
    if seed is not None:
        instance["seed"] = seed
    return {
        "instances": [instance],
        "parameters": {"num_inference_steps": steps, "width": size, "height": size, "output_format": fmt, **params},
    }


def decode(b64: str) -> Image.Image:
    image = Image.open(io.BytesIO(base64.b64decode(b64)))
    image.load()
    return image


def test_health_is_503_while_loading_then_200_and_the_contract_example_works(tmp_path: Path) -> None:
    # The example asks for 1024x1024 at 30 steps: minutes on a busy CPU, so no 55 s limit here.
    env = {"SDXL_MODEL": "tiny", "AIP_HEALTH_ROUTE": "/h", "AIP_PREDICT_ROUTE": "/p", "SDXL_TIME_LIMIT": "600"}
    with server_process(env, tmp_path) as server:
        first = None
        deadline = time.monotonic() + 30
        while first is None and time.monotonic() < deadline:
            try:
                first = server.health()
            except httpx.TransportError:
                time.sleep(0.05)
        assert first is not None and first.status_code == 503 and first.json() == {"status": "loading"}
        assert server.predict(small()).status_code == 503

        ready = server.wait_until("ready")
        assert ready.status_code == 200

        response = server.predict(CONTRACT_EXAMPLE)
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert prediction["seeds"] == [42]
        assert (prediction["output_format"], prediction["width"], prediction["height"]) == ("jpeg", 1024, 1024)
        image = decode(prediction["images"][0])
        assert (image.format, image.size) == ("JPEG", (1024, 1024))
        # Where the time went, for the caller (Server-Timing) and in the request's log line.
        timing = dict(part.strip().split(";dur=") for part in response.headers["server-timing"].split(","))
        assert set(timing) == {"generate", "encode"} and all(float(ms) > 0 for ms in timing.values())
        logged = [json.loads(line) for line in server.log().splitlines() if '"message": "predict"' in line]
        assert logged[-1]["generate_ms"] > logged[-1]["encode_ms"] > 0


@pytest.mark.parametrize(("fmt", "pil_format"), [("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")])
def test_each_output_format_decodes_at_the_requested_size(model_server: Server, fmt: str, pil_format: str) -> None:
    body = small(fmt=fmt, quality=80)
    body["parameters"].update(width=96, height=64)  # type: ignore[attr-defined]
    response = model_server.predict(body)
    assert response.status_code == 200, response.text
    image = decode(response.json()["predictions"][0]["images"][0])
    assert (image.format, image.size) == (pil_format, (96, 64))


def test_same_seed_same_bytes_other_seed_other_image(model_server: Server) -> None:
    first = model_server.predict(small(seed=11)).json()["predictions"][0]["images"][0]
    again = model_server.predict(small(seed=11)).json()["predictions"][0]["images"][0]
    other = model_server.predict(small(seed=12)).json()["predictions"][0]["images"][0]
    assert first == again
    assert np.asarray(decode(first)).tolist() != np.asarray(decode(other)).tolist()


def test_num_images_uses_consecutive_seeds_and_each_matches_its_single_image(model_server: Server) -> None:
    batch = model_server.predict(small(seed=100, num_images=3)).json()["predictions"][0]
    assert batch["seeds"] == [100, 101, 102]
    assert len({*batch["images"]}) == 3
    single = model_server.predict(small(seed=101)).json()["predictions"][0]
    difference = np.abs(np.asarray(decode(batch["images"][1]), int) - np.asarray(decode(single["images"][0]), int))
    assert difference.max() <= 2  # batched kernels may round differently; the image is the same


def test_a_seed_is_drawn_and_returned_when_none_is_given(model_server: Server) -> None:
    prediction = model_server.predict(small(seed=None, num_images=2)).json()["predictions"][0]
    first = prediction["seeds"][0]
    assert prediction["seeds"] == [first, first + 1]
    replay = model_server.predict(small(seed=first)).json()["predictions"][0]
    assert (
        replay["images"][0] == prediction["images"][0]
        or np.abs(np.asarray(decode(replay["images"][0]), int) - np.asarray(decode(prediction["images"][0]), int)).max()
        <= 2
    )


def test_every_seed_the_server_returns_is_accepted_back(model_server: Server) -> None:
    """Issue 12, point 6: seeds are 0..2**32-1 and image i uses (seed + i) mod 2**32."""
    last = 2**32 - 1
    prediction = model_server.predict(small(seed=last, num_images=2, steps=1)).json()["predictions"][0]
    assert prediction["seeds"] == [last, 0]
    for seed in prediction["seeds"]:
        again = model_server.predict(small(seed=seed, steps=1))
        assert again.status_code == 200, again.text
        assert again.json()["predictions"][0]["images"][0] == prediction["images"][prediction["seeds"].index(seed)]


def test_model_garden_request_shape_in_full(model_server: Server) -> None:
    """Issue 12, point 8: text instances, negative_prompt and the sizes in parameters."""
    body = {
        "instances": [{"text": "a fox", "seed": 3}, {"text": "a fox", "seed": 3, "negative_prompt": "snow"}],
        "parameters": {
            "negative_prompt": "blurry",
            "height": 64,
            "width": 96,
            "num_inference_steps": 2,
            "guidance_scale": 7.5,
        },
    }
    response = model_server.predict(body)
    assert response.status_code == 200, response.text
    garden, own = response.json()["predictions"]
    assert (garden["width"], garden["height"]) == (96, 64) and garden["output"] == garden["images"][0]
    assert own["images"][0] != garden["images"][0]  # the instance's own negative prompt wins
    shared = dict(body, instances=[{"text": "a fox", "seed": 3, "negative_prompt": "blurry"}])
    assert model_server.predict(shared).json()["predictions"][0]["images"][0] == garden["images"][0]


def test_one_prediction_per_instance_in_order_and_model_garden_text(model_server: Server) -> None:
    body = {
        "instances": [{"prompt": "one", "seed": 1}, {"text": "two", "seed": 2}],
        "parameters": {"num_inference_steps": 2, "width": 64, "height": 64},
    }
    predictions = model_server.predict(body).json()["predictions"]
    assert [p["seeds"] for p in predictions] == [[1], [2]]
    assert "output" not in predictions[0]
    assert predictions[1]["output"] == predictions[1]["images"][0]


def test_the_server_png_equals_a_plain_diffusers_pipeline_pixel_for_pixel(model_server: Server, tiny_pipeline) -> None:
    import torch

    args = {
        "prompt": "a lighthouse at dusk",
        "num_inference_steps": 4,
        "guidance_scale": 6.5,
        "width": 128,
        "height": 96,
    }
    body = {
        "instances": [{"prompt": args["prompt"], "seed": 1234}],
        "parameters": {**{k: v for k, v in args.items() if k != "prompt"}, "output_format": "png"},
    }
    served = decode(model_server.predict(body).json()["predictions"][0]["images"][0])
    expected = tiny_pipeline(**args, generator=torch.Generator("cpu").manual_seed(1234)).images[0]
    assert served.size == expected.size == (128, 96)
    assert np.array_equal(np.asarray(served.convert("RGB")), np.asarray(expected))


def test_styles_change_the_prompt_and_none_does_not(model_server: Server) -> None:
    plain = model_server.predict(small(seed=5)).json()["predictions"][0]["images"][0]
    none = small(seed=5)
    none["instances"][0]["style"] = "none"  # type: ignore[index]
    styled = small(seed=5)
    styled["instances"][0]["style"] = "pixel-art"  # type: ignore[index]
    assert model_server.predict(none).json()["predictions"][0]["images"][0] == plain
    assert model_server.predict(styled).json()["predictions"][0]["images"][0] != plain


def test_eight_concurrent_requests_against_a_queue_of_two(model_server: Server) -> None:
    """Each gets 200 or 429 (with Retry-After), none hangs, and health stays fast throughout."""
    health_times: list[float] = []
    done = threading.Event()

    def watch_health() -> None:
        while not done.is_set():
            started = time.monotonic()
            assert model_server.health(timeout=5).status_code == 200
            health_times.append(time.monotonic() - started)
            time.sleep(0.05)

    watcher = threading.Thread(target=watch_health)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            responses = list(
                pool.map(lambda i: model_server.predict(small(seed=i, steps=12, size=128), timeout=60), range(8))
            )
    finally:
        done.set()
        watcher.join()
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 3  # one running + two queued at least
    assert 429 in statuses
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["code"] == 429
        else:
            assert len(response.json()["predictions"][0]["images"]) == 1
    assert health_times and max(health_times) < 1.0, max(health_times)
    assert model_server.predict(small()).status_code == 200


def test_over_the_time_limit_gets_504_and_the_next_request_is_served(tmp_path: Path) -> None:
    env = {"SDXL_MODEL": "tiny", "SDXL_TIME_LIMIT": "1.5", "SDXL_WARMUP": "64x64"}
    with server_process(env, tmp_path) as server:
        server.wait_until("ready")
        slow = server.predict(small(steps=150, size=512), timeout=30)  # a hang guard: the limit is 1.5 s
        assert slow.status_code == 504, slow.text
        assert "time limit" in slow.json()["error"]["message"]
        assert server.health(timeout=1).status_code == 200
        assert server.predict(small()).status_code == 200
        logged = [json.loads(line) for line in server.log().splitlines() if '"message": "predict"' in line]
        assert [line["status"] for line in logged] == [504, 200]
        assert logged[0]["steps_run"] < 150  # stopped between steps, not run to the end
