"""SDXL_LORAS: named adapters fetched, checked and pinned at start, in a real `python -m sdxl_server` process."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.model_server import loras, published
from tests.model_server.published import assert_close, pixels
from tests.model_server.test_lora_server import reference, request
from tests.servers import gcs_emulator, serve_app, server_process

HUB_COMMIT = "4" * 40


def test_a_server_process_preloads_gs_local_and_hub_adapters_and_requests_name_them(tmp_path: Path) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    pixel = loras.tiny_lora(tmp_path / "pixel", seed=5)
    local = loras.tiny_lora(tmp_path / "local", seed=6, weight_name="local.safetensors")
    hub = tmp_path / "hf" / "hub"
    published.hub_cache(
        hub, "good/lora", {loras.WEIGHT_NAME: loras.tiny_lora(tmp_path / "hub", seed=8).read_bytes()}, HUB_COMMIT
    )
    with gcs_emulator() as url, pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        client = storage.Client(project="test", credentials=AnonymousCredentials())
        client.create_bucket("loras").blob("pre/pixel.safetensors").upload_from_filename(str(pixel))
        env = {
            "SDXL_MODEL": "tiny",
            "SDXL_WARMUP": "64x64",
            "STORAGE_EMULATOR_HOST": url,
            "HF_HUB_CACHE": str(hub),
            "SDXL_LORAS": f"Pixel=gs://loras/pre/pixel.safetensors,local={local},hub=good/lora",
        }
        with server_process(env, tmp_path) as server:
            lora = server.wait_until("ready").json()["lora"]
            assert lora["preloaded"] == ["hub", "local", "pixel"] and lora["sources"] == 0
            answer = server.predict(request({"name": "pixel", "scale": 0.7}))
            assert answer.status_code == 200, answer.text
            assert_close(pixels(answer.json()), reference([(pixel, 0.7)]))
            two = server.predict(request([{"name": "local", "scale": 0.5}, {"name": "HUB"}]))
            assert two.status_code == 200, two.text
            assert_close(pixels(two.json()), reference([(local, 0.5), (tmp_path / "hub" / loras.WEIGHT_NAME, 1.0)]))
            # preloading allows no source: SDXL_LORA_SOURCES is unset
            refused = server.predict(request({"source": "gs://loras/pre/pixel.safetensors"}))
            assert refused.status_code == 403 and "SDXL_LORA_SOURCES" in refused.json()["error"]["message"]
        assert '"lora preloaded"' in server.log()


@pytest.mark.parametrize(
    ("entry", "says", "rank"),
    [
        ("sd15={sd15}", "SDXL_LORAS: sd15: file://{sd15} was made for another model than SDXL", 64),
        ("gone={folder}/missing.safetensors", "SDXL_LORAS: gone: {folder}/missing.safetensors not found", 64),
        ("hub=nobody/nothing", "SDXL_LORAS: hub: hf://nobody/nothing/pytorch_lora_weights.safetensors not found", 64),
        ("wide={wide}", "SDXL_LORAS: wide: rank 4 exceeds SDXL_LORA_MAX_RANK=2", 2),
    ],
)
def test_a_preload_that_fails_fails_health_naming_sdxl_loras_and_the_name(
    tmp_path: Path, entry: str, says: str, rank: int
) -> None:
    from sdxl_server.app import create_app
    from sdxl_server.loader import load_generator
    from sdxl_server.settings import Settings

    sd15 = loras.sd15_lora(tmp_path / "sd15")
    wide = loras.tiny_lora(tmp_path / "wide", seed=9, rank=4) if "wide" in entry else None
    raw = entry.format(sd15=sd15, folder=tmp_path, wide=wide)
    settings = Settings(model="tiny", warmup=((64, 64),), cache_dir=tmp_path / "cache", loras=raw, lora_max_rank=rank)
    with serve_app(create_app(settings, load=load_generator)) as server:
        health = server.wait_until("failed", timeout=120)
        reason = health.json()["reason"]
        assert says.format(sd15=sd15, folder=tmp_path) in reason and "Traceback" not in reason, reason
        assert server.predict(request({"name": raw.split("=")[0]})).status_code == 503
