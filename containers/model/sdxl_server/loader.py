"""From settings to a ready Generator: the default `load` of the app."""

from __future__ import annotations

from sdxl_server.generator import Generator
from sdxl_server.settings import Settings
from sdxl_server.sources import Placement, load_pipeline


def load_generator(settings: Settings) -> Generator:
    """Load the configured model source onto the configured device."""
    placement = Placement.resolve(settings.device, settings.dtype)
    pipeline = load_pipeline(settings.model_source, placement, vae=settings.vae, cache_dir=settings.cache_dir)
    return Generator(pipeline)
