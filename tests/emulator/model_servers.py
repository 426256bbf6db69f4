"""What Vertex AI does with a deployed model's container, done with local processes.

The image cannot run here (no Docker engine), but its CMD can: `python -m sdxl_server` from this checkout,
with the container spec's environment and the AIP_* variables Vertex AI sets. Deviations, all for a
machine without containers: the port is a free host port (AIP_HTTP_PORT says which) and the server
listens on 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
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
                    "AIP_DEPLOYED_MODEL_ID": deployed_model_id,
                    "AIP_ENDPOINT_ID": endpoint_id,
                    "AIP_PROJECT_NUMBER": project_number,
                    "AIP_MACHINE_TYPE": machine.get("machineType", ""),
                    "AIP_ACCELERATOR_TYPE": str(machine.get("acceleratorType", "")),
                    "SDXL_HOST": "127.0.0.1",
                    "HF_HUB_OFFLINE": "1",
                }
            )
            log_path = self.log_dir / f"model-{deployed_model_id}.log"
            with log_path.open("wb") as log:
                process = subprocess.Popen(
                    [sys.executable, "-m", "sdxl_server"],
                    env={**os.environ, **env},
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            replica = Replica(f"http://127.0.0.1:{port}", health, predict, process, log_path)
        self.replicas[deployed_model_id] = replica
        return replica

    def get(self, deployed_model_id: str) -> Replica | None:
        return self.replicas.get(deployed_model_id)

    def stop(self, deployed_model_id: str) -> None:
        replica = self.replicas.pop(deployed_model_id, None)
        if replica is None or replica.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(replica.process.pid, signal.SIGTERM)
        try:
            replica.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(replica.process.pid, signal.SIGKILL)
            replica.process.wait()

    def stop_all(self) -> None:
        for deployed_model_id in list(self.replicas):
            self.stop(deployed_model_id)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
