"""GPU memory of the model server: the weights it loads (counted) and the working memory of a 1024x1024 image
(an estimate), against the GPU's. Arithmetic only; no cloud calls, no torch."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdxlctl.errors import DeployError
from sdxlctl.gpus import GpuOption

# Parameters of SDXL 1.0, counted from the configs the model server ships (containers/model/sdxl_server/configs:
# diffusers and transformers modules built on the meta device): the base's UNet, its two text encoders
# and its VAE; the refiner loads only its UNet and shares the base's VAE and text_encoder_2.
BASE_PARAMS = {"unet": 2.567e9, "text_encoder": 0.123e9, "text_encoder_2": 0.695e9, "vae": 0.084e9}
REFINER_UNET_PARAMS = 2.260e9
BYTES = {"auto": 2, "fp16": 2, "bf16": 2, "fp32": 4}  # auto is fp16 on a GPU
# Activations, the VAE decode's peak and the CUDA context for one 1024x1024 image in 16 bits: an estimate,
# not a measurement; 32 bits doubles it. More images per request need more.
WORKING_GB_16BIT = 3.0
TIGHT = 0.9  # above this share of the GPU's memory an estimate is too close to call


@dataclass(frozen=True)
class GpuMemory:
    """What the model server needs on one GPU, in GB (1e9 bytes), against what the GPU has."""

    option: GpuOption
    dtype: str
    base_gb: float
    refiner_gb: float  # 0 without a refiner
    working_gb: float

    @property
    def weights_gb(self) -> float:
        return self.base_gb + self.refiner_gb

    @property
    def total_gb(self) -> float:
        return self.weights_gb + self.working_gb

    @property
    def verdict(self) -> str:
        """fits; tight (over 90%: may run out); over (the estimate is above it); weights (cannot load at all)."""
        have = self.option.memory_gb
        if self.weights_gb > have:
            return "weights"
        if self.total_gb > have:
            return "over"
        return "tight" if self.total_gb > TIGHT * have else "fits"

    @property
    def summary(self) -> str:
        """GPU memory: ~11.5 GB weights (base 6.9 + refiner 4.5, fp16) + ~3 GB working, of 16 GB on T4."""
        weights = f"base {self.base_gb:.1f} + refiner {self.refiner_gb:.1f}, " if self.refiner_gb else ""
        return (
            f"~{self.weights_gb:.1f} GB weights ({weights}{'fp16' if self.dtype == 'auto' else self.dtype}) + "
            f"~{self.working_gb:g} GB working (an estimate), of {self.option.memory_gb:g} GB on "
            f"{self.option.key.upper()}"
        )

    @property
    def warning(self) -> str:
        """What to do about it: empty when it fits."""
        name = f"{self.option.memory_gb:g} GB of the {self.option.key.upper()}"
        fixes = "a GPU with more memory (`sdxlctl cost --compare`)"
        fixes += ", dtype fp16" if self.dtype == "fp32" else ""
        fixes += ", or [model] refiner = off" if self.refiner_gb else ""
        return {
            "fits": "",
            "tight": f"~{self.total_gb:.1f} GB is over {TIGHT:.0%} of the {name}: it may run out of memory; "
            f"if it does, choose {fixes}",
            "over": f"~{self.total_gb:.1f} GB is more than the {name}: it will likely run out of memory; "
            f"choose {fixes}",
            "weights": f"the weights alone (~{self.weights_gb:.1f} GB) are more than the {name}: choose {fixes}",
        }[self.verdict]

    def as_dict(self) -> dict[str, Any]:
        return {
            "estimate": True,
            "dtype": "fp16" if self.dtype == "auto" else self.dtype,
            "weights_gb": round(self.weights_gb, 2),
            "base_gb": round(self.base_gb, 2),
            "refiner_gb": round(self.refiner_gb, 2),
            "working_gb": self.working_gb,
            "total_gb": round(self.total_gb, 2),
            "gpu_gb": self.option.memory_gb,
            "verdict": self.verdict,
        }


def gpu_memory(option: GpuOption, *, dtype: str = "auto", refiner: bool = False) -> GpuMemory:
    """The model server's memory on `option` at `dtype`, with or without a refiner."""
    size = BYTES[dtype]
    base = sum(BASE_PARAMS.values()) * size / 1e9
    refined = REFINER_UNET_PARAMS * size / 1e9 if refiner else 0.0
    return GpuMemory(option, dtype, base, refined, WORKING_GB_16BIT * size / 2)


def require_fit(option: GpuOption, *, dtype: str, refiner: bool) -> GpuMemory:
    """The memory on `option`; a DeployError when the weights alone exceed the GPU: they are counted, not
    estimated, so that cannot work. Over the working memory's estimate it only warns (as the plan does)."""
    memory = gpu_memory(option, dtype=dtype, refiner=refiner)
    if memory.verdict == "weights":
        raise DeployError(f"GPU memory: {memory.summary}", hint=memory.warning)
    return memory
