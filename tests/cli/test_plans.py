"""Dry runs: `--json` puts the plan on stdout as JSON; a human plan never cuts a name, also at 80 columns piped."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Cli

PROJECT = "a-rather-long-project-id-42"
VERTEX = {"SDXLCTL_TARGET": "vertex", "SDXLCTL_GCP_PROJECT": PROJECT}


@pytest.mark.parametrize("step", ["build", "upload", "deploy", "ui-deploy", "teardown"])
def test_a_dry_run_with_json_prints_the_plan_as_json_on_stdout(cli: Cli, tmp_path: Path, step: str) -> None:
    result = cli(step, "--dry-run", "--json", env=VERTEX)
    assert result.code == 0, result
    plan = json.loads(result.out)
    assert plan["step"] == step and plan["dry_run"] is True and plan["changes"]
    for change in plan["changes"]:
        assert set(change) == {"action", "kind", "name", "detail"} and change["name"]
    assert "plan (--dry-run" not in result.err  # the plan is on stdout, not also on stderr
    assert not (tmp_path / ".sdxlctl").exists()  # a plan records nothing


def test_the_deploy_plan_carries_its_cost_and_the_accounts_full_name(cli: Cli) -> None:
    plan = json.loads(cli("deploy", "--dry-run", "--json", "--gpu", "a100", env=VERTEX).out)
    assert plan["cost"]["gpu"] == "a100" and plan["cost"]["days"] == 1 and plan["cost"]["usd"]["total"] > 0
    names = [change["name"] for change in plan["changes"]]
    assert f"sdxl-server-sa@{PROJECT}.iam.gserviceaccount.com" in names


def test_the_local_plan_is_json_too_and_costs_nothing_here(cli: Cli) -> None:
    result = cli("deploy", "--dry-run", "--json")
    plan = json.loads(result.out)
    assert result.code == 0 and plan["step"] == "deploy" and plan["dry_run"] is True
    assert "python -m sdxl_server" in plan["message"] and "cost" not in plan


def test_a_human_plan_at_80_columns_piped_keeps_every_name_and_word_whole(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")}
    env |= VERTEX | {"COLUMNS": "80", "CLOUDSDK_CONFIG": str(tmp_path / "gcloud")}

    def sdxlctl(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "sdxlctl", *args]
        return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)

    for step in ("deploy", "ui-deploy"):
        human, data = sdxlctl(step, "--dry-run"), sdxlctl(step, "--dry-run", "--json")
        assert human.returncode == 0 and data.returncode == 0, human.stderr
        lines = human.stderr.splitlines()
        words = {word for line in lines for word in line.split()}
        for change in json.loads(data.stdout)["changes"]:
            # The name whole on the line of its action; each word of the detail whole on some line.
            assert any(change["name"] in line and change["action"] in line for line in lines), change["name"]
            assert set(change["detail"].split()) <= words, change["detail"]
        assert human.stdout == ""


@pytest.mark.parametrize(
    ("low", "high", "scale", "day"),
    [("1", "1", "1 replica;", "for 1 replica"), ("2", "3", "2..3 replicas;", "for 2 replicas")],
)
def test_the_deploy_plan_counts_replicas_as_cost_does(cli: Cli, low: str, high: str, scale: str, day: str) -> None:
    replicas = {"SDXLCTL_DEPLOY_MIN_REPLICAS": low, "SDXLCTL_DEPLOY_MAX_REPLICAS": high}
    plan = json.loads(cli("deploy", "--dry-run", "--json", env=VERTEX | replicas).out)
    detail = plan["changes"][-1]["detail"]
    assert scale in detail and detail.endswith(day), detail  # not "replicas 1..1" nor "1 replica(s)"
