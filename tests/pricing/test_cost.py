"""`sdxlctl cost`: the arithmetic, the compare table, --live through the real billing client, and status."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from sdxlctl import pricing
from sdxlctl.errors import UsageError
from sdxlctl.gpus import GPUS, gpu
from sdxlctl.state import StateStore
from tests.conftest import Cli
from tests.emulator.billing import sku
from tests.emulator_fixtures import Emulator


def test_the_original_deployment_costs_103_usd_a_day(cli: Cli) -> None:
    result = cli("cost", "--days", "1", "--gpu", "a100", "--region", "europe-west4", "--json")
    assert result.code == 0, result.err
    usd = json.loads(result.out)["usd"]
    assert usd["endpoint"] == pytest.approx(103.4, rel=0.01)
    assert (usd["gpu"], usd["vcpu"], usd["ram"]) == pytest.approx((80.98, 11.53, 10.94), abs=0.01)
    assert "estimate" in result.err


def test_days_and_replicas_scale_linearly_and_ranges_show_both_ends() -> None:
    one = pricing.estimate(gpu("l4"), "us-central1", days=1, min_replicas=1, max_replicas=1)
    week = pricing.estimate(gpu("l4"), "us-central1", days=7, min_replicas=1, max_replicas=3)
    assert week.low.endpoint == pytest.approx(7 * one.low.endpoint)
    assert week.high.endpoint == pytest.approx(3 * week.low.endpoint)
    assert one.machine_per_hour == pytest.approx(0.9817, rel=0.001)  # g2-standard-8 + L4, as PRICING-FACTS says
    zero = pricing.estimate(gpu("l4"), "us-central1", days=1, min_replicas=0, max_replicas=2)
    assert zero.low.endpoint == 0 and zero.high.endpoint == pytest.approx(2 * one.low.endpoint)


def test_regions_differ_and_estimated_regions_say_so() -> None:
    central = pricing.estimate(gpu("a100"), "us-central1", days=1, min_replicas=1, max_replicas=1)
    assert central.machine_per_hour == pytest.approx(4.2244, rel=0.001)
    singapore = pricing.estimate(gpu("a100"), "asia-southeast1", days=1, min_replicas=1, max_replicas=1)
    assert singapore.machine_per_hour > central.machine_per_hour
    assert any("estimate" in note for note in singapore.unverified)
    h100 = pricing.estimate(gpu("h100"), "us-central1", days=1, min_replicas=1, max_replicas=1)
    assert h100.machine_per_hour == pytest.approx(12.625919, rel=0.0001)
    assert not [n for n in h100.unverified if not n.startswith("storage")]
    for region in ("us-central1", "europe-west4", "us-east4", "europe-west1", "asia-southeast1"):
        for option in GPUS.values():
            assert pricing.machine_per_hour(pricing.bundled(), option, region)[0] > 0


def test_a_missing_price_and_an_unknown_gpu_are_clear_errors() -> None:
    with pytest.raises(UsageError, match="no prices for region 'mars-north1'"):
        pricing.estimate(gpu("l4"), "mars-north1", days=1, min_replicas=1, max_replicas=1)
    with pytest.raises(UsageError, match="unknown GPU 'v100'") as raised:
        gpu("v100")
    assert raised.value.hint and "a100" in raised.value.hint
    table = pricing.from_data({**json.loads((Path(pricing.__file__).parent / "prices.json").read_text())})
    del table.regions["us-central1"]["gpu"]["l4"]
    with pytest.raises(UsageError, match="no gpu price for 'l4' in us-central1"):
        pricing.estimate(gpu("l4"), "us-central1", days=1, min_replicas=1, max_replicas=1, table=table)


def test_bad_cost_flags_exit_2(cli: Cli) -> None:
    assert cli("cost", "--gpu", "v100").code == 2
    region = cli("cost", "--region", "mars-north1")
    assert region.code == 2 and "mars-north1" in region.err


def test_compare_lists_every_gpu_and_recommends_l4() -> None:
    rows = {row.option.key: row for row in pricing.compare("us-central1")}
    assert set(rows) == set(GPUS)
    assert not rows["t4"].fits_shared  # the reason the 2023 deployment paid for an A100
    assert rows["l4"].fits_with_margin and rows["h200"].latency.measured
    assert pricing.recommended_gpu("us-central1").key == "l4"
    assert pricing.recommended_gpu("europe-west4").key == "l4"
    from sdxlctl.config import Config

    assert Config().deploy.gpu == pricing.recommended_gpu(Config().gcp.region).key  # the default follows the rule
    fewer = pricing.compare("us-central1", steps=15)
    assert fewer[1].latency.seconds < rows["l4"].latency.seconds


def test_compare_follows_the_configured_fast_path(cli: Cli) -> None:
    """Without the fast path every GPU is slower by what the H200 measured; the T4's figure, a lower
    bound measured on the 2023 (uncompiled) pipeline, stays as it is."""
    fast = json.loads(cli("cost", "--compare", "--json").out)
    plain = json.loads(cli("cost", "--compare", "--json", env={"SDXLCTL_MODEL_OPTIMIZE": "none"}).out)
    assert (fast["optimize"], plain["optimize"]) == ("auto", "none")
    seconds = [{row["gpu"]: row["seconds_per_image"] for row in r["gpus"]} for r in (fast, plain)]
    assert seconds[1]["h200"] == pytest.approx(1.874, abs=0.01)  # run 4's baseline
    assert seconds[1]["l4"] == pytest.approx(seconds[0]["l4"] * 1.804, abs=0.02)
    assert seconds[1]["t4"] == seconds[0]["t4"]
    shown = cli("cost", "--compare", env={"SDXLCTL_MODEL_OPTIMIZE": "none"}).out
    assert "SDXL_OPTIMIZE=none" in shown


def test_compare_imports_no_cloud_or_torch(tmp_path: Path) -> None:
    """What keeps `cost --compare` fast is that it loads no heavy library; how fast it is on a given
    machine is bench/cli_startup.py's to measure (a loaded 2-core machine took 1.8 s)."""
    script = textwrap.dedent("""
        import sys
        before = set(sys.modules)
        from sdxlctl.cli.app import run
        code = run(["cost", "--compare", "--json"])
        heavy = sorted(m for m in set(sys.modules) - before
                       if m.startswith(("torch", "diffusers", "gradio", "google.cloud", "google.api_core")))
        print(f"HEAVY={','.join(heavy)}", file=sys.stderr)
        sys.exit(code)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stderr.splitlines()[-1] == "HEAVY=", done.stderr
    assert len(json.loads(done.stdout)["gpus"]) == len(GPUS)


def test_live_prices_come_from_the_catalog_through_the_real_client(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    skus = emulator.world.table("skus")
    catalog = [
        (
            "AAAA-0001",
            "Vertex AI: Online/Batch Prediction Nvidia Tesla A100 GPU running in Netherlands",
            ["europe-west4"],
            3.5,
        ),
        (
            "AAAA-0002",
            "Vertex AI: Online/Batch Prediction A2 Instance Core running in Netherlands",
            ["europe-west4"],
            0.05,
        ),
        (
            "AAAA-0003",
            "Vertex AI: Online/Batch Prediction A2 Instance Ram running in Netherlands",
            ["europe-west4"],
            0.006,
        ),
        (
            "AAAA-0004",
            "Vertex AI: Online/Batch Prediction Nvidia A100 80GB GPU running in Netherlands",
            ["europe-west4"],
            9.0,
        ),
        (
            "AAAA-0005",
            "Spot Preemptible Vertex AI: Online/Batch Prediction Nvidia Tesla A100 GPU running in Netherlands",
            ["europe-west4"],
            0.5,
        ),
        ("AAAA-0006", "Vertex AI: Training Nvidia Tesla A100 GPU running in Netherlands", ["europe-west4"], 0.1),
    ]
    for sku_id, description, regions, usd in catalog:
        skus[sku_id] = sku(sku_id, description, regions, usd)
    env = {"SDXLCTL_GCP_API_ENDPOINT": emulator.url}
    live = cli("cost", "--live", "--gpu", "a100", "--region", "europe-west4", "--json", env=env)
    assert live.code == 0, live.err
    data = json.loads(live.out)
    assert data["usd"]["gpu"] == pytest.approx(3.5 * 24)  # the catalog's, not the Spot or training SKU
    assert data["usd"]["vcpu"] == pytest.approx(0.05 * 12 * 24)
    assert data["prices"]["origin"].startswith("live")
    pages = [r for r in emulator.requests() if r["path"].endswith("/skus")]
    assert len(pages) == 3  # 6 SKUs, 2 per page
    assert (tmp_path / ".sdxlctl" / "live-prices.json").is_file()

    again = cli("cost", "--live", "--gpu", "a100", "--region", "europe-west4", "--json", env=env)
    assert json.loads(again.out)["usd"]["gpu"] == pytest.approx(84.0)
    assert len([r for r in emulator.requests() if r["path"].endswith("/skus")]) == 3  # cached for a day


@pytest.mark.timeout(60)  # a hang guard: the configured retry budget (1 s here) bounds the wait
def test_live_falls_back_to_the_bundled_table_with_a_warning(cli: Cli) -> None:
    from tests.servers import free_port

    env = {
        "SDXLCTL_GCP_API_ENDPOINT": f"http://127.0.0.1:{free_port()}",
        "SDXLCTL_GCP_POLL_INTERVAL_S": "0.01",
        "SDXLCTL_GCP_RETRY_S": "1",  # a refused connection is retried as a lost answer, for 120 s by default
    }
    result = cli("cost", "--live", "--gpu", "a100", "--region", "europe-west4", "--json", env=env)
    assert result.code == 0
    assert "warning: live prices unavailable" in result.err
    assert json.loads(result.out)["prices"]["origin"] == "bundled"


def _endpoint_ten_hours_on(cli: Cli, env: dict[str, str], tmp_path: Path) -> tuple[StateStore, Callable[[], Any]]:
    """An A100 deployed by the CLI, as if ten hours ago; and a reading of its status row."""
    from datetime import UTC, datetime, timedelta

    for step in (["build"], ["upload"], ["deploy", "--gpu", "a100"]):
        assert cli(*step, env=env).code == 0
    store = StateStore(tmp_path / ".sdxlctl")
    with store.transaction() as state:
        endpoint = state.get("sdxl", "endpoint")
        assert endpoint is not None
        endpoint.details["deployed_at"] = (datetime.now(UTC) - timedelta(hours=10)).isoformat()

    def row() -> Any:
        rows = json.loads(cli("status", "--json", env=env).out)["resources"]
        return next(r for r in rows if r["kind"] == "endpoint")

    return store, row


def test_status_shows_what_a_deployment_has_cost_so_far(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    _, row = _endpoint_ten_hours_on(cli, emulator.env(SDXLCTL_GCP_REGION="europe-west4"), tmp_path)
    assert row()["cost_so_far"] == pytest.approx(43.10, abs=0.05)  # 10 h x 4.3102


def test_a_spot_endpoint_has_cost_its_spot_rate_so_far(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    env = emulator.env(SDXLCTL_GCP_REGION="europe-west4", SDXLCTL_DEPLOY_SPOT="true")
    store, row = _endpoint_ten_hours_on(cli, env, tmp_path)
    spot_hourly = pricing.machine_price("a100", "europe-west4", spot=True)
    assert spot_hourly is not None and spot_hourly < 4.3102
    assert row()["cost_so_far"] == pytest.approx(10 * spot_hourly, abs=0.05)  # not 43.10, the on-demand rate
    with store.transaction() as state:  # a state file's spot that is not true is not Spot
        endpoint = state.get("sdxl", "endpoint")
        assert endpoint is not None
        endpoint.details["spot"] = "yes"
    assert row()["cost_so_far"] == pytest.approx(43.10, abs=0.05)
