"""Vertex AI answers through protobuf Values (doubles): the contract's integers must stay integers."""

from __future__ import annotations

import json
from pathlib import Path

from tests.conftest import Cli
from tests.emulator_fixtures import Emulator

SMALL = ["--steps", "2", "--width", "64", "--height", "64"]


def test_seeds_and_sizes_come_back_as_integers_through_vertex(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    env = emulator.env()
    for step in (["build"], ["upload"], ["deploy"]):
        assert cli(*step, env=env).code == 0, step
    # The largest seed the CLI takes: a double holds it exactly, as any integer below 2**53.
    as_json = cli("predict", "a fox", "-o", "fox.png", "--seed", str(2**32 - 1), *SMALL, "--json", env=env)
    assert as_json.code == 0, as_json.err
    result = json.loads(as_json.out)
    assert result["seeds"] == [2**32 - 1] and type(result["seeds"][0]) is int
    assert (result["width"], result["height"]) == (64, 64)
    assert '"seeds": [\n    4294967295\n  ]' in as_json.out or "[4294967295]" in as_json.out.replace(" ", "")

    text = cli("predict", "a fox", "-o", "fox.png", "--seed", "626548659", "-n", "2", *SMALL, env=env)
    assert text.code == 0, text.err
    assert text.out.splitlines() == ["fox.png  seed 626548659", "fox-1.png  seed 626548660"]
    assert "64x64 png" in text.err and ".0" not in text.out
