"""Target cloudrun's price: per instance-second rounded up to 100 ms, min instances billed while idle, the busy
hours of a service that scales to zero, and Cloud Run's L4 beside Vertex AI's GPUs in `cost --compare`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import TypedDict

import pytest

from sdxlctl import core, pricing
from sdxlctl.config import Config, load_config
from sdxlctl.errors import ExitCode, UsageError
from sdxlctl.gpus import CLOUD_RUN_GPU, GPUS
from sdxlctl.pricing.speed import latency
from tests.conftest import Cli


class Shape(TypedDict):
    cpu: float
    memory_gib: float
    zonal_redundancy: bool


L4 = Shape(cpu=8, memory_gib=32, zonal_redundancy=False)  # [cloudrun]'s defaults
CLOUDRUN = {"SDXLCTL_TARGET": "cloudrun"}
# The facts sheet's rates (../shared/CLOUD-RUN-GPU-FACTS.md §6), USD per second.
GPU_S, GPU_ZONAL_S, VCPU_S, GIB_S = 0.0001867, 0.0002909, 0.000018, 0.000002
PER_SECOND = GPU_S + 8 * VCPU_S + 32 * GIB_S


@pytest.mark.parametrize(
    ("seconds", "billed"),
    [
        (1, 1.0),
        (1.0, 1.0),
        (1.01, 1.1),
        (1.1, 1.1),
        (0.1 + 0.2, 0.3),  # 0.30000000000000004: a naive ceil(s x 10) bills 0.4 s
        (10.3 - 0.1, 10.2),  # 10.200000000000001, a difference of two times
        (1.2 - 1.0, 0.2),  # 0.19999999999999996: still 0.2
        (0.05, 0.1),
        (0.0, 0.0),
        (3600.0001, 3600.1),
        (12.500000000000002, 12.5),  # a sum of measured times: dust, not a microsecond more of time
    ],
)
def test_instance_seconds_are_rounded_up_to_100_ms(seconds: float, billed: float) -> None:
    assert pricing.billed_seconds(seconds) == billed
    assert pricing.cloud_run_usd(seconds, **L4) == pytest.approx(billed * PER_SECOND, rel=1e-12)


def test_negative_seconds_are_refused() -> None:
    with pytest.raises(UsageError, match="must not be negative"):
        pricing.cloud_run_usd(-1, **L4)


def test_the_facts_sheets_worked_example_is_1_42_usd_an_instance_hour() -> None:
    """L4 without zonal redundancy + 8 vCPU + 32 GiB ≈ 0.672 + 0.518 + 0.230 = 1.42 USD per instance-hour."""
    hourly = pricing.cloud_run_hourly(**L4)
    assert round(hourly, 2) == 1.42
    assert hourly == pytest.approx(0.67212 + 0.5184 + 0.2304, abs=1e-9)
    assert pricing.cloud_run_usd(3600, **L4) == pytest.approx(hourly)  # a whole hour needs no rounding


def test_zonal_redundancy_is_dearer_by_the_gpu_rates_difference() -> None:
    without = pricing.cloud_run_hourly(**L4)
    with_zonal = pricing.cloud_run_hourly(**Shape(cpu=8, memory_gib=32, zonal_redundancy=True))
    assert with_zonal > without
    assert with_zonal - without == pytest.approx((GPU_ZONAL_S - GPU_S) * 3600)


def test_the_table_marks_what_no_primary_source_confirms() -> None:
    table = pricing.bundled()
    rates = pricing.cloudrun.cloud_run_rates(table, "us-central1", zonal_redundancy=False)
    assert (rates.gpu.verified, rates.vcpu.verified, rates.memory.verified) == (False, True, False)
    assert rates.increment_s == 0.1
    for region in ("europe-west4", "europe-west1", "us-east4"):  # Tier 1 by assumption: the same rates, unverified
        tier1 = pricing.cloudrun.cloud_run_rates(table, region, zonal_redundancy=False)
        assert (tier1.gpu.usd, tier1.vcpu.usd, tier1.memory.usd) == (rates.gpu.usd, rates.vcpu.usd, rates.memory.usd)
        assert not any(rate.verified for rate in (tier1.gpu, tier1.vcpu, tier1.memory)), region
        assert "Tier 1" in tier1.gpu.source
    for region in CLOUD_RUN_GPU.regions:  # every region Cloud Run has an L4 in is priced or refused by name
        try:
            pricing.cloud_run_hourly(**L4, region=region)
        except UsageError as exc:
            assert region in exc.message and "Tier 2" in (exc.hint or "")


@pytest.mark.parametrize(("region", "said"), [("asia-southeast1", "no Cloud Run GPU prices"), ("mars-north1", "no L4")])
def test_a_region_without_a_price_or_an_l4_is_refused_by_name(region: str, said: str) -> None:
    with pytest.raises(UsageError, match=said) as raised:
        pricing.cloud_run_hourly(**L4, region=region)
    assert region in raised.value.message


def _config(**env: str) -> Config:
    return load_config(None, {**CLOUDRUN, **env})


def test_min_instances_are_billed_while_idle() -> None:
    hourly = pricing.cloud_run_hourly(**L4)
    standing = pricing.cloud_run_estimate(_config(SDXLCTL_CLOUDRUN_MIN_INSTANCES="1"), days=2, busy_hours_per_day=1)
    assert standing.idle_usd_per_day == pytest.approx(24 * hourly)
    assert standing.low.endpoint == pytest.approx(2 * 24 * hourly)  # one busy hour a day: billed all day anyway
    assert standing.low.endpoint == standing.at(24).low.endpoint
    scaled = pricing.cloud_run_estimate(_config(), days=2, busy_hours_per_day=3)
    assert scaled.idle_usd_per_day == 0
    assert scaled.low.endpoint == pytest.approx(2 * 3 * hourly)  # only the busy hours, on top of nothing
    assert scaled.high.endpoint == pytest.approx(2 * 24 * hourly)  # at most: max 1 instance all day
    two = pricing.cloud_run_estimate(_config(SDXLCTL_CLOUDRUN_MAX_INSTANCES="2"), days=1)
    assert two.high.endpoint == pytest.approx(2 * 24 * hourly)
    parts = scaled.low
    assert (parts.gpu, parts.vcpu, parts.ram) == pytest.approx(
        (6 * 3600 * GPU_S, 6 * 3600 * 8 * VCPU_S, 6 * 3600 * 32 * GIB_S)
    )


def test_the_price_per_1000_images_follows_the_duty_cycle() -> None:
    seconds = latency("l4").seconds
    hourly = pricing.cloud_run_hourly(**L4)
    full = pricing.cloud_run_estimate(_config(), days=1).row
    bursts = full.at(2)
    assert full.usd_per_1000_images == pytest.approx(hourly * seconds / 3.6)  # one instance at full load
    assert bursts.usd_per_1000_images == pytest.approx(full.usd_per_1000_images)  # at min 0 idle costs nothing
    standing = pricing.cloud_run_estimate(_config(SDXLCTL_CLOUDRUN_MIN_INSTANCES="1"), days=1).row
    all_day = standing.usd_per_1000_images
    assert all_day is not None
    assert standing.at(2).usd_per_1000_images == pytest.approx(12 * all_day)  # 24 h paid for, 2 used


@pytest.mark.parametrize("hours", [0, -1, 24.01, float("nan")])
def test_busy_hours_outside_0_to_24_are_refused(hours: float) -> None:
    with pytest.raises(UsageError, match=r"--busy-hours-per-day .*more than 0 and at most 24"):
        pricing.busy_hours(hours)
    with pytest.raises(UsageError):
        pricing.cloud_run_estimate(_config(), days=1, busy_hours_per_day=hours)


@pytest.mark.parametrize("hours", ["0", "25", "-3"])
def test_the_cli_refuses_busy_hours_outside_0_to_24_in_one_line(cli: Cli, hours: str) -> None:
    for env in ({}, CLOUDRUN):
        refused = cli("cost", "--compare", "--busy-hours-per-day", hours, env=env)
        assert refused.code == ExitCode.USAGE, refused.out
        assert "--busy-hours-per-day" in refused.err and "Traceback" not in refused.err
    assert cli("cost", "--busy-hours-per-day", hours, env=CLOUDRUN).code == ExitCode.USAGE


def test_compare_json_has_the_cloud_run_row_whatever_the_target(cli: Cli) -> None:
    for env in ({}, CLOUDRUN):
        shown = cli("cost", "--compare", "--json", env=env)
        assert shown.code == 0, shown.err
        data = json.loads(shown.out)
        assert len(data["gpus"]) == len(GPUS)  # Vertex AI's rows stay as they were
        row = data["cloud_run"]
        assert (row["target"], row["gpu"], row["accelerator"], row["region"]) == (
            "cloudrun",
            "l4",
            "nvidia-l4",
            "us-central1",
        )
        assert row["usd_per_hour_while_up"] == 1.4209
        assert (row["idle_usd_per_day"], row["min_instances"], row["busy_hours_per_day"]) == (0, 0, 24)
        assert row["usd_per_day"] == pytest.approx(24 * 1.42092, abs=0.01)
        assert row["fits_request_timeout"] is True and row["request_timeout_s"] == 600
        assert row["unverified"] and row["problem"] is None
    standing = json.loads(
        cli(
            "cost",
            "--compare",
            "--json",
            "--busy-hours-per-day",
            "6",
            env={"SDXLCTL_CLOUDRUN_MIN_INSTANCES": "1", "SDXLCTL_CLOUDRUN_ZONAL_REDUNDANCY": "true"},
        ).out
    )["cloud_run"]
    assert standing["usd_per_hour_while_up"] == 1.796  # 1.79604: with zonal redundancy
    assert standing["idle_usd_per_day"] == pytest.approx(24 * 1.79604, abs=0.01)
    assert (standing["busy_hours_per_day"], standing["zonal_redundancy"]) == (6, True)
    assert standing["usd_per_1000_images"] == pytest.approx(
        24 * 1.79604 / (6 * 3600 / latency("l4").seconds) * 1000, rel=1e-3
    )


def test_compare_shows_cloud_run_beside_vertex_in_a_region_it_cannot_price(cli: Cli) -> None:
    shown = cli("cost", "--compare", "--json", "--region", "asia-southeast1")
    row = json.loads(shown.out)["cloud_run"]
    assert row["usd_per_hour_while_up"] is None and "asia-southeast1" in row["problem"]
    text = cli("cost", "--compare", "--region", "asia-southeast1")
    assert text.code == 0 and "not priced here" in text.err


def test_the_compare_table_has_the_cloud_run_row(cli: Cli) -> None:
    shown = cli("cost", "--compare", "--busy-hours-per-day", "2")
    assert shown.code == 0, shown.err
    row = next(line for line in shown.out.splitlines() if line.strip("│ ").startswith("run l4"))
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells[2] == "1.4209" and cells[3] == "2.84"  # machine shown at 200 columns; 2 busy hours of 1.42092
    said = " ".join(shown.err.split())
    assert "at 2 busy hours a day" in said and "idle 0.00 USD/day" in said


def test_cost_on_target_cloudrun_prices_cloud_run(cli: Cli) -> None:
    shown = cli("cost", "--days", "2", "--busy-hours-per-day", "4", env=CLOUDRUN)
    assert shown.code == 0, shown.err
    assert "Cloud Run: 1 L4, 8 vCPU, 32 GiB in us-central1, 2 days, 0..1 instances (scale to zero)" in shown.out
    total = next(line for line in shown.out.splitlines() if "total" in line)
    assert re.search(r"│\s+11\.\d\d\s+│\s+68\.\d\d\s+│", total), total  # 2 x 4 h x 1.42 (+ storage); 2 x 24 h
    assert "1.4209 USD/hour while up; idle: 0.00 USD/day (nothing while idle)" in shown.out
    assert "at 4 busy hours a day" in shown.out and "USD per 1000 images" in shown.out
    assert "g2-standard" not in shown.out  # not Vertex AI's machine
    assert "unverified:" in shown.err and "rounded up to 100 ms" in shown.err
    as_json = json.loads(cli("cost", "--json", env={**CLOUDRUN, "SDXLCTL_CLOUDRUN_MIN_INSTANCES": "1"}).out)
    assert (as_json["target"], as_json["instances"], as_json["instance_usd_per_hour"]) == (
        "cloudrun",
        {"min": 1, "max": 1},
        1.4209,
    )
    assert as_json["idle_usd_per_day"] == pytest.approx(34.10, abs=0.01)
    assert as_json["billing"]["rounded_up_to_s"] == 0.1


def test_cost_on_target_cloudrun_refuses_another_gpu_naming_the_target_that_has_it(cli: Cli) -> None:
    refused = cli("cost", "--gpu", "a100", env=CLOUDRUN)
    assert refused.code == ExitCode.USAGE
    assert "Cloud Run offers only the NVIDIA L4" in refused.err and "target vertex" in refused.err
    assert cli("cost", "--gpu", "l4", env=CLOUDRUN).code == 0


def test_busy_hours_on_target_vertex_are_noted_not_taken_in_silence(cli: Cli) -> None:
    shown = cli("cost", "--busy-hours-per-day", "3")
    assert shown.code == 0 and "g2-standard-8" in shown.out
    assert "note:" in shown.err and "around the clock" in " ".join(shown.err.split())


def test_the_deploy_plans_cost_on_target_cloudrun_is_cloud_runs() -> None:
    estimate = core.deploy_cost(_config())
    assert isinstance(estimate, pricing.CloudRunEstimate)
    assert estimate.as_dict()["usd"]["endpoint"] == pytest.approx(24 * 1.42092, abs=0.01)  # busy all day: the most
    assert estimate.as_dict()["idle_usd_per_day"] == 0


def test_the_cloud_run_row_fits_80_columns_piped(tmp_path: Path) -> None:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")}
    shown = subprocess.run(
        [sys.executable, "-m", "sdxlctl", "cost", "--compare"],
        cwd=tmp_path,
        env={**clean, "COLUMNS": "80"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert shown.returncode == 0, shown.stderr
    assert max(len(line) for line in shown.stdout.splitlines()) <= 80 and "…" not in shown.stdout
    row = next(line for line in shown.stdout.splitlines() if line.strip("│ ").startswith("run l4"))
    cells = [cell.strip() for cell in row.strip("│").split("│")]
    assert cells[:3] == ["run l4", "1.4209", "34.10"], row  # no machine column at 80: $/hour, $/day at 24 h
