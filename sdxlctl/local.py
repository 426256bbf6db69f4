"""The local target: model server and UI as background processes on this machine."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from sdxlctl.config import Config
from sdxlctl.errors import DeployError

HEALTH_TIMEOUT_S = 2.0  # the server answers health within a second even while generating
STOP_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class ProcessSpec:
    """How to start one local process; its digest tells whether a running one still matches the config."""

    kind: str
    module: str
    port: int
    env: dict[str, str]
    health_route: str = "/health"

    @property
    def digest(self) -> str:
        """Changes exactly when the process would be started differently."""
        blob = json.dumps([self.module, self.port, sorted(self.env.items())]).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def server_spec(config: Config) -> ProcessSpec:
    """`python -m sdxl_server` as the config asks, on loopback."""
    model = config.model
    env = {
        "SDXL_MODEL": model.source,
        "SDXL_VAE": model.vae,
        "SDXL_DTYPE": model.dtype,
        "SDXL_QUEUE_SIZE": str(model.queue_size),
        "SDXL_TIME_LIMIT": str(model.time_limit_s),
        "SDXL_MAX_IMAGES": str(model.max_images),
        "SDXL_OPTIMIZE": model.optimize,
        "SDXL_HOST": config.local.host,
        "AIP_HTTP_PORT": str(config.local.server_port),
    }
    if model.warmup:
        env["SDXL_WARMUP"] = ",".join(model.warmup)
    if model.compile_cache not in ("auto", "none"):  # else the server's own folder, kept between starts
        env["SDXL_COMPILE_CACHE"] = model.compile_cache
    return ProcessSpec("local-server", "sdxl_server", config.local.server_port, env)


NATIVE_SIZE = {"tiny": 256}  # the tiny test model's native size; everything else is SDXL's 1024


def ui_spec(config: Config, server_url: str) -> ProcessSpec:
    """`python -m sdxl_ui` pointed at the local model server, with defaults that fit its model."""
    side = str(NATIVE_SIZE.get(config.model.source, 1024))
    env = {
        "SDXL_ENDPOINT": server_url,
        "PORT": str(config.local.ui_port),
        "SDXL_UI_HOST": config.local.host,
        "SDXL_UI_WIDTH": side,
        "SDXL_UI_HEIGHT": side,
        "HF_HUB_OFFLINE": "1",
    }
    return ProcessSpec("local-ui", "sdxl_ui", config.local.ui_port, env, health_route="/")


def start(spec: ProcessSpec, log_path: Path) -> int:
    """Start the process detached from this terminal (Ctrl-C here does not reach it); return its pid."""
    if not port_is_free(spec.port):
        raise DeployError(
            f"port {spec.port} is already in use on this machine",
            hint="stop what uses it, or set [local] ports in sdxlctl.toml (or SDXLCTL_LOCAL_SERVER_PORT)",
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # No network for the Hub client unless the source needs it; never phone home.
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False", **spec.env}
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", spec.module],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return process.pid


def is_running(pid: int, module: str) -> bool:
    """Whether `pid` is alive and still the process we started (pids are reused)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return False  # alive, but another user's: not ours
    cmdline = Path(f"/proc/{pid}/cmdline")
    if cmdline.exists():
        try:
            return module in cmdline.read_bytes().decode(errors="replace")
        except OSError:
            return False
    return True


def is_zombie(pid: int) -> bool:
    """A child that exited but was not reaped still answers kill(pid, 0)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


def stop(pid: int, module: str, timeout_s: float = STOP_TIMEOUT_S) -> None:
    """SIGTERM the process group, wait, then SIGKILL; return once it is gone."""
    if not is_running(pid, module):
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        _reap(pid)
        if not is_running(pid, module) or is_zombie(pid):
            return
        time.sleep(0.05)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _reap(pid)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def port_is_free(port: int, host: str = "127.0.0.1") -> bool:
    """Nobody listens on host:port."""
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) != 0


def health(url: str) -> tuple[int, dict[str, object]]:
    """(status code, JSON body) of a health route; (0, {}) when nothing answers."""
    import httpx

    try:
        response = httpx.get(url, timeout=HEALTH_TIMEOUT_S)
    except httpx.HTTPError:
        return 0, {}
    try:
        body = response.json()
    except ValueError:
        body = {}
    return response.status_code, body if isinstance(body, dict) else {}


def tail(path: Path, lines: int = 5) -> str:
    """The last lines of a log file, for an error message."""
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
