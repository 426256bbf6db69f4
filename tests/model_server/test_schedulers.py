"""The sampler table: the names the request schema accepts, each a fresh scheduler from the model's config."""

from __future__ import annotations

import json

import pytest

from sdxl_server import schedulers
from sdxl_server.schema import SCHEDULER_NAMES
from sdxl_server.sources import CONFIGS

SDXL = json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text())


def test_the_table_has_the_names_the_schema_accepts() -> None:
    assert tuple(schedulers.SCHEDULERS) == SCHEDULER_NAMES


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_each_is_built_fresh_from_the_models_config(name: str) -> None:
    first, second = schedulers.build(name, SDXL), schedulers.build(name, SDXL)
    assert first is not second  # stateful: one per request
    assert type(first).__name__ == schedulers.SCHEDULERS[name].cls
    # SDXL's noise schedule carries over; only the solver changes
    assert (first.config.beta_start, first.config.beta_end, first.config.beta_schedule) == (
        SDXL["beta_start"],
        SDXL["beta_end"],
        SDXL["beta_schedule"],
    )
    first.set_timesteps(4)
    assert len(first.timesteps) == 4 * schedulers.unet_calls(name) - (schedulers.unet_calls(name) - 1)


def test_karras_sigmas_only_where_the_name_says_so() -> None:
    karras = {name for name in SCHEDULER_NAMES if schedulers.build(name, SDXL).config.get("use_karras_sigmas")}
    assert karras == {"dpmpp_2m_karras", "dpmpp_sde_karras"}


def test_second_order_samplers_call_the_unet_twice_a_step() -> None:
    twice = {name for name in SCHEDULER_NAMES if schedulers.unet_calls(name) == 2}
    assert twice == {"heun", "kdpm2", "dpmpp_sde_karras"}
    assert schedulers.unet_calls(None) == 1


def test_no_name_is_the_models_own_and_the_sde_sampler_takes_the_seeds() -> None:
    own = schedulers.build(None, SDXL)
    assert type(own).__name__ == SDXL["_class_name"] == "EulerDiscreteScheduler"
    assert schedulers.build("dpmpp_sde_karras", SDXL, (3, 4)).config.noise_sampler_seed == [3, 4]
    assert "noise_sampler_seed" not in schedulers.build("dpmpp_2m", SDXL, (3,)).config


def test_the_sde_sampler_leaves_the_log_alone() -> None:
    """torchsde warns "Should have tb<=t1" on every request (float32 sigma vs its float64 end): a line of
    raw text in a log of JSON lines, about a rounding that changes nothing."""
    import warnings

    import torch

    sampler = schedulers.build("dpmpp_sde_karras", SDXL, (7,))
    sampler.set_timesteps(4)
    latents = torch.zeros(1, 4, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        for timestep in sampler.timesteps:
            latents = sampler.step(torch.zeros_like(latents), timestep, latents).prev_sample
    assert [str(warning.message) for warning in caught] == []
