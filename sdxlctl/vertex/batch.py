"""`sdxlctl batch` on target vertex: a BatchPredictionJob on the uploaded Model.

The normalised input goes to <out>input.jsonl, the job writes its raw output under <out>raw/, and sdxlctl turns
that into <out>images/ and <out>manifest.jsonl (batch_output.py). The job is recorded (kind batch-<stamp>) before
the wait, so a Ctrl-C, `--attach`, `status` and `teardown` all find it; the job itself carries the sdxlctl-batch
label with the same stamp, so a create whose answer was lost is found rather than sent twice.
"""

from __future__ import annotations

import re
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdxlctl.batch import KEY_FIELD, Batch, BatchProgress, BatchResult, Counts, Row, Submission, no_progress
from sdxlctl.config import Config
from sdxlctl.errors import DeployError, Interrupted
from sdxlctl.state import Resource, StateStore, interrupts_deferred
from sdxlctl.steps import Progress, quiet
from sdxlctl.vertex.batch_output import RAW, claim_folder, input_of, out_of, split_gs
from sdxlctl.vertex.names import LABEL, cloud, names, server_account

if TYPE_CHECKING:
    from sdxlctl.gcp.batch import Jobs

BATCH_LABEL = "sdxlctl-batch"  # its value: the job's stamp, as in its state kind batch-<stamp>
KIND = "batch-"
PREFIX = "JOB_STATE_"
ENDED = frozenset({"SUCCEEDED", "FAILED", "CANCELLED", "PARTIALLY_SUCCEEDED", "EXPIRED"})
# A job PENDING or QUEUED this long is likely waiting for its GPU (a stockout in the region): said once
QUEUED_NOTICE_S = 15 * 60
WAITING = frozenset({"PENDING", "QUEUED"})
ATTACH_HINT = (
    "`sdxlctl batch --attach` waits for it and collects its images; `sdxlctl status` shows it; "
    "`sdxlctl teardown` cancels it"
)


def stamp_now(taken: set[str]) -> str:
    """UTC yyyymmdd-hhmmss (a label value and part of a state kind), one not `taken` in this deployment."""
    stamp = base = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    n = 1
    while KIND + stamp in taken:
        n += 1
        stamp = f"{base}-{n}"
    return stamp


def job_body(
    config: Config, submission: Submission, model: str, stamp: str, *, input_uri: str, account: str
) -> dict[str, Any]:
    """The BatchPredictionJob as the REST API takes it (v1; dedicatedResources.spot makes it a v1beta1 one)."""
    from sdxlctl.gpus import GPUS

    gpu = GPUS[submission.gpu]
    head, stem, tail = _display(config, submission.batch.source, stamp)
    resources: dict[str, Any] = {
        "machineSpec": {
            "machineType": gpu.machine_type,
            "acceleratorType": gpu.accelerator,
            "acceleratorCount": gpu.count,
        },
        "startingReplicaCount": submission.replicas[0],
        "maxReplicaCount": submission.replicas[1],
    }
    if submission.spot:
        resources["spot"] = True
    body: dict[str, Any] = {
        "displayName": head + stem[: 128 - len(head) - len(tail)] + tail,
        "model": model,
        "inputConfig": {"instancesFormat": "jsonl", "gcsSource": {"uris": [input_uri]}},
        "instanceConfig": {"instanceType": "object", "keyField": KEY_FIELD},
        "modelParameters": submission.batch.parameters,
        "outputConfig": {"predictionsFormat": "jsonl", "gcsDestination": {"outputUriPrefix": submission.out + RAW}},
        "dedicatedResources": resources,
        "manualBatchTuningParameters": {"batchSize": submission.batch_size},
        "labels": {**names(config).labels, BATCH_LABEL: stamp},
    }
    if account:
        body["serviceAccount"] = account
    return body


