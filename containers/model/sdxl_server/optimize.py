"""The fast path: lossless speed-ups of the SDXL pipeline, chosen by SDXL_OPTIMIZE.

    none     the pipeline as the 2023 deployment ran it (fp16, fp16-fix VAE, Euler, SDPA, eager)
    eager    + fused QKV projections + channels_last (no compilation; a few % on a GPU)
    compile  + torch.compile of the UNet's repeated transformer blocks (regional: compiles in seconds, and
             once per block type, not per block) and of the VAE decoder
    max      + torch.compile of the whole UNet (fastest to run; minutes to compile without a warm cache)
    auto     compile on a GPU, none on a CPU (inductor on a CPU is slow to compile and gains little)

Compiled code is cached in SDXL_COMPILE_CACHE (inductor's and Triton's caches, plus a portable
artifact file), so a restart with a warm cache does not compile again. The cache folder can be baked
into the image, kept on a volume, or restored from a gs:// folder at start.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

LEVELS = ("none", "eager", "compile", "max")
ARTIFACTS = "sdxl-compile-artifacts.bin"


def resolve(level: str, device: str) -> str:
    """The level `auto` means on this device."""
    if level != "auto":
        return level
    return "compile" if device.startswith("cuda") else "none"


def use_cache(folder: Path | None) -> bool:
    """Point inductor and Triton at `folder` and load its portable artifacts; True if any were there."""
    if folder is None:
        return False
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    artifacts = folder / ARTIFACTS
    if not artifacts.is_file():
        return False
    import torch

    try:
        torch.compiler.load_cache_artifacts(artifacts.read_bytes())
    except Exception:  # another torch or GPU wrote it: compile afresh, and overwrite it after warm-up
        return False
    return True


def save_cache(folder: Path | None) -> None:
    """After warm-up: write the portable artifacts of what was compiled, for the next start."""
    if folder is None:
        return
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is not None:
        data, _ = saved
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / (ARTIFACTS + ".partial")
        partial.write_bytes(data)
        partial.replace(folder / ARTIFACTS)


def apply(pipe: Any, level: str) -> None:
    """Make `pipe` faster at `level` (see the module's doc); outputs match `none` within fp16 noise."""
    if level not in LEVELS:
        raise ValueError(f"SDXL_OPTIMIZE={level!r}: expected auto, {', '.join(LEVELS)}")
    if level == "none":
        return
    import torch

    if not getattr(pipe, "_sdxl_fused", False):  # idempotent: eager, then compile, on one pipeline
        pipe.fuse_qkv_projections()  # one matmul for Q, K and V instead of three, in UNet and VAE attention
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        pipe._sdxl_fused = True
    if level == "eager":
        return
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    if level == "compile":
        pipe.unet.compile_repeated_blocks(fullgraph=True)
    else:
        # Autotuning every kernel: measured 263 s of compile on an H200 for the regional graph alone.
        inductor.coordinate_descent_tuning = True
        inductor.coordinate_descent_check_all_directions = True
        inductor.epilogue_fusion = False
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    pipe.vae.decoder = torch.compile(pipe.vae.decoder, fullgraph=True)
