"""Teardown removes exactly one deployment, survives failures beyond the endpoint, and a rerun finishes it."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from tests.cloud.test_faults import up
from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, Emulator

OTHER = "other"


def of(emulator: Emulator, deployment: str) -> dict[str, list[Any]]:
    """Everything in the emulator that belongs to `deployment`: labelled resources, and its accounts."""
    found: dict[str, list[Any]] = {}
    for kind, table in emulator.resources().items():
        for resource in table:
            labelled = resource.get("labels", {}).get("sdxlctl-deployment") == deployment
            account = kind == "accounts" and resource["email"].startswith(f"{deployment}-")
            if labelled or account:
                found.setdefault(kind, []).append(resource)
    return found


def names(resources: dict[str, list[Any]]) -> dict[str, list[str]]:
    return {kind: sorted(r.get("name", r.get("email", "")) for r in rs) for kind, rs in resources.items()}


@pytest.fixture
def two(cli: Cli, emulator: Emulator) -> dict[str, str]:
    """Deployments `sdxl` and `other` side by side, each with its endpoint, model, UI service and accounts."""
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy", "ui-deploy")
    other = {**env, "SDXLCTL_NAME": OTHER}
    up(cli, other, "build", "upload", "deploy", "ui-deploy")
    kinds = set(of(emulator, OTHER))
    assert {"endpoints", "models", "services", "accounts"} <= kinds, kinds
    return env


def test_teardown_of_one_deployment_leaves_every_resource_of_another(
    cli: Cli, emulator: Emulator, two: dict[str, str]
) -> None:
    before = copy.deepcopy(of(emulator, OTHER))
    down = cli("teardown", "--yes", env=two)
    assert down.code == 0, down.err
    assert of(emulator, "sdxl") == {}
    after = of(emulator, OTHER)
    assert names(after) == names(before)
    (endpoint,) = after["endpoints"]
    assert len(endpoint["deployedModels"]) == 1  # still serving


def test_teardown_without_the_state_file_still_leaves_the_other_deployment(
    cli: Cli, emulator: Emulator, two: dict[str, str], tmp_path: Any
) -> None:
    """Found by label only: the label filter is all that tells the two apart."""
    before = names(of(emulator, OTHER))
    (tmp_path / ".sdxlctl" / "state.json").unlink()
    down = cli("teardown", "--yes", env=two)
    assert down.code == 0, down.err
    assert names(of(emulator, OTHER)) == before
    assert of(emulator, "sdxl") == {}


DENIED = {"code": 403, "status": "PERMISSION_DENIED", "message": "Permission denied by an injected fault"}


@pytest.mark.parametrize(
    "fault",
    [
        {"method": "DELETE", "path": r"/models/[^/:]+$", **DENIED},
        {"method": "DELETE", "path": r"/services/[^/:]+$", **DENIED},
        {"method": "DELETE", "path": r"/serviceAccounts/sdxl-ui-sa@", **DENIED},
        {"method": "POST", "path": r":undeployModel$", "operation": True, "code": 500, "status": "INTERNAL"},
        {"method": "DELETE", "path": r"/models/[^/:]+$", "operation": True, "code": 500, "status": "INTERNAL"},
        {"method": "POST", "path": r":getIamPolicy$", **DENIED},
        {"method": "PUT", "path": r"^/storage/v1/b/[^/]+/iam$", "gcs": True, **DENIED},
        {"method": "DELETE", "path": r"/endpoints/[^/:]+$", "code": 503, "status": "UNAVAILABLE", "times": 10_000},
        {"method": "DELETE", "path": r"/services/[^/:]+$", "answer": "drop", "times": 10_000},
    ],
    ids=[
        "model",
        "service",
        "account",
        "undeploy-midway",
        "model-delete-midway",
        "iam-revoke",
        "bucket-iam-revoke",
        "endpoint-503-storm",
        "service-dropped",
    ],
)
def test_teardown_past_a_failure_beyond_the_endpoint_and_the_rerun_finishes(
    cli: Cli, emulator: Emulator, fault: dict[str, Any]
) -> None:
    fault = dict(fault)
    # Cloud Storage through the emulator, where faults apply to it too (else straight to the GCS emulator)
    gcs = {"STORAGE_EMULATOR_HOST": emulator.url} if fault.pop("gcs", False) else {}
    env = emulator.env(SDXLCTL_GCP_RETRY_S="1", **gcs)
    up(cli, env, "build", "upload", "deploy", "ui-deploy")
    account = f"serviceAccount:sdxl-server-sa@{PROJECT}.iam.gserviceaccount.com"
    assert emulator.bucket_roles(f"{PROJECT}-sdxlctl", account) != []
    emulator.fault(**fault)
    failed = cli("teardown", "--yes", env=env)
    assert failed.code == 1, failed.err
    assert "failed" in failed.err and "Traceback" not in failed.err and "internal error" not in failed.err
    assert of(emulator, "sdxl") != {}  # something is left: the failure was real
    emulator.clear_faults()
    again = cli("teardown", "--yes", env=env)
    assert again.code == 0, again.err
    assert of(emulator, "sdxl") == {}
    assert emulator.resources().get("accounts", []) == []
    assert emulator.bucket_roles(f"{PROJECT}-sdxlctl", account) == []  # its grant went with the account


def test_a_delete_that_happened_but_lost_its_answer_counts_as_done(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy")
    emulator.fault(method="DELETE", path=r"/endpoints/[^/:]+$", after=True, code=500, status="INTERNAL")
    down = cli("teardown", "--yes", env=env)
    assert down.code == 0, down.err
    assert of(emulator, "sdxl") == {}


def test_an_undeploy_answered_not_found_does_not_pass_the_endpoint_off_as_deleted(
    cli: Cli, emulator: Emulator
) -> None:
    """"DeployedModel not found" is about the deployed model (an earlier teardown's undeploy may have ended
    it): teardown goes on to the endpoint, and says it failed while the endpoint is still there."""
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy")
    emulator.fault(
        method="POST", path=r":undeployModel$", code=404, status="NOT_FOUND", message="DeployedModel 1 not found."
    )
    down = cli("teardown", "--yes", env=env)
    assert len(emulator.resources()["endpoints"]) == 1
    assert down.code == 1, down.err
    assert "already deleted" not in down.err, down.err  # the endpoint is there: not reported gone
    assert cli("teardown", "--yes", env=env).code == 0
    assert of(emulator, "sdxl") == {}
