"""LoRA steps that reach out: `sdxlctl lora push` (a checked file to the first gs:// prefix of
[model] lora_sources) and what the local server says it has cached, for `sdxlctl status`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxlctl import client, loras
from sdxlctl.config import Config
from sdxlctl.steps import ResourceStatus


@dataclass(frozen=True)
class Pushed:
    """Where `lora push` put the file, and whether it had to (the same bytes are never sent twice)."""

    source: str
    uploaded: bool
    size: int
    sha256: str


def push(config: Config, path: Path, *, sent: Callable[[int, int], None] = lambda done, total: None) -> Pushed:
    """Check `path` locally, then upload it content-addressed under the first gs:// prefix; `sent(done, total)`."""
    from sdxlctl.gcp.session import Cloud
    from sdxlctl.gcp.storage import Storage

    # Before reading a large file: the config may be wrong
    prefix = loras.first_gs_prefix(config.model.lora_sources, config.path)
    adapter = loras.check_file(path)
    bucket, _, folder = prefix.removeprefix("gs://").partition("/")
    name = folder + adapter.object_name
    gcp = config.gcp  # an upload needs no project of its own; the bucket says where
    cloud = Cloud(gcp.project or "-", gcp.region, gcp.api_endpoint.rstrip("/"), gcp.poll_interval_s, gcp.retry_s)
    storage = Storage(cloud, bucket, labels={})
    uploaded = storage.upload_new(name, path, sent=lambda done: sent(done, adapter.size))
    return Pushed(f"gs://{bucket}/{name}", uploaded, adapter.size, adapter.sha256)


def status(config: Config, rows: list[ResourceStatus]) -> dict[str, Any] | None:
    """The LoRA part of `sdxlctl status`; with a ready local server, what its health says it has cached."""
    prefixes, preloaded = config.model.lora_sources, config.model.loras
    if not prefixes and not preloaded:
        return None
    health = None
    for row in rows:
        if row.target == "local" and row.kind == "local-server" and row.url and row.state == "ready":
            health = client.health(row.url + row.details.get("health_route", "/health"))
    return loras.status(prefixes, preloaded, health)
