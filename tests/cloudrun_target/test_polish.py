"""Polish of target cloudrun (issue 17): teardown's plan names every image the run deletes, the estimate's JSON
and text name a service, the UI's service waits as long as the model may, Monitoring's filter takes only ids."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from sdxlctl.state import Resource, StateStore
from tests.cloudrun_target.made import Metrics, deploy, env, monitoring_app
from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, REGION, Emulator
from tests.servers import serve_app


def test_teardown_images_dry_run_lists_both_packages_the_run_deletes(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    """Only the server image recorded (deploy built it, the UI's was pushed elsewhere): the run deletes both."""
    home = tmp_path / ".sdxlctl"
    deploy(emulator, home)
    image = f"{REGION}-docker.pkg.dev/{PROJECT}/sdxlctl/sdxl-server:v1"
    StateStore(home).record("sdxl", Resource(kind="server-image", name=image, target="vertex"))
    before = len(emulator.requests())
    plan = cli("teardown", "--dry-run", "--images", env=env(emulator))
    assert plan.code == 0, plan.err
    assert emulator.requests()[before:] == []
    text = " ".join((plan.out + plan.err).split())
    for package in ("sdxl-server", "sdxl-ui"):
        assert f"/packages/{package}" in text, (package, text)
    plain = cli("teardown", "--dry-run", env=env(emulator))
    assert "/packages/" not in plain.out + plain.err  # images only with --images


@pytest.mark.parametrize(
    "service_id", ['sdxl-server" OR resource.labels.service_name="other', "sdxl-server)", "Sdxl", "", "a" * 64]
)
def test_monitoring_reads_nothing_for_what_is_not_a_cloud_run_service_id(service_id: str) -> None:
    """An id with a quote or a parenthesis would rewrite the filter to read another service's metrics."""
    from sdxlctl.gcp.monitoring import billable_seconds, instance_count
    from sdxlctl.gcp.session import Cloud

    metrics = Metrics(instances={"sdxl-server": 1}, billed={"sdxl-server": 60.0})
    with serve_app(monitoring_app(metrics)) as server:
        c = Cloud(PROJECT, REGION, server.url, 0.1)
        now = datetime.now(UTC)
        assert instance_count(c, service_id, now=now) is None
        assert billable_seconds(c, service_id, now - timedelta(hours=1), now) is None
        assert instance_count(c, "sdxl-server", now=now) == 1  # a real id is still read
    assert len(metrics.asked) == 1, metrics.asked


def test_cloud_run_estimate_names_the_service_in_json_and_text(cli: Cli) -> None:
    """`usd.service` is the service's total (`endpoint`, Vertex AI's word, stays for scripts that read it)."""
    import json

    e = {"SDXLCTL_TARGET": "cloudrun", "SDXLCTL_GCP_PROJECT": PROJECT}
    cost = cli("cost", "--json", env=e)
    assert cost.code == 0, cost.err
    plan = cli("deploy", "--dry-run", "--json", env=e)
    assert plan.code == 0, plan.err
    for estimate in (json.loads(cost.out), json.loads(plan.out)["cost"]):
        for usd in (estimate["usd"], estimate["usd_at_max_instances"]):
            assert usd["service"] == usd["endpoint"], usd
            assert abs(usd["service"] - (usd["gpu"] + usd["vcpu"] + usd["ram"])) < 0.02, usd  # each part rounded
    for args in (("cost",), ("cost", "--days", "7"), ("deploy", "--dry-run")):
        shown = cli(*args, env=e)
        assert shown.code == 0, shown.err
        assert "endpoint" not in (shown.out + shown.err).lower(), (args, shown.out, shown.err)


def test_the_ui_service_waits_as_long_as_a_cold_start_and_a_request_may_take(cli: Cli, emulator: Emulator) -> None:
    """Cloud Run's default (300 s) would cut the browser's request while the model's instance starts: the UI's
    service waits timeout_s + startup_timeout_s (at most Cloud Run's 3600 s); the same config changes nothing."""
    from tests.cloudrun_target.made import run_client

    e = env(emulator)
    for step in ("build", "deploy", "ui-deploy"):
        done = cli(step, env=e)
        assert done.code == 0, done.err
    name = f"projects/{PROJECT}/locations/{REGION}/services/sdxl-ui"
    assert run_client(emulator.url).get_service(name=name).template.timeout.total_seconds() == 600 + 600
    before = len(emulator.requests())
    again = cli("ui-deploy", env=e)
    assert again.code == 0, again.err
    assert [r for r in emulator.requests()[before:] if r["method"] != "GET"] == [] and "unchanged" in again.err
    slow = {"SDXLCTL_CLOUDRUN_TIMEOUT_S": "3000", "SDXLCTL_CLOUDRUN_STARTUP_TIMEOUT_S": "900"}
    longer = cli("ui-deploy", env={**e, **slow})
    assert longer.code == 0, longer.err
    assert run_client(emulator.url).get_service(name=name).template.timeout.total_seconds() == 3600
