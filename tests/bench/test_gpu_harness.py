"""The GPU benchmark's harness on a CPU with the tiny model: each variant measures what it says it does."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.bench import load_bench


def test_a_freshly_built_variant_compiles_with_its_own_settings(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Dynamo keeps compiled code per Python function and its guards ignore the compiler's settings: the
    second variant once ran the first one's code, and so measured nothing of its own."""
    from torch._dynamo.utils import counters

    bench = load_bench("gpu")
    from sdxl_server.optimize import Plan

    # The smallest block the tiny UNet repeats, so that compiling twice takes seconds.
    monkeypatch.setitem(bench.VARIANTS, "plain", Plan(fuse=True, compile=("Downsample2D",)))
    monkeypatch.setitem(bench.VARIANTS, "tuned", Plan(fuse=True, compile=("Downsample2D",), autotune=True))
    monkeypatch.setitem(bench.ESTIMATE_S, "plain", 1)
    monkeypatch.setitem(bench.ESTIMATE_S, "tuned", 1)
    args = argparse.Namespace(
        model="tiny", size=64, steps=1, repeats=1, device="cpu", dtype="auto", scale=1.0, modes=[]
    )
    run, state = bench.Run(tmp_path, 600), bench.Bench()
    for variant in ("plain", "tuned"):
        counters.clear()
        bench.measure_variant(run, args, state, variant)
        assert counters["stats"]["unique_graphs"] > 0, f"{variant} compiled nothing"
        assert run.results["phases"][f"variant {variant}"]["plan"]["autotune"] == (variant == "tuned")


@pytest.fixture
def one_thread() -> Iterator[None]:
    """The tiny model's kernels are microseconds: with two threads on a busy 2-core machine, OpenMP's
    waiting made one image 7-16 s instead of 0.5 s."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.usefixtures("one_thread")
def test_each_mode_runs_the_unet_calls_it_is_named_for(tmp_path: Path) -> None:
    """Image-to-image at strength 0.6 runs 0.6 of the steps, Heun two UNet calls a step (the last step
    one), the ensemble hands the base's last 20% to the refiner; each against the run's baseline."""
    bench = load_bench("gpu")
    steps = 3  # the fewest that leave both models of the ensemble a step
    args = argparse.Namespace(
        model="tiny",
        size=64,
        steps=steps,
        repeats=1,
        device="cpu",
        dtype="auto",
        scale=1.0,
        modes=list(bench.gpu_modes.MODES),
    )
    run, state = bench.Run(tmp_path, 600), bench.Bench()
    bench.measure_variant(run, args, state, "none")
    bench.measure_variant(run, args, state, "eager")  # a level applied to the same pipeline and refiner
    for variant in ("none", "eager"):
        modes = run.results["phases"][f"variant {variant}"]["modes"]
        assert modes["img2img"]["unet_calls"] == int(steps * 0.6)
        assert modes["heun"]["unet_calls"] == 2 * steps - 1
        # Both models' steps: the base alone would stop at 0.8 (2 of 3), the refiner runs the last.
        assert modes["ensemble"]["unet_calls"] == steps
        for entry in modes.values():
            assert "error" not in entry, entry.get("error")
            assert entry["ratio_to_text"] > 0 and entry["ratio_to_baseline"] > 0
            assert entry["vs_mode_baseline"]["max_abs"] < 8  # eager's fused projections: float noise only
    assert state.refiner.vae is state.pipe.vae  # the refiner shares the base's VAE: no second copy
    table = (tmp_path / "results.md").read_text()
    assert "| eager | heun | 5 |" in table and "| none | ensemble | 3 |" in table
