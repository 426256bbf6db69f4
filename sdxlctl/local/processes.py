"""Target local's processes: how the config becomes one, and starting, identifying and stopping it."""

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
from sdxlctl.server_env import server_env

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
    # compile_cache "auto": the server's own folder, kept between starts
    env = {**server_env(config.model), "SDXL_HOST": config.local.host, "AIP_HTTP_PORT": str(config.local.server_port)}
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
        "SDXL_UI_MAX_IMAGES": str(config.model.max_images),  # the server's SDXL_MAX_IMAGES: one limit
        "SDXL_UI_REFINER": "0" if config.model.refiner == "off" else "1",  # while the server's health cannot say
        "HF_HUB_OFFLINE": "1",
    }
    if config.model.loras:  # the adapter menu before the server's health lists them (and where it cannot)
        env["SDXL_UI_LORAS"] = ",".join(config.model.loras)
    return ProcessSpec("local-ui", "sdxl_ui", config.local.ui_port, env, health_route="/")


MARKER_VAR = "SDXLCTL_PROCESS"  # in each started process's environment: found again without the state file


def marker(home: Path, deployment: str, kind: str) -> str:
    """What marks a process as this folder's deployment's: two folders may both deploy `sdxl`."""
    return f"{home.resolve()}::{deployment}/{kind}"


def start(spec: ProcessSpec, log_path: Path, *, mark: str = "") -> int:
    """Start the process detached from this terminal (Ctrl-C here does not reach it); return its pid."""
    if not port_is_free(spec.port):
        key = "ui_port" if spec.kind == "local-ui" else "server_port"
        raise DeployError(
            f"port {spec.port} is already in use on this machine",
            hint=f"stop what uses it, or set [local] {key} in sdxlctl.toml (or SDXLCTL_LOCAL_{key.upper()})",
        )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    # No network for the Hub client unless the source needs it; never phone home.
    env = {**os.environ, "HF_HUB_DISABLE_TELEMETRY": "1", "GRADIO_ANALYTICS_ENABLED": "False", **spec.env}
    if mark:
        env[MARKER_VAR] = mark
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


# ---------------------------------------------------------------- which process is ours

HAVE_PROC = Path("/proc/self/stat").exists()
PORT_VARS = {"local-server": "AIP_HTTP_PORT", "local-ui": "PORT"}


@dataclass(frozen=True)
class Identity:
    """What tells a process apart from a later one that reuses its pid."""

    started: str  # boot id and start time in clock ticks (/proc/<pid>/stat field 22)
    cmdline: list[str]

    def details(self) -> dict[str, object]:
        return {"started": self.started, "cmdline": self.cmdline}


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def identity(pid: int) -> Identity | None:
    """The start time and command line of a live process; None when there is none (or it is a zombie)."""
    if not _valid_pid(pid):
        return None
    if not HAVE_PROC:
        return _identity_from_ps(pid)
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return None
    except OSError:
        return _identity_from_ps(pid)
    fields = stat.rsplit(")", 1)[-1].split()
    if len(fields) < 20 or fields[0] in ("Z", "X"):
        return None
    return Identity(f"{_boot_id()}:{fields[19]}", [part.decode(errors="replace") for part in raw.split(b"\0")[:-1]])


def identity_after_start(pid: int, timeout_s: float = 5.0) -> Identity | None:
    """The identity of a process just started: its command line reads empty until exec has settled."""
    deadline = time.monotonic() + timeout_s
    while True:
        now = identity(pid)
        if now is None or now.cmdline or time.monotonic() > deadline:
            return now
        time.sleep(0.01)


