"""Target vertex: batch prediction jobs in status and teardown (inventory.py calls these, one line each).

Teardown finds the jobs by this deployment's label, not only in the state file: a running job bills its GPUs
whether or not this folder remembers it. A running job is cancelled (and its record deleted once it stopped);
a finished one's record is deleted. Their output in gs:// is the user's and stays.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sdxlctl.state import Resource
from sdxlctl.steps import Change, Progress

if TYPE_CHECKING:
    from sdxlctl.gcp.session import Cloud

KIND = "batch prediction job"
CANCEL_WAIT_S = 10 * 60  # how long teardown waits for a cancelled job to stop before leaving its record


def live_state(c: Cloud, resource: Resource) -> str:
    """ "RUNNING 120/200 (3 failed)", "SUCCEEDED 200/200", ...: a recorded job as Vertex AI reports it now."""
    from sdxlctl.gcp.batch import Jobs
    from sdxlctl.vertex.batch import counts

    if not resource.name.startswith(f"{c.parent}/batchPredictionJobs/"):  # an edited state file: ask nobody else
        return f"unknown: not a job of this project ({c.parent})"
    job = Jobs(c).get(resource.name)
    total = int(resource.details.get("lines") or 0)
    now = counts(job, total, 0.0)
    text = f"{now.state} {now.done}/{total or '?'}"
    return text + (f" ({now.failed} failed)" if now.failed else "")


def find(c: Cloud, deployment: str) -> list[dict[str, Any]]:
    """Every batch prediction job carrying this deployment's label."""
    from sdxlctl.gcp.batch import Jobs
    from sdxlctl.vertex.names import LABEL

    return Jobs(c).find({LABEL: deployment})


def listed(jobs: list[dict[str, Any]]) -> list[tuple[str, str, str, datetime | None]]:
    """Status rows of jobs found by label: (kind batch-<stamp>, name, live state, created)."""
    from sdxlctl.vertex.batch import BATCH_LABEL, counts, parse_time

    rows = []
    for job in jobs:
        now = counts(job, 0, 0.0)
        stats = job.get("completionStats", {})
        total = int(stats.get("successfulCount", 0)) + int(stats.get("failedCount", 0))
        total += max(0, int(stats.get("incompleteCount", 0)))
        text = f"{now.state} {now.done}/{total or '?'}" + (f" ({now.failed} failed)" if now.failed else "")
        stamp = (job.get("labels") or {}).get(BATCH_LABEL) or job["name"].rsplit("/", 1)[-1]
        rows.append((f"batch-{stamp}", job["name"], text, parse_time(job.get("createTime"))))
    return rows


def _running(job: dict[str, Any]) -> bool:
    from sdxlctl.gcp.batch import FINISHED

    return str(job.get("state", "")) not in FINISHED


def _out(job: dict[str, Any]) -> str:
    prefix = str(job.get("outputConfig", {}).get("gcsDestination", {}).get("outputUriPrefix", ""))
    return prefix.removesuffix("raw/") if prefix.endswith("raw/") else prefix


def changes(jobs: list[dict[str, Any]]) -> list[Change]:
    """The plan's rows: each job cancelled or its record deleted, and its output kept."""
    rows = []
    for job in jobs:
        state = str(job.get("state", "")).removeprefix("JOB_STATE_")
        if _running(job):
            rows.append(Change("cancel", KIND, job["name"], f"{state}: stopped, then its record deleted"))
        else:
            rows.append(Change("delete", KIND, job["name"], f"{state}: the job's record only"))
    rows += [Change("keep", "batch output", out, "images and manifest are yours") for out in _outs(jobs) if out]
    return rows


def _outs(jobs: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(_out(job) for job in jobs))


def plan(recorded: dict[str, Resource]) -> list[Change]:
    """A dry run's rows, from the state file alone."""
    jobs = [r for kind, r in recorded.items() if kind.startswith("batch-") and r.name]
    rows = [Change("cancel or delete", KIND, r.name, str(r.details.get("state", ""))) for r in jobs]
    outs = dict.fromkeys(str(r.details.get("out", "")) for r in jobs)
    return rows + [Change("keep", "batch output", out, "images and manifest are yours") for out in outs if out]


def teardown(
    c: Cloud,
    jobs: list[dict[str, Any]],
    attempt: Callable[..., bool],
    progress: Progress,
    *,
    wait_s: float = CANCEL_WAIT_S,
) -> None:
    """Cancel the running jobs, then delete every job's record (a cancelled one once it stopped), past failures."""
    from sdxlctl.gcp.batch import Jobs
    from sdxlctl.gcp.errors import CloudError
    from sdxlctl.vertex.names import OPERATION_TIMEOUT_S

    client = Jobs(c)
    for job in jobs:

        def remove(job: dict[str, Any] = job) -> str:
            name, said = job["name"], "record deleted"
            if _running(job):
                try:
                    client.cancel(name)
                    said = "cancelled, record deleted"
                except CloudError:  # it may have ended since it was listed: then only its record goes
                    if _running(client.get(name)):
                        raise
                if not _stopped(client, name, c.poll_s, wait_s, progress):
                    return f"cancelled; still {client.get(name).get('state', '')}: teardown again deletes its record"
            client.delete(name, timeout_s=OPERATION_TIMEOUT_S, progress=progress)
            return said

        attempt(KIND, job["name"], remove)
    if jobs:
        progress("batch output in gs:// stays: " + ", ".join(out for out in _outs(jobs) if out))


def _stopped(client: Any, name: str, poll_s: float, wait_s: float, progress: Progress) -> bool:
    from sdxlctl.gcp.batch import FINISHED

    started = time.monotonic()
    while str(client.get(name).get("state", "")) not in FINISHED:
        if time.monotonic() - started > wait_s:
            return False
        progress(f"waiting for {name} to stop ({time.monotonic() - started:.0f}s)")
        time.sleep(poll_s)
    return True
