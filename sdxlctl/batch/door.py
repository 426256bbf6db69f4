"""The door of `sdxlctl batch`: read and check the prompts file, price it, confirm, hand it to the target.

Layer 7, beside core (core.py is at its size cap): it may import the targets and pricing, never core.
Nothing is uploaded, created or written before the whole file is checked and, above [batch] budget_usd,
the plan is confirmed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sdxlctl.batch import MANIFEST, Batch, BatchOptions, BatchProgress, BatchResult, Row, Submission, no_progress
from sdxlctl.config import Config
from sdxlctl.errors import SdxlctlError, UsageError
from sdxlctl.pricing.batch import BatchEstimate
from sdxlctl.state import StateStore
from sdxlctl.steps import Notice, Progress, plural, quiet

BATCH_TARGETS = ("vertex", "local")  # cloudrun has no batch engine: its service would be a loop of predicts
DEFAULT_STEPS = 30  # the server's num_inference_steps when --steps is not given (the estimate's too)
LOCAL_BATCH_SIZE = 4  # lines a request to the local server: enough to keep it busy, small enough to resume
NATIVE_SIDE = 1024  # SDXL's own size: the server's width and height when a request gives none


@dataclass(frozen=True)
class BatchPlan:
    """What a batch will do and cost: shown by --dry-run, and before a confirmation."""

    submission: Submission
    estimate: BatchEstimate
    target: str
    notes: list[str]  # e.g. what Spot means, where the output goes


class Declined(SdxlctlError):
    """The plan was over [batch] budget_usd and the confirmation was answered no: nothing was started."""


def plan(config: Config, store: StateStore, options: BatchOptions) -> BatchPlan:
    """The checked batch, where it runs and what it costs; nothing is uploaded or started."""
    from sdxlctl.batch import lines

    _check_target(config, options)
    source = options.source
    if source is None:
        raise UsageError("a prompts file is required", hint="sdxlctl batch prompts.txt (or --attach to wait for a job)")
    if not source.is_file():
        # exists() of a FIFO or a device is a stat, not an open: nothing blocks
        why = "is a folder" if source.is_dir() else "is not a regular file" if source.exists() else "does not exist"
        raise UsageError(f"{source}: the prompts file {why}", hint="name a .txt, .jsonl or .csv file of prompts")
    parameters = dict(options.parameters)
    style = parameters.pop("style", None)  # an instance field in the server's schema, not a parameter
    batch = _styled(lines.read(source, parameters, max_lines=config.batch.max_lines), style)
    out = _out(config, options, source)
    previous = ""
    if options.retry_failed:
        batch, out, previous = _failed_only(config, store, batch, out)
    return _priced(config, options, batch, out, previous)


def run(
    config: Config,
    store: StateStore,
    options: BatchOptions,
    *,
    progress: BatchProgress = no_progress,
    say: Progress = quiet,
    confirm: Callable[[BatchPlan], bool] = lambda _: False,
) -> BatchPlan | BatchResult | Notice:
    """Run (or with dry_run, plan; with attach, wait for) a batch on the configured target.

    A Notice when --retry-failed finds no failed line (nothing to run); Declined when over budget and not confirmed.
    """
    if options.attach:
        return _attach(config, store, options, progress=progress, say=say)
    try:
        chosen = plan(config, store, options)
    except _NothingFailed as nothing:
        return Notice(str(nothing))
    if options.dry_run:
        return chosen
    over = chosen.estimate.usd > config.batch.budget_usd
    if over and not options.yes and not confirm(chosen):
        raise Declined(
            "aborted: nothing was started",
            hint=f"pass --yes, or raise [batch] budget_usd (now {config.batch.budget_usd:g} USD)",
        )
    if config.target == "local":
        from sdxlctl.local import batch as local_batch

        return local_batch.run(config, store, chosen.submission, progress=progress, say=say)
    from sdxlctl.vertex import batch as vertex_batch

    return vertex_batch.run(config, store, chosen.submission, progress=progress, say=say)


def cost(
    config: Config,
    *,
    images: int,
    gpu: str | None,
    replicas: int | None,
    spot: bool | None,
    steps: int,
    size: tuple[int, int] = (NATIVE_SIDE, NATIVE_SIDE),
    table: Any = None,
) -> BatchEstimate:
    """`sdxlctl cost --images N`: the same arithmetic as a batch's --dry-run (`table`: the prices, else bundled)."""
    from sdxlctl.pricing.batch import batch_estimate

    return batch_estimate(
        gpu or config.batch.gpu or config.deploy.gpu,
        config.gcp.region,
        images=images,
        steps=steps,
        replicas=replicas or config.batch.max_replicas,
        min_replicas=replicas or config.batch.min_replicas,  # as a batch's --replicas N: N..N
        spot=config.batch.spot if spot is None else spot,
        level=config.model.optimize,
        time_limit_s=config.model.time_limit_s,
        max_images=config.model.max_images,
        chosen_batch_size=config.batch.batch_size,
        table=table,
        pixels=size[0] * size[1],
    )


