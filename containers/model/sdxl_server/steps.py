"""The steps each model runs in each mode, counted as diffusers counts them, and the rules that follow:
a request that would leave the base or the refiner no step at all is refused before any work."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

from sdxl_server.errors import InvalidRequest

MAX_STEPS = 150
# cog-sdxl's prompt_strength for image-to-image; inpainting repaints the masked area from pure noise
# (diffusers' own default, 0.9999, is 1 but for a rounding guard it needs no longer).
DEFAULT_STRENGTH = {"image-to-image": 0.8, "inpainting": 1.0}
# base_image: how far the refiner re-noises the base's image (the refiner pipeline's own default: it
# sharpens, it does not repaint)
BASE_IMAGE_STRENGTH = 0.3
REFINER_SOURCE = "SDXL_REFINER; sdxlctl sets it from [model] refiner"


def check(
    mode: str,
    *,
    steps: int,
    strength: float | None,
    scheduler: str | None,
    refine: str,
    high_noise_frac: float,
    refine_steps: int | None,
    refiner: bool,
) -> float | None:
    """Check the rules between the parameters; return the strength the mode runs with (None: text-to-image)."""
    if strength is not None and mode == "text-to-image":
        raise _refusal(
            "parameters.strength", "strength applies to an input image: add instances[].image or leave strength out"
        )
    run_strength = None if mode == "text-to-image" else float(strength or DEFAULT_STRENGTH[mode])
    if run_strength is not None and int(steps * run_strength) < 1:  # diffusers runs int(steps x strength)
        least = next((n for n in range(steps, MAX_STEPS + 1) if int(n * run_strength) >= 1), None)
        more = f", or num_inference_steps {least} or more" if least is not None else ""
        raise _refusal(
            "parameters.strength",
            f"strength {run_strength:g} x {steps} steps leaves no step to run (int({steps} x {run_strength:g}) = 0): "
            f"use strength {math.ceil(1000 / steps) / 1000:g} or more{more}",
        )
    if refine == "none":
        return run_strength
    if not refiner:
        raise _refusal(
            "parameters.refine",
            f"refine {refine!r} needs a refiner and this server has none ({REFINER_SOURCE}): "
            "load one or use refine none",
        )
    if refine == "expert_ensemble":
        if mode != "text-to-image":
            raise _refusal(
                "parameters.refine",
                "expert_ensemble hands the base's latents to the refiner mid-way and is text-to-image only: "
                "use refine base_image with an input image",
            )
        check_split(ensemble_split(scheduler, steps, float(high_noise_frac)), scheduler, steps, high_noise_frac)
    elif int((refine_steps or steps) * BASE_IMAGE_STRENGTH) < 1:
        given = refine_steps or steps
        raise _refusal(
            "parameters.refine_steps",
            f"base_image refines with strength {BASE_IMAGE_STRENGTH}, so int({given} x {BASE_IMAGE_STRENGTH}) = 0 "
            "refiner steps: give refine_steps 4 or more (it defaults to num_inference_steps)",
        )
    return run_strength


def check_split(split: tuple[int, int], scheduler: str | None, steps: int, high_noise_frac: float) -> None:
    """Refuse an expert_ensemble `split` (base, refiner timesteps) that leaves either model no step."""
    base, refined = split
    if not base or not refined:
        who, hint = ("the base model", "raise") if not base else ("the refiner", "lower")
        raise _refusal(
            "parameters.high_noise_frac",
            f"high_noise_frac {high_noise_frac:g} with {steps} steps ({scheduler or 'euler'}) leaves {who} "
            f"no step: {hint} high_noise_frac or raise num_inference_steps",
        )


@functools.lru_cache(maxsize=512)
def ensemble_split(scheduler: str | None, steps: int, high_noise_frac: float) -> tuple[int, int]:
    """The timesteps (UNet calls) the base and the refiner run in expert_ensemble, for the SDXL 1.0
    scheduler config (the base's and the refiner's are the same): what parse_request checks. A model
    loaded with another config is checked again on its own (`split`, from modes.run)."""
    from sdxl_server.schedulers import build
    from sdxl_server.sources import CONFIGS

    config = json.loads((CONFIGS / "scheduler" / "scheduler_config.json").read_text())
    return split(build(scheduler, config), build(scheduler, config), steps, high_noise_frac)


def split(base_sampler: Any, refiner_sampler: Any, steps: int, high_noise_frac: float) -> tuple[int, int]:
    """The timesteps the base and the refiner run, as diffusers splits them: the base those at or above
    round(1000 x (1 - f)) (denoising_end), the refiner those below (denoising_start; for a second-order
    sampler the count is made odd). From each sampler's own timesteps, since samplers space them
    differently (Euler 'leading' or 'trailing', DPM++ and UniPC 'linspace'-like, Karras sigmas)."""
    return _counts(base_sampler, steps, high_noise_frac)[0], _counts(refiner_sampler, steps, high_noise_frac)[1]


def _counts(sampler: Any, steps: int, high_noise_frac: float) -> tuple[int, int]:
    """`sampler`'s timesteps at or above the cutoff, and those below it as the refiner counts them."""
    sampler.set_timesteps(steps)
    trained = sampler.config.num_train_timesteps
    # diffusers' very expression, so the float rounding is the same
    cutoff = int(round(trained - (high_noise_frac * trained)))  # noqa: RUF046
    timesteps = sampler.timesteps.tolist()
    refined = sum(t < cutoff for t in timesteps)
    if sampler.order == 2 and refined % 2 == 0:
        refined += 1
    return sum(t >= cutoff for t in timesteps), refined


def _refusal(field: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"{field}: {message}", field=field)
