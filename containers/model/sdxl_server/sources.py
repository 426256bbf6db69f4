"""Where a pipeline comes from: tiny, random-sdxl, a local folder, a Hugging Face repo id, or gs://."""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdxl_server.errors import ModelLoadError
from sdxl_server.weights import REPO_ID

if TYPE_CHECKING:
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTokenizer

CONFIGS = Path(__file__).parent / "configs" / "sdxl-base-1.0"
FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"


@dataclass(frozen=True)
class Placement:
    """Where and in which precision the pipeline runs, resolved from SDXL_DEVICE / SDXL_DTYPE."""

    device: str
    dtype: torch.dtype

    @classmethod
    def resolve(cls, device: str = "auto", dtype: str = "auto") -> Placement:
        """'auto' means cuda with fp16 when a GPU is present, else cpu with fp32 (fp16 is slow on CPUs)."""
        import torch

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if dtype == "auto":
            dtype = "fp32" if device == "cpu" else "fp16"
        dtypes = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
        return cls(device=device, dtype=dtypes[dtype])


def load_pipeline(
    source: str,
    placement: Placement,
    *,
    vae: str = "auto",
    cache_dir: Path,
    hub_cache: Path | None = None,
    phases: dict[str, float] | None = None,
) -> StableDiffusionXLPipeline:
    """Build or load the SDXL pipeline named by `source` and put it on the device.

    `hub_cache`: the Hugging Face cache (None: HF_HOME's). `phases` receives fetch_s (listing and
    downloading), load_s (reading the weights) and move_s (to the device), for the start-up log.
    """
    started = time.monotonic()
    timed: dict[str, float] = {"fetch_s": 0.0}
    if source == "tiny":
        pipe = build_tiny_pipeline()
    elif source == "random-sdxl":
        pipe = build_random_sdxl(placement)
    elif source.startswith("gs://") or (source.strip() and Path(source).expanduser().is_dir()):
        pipe = _load_located(source, placement, vae, "model", cache_dir=cache_dir, hub_cache=hub_cache, timed=timed)
    elif REPO_ID.match(source) and not Path(source).exists():
        pipe = _load_located(
            source, placement, vae, FP16_FIX_VAE, cache_dir=cache_dir, hub_cache=hub_cache, timed=timed
        )
    else:
        raise ModelLoadError(
            f"SDXL_MODEL={source!r} is not 'tiny', 'random-sdxl', an existing folder, "
            "a gs://bucket/folder URI or a Hugging Face repo id (owner/name)"
        )
    pipe.set_progress_bar_config(disable=True)
    loaded = time.monotonic()
    pipe = pipe.to(placement.device, placement.dtype)
    if phases is not None:
        phases.update(
            fetch_s=round(timed["fetch_s"], 3),
            load_s=round(loaded - started - timed["fetch_s"], 3),
            move_s=round(time.monotonic() - loaded, 3),
        )
    return pipe


def byte_level_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP tokenizer that needs no download: every byte is a token (no merges), plus CLIP's specials.

    Real SDXL has a 49,408-token BPE vocabulary; this stands in for it in the tiny and random models,
    where the weights are random anyway and only the shapes matter.
    """
    from transformers import CLIPTokenizer

    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols])}
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    with tempfile.TemporaryDirectory() as folder:
        vocab_file, merges_file = Path(folder, "vocab.json"), Path(folder, "merges.txt")
        vocab_file.write_text(json.dumps(vocab))
        merges_file.write_text("#version: 0.2\n")
        return CLIPTokenizer(str(vocab_file), str(merges_file), pad_token="<|endoftext|>", model_max_length=77)


def _byte_symbols() -> list[str]:
    """GPT-2/CLIP's printable stand-in for each of the 256 bytes, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    extra = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(extra)) for b in range(256)]


