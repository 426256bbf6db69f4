"""Target cloudrun: the model service's log (and the UI's) from Cloud Logging, read once or followed."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator

from sdxlctl import steps
from sdxlctl.config import Config
from sdxlctl.errors import DeployError
from sdxlctl.state import StateStore
from sdxlctl.steps import Progress, quiet
from sdxlctl.vertex.logs import FOLLOW_POLL_S, SERVICE_TYPE, read
from sdxlctl.vertex.names import LABEL, cloud, names


def logs(
    config: Config,
    store: StateStore,
    request: steps.LogRequest,
    *,
    warn: Progress = quiet,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[steps.LogLine]:
    """Every revision's entries of the model's service (with `request.ui`, the UI's), as target vertex reads
    its endpoint's: since `request.since` (a day by default), the last `request.lines`, then followed."""
    c = cloud(config)
    selector = _selector(config, store, ui=request.ui)
    yield from read(c, selector, request, poll_s=min(config.gcp.poll_interval_s, FOLLOW_POLL_S), sleep=sleep)


def _selector(config: Config, store: StateStore, *, ui: bool) -> str:
    """The service's entries (stdout, stderr and the request log): from the state file, else found by label
    as teardown finds it, else by the name deploy gives it when it existed before."""
    kind, noun, made_by = (
        ("ui-service", "UI", "`sdxlctl ui-deploy` deploys")
        if ui
        else ("server-service", "model service", "`sdxlctl deploy` creates")
    )
    recorded = store.read().get(config.name, kind)
    if recorded is not None and recorded.name:
        # a Cloud Run service id is [a-z0-9-]: anything else in a state file would rewrite the filter
        service_ids = [recorded.name.rsplit("/", 1)[-1]]
        if not re.fullmatch(r"[a-z][a-z0-9-]{0,62}", service_ids[0]):  # it would rewrite the filter
            service_ids = [names(config).service_id if ui else names(config).server_service_id]
    else:
        service_ids = _labelled(config, ui=ui)
    if not service_ids:
        c = cloud(config)
        raise DeployError(
            f"no {noun} of {config.name!r} to read logs from: none in the state file, none labelled "
            f"{LABEL}={config.name} in {c.project}/{c.region}",
            hint=f"{made_by} one; `sdxlctl status` shows what exists",
        )
    ids = " OR ".join(f'resource.labels.service_name="{service_id}"' for service_id in service_ids)
    return f'resource.type="{SERVICE_TYPE}" AND resource.labels.location="{config.gcp.region}" AND ({ids})'


def _labelled(config: Config, *, ui: bool) -> list[str]:
    """The labelled services of the kind asked: the model's runs on a GPU (or bears its name), the UI's not."""
    from sdxlctl.gcp.run import CloudRun

    n = names(config)
    found = []
    for service in CloudRun(cloud(config)).find((LABEL, config.name)):
        service_id = service.name.rsplit("/", 1)[-1]
        model = service_id == n.server_service_id or bool(service.template.node_selector.accelerator)
        if model != ui:
            found.append(service_id)
    return found