# ---------------------------------------------------------------- the parts of a plan


class _NothingFailed(SdxlctlError):
    """--retry-failed with no failed line in the last run: run() makes it a Notice; plan() alone raises it."""


def _styled(batch: Batch, style: str | None) -> Batch:
    """--style: the style of every line that names none of its own ("none" included, as predict's --style)."""
    from dataclasses import replace

    if style is None:
        return batch
    lines = tuple(line if "style" in line.instance else replace(line, instance={**line.instance, "style": style})
                  for line in batch.lines)  # fmt: skip
    return replace(batch, lines=lines)


def _check_target(config: Config, options: BatchOptions) -> None:
    if config.target not in BATCH_TARGETS:
        raise UsageError(
            f"batch runs on target vertex (Vertex AI batch prediction, on the Model `sdxlctl upload` makes) or "
            f"local, not on target {config.target}",
            hint='set target = "vertex" (after `sdxlctl build` and `sdxlctl upload`) or "local" in sdxlctl.toml',
        )
    if config.target == "local":
        if options.attach:
            raise UsageError(
                "--attach waits for a Vertex AI job; target local runs no job",
                hint="run the same command again: it skips the lines already done",
            )
        if options.download is not None:
            raise UsageError(
                "--download is for target vertex; on target local the images are written to --out",
                hint="sdxlctl batch FILE --out DIR",
            )
        if options.out and options.out.startswith("gs://"):
            raise UsageError(f"--out {options.out}: target local writes to a folder on this machine, not gs://")
    elif options.out and not options.out.startswith("gs://"):
        raise UsageError(
            f"--out {options.out}: target vertex writes to a gs:// prefix (gs://BUCKET/PREFIX/)",
            hint="--download DIR also puts the images and the manifest on this machine",
        )


def _out(config: Config, options: BatchOptions, source: Path) -> str:
    """Where images/ and manifest.jsonl go: --out, else a folder of the file's own (a fresh gs:// one per job)."""
    if config.target == "local":
        return options.out or f"batch-{source.stem}"
    if options.out:
        return options.out.rstrip("/") + "/"
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    if config.batch.out:  # a prefix of the user's: each job its own folder under it, as under the default one
        return f"{config.batch.out.rstrip('/')}/{source.stem}-{stamp}/"
    from sdxlctl.vertex.names import names

    return f"gs://{names(config).bucket}/batch/{config.name}/{source.stem}-{stamp}/"


def _failed_only(config: Config, store: StateStore, batch: Batch, out: str) -> tuple[Batch, str, str]:
    """--retry-failed: only the lines the last run of this file failed, into the SAME output."""
    rows: dict[int, Row]
    if config.target == "local":
        from sdxlctl.local import batch as local_batch

        rows, previous = local_batch.previous_rows(config, store, Path(out)), out
    else:
        from sdxlctl.vertex import batch as vertex_batch

        previous, rows = vertex_batch.previous_rows(config, store, batch.source)
        out = _job_out(config, store, previous) or out
    # Only lines the file still has: an edited file may have lost the failed ones (no job of no lines)
    failed = {number for number, row in rows.items() if row.error} & {line.number for line in batch.lines}
    ran = bool(previous) if config.target == "vertex" else (Path(out) / MANIFEST).exists()
    if not ran:  # no job recorded for it, or a folder with no manifest: "the last run" would name nothing
        where = f"by deployment {config.name!r}" if config.target == "vertex" else f"in {out}"
        raise UsageError(
            f"there was no run of {batch.source.name} {where}: nothing to retry",
            hint=f"run it without --retry-failed: sdxlctl batch {batch.source}",
        )
    if not failed:
        where = f"job {previous}" if config.target == "vertex" else out
        raise _NothingFailed(f"no failed lines in the last run of {batch.source} ({where}): nothing to retry")
    return batch.only(failed), out, previous


def _job_out(config: Config, store: StateStore, job: str) -> str:
    """The output prefix the job `job` was recorded with ("" when the state file does not hold it)."""
    for resource in store.read().of(config.name).values():
        if resource.kind.startswith("batch-") and resource.name == job:
            return str(resource.details.get("out", ""))
    return ""


