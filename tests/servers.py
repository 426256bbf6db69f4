"""Real servers on 127.0.0.1 for tests: a `python -m sdxl_server` process, or an app in a uvicorn thread."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Server:
    """Where a started server answers."""

    url: str
    health_route: str = "/health"
    predict_route: str = "/predict"
    process: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None

    def health(self, timeout: float = 5.0) -> httpx.Response:
        return httpx.get(self.url + self.health_route, timeout=timeout)

    def predict(self, body: object, timeout: float = 120.0) -> httpx.Response:
        return httpx.post(self.url + self.predict_route, json=body, timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text() if self.log_path else ""

    def wait_until(self, status: str, timeout: float = 120.0) -> httpx.Response:
        """Poll health until its JSON status is `status`; fail with the server's log if it never is."""
        deadline = time.monotonic() + timeout
        last: httpx.Response | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"server exited with {self.process.returncode}:\n{self.log()}")
            with contextlib.suppress(httpx.TransportError):
                last = self.health()
                if last.json().get("status") == status:
                    return last
            time.sleep(0.1)
        raise AssertionError(f"health never said {status!r} (last: {last and last.text}):\n{self.log()}")


@contextlib.contextmanager
def server_process(env: Mapping[str, str], tmp_path: Path) -> Iterator[Server]:
    """`python -m sdxl_server` with `env` on a free loopback port; stopped (and checked gone) on exit."""
    port = free_port()
    full_env = {
        **os.environ,
        "SDXL_HOST": "127.0.0.1",
        "AIP_HTTP_PORT": str(port),
        "SDXL_CACHE_DIR": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        **env,
    }
    log_path = tmp_path / f"server-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "sdxl_server"], env=full_env, stdout=log, stderr=log)
    server = Server(
        url=f"http://127.0.0.1:{port}",
        health_route=full_env.get("AIP_HEALTH_ROUTE", "/health"),
        predict_route=full_env.get("AIP_PREDICT_ROUTE", "/predict"),
        process=process,
        log_path=log_path,
    )
    try:
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


@contextlib.contextmanager
def serve_app(app: object) -> Iterator[Server]:
    """Serve an ASGI app from a uvicorn thread on a free loopback port."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if time.monotonic() > deadline:
            raise AssertionError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield Server(url=f"http://127.0.0.1:{port}")
    finally:
        server.should_exit = True
        thread.join(timeout=10)


@contextlib.contextmanager
def gcs_emulator() -> Iterator[str]:
    """gcp-storage-emulator in memory on a free loopback port; yields its URL for STORAGE_EMULATOR_HOST."""
    from gcp_storage_emulator.server import create_server

    from tests.emulator import gcs_iam, gcs_names

    gcs_iam.install()  # bucket metadata on create, and IAM conditions only with uniform access, as GCS does
    gcs_names.install()  # any object name GCS takes (`a/../b` too), each kept apart
    port = free_port()
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
