"""bench/flops.py counts what the pricing table says: the table is reproducible from the shipped configs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_the_counted_work_is_the_table_the_estimates_read() -> None:
    spec = importlib.util.spec_from_file_location("bench_flops", ROOT / "bench" / "flops.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_flops"] = bench
    spec.loader.exec_module(bench)
    table = json.loads((ROOT / "sdxlctl" / "pricing" / "latency.json").read_text())["work_tflop"]["by_side"]["rows"]
    wanted = [row for row in table if row["side"] in (512, 1024)]
    assert bench.count((512, 1024)) == wanted
