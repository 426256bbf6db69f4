"""The refiner's time and memory, and the samplers that call the UNet twice a step, in `sdxlctl cost`: estimates
from the work per image (the UNets' FLOP counts) and the weights' parameter counts, against each GPU's memory."""

from __future__ import annotations

import json

import pytest

from sdxlctl import pricing
from sdxlctl.gpus import GPUS, gpu
from sdxlctl.pricing.memory import gpu_memory
from tests.conftest import Cli

REFINED = {"SDXLCTL_MODEL_SOURCE": "random-sdxl", "SDXLCTL_MODEL_REFINER": "random"}


def work(steps: int, refiner_steps: int = 0, unet_calls: int = 1) -> float:
    """TFLOP per image, as latency.json counts them."""
    return 13.5 * steps * unet_calls + 14.57 * refiner_steps + 10.5


def test_expert_ensemble_splits_the_same_steps_and_base_image_adds_three_tenths_of_refine_steps() -> None:
    plain = pricing.latency("h100", 30).seconds
    refined = pricing.refining("h100", 30)
    # SDXL's Euler timesteps at 30 steps are 958, 925, ..., 1: 23 at or above 200 (1000 x (1 - 0.8)), 7 below
    assert refined.ensemble_split == (23, 7)
    assert refined.ensemble.seconds == pytest.approx(plain * work(23, 7) / work(30))
    assert refined.base_image_steps == 9  # int(30 x 0.3), as diffusers' img2img counts them
    assert refined.base_image.seconds == pytest.approx(plain * work(30, 9) / work(30))
    # The refiner's UNet is wider at every resolution: its step costs more than the base's, not less.
    assert plain < refined.ensemble.seconds < refined.base_image.seconds
    assert pricing.refining("h100", 7).base_image_steps == 2  # int(2.1)
    assert pricing.refining("h100", 2).ensemble_split == (1, 1)  # each model keeps a step


def test_the_ensemble_split_is_the_one_the_server_runs() -> None:
    """cost counts the steps the server's expert_ensemble runs with the model's own sampler (diffusers splits
    the timesteps at round(1000 x (1 - high_noise_frac)), not the step count at high_noise_frac)."""
    from sdxl_server.steps import ensemble_split

    for steps in range(2, 151):
        assert pricing.refining("h100", steps).ensemble_split == ensemble_split(None, steps, 0.8), steps


def test_the_two_pass_samplers_take_twice_the_unet_time_per_image() -> None:
    for key in GPUS:
        once, twice = pricing.latency(key, 30), pricing.latency(key, 30, unet_calls=2)
        assert twice.seconds == pytest.approx(once.seconds * work(30, unet_calls=2) / work(30))
        assert twice.lower_bound == once.lower_bound  # the T4's "over 60 s" stays a lower bound


def test_memory_counts_the_weights_and_estimates_the_working_memory() -> None:
    base = gpu_memory(gpu("l4"))
    assert base.base_gb == pytest.approx(6.94, abs=0.01) and base.refiner_gb == 0 and base.working_gb == 3
    refined = gpu_memory(gpu("l4"), refiner=True)
    assert refined.refiner_gb == pytest.approx(4.52, abs=0.01)  # its UNet only: VAE and text_encoder_2 shared
    wide = gpu_memory(gpu("l4"), dtype="fp32", refiner=True)
    assert wide.total_gb == pytest.approx(2 * refined.total_gb)
    assert gpu_memory(gpu("l4"), dtype="bf16", refiner=True).total_gb == refined.total_gb  # 16 bits as fp16
    assert {key: option.memory_gb for key, option in GPUS.items()} == {
        "t4": 16,
        "l4": 24,
        "a100": 40,
        "a100-80": 80,
        "h100": 80,
        "h200": 141,
    }


@pytest.mark.parametrize(
    ("key", "dtype", "refiner", "verdict"),
    [
        ("t4", "auto", False, "fits"),
        ("t4", "fp16", True, "tight"),  # ~14.5 of 16 GB: too close to call
        ("t4", "fp32", False, "over"),
        ("t4", "fp32", True, "weights"),
        ("l4", "fp32", True, "over"),
        ("a100", "fp32", True, "fits"),
    ],
)
def test_each_gpu_against_the_estimate(key: str, dtype: str, refiner: bool, verdict: str) -> None:
    memory = gpu_memory(gpu(key), dtype=dtype, refiner=refiner)
    assert memory.verdict == verdict
    assert bool(memory.warning) == (verdict != "fits")


def test_cost_shows_the_refiner_only_when_one_is_set_and_always_the_two_pass_samplers(cli: Cli) -> None:
    plain = cli("cost")
    assert plain.code == 0, plain.err
    assert "with the refiner" not in plain.out
    assert "samplers heun, kdpm2, dpmpp_sde_karras call the UNet twice a step: 16.8 s/image" in plain.out
    assert "GPU memory: ~6.9 GB weights (fp16) + ~3 GB working (an estimate), of 24 GB on L4" in plain.out

    refined = cli("cost", env=REFINED)
    assert refined.code == 0, refined.err
    said = " ".join(refined.out.split())
    assert "with the refiner (estimated): expert_ensemble 23+7 steps 8.6 s/image" in said
    assert "base_image +9 refiner steps 11.2 s/image" in said
    assert "GPU memory: ~11.5 GB weights (base 6.9 + refiner 4.5, fp16)" in said
    assert "warning" not in refined.err

    tight = cli("cost", "--gpu", "t4", env=REFINED)
    # past a shared endpoint's 60 s an image is refused: no price per 1000 images, as the base's line says
    said = " ".join(tight.out.split())
    assert "expert_ensemble 23+7 steps over 61.1 s/image (past the 60 s limit)" in said
    assert "base_image +9 refiner steps over 78.9 s/image (past the 60 s limit)" in said
    as_json = json.loads(cli("cost", "--gpu", "t4", "--json", env=REFINED).out)["refiner"]
    assert as_json["expert_ensemble"]["usd_per_1000_images"] is None
    assert "it may run out of memory" in " ".join(tight.err.split())


def test_the_json_estimate_carries_the_refiner_the_memory_and_the_two_pass_time(cli: Cli) -> None:
    shown = cli("cost", "--json", "--steps", "20", env=REFINED)
    assert shown.code == 0, shown.err
    data = json.loads(shown.out)
    ensemble = data["refiner"]["expert_ensemble"]
    assert (ensemble["base_steps"], ensemble["refiner_steps"]) == (16, 4)
    assert data["refiner"]["base_image"]["refiner_steps"] == 6
    per_hour = data["machine_usd_per_hour"]
    assert ensemble["usd_per_1000_images"] == pytest.approx(per_hour * ensemble["seconds_per_image"] / 3.6, rel=1e-2)
    assert data["gpu_memory"] == {
        "estimate": True,
        "dtype": "fp16",
        "weights_gb": 11.46,
        "base_gb": 6.94,
        "refiner_gb": 4.52,
        "working_gb": 3.0,
        "total_gb": 14.46,
        "gpu_gb": 24,
        "verdict": "fits",
    }
    assert data["two_pass_samplers"]["samplers"] == ["heun", "kdpm2", "dpmpp_sde_karras"]
    assert "refiner" not in json.loads(cli("cost", "--json").out)
