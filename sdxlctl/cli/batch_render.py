"""`sdxlctl batch` for people (stderr) and programs (stdout): the plan, the progress bar, the end."""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, SpinnerColumn, Task, TaskID, TextColumn
from rich.text import Text

from sdxlctl.batch import IMAGES, MANIFEST, BatchResult, Counts
from sdxlctl.cli.console import err, out
from sdxlctl.cli.render import duration, replicas, usd_per_hour
from sdxlctl.errors import SdxlctlError
from sdxlctl.steps import Notice, plural

if TYPE_CHECKING:
    from sdxlctl.batch.door import BatchPlan

SHOWN_FAILURES = 5  # the first failed lines shown at the end; the manifest holds them all
PLAIN_EVERY_S = 60.0  # without a terminal (CI, a pipe): at most a line a minute unless the state moves on
ENDED_BADLY = ("FAILED", "CANCELLED", "EXPIRED")


# ---------------------------------------------------------------- progress


def stats(counts: Counts, num_images: int = 1) -> str:
    """done / failed / left, images per minute, replica hours and cost so far (when the target knows them)."""
    parts = [f"{counts.done} done", f"{counts.failed} failed", f"{counts.left} left"]
    if counts.skipped:
        parts.append(f"{counts.skipped} skipped")
    rate = counts.images_per_minute
    if rate is not None:
        parts.append(f"{rate * num_images:,.1f} images/min")
    if counts.replica_hours is not None:
        parts.append(f"{counts.replica_hours:,.2f} replica h")
    if counts.usd_so_far is not None:
        parts.append(f"{counts.usd_so_far:,.2f} USD so far")
    return ", ".join(parts)


class _Elapsed(ProgressColumn):
    """The elapsed time as the spinners of the other commands show it (dim, 5s, 4m 05s)."""

    def render(self, task: Task) -> Text:
        seconds = task.fields.get("elapsed")
        since = task.fields.get("since")
        shown = task.elapsed or 0.0 if seconds is None else seconds + time.monotonic() - since
        return Text(duration(shown), style="dim")


class Display:
    """The progress of a batch: a Rich bar on a terminal; plain lines, few of them, in a log or a pipe.

    Started at the first phase or count, not before: a confirmation prompt comes first and must stay readable.
    """

    def __init__(self, *, num_images: int = 1, every_s: float = PLAIN_EVERY_S) -> None:
        self.num_images, self.every_s = num_images, every_s
        self.started = time.monotonic()
        self.bar: Progress | None = None
        self.task: TaskID | None = None
        self.last_line, self.last_at = "", 0.0
        self.last_key: tuple[str, int] | None = None

    def __enter__(self) -> Display:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None

    def _live(self) -> tuple[Progress, TaskID] | None:
        if not err.is_terminal:
            return None
        if self.bar is None:
            columns = (
                SpinnerColumn(),
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[stats]}"),
            )
            self.bar = Progress(*columns, _Elapsed(), console=err)
            self.task = self.bar.add_task("starting", total=None, stats="")
            self.bar.start()
        assert self.task is not None
        return self.bar, self.task

    def say(self, phase: str) -> None:
        """A phase of the run (uploading the input, creating the job, collecting the output)."""
        live = self._live()
        if live is not None:
            live[0].update(live[1], description=escape(phase))
            return
        if phase != self.last_line:
            self.last_line = phase
            self._plain(f"{escape(phase)} [dim]{duration(time.monotonic() - self.started)}[/]")

    def counts(self, counts: Counts) -> None:
        """The bar moves; a plain line when the state or the tenth finished changes, or a minute passed."""
        finished = counts.done + counts.failed + counts.skipped
        live = self._live()
        if live is not None:
            bar, task = live
            text = stats(counts, self.num_images)
            since = time.monotonic()
            bar.update(task, total=counts.total, completed=finished, description=counts.state, stats=text)
            bar.update(task, elapsed=counts.elapsed_s, since=since)
            return
        tenth = finished * 10 // counts.total if counts.total else 10
        key = (counts.state, tenth)
        now = time.monotonic()
        if key != self.last_key or now - self.last_at >= self.every_s:
            self.last_key, self.last_at = key, now
            line = f"{counts.state}: {finished}/{counts.total} lines, {stats(counts, self.num_images)}"
            self._plain(f"{escape(line)} [dim]{duration(counts.elapsed_s)}[/]")

    @staticmethod
    def _plain(line: str) -> None:
        err.print(line, soft_wrap=True, highlight=False)


# ---------------------------------------------------------------- the plan


def plan_dict(plan: BatchPlan) -> dict[str, Any]:
    """The plan as --dry-run --json prints it."""
    sub, estimate = plan.submission, plan.estimate
    return {
        "dry_run": True,
        "target": plan.target,
        "source": str(sub.batch.source),
        "lines": len(sub.batch.lines),
        "images": sub.batch.images,
        "parameters": sub.batch.parameters,
        "gpu": sub.gpu or None,
        "replicas": list(sub.replicas),
        "spot": sub.spot,
        "batch_size": sub.batch_size,
        "out": sub.out,
        "download": str(sub.download) if sub.download else None,
        "retry_of": sub.retry_of or None,
        "estimate": estimate.as_dict(),
        "notes": plan.notes,
    }


