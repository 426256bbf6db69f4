"""The GPU benchmark's harness on a CPU with the tiny model: each variant measures what it says it does."""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bench_gpu", ROOT / "bench" / "gpu.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gpu"] = module
    spec.loader.exec_module(module)
    return module


def test_a_freshly_built_variant_compiles_with_its_own_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dynamo keeps compiled code per Python function and its guards ignore the compiler's settings: the
    second variant once ran the first one's code, and so measured nothing of its own."""
    from torch._dynamo.utils import counters

    bench = load_bench()
    from sdxl_server.optimize import Plan

    # The smallest block the tiny UNet repeats, so that compiling twice takes seconds.
    monkeypatch.setitem(bench.VARIANTS, "plain", Plan(fuse=True, compile=("Downsample2D",)))
    monkeypatch.setitem(bench.VARIANTS, "tuned", Plan(fuse=True, compile=("Downsample2D",), autotune=True))
    monkeypatch.setitem(bench.ESTIMATE_S, "plain", 1)
    monkeypatch.setitem(bench.ESTIMATE_S, "tuned", 1)
    args = argparse.Namespace(model="tiny", size=64, steps=1, repeats=1, device="cpu", dtype="auto", scale=1.0)
    run, state = bench.Run(tmp_path, 600), bench.Bench()
    for variant in ("plain", "tuned"):
        counters.clear()
        bench.measure_variant(run, args, state, variant)
        assert counters["stats"]["unique_graphs"] > 0, f"{variant} compiled nothing"
        assert run.results["phases"][f"variant {variant}"]["plan"]["autotune"] == (variant == "tuned")
