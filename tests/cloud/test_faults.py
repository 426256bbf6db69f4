"""Failures: operations that fail, transient errors, interruptions, things deleted by hand, errors with fixes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from sdxlctl.state import StateStore
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator


def up(cli: Cli, env: dict[str, str], *steps: str) -> None:
    for step in steps:
        result = cli(step, env=env)
        assert result.code == 0, (step, result.err)


@pytest.mark.parametrize(
    ("step", "path", "before"),
    [
        ("build", r"/builds$", []),
        ("upload", r"models:upload$", ["build"]),
        ("deploy", r"/endpoints$", ["build", "upload"]),
        ("deploy", r":deployModel$", ["build", "upload"]),
    ],
    ids=["build", "upload", "create-endpoint", "deploy-model"],
)
def test_a_failed_operation_is_a_clear_error_and_the_rerun_finishes(
    cli: Cli, emulator: Emulator, tmp_path: Path, step: str, path: str, before: list[str]
) -> None:
    env = emulator.env()
    up(cli, env, *before)
    emulator.fault(path=path, operation=True, code=500, status="INTERNAL", message="injected operation failure")
    failed = cli(step, env=env)
    assert failed.code == 1, failed.err
    assert "injected operation failure" in failed.err and "Traceback" not in failed.err
    state = StateStore(tmp_path / ".sdxlctl").read().of("sdxl")
    # what the failed operation would have made is not recorded, and no dead operation is left to wait for
    if step == "build":
        assert "server-image" not in state, state
    elif step == "upload":
        assert "model" not in state, state
    elif path == r"/endpoints$":
        assert "endpoint" not in state, state
    else:
        assert state["endpoint"].name and "deploy_operation" not in state["endpoint"].details, state
    again = cli(step, env=env)
    assert again.code == 0, again.err
    if step == "deploy":
        (endpoint,) = emulator.resources()["endpoints"]
        assert len(endpoint["deployedModels"]) == 1


def test_transient_503_and_429_are_retried(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    emulator.fault(path=r"/models$", method="GET", code=503, status="UNAVAILABLE", times=2)
    emulator.fault(
        path=r"/endpoints$",
        method="GET",
        code=429,
        status="RESOURCE_EXHAUSTED",
        message="Too many requests, try later",
        times=1,
    )
    up(cli, env, "build", "upload", "deploy")
    retried = [r for r in emulator.requests() if r["status"] in (429, 503)]
    assert len(retried) == 3


def test_a_deploy_interrupted_midway_resumes_into_one_endpoint(emulator: Emulator, tmp_path: Path) -> None:
    env = {**os.environ, **emulator.env(), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "sdxlctl"]
    for step in ("build", "upload"):
        subprocess.run([*command, step], cwd=tmp_path, env=env, check=True, capture_output=True, timeout=60)
    emulator.world.polls_to_finish = 40  # slow enough to interrupt
    deploying = subprocess.Popen([*command, "deploy"], cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
    store = StateStore(tmp_path / ".sdxlctl")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        endpoint = store.read().get("sdxl", "endpoint")
        if endpoint is not None and endpoint.details.get("deploy_operation"):
            break
        time.sleep(0.05)
    deploying.send_signal(signal.SIGINT)
    _, stderr = deploying.communicate(timeout=30)
    assert deploying.returncode == 130, stderr
    emulator.world.polls_to_finish = 2
    resumed = subprocess.run([*command, "deploy"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stderr
    (endpoint_json,) = emulator.resources()["endpoints"]
    assert len(endpoint_json["deployedModels"]) == 1
    deploys = [r for r in emulator.requests() if r["path"].endswith(":deployModel")]
    assert len(deploys) == 1  # the re-run waited for the first deployment instead of starting another


def test_teardown_after_resources_were_deleted_by_hand(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy")
    (endpoint,) = emulator.resources()["endpoints"]
    base = f"{emulator.url}/v1/{endpoint['name']}"
    (deployed,) = endpoint["deployedModels"]
    httpx.post(f"{base}:undeployModel", json={"deployedModelId": deployed["id"]}).raise_for_status()
    for _ in range(3):  # the operation finishes as it is polled
        for operation in list(emulator.world.operations.values()):
            operation.poll()
    httpx.delete(base).raise_for_status()
    result = cli("teardown", "--yes", env=env)
    assert result.code == 0, result.err
    assert emulator.labelled() == []


def test_teardown_without_the_state_file_finds_everything_by_label(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy")
    (tmp_path / ".sdxlctl" / "state.json").unlink()
    result = cli("teardown", "--yes", env=env)
    assert result.code == 0, result.err
    assert "endpoint" in result.err and "model" in result.err
    assert emulator.labelled() == []


def test_teardown_keeps_going_past_a_failure_and_exits_1(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy")
    emulator.fault(
        path=r"/endpoints/[^/:]+$",
        method="DELETE",
        code=403,
        status="PERMISSION_DENIED",
        message="Permission 'aiplatform.endpoints.delete' denied",
    )
    result = cli("teardown", "--yes", env=env)
    assert result.code == 1
    assert "failed" in result.err and "roles/aiplatform.user" in result.err
    assert cli("teardown", "--yes", env=env).code == 0
    assert emulator.labelled() == []


@pytest.mark.parametrize(
    ("fault", "expected"),
    [
        (
            {
                "path": r"models:upload$",
                "code": 403,
                "status": "PERMISSION_DENIED",
                "message": "Permission 'aiplatform.models.upload' denied on resource",
            },
            "roles/aiplatform.user",
        ),
        (
            {
                "path": r"models:upload$",
                "code": 403,
                "status": "PERMISSION_DENIED",
                "message": "Vertex AI API has not been used in project demo-project before or it is disabled.",
            },
            "gcloud services enable aiplatform.googleapis.com",
        ),
        (
            {
                "path": r"models:upload$",
                "code": 429,
                "status": "RESOURCE_EXHAUSTED",
                "message": "Quota exceeded for quota metric 'custom_model_serving_nvidia_a100_gpus'",
            },
            "quota",
        ),
    ],
    ids=["permission", "api-disabled", "quota"],
)
def test_google_errors_print_the_fix(cli: Cli, emulator: Emulator, fault: dict[str, object], expected: str) -> None:
    env = emulator.env()
    up(cli, env, "build")
    emulator.fault(**fault)
    result = cli("upload", env=env)
    assert result.code == 1
    assert expected in result.err, result.err
    assert "Traceback" not in result.err


def test_a_stockout_suggests_another_region(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload")
    emulator.fault(
        path=r":deployModel$",
        operation=True,
        code=429,
        status="RESOURCE_EXHAUSTED",
        message="The zone 'europe-west4-a' does not have enough resources available (stockout)",
    )
    result = cli("deploy", env=env)
    assert result.code == 1 and "another region" in result.err, result.err


def test_a_model_server_that_never_gets_ready_fails_the_deploy(cli: Cli, real_emulator: Emulator) -> None:
    env = real_emulator.env(SDXLCTL_MODEL_SOURCE="nobody/no-such-model")
    up(cli, env, "build", "upload")
    result = cli("deploy", env=env)
    assert result.code == 1
    assert "never became ready" in result.err and "Hugging Face Hub" in result.err
    assert real_emulator.resources()["endpoints"][0].get("deployedModels") is None


def test_build_local_says_clearly_that_no_docker_engine_is_reachable(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path}/no-docker.sock")
    result = cli("build", "--local")
    assert result.code == 1
    assert "no Docker engine is reachable" in result.err and "Cloud Build" in result.err
    assert "Traceback" not in result.err


def test_a_failed_cloud_run_operation_is_a_clear_error_and_the_rerun_finishes(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy")
    emulator.fault(path=r"/services$", operation=True, code=500, status="INTERNAL", message="revision failed to start")
    failed = cli("ui-deploy", env=env)
    assert failed.code == 1 and "revision failed to start" in failed.err
    again = cli("ui-deploy", env=env)
    assert again.code == 0, again.err
    assert len(emulator.resources()["services"]) == 1


def test_deploying_as_the_server_account_without_act_as_says_how_to_get_it(cli: Cli, emulator: Emulator) -> None:
    """Deploying a model that runs as a service account needs iam.serviceAccounts.actAs on that account."""
    env = emulator.env()
    up(cli, env, "build", "upload")
    account = "sdxl-server-sa@demo-project.iam.gserviceaccount.com"
    emulator.fault(
        path=r":deployModel$",
        code=403,
        status="PERMISSION_DENIED",
        message=f"Permission 'iam.serviceAccounts.actAs' denied on service account {account} (or it may not exist).",
    )
    result = cli("deploy", env=env)
    assert result.code == 1
    assert f"gcloud iam service-accounts add-iam-policy-binding {account}" in result.err, result.err
    assert "roles/iam.serviceAccountUser" in result.err and 'compile_cache = "none"' in result.err
