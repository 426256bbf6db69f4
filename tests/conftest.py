"""Shared fixtures. Nothing here talks to anything but 127.0.0.1."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

# Rich fixes a console's width at creation when COLUMNS is set; pytest-xdist sets COLUMNS=80 in its workers,
# which would pin the CLI's consoles to 80 before any test chose a width. Tests set COLUMNS themselves.
os.environ.pop("COLUMNS", None)
# One compute thread per process, set before torch is imported (here and in every server a test starts,
# which inherits it): two workers and their servers share two cores, and each torch's pool of two threads
# spun against the others' (the model tests ran about twice as long on this machine).
os.environ.setdefault("OMP_NUM_THREADS", "1")

from sdxlctl.cli.app import run
from tests.servers import Server, server_process

pytest_plugins = ["tests.emulator_fixtures"]

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
def plain_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A tiny model server on the default routes, ready, for the session (the UI and the emulator use it)."""
    with server_process({"SDXL_MODEL": "tiny", "SDXL_WARMUP": "64x64"}, tmp_path_factory.mktemp("plain")) as server:
        server.wait_until("ready")
        yield server


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


@dataclass
class Result:
    code: int
    out: str
    err: str


Cli = Callable[..., Result]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """cli('predict', 'x', env={...}) -> Result; runs in tmp_path with no SDXLCTL_* from outside."""
    monkeypatch.chdir(tmp_path)
    for var in list(os.environ):
        if var.startswith("SDXLCTL_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("COLUMNS", "200")

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        for var, value in (env or {}).items():
            monkeypatch.setenv(var, value)
        capsys.readouterr()
        try:
            code = run(list(args))
        finally:
            for var in env or {}:
                monkeypatch.delenv(var)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke
