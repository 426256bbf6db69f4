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


def kohya_lora(source: Path, folder: Path, *, layers_per_block: int = 1, weight_name: str = WEIGHT_NAME) -> Path:
    """`source` (a diffusers- or peft-layout file, e.g. tiny_lora's) as kohya's sd-scripts write an SDXL LoRA: SGM
    block names (`lora_unet_input_blocks_4_1_...`, as A1111 and ComfyUI share them), `lora_te1_text_model_...`,
    lora_down/lora_up and one `.alpha` per module (the source's lora_alpha; edit the file for others).
    `layers_per_block` is the base UNet's (the tiny base: 1; SDXL: 2)."""
    import json
    import re

    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(source), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (safe_open is no dict)
        meta = json.loads((handle.metadata() or {}).get("lora_adapter_metadata", "{}"))
    per_block = layers_per_block + 1
    out: dict[str, Any] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        match = re.fullmatch(r"(.*)\.(?:lora\.|lora_linear_layer\.|lora_)(down|up|A|B)\.weight", rest)
        assert match, key
        parts, side = match[1].split("."), {"A": "down", "B": "up"}.get(match[2], match[2])
        if component == "unet":
            if parts[0] == "down_blocks":
                parts[:4] = ["input_blocks", str(1 + int(parts[1]) * per_block + int(parts[3])), "1"]
            elif parts[0] == "up_blocks":
                parts[:4] = ["output_blocks", str(int(parts[1]) * per_block + int(parts[3])), "1"]
            elif parts[0] == "mid_block":
                parts[:3] = ["middle_block", "1"]
            stem = "lora_unet_" + "_".join(parts)
        else:
            parts = parts if parts[0] == "text_model" else ["text_model", *parts]
            stem = ("lora_te1_" if component == "text_encoder" else "lora_te2_") + "_".join(parts)
        out[f"{stem}.lora_{side}.weight"] = tensor
        rank = tensor.shape[0] if side == "down" else tensor.shape[1]  # no metadata: alpha = rank, diffusers' rule
        out[f"{stem}.alpha"] = torch.tensor(float(meta.get(f"{component}.lora_alpha", rank)))
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, str(folder / weight_name))
    return folder / weight_name


def tiny_dora(folder: Path, *, seed: int, rank: int = 4, weight_name: str = WEIGHT_NAME) -> Path:
    """A DoRA adapter (peft's use_dora: a magnitude vector per module) for the tiny base's UNet, saved as
    diffusers saves one; diffusers loads it with a different formula than B @ A."""
    import torch
    from diffusers import StableDiffusionXLPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig, get_peft_model_state_dict

    from sdxl_server.sources import build_tiny_pipeline

    unet = build_tiny_pipeline().unet
    generator = torch.Generator().manual_seed(seed)
    config = LoraConfig(r=rank, lora_alpha=rank, target_modules=list(UNET_TARGETS), use_dora=True)
    unet.add_adapter(config)
    for name, parameter in unet.named_parameters():
        if "lora_" in name:
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.3
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    folder.mkdir(parents=True, exist_ok=True)
    StableDiffusionXLPipeline.save_lora_weights(
        folder, weight_name=weight_name, unet_lora_layers=layers, unet_lora_adapter_metadata=config.to_dict()
    )
    return folder / weight_name
