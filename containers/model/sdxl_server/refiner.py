"""The SDXL refiner (SDXL_REFINER): its own UNet and scheduler, the base's VAE and second text encoder.

stabilityai/stable-diffusion-xl-refiner-1.0 ships a VAE and text_encoder_2 identical to the base's; loading
them again would cost ~1.5 GB of device memory for nothing. Only the UNet and the scheduler config come from
the refiner's source; the rest is the base pipeline's own module objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdxl_server.errors import ModelLoadError
from sdxl_server.weights import REPO_ID

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from diffusers.schedulers.scheduling_utils import SchedulerMixin

    from sdxl_server.sources import Placement

REFINER_CONFIGS = Path(__file__).parent / "configs" / "sdxl-refiner-1.0"
OFF = "off"
# The base supplies these: a published refiner's copies are never fetched.
SHARED = ("vae", "text_encoder_2", "tokenizer_2")
ACCEPTED = (
    "'off', 'tiny', 'random', an existing folder, a gs://bucket/folder URI or a Hugging Face repo id (owner/name)"
)


def load_refiner(
    source: str,
    base: StableDiffusionXLPipeline,
    placement: Placement,
    *,
    cache_dir: Path,
    hub_cache: Path | None = None,
) -> StableDiffusionXLImg2ImgPipeline:
    """The refiner named by SDXL_REFINER around `base` (already on the device), its UNet on the device.

    Raises ModelLoadError naming SDXL_REFINER, with the reason and what is accepted.
    """
    try:
        if source == "tiny":
            pipe = build_tiny_refiner(base)
        elif source == "random":
            pipe = build_random_refiner(base, placement)
        elif _located(source):
            pipe = _load_located(source, base, placement, cache_dir=cache_dir, hub_cache=hub_cache)
        else:
            raise ModelLoadError(f"it is not {ACCEPTED}")
        _check_fits(pipe.unet.config, base)
    except ModelLoadError as exc:
        raise ModelLoadError(f"SDXL_REFINER={source!r}: {exc}") from exc
    pipe.unet.to(placement.device, placement.dtype)
    return pipe


def _located(source: str) -> bool:
    """gs://, an existing folder, or a Hub repo id (a mistyped folder is not a question for the Hub)."""
    if source.startswith("gs://") or (source.strip() and Path(source).expanduser().is_dir()):
        return True
    return bool(REPO_ID.match(source)) and not Path(source).exists()


def build_tiny_refiner(base: StableDiffusionXLPipeline, seed: int = 0) -> StableDiffusionXLImg2ImgPipeline:
    """A tiny refiner for the tiny base (sources.build_tiny_pipeline): deterministic random UNet weights.

    It has the refiner's traits, which the code paths depend on: cross attention on text_encoder_2's hidden
    states only (the refiner has no first text encoder), and five time ids (the aesthetic score replaces
    the target size), so `requires_aesthetics_score`.
    """
    import torch
    from diffusers import EulerDiscreteScheduler

    from sdxl_server.sources import tiny_unet

    hidden = base.text_encoder_2.config.hidden_size
    pooled = base.text_encoder_2.config.projection_dim
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        unet = tiny_unet(pooled=pooled, time_ids=5, cross_attention_dim=hidden)  # text_encoder_2 alone
    unet = unet.to(device=base.device, dtype=base.unet.dtype)
    return assemble(base, unet, EulerDiscreteScheduler.from_config(base.scheduler.config))


