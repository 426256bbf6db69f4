"""expert_ensemble's split of the steps, as counted by sdxl_server.steps, is the one diffusers' pipelines run."""

from __future__ import annotations

import json
from types import SimpleNamespace
from typing import Any

import pytest

from sdxl_server.schedulers import build
from sdxl_server.schema import SCHEDULER_NAMES
from sdxl_server.steps import ensemble_split

CASES = [(2, 0.8), (4, 0.8), (5, 0.35), (3, 0.97)]  # each a boundary for some sampler


def sampler(name: str) -> Any:
    from sdxl_server.sources import CONFIGS

    return build(name, json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text()))


class Counted(Exception):
    """Stops the pipeline once it has said how many steps it will run, before the first UNet call."""


@pytest.mark.parametrize("name", SCHEDULER_NAMES)
def test_the_split_is_the_one_the_pipelines_run(tiny_pipeline: Any, name: str) -> None:
    import torch
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline

    base = StableDiffusionXLPipeline(**{**tiny_pipeline.components, "scheduler": sampler(name)})
    totals: list[int] = []

    def progress_bar(total: int | None = None, **_: Any) -> Any:
        # The pipeline opens its progress bar with the steps left after denoising_end: the count to check.
        totals.append(total or 0)
        raise Counted

    base.progress_bar = progress_bar
    embeds, _, pooled, _ = base.encode_prompt("a fox", do_classifier_free_guidance=False)
    for steps, fraction in CASES:
        with pytest.raises(Counted):
            base(
                prompt_embeds=embeds,
                pooled_prompt_embeds=pooled,
                num_inference_steps=steps,
                denoising_end=fraction,
                guidance_scale=1.0,
                output_type="latent",
                width=64,
                height=64,
                generator=torch.Generator().manual_seed(0),
            )
        refiner_sampler = sampler(name)
        refiner_sampler.set_timesteps(steps)
        refined, _ = StableDiffusionXLImg2ImgPipeline.get_timesteps(
            SimpleNamespace(scheduler=refiner_sampler), steps, 0.3, "cpu", denoising_start=fraction
        )
        assert ensemble_split(name, steps, fraction) == (totals[-1], len(refined)), (steps, fraction)


def test_a_model_that_spaces_its_timesteps_otherwise_is_split_by_its_own_config(tiny_pipeline: Any) -> None:
    """parse_request counts the split on SDXL 1.0's scheduler config ('leading'); a model loaded with another
    ('trailing', as few-step fine-tunes ship) can leave the refiner no step where SDXL's would not, and
    diffusers then runs the refiner over the whole schedule (timesteps[-0:]). The Generator refuses it."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    from sdxl_server.errors import InvalidRequest
    from sdxl_server.generator import Generator
    from sdxl_server.refiner import build_tiny_refiner
    from sdxl_server.schema import Job, Request

    trailing = EulerDiscreteScheduler.from_config(tiny_pipeline.scheduler.config, timestep_spacing="trailing")
    base = StableDiffusionXLPipeline(**{**tiny_pipeline.components, "scheduler": trailing})
    base.set_progress_bar_config(disable=True)
    generator = Generator(base, refiner=build_tiny_refiner(base), refiner_source="tiny")
    assert all(ensemble_split(None, 3, 0.8))  # SDXL's spacing gives each model a step
    job = Job("a fox", None, None, None, (1,), model_garden=False)
    request = Request(
        (job,), steps=3, guidance_scale=5.0, width=64, height=64, output_format="png", quality=90,
        refine="expert_ensemble", high_noise_frac=0.8,
    )  # fmt: skip
    with pytest.raises(InvalidRequest) as raised:
        generator.generate(request)
    assert raised.value.field == "parameters.high_noise_frac"
    assert "refiner no step" in str(raised.value)