def _display(config: Config, source: Path, stamp: str) -> tuple[str, str, str]:
    """A job's displayName in three parts: "<name>-batch-", the file's stem, "-<stamp>"."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "-", source.stem).strip("-") or "prompts"
    return f"{config.name}-batch-", stem, f"-{stamp}"


def _running_on(config: Config, store: StateStore, jobs: Jobs, source: Path) -> dict[str, Any] | None:
    """A job of this deployment still running on `source` (recorded, or found by label and display name when the
    state file lost it): a second one would bill twice for the same images."""
    recorded = {r.name: r for r in batch_resources(store, config.name).values()}
    head, stem, _ = _display(config, source, "")
    named = re.compile(re.escape(head) + r"(.+)-\d{8}-\d{6}(-\d+)?")
    for job in jobs.find({LABEL: config.name}):
        if short_state(job) in ENDED:
            continue
        mine = recorded.get(str(job.get("name")))
        if mine is not None and mine.details.get("source"):
            same = _same_file(mine.details.get("source"), source)
        else:
            shown = named.fullmatch(str(job.get("displayName", "")))
            # a long stem was cut to fit displayName's 128 characters
            same = shown is not None and (shown[1] == stem or (len(shown[0]) >= 126 and stem.startswith(shown[1])))
        if same:
            return job
    return None


def run(
    config: Config,
    store: StateStore,
    submission: Submission,
    *,
    progress: BatchProgress = no_progress,
    say: Progress = quiet,
) -> BatchResult:
    """Upload the input, create the job (recorded before the wait), wait with progress, collect the output."""
    from sdxlctl.gcp.batch import Jobs
    from sdxlctl.gcp.storage import Storage
    from sdxlctl.vertex.access import ensure_server_account

    started = time.monotonic()
    model = store.read().get(config.name, "model")
    if model is None or not model.name:
        raise DeployError(
            "no model is recorded for this deployment", hint="run `sdxlctl build` and `sdxlctl upload` first"
        )
    if not submission.out.startswith("gs://") or not submission.out.endswith("/"):
        raise DeployError(
            f"batch output {submission.out!r} is not a gs:// folder", hint="use --out gs://BUCKET/PREFIX/"
        )
    c, n = cloud(config), names(config)
    jobs = Jobs(c)
    busy = _running_on(config, store, jobs, submission.batch.source)
    if busy is not None:
        short = str(busy["name"]).rsplit("/", 1)[-1]
        raise DeployError(
            f"job {busy['name']} is still {short_state(busy)} on {submission.batch.source}: not starting a second one",
            hint=f"`sdxlctl batch --attach --job {short}` waits for it and collects its images; "
            "`sdxlctl teardown` cancels it",
        )
    stamp = stamp_now(set(store.read().of(config.name)))
    bucket, folder = split_gs(submission.out)
    storage = Storage(c, bucket, n.labels)
    if bucket == n.bucket:
        storage.ensure_bucket()
    claim_folder(storage, folder, submission.out, submission.batch.source)  # before anything is uploaded there
    # a retry shares the folder (and manifest) of the run it retries, but not its input: attach reads it back
    name = f"input-retry-{stamp}.jsonl" if submission.retry_of else "input.jsonl"
    say(f"uploading {len(submission.batch.lines)} lines to {submission.out}{name}")
    input_uri = storage.upload(folder + name, submission.batch.jsonl(), content_type="application/jsonl")
    account = ensure_server_account(config, store, say, []) if server_account(config) else ""
    body = job_body(config, submission, model.name, stamp, input_uri=input_uri, account=account)
    say("creating the batch prediction job")
    job: dict[str, Any] = {}
    try:
        with interrupts_deferred():  # created and recorded, or neither: a Ctrl-C between would hide a billing job
            job = jobs.create(body, find_labels={LABEL: config.name, BATCH_LABEL: stamp}, progress=say)
            store.record(config.name, _record(submission, job, stamp, input_uri))
        say(f"job {job['name']} created")
    except KeyboardInterrupt:  # the Ctrl-C held back above lands here, the job recorded
        if not job:
            raise
        raise Interrupted(f"interrupted; job {job['name']} keeps running", hint=ATTACH_HINT) from None
    kind = KIND + stamp
    return _follow(
        config, store, jobs, job["name"], kind, submission.download, progress, say, submission.batch, started
    )


def _record(submission: Submission, job: dict[str, Any], stamp: str, input_uri: str) -> Resource:
    batch = submission.batch
    details = {
        "source": str(batch.source),
        "out": submission.out,
        "input": input_uri,
        "lines": len(batch.lines),
        "images": batch.images,
        "gpu": submission.gpu,
        "spot": submission.spot,
        "replicas": list(submission.replicas),
        "batch_size": submission.batch_size,
        "download": str(submission.download) if submission.download else None,
        "usd_per_replica_hour": submission.usd_per_replica_hour,
        "state": short_state(job),
        "retry_of": submission.retry_of or None,
    }
    return Resource(kind=KIND + stamp, name=job["name"], target="vertex", details=details)


def attach(
    config: Config,
    store: StateStore,
    job: str | None,
    *,
    download: Path | None = None,
    progress: BatchProgress = no_progress,
    say: Progress = quiet,
) -> BatchResult:
    """Wait for a job already started (the last one of this deployment, or `job`) and collect its output."""
    from sdxlctl.gcp.batch import Jobs

    c = cloud(config)
    jobs = Jobs(c)
    recorded = batch_resources(store, config.name)
    if job:
        wanted = job if job.startswith("projects/") else f"{c.parent}/batchPredictionJobs/{job}"
        if not re.fullmatch(re.escape(c.parent) + r"/batchPredictionJobs/[0-9]+", wanted):
            raise DeployError(
                f"--job {job} is not a batch prediction job of {c.parent}",
                hint="give the job's number (or its full name) as `sdxlctl status` shows it",
            )
        kind = next((k for k, r in recorded.items() if r.name == wanted), "")
    elif recorded:
        kind = max(recorded, key=lambda k: (recorded[k].created_at, k))
        wanted = recorded[kind].name
    else:  # no state file here: the newest job carrying this deployment's label
        found = jobs.find({LABEL: config.name})
        if not found:
            raise DeployError(
                f"no batch prediction job of {config.name} to attach to", hint="start one with `sdxlctl batch FILE`"
            )
        wanted, kind = found[0]["name"], ""
    if download is None and kind and recorded[kind].details.get("download"):
        download = Path(recorded[kind].details["download"])  # the run that started it asked for a copy on disk
    say(f"attaching to {wanted}")
    return _follow(config, store, jobs, wanted, kind, download, progress, say, None, time.monotonic())


def previous_rows(config: Config, store: StateStore, source: Path) -> tuple[str, dict[int, Row]]:
    """The last job of this deployment run on `source` and its manifest rows (for --retry-failed)."""
    from sdxlctl.vertex.batch_output import read_manifest

    runs = [r for r in batch_resources(store, config.name).values() if _same_file(r.details.get("source"), source)]
    if not runs:
        return "", {}
    last = max(runs, key=lambda r: r.created_at)
    rows = read_manifest(cloud(config), str(last.details["out"]))
    if rows is None:  # never collected (a Ctrl-C during the wait): no manifest is not "nothing failed"
        raise DeployError(
            f"the output of job {last.name} was not collected yet",
            hint=f"run `sdxlctl batch --attach --job {last.name.rsplit('/', 1)[-1]}` first",
        )
    return last.name, rows


def _same_file(recorded: Any, source: Path) -> bool:
    if not recorded:
        return False
    return Path(recorded) == source or Path(recorded).resolve() == source.resolve()


def batch_resources(store: StateStore, deployment: str) -> dict[str, Resource]:
    """This deployment's recorded batch jobs, by kind."""
    return {k: r for k, r in store.read().of(deployment).items() if k.startswith(KIND) and r.name}


