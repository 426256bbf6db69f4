"""LoRA end to end on the local target, and in `sdxlctl status`: a preloaded adapter from [model] loras
changes the image through `predict --lora name:0.8`, the server's refusals name the flag, and status shows
the allowed prefixes, the preloaded names and (local, from health) the cached adapters. Without LoRA in the
config, status says nothing of it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from PIL import Image

from sdxlctl import loras
from tests.conftest import Cli
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


@pytest.fixture(scope="module")
def deployed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, dict[str, str]]]:
    """`sdxlctl deploy` of the tiny model with one preloaded tiny LoRA (a file: the local target has no GCS)."""
    from tests.model_server.loras import tiny_lora

    folder = tmp_path_factory.mktemp("lora-local")
    adapter = tiny_lora(folder / "adapter", seed=3)
    (folder / "sdxlctl.toml").write_text(f'[model]\nloras = {{ tiny = "{adapter}" }}\n')
    env = {"SDXLCTL_LOCAL_SERVER_PORT": str(free_port()), "SDXLCTL_MODEL_WARMUP": "64x64"}
    full = {**{k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")}, **env, "HF_HUB_OFFLINE": "1"}
    sdxlctl = [sys.executable, "-m", "sdxlctl"]
    started = subprocess.run([*sdxlctl, "deploy"], cwd=folder, env=full, capture_output=True, text=True, timeout=240)
    try:
        assert started.returncode == 0, started.stderr
        yield folder, env
    finally:
        subprocess.run([*sdxlctl, "teardown", "--yes"], cwd=folder, env=full, capture_output=True, timeout=60)


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
    assert "SDXL_LORA_SOURCES" in first and "[model] lora_sources" in hint

    status = cli("status", "--json", env=env)
    assert status.code == 0, status.err
    lora = json.loads(status.out)["lora"]
    assert lora["sources"] == [] and lora["preloaded"] == ["tiny"]
    # From the server's health: its disk cache, which an operator's local file is not in (used in place)
    assert lora["cached"] == [], lora
    text = cli("status", env=env)
    assert "preloaded: tiny" in text.out and "cached on the server: none yet" in text.out


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
