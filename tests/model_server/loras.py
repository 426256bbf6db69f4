"""Tiny LoRA files for the tiny base (sources.build_tiny_pipeline), made with peft in code, and the images
plain diffusers makes with them: what the server's adapters are tested against.

Each file is what a trainer publishes: diffusers' own layout (`save_lora_weights`, with the adapters'
configs as metadata, so alpha != rank survives) or kohya's (`lora_unet_...`/`lora_te1_...`, `.alpha` keys).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' default file name, in a folder or a Hub repo


def tiny_lora(
    folder: Path,
    *,
    seed: int,
    rank: int = 4,
    alpha: int | None = None,
    unet: bool = True,
    text_encoders: bool = True,
    unet_targets: tuple[str, ...] = UNET_TARGETS,
    magnitude: float = 0.3,
    weight_name: str = WEIGHT_NAME,
) -> Path:
    """A LoRA for the tiny base, its weights drawn from `seed` (large enough to change the image plainly);
    written as diffusers writes one. Returns the .safetensors file."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from sdxl_server.sources import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    generator = torch.Generator().manual_seed(seed)
    alpha = rank if alpha is None else alpha
    layers: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    parts = [("unet", pipe.unet, unet_targets)] if unet else []
    if text_encoders:
        parts += [(name, getattr(pipe, name), TEXT_TARGETS) for name in ("text_encoder", "text_encoder_2")]
    for name, model, targets in parts:
        config = LoraConfig(r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False)
        model.add_adapter(config)
        for parameter_name, parameter in model.named_parameters():
            if "lora_" in parameter_name:
                parameter.data = torch.randn(parameter.shape, generator=generator) * magnitude
        layers[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        metadata[f"{name}_lora_adapter_metadata"] = config.to_dict()
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(folder, weight_name=weight_name, **layers, **metadata)
    return folder / weight_name


def sd15_lora(folder: Path, *, rank: int = 4, weight_name: str = WEIGHT_NAME) -> Path:
    """A LoRA made for another base: SD 1.5's UNet layout (attention in the first down block, cross
    attention reading 768-wide CLIP states), in kohya's key format. SDXL has neither."""
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for block in ("down_blocks_0_attentions_0", "mid_block_attentions_0"):
        stem = f"lora_unet_{block}_transformer_blocks_0_attn2_to_k"
        tensors[f"{stem}.lora_down.weight"] = torch.randn(rank, 768)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(320, rank)
        tensors[f"{stem}.alpha"] = torch.tensor(float(rank))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / weight_name))
    return folder / weight_name


def diffusers_images(loras: list[tuple[Path, float]], **call: Any) -> Any:
    """What plain diffusers makes with `loras` (file, scale) on a fresh tiny base: `load_lora_weights` each,
    then `set_adapters` with the scales; `call` is the pipeline call (give a seeded CPU `generator`).
    Returns the images as a float array in [0, 1] (output_type "np")."""
    from sdxl_server.sources import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    names = []
    for index, (path, _scale) in enumerate(loras):
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=f"adapter{index}")
        names.append(f"adapter{index}")
    if names:
        pipe.set_adapters(names, adapter_weights=[scale for _path, scale in loras])
    return pipe(output_type="np", **call).images
