"""--dry-run prints the plan with machine, GPU and cost, and sends no request at all."""

from __future__ import annotations

import pytest

from tests.conftest import Cli
from tests.emulator_fixtures import Emulator


def test_deploy_dry_run_shows_the_a100_machine_and_sends_nothing(cli: Cli, emulator: Emulator) -> None:
    result = cli("deploy", "--gpu", "a100", "--dry-run", env=emulator.env())
    assert result.code == 0, result.err
    assert "a2-highgpu-1g" in result.err and "NVIDIA_TESLA_A100" in result.err
    assert "USD/day" in result.err
    assert emulator.requests() == []


def test_the_original_deployments_daily_cost_appears_in_its_plan(cli: Cli, emulator: Emulator) -> None:
    result = cli("deploy", "--gpu", "a100", "--dry-run", env=emulator.env())
    assert "103.45 USD/day" in result.err  # europe-west4, as in 2023 (the same arithmetic as `sdxlctl cost`)


@pytest.mark.parametrize("step", [["build"], ["upload"], ["ui-deploy"], ["teardown"]])
def test_every_dry_run_sends_nothing(cli: Cli, emulator: Emulator, step: list[str]) -> None:
    result = cli(*step, "--dry-run", env=emulator.env())
    assert result.code == 0, result.err
    assert "nothing was called" in result.err
    assert emulator.requests() == []
