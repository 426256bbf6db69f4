"""LoRA end to end on the local target, and in `sdxlctl status`: a preloaded adapter from [model] loras
changes the image through `predict --lora name:0.8`, the server's refusals name the flag, and status shows
the allowed prefixes, the preloaded names and (local, from health) the cached adapters. Without LoRA in the
config, status says nothing of it."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from sdxlctl import loras
from tests.cli.local_deploy import local_deployment
from tests.conftest import Cli
from tests.emulator.core import World
from tests.emulator_fixtures import Emulator
from tests.servers import free_port


def test_status_without_lora_is_as_it_was(cli: Cli) -> None:
    text, as_json = cli("status"), cli("status", "--json")
    assert text.code == 0 and as_json.code == 0
    assert "LoRA" not in text.out + text.err
    assert set(json.loads(as_json.out)) == {"deployment", "target", "resources"}


def test_status_shows_the_configs_lora_without_a_deployment(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "sdxlctl.toml").write_text(
        '[model]\nlora_sources = ["gs://bkt/loras/", "hf://org/"]\n'
        'loras = { pixel-art = "gs://bkt/loras/p.safetensors" }\n'
    )
    text = cli("status")
    assert text.code == 0, text.err
    assert "LoRA allowed sources: gs://bkt/loras/, hf://org/" in text.out and "preloaded: pixel-art" in text.out
    assert json.loads(cli("status", "--json").out)["lora"] == {
        "sources": ["gs://bkt/loras/", "hf://org/"],
        "preloaded": ["pixel-art"],
    }


def test_the_cached_list_is_the_servers_health() -> None:
    health = {"status": "ready", "lora": {"cached": [{"adapter": "tiny", "bytes": 123, "in_memory": True}, "junk"]}}
    shown = loras.status([], {"tiny": "/x.safetensors"}, health)
    assert shown == {
        "sources": [],
        "preloaded": ["tiny"],
        "cached": [{"adapter": "tiny", "bytes": 123, "in_memory": True}],
    }
    assert loras.status([], {}, health) is None  # LoRA off in the config: nothing, whatever a server says


# ---------------------------------------------------------------- end to end, a real local server


BUCKET = "lora-flow-bucket"


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory, gcs: str) -> Iterator[tuple[Path, dict[str, str]]]:
    """`sdxlctl deploy` of the tiny model with one preloaded tiny LoRA (a file, as target local allows) and
    sources allowed under a bucket of the GCS emulator (the server reads STORAGE_EMULATOR_HOST as sdxlctl does)."""
    from tests.model_server.loras import tiny_lora

    folder = tmp_path_factory.mktemp("lora-local")
    adapter = tiny_lora(folder / "adapter", seed=3)
    (folder / "sdxlctl.toml").write_text(
        f'[model]\nloras = {{ tiny = "{adapter}" }}\nlora_sources = ["gs://{BUCKET}/loras/"]\n'
    )
    storage = Emulator("", gcs, World()).storage()  # a real client on the GCS emulator
    if storage.lookup_bucket(BUCKET) is None:
        storage.create_bucket(BUCKET)
    env = {
        "SDXLCTL_LOCAL_SERVER_PORT": str(free_port()),
        "SDXLCTL_MODEL_WARMUP": "64x64",
        "STORAGE_EMULATOR_HOST": gcs,
        "SDXLCTL_GCP_API_ENDPOINT": "http://127.0.0.1:9",  # an emulator's kind of endpoint: anonymous, never called
    }
    cache = {"SDXL_CACHE_DIR": str(folder / "server-cache")}  # inherited by the server: its LoRA cache starts empty
    with local_deployment(folder, env, server_env=cache):
        yield folder, env


def pixels(path: Path) -> bytes:
    with Image.open(path) as image:
        return image.tobytes()


def test_a_preloaded_adapter_changes_the_image_and_status_shows_it(
    cli: Cli, deployed: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder, env = deployed
    monkeypatch.chdir(folder)
    common = ("--seed", "5", "--steps", "2", "--width", "64", "--height", "64")
    plain = cli("predict", "a fox", "-o", str(tmp_path / "plain.png"), *common, env=env)
    adapted = cli("predict", "a fox", "-o", str(tmp_path / "lora.png"), *common, "--lora", "tiny:0.8", env=env)
    off = cli("predict", "a fox", "-o", str(tmp_path / "off.png"), *common, "--lora", "TINY:0", env=env)
    assert plain.code == adapted.code == off.code == 0, plain.err + adapted.err + off.err
    assert pixels(tmp_path / "lora.png") != pixels(tmp_path / "plain.png")
    assert pixels(tmp_path / "off.png") == pixels(tmp_path / "plain.png")  # scale 0 is no adapter

    refused = cli(
        "predict", "a fox", "-o", str(tmp_path / "x.png"), *common, "--lora", "gs://bkt/x.safetensors", env=env
    )
    assert refused.code == 1
    first, hint = refused.err.splitlines()[:2]
    assert first.startswith("error: --lora #1 (gs://bkt/x.safetensors): the server answered 403:"), refused.err
    assert "not under an allowed prefix (SDXL_LORA_SOURCES)" in first and "sdxlctl lora push FILE" in hint

    status = cli("status", "--json", env=env)
    assert status.code == 0, status.err
    lora = json.loads(status.out)["lora"]
    # A preloaded local file is used in place (never in the disk cache), yet on the device from the start
    assert lora["sources"] == [f"gs://{BUCKET}/loras/"] and lora["preloaded"] == ["tiny"]
    assert [(entry["adapter"], entry["in_memory"]) for entry in lora["cached"]] == [("tiny", True)], lora
    shown = cli("status", env=env).out
    assert "none yet" not in shown and "       tiny (preloaded" in shown and "in memory)" in shown, shown

    # The whole flow: push a file, predict with the source it printed, see it cached
    from tests.model_server.loras import tiny_lora

    pushed = cli("lora", "push", str(tiny_lora(tmp_path / "mine", seed=4)), "--yes", env=env)
    assert pushed.code == 0, pushed.err
    source = pushed.out.strip()
    assert source.startswith(f"gs://{BUCKET}/loras/pytorch_lora_weights-")
    mine = cli("predict", "a fox", "-o", str(tmp_path / "mine.png"), *common, "--lora", f"{source}:0.8", env=env)
    assert mine.code == 0, mine.err
    assert pixels(tmp_path / "mine.png") not in (pixels(tmp_path / "plain.png"), pixels(tmp_path / "lora.png"))
    cached = json.loads(cli("status", "--json", env=env).out)["lora"]["cached"]
    assert [(entry["adapter"], entry["in_memory"]) for entry in cached] == [("tiny", True), (source, True)], cached
    assert f"{source} (" in cli("status", env=env).out


def test_the_cached_adapters_are_listed_under_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    from sdxlctl.cli.lora_cmd import show_status

    cached = [
        {"adapter": "gs://bkt/loras/a.safetensors", "bytes": 2_500_000, "in_memory": True},
        {"adapter": "hf://org/repo/pytorch_lora_weights.safetensors", "bytes": 1_000_000, "in_memory": False},
    ]
    show_status({"sources": ["gs://bkt/loras/"], "preloaded": [], "cached": cached})
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        "LoRA allowed sources: gs://bkt/loras/",
        "     preloaded: none",
        "     cached on the server (most recent first):",
        "       gs://bkt/loras/a.safetensors (2.5 MB, in memory)",
        "       hf://org/repo/pytorch_lora_weights.safetensors (1.0 MB)",
    ]


def test_a_preloaded_adapter_in_the_servers_cache_is_shown_as_preloaded(capsys: pytest.CaptureFixture[str]) -> None:
    """The server's health lists each preloaded adapter in lora.cached by its name (in memory from the start; a
    local file has no disk-cache size): status says it is there, never 'none yet' beside it, nor '? MB'."""
    from sdxlctl.cli.lora_cmd import show_status

    health = {"lora": {"cached": [{"adapter": "tiny", "in_memory": True}, {"adapter": "ink", "bytes": 2_000_000}]}}
    show_status(loras.status([], {"tiny": "/x.safetensors", "ink": "gs://bkt/ink/"}, health) or {})
    assert capsys.readouterr().out.splitlines() == [
        "LoRA allowed sources: none (requests may name only preloaded adapters)",
        "     preloaded: ink, tiny",
        "     cached on the server (most recent first):",
        "       tiny (preloaded, in memory)",
        "       ink (preloaded, 2.0 MB)",
    ]