def short_state(job: dict[str, Any]) -> str:
    """RUNNING, SUCCEEDED, ...: JobState without its prefix."""
    return str(job.get("state", "JOB_STATE_UNSPECIFIED")).removeprefix(PREFIX)


def counts(job: dict[str, Any], total: int, usd_per_replica_hour: float) -> Counts:
    """The progress bar's numbers from a job as the API returns it (int64 counts are strings in JSON)."""
    stats = job.get("completionStats", {})
    hours = job.get("resourcesConsumed", {}).get("replicaHours")
    return Counts(
        done=int(stats.get("successfulCount", 0)),
        failed=int(stats.get("failedCount", 0)),
        total=total,
        state=short_state(job),
        elapsed_s=_elapsed(job),
        replica_hours=float(hours) if hours is not None else None,
        usd_so_far=float(hours) * usd_per_replica_hour if hours is not None and usd_per_replica_hour else None,
    )


def _elapsed(job: dict[str, Any]) -> float:
    """Seconds since the job started (created, before it ran), up to its end."""
    begun = parse_time(job.get("startTime")) or parse_time(job.get("createTime"))
    if begun is None:
        return 0.0
    ended = parse_time(job.get("endTime")) or datetime.now(UTC)
    return max(0.0, (ended - begun).total_seconds())


