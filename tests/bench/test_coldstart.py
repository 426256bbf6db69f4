"""The cold-start benchmark's harness on the tiny model: it measures what it says it does (no timings asserted)."""

from __future__ import annotations

import json
from pathlib import Path

from tests.bench import load_bench


def test_evicting_a_file_leaves_none_of_it_in_the_page_cache(tmp_path: Path) -> None:
    """A cold read must start cold: a file just written (dirty pages, which DONTNEED alone keeps) and read is
    fully cached, and after evict() mincore finds none of it."""
    bench = load_bench("coldstart")
    data = tmp_path / "weights.safetensors"
    data.write_bytes(bytes(range(256)) * (8 << 12))  # 8 MiB
    assert bench.read_file(data) == data.stat().st_size
    assert bench.resident_bytes(data) == data.stat().st_size
    assert bench.evict([data]) == 0.0
    assert bench.resident_bytes(data) == 0


def test_the_harness_measures_the_floor_loaders_and_server_on_the_tiny_model(tmp_path: Path) -> None:
    bench = load_bench("coldstart")
    results = bench.main(
        [
            "--model=tiny",
            f"--folder={tmp_path / 'tiny'}",
            "--runs=1",
            "--loaders=diffusers,safetensors+threads",
            "--warmup=64x64",
            "--timeout=120",
            f"--json={tmp_path / 'results.json'}",
        ]
    )
    assert json.loads((tmp_path / "results.json").read_text())["summary"] == results["summary"]
    # The published layout: one fp16 variant file per component, and nothing else read as weights.
    assert sorted(results["files"]) == [
        "text_encoder/model.fp16.safetensors",
        "text_encoder_2/model.fp16.safetensors",
        "unet/diffusion_pytorch_model.fp16.safetensors",
        "vae/diffusion_pytorch_model.fp16.safetensors",
    ]
    (floor,) = results["floor"]
    assert floor["bytes"] == sum(results["files"].values())
    assert floor["cold_serial_cached_before"] == floor["cold_parallel_cached_before"] == 0.0
    for loader, (sample,) in results["loaders"].items():
        assert "error" not in sample, (loader, sample)
        assert sample["cached_before"] == 0.0
        assert sample["dtypes"] == ["torch.float16"]
        assert set(sample["checksums"]) == {"unet", "vae", "text_encoder", "text_encoder_2"}
    assert results["identical_tensors"]
    (server,) = results["server"]["64x64"]
    assert server["health_s"] is not None, server.get("error")
    assert {"starting", "model ready"} <= set(server["log"])