def _identity_from_ps(pid: int) -> Identity | None:
    """Where there is no /proc (macOS): ps knows the start time (to the second) and the command."""
    try:
        started = subprocess.run(["ps", "-o", "lstart=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
        command = subprocess.run(["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if started.returncode != 0 or not started.stdout.strip():
        return None
    return Identity(started.stdout.strip(), command.stdout.split())


def _valid_pid(pid: object) -> bool:
    """Never 0 (our own group), 1 (init), negative (every process) nor a non-number; never ourselves."""
    return isinstance(pid, int) and not isinstance(pid, bool) and pid > 1 and pid != os.getpid()


def environ(pid: int) -> dict[str, str]:
    """A process's environment where we may read it (our own uid), else empty."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    pairs = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if b"=" in item)
    return {key: value for key, _, value in pairs}


def owns(details: dict[str, object]) -> bool:
    """Whether the recorded pid is still the very process sdxlctl started: same start time and command line.

    A pid that is 0, 1, missing, ours, our process group's, or that now names another process is not.
    """
    pid = details.get("pid")
    if not _valid_pid(pid) or pid == os.getpgrp():
        return False
    assert isinstance(pid, int)
    now = identity(pid)
    if now is None:
        return False
    if "started" in details:
        same = now.started == details["started"] and now.cmdline == details.get("cmdline")
        # And the marker start() put in its environment: a record copied from another process, even
        # with its start time, names no process of ours. (Without /proc, ps cannot show environments.)
        mark = details.get("marker")
        marked = isinstance(mark, str) and bool(mark) and environ(pid).get(MARKER_VAR) == mark
        return same and (marked or not HAVE_PROC)
    # Recorded before start times were: `python -m <module>` leading its own session, on the recorded port.
    module, kind = details.get("module"), details.get("kind", "local-server")
    port_var = PORT_VARS.get(str(kind), "AIP_HTTP_PORT")
    return (
        now.cmdline[1:] == ["-m", str(module)]
        and _session(pid) == pid
        and environ(pid).get(port_var) == str(details.get("port"))
    )


def _session(pid: int) -> int:
    try:
        return os.getsid(pid)
    except OSError:
        return -1


def _group(pid: int) -> int:
    try:
        return os.getpgid(pid)
    except OSError:  # gone meanwhile
        return -1


def find_marked(mark: str) -> list[int]:
    """Pids of this user's live processes whose environment carries `mark` (Linux; elsewhere none).

    Only session leaders: start() makes the process lead its own session, and every child it starts
    (compile workers, say) inherits the marker but not the lead; stopping a child would leave the server.
    """
    found = []
    uid = os.getuid()
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            if entry.stat().st_uid != uid:
                continue
        except OSError:
            continue
        pid = int(entry.name)
        if (
            _valid_pid(pid)
            and environ(pid).get(MARKER_VAR) == mark
            and _session(pid) == pid
            and identity(pid) is not None
        ):
            found.append(pid)
    return sorted(found)


def stop(details: dict[str, object], timeout_s: float = STOP_TIMEOUT_S) -> bool:
    """SIGTERM the recorded process (its group when it leads one), wait, then SIGKILL.

    Signals nothing unless `owns(details)`; returns whether there was a process of ours to stop.
    """
    if not owns(details):
        return False
    pid = details["pid"]
    assert isinstance(pid, int)
    first = identity(pid)
    if first is None:  # gone since owns() looked
        return True
    # start() makes each process lead its own session and group: the group takes its children along.
    # One that leads no group of its own gets the signal alone, never the group it shares with others.
    group = _session(pid) == pid and _group(pid) == pid and pid != os.getpgrp()
    _signal(pid, signal.SIGTERM, group=group)
    if _ended(pid, first, timeout_s):
        return True
    _signal(pid, signal.SIGKILL, group=group)
    _ended(pid, first, 5.0)  # SIGKILL cannot be refused; the kernel still takes a moment
    return True


def _ended(pid: int, first: Identity, timeout_s: float) -> bool:
    """Whether the process `first` names is gone (or a zombie) within the time; its start time says which
    process a pid is. Not owns(): an exiting process's command line reads empty while it still exists."""
    deadline = time.monotonic() + timeout_s
    while True:
        _reap(pid)
        now = identity(pid)
        if now is None or now.started != first.started:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def _signal(pid: int, signum: int, *, group: bool) -> None:
    with contextlib.suppress(ProcessLookupError):
        if group:
            os.killpg(pid, signum)
        else:
            os.kill(pid, signum)


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def is_running(pid: int, module: str) -> bool:
    """Whether `pid` is alive and its command line names `module` (a check for tests and old records)."""
    now = identity(pid)
    return now is not None and any(module in part for part in now.cmdline)


def is_zombie(pid: int) -> bool:
    """A child that exited but was not reaped still answers kill(pid, 0)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


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