def build_random_refiner(base: StableDiffusionXLPipeline, placement: Placement) -> StableDiffusionXLImg2ImgPipeline:
    """The real refiner UNet (stabilityai/stable-diffusion-xl-refiner-1.0's config), random weights, on the device.

    For benchmarks with SDXL_MODEL=random-sdxl: random weights cost exactly the arithmetic of the real ones.
    """
    import torch
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    config = UNet2DConditionModel.load_config(REFINER_CONFIGS / "unet")
    _check_fits(config, base)  # before minutes of building 2.3B parameters for a base it cannot serve
    # 2.3B parameters initialised on the CPU in fp32 take minutes; on the target device, seconds.
    with torch.device(placement.device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(placement.dtype if placement.dtype.is_floating_point else previous)
        try:
            unet = UNet2DConditionModel.from_config(config)
        finally:
            torch.set_default_dtype(previous)
    scheduler = EulerDiscreteScheduler.from_pretrained(REFINER_CONFIGS / "scheduler")
    index = json.loads((REFINER_CONFIGS / "model_index.json").read_text())
    return assemble(base, unet, scheduler, force_zeros_for_empty_prompt=index["force_zeros_for_empty_prompt"])


def assemble(
    base: StableDiffusionXLPipeline,
    unet: UNet2DConditionModel,
    scheduler: SchedulerMixin,
    *,
    force_zeros_for_empty_prompt: bool = False,
) -> StableDiffusionXLImg2ImgPipeline:
    """The refiner pipeline around `unet`, sharing the base's VAE, text_encoder_2 and tokenizer_2.

    `force_zeros_for_empty_prompt`: False as the refiner's model_index.json has it (an empty negative prompt
    is encoded, not zeroed).
    """
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=base.vae,
        text_encoder=None,
        text_encoder_2=base.text_encoder_2,
        tokenizer=None,
        tokenizer_2=base.tokenizer_2,
        unet=unet,
        scheduler=scheduler,
        # Five time ids (with the aesthetic score) or six (with the target size), as the UNet was trained.
        requires_aesthetics_score=_time_ids(unet.config, base) == 5,
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt,
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _time_ids(config: Mapping[str, Any], base: StableDiffusionXLPipeline) -> float:
    """How many time ids a UNet with `config` takes with the base's pooled text embeddings (refiner: 5)."""
    pooled = base.text_encoder_2.config.projection_dim
    if config.get("addition_embed_type") != "text_time" or not config.get("addition_time_embed_dim"):
        return 0
    return (config["projection_class_embeddings_input_dim"] - pooled) / config["addition_time_embed_dim"]


def _check_fits(config: Mapping[str, Any], base: StableDiffusionXLPipeline) -> None:
    """A UNet that cannot take the base's text_encoder_2 fails here, at start, not on the first request."""
    hidden = base.text_encoder_2.config.hidden_size
    width, time_ids = config.get("cross_attention_dim"), _time_ids(config, base)
    if width != hidden or time_ids != 5:
        raise ModelLoadError(
            f"its UNet is not a refiner for this SDXL_MODEL: it takes {width}-wide text states and {time_ids:g} "
            f"time ids; a refiner of this base takes {hidden} (text_encoder_2 alone) and 5 (with the aesthetic "
            "score). Use stabilityai/stable-diffusion-xl-refiner-1.0 or a fine-tune of it ('tiny' goes with "
            "SDXL_MODEL=tiny, 'random' with random-sdxl)"
        )


def _load_located(
    source: str, base: StableDiffusionXLPipeline, placement: Placement, *, cache_dir: Path, hub_cache: Path | None
) -> StableDiffusionXLImg2ImgPipeline:
    """The refiner's UNet and scheduler from a folder, gs:// or the Hub, through the base's weights machinery."""
    import diffusers
    from diffusers import UNet2DConditionModel

    from sdxl_server import logs
    from sdxl_server.sources import _quiet_progress_bars
    from sdxl_server.weights import damaged, locate, precision

    _quiet_progress_bars()
    fetching = time.monotonic()
    located = locate(
        source,
        precision(placement.dtype),
        gcs_cache=cache_dir / "gcs",
        hub_cache=hub_cache,
        without=SHARED,
        setting="SDXL_REFINER",
    )
    selection = located.selection
    logs.log(
        "refiner weights chosen",
        source=source,
        variant=selection.label,
        files=len(selection.files),
        revision=located.revision,
        fetch_s=round(time.monotonic() - fetching, 3),
        note=selection.note or None,
    )
    index = json.loads((located.folder / "model_index.json").read_text())
    if "unet" not in selection.weights or "scheduler" not in index:
        raise ModelLoadError(f"{source} has no unet/ and scheduler/ in its model_index.json: it is not a refiner")
    try:
        unet = UNet2DConditionModel.from_pretrained(
            located.folder,
            subfolder="unet",
            dtype=placement.dtype,
            variant=selection.weights["unet"],
            local_files_only=True,
        )
        scheduler_class: Any = getattr(diffusers, index["scheduler"][1])
        scheduler = scheduler_class.from_pretrained(located.folder, subfolder="scheduler", local_files_only=True)
    except Exception as exc:  # a damaged safetensors file surfaces as a SafetensorError naming no file
        if bad := damaged(located.folder, selection.files):
            raise ModelLoadError(f"could not load the refiner in {located.folder}: {bad}; copy it again") from exc
        raise ModelLoadError(f"could not load the refiner in {located.folder}: {type(exc).__name__}: {exc}") from exc
    force_zeros = bool(index.get("force_zeros_for_empty_prompt", True))  # diffusers' default when unsaid
    return assemble(base, unet, scheduler, force_zeros_for_empty_prompt=force_zeros)