def build_tiny_pipeline(seed: int = 0) -> StableDiffusionXLPipeline:
    """A tiny SDXL-architecture pipeline with deterministic random weights: the real code paths, in ms.

    Same UNet family (text_time added embeddings, two text encoders, cross attention), a VAE with the
    real 8x downscale, the real scheduler config. Native size 256x256.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = byte_level_clip_tokenizer()
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(text_config)
        text_encoder_2 = CLIPTextModelWithProjection(text_config)
        # both encoders' hidden states, concatenated; six time ids (sizes and crop)
        unet = tiny_unet(pooled=32, time_ids=6, cross_attention_dim=64)
        vae = AutoencoderKL(
            block_out_channels=(16, 16, 32, 32),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=8,
            sample_size=256,
            scaling_factor=0.13025,
            force_upcast=False,
        )
    scheduler = EulerDiscreteScheduler.from_pretrained(CONFIGS / "scheduler")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    ).to(torch.float32)


def tiny_unet(*, pooled: int, time_ids: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """The tiny models' UNet (build_tiny_pipeline's, refiner.build_tiny_refiner's): they differ only in what
    conditions them, the pooled text embeds and time ids, and the hidden states cross attention reads.
    Like SDXL, no attention at the highest resolution: a 1024x1024 request stays cheap on a CPU."""
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
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
        projection_class_embeddings_input_dim=pooled + time_ids * 8,
        cross_attention_dim=cross_attention_dim,
        norm_num_groups=8,
    )


def build_random_sdxl(placement: Placement) -> StableDiffusionXLPipeline:
    """The full SDXL 1.0 architecture (real configs, fp16-fix VAE) with random weights, made on the device.

    Random weights cost exactly the arithmetic of the real ones: this is what benchmarks time.
    """
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = byte_level_clip_tokenizer()

    def text_config(name: str) -> Any:
        config = json.loads((CONFIGS / name / "config.json").read_text())
        # The byte-level stand-in vocabulary is smaller; the embedding table shrinks, nothing else changes.
        config.update(
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        return CLIPTextConfig.from_dict(config)

    # Initialising 3.5B parameters on the CPU in fp32 takes minutes; on the target device, seconds.
    with torch.device(placement.device):
        previous = torch.get_default_dtype()
        torch.set_default_dtype(placement.dtype if placement.dtype.is_floating_point else previous)
        try:
            unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet"))
            vae = AutoencoderKL.from_config(AutoencoderKL.load_config(CONFIGS / "vae"))
            text_encoder = CLIPTextModel(text_config("text_encoder"))
            text_encoder_2 = CLIPTextModelWithProjection(text_config("text_encoder_2"))
        finally:
            torch.set_default_dtype(previous)
    scheduler = EulerDiscreteScheduler.from_pretrained(CONFIGS / "scheduler")
    return StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
        add_watermarker=False,
    )


# SDXL_VAE: 'auto' means the fp16-fix VAE for Hub models (the original VAE overflows in fp16) and the
# folder's own VAE for folders and gs:// (`python -m sdxl_server.fetch` already put the fp16-fix one there);
# 'model' keeps the pipeline's own; anything else is a VAE source (Hub id, folder or gs:// folder).
def _load_located(
    source: str,
    placement: Placement,
    vae: str,
    default_vae: str,
    *,
    cache_dir: Path,
    hub_cache: Path | None,
    timed: dict[str, float],
) -> StableDiffusionXLPipeline:
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    from sdxl_server import logs
    from sdxl_server.weights import damaged, locate, precision

    _quiet_progress_bars()
    choice = default_vae if vae == "auto" else vae
    wanted = precision(placement.dtype)
    extra: dict[str, Any] = {}
    vae_note = "the model's own"
    if choice != "model":
        try:
            fetching = time.monotonic()
            found = locate(choice, wanted, gcs_cache=cache_dir / "gcs", hub_cache=hub_cache, single_model=True)
            timed["fetch_s"] += time.monotonic() - fetching
            extra["vae"] = AutoencoderKL.from_pretrained(
                found.folder, dtype=placement.dtype, variant=found.selection.variant, local_files_only=True
            )
        except (ModelLoadError, OSError, ValueError) as exc:
            raise ModelLoadError(
                f"could not load the VAE {choice!r} (SDXL_VAE) from a folder, gs:// or the Hugging Face Hub: "
                f"{exc}. Set SDXL_VAE=model to use the model's own VAE"
            ) from exc
        vae_note = f"{choice} ({found.selection.label})"
    fetching = time.monotonic()
    located = locate(source, wanted, gcs_cache=cache_dir / "gcs", hub_cache=hub_cache, without=tuple(extra))
    timed["fetch_s"] += time.monotonic() - fetching
    selection = located.selection
    logs.log(
        "weights chosen",
        source=source,
        variant=selection.label,
        vae=vae_note,
        files=len(selection.files),
        revision=located.revision,
        note=selection.note or None,
    )
    try:
        return StableDiffusionXLPipeline.from_pretrained(
            located.folder,
            dtype=placement.dtype,
            variant=selection.variant,
            add_watermarker=False,
            local_files_only=True,
            **extra,
        )
    except Exception as exc:  # transformers lets a damaged file's SafetensorError through, naming no file
        if bad := damaged(located.folder, selection.files):
            raise ModelLoadError(f"could not load the pipeline in {located.folder}: {bad}; copy it again") from exc
        raise ModelLoadError(f"could not load the pipeline in {located.folder}: {type(exc).__name__}: {exc}") from exc


def _quiet_progress_bars() -> None:
    # tqdm bars on stderr are noise in a server's log (Cloud Logging stores each redraw as an entry)
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
