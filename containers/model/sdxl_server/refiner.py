"""The SDXL refiner (SDXL_REFINER): its own UNet and scheduler, the base's VAE and second text encoder.

stabilityai/stable-diffusion-xl-refiner-1.0 ships a VAE and text_encoder_2 identical to the base's; loading
them again would cost ~1.5 GB of device memory for nothing. Only the UNet and the scheduler config come from
the refiner's source; the rest is the base pipeline's own module objects.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel

REFINER_CONFIGS = Path(__file__).parent / "configs" / "sdxl-refiner-1.0"


def build_tiny_refiner(base: StableDiffusionXLPipeline, seed: int = 0) -> StableDiffusionXLImg2ImgPipeline:
    """A tiny refiner for the tiny base (sources.build_tiny_pipeline): deterministic random UNet weights.

    It has the refiner's traits, which the code paths depend on: cross attention on text_encoder_2's hidden
    states only (the refiner has no first text encoder), and five time ids (the aesthetic score replaces
    the target size), so `requires_aesthetics_score`.
    """
    import torch
    from diffusers import UNet2DConditionModel

    hidden = base.text_encoder_2.config.hidden_size
    pooled = base.text_encoder_2.config.projection_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = UNet2DConditionModel(
            sample_size=32,
            block_out_channels=(32, 32, 64),
            layers_per_block=1,
            down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 2, 4),
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=8,
            transformer_layers_per_block=(1, 1, 2),
            projection_class_embeddings_input_dim=pooled + 5 * 8,  # pooled text embeds + 5 time ids
            cross_attention_dim=hidden,  # text_encoder_2 alone
            norm_num_groups=8,
        )
    unet = unet.to(device=base.device, dtype=base.unet.dtype)
    return assemble(base, unet, base.scheduler.config)


def assemble(
    base: StableDiffusionXLPipeline, unet: UNet2DConditionModel, scheduler_config: object
) -> StableDiffusionXLImg2ImgPipeline:
    """The refiner pipeline around `unet`, sharing the base's VAE, text_encoder_2 and tokenizer_2."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet,
        scheduler=EulerDiscreteScheduler.from_config(scheduler_config),
        requires_aesthetics_score=True,
        # The refiner's model_index.json says so: an empty negative prompt is encoded, not zeroed.
        force_zeros_for_empty_prompt=False,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
