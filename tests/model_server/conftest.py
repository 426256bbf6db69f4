"""Fixtures of the weights tests: fake published repos in Hub caches and a GCS emulator, the log, loopback only."""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdxl_server import logs
from tests.model_server import published
from tests.model_server.published import FP16_FIX, SDXL_BASE
from tests.servers import gcs_emulator


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("published")


@pytest.fixture(scope="module")
def hubs(work: Path) -> dict[str, Path]:
    """One Hugging Face cache per layout of the SDXL repo, each with the fp16-fix VAE repo."""
    caches = {}
    for layout in published.LAYOUTS:
        cache = work / f"hf-{layout}" / "hub"
        published.hub_cache(cache, SDXL_BASE, published.sdxl_base(work, layout), published.COMMIT)
        published.hub_cache(cache, FP16_FIX, published.fp16_fix(work), published.VAE_COMMIT)
        caches[layout] = cache
    return caches


class Lines(logging.Handler):
    """The fields of every sdxl_server log line, as the JSON log would show them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append({"message": record.getMessage(), **getattr(record, "fields", {})})

    def one(self, message: str) -> dict[str, Any]:
        found = [line for line in self.lines if line["message"] == message]
        assert len(found) == 1, self.lines
        return found[0]


_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_left_the_machine: list[str] | None = None  # while a test runs: every address outside it that was tried


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _left_the_machine is None:
        return
    if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in _LOOPBACK:
        _left_the_machine.append(f"connect {args[1]}")
        raise ConnectionRefusedError(f"a test may not leave the machine: {args[1]}")
    if event == "socket.getaddrinfo" and args[0] not in _LOOPBACK and args[0] is not None:
        _left_the_machine.append(f"resolve {args[0]}")


sys.addaudithook(_audit)  # hooks stay for the process: it does nothing outside tests that ask for loopback_only


@pytest.fixture
def loopback_only() -> Iterator[None]:
    """Fail a test whose process tried to reach anything but 127.0.0.1 (a Hub, a bucket, a DNS server)."""
    global _left_the_machine
    tried: list[str] = []
    _left_the_machine = tried
    try:
        yield
    finally:
        _left_the_machine = None
    assert not tried, tried


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    handler = Lines()
    logs.logger.addHandler(handler)
    level = logs.logger.level
    logs.logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logs.logger.removeHandler(handler)
        logs.logger.setLevel(level)


@pytest.fixture(scope="module")
def bucket(work: Path) -> Iterator[str]:
    """gs://weights/<layout> for each layout, and gs://weights/fp16-fix; STORAGE_EMULATOR_HOST set."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with gcs_emulator() as url, pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", url)
        client = storage.Client(project="test", credentials=AnonymousCredentials())
        weights = client.create_bucket("weights")
        for layout in published.LAYOUTS:
            published.upload(weights, layout, published.sdxl_base(work, layout))
        published.upload(weights, "fp16-fix", published.fp16_fix(work))
        yield "gs://weights"


@pytest.fixture
def fresh_compiler() -> Iterator[None]:
    """torch's compiler as a new process has it: graphs compiled by an earlier test of this worker (the same tiny
    blocks at the same shapes) would otherwise be reused, and a test counting what it compiles would count 0."""
    import torch

    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