def parse_time(text: Any) -> datetime | None:
    if not text:
        return None
    # protobuf writes 0, 3, 6 or 9 fractional digits; datetime reads at most 6
    text = re.sub(r"(\.\d{6})\d+", r"\1", str(text)).replace("Z", "+00:00")
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _follow(
    config: Config,
    store: StateStore,
    jobs: Jobs,
    name: str,
    kind: str,
    download: Path | None,
    progress: BatchProgress,
    say: Progress,
    batch: Batch | None,
    started: float,
) -> BatchResult:
    """Wait for the job to end (Ctrl-C leaves it running), then collect its output. `batch`: what the job runs
    (None: read back from the input it was given)."""
    from sdxlctl.vertex.batch_output import collect, read_batch

    rate = float(batch_resources(store, config.name).get(kind, _NONE).details.get("usd_per_replica_hour") or 0.0)
    seen, told = "", False
    try:
        job = _get(jobs, name)
        owner = (job.get("labels") or {}).get(LABEL)
        if owner != config.name:  # --job names another deployment's (or nobody's) job: not ours to follow
            raise DeployError(
                f"job {name} is not a batch job of deployment {config.name} (its {LABEL} label: {owner or 'none'})",
                hint="attach from that deployment's folder, or give one of this deployment's jobs",
            )
        out = out_of(job)
        batch = batch or read_batch(cloud(config), input_of(job), out)
        while True:
            state = short_state(job)
            if kind and state != seen:
                store.update_details(config.name, kind, state=state)
                seen = state
            progress(counts(job, len(batch.lines), rate))
            if state in WAITING and not told and _elapsed(job) >= QUEUED_NOTICE_S:
                told = True
                say(_queued_notice(config, job, name))
            if state in ENDED:
                break
            time.sleep(config.gcp.poll_interval_s)
            job = _get(jobs, name)
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted; job {name} keeps running", hint=ATTACH_HINT) from None
    say(f"job {short_state(job).lower()}: collecting its output")
    try:
        done, failed = collect(cloud(config), job, batch, out, download, say)
    except KeyboardInterrupt:
        raise Interrupted(
            f"interrupted while collecting the output of job {name} ({short_state(job)})",
            hint="`sdxlctl batch --attach` collects it again (a --download copy resumes)",
        ) from None
    final = counts(job, len(batch.lines), rate)
    return BatchResult(
        where=name,
        out=out,
        state=short_state(job),
        done=done,
        failed=failed,
        seconds=time.monotonic() - started,
        download=download,
        error=str(job.get("error", {}).get("message", "")),
        replica_hours=final.replica_hours,
        usd=final.usd_so_far,
    )


def _queued_notice(config: Config, job: dict[str, Any], name: str) -> str:
    gpu = job.get("dedicatedResources", {}).get("machineSpec", {}).get("acceleratorType") or "its GPU"
    return (
        f"job {name} is still {short_state(job)} after {_elapsed(job) / 60:.0f} min: Vertex AI may be short of "
        f"{gpu} in {cloud(config).region}; Ctrl-C leaves it queued, `sdxlctl teardown` cancels it"
    )


_NONE = Resource(kind="none", name="", target="vertex")


def _get(jobs: Jobs, name: str) -> dict[str, Any]:
    """The job now; a get that failed past its retries says the job itself goes on (it bills until it ends)."""
    from sdxlctl.gcp.errors import CloudError

    try:
        return jobs.get(name)
    except CloudError as exc:
        if "not found" in exc.message.lower():
            raise
        raise DeployError(f"{exc.message}; the job itself keeps running", hint=ATTACH_HINT) from None
