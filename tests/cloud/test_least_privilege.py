"""Least privilege: the UI's account may only call predict on its endpoint, the server's account may only use
its own compile-cache folder, and teardown takes both grants away, leaving another deployment's alone.

Policies are read back with the real client libraries; what a storage grant allows is decided from the
policy for the requests the model server's own gs:// code sends (tests/cloud/gcs_access.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.cloud.gcs_access import Access, allowed, recording_proxy
from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, Emulator

ROLE = f"projects/{PROJECT}/roles/sdxlctlEndpointPredictor"
UI = f"serviceAccount:sdxl-ui-sa@{PROJECT}.iam.gserviceaccount.com"
SERVER = f"serviceAccount:sdxl-server-sa@{PROJECT}.iam.gserviceaccount.com"
OTHER_SERVER = f"serviceAccount:sdxl-two-server-sa@{PROJECT}.iam.gserviceaccount.com"
CACHE_KEY = "torch-2.11.0-cu130-nvidia-l4"


def up(cli: Cli, env: dict[str, str], *steps: str) -> str:
    err = ""
    for step in steps:
        result = cli(step, env=env)
        assert result.code == 0, (step, result.err)
        err += result.err
    return err


def endpoint_policy(emulator: Emulator, endpoint: str) -> dict[str, list[str]]:
    """role -> members on the endpoint, read with the v1beta1 client sdxlctl grants through."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import aiplatform_v1beta1

    client = aiplatform_v1beta1.EndpointServiceClient(
        credentials=AnonymousCredentials(), transport="rest", client_options={"api_endpoint": emulator.url}
    )
    policy = client.get_iam_policy(request={"resource": endpoint})
    return {binding.role: sorted(binding.members) for binding in policy.bindings}


def the_endpoint(emulator: Emulator) -> str:
    (endpoint,) = emulator.resources()["endpoints"]
    return str(endpoint["name"])


def role(emulator: Emulator) -> dict[str, Any]:
    answer = httpx.get(f"{emulator.url}/v1/{ROLE}")
    assert answer.status_code == 200, answer.text
    return dict(answer.json())


def text(err: str) -> str:
    """The report's table as one line of words (cells fold long text onto the next row)."""
    import re

    return re.sub(r"[\s│┃]+", " ", err)


def writes(emulator: Emulator, pattern: str) -> list[dict[str, Any]]:
    import re

    return [r for r in emulator.requests() if r["method"] != "GET" and re.search(pattern, r["path"])]


# ---------------------------------------------------------------- the UI's account (point 16)


def test_the_ui_account_may_only_call_predict_on_its_endpoint_and_a_rerun_changes_nothing(
    cli: Cli, emulator: Emulator
) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy", "ui-deploy")
    assert role(emulator)["includedPermissions"] == ["aiplatform.endpoints.predict"]
    assert endpoint_policy(emulator, the_endpoint(emulator)) == {ROLE: [UI]}  # nothing wider, nothing else

    before = len(emulator.requests())
    again = cli("ui-deploy", env=env)
    assert again.code == 0, again.err
    changed = [r for r in emulator.requests()[before:] if r["path"].endswith(":setIamPolicy")]
    assert changed == [] and len(writes(emulator, r"/roles")) == 1  # created once, bound once


