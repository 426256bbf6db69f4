"""The Cloud Run cold-start harness, once: through the emulator's path it measures a real start (no timings
asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench import load_bench


def test_one_round_starts_one_instance_from_zero_and_times_health_then_the_image(tmp_path: Path) -> None:
    bench = load_bench("coldstart_cloudrun")
    results = bench.main(["--runs=1", "--timeout=300", f"--json={tmp_path / 'results.json'}"])
    assert json.loads((tmp_path / "results.json").read_text()) == results
    (sample,) = results["runs"]
    # each round is a cold start: the scaled-to-zero service started exactly one instance for it
    assert sample["new_instances"] == 1 and sample["images"] == 1
    assert 0 < sample["health_s"] <= sample["image_s"]  # the image is counted from the same start, after health
    assert results["summary"]["health_median_s"] == sample["health_s"]
    assert {"date", "machine", "versions", "code", "probe_scale"} <= set(results)
    assert results["versions"]["torch"] and results["machine"]
