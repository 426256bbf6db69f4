"""Target vertex: the names every resource derives from the deployment's, and the model server's environment."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sdxlctl.config import Config, require_project
from sdxlctl.context import BAKED_FOLDER
from sdxlctl.gcp.iam import account_email
from sdxlctl.gpus import GpuOption
from sdxlctl.inputs import DEDICATED_LIMIT_BYTES, SHARED_LIMIT_BYTES
from sdxlctl.lora_sources import gs_folder
from sdxlctl.pricing import SPOT_ONLINE, machine_price
from sdxlctl.server_env import compile_cache as resolved_cache
from sdxlctl.server_env import server_env

if TYPE_CHECKING:
    from sdxlctl.gcp.session import Cloud

LABEL = "sdxlctl-deployment"
SHARED_TIME_LIMIT_S = 55.0  # a shared endpoint cuts a prediction at 60 s: the server answers 504 before that
OPERATION_TIMEOUT_S = 15 * 60  # creating/deleting an endpoint, model or service


@dataclass(frozen=True)
class Names:
    """Every resource name derives from the deployment name."""

    deployment: str
    project: str
    region: str
    repository: str
    bucket: str

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL: self.deployment, "managed-by": "sdxlctl"}

    def image(self, part: str, tag: str) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.repository}/{self.deployment}-{part}:{tag}"

    @property
    def service_id(self) -> str:
        return f"{self.deployment}-ui"

    @property
    def server_service_id(self) -> str:
        """The model server's Cloud Run service (target cloudrun)."""
        return f"{self.deployment}-server"

    @property
    def account_id(self) -> str:
        """The UI's service account."""
        return _account_id(self.deployment, "ui")

    @property
    def server_account_id(self) -> str:
        """The model server's service account (only when it writes a gs:// compile cache)."""
        return _account_id(self.deployment, "server")

    def email(self, account_id: str) -> str:
        return account_email(account_id, self.project)


def _account_id(deployment: str, role: str) -> str:
    """6-30 characters: a name too long is shortened, never the role (two roles must not collide), and ends
    in a digest of the whole name (two deployments named alike up to the cut must not share an account)."""
    suffix = f"-{role}-sa"
    if len(deployment) + len(suffix) <= 30:
        return deployment + suffix
    digest = hashlib.sha256(deployment.encode()).hexdigest()[:4]
    return f"{deployment[: 30 - len(suffix) - 5].rstrip('-')}-{digest}{suffix}"


def names(config: Config) -> Names:
    """Every name of the deployment; a config error without a project (never "...@.iam" or "gs://-sdxlctl")."""
    require_project(config)
    bucket = config.gcp.staging_bucket.removeprefix("gs://") or f"{config.gcp.project}-sdxlctl"
    return Names(config.name, config.gcp.project, config.gcp.region, config.gcp.artifact_repository, bucket)


def cloud(config: Config) -> Cloud:
    from sdxlctl.gcp.session import Cloud

    require_project(config)
    return Cloud.from_config(config)


def daily_cost(option: GpuOption, region: str, replicas: int, *, spot: bool = False) -> str:
    """A day of the replicas, as plans say it; on Spot VMs ([deploy] spot) at Spot rates, saying what it means."""
    hourly = machine_price(option.key, region, spot=spot)
    if hourly is None:
        return "no price in the table for this region (`sdxlctl cost`)"
    said = f"≈ {hourly * 24 * replicas:,.2f} USD/day for {replica_count(replicas, replicas)}"
    return f"Spot VMs, {said}: {SPOT_ONLINE}" if spot else said


def replica_count(low: int, high: int) -> str:
    """1 replica, 2 replicas, 1..3 replicas: as `sdxlctl cost` says it."""
    if low != high:
        return f"{low}..{high} replicas"
    return f"{low} replica" + ("" if low == 1 else "s")


def machine_of(option: GpuOption) -> str:
    return f"{option.machine_type} + {option.count} x {option.accelerator}"


def own_cache(config: Config) -> str:
    """The compile cache sdxlctl chooses for this deployment, whether in use now or not (a folder the
    user named is theirs to keep)."""
    return f"gs://{names(config).bucket}/compile-cache/{config.name}" if config.model.compile_cache == "auto" else ""


def compile_cache(config: Config) -> str:
    """SDXL_COMPILE_CACHE on Vertex AI; empty when the server keeps compiled code only on its own disk.

    By default a folder of the staging bucket shared by every replica and restart: the first replica
    to compile publishes the artifacts, and every later start downloads them instead of compiling.
    """
    return resolved_cache(config.model, own_cache(config))


def server_account(config: Config) -> str:
    """The model server's own service account: only needed to write a gs:// compile cache or to read a gs://
    refiner or LoRA adapters (the Model's one artifact URI, which Vertex AI's own account may read, is the
    base's weights)."""
    gs = (compile_cache(config), config.model.refiner, *lora_reads(config))
    if not any(uri.startswith("gs://") for uri in gs):
        return ""
    n = names(config)
    return n.email(n.server_account_id)


def bucket_of(uri: str) -> str:
    return uri.removeprefix("gs://").partition("/")[0]


def server_buckets(config: Config) -> set[str]:
    """Every bucket the model server's account may have been given a role on."""
    uris = (own_cache(config), config.model.compile_cache, config.model.source, config.model.refiner)
    return {bucket_of(uri) for uri in (*uris, *lora_reads(config)) if uri.startswith("gs://")}


def lora_reads(config: Config) -> list[str]:
    """The gs:// folders (ending in '/') the server reads LoRA adapters from: each prefix requests may name, and
    the folder of each adapter it loads at start (a file of the folder, or the folder itself). A file at a
    bucket's top is itself (no '/'): its folder would be all of the bucket, and the server reads that object only."""
    preloaded = [source for source in config.model.loras.values() if source.startswith("gs://")]
    folders = [prefix.rstrip("/") + "/" for prefix in config.model.lora_sources if prefix.startswith("gs://")]
    for source in preloaded:
        bucket, folder = gs_folder(source)
        folders.append(f"gs://{bucket}/{folder}/" if folder or source.endswith("/") else source)
    return list(dict.fromkeys(folders))


def container_env(config: Config) -> dict[str, str]:
    """The model server's environment in the Vertex AI Model's container spec."""
    model = config.model
    dedicated = config.deploy.endpoint == "dedicated"
    return server_env(
        model,
        auto_cache=own_cache(config),
        time_limit_s=model.time_limit_s if dedicated else min(model.time_limit_s, SHARED_TIME_LIMIT_S),
        byte_limit=DEDICATED_LIMIT_BYTES if dedicated else SHARED_LIMIT_BYTES,
        # gs:// weights travel as the Model's artifact URI, which Vertex AI's own account may read; a server
        # running as its own account reads them where they are, with the read access `deploy` grants it.
        with_source=not model.source.startswith("gs://") or bool(server_account(config)),
        baked_folder=BAKED_FOLDER,
    )


def artifact(config: Config) -> str:
    """The Model's artifact URI: gs:// weights that are not in the image (Vertex AI gives the server their copy)."""
    source = config.model.source
    return source if source.startswith("gs://") and not config.model.bake else ""
