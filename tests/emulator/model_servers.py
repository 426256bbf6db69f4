"""What Vertex AI does with a deployed model's container, done with local processes.

The image cannot run here (no Docker engine), but its CMD can: `python -m sdxl_server` from this checkout,
with the container spec's environment and the AIP_* variables Vertex AI sets. Deviations, all for a
machine without containers: the port is a free host port (AIP_HTTP_PORT says which) and the server
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx


@dataclass
class Replica:
    """A running model container: where it answers."""

    url: str
    health_route: str
    predict_route: str
    process: subprocess.Popen[bytes] | None
    log_path: Path | None

    def state(self) -> str:
        """loading, ready or failed (with the container's reason in `reason()`)."""
        if self.process is not None and self.process.poll() is not None:
            return "failed"
        try:
            answer = httpx.get(self.url + self.health_route, timeout=2)
        except httpx.HTTPError:
            return "loading"
        if answer.status_code == 200:
            return "ready"
        with contextlib.suppress(ValueError):
            if answer.json().get("status") == "failed":
                return "failed"
        return "loading"

    def reason(self) -> str:
        if self.log_path is None:
            return ""
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-5:])
        return ""


class ModelServers:
    """Starts one container process per deployed model; or, with `forward_to`, uses a running server."""

    def __init__(self, forward_to: str | None = None, log_dir: Path | None = None) -> None:
        self.forward_to = forward_to
        self.log_dir = log_dir or Path(tempfile.mkdtemp(prefix="vertex-emulator-"))
        self.replicas: dict[str, Replica] = {}

    def start(
        self,
        deployed_model_id: str,
        model: dict[str, Any],
        endpoint_id: str,
        machine: dict[str, Any],
        project_number: str,
    ) -> Replica:
        """A deployed model's replica on an endpoint."""
        where = {"AIP_DEPLOYED_MODEL_ID": deployed_model_id, "AIP_ENDPOINT_ID": endpoint_id}
        return self._start(deployed_model_id, model, machine, project_number, where)

    def start_for_job(
        self, job_id: str, model: dict[str, Any], machine: dict[str, Any], project_number: str
    ) -> Replica:
        """A batch prediction job's replica, known as "batch-<job id>": no endpoint, so no endpoint variables."""
        return self._start(f"batch-{job_id}", model, machine, project_number, {})

    def _start(
        self, key: str, model: dict[str, Any], machine: dict[str, Any], project_number: str, where: dict[str, str]
    ) -> Replica:
        spec = model.get("containerSpec", {})
        health = spec.get("healthRoute") or "/health"
        predict = spec.get("predictRoute") or "/predict"
        if self.forward_to:
            replica = Replica(self.forward_to, health, predict, None, None)
        else:
            port = _free_port()
            env = {var["name"]: var.get("value", "") for var in spec.get("env", [])}
            env.update(
                {
                    "AIP_HTTP_PORT": str(port),
                    "AIP_HEALTH_ROUTE": health,
                    "AIP_PREDICT_ROUTE": predict,
                    "AIP_STORAGE_URI": model.get("artifactUri", ""),
                    "AIP_MODE": "PREDICTION",
                    "AIP_MODE_VERSION": "1.0.0",
                    **where,
                    "AIP_PROJECT_NUMBER": project_number,
                    "AIP_MACHINE_TYPE": machine.get("machineType", ""),
                    "AIP_ACCELERATOR_TYPE": str(machine.get("acceleratorType", "")),
                    "SDXL_HOST": "127.0.0.1",
                    "HF_HUB_OFFLINE": "1",
                }
            )
            log_path = self.log_dir / f"model-{key}.log"
            process = start_process([sys.executable, "-m", "sdxl_server"], {**os.environ, **env}, log_path)
            replica = Replica(f"http://127.0.0.1:{port}", health, predict, process, log_path)
        self.replicas[key] = replica
        return replica

    def get(self, deployed_model_id: str) -> Replica | None:
        return self.replicas.get(deployed_model_id)

    def stop(self, deployed_model_id: str) -> None:
        replica = self.replicas.pop(deployed_model_id, None)
        if replica is not None and replica.process is not None:
            stop_process(replica.process)

    def stop_all(self) -> None:
        for deployed_model_id in list(self.replicas):
            self.stop(deployed_model_id)


# Every container process the emulator started and has not stopped yet. Each runs in a session of its own (so
# that a signal reaches what it starts too), which also means nothing kills it when the test process ends: a
# run that never reaches its emulator's shutdown (a hung test, Ctrl-C) stops them at exit instead.
_running: set[subprocess.Popen[bytes]] = set()
_running_lock = threading.Lock()


def start_process(argv: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """A container's command as a process group of its own, its output in `log_path`; stopped at exit at the latest."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    with _running_lock:
        _running.add(process)
    return process


def stop_process(process: subprocess.Popen[bytes], grace_s: float = 15) -> None:
    """SIGTERM to the process group the emulator started, SIGKILL after `grace_s`.

    Only while the process is not yet reaped: its pid, which is its group's id, is ours until then (an exited
    one stays a zombie); once poll() or wait() has reaped it the number may be another process's."""
    with _running_lock:
        _running.discard(process)
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@atexit.register
def _stop_every_process() -> None:
    with _running_lock:
        left = list(_running)
    for process in left:
        stop_process(process, grace_s=5)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
