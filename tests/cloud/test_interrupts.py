"""Ctrl-C (a real SIGINT to a real `python -m sdxlctl`) while an operation polls; then the rerun finishes,
with nothing started twice and nothing left behind."""

from __future__ import annotations

import re
from pathlib import Path

from sdxlctl.state import StateStore
from tests.cloud.test_faults import up
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator
from tests.interrupts import interrupt_sdxlctl


def sent(emulator: Emulator, method: str, pattern: str) -> int:
    return sum(1 for r in emulator.requests() if r["method"] == method and re.search(pattern, r["path"]))


def interrupt_while_polling(
    emulator: Emulator,
    cwd: Path,
    step: list[str],
    started: str,
    *,
    method: str = "POST",
    env: dict[str, str] | None = None,
) -> str:
    """Run `sdxlctl STEP` (with `env`, default the emulator's), send SIGINT once the request `started` (`method`)
    was answered and its operation polled, and return stderr; the command must end as interrupted (130) within 30 s."""

    def polled() -> bool:
        requests = emulator.requests()
        posted = [i for i, r in enumerate(requests) if r["method"] == method and re.search(started, r["path"])]
        return bool(posted) and any("/operations/" in r["path"] for r in requests[posted[0] + 1 :])

    return interrupt_sdxlctl(
        step, cwd=cwd, env=env or emulator.env(), ready=polled, never="the step never reached the operation"
    )


def test_teardown_interrupted_while_undeploying_is_finished_by_the_rerun(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy", "ui-deploy")
    emulator.slow("UndeployModelOperationMetadata")
    interrupt_while_polling(emulator, tmp_path, ["teardown", "--yes"], r":undeployModel$")
    assert emulator.labelled() != []  # the interrupted teardown left work to do
    emulator.hurry()  # meanwhile the undeploy it started ends in the cloud
    again = cli("teardown", "--yes", env=env)
    assert again.code == 0, again.err
    assert emulator.labelled() == []
    assert emulator.resources().get("accounts", []) == []
    assert sent(emulator, "POST", r":undeployModel$") == 1  # the rerun waited for the first undeploy
    assert StateStore(tmp_path / ".sdxlctl").read().of("sdxl").keys() <= {"server-image", "ui-image"}


def test_ui_deploy_interrupted_while_the_service_starts_is_finished_by_the_rerun(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy")
    emulator.slow("google.cloud.run.v2.Service")
    interrupt_while_polling(emulator, tmp_path, ["ui-deploy"], r"/services$")
    emulator.hurry()
    again = cli("ui-deploy", env=env)
    assert again.code == 0, again.err
    assert len(emulator.resources()["services"]) == 1 and sent(emulator, "POST", r"/services$") == 1
    assert again.out.strip() == emulator.resources()["services"][0]["uri"]
    assert StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "ui-service") is not None
    down = cli("teardown", "--yes", env=env)
    assert down.code == 0, down.err
    assert emulator.labelled() == [] and emulator.resources().get("accounts", []) == []


def test_deploy_interrupted_while_creating_the_endpoint_waits_for_it_on_the_rerun(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload")
    emulator.slow("CreateEndpointOperationMetadata")
    interrupt_while_polling(emulator, tmp_path, ["deploy"], r"/endpoints$")
    endpoint = StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "endpoint")
    assert endpoint is not None and endpoint.details.get("create_operation")
    emulator.hurry()
    again = cli("deploy", env=env)
    assert again.code == 0, again.err
    assert sent(emulator, "POST", r"/endpoints$") == 1
    (endpoint_json,) = emulator.resources()["endpoints"]
    assert len(endpoint_json["deployedModels"]) == 1
