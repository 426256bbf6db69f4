"""`sdxlctl teardown` on target cloudrun: both services (the UI first), the invoker grant, the server
account's bucket grants, the accounts and the compile cache; found by label without the state file; a dry
run calls nothing; past a failure or an interruption it goes on, says which failed, and a rerun finishes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdxlctl.state import StateStore
from tests.cloud.test_faults import up
from tests.cloud.test_interrupts import interrupt_while_polling
from tests.cloudrun_target.made import BUCKET, deploy, email, env, invokers
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator

SERVER_MEMBER = f"serviceAccount:{email('sdxl-server-sa')}"


def _left(emulator: Emulator) -> dict[str, list[str]]:
    """What of deployment sdxl is in the emulator: labelled resources, and its accounts."""
    resources = emulator.resources()
    accounts = [a["email"] for a in resources.get("accounts", []) if a["email"].startswith("sdxl-")]
    return {"labelled": emulator.labelled(), "accounts": accounts}


def _nothing_left(emulator: Emulator) -> bool:
    return _left(emulator) == {"labelled": [], "accounts": []}


def test_teardown_after_the_clis_deploy_and_ui_deploy_leaves_nothing_labelled(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    e = env(emulator)
    up(cli, e, "build", "deploy", "ui-deploy")
    assert len(emulator.labelled()) >= 2
    down = cli("teardown", "--yes", env=e)
    assert down.code == 0, down.err
    assert _nothing_left(emulator), _left(emulator)
    assert emulator.bucket_roles(BUCKET, SERVER_MEMBER) == []
    kinds = set(StateStore(tmp_path / ".sdxlctl").read().of("sdxl"))
    assert kinds == {"server-image", "ui-image"}, kinds  # the images stay unless --images
    images = cli("teardown", "--yes", "--images", env=e)
    assert images.code == 0, images.err
    assert "sdxl-server" in images.err and "sdxl-ui" in images.err
    assert StateStore(tmp_path / ".sdxlctl").read().of("sdxl") == {}
    assert not [p for p in emulator.resources().get("packages", []) if "/packages/sdxl-" in p.get("name", "")]


def test_teardown_with_the_state_file_deleted_finds_everything_by_label(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    deploy(emulator, tmp_path / ".sdxlctl")
    (tmp_path / ".sdxlctl" / "state.json").unlink()
    down = cli("teardown", "--yes", env=env(emulator))
    assert down.code == 0, down.err
    assert _nothing_left(emulator), _left(emulator)
    assert emulator.bucket_roles(BUCKET, SERVER_MEMBER) == []  # the compile cache's bucket: known from the config


def test_teardown_dry_run_calls_nothing_and_says_what_goes(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    deploy(emulator, tmp_path / ".sdxlctl")
    before = len(emulator.requests())
    plan = cli("teardown", "--dry-run", env=env(emulator))
    assert plan.code == 0, plan.err
    assert emulator.requests()[before:] == []
    text = " ".join((plan.out + plan.err).split())
    for name in ("services/sdxl-server", "services/sdxl-ui", "sdxl-server-sa@", "sdxl-ui-sa@", "compile-cache/sdxl"):
        assert name in text, (name, text)
    assert "bills only while it serves" in text
    assert len(emulator.labelled()) == 2


def _down_fails_then_rerun_finishes(cli: Cli, emulator: Emulator, e: dict[str, str], failed: str) -> str:
    down = cli("teardown", "--yes", env=e)
    assert down.code == 1, down.err
    err = " ".join(down.err.split())
    assert "failed" in err and failed in err, err  # says which one failed
    assert "Traceback" not in err and "internal error" not in err
    assert not _nothing_left(emulator)  # something is left: the failure was real
    emulator.clear_faults()
    again = cli("teardown", "--yes", env=e)
    assert again.code == 0, again.err
    assert _nothing_left(emulator), _left(emulator)
    assert emulator.bucket_roles(BUCKET, SERVER_MEMBER) == []
    return err


DENIED = {"code": 403, "status": "PERMISSION_DENIED", "message": "Permission denied by an injected fault"}


@pytest.mark.parametrize(
    ("fault", "failed"),
    [
        ({"method": "DELETE", "path": r"/services/sdxl-ui$", **DENIED}, "services/sdxl-ui"),
        ({"method": "DELETE", "path": r"/serviceAccounts/sdxl-ui-sa@", **DENIED}, "sdxl-ui-sa@"),
        ({"method": "DELETE", "path": r"/serviceAccounts/sdxl-server-sa@", **DENIED}, "sdxl-server-sa@"),
        ({"method": "PUT", "path": r"^/storage/v1/b/[^/]+/iam$", "gcs": True, **DENIED}, "sdxl-server-sa@"),
        ({"method": "DELETE", "path": r"/services/sdxl-server$", "answer": "drop", "times": 10_000}, "sdxl-server"),
        (
            {
                "method": "DELETE",
                "path": r"/services/sdxl-server$",
                "code": 503,
                "status": "UNAVAILABLE",
                "times": 10_000,
            },
            "sdxl-server",
        ),
    ],
    ids=["ui-service", "ui-account", "server-account", "bucket-iam-revoke", "service-dropped", "service-503-storm"],
)
def test_teardown_goes_on_past_a_failure_says_which_and_the_rerun_finishes(
    cli: Cli, emulator: Emulator, tmp_path: Path, fault: dict[str, Any], failed: str
) -> None:
    fault = dict(fault)
    gcs = {"STORAGE_EMULATOR_HOST": emulator.url} if fault.pop("gcs", False) else {}
    e = env(emulator, SDXLCTL_GCP_RETRY_S="1", **gcs)
    deploy(emulator, tmp_path / ".sdxlctl")
    emulator.fault(**fault)
    _down_fails_then_rerun_finishes(cli, emulator, e, failed)


def test_a_model_service_that_survives_loses_the_uis_invoker_grant_before_its_account_goes(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    live = deploy(emulator, tmp_path / ".sdxlctl")
    server = live["server-service"].name
    ui_member = f"serviceAccount:{email('sdxl-ui-sa')}"
    assert invokers(emulator, server) == [ui_member]
    emulator.fault(method="DELETE", path=r"/services/sdxl-server$", **DENIED)
    down = cli("teardown", "--yes", env=env(emulator))
    assert down.code == 1, down.err
    assert invokers(emulator, server) == []  # no binding to a deleted account left on the service
    assert [a["email"] for a in emulator.resources().get("accounts", [])] == []
    kinds = set(StateStore(tmp_path / ".sdxlctl").read().of("sdxl"))
    assert kinds == {"server-service"}, kinds  # what is gone is forgotten; what is left stays recorded
    again = cli("teardown", "--yes", env=env(emulator))
    assert again.code == 0, again.err
    assert _nothing_left(emulator), _left(emulator)


def test_teardown_interrupted_while_deleting_a_service_is_finished_by_the_rerun(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    deploy(emulator, tmp_path / ".sdxlctl")
    emulator.slow("google.cloud.run.v2.Service")  # the delete's operation runs until interrupted
    interrupt_while_polling(emulator, tmp_path, ["teardown", "--yes"], "/services/", method="DELETE", env=env(emulator))
    assert not _nothing_left(emulator)  # the interrupted teardown left work to do
    with emulator.world.lock:
        emulator.world.slow.clear()
    emulator.hurry()
    again = cli("teardown", "--yes", env=env(emulator))
    assert again.code == 0, again.err
    assert _nothing_left(emulator), _left(emulator)
    assert StateStore(tmp_path / ".sdxlctl").read().of("sdxl") == {}


def _after_delete(emulator: Emulator) -> list[dict[str, Any]]:
    requests = emulator.requests()
    deletes = [i for i, r in enumerate(requests) if r["method"] == "DELETE" and "/services/" in r["path"]]
    return requests[deletes[0] + 1 :] if deletes else []