def plan(plan: BatchPlan, *, title: str = "plan (--dry-run: nothing was called)") -> None:
    """What the batch will do and cost, one fact a line, on stderr (before a question, or for --dry-run)."""
    sub, estimate = plan.submission, plan.estimate
    batch = sub.batch
    rows = [("file", f"{batch.source} ({plural(len(batch.lines), 'line')}, {plural(batch.images, 'image')})")]
    if plan.target == "local":
        rows += [("target", "local: this machine's model server (`sdxlctl deploy` starts it)")]
        rows += [("batch size", f"{plural(sub.batch_size, 'line')} a request")]
        rows += [("cost", "0.00 USD (nothing billed)")]
    else:
        from sdxlctl.gpus import GPUS

        option = GPUS.get(sub.gpu)
        gpu = f"{option.label} ({option.machine_type})" if option else sub.gpu
        unverified = "" if estimate.verified else " (unverified: a price used has no primary source)"
        rows += [
            ("target", f"vertex: Vertex AI batch prediction in {estimate.region}"),
            ("GPU", gpu + (", Spot" if sub.spot else "")),
            ("replicas", replicas(*sub.replicas)),
            ("batch size", f"{plural(sub.batch_size, 'line')} a request"),
            ("seconds/image", f"{estimate.seconds_per_image:,.1f} (estimated)"),
            ("replica hours", f"{estimate.replica_hours:,.2f} at {usd_per_hour(estimate.usd_per_replica_hour)} USD/h"),
            ("wall hours", f"{estimate.wall_hours:,.2f}"),
            ("cost", f"{estimate.usd:,.2f} USD{unverified}"),
        ]
    rows.append(("output", f"{sub.out.rstrip('/')}/ ({IMAGES}/ and {MANIFEST})"))
    if sub.download:
        rows.append(("download", f"{sub.download}/ ({IMAGES}/ and {MANIFEST})"))
    err.print(escape(title), highlight=False)
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        err.print(f"  {name.ljust(width)}  {escape(value)}", highlight=False, soft_wrap=True)
    for note in plan.notes:
        err.print(f"  [dim]{escape(note)}[/]", highlight=False, soft_wrap=True)


def declined(error: SdxlctlError) -> None:
    err.print(escape(error.message), highlight=False)
    if error.hint:
        err.print(f"[dim]hint:[/] {escape(error.hint)}", highlight=False, soft_wrap=True)


# ---------------------------------------------------------------- the end


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if folder.startswith("gs://") else str(Path(folder) / name)


def result_dict(result: BatchResult) -> dict[str, Any]:
    return {
        "where": result.where,
        "state": result.state,
        "out": result.out,
        "images": _join(result.out, IMAGES) + "/",
        "manifest": _join(result.out, MANIFEST),
        "download": str(result.download) if result.download else None,
        "done": result.done,
        "failed": [row.as_dict() for row in result.failed],
        "skipped": result.skipped,
        "seconds": round(result.seconds, 3),
        "error": result.error or None,
        "replica_hours": result.replica_hours,
        "usd": result.usd,
    }


def exit_code(result: BatchResult) -> int:
    """As a test runner: 1 when the job did not succeed or any line failed (the manifest says which)."""
    return 1 if result.failed or result.error or result.state in ENDED_BADLY else 0


def shown(result: BatchPlan | BatchResult | Notice, *, as_json: bool) -> int:
    """Show what door.run returned; the exit code."""
    if isinstance(result, Notice):
        if as_json:
            out.print_json(json.dumps({"message": result.message}))
        err.print(escape(result.message), soft_wrap=True)
        return 0
    if not isinstance(result, BatchResult):
        if as_json:
            out.print_json(json.dumps(plan_dict(result), default=str))
        else:
            plan(result)
        return 0
    if as_json:
        out.print_json(json.dumps(result_dict(result), default=str))
    else:
        ended(result)
    return exit_code(result)


def ended(result: BatchResult) -> None:
    """Where the images and the manifest are, what failed and why, and how to run the failed lines again."""
    failed = len(result.failed)
    bad = exit_code(result)
    mark = "[red]✗[/]" if result.state in ENDED_BADLY else "[yellow]![/]" if bad else "[green]✓[/]"
    counts = f"{result.done} done, {failed} failed" + (
        f", {result.skipped} skipped (done before)" if result.skipped else ""
    )
    err.print(f"{mark} {escape(result.state)}: {counts} in {duration(result.seconds)}", highlight=False)
    if result.error:
        err.print(f"[red]job error:[/] {escape(result.error)}", soft_wrap=True, highlight=False)
    where = result.download if result.download else None
    err.print(f"images:   {escape(_join(result.out, IMAGES))}/", soft_wrap=True, highlight=False)
    err.print(f"manifest: {escape(_join(result.out, MANIFEST))}", soft_wrap=True, highlight=False)
    if where is not None:
        err.print(f"on disk:  {escape(str(where / IMAGES))}/ and {escape(str(where / MANIFEST))}", soft_wrap=True)
    if result.replica_hours is not None:
        money = "" if result.usd is None else f", {result.usd:,.2f} USD"
        err.print(f"{result.replica_hours:,.2f} replica hours{money} (an estimate)", highlight=False)
    if result.failed:
        err.print("failed lines:", highlight=False)
        for row in result.failed[:SHOWN_FAILURES]:
            err.print(f"  line {row.line}: {escape(row.error or 'no answer')}", soft_wrap=True, highlight=False)
        if failed > SHOWN_FAILURES:
            err.print(f"  and {failed - SHOWN_FAILURES} more (the manifest lists each with its error)", highlight=False)
        err.print(
            "[dim]hint:[/] the same command with --retry-failed runs only the failed lines again, into the same output",
            soft_wrap=True,
        )
    # The manifest alone on stdout: what a script reads next (the one on disk when downloaded).
    out.print(str(where / MANIFEST) if where is not None else _join(result.out, MANIFEST))
