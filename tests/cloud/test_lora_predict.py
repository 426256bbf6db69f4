"""predict --lora on target vertex, through the Vertex AI emulator to a real model server: the request's
parameters.lora reaches the server through protobuf Values, and its refusal comes back named as the flag."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Cli
from tests.emulator_fixtures import Emulator


def test_a_refused_lora_is_named_as_its_flag_through_vertex(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    env = emulator.env()
    for step in (["build"], ["upload"], ["deploy"]):
        assert cli(*step, env=env).code == 0, step
    # The shared tiny server has LoRA off: every source is a 403 naming SDXL_LORA_SOURCES.
    result = cli(
        "predict", "a fox", "-o", "fox.png", "--lora", "pixel:0.5", "--lora", "gs://bkt/x.safetensors", env=env
    )
    assert result.code == 1
    first, hint = result.err.splitlines()[:2]
    assert first.startswith("error: --lora #1 (pixel:0.5): the server answered 403: "), result.err
    assert "LoRA adapters are off on this server" in first and "SDXL_LORAS" in first, result.err
    assert hint.startswith("hint: preload it: [model] loras = "), result.err
    assert not (tmp_path / "fox.png").exists()
