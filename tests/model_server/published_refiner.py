"""A fake stabilityai/stable-diffusion-xl-refiner-1.0: its published file names, the tiny refiner's weights.

The listing is the Hugging Face repository's as published (main, 2023-2025). Only the refiner's own
parts (model_index.json, unet/, scheduler/) hold what the tiny refiner saves, fp32 in the plain files and
fp16 in the `.fp16.` ones; the parts the server takes from the base (vae/, text_encoder_2/, tokenizer_2/)
and the single-file checkpoints hold bytes no loader can read, so fetching or loading one fails loudly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tests.model_server.published import tree

SDXL_REFINER = "stabilityai/stable-diffusion-xl-refiner-1.0"
REFINER_COMMIT = "5d4cfe854c9a9a87939ff3653551c2b3c99a4356"
REFINER_OWN = ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json")
REFINER_FP32 = ("unet/diffusion_pytorch_model.safetensors",)
REFINER_FP16 = ("unet/diffusion_pytorch_model.fp16.safetensors",)
# The base's own copies (the server shares the base's) and files no diffusers pipeline reads.
REFINER_SHARED = (
    "text_encoder_2/config.json",
    "text_encoder_2/model.fp16.safetensors",
    "text_encoder_2/model.safetensors",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "vae/config.json",
    "vae/diffusion_pytorch_model.fp16.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)
REFINER_UNUSED = (
    ".gitattributes",
    "01.png",
    "LICENSE.md",
    "README.md",
    "comparison.png",
    "pipeline.png",
    "sd_xl_refiner_1.0.safetensors",
    "sd_xl_refiner_1.0_0.9vae.safetensors",
)
REFINER_LISTING = REFINER_OWN + REFINER_FP32 + REFINER_FP16 + REFINER_SHARED + REFINER_UNUSED


def sdxl_refiner(work: Path, base: Any, layout: str = "fp16+fp32") -> dict[str, bytes]:
    """The published refiner's files, the tiny refiner (of the tiny `base`) in its own parts; layout as LAYOUTS."""
    import torch

    from sdxl_server.refiner import build_tiny_refiner

    plain, half = work / "refiner-plain", work / "refiner-fp16"
    if not plain.is_dir():
        build_tiny_refiner(base).save_pretrained(plain)
        # The UNet alone: casting the pipeline would cast the base's VAE and text encoder it shares.
        build_tiny_refiner(base).unet.to(torch.float16).save_pretrained(half / "unet", variant="fp16")
    saved = tree(plain)
    files = {name: saved[name] for name in REFINER_OWN}
    if layout in ("fp16+fp32", "fp32"):
        files.update({name: (plain / name).read_bytes() for name in REFINER_FP32})
    if layout in ("fp16+fp32", "fp16"):
        files.update({name: (half / name).read_bytes() for name in REFINER_FP16})
    for name in REFINER_SHARED + REFINER_UNUSED:
        if layout == "fp32" and ".fp16." in name:
            continue
        files[name] = f"never loaded: {name}".encode()
    return files
