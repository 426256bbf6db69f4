"""Each part of an estimate, worked out by hand from prices.json and latency.json (the figures are copied
here on purpose: a test that recomputed them with the code under test would agree with any bug)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from sdxlctl import pricing
from sdxlctl.errors import UsageError
from sdxlctl.gpus import GPUS, gpu
from tests.conftest import Cli

# europe-west4, a2-highgpu-1g: 1 x A100, 12 vCPU, 85 GB (prices.json, gpus.py)
A100_EU = {"gpu": 3.3741, "vcpu": 0.0400223 * 12, "ram": 0.0053636 * 85}
A100_SECONDS = (13.5 * 30 + 10.5) / (312 * 0.4048)  # latency.json: work / (TFLOP/s x efficiency)
RUN_PER_SECOND = 0.000024 + 0.0000025  # Cloud Run: 1 vCPU + 1 GiB per request-second
RUN_PER_REQUEST = 0.40 / 1e6
IMAGES_GB_OVER_FREE = 8.0 + 0.6 - 0.5  # server + UI images less the free 0.5 GB
STORAGE_PER_DAY = IMAGES_GB_OVER_FREE * 0.10 / 30.44  # USD per GB-month, days per month


def table_data() -> dict[str, Any]:
    return json.loads((Path(pricing.__file__).parent / "prices.json").read_text())


def test_each_part_and_the_total_at_both_ends_of_the_replica_range() -> None:
    days, images_per_day = 2, 500
    hours = days * 24
    found = pricing.estimate(
        gpu("a100"), "europe-west4", days=days, min_replicas=1, max_replicas=3, images_per_day=images_per_day
    )
    images = images_per_day * days
    ui = images * (A100_SECONDS + 1.0) * RUN_PER_SECOND + images * RUN_PER_REQUEST  # + 1 s of page work
    storage = STORAGE_PER_DAY * days
    for replicas, part in ((1, found.low), (3, found.high)):
        assert part.gpu == pytest.approx(A100_EU["gpu"] * replicas * hours, rel=1e-9)
        assert part.vcpu == pytest.approx(A100_EU["vcpu"] * replicas * hours, rel=1e-9)
        assert part.ram == pytest.approx(A100_EU["ram"] * replicas * hours, rel=1e-9)
        assert part.endpoint == pytest.approx(sum(A100_EU.values()) * replicas * hours, rel=1e-9)
        assert part.ui == pytest.approx(ui, rel=1e-9)  # per request: the same at any replica count
        assert part.storage == pytest.approx(storage, rel=1e-9)
        assert part.total == pytest.approx(sum(A100_EU.values()) * replicas * hours + ui + storage, rel=1e-9)
    assert found.machine_per_hour == pytest.approx(sum(A100_EU.values()), rel=1e-9)
    assert (found.low.ui, found.low.storage) == (pytest.approx(0.1140810), pytest.approx(0.0532194))


def test_the_json_rounds_each_part_to_cents_and_adds_the_unrounded_ones() -> None:
    found = pricing.estimate(gpu("a100"), "europe-west4", days=2, min_replicas=1, max_replicas=3, images_per_day=500)
    data = found.as_dict()
    assert data["usd"] == {
        "gpu": 161.96,
        "vcpu": 23.05,
        "ram": 21.88,
        "endpoint": 206.89,
        "ui": 0.11,
        "storage": 0.05,
        "total": 207.06,
    }
    assert data["usd_at_max_replicas"] == {
        "gpu": 485.87,
        "vcpu": 69.16,
        "ram": 65.65,
        "endpoint": 620.68,
        "ui": 0.11,
        "storage": 0.05,
        "total": 620.85,
    }
    assert data["machine_usd_per_hour"] == 4.3103
    assert (data["gpu"], data["machine"], data["accelerator"]) == ("a100", "a2-highgpu-1g", "1 x NVIDIA_TESLA_A100")
    assert (data["region"], data["days"], data["replicas"]) == ("europe-west4", 2, {"min": 1, "max": 3})
    assert data["estimate"] is True and data["prices"] == {"date": "2026-11-26", "origin": "bundled"}
    assert data["unverified"] == ["storage Artifact Registry storage list price (third-party figure)"]


def test_the_cli_shows_storage_the_ui_and_the_total(cli: Cli) -> None:
    result = cli("cost", "--days", "10", "--gpu", "a100", "--region", "europe-west4", "--json")
    assert result.code == 0, result.err
    usd = json.loads(result.out)["usd"]
    endpoint = sum(A100_EU.values()) * 240
    assert usd["storage"] == round(STORAGE_PER_DAY * 10, 2) == 0.27
    assert usd["ui"] == 0.0  # `sdxlctl cost` projects no images: the UI costs only what it serves
    assert usd["endpoint"] == round(endpoint, 2) == 1034.47
    assert usd["total"] == round(endpoint + STORAGE_PER_DAY * 10, 2) == 1034.73


def test_storage_is_what_the_images_take_above_the_free_allowance() -> None:
    data = table_data()
    assert pricing.storage_cost(pricing.from_data(data), 30.44) == pytest.approx(0.81, rel=1e-9)  # a month
    assert pricing.storage_cost(pricing.from_data(data), 0) == 0
    for sizes, usd_per_month in (({"server": 0.3, "ui": 0.2}, 0.0), ({"server": 0.1}, 0.0), ({"server": 0.6}, 0.01)):
        data["artifact_registry"]["image_gb"] = sizes  # at the allowance, under it, 0.1 GB over it
        assert pricing.storage_cost(pricing.from_data(data), 30.44) == pytest.approx(usd_per_month, abs=1e-12)


def test_the_ui_pays_per_request_while_it_waits_on_the_model() -> None:
    table = pricing.bundled()
    assert pricing.ui_cost(table, 1000, 9.0) == pytest.approx(10_000 * RUN_PER_SECOND + 1000 * RUN_PER_REQUEST)
    assert pricing.ui_cost(table, 1000, 9.0) == pytest.approx(0.2654, rel=1e-9)
    assert pricing.ui_cost(table, 0, 9.0) == 0
    without = pricing.estimate(
        gpu("l4"), "us-central1", days=1, min_replicas=1, max_replicas=1, images_per_day=100, ui=False
    )
    assert without.low.ui == 0 == without.high.ui
    assert without.low.total == pytest.approx(without.low.endpoint + STORAGE_PER_DAY, rel=1e-9)


def test_days_and_replicas_at_their_limits() -> None:
    none = pricing.estimate(gpu("l4"), "us-central1", days=0, min_replicas=0, max_replicas=1, images_per_day=100)
    assert none.low.total == 0 and none.high.total == 0
    same = pricing.estimate(gpu("l4"), "us-central1", days=1, min_replicas=2, max_replicas=2)
    assert same.low == same.high
    for days, low, high, field in ((-0.5, 1, 1, "--days -0.5"), (1, -1, 1, "replicas -1..1"), (1, 0, 0, "0..0")):
        with pytest.raises(UsageError, match=re.escape(field)):
            pricing.estimate(gpu("l4"), "us-central1", days=days, min_replicas=low, max_replicas=high)
    with pytest.raises(UsageError, match=re.escape("replicas 3..2")):
        pricing.estimate(gpu("l4"), "us-central1", days=1, min_replicas=3, max_replicas=2)


def test_derived_regions_scale_every_price_and_are_unverified() -> None:
    table = pricing.from_data(table_data())  # not bundled(): it is cached, a change to from_data would hide
    assert (table.date, table.origin) == ("2026-11-26", "bundled")
    assert table.regions["us-east4"]["location"] == "Northern Virginia"
    for region, factor in (("us-east4", 1.126), ("europe-west1", 1.10), ("asia-southeast1", 1.235)):
        for kind, key in (("gpu", "l4"), ("vcpu", "g2"), ("ram", "g2"), ("gpu", "h100"), ("vcpu", "a3")):
            rate, base = table.rate(region, kind, key), table.rate("us-central1", kind, key)
            assert rate.usd == pytest.approx(base.usd * factor, rel=1e-12)
            assert not rate.verified and rate.source.startswith("estimate: us-central1 x")
    l4 = table.rate("us-central1", "gpu", "l4")
    assert (l4.usd, l4.verified) == (0.644046, True) and l4.source.startswith("g2-standard-4 vs -8")


def test_live_prices_replace_only_what_the_catalog_has() -> None:
    table = pricing.bundled()

    def sku(usd: float) -> dict[str, Any]:
        return {"usd": usd, "verified": True, "source": "SKU"}

    catalog = {
        "europe-west4": {"gpu": {"a100": sku(3.5)}, "ram": {"a2": sku(0.006)}},
        "me-central2": {"vcpu": {"a2": sku(0.05)}},
    }
    live = pricing.with_live(table, catalog, "2026-12-01")
    assert live.rate("europe-west4", "gpu", "a100").usd == 3.5
    assert live.rate("europe-west4", "ram", "a2").usd == 0.006
    assert live.rate("europe-west4", "vcpu", "a2").usd == 0.0400223  # the bundled one, kept
    assert live.rate("me-central2", "vcpu", "a2").usd == 0.05
    assert live.regions["me-central2"]["location"] == "me-central2"  # a region the table did not have
    assert (live.date, live.origin) == ("2026-12-01", "live (Cloud Billing catalog)")
    assert table.rate("europe-west4", "gpu", "a100").usd == 3.3741  # the bundled table is not changed


def test_speed_and_price_per_image_at_the_60_s_limit_and_its_wide_margin() -> None:
    l4 = gpu("l4")

    def row(seconds: float, lower_bound: bool = False) -> pricing.Comparison:
        return pricing.Comparison(l4, 1.8, pricing.Latency(seconds, True, lower_bound, "test"))

    assert row(30.0).fits_with_margin and not row(30.01).fits_with_margin  # at most half of 60 s
    assert row(59.99).fits_shared and not row(60.0).fits_shared
    assert not row(10.0, lower_bound=True).fits_with_margin  # "more than 10 s" promises no margin
    assert row(10.0, lower_bound=True).fits_shared
    assert row(7.2).images_per_hour == 500 and row(7.2).usd_per_1000_images == pytest.approx(3.6)
    unpriced = pricing.Comparison(l4, None, pricing.Latency(7.2, True, False, "test"))
    assert unpriced.usd_per_1000_images is None and unpriced.as_dict()["usd_per_day"] is None
    assert row(7.2).as_dict() == {
        "gpu": "l4",
        "machine": l4.machine_type,
        "usd_per_hour": 1.8,
        "usd_per_day": 43.2,
        "seconds_per_image": 7.2,
        "seconds_lower_bound": False,
        "seconds_measured": True,
        "images_per_hour": 500.0,
        "usd_per_1000_images": 3.6,
        "fits_60s_shared_endpoint": True,
        "fits_with_wide_margin": True,
    }


def test_latency_scales_with_steps_and_the_fast_path_level() -> None:
    per_30 = 13.5 * 30 + 10.5
    assert pricing.latency("h200").seconds == pytest.approx(1.039, rel=1e-9)
    assert pricing.latency("h200", steps=10).seconds == pytest.approx(1.039 * (13.5 * 10 + 10.5) / per_30, rel=1e-9)
    assert pricing.latency("h200", level="none").seconds == pytest.approx(1.039 * 1.804, rel=1e-9)
    assert pricing.latency("h200", level="max").seconds == pytest.approx(1.039 * 0.993, rel=1e-9)
    assert pricing.latency("a100").seconds == pytest.approx(A100_SECONDS, rel=1e-9)
    t4 = pricing.latency("t4", steps=15, level="none")  # a lower bound from the eager 2023 pipeline
    assert t4.lower_bound and t4.seconds == pytest.approx(60.0 * (13.5 * 15 + 10.5) / per_30, rel=1e-9)


def test_the_recommendation_and_the_status_price_need_a_priced_region() -> None:
    with pytest.raises(UsageError, match="no GPU priced in mars-north1 fits 60 s at 30 steps"):
        pricing.recommended_gpu("mars-north1")
    assert pricing.machine_price("l4", "mars-north1") is None
    assert pricing.machine_price("l4", "us-central1") == pytest.approx(0.644046 + 0.02874255 * 8 + 0.00336605 * 32)
    assert {row.option.key for row in pricing.compare("mars-north1")} == set(GPUS)
    assert all(row.usd_per_hour is None for row in pricing.compare("mars-north1"))


def test_multi_gpu_machines_pay_for_every_card() -> None:
    """The H200 option is a3-ultragpu-8g: 8 cards, 224 vCPU, 2952 GB."""
    h200 = pricing.estimate(gpu("h200"), "us-central1", days=1, min_replicas=1, max_replicas=1)
    assert h200.low.gpu == pytest.approx(12.19 * 8 * 24, rel=1e-9)
    assert h200.machine_per_hour == pytest.approx(12.19 * 8 + 0.0293227 * 224 + 0.0025534 * 2952, rel=1e-9)


def test_defaults_project_no_images_and_30_steps() -> None:
    plain = pricing.estimate(gpu("l4"), "us-central1", days=1, min_replicas=1, max_replicas=1)
    assert plain.low.ui == 0 == plain.high.ui
    rows = {row.option.key: row for row in pricing.compare("us-central1")}
    assert rows["h200"].latency.seconds == pytest.approx(1.039, rel=1e-9)
    assert pricing.seconds_per_image("h200", 30, "none") == pytest.approx(1.039 * 1.804, rel=1e-9)
    assert pricing.latency("h200").source.startswith("bench/results/2026-11-26-h200-run4.json")


def test_each_unverified_price_is_named_with_its_source() -> None:
    t4 = pricing.estimate(gpu("t4"), "us-central1", days=1, min_replicas=1, max_replicas=1)
    assert t4.unverified == [
        "GPU 1.15 x Compute Engine T4 0.35/h, a third-party figure",
        "storage Artifact Registry storage list price (third-party figure)",
    ]
    l4 = pricing.estimate(gpu("l4"), "us-central1", days=1, min_replicas=1, max_replicas=1)
    assert [note.split()[0] for note in l4.unverified] == ["vCPU", "RAM", "storage"]
    data = table_data()
    data["artifact_registry"]["verified"] = True
    checked = pricing.estimate(gpu("h100"), "us-central1", days=1, min_replicas=1, max_replicas=1,
                               table=pricing.from_data(data))
    assert checked.unverified == []
    del data["artifact_registry"]["verified"]  # unsaid is unverified
    unsaid = pricing.estimate(gpu("h100"), "us-central1", days=1, min_replicas=1, max_replicas=1,
                              table=pricing.from_data(data))
    assert [note.split()[0] for note in unsaid.unverified] == ["storage"]


def test_an_estimate_says_which_prices_it_used() -> None:
    live = pricing.with_live(pricing.bundled(), {}, "2026-12-01")
    found = pricing.estimate(gpu("l4"), "us-central1", days=1, min_replicas=1, max_replicas=1, table=live)
    assert found.as_dict()["prices"] == {"date": "2026-12-01", "origin": "live (Cloud Billing catalog)"}


def test_the_recommendation_is_the_cheapest_option_of_the_given_table() -> None:
    data = table_data()
    data["regions"]["us-central1"]["gpu"]["l4"]["usd"] = 100.0  # now the A100 machine is the cheapest that fits
    assert pricing.recommended_gpu("us-central1", table=pricing.from_data(data)).key == "a100"


def test_missing_prices_say_what_is_priced() -> None:
    data = table_data()
    del data["regions"]["europe-west4"]["vcpu"]
    table = pricing.from_data(data)
    with pytest.raises(UsageError, match="no vcpu price for 'a2' in europe-west4") as missing:
        table.rate("europe-west4", "vcpu", "a2")
    assert missing.value.hint == "try another region, or --live for the Cloud Billing catalog"
    with pytest.raises(UsageError) as unknown:
        table.rate("mars-north1", "gpu", "l4")
    regions = "us-central1, europe-west4, us-east4, europe-west1, asia-southeast1"
    assert unknown.value.hint == f"regions priced: {regions}; or try --live"


def test_the_compare_row_rounds_each_figure_to_its_own_precision() -> None:
    row = pricing.Comparison(gpu("l4"), 1.23471, pricing.Latency(7.123456, False, False, "test"))
    shown = row.as_dict()
    assert (shown["usd_per_hour"], shown["usd_per_day"], shown["seconds_per_image"]) == (1.2347, 29.63, 7.12)
    assert (shown["images_per_hour"], shown["usd_per_1000_images"]) == (505.4, 2.443)
