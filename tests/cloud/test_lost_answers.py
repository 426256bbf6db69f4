"""Answers that never arrive: creates that happened but answered 500, dropped connections, garbled bodies,
failing operation polls, and 503 storms longer than the retry budget. After each: the step (or its rerun)
completes with exactly one of everything, and a teardown leaves nothing of the deployment behind."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from sdxlctl.state import StateStore
from tests.cloud.test_faults import up
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator

# step, the create's path, what must exist once (emulator table), the steps before
CREATES = {
    "build": ("build", r"/builds$", "builds", []),
    "upload": ("upload", r"models:upload$", "models", ["build"]),
    "create-endpoint": ("deploy", r"/endpoints$", "endpoints", ["build", "upload"]),
    "deploy-model": ("deploy", r":deployModel$", "deployedModels", ["build", "upload"]),
    "create-service": ("ui-deploy", r"/services$", "services", ["build", "upload", "deploy"]),
}


def count(emulator: Emulator, table: str) -> int:
    resources = emulator.resources()
    if table == "deployedModels":
        return sum(len(e.get("deployedModels", [])) for e in resources.get("endpoints", []))
    return len(resources.get(table, []))


def sent(emulator: Emulator, method: str, pattern: str) -> int:
    return sum(1 for r in emulator.requests() if r["method"] == method and re.search(pattern, r["path"]))


@pytest.mark.parametrize(
    ("create", "answer"),
    [
        *[(name, "error") for name in CREATES],
        ("create-endpoint", "drop"),
        ("deploy-model", "drop"),
        ("upload", "garbled"),
        ("create-service", "garbled"),
    ],
)
def test_a_create_that_happened_but_lost_its_answer_is_found_not_repeated(
    cli: Cli, emulator: Emulator, create: str, answer: str
) -> None:
    step, path, table, before = CREATES[create]
    env = emulator.env()
    up(cli, env, *before)
    emulator.fault(method="POST", path=path, after=True, answer=answer, code=500, status="INTERNAL")
    done = cli(step, env=env)
    assert done.code == 0, done.err
    assert count(emulator, table) == 1, emulator.resources()
    if create == "upload":
        (model,) = emulator.resources()["models"]
        assert model["versionId"] == "1"  # no second version either
    assert sent(emulator, "POST", path) == 1  # it was looked for, not sent again
    assert cli("teardown", "--yes", env=env).code == 0
    assert emulator.labelled() == []


@pytest.mark.parametrize("answer", ["error", "drop", "garbled"])
def test_failing_operation_polls_are_retried_and_the_deploy_finishes(
    cli: Cli, emulator: Emulator, answer: str
) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload")
    emulator.fault(method="GET", path=r"/operations/", answer=answer, code=503, status="UNAVAILABLE", times=3)
    done = cli("deploy", env=env)
    assert done.code == 0, done.err
    assert sent(emulator, "GET", r"/operations/") > 3  # the failed polls were repeated
    assert count(emulator, "deployedModels") == 1 and count(emulator, "endpoints") == 1
    assert cli("teardown", "--yes", env=env).code == 0
    assert emulator.labelled() == []


def test_a_read_whose_connection_drops_is_sent_again(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    up(cli, env, "build")
    emulator.fault(method="GET", path=r"/models$", answer="drop", times=2)
    done = cli("upload", env=env)
    assert done.code == 0, done.err
    assert sent(emulator, "GET", r"/models$") == 3


@pytest.mark.parametrize("operation", ["create_operation", "deploy_operation"])
def test_a_503_storm_on_the_polls_past_the_retry_budget_keeps_the_operation_and_the_rerun_resumes_it(
    cli: Cli, emulator: Emulator, tmp_path: Path, operation: str
) -> None:
    env = emulator.env(SDXLCTL_GCP_RETRY_S="1")
    up(cli, env, "build", "upload")
    if operation == "deploy_operation":  # an endpoint serving on a100 already: only the new deployment polls
        assert cli("deploy", "--gpu", "a100", env=env).code == 0
    emulator.fault(method="GET", path=r"/operations/", code=503, status="UNAVAILABLE", times=10_000)
    failed = cli("deploy", "--gpu", "l4", env=env)
    assert failed.code == 1
    assert "could not be read" in failed.err and "Traceback" not in failed.err, failed.err
    assert "running the step again waits for it" in failed.err
    endpoint = StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "endpoint")
    assert endpoint is not None and endpoint.details.get(operation), "the operation must stay recorded"

    httpx.delete(f"{emulator.url}/_emulator/faults").raise_for_status()  # the storm ends
    again = cli("deploy", "--gpu", "l4", env=env)
    assert again.code == 0, again.err
    assert sent(emulator, "POST", r"/endpoints$") == 1  # the rerun waited for what was started
    assert sent(emulator, "POST", r":deployModel$") == (2 if operation == "deploy_operation" else 1)
    assert count(emulator, "endpoints") == 1
    (endpoint_json,) = emulator.resources()["endpoints"]
    (deployed,) = endpoint_json["deployedModels"]
    assert deployed["dedicatedResources"]["machineSpec"]["machineType"] == "g2-standard-8"
    assert cli("teardown", "--yes", env=env).code == 0
    assert emulator.labelled() == []


def test_a_503_storm_on_a_create_past_the_retry_budget_is_one_clear_line_and_the_rerun_creates_it(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    env = emulator.env(SDXLCTL_GCP_RETRY_S="1")
    up(cli, env, "build", "upload")
    emulator.fault(method="POST", path=r"/endpoints$", code=503, status="UNAVAILABLE", times=10_000)
    failed = cli("deploy", env=env)
    assert failed.code == 1
    assert "create the endpoint" in failed.err and "Traceback" not in failed.err, failed.err
    assert "internal error" not in failed.err.lower()
    assert emulator.resources().get("endpoints", []) == []
    endpoint = StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "endpoint")
    assert endpoint is None  # nothing half-recorded

    httpx.delete(f"{emulator.url}/_emulator/faults").raise_for_status()
    again = cli("deploy", env=env)
    assert again.code == 0, again.err
    assert count(emulator, "endpoints") == 1 and count(emulator, "deployedModels") == 1
    assert cli("teardown", "--yes", env=env).code == 0
    assert emulator.labelled() == []


@pytest.mark.parametrize("answer", ["error", "drop", "garbled"])
def test_reads_that_keep_failing_past_the_retry_budget_are_one_clear_line(
    cli: Cli, emulator: Emulator, answer: str
) -> None:
    env = emulator.env(SDXLCTL_GCP_RETRY_S="1")
    up(cli, env, "build")
    emulator.fault(method="GET", path=r"/models$", answer=answer, code=503, status="UNAVAILABLE", times=10_000)
    failed = cli("upload", env=env)
    assert failed.code == 1
    assert "list models" in failed.err and "Traceback" not in failed.err, failed.err
    assert "internal error" not in failed.err.lower()
    assert "running the step again" in failed.err
    assert emulator.resources().get("models", []) == []


@pytest.mark.parametrize(
    ("step", "before", "path"),
    [
        ("build", [], r"/builds/[^/:]+$"),  # a build is followed by reading the build itself
        ("ui-deploy", ["build", "upload", "deploy"], r"^/v2/.*/operations/"),  # Cloud Run's operations
    ],
    ids=["build", "cloud-run"],
)
@pytest.mark.parametrize("answer", ["drop", "garbled"])
def test_failing_polls_of_builds_and_cloud_run_are_retried(
    cli: Cli, emulator: Emulator, step: str, before: list[str], path: str, answer: str
) -> None:
    env = emulator.env()
    up(cli, env, *before)
    emulator.fault(method="GET", path=path, answer=answer, times=3)
    done = cli(step, env=env)
    assert done.code == 0, done.err
    assert not emulator.world.faults  # all three were met, and got past
    table = "builds" if step == "build" else "services"
    assert count(emulator, table) == 1
