"""bench/flops.py counts what the pricing table says: the table is reproducible from the shipped configs."""

from __future__ import annotations

import json

from tests.bench import ROOT, load_bench


def test_the_counted_work_is_the_table_the_estimates_read() -> None:
    table = json.loads((ROOT / "sdxlctl" / "pricing" / "latency.json").read_text())["work_tflop"]["by_side"]["rows"]
    wanted = [row for row in table if row["side"] in (512, 1024)]
    assert load_bench("flops").count((512, 1024)) == wanted