def _priced(config: Config, options: BatchOptions, batch: Batch, out: str, retry_of: str) -> BatchPlan:
    local = config.target == "local"
    gpu = options.gpu or config.batch.gpu or config.deploy.gpu
    replicas = (1, 1) if local else options.replicas or (config.batch.min_replicas, config.batch.max_replicas)
    spot = False if local else (config.batch.spot if options.spot is None else options.spot)
    steps = int(batch.parameters.get("num_inference_steps", DEFAULT_STEPS))
    pixels = _pixels(batch.parameters)
    size = _batch_size(config, gpu, steps, int(batch.parameters.get("num_images", 1)), pixels, local=local)
    estimate = _estimate(config, batch, gpu, replicas, spot, size, pixels, local=local)
    submission = Submission(
        batch=batch,
        out=out,
        gpu="" if local else gpu,
        replicas=replicas,
        spot=spot,
        batch_size=size,
        download=options.download,
        usd_per_replica_hour=estimate.usd_per_replica_hour,
        retry_of=retry_of,
    )
    return BatchPlan(submission, estimate, config.target, _notes(config, submission, estimate))


def _estimate(
    config: Config,
    batch: Batch,
    gpu: str,
    replicas: tuple[int, int],
    spot: bool,
    size: int,
    pixels: int,
    *,
    local: bool,
) -> BatchEstimate:
    steps = int(batch.parameters.get("num_inference_steps", DEFAULT_STEPS))
    if local:  # this machine's own server: nothing billed, and no table knows its speed
        return BatchEstimate(
            gpu="local", region="local", images=batch.images, seconds_per_image=0.0, replicas=1, spot=False,
            batch_size=size, replica_hours=0.0, wall_hours=0.0, usd_per_replica_hour=0.0, usd=0.0, verified=True,
            replica_start_h=0.0,
        )  # fmt: skip
    from sdxlctl.pricing.batch import batch_estimate

    return batch_estimate(
        gpu,
        config.gcp.region,
        images=batch.images,
        steps=steps,
        replicas=replicas[1],
        min_replicas=replicas[0],  # started whether or not they get work
        spot=spot,
        level=config.model.optimize,
        num_images=int(batch.parameters.get("num_images", 1)),
        time_limit_s=config.model.time_limit_s,
        max_images=config.model.max_images,
        chosen_batch_size=size,
        pixels=pixels,
    )


def _pixels(parameters: dict[str, Any]) -> int:
    """The images' width x height: the flags', else SDXL's own 1024 a side (what the server makes then)."""
    return int(parameters.get("width") or NATIVE_SIDE) * int(parameters.get("height") or NATIVE_SIDE)


def _batch_size(config: Config, gpu: str, steps: int, num_images: int, pixels: int, *, local: bool) -> int:
    """Instances a request: [batch] batch_size, else what the GPU finishes in the server's time limit."""
    limit = config.model.max_images
    if num_images > limit:  # the server refuses more images a request: every line would fail
        raise UsageError(
            f"-n {num_images} is more than [model] max_images {limit}",
            hint="ask for fewer, or raise max_images in the [model] section of sdxlctl.toml and deploy again",
        )
    most = limit // num_images
    chosen = config.batch.batch_size
    if chosen and chosen > most:  # refused now, not by the server for every request once replicas bill
        raise UsageError(
            f"[batch] batch_size {chosen} with -n {num_images} is {chosen * num_images} images a request, "
            f"more than [model] max_images {limit}",
            hint=f"set [batch] batch_size to {most} or less (0 picks it), or ask for fewer images a line",
        )
    if local:
        return min(chosen or LOCAL_BATCH_SIZE, most)
    if chosen:
        return chosen
    from sdxlctl.pricing.batch import batch_size

    return batch_size(
        gpu,
        steps=steps,
        num_images=num_images,
        time_limit_s=config.model.time_limit_s,
        max_images=config.model.max_images,
        level=config.model.optimize,
        pixels=pixels,
    )


def _notes(config: Config, submission: Submission, estimate: BatchEstimate) -> list[str]:
    """What the plan says besides its numbers (flags local ignores are said by the CLI, as for deploy)."""
    notes: list[str] = []
    if config.target == "vertex":  # what Spot means comes with the estimate's notes
        notes.append(
            "the job's input and raw output stay beside the images in gs:// (teardown deletes the job, not the files)"
        )
    if submission.retry_of:
        notes.append(
            f"only the {plural(len(submission.batch.lines), 'failed line')} of {submission.retry_of}, "
            "into the same output"
        )
    notes.extend(estimate.notes)
    return notes


def _attach(
    config: Config, store: StateStore, options: BatchOptions, *, progress: BatchProgress, say: Progress
) -> BatchResult:
    _check_target(config, options)
    from sdxlctl.vertex import batch as vertex_batch

    return vertex_batch.attach(config, store, options.job, download=options.download, progress=progress, say=say)


__all__ = ["Batch", "BatchPlan", "Declined", "cost", "plan", "run"]
