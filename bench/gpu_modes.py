"""The generation modes bench/gpu.py measures on each variant's pipeline, besides text-to-image with Euler.

    img2img   image-to-image, strength 0.6, from an input image at the run's size (the VAE encoder runs too)
    heun      text-to-image with Heun, a second-order sampler: two UNet calls a step
    ensemble  the refiner as an expert ensemble: the base denoises until 0.8, the refiner does the rest
              (SDXL_REFINER=random at 1024x1024: the real refiner architecture with random weights)

Each runs through the model server's Generator, as a predict request would (its pipelines are built
from the variant's one with `from_pipe`, no weight copied, so the level applied to the base applies to
them); the refiner is loaded and optimised as the server's loader does it. The variant's own time is
the pipeline called directly: the Generator adds a scheduler and pixels to PIL (milliseconds).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

MODES = ("img2img", "heun", "ensemble")
PROMPT = "a red fox in the snow, golden hour"
STRENGTH = 0.6
HIGH_NOISE_FRAC = 0.8
# Seconds on an H200 at 1024x1024, beyond the calls themselves (timed as multiples of the variant's own
# text-to-image median): the VAE encoder's first call; building the refiner (2.3B parameters made on the
# device) and, on a compiling level, compiling its UNet (a guess from the base's: not measured yet).
FIXED_S = {"img2img": 5, "heun": 2, "ensemble": 10}
COMPILE_S = {"ensemble": 90}
# One image of each mode, in text-to-image images with Euler: 0.6 of the steps plus the VAE encoder; twice
# the UNet calls; the base's 23 of 30 steps and the refiner's 7 (its UNet has more attention at 64x64
# latents than the base's: taken as 1.5 of a base step, to be measured).
RELATIVE = {"img2img": 0.7, "heun": 2.0, "ensemble": 1.1}


def estimate_s(mode: str, pipeline_s: float, calls: int, compiles: bool) -> float:
    """Seconds `calls` images of `mode` take, first call included, given the variant's own image time."""
    return FIXED_S[mode] + (COMPILE_S.get(mode, 0) if compiles else 0) + RELATIVE[mode] * pipeline_s * calls


def input_image(size: int) -> Any:
    """The same image for every variant (so their outputs compare): smooth colour, not noise, like a photo."""
    import numpy as np
    import PIL.Image

    ramp = np.linspace(0, 255, size)
    pixels = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, ramp[::-1]) / 2, np.tile(ramp, (size, 1))], -1)
    return PIL.Image.fromarray(pixels.astype(np.uint8))


def build_refiner(base: Any, args: Any) -> Any:
    """The refiner the server loads for SDXL_REFINER=tiny (with the tiny base) or random (the real one)."""
    from sdxl_server.refiner import load_refiner
    from sdxl_server.sources import Placement

    source = "tiny" if args.model == "tiny" else "random"
    placement = Placement.resolve(args.device, args.dtype)
    return load_refiner(source, base, placement, cache_dir=Path(tempfile.mkdtemp(prefix="sdxl-refiner-")))


def request(mode: str, steps: int, size: int, seed: int = 1) -> Any:
    """The server's request for one image of `mode`, as parse_request makes it from the JSON body."""
    from sdxl_server.schema import Job, Request

    image = input_image(size) if mode == "img2img" else None
    job = Job(PROMPT, None, None, None, (seed,), model_garden=False, image=image)
    extras: dict[str, dict[str, Any]] = {
        "img2img": {"strength": STRENGTH},
        "heun": {"scheduler": "heun"},
        "ensemble": {"refine": "expert_ensemble", "high_noise_frac": HIGH_NOISE_FRAC},
    }
    extra = extras[mode]
    return Request(
        (job,), steps=steps, guidance_scale=5.0, width=size, height=size, output_format="jpeg", quality=90, **extra
    )


def run(generator: Any, mode: str, steps: int, size: int) -> tuple[Any, int]:
    """One image of `mode` through the server's Generator, and the denoising loop iterations (UNet
    calls with guidance) it ran, the base's and the refiner's together."""
    calls = 0

    def count() -> bool:  # the Generator asks once per step whether to stop
        nonlocal calls
        calls += 1
        return False

    images = generator.generate(request(mode, steps, size), count)
    return images[0][0], calls


def markdown(phases: dict[str, Any]) -> list[str]:
    """The modes' table: each mode at each variant, against its own text-to-image and the run's baseline."""
    rows = [
        (variant[8:], mode, entry)
        for variant, data in phases.items()
        if variant.startswith("variant ")
        for mode, entry in data.get("modes", {}).items()
    ]
    if not rows:
        return []
    lines = [
        "",
        "| variant | mode | UNet calls | first call s | median s | x variant's text-to-image | x baseline "
        "| x same mode at none | peak GiB | max abs diff vs none | CUDA graphs |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for variant, mode, entry in rows:
        if "error" in entry:
            lines.append(f"| {variant} | {mode} | {entry['error']} |")
            continue
        lines.append(
            f"| {variant} | {mode} | {entry['unet_calls']} | {entry['first_call_s']} | {entry['median_s']} | "
            f"{entry['ratio_to_text']} | {entry.get('ratio_to_baseline', '')} | "
            f"{entry.get('ratio_to_mode_baseline', '')} | {entry.get('peak_gib', '')} | "
            f"{entry.get('vs_mode_baseline', {}).get('max_abs', '')} | {graphs(entry)} |"
        )
    return lines


def graphs(entry: dict[str, Any]) -> str:
    """'base 1, refiner 1': the CUDA graphs captured so far by each UNet (or why they are off)."""
    return ", ".join(
        f"{name} {state['off_because'] or state['captured']}" for name, state in entry.get("cuda_graphs", {}).items()
    )
