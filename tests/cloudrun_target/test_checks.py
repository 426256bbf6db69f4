"""`sdxlctl check` on target cloudrun against the emulator through the real clients (Service Usage, Cloud Quotas
under run.googleapis.com, google-cloud-storage, Artifact Registry): one line per prerequisite, the fix under it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from sdxlctl.config import load_config
from tests.conftest import Cli
from tests.emulator.app import create_app
from tests.emulator.core import World
from tests.emulator.project import add_repository, disable, set_quota
from tests.emulator_fixtures import PROJECT, REGION, Emulator
from tests.servers import gcs_emulator, serve_app

NO_ZONAL = "run.googleapis.com/NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion"
ZONAL = "run.googleapis.com/NvidiaL4GpuAllocPerProjectRegion"


@pytest.fixture
def project() -> Iterator[Emulator]:
    """A project that is set up: every API on, the default L4 quotas (3 of each kind), the image repository."""
    world = World()
    add_repository(world, PROJECT, REGION, "sdxlctl")
    with gcs_emulator() as gcs, serve_app(create_app(world, gcs_url=gcs)) as server:
        yield Emulator(server.url, gcs, world)


def _rows(out: str) -> dict[str, str]:
    return {line[2:].split("  ")[0].strip(): line for line in out.splitlines() if line[:1] in "✓✗!"}


def _check(cli: Cli, project: Emulator, **extra: str) -> tuple[int, dict[str, str], str]:
    result = cli("check", env=project.env(SDXLCTL_TARGET="cloudrun", **extra))
    return result.code, _rows(result.out), result.out + result.err


def test_a_ready_project_passes_every_cloudrun_check(cli: Cli, project: Emulator) -> None:
    code, rows, said = _check(cli, project)
    assert code == 0, said
    assert all(line.startswith("✓") for line in rows.values()), said
    apis = {f"api {s}.googleapis.com" for s in ("run", "artifactregistry", "cloudbuild", "iam", "monitoring")}
    assert apis <= set(rows)
    assert "api aiplatform.googleapis.com" not in rows  # Vertex AI is not used on this target
    assert "Cloud Run has L4 GPUs in europe-west4" in rows["region"]
    quota = rows["gpu quota l4"]
    assert "3 L4 in europe-west4 (needs 1)" in quota
    assert "Total Nvidia L4 GPU allocation without zonal redundancy, per project per region" in quota
    paths = {r["path"].split("?")[0] for r in project.requests()}
    assert f"/v1/projects/{PROJECT}/locations/global/services/run.googleapis.com/quotaInfos" in paths
    assert all(r["method"] == "GET" for r in project.requests())  # check changes nothing


def test_no_l4_quota_of_the_configured_kind_fails_with_the_request_to_make(cli: Cli, project: Emulator) -> None:
    set_quota(project.world, NO_ZONAL, 0, REGION)
    code, rows, said = _check(cli, project)
    assert code == 1
    assert rows["gpu quota l4"].startswith("✗") and "0 L4 in europe-west4, needs 1" in rows["gpu quota l4"]
    fix = next(line for line in said.splitlines() if "quotas preferences create" in line)
    assert "--service=run.googleapis.com" in fix
    assert "--quota-id=NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion" in fix and "--preferred-value=1" in fix
    assert f"--dimensions=region={REGION}" in fix and "iam-admin/quotas?service=run.googleapis.com" in said
    # The other kind is a quota of its own: with zonal redundancy on, that one is checked, and the need grows
    # with max_instances.
    zonal = _check(cli, project, SDXLCTL_CLOUDRUN_ZONAL_REDUNDANCY="true", SDXLCTL_CLOUDRUN_MAX_INSTANCES="3")
    assert zonal[1]["gpu quota l4"].startswith("✓"), zonal[2]
    assert "with zonal redundancy" in zonal[1]["gpu quota l4"]
    set_quota(project.world, ZONAL, 2)
    short = _check(cli, project, SDXLCTL_CLOUDRUN_ZONAL_REDUNDANCY="true", SDXLCTL_CLOUDRUN_MAX_INSTANCES="3")
    assert "2 L4 in europe-west4, needs 3" in short[1]["gpu quota l4"]
    assert "zonal_redundancy = false" in short[2] and "--quota-id=NvidiaL4GpuAllocPerProjectRegion" in short[2]


def test_a_disabled_run_api_fails_and_monitoring_only_warns(cli: Cli, project: Emulator) -> None:
    disable(project.world, "run.googleapis.com")
    disable(project.world, "monitoring.googleapis.com")
    code, rows, said = _check(cli, project)
    assert code == 1
    assert rows["api run.googleapis.com"].startswith("✗")
    assert f"gcloud services enable run.googleapis.com --project {PROJECT}" in said
    assert rows["api monitoring.googleapis.com"].startswith("!") and "instance count" in said
    # Cloud Quotas answers 403 for a disabled service's quotas: a warning that says where to look, not a crash
    assert rows["gpu quota l4"].startswith("!") and "iam-admin/quotas?service=run.googleapis.com" in said


def test_init_offers_target_cloudrun_and_its_config_is_what_check_reads(
    cli: Cli, project: Emulator, tmp_path: Path
) -> None:
    result = cli("init", "--target", "cloudrun", "--project", PROJECT, "--region", REGION, "--yes")
    assert result.code == 0, result.err
    config = load_config(tmp_path / "sdxlctl.toml", environ={})
    assert (config.target, config.gcp.project, config.gcp.region, config.deploy.gpu) == (
        "cloudrun",
        PROJECT,
        REGION,
        "l4",
    )
    code, rows, said = _check(cli, project)  # the written file, against the emulated project
    assert code == 0 and "gpu quota l4" in rows, said


def test_init_refuses_for_cloudrun_what_cloud_run_cannot_run_naming_the_flag(cli: Cli, tmp_path: Path) -> None:
    gpu = cli("init", "--target", "cloudrun", "--gpu", "a100", "--yes")
    assert gpu.code == 2 and "--gpu a100" in gpu.err and "target vertex" in gpu.err
    region = cli("init", "--target", "cloudrun", "--region", "europe-north1", "--yes")
    assert region.code == 2 and "--region europe-north1" in region.err and "no L4" in region.err
    assert not (tmp_path / "sdxlctl.toml").exists()
    assert "cloudrun" in cli("init", "--help").out