def test_the_role_is_restored_to_predict_only_when_it_was_widened_or_deleted(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy")
    created = httpx.post(
        f"{emulator.url}/v1/projects/{PROJECT}/roles",
        json={
            "roleId": "sdxlctlEndpointPredictor",
            "role": {"includedPermissions": ["aiplatform.endpoints.predict", "aiplatform.endpoints.delete"]},
        },
    )
    assert created.status_code == 200, created.text
    assert httpx.delete(f"{emulator.url}/v1/{ROLE}").status_code == 200

    ui = cli("ui-deploy", env=env)
    assert ui.code == 0, ui.err
    restored = role(emulator)
    assert restored["includedPermissions"] == ["aiplatform.endpoints.predict"] and not restored.get("deleted")
    assert endpoint_policy(emulator, the_endpoint(emulator)) == {ROLE: [UI]}


def test_without_permission_to_create_roles_the_ui_gets_aiplatform_user_and_a_warning_with_the_command(
    cli: Cli, emulator: Emulator
) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy")
    denied = "Permission 'iam.roles.create' denied on resource (or it may not exist)."
    emulator.fault(method="POST", path=r"/projects/[^/]+/roles$", code=403, status="PERMISSION_DENIED", message=denied)
    ui = cli("ui-deploy", env=env)
    assert ui.code == 0, ui.err
    said = text(ui.err)
    assert "warn" in said and "gcloud iam roles create sdxlctlEndpointPredictor" in said
    assert "--permissions=aiplatform.endpoints.predict" in said and "roles/aiplatform.user" in said
    assert endpoint_policy(emulator, the_endpoint(emulator)) == {"roles/aiplatform.user": [UI]}

    # Once an administrator has made the role, the next ui-deploy narrows the grant to it.
    again = cli("ui-deploy", env=env)
    assert again.code == 0, again.err
    assert endpoint_policy(emulator, the_endpoint(emulator)) == {ROLE: [UI]}


def test_a_user_who_may_not_read_roles_still_gets_the_role_an_administrator_made(cli: Cli, emulator: Emulator) -> None:
    """iam.roles.get denied, iam.roles.create answers 409: the role exists, and binding it needs neither."""
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy")
    made = httpx.post(
        f"{emulator.url}/v1/projects/{PROJECT}/roles",
        json={"roleId": "sdxlctlEndpointPredictor", "role": {"includedPermissions": ["aiplatform.endpoints.predict"]}},
    )
    assert made.status_code == 200, made.text
    emulator.fault(method="GET", path=r"/roles/sdxlctlEndpointPredictor$", code=403, status="PERMISSION_DENIED")
    ui = cli("ui-deploy", env=env)
    assert ui.code == 0, ui.err
    assert endpoint_policy(emulator, the_endpoint(emulator)) == {ROLE: [UI]}


def test_teardown_revokes_the_ui_grant_on_an_endpoint_it_could_not_delete_and_keeps_the_shared_role(
    cli: Cli, emulator: Emulator
) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload", "deploy", "ui-deploy")
    endpoint = the_endpoint(emulator)
    emulator.fault(method="DELETE", path=r"/endpoints/[^/:]+$", code=403, status="PERMISSION_DENIED")
    failed = cli("teardown", "--yes", env=env)
    assert failed.code == 1
    assert endpoint_policy(emulator, endpoint) == {}  # the endpoint is still there; the UI may no longer call it
    assert cli("teardown", "--yes", env=env).code == 0
    down_again = cli("teardown", "--yes", env=env)
    assert down_again.code == 0
    assert role(emulator).get("deleted") is None  # other deployments' UIs may hold it
    assert "gcloud iam roles delete sdxlctlEndpointPredictor" in text(failed.err)


def test_a_second_deployments_ui_keeps_its_grant_and_the_role_when_the_first_is_torn_down(
    cli: Cli, emulator: Emulator
) -> None:
    first, second = emulator.env(), emulator.env(SDXLCTL_NAME="sdxl-two")
    up(cli, first, "build", "upload", "deploy", "ui-deploy")
    up(cli, second, "build", "upload", "deploy", "ui-deploy")
    assert cli("teardown", "--yes", env=first).code == 0
    (endpoint,) = emulator.resources()["endpoints"]
    other_ui = f"serviceAccount:sdxl-two-ui-sa@{PROJECT}.iam.gserviceaccount.com"
    assert endpoint_policy(emulator, endpoint["name"]) == {ROLE: [other_ui]}
    assert role(emulator)["includedPermissions"] == ["aiplatform.endpoints.predict"]
    assert cli("teardown", "--yes", env=second).code == 0


# ---------------------------------------------------------------- the server's account (point 17)


@pytest.fixture
def staging() -> str:
    """A staging bucket of this test's own: the GCS emulator lives as long as the session."""
    import uuid

    return f"sdxlctl-{uuid.uuid4().hex[:12]}"


def bucket_policy(emulator: Emulator, bucket: str) -> dict[str, Any]:
    policy = emulator.storage().bucket(bucket).get_iam_policy(requested_policy_version=3)
    return {"version": policy.version, "bindings": [dict(b) for b in policy.bindings]}


def server_requests(emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache: str) -> list[Access]:
    """What the model server's own gs:// code asks of Cloud Storage to restore and publish its cache."""
    from sdxl_server.gcs import download_folder, upload_file

    folder = f"{cache}/{CACHE_KEY}"
    bucket, _, prefix = folder.removeprefix("gs://").partition("/")
    emulator.storage().bucket(bucket).blob(f"{prefix}/sdxl-compile-artifacts.bin").upload_from_string(b"compiled")
    artifact = tmp_path / "published" / "sdxl-compile-artifacts.bin"
    artifact.parent.mkdir()
    artifact.write_bytes(b"compiled again")
    with recording_proxy(emulator.gcs_url) as (url, seen):
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        restored = download_folder(folder, tmp_path / "restore", missing_ok=True)
        upload_file(artifact, folder)
    assert (restored / "sdxl-compile-artifacts.bin").read_bytes() == b"compiled"
    assert {a.permission for a in seen} == {"storage.objects.list", "storage.objects.get", "storage.objects.create"}
    return seen


def test_the_server_account_may_use_only_its_own_cache_folder_and_still_finds_its_cache(
    cli: Cli, emulator: Emulator, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, staging: str
) -> None:
    up(cli, emulator.env(SDXLCTL_GCP_STAGING_BUCKET=staging), "build", "upload", "deploy")
    bucket = emulator.storage().get_bucket(staging)
    assert bucket.iam_configuration.uniform_bucket_level_access_enabled  # sdxlctl made it so: conditions work
    assert bucket.iam_configuration.public_access_prevention == "enforced"
    policy = bucket_policy(emulator, staging)
    assert policy["version"] == 3
    (binding,) = [b for b in policy["bindings"] if SERVER in b["members"]]
    assert binding["role"] == "roles/storage.objectUser" and "compile-cache/sdxl/" in binding["condition"]["expression"]

    for request in server_requests(emulator, monkeypatch, tmp_path, f"gs://{staging}/compile-cache/sdxl"):
        assert allowed(policy, SERVER, request), request  # the listing too, which names no object
    for outside in (
        Access("storage.objects.get", f"projects/_/buckets/{staging}/objects/source/sdxl-server-0a1b.tgz"),
        Access("storage.objects.create", f"projects/_/buckets/{staging}/objects/compile-cache/sdxl-two/x.bin"),
        Access("storage.objects.list", f"projects/_/buckets/{staging}", "compile-cache/sdxl-two/"),
        Access("storage.objects.list", f"projects/_/buckets/{staging}", "cloudbuild-logs/"),
        Access("storage.objects.list", f"projects/_/buckets/{staging}", ""),
    ):
        assert not allowed(policy, SERVER, outside), outside


def test_teardown_revokes_the_server_grant_and_leaves_another_deployments_alone(
    cli: Cli, emulator: Emulator, staging: str
) -> None:
    first = emulator.env(SDXLCTL_GCP_STAGING_BUCKET=staging)
    second = emulator.env(SDXLCTL_GCP_STAGING_BUCKET=staging, SDXLCTL_NAME="sdxl-two")
    up(cli, first, "build", "upload", "deploy")
    up(cli, second, "build", "upload", "deploy")
    theirs = [b for b in bucket_policy(emulator, staging)["bindings"] if OTHER_SERVER in b["members"]]
    assert len(theirs) == 1 and "compile-cache/sdxl-two/" in theirs[0]["condition"]["expression"]

    assert cli("teardown", "--yes", env=first).code == 0
    policy = bucket_policy(emulator, staging)
    assert [b for b in policy["bindings"] if SERVER in b["members"]] == []
    assert [b for b in policy["bindings"] if OTHER_SERVER in b["members"]] == theirs
    assert policy["version"] == 3  # the other's condition is still there, so the policy stays version 3
    assert cli("teardown", "--yes", env=second).code == 0


def test_an_earlier_bucket_wide_grant_is_narrowed_to_the_cache_folder(
    cli: Cli, emulator: Emulator, staging: str
) -> None:
    env = emulator.env(SDXLCTL_GCP_STAGING_BUCKET=staging)
    up(cli, env, "build", "upload", "deploy")
    bucket = emulator.storage().bucket(staging)
    policy = bucket.get_iam_policy(requested_policy_version=3)
    policy.bindings.append({"role": "roles/storage.objectUser", "members": {SERVER}})  # what sdxlctl once gave
    bucket.set_iam_policy(policy)

    again = cli("deploy", env=env)
    assert again.code == 0, again.err
    mine = [b for b in bucket_policy(emulator, staging)["bindings"] if SERVER in b["members"]]
    assert len(mine) == 1 and mine[0].get("condition"), mine


def test_on_a_bucket_without_uniform_access_the_grant_covers_the_bucket_and_says_so(
    cli: Cli, emulator: Emulator, staging: str
) -> None:
    emulator.storage().create_bucket(staging)  # made by someone else, with object ACLs still on
    err = up(cli, emulator.env(SDXLCTL_GCP_STAGING_BUCKET=staging), "build", "upload", "deploy")
    said = text(err)
    assert "uniform bucket-level access" in said and f"gcloud storage buckets update gs://{staging}" in said
    (binding,) = [b for b in bucket_policy(emulator, staging)["bindings"] if SERVER in b["members"]]
    assert binding["role"] == "roles/storage.objectUser" and not binding.get("condition")


def test_the_gcs_emulator_refuses_conditions_as_cloud_storage_does(emulator: Emulator) -> None:
    """What the warning above is about: without uniform access, or in a version 1 policy, a condition is a 400."""
    import uuid

    from google.api_core.exceptions import BadRequest

    from sdxlctl.gcp.storage import prefix_condition

    plain = emulator.storage().create_bucket(f"acl-{uuid.uuid4().hex[:12]}")
    policy = plain.get_iam_policy(requested_policy_version=3)
    policy.version = 3
    policy.bindings.append(
        {"role": "roles/storage.objectUser", "members": {SERVER}, "condition": prefix_condition(plain.name, "c")}
    )
    with pytest.raises(BadRequest, match="uniform bucket-level access"):
        plain.set_iam_policy(policy)
