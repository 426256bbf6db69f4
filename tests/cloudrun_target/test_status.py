"""`sdxlctl status` on target cloudrun: the model's service with its URL, revision, instances (0 when scaled
to zero) and cost so far from Cloud Monitoring; found by label without the state file. The Monitoring client
against a loopback stand-in of Google's timeSeries route."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

import pytest

from sdxlctl.gcp.monitoring import BILLABLE_TIME, INSTANCE_COUNT, billable_seconds, instance_count
from sdxlctl.gcp.session import Cloud
from tests.cloudrun_target.made import Metrics, deploy, env, monitoring_app, rows, with_monitoring
from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, REGION, Emulator
from tests.servers import serve_app


def _cloud(url: str) -> Cloud:
    return Cloud(PROJECT, REGION, url, 0.05, 1.0)


def test_the_monitoring_client_reads_instances_and_billed_seconds_as_google_answers() -> None:
    metrics = Metrics(instances={"sdxl-server": 1}, billed={"sdxl-server": 125.5})
    start = datetime(2026, 12, 1, 10, 0, tzinfo=UTC)
    with serve_app(monitoring_app(metrics)) as server:
        cloud = _cloud(server.url)
        assert instance_count(cloud, "sdxl-server") == 1
        assert instance_count(cloud, "other") == 0  # no timeSeries key: no instance in the window
        assert billable_seconds(cloud, "sdxl-server", start, start + timedelta(hours=1)) == 125.5
        assert billable_seconds(cloud, "other", start, start + timedelta(hours=1)) == 0.0
    asked = metrics.asked[2]
    assert asked["path"] == f"/v3/projects/{PROJECT}/timeSeries"
    assert unquote(asked["filter"]) == (
        f'metric.type="{BILLABLE_TIME}" AND resource.labels.service_name="sdxl-server" '
        f'AND resource.labels.location="{REGION}"'
    )
    assert (asked["interval.startTime"], asked["interval.endTime"]) == (
        "2026-12-01T10:00:00.000000Z",
        "2026-12-01T11:00:00.000000Z",
    )
    assert INSTANCE_COUNT in metrics.asked[0]["filter"]


@pytest.mark.parametrize("refuse", [403, 404, 500])
def test_a_refusing_or_absent_monitoring_api_is_unknown_not_an_error(refuse: int) -> None:
    with serve_app(monitoring_app(Metrics(instances={"s": 1}, refuse=refuse))) as server:
        assert instance_count(_cloud(server.url), "s") is None
        now = datetime.now(UTC)
        assert billable_seconds(_cloud(server.url), "s", now - timedelta(hours=1), now) is None


def test_status_after_deploy_shows_url_revision_and_zero_instances_before_any_request(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    metrics = Metrics(instances={"sdxl-server": 0}, billed={"sdxl-server": 0.0})
    with with_monitoring(emulator, metrics) as front:
        live = deploy(front, tmp_path / ".sdxlctl")
        result = cli("status", "--json", env=env(front))
        assert result.code == 0, result.err
        found = rows(result.out)
        server = found["server-service"]
        revision = live["server-service"].latest_ready_revision.rsplit("/", 1)[-1]
        assert server["state"] == "ready, 0 instances (scaled to zero)"
        assert server["url"] == live["server-service"].uri and server["details"]["revision"] == revision
        assert server["cost_so_far"] == 0.0  # nothing billed yet: scaled to zero since the deploy
        assert found["ui-service"]["state"] == "ready"
        assert found["server-account"]["state"] == found["ui-account"]["state"] == "ready"
        assert all(row["recorded"] for row in found.values())

        table = cli("status", env=env(front))
        assert table.code == 0, table.err
        assert "0 instances (scaled to zero)" in table.out and revision in table.out
        assert live["server-service"].uri in table.out

        metrics.instances["sdxl-server"] = 1
        metrics.billed["sdxl-server"] = 3600.0  # an hour of one instance: 8 vCPU + 32 GiB + the L4
        server = rows(cli("status", "--json", env=env(front)).out)["server-service"]
        assert server["state"] == "ready, 1 instance"
        from sdxlctl.pricing import cloud_run_usd

        expected = cloud_run_usd(3600.0, cpu=8, memory_gib=32, zonal_redundancy=False, region=REGION)
        assert server["cost_so_far"] == pytest.approx(expected) and 1.0 < expected < 2.0


def test_status_says_unknown_where_monitoring_cannot_be_read(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    with with_monitoring(emulator, Metrics(refuse=403)) as front:
        deploy(front, tmp_path / ".sdxlctl", ui=False)
        server = rows(cli("status", "--json", env=env(front)).out)["server-service"]
    assert server["state"].startswith("ready, instances unknown")
    assert server["cost_so_far"] is None  # min 0 and no billed time known: sdxlctl cannot tell


def test_status_without_the_state_file_finds_the_services_and_accounts_by_label(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    with with_monitoring(emulator, Metrics(instances={"sdxl-server": 0})) as front:
        live = deploy(front, tmp_path / ".sdxlctl")
        (tmp_path / ".sdxlctl" / "state.json").unlink()
        before = len(emulator.requests())
        result = cli("status", "--json", env=env(front))
        assert result.code == 0, result.err
        assert [r for r in emulator.requests()[before:] if r["method"] != "GET"] == []  # status only looks
    found = rows(result.out)
    assert set(found) == {"server-service", "ui-service", "server-account", "ui-account"}
    assert not any(row["recorded"] for row in found.values())
    server = found["server-service"]
    assert server["name"] == live["server-service"].name
    assert server["state"].startswith("ready, 0 instances (scaled to zero) (not in this folder's state")
    assert server["details"]["revision"] == live["server-service"].latest_ready_revision.rsplit("/", 1)[-1]
    assert server["details"]["min_instances"] == 0 and server["details"]["gpu"] == "l4"
    assert found["server-account"]["name"] == live["server-service"].template.service_account


def test_status_of_a_service_deleted_behind_sdxlctls_back_is_gone(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    from tests.cloudrun_target.made import run_client

    with with_monitoring(emulator, Metrics()) as front:
        live = deploy(front, tmp_path / ".sdxlctl", ui=False)
        run_client(front.url).delete_service(name=live["server-service"].name).result(timeout=30)
        server = rows(cli("status", "--json", env=env(front)).out)["server-service"]
    assert server["state"] == "gone" and server["cost_so_far"] is None


def test_status_reads_the_instances_the_emulator_runs_through_its_monitoring_route(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    """No stand-in: deployed by the CLI, 0 instances until the first predict starts one, 0 again once it
    scales to zero, and the seconds it was up are billed."""
    from tests.cloud.test_faults import up

    e = env(emulator)
    up(cli, e, "build", "deploy")
    server = rows(cli("status", "--json", env=e).out)["server-service"]
    assert server["state"] == "ready, 0 instances (scaled to zero)" and server["cost_so_far"] == 0.0
    small = ("--steps", "2", "--width", "64", "--height", "64")
    assert cli("predict", "a fox", "-o", "fox.png", *small, env=e).code == 0
    assert emulator.instances("sdxl-server") == 1
    server = rows(cli("status", "--json", env=e).out)["server-service"]
    assert server["state"] == "ready, 1 instance"
    emulator.scale_to_zero("sdxl-server")
    server = rows(cli("status", "--json", env=e).out)["server-service"]
    assert server["state"] == "ready, 0 instances (scaled to zero)"
    assert server["cost_so_far"] > 0.0  # the instance's seconds up, billed
