"""Runs validated requests through a diffusers SDXL pipeline. Blocking: call it from a worker thread."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from sdxl_server import logs, modes, optimize
from sdxl_server.errors import TimeLimitExceeded
from sdxl_server.schema import REFINE_MODES, Job, Request

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
    from PIL.Image import Image

    from sdxl_server.lora.adapters import Adapter
    from sdxl_server.lora.slots import Slots
    from sdxl_server.optimize import CompileCache

StopCheck = Callable[[], bool]
Adapters = tuple[tuple["Adapter", float], ...]  # a request's LoRA adapters and their scales


class Generator:
    """One pipeline on one device; `generate` is not re-entrant (the runner serialises calls)."""

    def __init__(
        self,
        pipeline: StableDiffusionXLPipeline,
        *,
        optimize_level: str = "none",
        compile_cache: CompileCache | None = None,
        refiner: StableDiffusionXLImg2ImgPipeline | None = None,
        refiner_source: str = "",
        slots: Slots | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.slots = slots  # the LoRA slot on the base's modules (None: LoRA off)
        self.refiner = refiner
        self.refiner_source = refiner_source
        self.optimize_level = optimize_level
        self.compile_cache = compile_cache
        self.fast_sizes: frozenset[tuple[int, int]] | None = None  # after warm-up of a compiled level
        self.compiled_modes: tuple[str, ...] = ()  # the modes (and "refiner") warmed up at fast_sizes
        self._told: set[tuple[int, int]] = set()
        self._pipes: modes.Pipelines | None = None

    @property
    def pipes(self) -> modes.Pipelines:
        """Every mode's pipeline, built from the loaded one on first use (no weight copied)."""
        if self._pipes is None:
            self._pipes = modes.Pipelines.around(self.pipeline, self.refiner)
        return self._pipes

    @property
    def refines(self) -> tuple[str, ...]:
        """The values of `refine` this server serves."""
        return REFINE_MODES if self.refiner is not None else ("none",)

    @property
    def native_size(self) -> tuple[int, int]:
        """The size the model was trained at (1024x1024 for SDXL 1.0), the default width and height."""
        side = int(self.pipeline.default_sample_size * self.pipeline.vae_scale_factor)
        return side, side

    def generate(
        self, request: Request, should_stop: StopCheck = lambda: False, adapters: Adapters = ()
    ) -> list[list[Image]]:
        """Images for each job of the request, in order, with `adapters` in the LoRA slot (none: the base's
        images); raises TimeLimitExceeded when told to stop."""
        if self.slots is not None:
            self.slots.use(adapters)  # also with none: the slot may hold the last request's
        elif adapters:
            raise ValueError("LoRA adapters need the slot: set SDXL_LORA_SOURCES or SDXL_LORAS")
        size = (request.width, request.height)
        if self.fast_sizes is not None and size not in self.fast_sizes and size not in self._told:
            self._told.add(size)
            logs.log(
                "size not warmed up: it runs uncompiled",
                level=logging.WARNING,
                size=f"{size[0]}x{size[1]}",
                hint="add it to SDXL_WARMUP (sdxlctl: [model] warmup) to compile it at start",
            )
        return [self._run(job, request, should_stop) for job in request.jobs]

    def warm_up(self, sizes: tuple[tuple[int, int], ...]) -> None:
        """Run two steps of every mode (and the refiner) at each size: the first real request pays no
        first-call costs.

        The LoRA slot, when there is one, runs with them (zero): compiled code and graphs include it, and a
        swap changes only the values they read.

        On a compiled level these are the sizes that get compiled code and CUDA graphs: afterwards
        nothing more is compiled (`optimize.freeze`), and other sizes run uncompiled. The modes call the
        UNet with the same shapes, so image-to-image and inpainting mostly reuse text-to-image's compiled
        code; the VAE encoder they add runs uncompiled (one call per image, not one per step).
        """
        for width, height in sizes:
            for request in _warm_up_requests(width, height, refiner=self.refiner is not None):
                self.generate(request)
        # No sizes (SDXL_WARMUP=none): each size compiles on its first request, as asked.
        if not (sizes and optimize.compiles(self.optimize_level)):
            return
        frozen = optimize.freeze(self.pipeline)
        if self.refiner is not None:
            frozen = optimize.freeze(self.refiner) or frozen
        if frozen:
            self.fast_sizes = frozenset(sizes)
            self.compiled_modes = modes.MODES + (("refiner",) if self.refiner is not None else ())

    def _run(self, job: Job, request: Request, should_stop: StopCheck) -> list[Image]:
        # Compiled code is specialised to its shapes: one image at a time, the sizes warmed up are all
        # there is to compile, instead of another compile (minutes) and CUDA graph per image count.
        step = 1 if optimize.compiles(self.optimize_level) else len(job.seeds)
        images: list[Image] = []
        for start in range(0, len(job.seeds), step):
            images += self._batch(job, job.seeds[start : start + step], request, should_stop)
        return images

    def _batch(self, job: Job, seeds: tuple[int, ...], request: Request, should_stop: StopCheck) -> list[Image]:
        import torch

        # Seeds draw on a CPU generator: the same seed gives the same image on any GPU or none.
        generators = [torch.Generator("cpu").manual_seed(seed) for seed in seeds]

        def stop_between_steps(pipe: Any, step: int, timestep: Any, kwargs: dict[str, Any]) -> dict[str, Any]:
            if should_stop():
                # Over the time limit, or the client went away: the runner knows which and answers for it.
                of = " of the refiner" if pipe is self.refiner else ""
                raise TimeLimitExceeded(f"stopped after {step + 1} of {pipe.num_timesteps} steps{of}")
            return kwargs

        with torch.inference_mode():
            return to_pil(modes.run(self.pipes, job, seeds, request, generators, stop_between_steps))


def to_pil(images: Any) -> list[Image]:
    """diffusers' own conversion of [0, 1] pixels (x 255, round half to even, uint8), done where the
    pixels are: a quarter of the bytes cross to the host, and the host does no float arithmetic."""
    import PIL.Image
    import torch

    pixels = (images.float() * 255).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [PIL.Image.fromarray(frame) for frame in pixels]


def _warm_up_requests(width: int, height: int, *, refiner: bool) -> list[Request]:
    """Two steps of each mode at one size (and of the refiner's both ways): every UNet call a request
    at this size can make, whatever its mode."""
    import PIL.Image

    def request(image: Image | None = None, mask: Image | None = None, **refine: Any) -> Request:
        job = Job("warm-up", None, None, None, (0,), model_garden=False, image=image, mask=mask)
        return Request(
            (job,), steps=2, guidance_scale=5.0, width=width, height=height, output_format="jpeg", quality=90, **refine
        )

    gray = PIL.Image.new("RGB", (width, height), (128, 128, 128))
    mask = PIL.Image.new("L", (width, height), 255)
    requests = [request(), request(gray, strength=1.0), request(gray, mask, strength=1.0)]
    if refiner:
        requests += [
            request(refine="expert_ensemble", high_noise_frac=0.5),
            request(refine="base_image", refine_steps=4),  # int(4 x 0.3) = 1 refiner step
        ]
    return requests
