"""`sdxlctl check`, as `sky check`: one line per prerequisite with ok/fail and the fix, exit 1 if any fails.

Target vertex against the emulator through the real clients (Service Usage, Cloud Quotas, google-cloud-storage,
Artifact Registry's REST API); target local against this machine (packages, a port really taken).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import Cli
from tests.emulator.app import create_app
from tests.emulator.core import World
from tests.emulator.project import add_repository, disable, set_quota
from tests.emulator_fixtures import PROJECT, REGION, Emulator
from tests.servers import free_port, gcs_emulator, serve_app

L4 = "aiplatform.googleapis.com/custom_model_serving_nvidia_l4_gpus"


@pytest.fixture
def project() -> Iterator[Emulator]:
    """An emulated project that is set up: every API on, GPU quota, the image repository made.

    Its GCS is its own: the session's holds the buckets earlier tests made (the staging bucket among them).
    """
    world = World()
    add_repository(world, PROJECT, REGION, "sdxlctl")
    with gcs_emulator() as gcs, serve_app(create_app(world, gcs_url=gcs)) as server:
        yield Emulator(server.url, gcs, world)


def _lines(out: str) -> dict[str, str]:
    """{check name: its line} of the human output (fix lines are indented under their check)."""
    rows = {}
    for line in out.splitlines():
        if line[:1] in "✓✗!":
            rows[line[2:].split("  ")[0].strip()] = line
    return rows


def test_a_ready_project_passes_every_check(cli: Cli, project: Emulator) -> None:
    result = cli("check", env=project.env())
    assert result.code == 0, result.out + result.err
    rows = _lines(result.out)
    assert all(line.startswith("✓") for line in rows.values()), result.out
    assert "emulator" in rows["credentials"]
    assert {"api aiplatform.googleapis.com", "api run.googleapis.com", "api cloudbuild.googleapis.com"} <= set(rows)
    assert "4 NVIDIA_L4 in europe-west4 (needs 1)" in rows["gpu quota l4"]
    assert "does not exist yet" in rows["staging bucket"]  # build creates it: not a failure
    assert "all" in result.err and "passed" in result.err
    paths = {r["path"].split("?")[0] for r in project.requests()}
    assert f"/v1/projects/{PROJECT}/services:batchGet" in paths  # asked through Service Usage, read only
    assert all(r["method"] == "GET" for r in project.requests())


def test_a_disabled_api_fails_with_the_gcloud_command_that_enables_it(cli: Cli, project: Emulator) -> None:
    disable(project.world, "run.googleapis.com")
    disable(project.world, "logging.googleapis.com")
    result = cli("check", env=project.env())
    assert result.code == 1
    rows = _lines(result.out)
    assert rows["api run.googleapis.com"].startswith("✗") and "not enabled" in rows["api run.googleapis.com"]
    assert f"fix: gcloud services enable run.googleapis.com --project {PROJECT}" in result.out
    assert rows["api logging.googleapis.com"].startswith("!")  # only `sdxlctl logs` needs it: a warning
    assert "1 of" in result.err and "failed" in result.err


def test_no_gpu_quota_in_the_region_fails_with_the_request_to_make(cli: Cli, project: Emulator) -> None:
    set_quota(project.world, L4, 0, REGION)  # other regions keep the default
    result = cli("check", env=project.env())
    assert result.code == 1
    rows = _lines(result.out)
    assert rows["gpu quota l4"].startswith("✗") and "0 NVIDIA_L4 in europe-west4, needs 1" in rows["gpu quota l4"]
    fix = next(line for line in result.out.splitlines() if "quotas preferences create" in line)
    assert "--quota-id=CustomModelServingNvidiaL4GpusPerProjectPerRegion" in fix and "--preferred-value=1" in fix
    assert f"--dimensions=region={REGION}" in fix
    # Elsewhere the same project has quota; and the need grows with max_replicas.
    elsewhere = cli("check", env=project.env(SDXLCTL_GCP_REGION="us-central1"))
    assert _lines(elsewhere.out)["gpu quota l4"].startswith("✓")
    more = cli("check", env=project.env(SDXLCTL_GCP_REGION="us-central1", SDXLCTL_DEPLOY_MAX_REPLICAS="5"))
    assert "4 NVIDIA_L4 in us-central1, needs 5" in _lines(more.out)["gpu quota l4"]


def test_a_missing_registry_fails_and_an_existing_bucket_is_read(cli: Cli, gcs: str) -> None:
    world = World()
    with serve_app(create_app(world, gcs_url=gcs)) as server:
        emulated = Emulator(server.url, gcs, world)
        emulated.storage().create_bucket(f"{PROJECT}-check-sdxlctl")
        result = cli("check", "--json", env=emulated.env(SDXLCTL_GCP_STAGING_BUCKET=f"gs://{PROJECT}-check-sdxlctl"))
    assert result.code == 1
    shown = json.loads(result.out)
    checks = {row["name"]: row for row in shown["checks"]}
    assert shown["ok"] is False
    assert checks["image registry"]["status"] == "fail"
    assert checks["image registry"]["fix"].startswith("gcloud artifacts repositories create sdxlctl")
    assert checks["staging bucket"] == {
        "name": "staging bucket",
        "status": "ok",
        "detail": f"gs://{PROJECT}-check-sdxlctl is readable",
        "fix": "",
    }


def test_without_a_project_check_names_the_key(cli: Cli) -> None:
    result = cli("check", env={"SDXLCTL_TARGET": "vertex"})
    assert result.code == 1
    assert "[gcp] project is not set" in result.out and "SDXLCTL_GCP_PROJECT" in result.out


def test_without_credentials_check_says_how_to_get_them_and_asks_nothing_else(tmp_path: Path) -> None:
    """Google's own endpoint, and no Application Default Credentials anywhere (nor a metadata server)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDXLCTL_", "GOOGLE_", "CLOUDSDK_"))}
    env |= {"SDXLCTL_TARGET": "vertex", "SDXLCTL_GCP_PROJECT": PROJECT, "NO_GCE_CHECK": "true"}
    env |= {"CLOUDSDK_CONFIG": str(tmp_path / "gcloud"), "HOME": str(tmp_path), "COLUMNS": "80"}
    shown = subprocess.run(
        [sys.executable, "-m", "sdxlctl", "check"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60
    )
    assert shown.returncode == 1, shown.stderr
    rows = _lines(shown.stdout)
    assert list(rows) == ["project", "credentials"]  # nothing else is asked without them
    assert rows["credentials"].startswith("✗")
    assert "fix: gcloud auth application-default login" in shown.stdout
    assert "Traceback" not in shown.stderr


def test_target_local_checks_packages_and_finds_a_taken_port(cli: Cli) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        ports = {"SDXLCTL_LOCAL_UI_PORT": str(port), "SDXLCTL_LOCAL_SERVER_PORT": str(free_port())}
        result = cli("check", env=ports)
    assert result.code == 1, result.out
    rows = _lines(result.out)
    assert rows["model server packages"].startswith("✓")  # this environment has the server and the UI
    assert rows["UI packages"].startswith("✓")
    assert rows[f"port {port}"].startswith("✗") and "in use by another program" in rows[f"port {port}"]
    assert "set [local] ui_port to a free port" in result.out
    free = cli("check", env=ports)
    assert free.code == 0, free.out  # the port was let go


def test_the_deployments_own_server_on_its_port_is_no_failure(cli: Cli, tmp_path: Path) -> None:
    from sdxlctl.state import Resource, StateStore

    with socket.socket() as running:  # stands for the server `sdxlctl deploy` started and recorded
        running.bind(("127.0.0.1", 0))
        running.listen()
        port = running.getsockname()[1]
        with StateStore(tmp_path / ".sdxlctl").transaction() as state:
            url = f"http://127.0.0.1:{port}"
            state.put("sdxl", Resource(kind="local-server", name="sdxl-server", target="local", url=url))
        result = cli("check", env={"SDXLCTL_LOCAL_SERVER_PORT": str(port), "SDXLCTL_LOCAL_UI_PORT": str(free_port())})
    assert result.code == 0, result.out
    assert "is this deployment's server" in _lines(result.out)[f"port {port}"]


def test_a_missing_package_is_named_with_the_install_from_the_folders() -> None:
    from sdxlctl.local.checks import _packages

    found = _packages("model server packages", ("sdxl_server", "no_such_package_here"))
    assert (found.status, found.detail) == ("fail", "not installed: no_such_package_here")
    assert 'pip install -e "containers/model[gcs]" -e containers/ui' in found.fix
