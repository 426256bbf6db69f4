"""The fast path on a CPU with the tiny model: same images (within fp noise), a cache that makes restarts fast."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sdxl_server import optimize
from sdxl_server.errors import SettingsError
from sdxl_server.settings import Settings
from sdxl_server.sources import build_tiny_pipeline
from tests.servers import server_process

TOLERANCE = 2  # of 255: fused projections and compiled kernels round differently, nothing more


def image(pipe, seed: int = 5) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    result = pipe(
        "a lighthouse", num_inference_steps=3, width=64, height=64, generator=torch.Generator("cpu").manual_seed(seed)
    ).images[0]
    return np.asarray(result).astype(int)


@pytest.fixture(scope="module")
def reference() -> np.ndarray:
    return image(build_tiny_pipeline())


def test_eager_matches_none(reference: np.ndarray) -> None:
    pipe = build_tiny_pipeline()
    optimize.apply(pipe, "eager")
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert np.abs(image(pipe) - reference).max() <= TOLERANCE
    optimize.apply(pipe, "eager")  # idempotent: applying again changes nothing
    assert np.abs(image(pipe) - reference).max() <= TOLERANCE


def test_compile_matches_none_and_writes_a_portable_cache(reference: np.ndarray, tmp_path: Path) -> None:
    optimize.use_cache(tmp_path)
    pipe = build_tiny_pipeline()
    optimize.apply(pipe, "compile")
    assert np.abs(image(pipe) - reference).max() <= TOLERANCE
    assert np.abs(image(pipe, seed=6) - image(build_tiny_pipeline(), seed=6)).max() <= TOLERANCE
    optimize.save_cache(tmp_path / "saved")
    assert (tmp_path / "saved" / optimize.ARTIFACTS).stat().st_size > 0


def test_auto_means_compile_on_a_gpu_and_none_on_a_cpu() -> None:
    assert optimize.resolve("auto", "cuda") == "compile"
    assert optimize.resolve("auto", "cpu") == "none"
    assert optimize.resolve("max", "cpu") == "max"
    assert Settings.from_env({"SDXL_OPTIMIZE": "MAX"}).optimize == "max"
    with pytest.raises(SettingsError, match="SDXL_OPTIMIZE"):
        Settings.from_env({"SDXL_OPTIMIZE": "turbo"})
    with pytest.raises(ValueError, match="SDXL_OPTIMIZE"):
        optimize.apply(build_tiny_pipeline(), "turbo")


def test_a_restart_with_a_warm_compile_cache_is_faster(tmp_path: Path) -> None:
    cache = tmp_path / "compile-cache"
    env = {"SDXL_MODEL": "tiny", "SDXL_OPTIMIZE": "compile", "SDXL_COMPILE_CACHE": str(cache), "SDXL_WARMUP": "64x64"}
    seconds = []
    for run in ("cold", "warm"):
        (tmp_path / run).mkdir()
        started = time.monotonic()
        with server_process(env, tmp_path / run) as server:
            health = server.wait_until("ready", timeout=240)
            seconds.append(time.monotonic() - started)
            assert health.json()["optimize"] == "compile"
            answer = server.predict(
                {
                    "instances": [{"prompt": "a fox", "seed": 1}],
                    "parameters": {"num_inference_steps": 2, "width": 64, "height": 64},
                }
            )
            assert answer.status_code == 200
    assert (cache / optimize.ARTIFACTS).is_file()
    assert seconds[1] < seconds[0], seconds
