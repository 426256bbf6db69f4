"""LoRA in real server processes: SDXL_LORAS preloaded at start, a Hub online, and LoRA off."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.model_server import loras, published
from tests.model_server.published import assert_close, pixels
from tests.model_server.test_lora_server import gs, ok, reference, request
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
            # Each preloaded adapter is listed once, by name and first, whether its file is in the disk cache
            # (gs://), the Hub's cache or the operator's own (both used in place): all three are on the device.
            sizes = {"hub": tmp_path / "hub" / loras.WEIGHT_NAME, "local": local, "pixel": pixel}
            assert lora["cached"] == [
                {"adapter": name, "bytes": file.stat().st_size, "in_memory": True} for name, file in sizes.items()
            ]
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


def test_with_lora_off_a_request_naming_one_is_403_naming_the_variable(tiny_pipeline) -> None:
    from sdxl_server.app import create_app
    from sdxl_server.generator import Generator
    from sdxl_server.settings import Settings

    app = create_app(Settings(warmup=((64, 64),)), load=lambda _: Generator(tiny_pipeline))
    with serve_app(app) as off:
        assert "lora" not in off.wait_until("ready").json()
        for lora, field in [({"source": gs("a")}, "parameters.lora[0].source"), (None, "parameters.lora_id")]:
            body = request(lora) if lora else request(lora_id=gs("a"))
            response = off.predict(body)
            assert response.status_code == 403, response.text
            error = response.json()["error"]
            assert error["field"] == field and "SDXL_LORA_SOURCES" in error["message"]
        named = off.predict(request({"name": "pixel"}))
        assert named.status_code == 403 and "SDXL_LORAS" in named.json()["error"]["message"]
        ok(off.predict(request()))


def test_with_lora_off_the_server_adds_no_slot_and_imports_none_of_it(tmp_path: Path) -> None:
    # peft itself is imported by diffusers whenever it is installed (diffusers/loaders/lora_base.py), so what
    # LoRA off must leave out is ours: the slot's modules, the store (and its GCS client), the adapter reader.
    script = (
        "import sys\n"
        "from sdxl_server.lora.service import Loras\n"
        "from sdxl_server.loader import load_generator\n"
        "from sdxl_server.settings import Settings\n"
        f"settings = Settings(model='tiny', cache_dir={str(tmp_path)!r})\n"
        "generator = load_generator(settings)\n"
        "loras = Loras.from_settings(settings, generator.slots)\n"
        "loras.preload()\n"
        "generator.warm_up(((64, 64),))\n"
        "assert generator.slots is None and loras.health() is None\n"
        "pipe = generator.pipeline\n"
        "models = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)\n"
        "assert not [n for m in models for n, _ in m.named_parameters() if 'lora' in n]\n"
        "ours = [m for m in sys.modules if m.startswith('sdxl_server.lora.')]\n"
        "print(sorted(m for m in ours if m != 'sdxl_server.lora.service'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    # sources and request parse the request (a LoRA ref is then refused with 403); nothing that fetches or loads
    assert done.stdout.strip().splitlines()[-1] == "['sdxl_server.lora.request', 'sdxl_server.lora.sources']"
    assert not (tmp_path / "loras").exists()


def test_online_a_hub_source_is_fetched_once_and_one_outside_the_allowed_org_is_never_asked_for(tmp_path: Path) -> None:
    adapter = loras.tiny_lora(tmp_path / "a", seed=1)
    asked: list[str] = []  # every path the fake Hub is asked for
    downloads: list[str] = []
    weights = {loras.WEIGHT_NAME: adapter.read_bytes()}
    repos = {repo: ("5" * 40, weights) for repo in ("good/lora", "evil/lora", "good-evil/lora")}
    hub = published.hub_app(repos, downloads)

    async def recorded(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http":
            asked.append(scope["path"])
        await hub(scope, receive, send)

    with serve_app(recorded) as fake:
        env = {
            "SDXL_MODEL": "tiny",
            "SDXL_WARMUP": "64x64",
            "SDXL_LORA_SOURCES": "hf://good/",
            "HF_ENDPOINT": fake.url,
            "HF_HUB_OFFLINE": "0",
            "HF_HOME": str(tmp_path / "hf"),
        }
        with server_process(env, tmp_path) as online:
            online.wait_until("ready")
            for source in ("hf://evil/lora", "evil/lora", "hf://good-evil/lora", "hf://evil/lora@main/x.safetensors"):
                refused = online.predict(request({"source": source}))
                assert refused.status_code == 403, refused.text
            assert not [path for path in asked if "evil" in path]
            for _ in range(2):
                assert_close(ok(online.predict(request(lora_id="good/lora"))), reference([(adapter, 1.0)]))
    assert downloads == [f"good/lora/{loras.WEIGHT_NAME}"]  # the second use asked for the metadata only
