"""The shared compile cache on Vertex AI: the model server's own account, what it may touch, and teardown.

Vertex AI's own account for a prediction container may only read the Model's artifacts, so a server that
publishes compiled code for the next replica runs as an account of its own: sdxlctl makes it, lets it use
the cache's bucket (and read gs:// weights), and takes all of that away again on teardown.
"""

from __future__ import annotations

import re
from typing import Any

from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, Emulator

ACCOUNT = f"serviceAccount:sdxl-server-sa@{PROJECT}.iam.gserviceaccount.com"
STAGING = f"{PROJECT}-sdxlctl"
ARTIFACTS = "sdxl-compile-artifacts.bin"


def deploy(cli: Cli, env: dict[str, str]) -> None:
    for step in (["build"], ["upload"], ["deploy"]):
        result = cli(*step, env=env)
        assert result.code == 0, (step, result.err)


def deployed_model(emulator: Emulator) -> dict[str, Any]:
    (endpoint,) = emulator.resources()["endpoints"]
    (deployed,) = endpoint["deployedModels"]
    return dict(deployed)


def model_env(emulator: Emulator) -> dict[str, str]:
    (model,) = emulator.resources()["models"]
    return {e["name"]: e["value"] for e in model["containerSpec"]["env"]}


def test_teardown_deletes_the_cache_and_the_account_and_revokes_what_it_was_given(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    deploy(cli, env)
    assert deployed_model(emulator)["serviceAccount"] == ACCOUNT.split(":")[1]
    staging = emulator.storage().bucket(STAGING)
    ours = staging.blob(f"compile-cache/sdxl/torch-2.11.0-cu130-nvidia-l4/{ARTIFACTS}")
    ours.upload_from_string(b"what the first replica published")
    theirs = staging.blob(f"compile-cache/sdxl-two/torch-2.11.0-cu130-nvidia-l4/{ARTIFACTS}")
    theirs.upload_from_string(b"another deployment's")

    # Teardown finds what the deploy made even when the config no longer asks for it.
    changed = {**env, "SDXLCTL_MODEL_OPTIMIZE": "none"}
    plan = cli("teardown", "--dry-run", env=changed)
    assert plan.code == 0 and "sdxl-server-sa@" in plan.err and f"gs://{STAGING}/compile-cache/sdxl" in plan.err

    down = cli("teardown", "--yes", env=changed)
    assert down.code == 0, down.err
    assert emulator.resources().get("accounts", []) == []
    assert emulator.bucket_roles(STAGING, ACCOUNT) == []
    assert not ours.exists() and theirs.exists()


def test_without_a_shared_cache_the_server_runs_as_vertex_ais_own_account(cli: Cli, emulator: Emulator) -> None:
    for settings in ({"SDXLCTL_MODEL_COMPILE_CACHE": "none"}, {"SDXLCTL_MODEL_OPTIMIZE": "eager"}):
        env = emulator.env(**settings)
        deploy(cli, env)
        assert "SDXL_COMPILE_CACHE" not in model_env(emulator)
        assert "serviceAccount" not in deployed_model(emulator)
        assert emulator.resources().get("accounts", []) == []
        assert cli("teardown", "--yes", env=env).code == 0


def test_a_cache_folder_the_user_named_is_kept_and_gs_weights_are_read_where_they_are(
    cli: Cli, emulator: Emulator
) -> None:
    """The user's folder outlives the deployment (it may serve others); only the account's grants go."""
    emulator.storage().create_bucket("team-weights")
    env = emulator.env(
        SDXLCTL_MODEL_COMPILE_CACHE="gs://team-cache/sdxl/", SDXLCTL_MODEL_SOURCE="gs://team-weights/sdxl"
    )
    deploy(cli, env)
    container = model_env(emulator)
    assert container["SDXL_COMPILE_CACHE"] == "gs://team-cache/sdxl"
    assert container["SDXL_MODEL"] == "gs://team-weights/sdxl"  # its own account reads them where they are
    assert emulator.bucket_roles("team-cache", ACCOUNT) == ["roles/storage.objectUser"]
    assert emulator.bucket_roles("team-weights", ACCOUNT) == ["roles/storage.objectViewer"]
    # sdxlctl made team-cache (uniform access): the grant is its folder only; team-weights has object ACLs,
    # where IAM conditions are refused, so the read grant covers that bucket.
    (cache_grant,) = conditions(emulator, "team-cache")
    assert 'objects/sdxl/")' in cache_grant["expression"]
    assert conditions(emulator, "team-weights") == [None]
    kept = emulator.storage().bucket("team-cache").blob(f"sdxl/torch-2.11.0-cu130-nvidia-l4/{ARTIFACTS}")
    kept.upload_from_string(b"shared")

    assert cli("teardown", "--yes", env=env).code == 0
    assert kept.exists()
    assert emulator.bucket_roles("team-cache", ACCOUNT) == []
    assert emulator.bucket_roles("team-weights", ACCOUNT) == []


def conditions(emulator: Emulator, bucket: str) -> list[Any]:
    policy = emulator.storage().bucket(bucket).get_iam_policy(requested_policy_version=3)
    return [binding.get("condition") for binding in policy.bindings if ACCOUNT in binding["members"]]


def test_a_bad_cache_setting_names_the_key_and_what_it_takes(cli: Cli, emulator: Emulator) -> None:
    result = cli("deploy", "--dry-run", env=emulator.env(SDXLCTL_MODEL_COMPILE_CACHE="s3://bucket/cache"))
    assert result.code != 0
    assert "SDXLCTL_MODEL_COMPILE_CACHE" in result.err and "gs://" in result.err
    assert "Traceback" not in result.err


def test_long_deployment_names_keep_the_two_accounts_apart() -> None:
    from sdxlctl.vertex.names import Names

    n = Names("a-deployment-name-of-thirty-two", PROJECT, "us-central1", "sdxlctl", "b")
    assert n.account_id.startswith("a-deployment-name") and n.account_id.endswith("-ui-sa")
    assert n.server_account_id.startswith("a-deployment") and n.server_account_id.endswith("-server-sa")
    assert all(re.fullmatch(r"[a-z][-a-z0-9]{4,28}[a-z0-9]", i) for i in (n.account_id, n.server_account_id))
    assert Names("sdxl", PROJECT, "us-central1", "sdxlctl", "b").account_id == "sdxl-ui-sa"  # as before
    fits = Names("twenty-chars-exactly", PROJECT, "us-central1", "sdxlctl", "b")
    assert fits.server_account_id == "twenty-chars-exactly-server-sa"  # a name that fits is kept whole


def test_two_long_deployment_names_never_share_an_account() -> None:
    """Shortened alike, two deployments would run as one account, and tearing one down would break the other."""
    from sdxlctl.vertex.names import Names

    one, two = (Names(f"team-sdxl-prod-europe-{i}", PROJECT, "us-central1", "sdxlctl", "b") for i in (1, 2))
    assert one.server_account_id != two.server_account_id and one.account_id != two.account_id
