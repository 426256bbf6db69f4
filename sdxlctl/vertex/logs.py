"""Target vertex: the endpoint's container log (and the UI's) from Cloud Logging, read once or followed."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from sdxlctl.config import Config
from sdxlctl.errors import DeployError
from sdxlctl.state import StateStore
from sdxlctl.steps import LogLine, LogRequest, Progress, quiet
from sdxlctl.vertex.names import LABEL, cloud

if TYPE_CHECKING:
    from sdxlctl.gcp.logging import Entry
    from sdxlctl.gcp.session import Cloud

# Where Vertex AI writes a deployed model's stdout and stderr (container logging is on by default in v1).
ENDPOINT_TYPE = "aiplatform.googleapis.com/Endpoint"
SERVICE_TYPE = "cloud_run_revision"
DEFAULT_SINCE = timedelta(days=1)  # as `gcloud logging read --freshness`: never an unbounded read
FOLLOW_POLL_S = 5.0  # the read quota is 60 requests a minute per project
# Entries reach Cloud Logging late and out of order: each poll looks back this far and drops what it has shown.
LOOKBACK = timedelta(seconds=60)


def logs(
    config: Config,
    store: StateStore,
    request: LogRequest,
    *,
    warn: Progress = quiet,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[LogLine]:
    """The deployment's entries since `request.since` (a day by default), the last `request.lines` of them;
    then, with `request.follow`, each new one once, until the caller stops."""
    c = cloud(config)
    selector = _selector(config, store, c, ui=request.ui)
    yield from read(c, selector, request, poll_s=min(config.gcp.poll_interval_s, FOLLOW_POLL_S), sleep=sleep)


def read(
    c: Cloud, selector: str, request: LogRequest, *, poll_s: float, sleep: Callable[[float], None] = time.sleep
) -> Iterator[LogLine]:
    """The entries `selector` picks (every target's), read as `request` asks: each shown once."""
    from sdxlctl.gcp.logging import Logs

    reader = Logs(c)
    start = request.since or datetime.now(UTC) - DEFAULT_SINCE
    lines = request.lines
    first = reader.entries(_after(selector, start), newest_first=lines is not None, limit=lines)
    if lines is not None:
        first.reverse()
    cursor = Cursor(start)
    for entry in first:
        if cursor.take(entry):
            yield _line(entry)
    if not request.follow:
        return
    while True:
        sleep(poll_s)
        for entry in reader.entries(_after(selector, cursor.bound())):
            if cursor.take(entry):
                yield _line(entry)


class Cursor:
    """What a follow has shown: the newest timestamp, and the insert ids of entries near it.

    A poll asks from `bound()` (a little before the newest), so an entry that arrives late is still seen;
    one seen already (same insert id and timestamp, as Cloud Logging deduplicates) is not shown twice.
    """

    def __init__(self, start: datetime) -> None:
        self.start = start
        self.newest: datetime | None = None
        self.seen: dict[tuple[str, datetime], None] = {}

    def bound(self) -> datetime:
        return self.start if self.newest is None else max(self.start, self.newest - LOOKBACK)

    def take(self, entry: Entry) -> bool:
        """Whether `entry` is new (and from now on it is not)."""
        key = (entry.insert_id, entry.timestamp)
        if key in self.seen:
            return False
        self.seen[key] = None
        if self.newest is None or entry.timestamp > self.newest:
            self.newest = entry.timestamp
            bound = self.bound()  # what no later poll can return again need not be remembered
            self.seen = {k: None for k in self.seen if k[1] >= bound}
        return True


def _after(selector: str, start: datetime) -> str:
    return f'{selector} AND timestamp>="{start.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")}"'


def _line(entry: Entry) -> LogLine:
    return LogLine(entry.text, time=entry.timestamp, severity=entry.severity)


def _selector(config: Config, store: StateStore, c: Cloud, *, ui: bool) -> str:
    """Entries of this deployment's endpoint (or, with `ui`, its Cloud Run UI): from the state file, else
    found by label as teardown finds it."""
    kind, noun, made_by = (
        ("ui-service", "UI", "`sdxlctl ui-deploy` deploys")
        if ui
        else ("endpoint", "endpoint", "`sdxlctl deploy` creates")
    )
    recorded = store.read().get(config.name, kind)
    names = [recorded.name] if recorded is not None and recorded.name else _labelled(c, config.name, ui=ui)
    if not names:
        raise DeployError(
            f"no {noun} of {config.name!r} to read logs from: none in the state file, none labelled "
            f"{LABEL}={config.name} in {c.project}/{c.region}",
            hint=f"{made_by} one; `sdxlctl status` shows what exists",
        )
    resource, key = (SERVICE_TYPE, "service_name") if ui else (ENDPOINT_TYPE, "endpoint_id")
    ids = " OR ".join(f'resource.labels.{key}="{name.rsplit("/", 1)[-1]}"' for name in names)
    return f'resource.type="{resource}" AND resource.labels.location="{c.region}" AND ({ids})'


def _labelled(c: Cloud, deployment: str, *, ui: bool) -> list[str]:
    if ui:
        from sdxlctl.gcp.run import CloudRun

        return [service.name for service in CloudRun(c).find((LABEL, deployment))]
    from sdxlctl.gcp.vertex import Vertex

    return [endpoint.name for endpoint in Vertex(c).find_endpoints((LABEL, deployment))]
