"""Seconds per image on each GPU: measured at 1024x1024 where known, else from the work per image; other
sizes by their work (bench/flops.py); with the refiner's `refine` modes and the samplers that call the UNet
twice a step. Estimates, no cloud calls."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from itertools import pairwise
from pathlib import Path
from typing import Any

from sdxlctl.inputs import SECOND_ORDER


@cache
def _latency() -> dict[str, Any]:
    return json.loads((Path(__file__).parent / "latency.json").read_text())


@dataclass(frozen=True)
class Latency:
    seconds: float
    measured: bool
    lower_bound: bool
    source: str


SDXL_PIXELS = 1024 * 1024  # the size every measurement and price per image is stated at


def _work_by_size(pixels: int) -> dict[str, float]:
    """TFLOP of a base step, a refiner step and the VAE decode at `pixels`, read from bench/flops.py's table of
    square sides: linear between two rows by pixel count; below the smallest and above the largest in
    proportion to the pixels (the server takes 64..2048 a side, the table 256..2048)."""
    rows = sorted(_latency()["work_tflop"]["by_side"]["rows"], key=lambda row: row["side"])
    parts = ("per_step", "refiner_per_step", "vae_decode")
    for low, high in pairwise(rows):
        a, b = low["side"] ** 2, high["side"] ** 2
        if a <= pixels <= b:
            t = (pixels - a) / (b - a)
            return {part: low[part] + t * (high[part] - low[part]) for part in parts}
    edge = rows[0] if pixels < rows[0]["side"] ** 2 else rows[-1]
    return {part: edge[part] * pixels / edge["side"] ** 2 for part in parts}


def latency(
    key: str,
    steps: int = 30,
    level: str = "auto",
    *,
    unet_calls: int = 1,
    refiner_steps: int = 0,
    pixels: int = SDXL_PIXELS,
) -> Latency:
    """Seconds per image of `pixels` (width x height) at `steps` and SDXL_OPTIMIZE `level`: measured at
    1024x1024 where known, else estimated from the TFLOP rate; a level other than compile scales by what the
    H200 measured; another size by its work (each part: UNet step, refiner step, VAE decode, in proportion to
    its FLOPs at that size), at the 1024x1024 efficiency.

    `unet_calls`: 2 for the samplers that call the UNet twice a step; `refiner_steps`: refiner UNet steps on
    top of the base's `steps`, each its share of the work by the two UNets' FLOP counts."""
    data = _latency()
    row = data["gpus"][key]
    work = data["work_tflop"]
    sized, at_1024 = _work_by_size(pixels), _work_by_size(SDXL_PIXELS)
    step, refiner, vae = (
        work[part] * sized[part] / at_1024[part] for part in ("per_step", "refiner_per_step", "vae_decode")
    )
    image = step * steps * unet_calls + refiner * refiner_steps + vae
    scale = image / (work["per_step"] * 30 + work["vae_decode"])
    lower_bound = bool(row.get("lower_bound", False))
    if not lower_bound:  # the one lower bound is the 2023 (eager) pipeline's already
        scale *= data["levels"]["compile" if level == "auto" else level]
    if "seconds" in row:
        base = float(row["seconds"])
    else:
        base = (work["per_step"] * 30 + work["vae_decode"]) / (row["tflops"] * data["efficiency"]["value"])
    measured = bool(row["measured"]) and pixels == SDXL_PIXELS  # another size is scaled from the measurement
    return Latency(base * scale, measured, lower_bound, str(row["source"]))


def seconds_per_image(key: str, steps: int = 30, level: str = "auto", pixels: int = SDXL_PIXELS) -> float:
    return latency(key, steps, level, pixels=pixels).seconds


SHARED_LIMIT_S = 60.0  # a shared endpoint's request time limit: an image past it is refused, so it has no price


def price_per_1000(row: Latency, usd_per_hour: float) -> float | None:
    """USD per 1000 images at one replica's full load; None past the shared endpoint's limit (refused)."""
    return None if row.seconds >= SHARED_LIMIT_S else usd_per_hour * row.seconds / 3.6


# heun and kdpm2 take a second UNet call each step (second order); dpmpp_sde_karras's SDE solver too.
TWO_PASS_SAMPLERS = SECOND_ORDER
HIGH_NOISE_FRAC = 0.8  # expert_ensemble's default hand-over: the base denoises the first 80%
BASE_IMAGE_STRENGTH = 0.3  # base_image: the refiner re-noises the finished image this far


@dataclass(frozen=True)
class Refining:
    """Seconds per 1024x1024 image with each `refine` mode, and the UNet steps behind them."""

    steps: int
    ensemble: Latency  # expert_ensemble: the base's first steps, the refiner's last, one VAE decode
    ensemble_split: tuple[int, int]  # (base steps, refiner steps)
    base_image: Latency  # base_image: all base steps, then int(0.3 x refine_steps) refiner steps
    base_image_steps: int  # the refiner's

    def as_dict(self, usd_per_hour: float) -> dict[str, Any]:
        def mode(row: Latency, **steps: int) -> dict[str, Any]:
            price = price_per_1000(row, usd_per_hour)
            return {
                "seconds_per_image": round(row.seconds, 2),
                "seconds_lower_bound": row.lower_bound,
                "usd_per_1000_images": None if price is None else round(price, 3),
                **steps,
            }

        base, refined = self.ensemble_split
        return {
            "estimate": True,
            "expert_ensemble": mode(self.ensemble, base_steps=base, refiner_steps=refined),
            "base_image": mode(self.base_image, base_steps=self.steps, refiner_steps=self.base_image_steps),
        }


def ensemble_split(steps: int, high_noise_frac: float = HIGH_NOISE_FRAC) -> tuple[int, int]:
    """expert_ensemble's (base, refiner) steps with SDXL's own sampler, as diffusers splits them: the base runs
    the timesteps at or above round(1000 x (1 - f)), the refiner those below. SDXL's Euler spaces them
    'leading' (1000 // steps apart, from 1), so at 30 steps and 0.8 that is 23 + 7, not 24 + 6. The server's
    sdxl_server.steps.ensemble_split computes it from diffusers itself; a test keeps the two equal."""
    cutoff = round(1000 - high_noise_frac * 1000)
    base = sum(i * (1000 // steps) + 1 >= cutoff for i in range(steps))
    base = max(1, min(steps - 1, base))  # each model gets a step at least (the server refuses less)
    return base, steps - base


def refining(
    key: str, steps: int = 30, level: str = "auto", high_noise_frac: float = HIGH_NOISE_FRAC, pixels: int = SDXL_PIXELS
) -> Refining:
    """Each `refine` mode's time per image at the defaults a request gets (refine_steps = steps)."""
    base_steps, _ = ensemble_split(steps, high_noise_frac)
    ensemble = latency(key, base_steps, level, refiner_steps=steps - base_steps, pixels=pixels)
    after = max(1, int(steps * BASE_IMAGE_STRENGTH))  # as diffusers' img2img counts them: int(steps x strength)
    base_image = latency(key, steps, level, refiner_steps=after, pixels=pixels)
    return Refining(steps, ensemble, (base_steps, steps - base_steps), base_image, after)


def mode_lines(refined: Refining | None, two_pass: Latency | None, usd_per_hour: float) -> list[str]:
    """`cost`'s lines for the refiner's modes (when one is set) and for the two-pass samplers."""
    lines = []
    if refined is not None:
        base, steps = refined.ensemble_split
        modes = [
            (f"expert_ensemble {base}+{steps} steps", refined.ensemble),
            (f"base_image +{refined.base_image_steps} refiner steps", refined.base_image),
        ]
        said = ", ".join(_timed(mode, row, usd_per_hour) for mode, row in modes)
        lines.append(f"with the refiner (estimated): {said}")
    if two_pass is not None:
        over = "over " if two_pass.lower_bound else ""
        lines.append(
            f"samplers {', '.join(TWO_PASS_SAMPLERS)} call the UNet twice a step: "
            f"{over}{two_pass.seconds:.1f} s/image (estimated)"
        )
    return lines


def _timed(mode: str, row: Latency, usd_per_hour: float) -> str:
    """A mode's time and price: expert_ensemble 23+7 steps 8.6 s/image (2.35 USD per 1000); none past 60 s."""
    usd = price_per_1000(row, usd_per_hour)
    price = f"past the {SHARED_LIMIT_S:g} s limit" if usd is None else f"{usd:,.2f} USD per 1000"
    return f"{mode} {'over ' if row.lower_bound else ''}{row.seconds:.1f} s/image ({price})"
