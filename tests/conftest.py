"""Shared fixtures. Nothing here talks to anything but 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Server, server_process

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")


@pytest.fixture(scope="session")
def tiny_pipeline():
    """The tiny SDXL pipeline, built once (read-only use: tests must not change it)."""
    from sdxl_server.sources import build_tiny_pipeline

    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def model_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One real `python -m sdxl_server` (tiny model, custom routes, queue of 2), ready, for the session."""
    env = {
        "SDXL_MODEL": "tiny",
        "AIP_HEALTH_ROUTE": "/h",
        "AIP_PREDICT_ROUTE": "/p",
        "SDXL_QUEUE_SIZE": "2",
        "SDXL_WARMUP": "64x64",
    }
    with server_process(env, Path(tmp_path_factory.mktemp("server"))) as server:
        server.wait_until("ready")
        yield server
