"""The generation modes: one batch of one job through the pipeline of its mode, then the refiner if asked.

Each call is the one diffusers documents for the mode (and cog-sdxl makes): the parity tests compare
the images with plain diffusers' pixel for pixel, within rounding.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sdxl_server import schedulers
from sdxl_server.steps import BASE_IMAGE_STRENGTH, DEFAULT_STRENGTH, check_split, split

if TYPE_CHECKING:
    from diffusers import (
        StableDiffusionXLImg2ImgPipeline,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    from sdxl_server.schema import Job, Request

MODES = ("text-to-image", "image-to-image", "inpainting")

Callback = Callable[[Any, int, Any, dict[str, Any]], dict[str, Any]]


@dataclass
class Pipelines:
    """The loaded pipeline, the image-to-image and inpainting pipelines around the same modules, the refiner.

    `from_pipe` builds a pipeline from another's modules: no weight is loaded or copied. They share one
    scheduler object too, which is why each call sets a fresh one (calls are serialised by the runner).
    """

    text: StableDiffusionXLPipeline
    image: StableDiffusionXLImg2ImgPipeline
    inpaint: StableDiffusionXLInpaintPipeline
    refiner: StableDiffusionXLImg2ImgPipeline | None
    base_scheduler: Any  # the loaded schedulers' configs, kept before any request replaces them
    refiner_scheduler: Any

    @classmethod
    def around(cls, base: StableDiffusionXLPipeline, refiner: StableDiffusionXLImg2ImgPipeline | None) -> Pipelines:
        from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLInpaintPipeline

        # from_pipe casts every module to `torch_dtype` (float32 when not given), in place: the base's own
        # fp16 weights would become fp32. Its dtype, given back, keeps them as they are.
        same = {"dtype": base.dtype, "add_watermarker": getattr(base, "watermark", None) is not None}
        with _quiet_diffusers():
            image = StableDiffusionXLImg2ImgPipeline.from_pipe(base, **same)
            inpaint = StableDiffusionXLInpaintPipeline.from_pipe(base, **same)
        for pipe in (image, inpaint):
            pipe.set_progress_bar_config(**getattr(base, "_progress_bar_config", {}))
        return cls(
            base,
            image,
            inpaint,
            refiner,
            base.scheduler.config,
            refiner.scheduler.config if refiner is not None else None,
        )


def run(
    pipes: Pipelines,
    job: Job,
    seeds: tuple[int, ...],
    request: Request,
    generators: list[Any],
    callback: Callback,
) -> Any:
    """The job's images for `seeds`, as a (n, 3, h, w) tensor in [0, 1]."""
    common: dict[str, Any] = {
        "prompt": job.prompt,
        "prompt_2": job.prompt_2,
        "negative_prompt": job.negative_prompt,
        "negative_prompt_2": job.negative_prompt_2,
        "num_inference_steps": request.steps,
        "guidance_scale": request.guidance_scale,
        "num_images_per_prompt": len(seeds),
        "generator": generators,
        "callback_on_step_end": callback,
    }
    # The refiner takes the base's latents: neither decoded nor encoded again (diffusers' docs, cog-sdxl).
    refining = request.refine != "none"
    handover: dict[str, Any] = {"output_type": "latent" if refining else "pt"}
    if request.refine == "expert_ensemble":
        handover["denoising_end"] = request.high_noise_frac
    if request.refine == "expert_ensemble":
        # parse_request counted the split on SDXL 1.0's scheduler config; a model loaded with another
        # (timestep_spacing "trailing") can leave the refiner none, and diffusers would then run it over
        # the whole schedule (timesteps[-0:]).
        check_split(
            split(
                schedulers.build(request.scheduler, pipes.base_scheduler),
                schedulers.build(request.scheduler, pipes.refiner_scheduler or pipes.base_scheduler),
                request.steps,
                request.high_noise_frac,
            ),
            request.scheduler,
            request.steps,
            request.high_noise_frac,
        )
    mode = request.mode
    if mode == "text-to-image":
        pipe: Any = pipes.text
        extra: dict[str, Any] = {"width": request.width, "height": request.height}
    elif mode == "image-to-image":
        pipe, extra = pipes.image, {"image": job.image, "strength": strength(request)}
    else:
        pipe = pipes.inpaint
        extra = {
            "image": job.image,
            "mask_image": job.mask,
            "width": request.width,
            "height": request.height,
            "strength": strength(request),
        }
    with fresh_scheduler(pipe, schedulers.build(request.scheduler, pipes.base_scheduler, seeds)):
        images = pipe(**common, **extra, **handover).images
    if not refining:
        return images
    refiner = pipes.refiner
    if refiner is None:  # parse_request refuses it first; this guards a caller that skipped it
        raise ValueError("refine needs a refiner: set SDXL_REFINER")
    if request.refine == "expert_ensemble":
        then: dict[str, Any] = {"denoising_start": request.high_noise_frac}
    else:
        then = {"strength": BASE_IMAGE_STRENGTH, "num_inference_steps": request.refine_steps or request.steps}
    with fresh_scheduler(refiner, schedulers.build(request.scheduler, pipes.refiner_scheduler, seeds)):
        return refiner(**{**common, **then}, image=images, output_type="pt").images


@contextlib.contextmanager
def fresh_scheduler(pipe: Any, scheduler: Any) -> Iterator[None]:
    """`pipe` with `scheduler` for one call, then its own again: the loaded pipeline stays as it was loaded."""
    loaded = pipe.scheduler
    pipe.scheduler = scheduler
    try:
        yield
    finally:
        pipe.scheduler = loaded


@contextlib.contextmanager
def _quiet_diffusers() -> Iterator[None]:
    # from_pipe's cast to the dtype the modules already have warns, once per module, that modules
    # "should be kept in float32: []": nothing is cast, and the server's log is no place for it.
    from diffusers.utils import logging as diffusers_logging

    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(level)


def strength(request: Request) -> float:
    """The request's strength, or its mode's default."""
    return request.strength if request.strength is not None else DEFAULT_STRENGTH[request.mode]
