"""Fixtures: the Google Cloud emulator and a GCS emulator on loopback, and the env that points sdxlctl at them."""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.emulator.app import create_app
from tests.emulator.core import DEPLOYER, World
from tests.emulator.identity import TOKEN_PATH, write_key_file
from tests.emulator.model_servers import ModelServers
from tests.servers import Server, gcs_emulator, serve_app

PROJECT, REGION = "demo-project", "europe-west4"
# Cloud Run instances in tests: no idle timer (it would race a test's "one instance after predict" on a loaded
# machine; tests scale to zero with Emulator.scale_to_zero, and one test covers the timer), and startup probes
# every 1 s instead of 10 s (the model's 60 tries stay a minute: time for a real process on a busy machine).
RUN_IDLE_S, RUN_PROBE_SCALE = 24 * 3600.0, 0.1
_KEYS = tempfile.TemporaryDirectory(prefix="sdxl-emulator-keys-")  # removed when the test process ends


@dataclass
class Emulator:
    url: str
    gcs_url: str
    world: World

    def env(self, **extra: str) -> dict[str, str]:
        """What makes sdxlctl talk to this emulator instead of Google: the deployer's key file (a project
        owner, world.owners) whose ID tokens come from this emulator, as gcloud's service-account key would."""
        return {
            "GOOGLE_APPLICATION_CREDENTIALS": str(self.key_file()),
            "SDXLCTL_TARGET": "vertex",
            "SDXLCTL_GCP_PROJECT": PROJECT,
            "SDXLCTL_GCP_REGION": REGION,
            "SDXLCTL_GCP_API_ENDPOINT": self.url,
            "SDXLCTL_GCP_POLL_INTERVAL_S": "0.05",
            "STORAGE_EMULATOR_HOST": self.gcs_url,
            **extra,
        }

    def key_file(self, email: str = DEPLOYER) -> Path:
        """A service account key file of `email` whose token_uri is this emulator's (one per emulator)."""
        digest = hashlib.sha256(f"{self.url} {email}".encode()).hexdigest()[:16]
        path = Path(_KEYS.name) / f"{email.split('@')[0]}-{digest}.json"
        return path if path.exists() else write_key_file(path, email, self.url + TOKEN_PATH)

    def fault(self, **spec: Any) -> None:
        httpx.post(f"{self.url}/_emulator/faults", json=spec).raise_for_status()

    def clear_faults(self) -> None:
        """The faults not used up yet end (a storm is over)."""
        httpx.delete(f"{self.url}/_emulator/faults").raise_for_status()

    def slow(self, operation_type: str, polls: int = 10_000) -> None:
        """Operations whose metadata type contains `operation_type` take `polls` polls: time to interrupt.
        slow("batchPredictionJobs") holds every batch job in RUNNING (sending nothing) until finish_batch_jobs()."""
        with self.world.lock:
            self.world.slow[operation_type] = polls

    def hurry(self) -> None:
        """Time passes: every running operation ends at its next poll."""
        with self.world.lock:
            self.world.hurry()

    def batch_jobs(self) -> list[dict[str, Any]]:
        """Every batch prediction job the emulator holds, as get answers it (v1beta1 fields included)."""
        return list(self.resources().get("batchPredictionJobs", []))

    def finish_batch_jobs(self) -> None:
        """Batch jobs held in RUNNING by slow("batchPredictionJobs") go on to their end."""
        with self.world.lock:
            self.world.slow.pop("batchPredictionJobs", None)

    def instances(self, service_id: str) -> int:
        """How many instances Cloud Run service `service_id` runs now (0: scaled to zero)."""
        return int(self._run(service_id)["running"])

    def instance_starts(self, service_id: str) -> int:
        """How many instances of `service_id` have started (cold starts)."""
        return int(self._run(service_id)["started"])

    def scale_to_zero(self, service_id: str) -> None:
        """The service's idle instance stops now, as after world.run_idle_s (min instances still keep theirs)."""
        httpx.post(f"{self.url}/_emulator/run/{service_id}/scale-to-zero").raise_for_status()

    def _run(self, service_id: str) -> dict[str, Any]:
        answer = httpx.get(f"{self.url}/_emulator/run/{service_id}")
        answer.raise_for_status()
        return dict(answer.json())

    def requests(self) -> list[dict[str, Any]]:
        return list(httpx.get(f"{self.url}/_emulator/requests").json())

    def resources(self) -> dict[str, list[dict[str, Any]]]:
        return dict(httpx.get(f"{self.url}/_emulator/resources").json())

    def storage(self) -> Any:
        """A real google-cloud-storage client on the GCS emulator (anonymous)."""
        from google.auth.credentials import AnonymousCredentials
        from google.cloud import storage

        return storage.Client(
            project=PROJECT, credentials=AnonymousCredentials(), client_options={"api_endpoint": self.gcs_url}
        )

    def bucket_roles(self, bucket: str, member: str) -> list[str]:
        """The roles `member` holds on `bucket`, as the bucket's IAM policy says."""
        policy = self.storage().bucket(bucket).get_iam_policy(requested_policy_version=3)
        return sorted(binding["role"] for binding in policy.bindings if member in binding["members"])

    def labelled(self, deployment: str = "sdxl") -> list[str]:
        """Names of every emulated resource that carries sdxlctl's label for `deployment`."""
        return [
            r.get("name", "")
            for table in self.resources().values()
            for r in table
            if r.get("labels", {}).get("sdxlctl-deployment") == deployment
        ]


@pytest.fixture(scope="session")
def gcs() -> Iterator[str]:
    with gcs_emulator() as url:
        yield url


@pytest.fixture
def emulator(gcs: str, plain_server: Server) -> Iterator[Emulator]:
    """A fresh emulator whose deployments forward to the shared tiny server (fast: no process per deploy)."""
    world = World(polls_to_finish=2, run_idle_s=RUN_IDLE_S, run_probe_scale=RUN_PROBE_SCALE)
    with serve_app(create_app(world, servers=ModelServers(forward_to=plain_server.url), gcs_url=gcs)) as server:
        yield Emulator(server.url, gcs, world)


@pytest.fixture
def real_emulator(gcs: str, tmp_path: Path) -> Iterator[Emulator]:
    """An emulator that runs each deployed model's container command (`python -m sdxl_server`) itself."""
    world = World(polls_to_finish=2, run_idle_s=RUN_IDLE_S, run_probe_scale=RUN_PROBE_SCALE)
    servers = ModelServers(log_dir=tmp_path)
    try:
        with serve_app(create_app(world, servers=servers, gcs_url=gcs)) as server:
            yield Emulator(server.url, gcs, world)
    finally:
        servers.stop_all()
