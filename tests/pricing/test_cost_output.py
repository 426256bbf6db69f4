"""`sdxlctl cost` as a person reads it, at 80 columns and piped: what the help promises is shown, words agree
with their numbers, one price has one rounding, and an image over the limit has no throughput."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from sdxlctl import pricing
from sdxlctl.gpus import GPUS
from tests.conftest import Cli


def _piped(folder: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")}
    return subprocess.run(
        [sys.executable, "-m", "sdxlctl", *args],
        cwd=folder,
        env={**clean, "COLUMNS": "80", **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_the_estimate_at_80_columns_piped_shows_what_the_help_promises(tmp_path: Path) -> None:
    shown = _piped(tmp_path, "cost", "--days", "1")
    assert shown.returncode == 0, shown.stderr
    helped = _piped(tmp_path, "cost", "--help")
    assert "per 1000 images" in " ".join(helped.stdout.split())  # the promise ...
    assert re.search(r"\d+ images/hour, [\d.]+ USD per 1000 images", shown.stdout), shown.stdout  # ... kept
    assert "day(s)" not in shown.stdout and "1 day," in shown.stdout
    assert "replicas 1..1" not in shown.stdout and "1 replica" in shown.stdout
    # One rounding of the hourly price in one output, the notes' published total included.
    hourly = set(re.findall(r"\b0\.98\d+", shown.stdout + shown.stderr))
    assert hourly == {"0.9817"}, shown.stdout + shown.stderr
    assert "…" not in shown.stdout


def test_the_comparison_at_80_columns_piped_gives_no_throughput_past_the_limit(tmp_path: Path) -> None:
    shown = _piped(tmp_path, "cost", "--compare")
    assert shown.returncode == 0, shown.stderr
    assert "…" not in shown.stdout, shown.stdout  # no figure cut short
    assert max(len(line) for line in shown.stdout.splitlines()) <= 80, shown.stdout
    t4 = next(line for line in shown.stdout.splitlines() if line.strip("│ ").startswith("t4 "))
    cells = [cell.strip() for cell in t4.strip("│").split("│")]
    assert cells[3].startswith(">") and cells[4:6] == ["-", "-"], t4  # "> 60 s" and no images/hour, no $/1000
    l4 = next(line for line in shown.stdout.splitlines() if line.strip("│ ").startswith("l4 "))
    assert [cell.strip() for cell in l4.strip("│").split("│")][1] == "0.9817"  # the estimate's rounding


def test_days_and_replicas_read_as_words(cli: Cli) -> None:
    days = cli("cost", "--days", "2", env={"SDXLCTL_DEPLOY_MAX_REPLICAS": "3"})
    assert days.code == 0, days.err
    assert "2 days, 1..3 replicas" in days.out and "USD at 3 replicas" in days.out
    half = cli("cost", "--days", "0.5", env={"SDXLCTL_DEPLOY_MIN_REPLICAS": "2", "SDXLCTL_DEPLOY_MAX_REPLICAS": "2"})
    assert "0.5 days, 2 replicas" in half.out
    zero = cli(
        "cost",
        env={
            "SDXLCTL_DEPLOY_MIN_REPLICAS": "0",
            "SDXLCTL_DEPLOY_MAX_REPLICAS": "2",
            "SDXLCTL_DEPLOY_ENDPOINT": "dedicated",
        },
    )
    assert "1 day, 0..2 replicas (scale to zero)" in zero.out


def test_an_image_over_the_limit_has_no_throughput_anywhere(cli: Cli) -> None:
    t4 = cli("cost", "--gpu", "t4")
    assert t4.code == 0, t4.err
    speed = next(line for line in t4.out.splitlines() if line.startswith("at full load"))
    assert "over 60.0 s/image" in speed and "no throughput" in speed and "images/hour" not in speed
    as_json = cli("cost", "--gpu", "t4", "--json")
    assert '"images_per_hour": null' in as_json.out and '"usd_per_1000_images": null' in as_json.out
    row = {r.option.key: r for r in pricing.compare("us-central1")}["t4"]
    assert (row.images_per_hour, row.usd_per_1000_images, row.as_dict()["images_per_hour"]) == (None, None, None)


@pytest.mark.parametrize("region", sorted(pricing.bundled().regions))
def test_a_split_price_adds_up_to_the_total_its_source_names(region: str) -> None:
    """A note saying "totals 0.9817" next to a computed 0.9816 is two roundings of one price."""
    table = pricing.bundled()
    for option in GPUS.values():
        try:
            hourly, rates = pricing.machine_per_hour(table, option, region)
        except Exception:
            continue
        for rate in rates:
            named = re.search(rf"{re.escape(option.machine_type)} totals? ([\d.]+)", rate.source)
            if named and rate.verified is not None:
                places = len(named.group(1).split(".")[1])
                assert f"{hourly:.{places}f}" == named.group(1), (region, option.key, rate.source)
