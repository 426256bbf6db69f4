"""Target cloudrun under the faults target vertex is tested against (tests/cloud/test_faults.py,
test_lost_answers.py, test_interrupts.py, test_teardown_faults.py): a 5xx storm on the create, a create that
happened but lost its answer, an operation that fails, Ctrl-C while deploy waits, a delete that fails."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from sdxlctl.state import StateStore
from tests.cloud.test_interrupts import interrupt_while_polling
from tests.cloudrun_target.test_lifecycle import SMALL, env_of, services, up
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator

CREATE = r"/services$"  # Run v2's create: POST .../locations/R/services?serviceId=ID


def sent(emulator: Emulator, method: str, pattern: str) -> int:
    return sum(1 for r in emulator.requests() if r["method"] == method and re.search(pattern, r["path"]))


def test_a_503_storm_on_the_create_is_retried_into_one_service(cli: Cli, emulator: Emulator) -> None:
    env = env_of(emulator)
    up(cli, env, "build")
    emulator.fault(method="POST", path=CREATE, code=503, status="UNAVAILABLE", message="try again", times=3)
    done = cli("deploy", env=env)
    assert done.code == 0, done.err
    assert not emulator.world.faults  # all three were met
    assert list(services(emulator)) == ["sdxl-server"]
    assert [r["status"] for r in emulator.requests() if r["method"] == "POST" and re.search(CREATE, r["path"])][
        -1
    ] == 200


def test_a_create_that_happened_but_lost_its_answer_is_found_not_repeated(cli: Cli, emulator: Emulator) -> None:
    env = env_of(emulator)
    up(cli, env, "build")
    emulator.fault(method="POST", path=CREATE, after=True, answer="drop", code=500, status="INTERNAL")
    done = cli("deploy", env=env)
    assert done.code == 0, done.err
    assert list(services(emulator)) == ["sdxl-server"]
    assert sent(emulator, "POST", CREATE) == 1  # looked for, not sent again
    assert cli("teardown", "--yes", env=env).code == 0
    assert emulator.labelled() == []


@pytest.mark.timeout(90)
def test_a_failed_operation_is_a_clear_error_and_the_rerun_finishes(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    env = env_of(emulator)
    up(cli, env, "build")
    emulator.fault(path=CREATE, operation=True, code=500, status="INTERNAL", message="injected operation failure")
    failed = cli("deploy", env=env)
    assert failed.code == 1, failed.err
    assert "injected operation failure" in failed.err and "Traceback" not in failed.err
    recorded = StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "server-service")
    # not recorded as deployed (no URL, no revision), and no dead operation left to wait for
    assert recorded is None or (not recorded.url and not recorded.details.get("revision")), recorded
    again = cli("deploy", env=env)
    assert again.code == 0, again.err
    assert list(services(emulator)) == ["sdxl-server"]
    assert services(emulator)["sdxl-server"].get("uri")
    assert cli("predict", "a fox", "-o", "fox.png", *SMALL, env=env).code == 0


def test_ctrl_c_while_deploy_waits_resumes_into_one_service(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    """A real SIGINT to a real `python -m sdxlctl deploy` while the service's operation is polled."""
    env = env_of(emulator)
    up(cli, env, "build")
    emulator.slow("google.cloud.run.v2.Service")
    interrupt_while_polling(emulator, tmp_path, ["deploy"], CREATE, env=env)
    emulator.hurry()  # meanwhile the rollout it started ends in the cloud
    again = cli("deploy", env=env)
    assert again.code == 0, again.err
    assert sent(emulator, "POST", CREATE) == 1  # the rerun found the service instead of creating another
    assert list(services(emulator)) == ["sdxl-server"]
    assert StateStore(tmp_path / ".sdxlctl").read().get("sdxl", "server-service") is not None


def test_teardown_keeps_going_past_a_failing_delete_and_the_rerun_finishes(cli: Cli, emulator: Emulator) -> None:
    env = env_of(emulator)
    up(cli, env, "build", "deploy", "ui-deploy")
    emulator.fault(
        path=r"/services/sdxl-server$",
        method="DELETE",
        code=403,
        status="PERMISSION_DENIED",
        message="Permission 'run.services.delete' denied on resource",
    )
    failed = cli("teardown", "--yes", env=env)
    assert failed.code == 1, failed.err
    assert "failed" in failed.err and "run.services.delete" in failed.err and "Traceback" not in failed.err
    assert list(services(emulator)) == ["sdxl-server"]  # the UI went; the one refused delete is all that is left
    again = cli("teardown", "--yes", env=env)
    assert again.code == 0, again.err
    assert emulator.labelled() == []
    assert emulator.resources().get("accounts", []) == []
