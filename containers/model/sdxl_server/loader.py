"""From settings to a ready Generator: the default `load` of the app."""

from __future__ import annotations

from pathlib import Path

from sdxl_server import optimize
from sdxl_server.generator import Generator
from sdxl_server.settings import Settings
from sdxl_server.sources import Placement, load_pipeline


def load_generator(settings: Settings) -> Generator:
    """Load the configured model source onto the configured device, with the configured fast path."""
    placement = Placement.resolve(settings.device, settings.dtype)
    level = optimize.resolve(settings.optimize, placement.device)
    if level in ("compile", "max"):
        optimize.use_cache(compile_cache_folder(settings))
    pipeline = load_pipeline(settings.model_source, placement, vae=settings.vae, cache_dir=settings.cache_dir)
    optimize.apply(pipeline, level)
    return Generator(pipeline, optimize_level=level)


def compile_cache_folder(settings: Settings) -> Path:
    """SDXL_COMPILE_CACHE as a local folder (a gs:// one is downloaded first)."""
    if settings.compile_cache.startswith("gs://"):
        from sdxl_server.gcs import download_folder

        return download_folder(settings.compile_cache, settings.cache_dir / "gcs")
    return Path(settings.compile_cache) if settings.compile_cache else settings.cache_dir / "compile"
