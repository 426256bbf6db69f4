"""The samplers a request can choose (`parameters.scheduler`), as diffusers, cog-sdxl and A1111 name them.

A scheduler keeps state between steps (its step index, a solver's previous outputs, an SDE's Brownian
tree), so each request gets a fresh one, built from the loaded model's scheduler config: `from_config`
copies a dict, no weights, microseconds.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

# DPM++ SDE's Brownian tree ends at sigma_max as a Python float and is then asked for it as a float32
# tensor, a hair past the end: torchsde says "Should have tb<=t1" on every request, a line of raw text
# in a log of JSON lines about a rounding that changes nothing.
_TORCHSDE_ROUNDING = r"Should have t[ab]<=t1"


@dataclass(frozen=True)
class Sampler:
    """A diffusers scheduler class and the config it overrides; `unet_calls` per denoising step."""

    cls: str
    overrides: dict[str, Any] = field(default_factory=dict)
    unet_calls: int = 1  # 2: a second-order solver evaluates the UNet twice a step (twice the time)
    seeded: bool = False  # draws its noise from its own generator, seeded by `noise_sampler_seed`


# The names are the contract's (schema.SCHEDULER_NAMES, which a test keeps equal to these keys); the
# mapping is diffusers' "A1111 / k-diffusion" table and cog-sdxl's.
SCHEDULERS: dict[str, Sampler] = {
    "euler": Sampler("EulerDiscreteScheduler"),  # SDXL 1.0's own
    "euler_a": Sampler("EulerAncestralDiscreteScheduler"),
    "dpmpp_2m": Sampler("DPMSolverMultistepScheduler"),
    "dpmpp_2m_karras": Sampler("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    # k-diffusion's sample_dpmpp_sde: needs torchsde for its Brownian tree
    "dpmpp_sde_karras": Sampler("DPMSolverSDEScheduler", {"use_karras_sigmas": True}, unet_calls=2, seeded=True),
    "ddim": Sampler("DDIMScheduler"),
    "heun": Sampler("HeunDiscreteScheduler", unet_calls=2),
    "unipc": Sampler("UniPCMultistepScheduler"),
    "kdpm2": Sampler("KDPM2DiscreteScheduler", unet_calls=2),
}


def build(name: str | None, config: Any, seeds: tuple[int, ...] = ()) -> Any:
    """A fresh scheduler `name` from a model's scheduler `config`; None: the config's own class.

    `seeds`, one per image of the batch, seed a sampler that draws noise on its own: DPM++ SDE's
    Brownian tree would otherwise be seeded from torch's global generator, and the same seed would not
    give the same image twice.
    """
    import diffusers

    if name is None:
        cls_name, overrides = config["_class_name"], {}
    else:
        sampler = SCHEDULERS[name]
        cls_name, overrides = sampler.cls, dict(sampler.overrides)
        if sampler.seeded and seeds:
            overrides["noise_sampler_seed"] = list(seeds)
        if sampler.seeded:
            _quiet_torchsde()
    return getattr(diffusers, cls_name).from_config(config, **overrides)


def unet_calls(name: str | None) -> int:
    """UNet evaluations per denoising step of scheduler `name` (None: the model's own, Euler for SDXL)."""
    return 1 if name is None else SCHEDULERS[name].unet_calls


def _quiet_torchsde() -> None:
    # Installed when needed rather than at import: a catch_warnings around the import (pytest's, a
    # caller's) would drop it on exit. Added once: each change to the filter list is process-wide.
    if not any(entry[1] is not None and entry[1].pattern == _TORCHSDE_ROUNDING for entry in warnings.filters):
        warnings.filterwarnings("ignore", message=_TORCHSDE_ROUNDING, category=UserWarning, module="torchsde")
