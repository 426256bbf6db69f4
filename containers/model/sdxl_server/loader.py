"""From settings to a ready Generator: the default `load` of the app."""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from sdxl_server import logs, optimize
from sdxl_server.generator import Generator
from sdxl_server.refiner import OFF, load_refiner
from sdxl_server.settings import Settings
from sdxl_server.sources import Placement, load_pipeline


def load_generator(settings: Settings) -> Generator:
    """Load the configured model source onto the configured device, with the configured fast path.

    Logs where the time went (import_s, fetch_s, load_s, move_s, refiner_s): a slow start says which phase
    to look at. SDXL_REFINER's refiner is loaded after the base, whose VAE and text_encoder_2 it shares.
    """
    started = time.monotonic()
    # Timed alone, a fixed cost of every start. diffusers and transformers import lazily: the classes, not
    # the packages, pull in the model code (~3 s more), which would otherwise be counted as loading weights.
    import torch  # noqa: F401
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer  # noqa: F401

    phases = {"import_s": round(time.monotonic() - started, 3)}
    placement = Placement.resolve(settings.device, settings.dtype)
    level = optimize.resolve(settings.optimize, placement.device)
    cache = use_compile_cache(settings, placement.device) if optimize.compiles(level) else None
    pipeline = load_pipeline(
        settings.model_source, placement, vae=settings.vae, cache_dir=settings.cache_dir, phases=phases
    )
    slots = None
    if settings.lora_enabled:
        from sdxl_server.lora.slots import Slots

        # Before optimizing and compiling: the slot's parameters are what compiled code reads, and a request's
        # adapters are copied into them in place. QKV fusion would read to_q/to_k/to_v's weights around them.
        slots = Slots.prepare(pipeline, rank=settings.lora_max_rank, memory=settings.lora_memory)
    optimize.apply(pipeline, level, fuse_qkv=slots is None)
    refiner = None
    refined: dict[str, Any] = {}  # the log's refiner fields, when there is one
    if settings.refiner != OFF:
        refining = time.monotonic()
        refiner = load_refiner(settings.refiner, pipeline, placement, cache_dir=settings.cache_dir)
        optimize.apply(refiner, level)
        refined = {"refiner": settings.refiner, "refiner_s": round(time.monotonic() - refining, 3)}
    logs.log(
        "model loaded",
        source=settings.model_source,
        device=placement.device,
        dtype=str(placement.dtype).removeprefix("torch."),
        import_s=phases["import_s"],
        fetch_s=phases["fetch_s"],
        load_s=phases["load_s"],
        move_s=phases["move_s"],
        **refined,
    )
    return Generator(
        pipeline,
        optimize_level=level,
        compile_cache=cache,
        refiner=refiner,
        refiner_source=settings.refiner if refiner is not None else "",
        slots=slots,
    )


def use_compile_cache(settings: Settings, device: str) -> optimize.CompileCache:
    """SDXL_COMPILE_CACHE in use: a local folder, or a gs:// one downloaded first (missing: a cold cache).

    A gs:// cache is shared, by replicas that may run on other GPUs or another image: each torch and
    kind of device keeps its artifacts in a sub-folder of its own (`optimize.cache_key`).
    """
    uri = settings.compile_cache
    if uri.startswith("gs://"):
        from sdxl_server.gcs import download_folder

        uri = f"{uri.rstrip('/')}/{optimize.cache_key(device)}"
        return optimize.use_cache(download_folder(uri, settings.cache_dir / "gcs", missing_ok=True), uri)
    return optimize.use_cache(Path(uri) if uri else settings.cache_dir / "compile")


def save_compile_cache(cache: optimize.CompileCache) -> None:
    """After warm-up: keep what was compiled for the next start, and publish it to a gs:// cache.

    The first replica of a deployment compiles and publishes; every later start (a restart, another
    replica, the next deployment of the same image) downloads the artifacts and skips compiling.
    Artifacts that grew (a shape compiled for the first time) are published again. Failing to publish costs
    only that: the server serves anyway.
    """
    saved = optimize.save_cache(cache)
    if not cache.uri or saved <= cache.loaded:
        return
    from sdxl_server.gcs import upload_file

    artifacts = cache.folder / optimize.ARTIFACTS
    try:
        upload_file(artifacts, cache.uri)
    except Exception as exc:
        logs.log("compile cache not published", level=logging.WARNING, uri=cache.uri, reason=str(exc))
        return
    logs.log("compile cache published", uri=cache.uri, bytes=artifacts.stat().st_size)
