"""`sdxlctl batch` on target local: the lines through the running local server, resumable.

Each answer is written out (its images, then its manifest rows, appended) before the next request goes: an
interrupt or a server that went away loses at most the request in flight, and a rerun of the same command
skips every line the manifest already holds, so no answered line is ever generated twice.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sdxlctl import client
from sdxlctl.batch import (
    IMAGES,
    INPUT,
    KEY_FIELD,
    MANIFEST,
    Batch,
    BatchProgress,
    BatchResult,
    Counts,
    Line,
    Row,
    Submission,
    no_progress,
)
from sdxlctl.config import Config
from sdxlctl.errors import DeployError, Interrupted, PredictError, UsageError
from sdxlctl.local import SERVER
from sdxlctl.state import StateStore, interrupts_deferred
from sdxlctl.steps import Progress, plural, quiet

SOURCE = "batch.json"  # which prompts file this folder's batch is of
RESUME_HINT = "run the same command again: it skips the lines already done"
# Answers that say the server cannot take work now (after the client's own retries): every later request would
# meet the same, so the batch stops and a rerun resumes, instead of failing lines that were never tried.
NOT_NOW = (429, 503)


def run(
    config: Config,
    store: StateStore,
    submission: Submission,
    *,
    progress: BatchProgress = no_progress,
    say: Progress = quiet,
) -> BatchResult:
    """Send the lines not yet in the manifest, `batch_size` at a time; write images and rows as they come."""
    batch, out = submission.batch, Path(submission.out)
    _check_folder(out, batch.source)  # before anything is read or written there
    rows = previous_rows(config, store, out)
    todo, tally, changed = _plan(batch, rows, out, retry=bool(submission.retry_of))
    url = _predict_url(config, store) if todo else ""  # a batch already done needs no server
    _write_input(out, batch, keep=bool(submission.retry_of))
    if tally.skipped:
        are = "are" if tally.skipped > 1 else "is"
        say(f"{tally.skipped} of {plural(len(batch.lines), 'line')} {are} already done in {out / MANIFEST}: skipped")
    if changed:
        differ = "differ from their manifest rows" if changed > 1 else "differs from its manifest row"
        say(f"{plural(changed, 'line')} {differ} (prompt, seed or parameters): made again")
    if tally.failed:
        them = "them" if len(tally.failed) > 1 else "it"
        say(f"{plural(len(tally.failed), 'line')} failed before: `--retry-failed` runs {them} again")
    size = max(1, submission.batch_size)
    try:
        progress(tally.counts(len(batch.lines)))
        for start in range(0, len(todo), size):
            chunk = todo[start : start + size]
            new_rows, files = _ask(config, batch, chunk, url, tally)
            # A Ctrl-C from here on waits until the answer is on disk: its lines are never asked for again.
            with interrupts_deferred():
                _write_images(config, out, files, [row.seed for row in new_rows], tally, len(batch.lines))
                _append(out, new_rows)
                tally.add(new_rows)  # before a held Ctrl-C lands, so its message counts these lines
            progress(tally.counts(len(batch.lines)))
    except KeyboardInterrupt:
        raise Interrupted(f"interrupted after {tally.finished} of {len(batch.lines)} lines", hint=RESUME_HINT) from None
    return tally.result(url, out)


def previous_rows(config: Config, store: StateStore, out: Path) -> dict[int, Row]:
    """The manifest rows already in `out` (for resume and --retry-failed)."""
    from sdxlctl.batch import manifest

    return manifest.read(Path(out) / MANIFEST)


# ---------------------------------------------------------------- what to run, and what it came to


@dataclass
class _Tally:
    started: float = field(default_factory=time.monotonic)
    done: int = 0  # lines answered with images, this run
    skipped: int = 0  # lines done before (their row has no error and their images are there)
    failed: list[Row] = field(default_factory=list)  # this run's failures, and earlier ones not retried now

    @property
    def finished(self) -> int:
        return self.done + self.skipped + len(self.failed)

    def add(self, rows: list[Row]) -> None:
        self.done += sum(row.error is None for row in rows)
        self.failed.extend(row for row in rows if row.error is not None)

    def counts(self, total: int) -> Counts:
        elapsed = time.monotonic() - self.started
        return Counts(self.done, len(self.failed), total, "running", elapsed, skipped=self.skipped)

    def result(self, url: str, out: Path) -> BatchResult:
        # As a Vertex AI job ends: FAILED only when no line made an image, else SUCCEEDED with its failures listed.
        all_failed = bool(self.failed) and not self.done and not self.skipped
        return BatchResult(
            where=url,
            out=str(out),
            state="FAILED" if all_failed else "SUCCEEDED",
            done=self.done,
            failed=sorted(self.failed, key=lambda row: row.line),
            skipped=self.skipped,
            seconds=time.monotonic() - self.started,
            error=(self.failed[0].error or "") if all_failed else "",
            replica_hours=None,
            usd=0.0,
        )


def _plan(batch: Batch, rows: dict[int, Row], out: Path, *, retry: bool) -> tuple[list[Line], _Tally, int]:
    """The lines to send now: those with no row, or whose images are gone; failed ones only on a retry.
    A row made from another prompt, seed or parameters (the file was edited, the flags changed) is no answer
    to this line: it runs again, and its new row is the one that counts. Also: how many such rows there were."""
    from sdxlctl.batch import manifest

    done = manifest.done_lines(rows, out)  # no error, and every image still there
    tally, todo, changed = _Tally(), [], 0
    for line in batch.lines:
        row = rows.get(line.number)
        if row is not None and (
            (row.prompt, row.seed, row.parameters) != (line.prompt, line.seed, batch.parameters)
            or (row.instance is not None and row.instance != sent(line))  # a style or negative prompt edited
        ):
            changed += 1
        elif line.number in done:
            tally.skipped += 1
            continue
        elif row is not None and row.error is not None and not retry:
            tally.failed.append(row)
            continue
        todo.append(line)  # never run, changed, failed and retried now, or its images were deleted since
    return todo, tally, changed


def _predict_url(config: Config, store: StateStore) -> str:
    resource = store.read().get(config.name, SERVER)
    if resource is None or not resource.url:
        raise DeployError(f"nothing is deployed for {config.name!r} (target local)", hint="run `sdxlctl deploy` first")
    return resource.url + str(resource.details.get("predict_route", "/predict"))


def request_body(batch: Batch, lines: list[Line]) -> dict[str, Any]:
    """One request: the lines' instances and the shared parameters once, at the body's level, which every
    server version reads (a per-instance copy, as the Vertex AI input carries, would say nothing more here)."""
    return {"instances": [sent(line) for line in lines], "parameters": batch.parameters}


def sent(line: Line) -> dict[str, Any]:
    """The instance a line is sent as (and its manifest row records)."""
    return {k: v for k, v in line.instance.items() if k not in (KEY_FIELD, "parameters")}


def _ask(
    config: Config, batch: Batch, lines: list[Line], url: str, tally: _Tally
) -> tuple[list[Row], list[tuple[str, bytes]]]:
    """The rows and image files of one request; a refusal fails its lines; a server gone stops the batch."""
    from sdxlctl.batch import manifest

    total = len(batch.lines)
    try:
        answer = client.predict(url, request_body(batch, lines), timeout_s=config.model.time_limit_s + 10)
    except client.Refused as exc:
        if exc.status in NOT_NOW:
            raise _stopped(exc, tally, total) from None
        errors = refusal(exc, lines)
        pairs = zip(lines, errors, strict=True)
        return [Row(ln.number, ln.prompt, ln.seed, batch.parameters, [], e, sent(ln)) for ln, e in pairs], []
    except PredictError as exc:  # nothing answers, no answer in time, the connection broke, not the contract
        raise _stopped(exc, tally, total) from None
    rows, files = manifest.rows_from_answer(batch, [line.number for line in lines], answer, images_dir=IMAGES)
    return [replace(row, instance=sent(line)) for row, line in zip(rows, lines, strict=True)], files


def refusal(exc: client.Refused, lines: list[Line]) -> list[str]:
    """Each line's error from a refused request. The server names an instance by its place in the request
    (instances[1].bogus): that is said as the line's own error, and the others of the request say which line
    took them down, so the manifest points at the line to fix."""
    import re

    message, field = exc.server_message, exc.field or ""
    found = re.fullmatch(r"instances\[(\d+)\]\.?(.*)", field)
    if found is None or int(found[1]) >= len(lines):
        text = f"{field}: {message}" if field and field not in message else message
        return [text] * len(lines)
    culprit, rest = lines[int(found[1])], found[2]
    own = message.replace(field, rest or "instance")
    own = f"{rest}: {own}" if rest and rest not in own else own
    return [
        own if line is culprit else f"refused with line {culprit.number} of the same request: {own}" for line in lines
    ]


def _stopped(exc: PredictError, tally: _Tally, total: int) -> PredictError:
    # the client's "then try again" is what RESUME_HINT says for a batch: said once, the batch's way
    hint = exc.hint.removesuffix("; then try again") + "; then " if exc.hint else ""
    return PredictError(
        f"{exc.message}: the batch stopped after {tally.finished} of {total} lines (their images and rows are kept)",
        hint=hint + RESUME_HINT,
    )


# ---------------------------------------------------------------- files


def _check_folder(out: Path, source: Path) -> None:
    """`out` is this file's folder, or a new one: another file's batch there (a prompts.txt elsewhere has the
    same default folder) would have its images overwritten line by line and its other rows mixed with these."""
    import json

    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is a file; the images need a folder", hint="pass --out with a folder's name")
    path, mine = out / SOURCE, str(source.resolve())
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("source")
    except FileNotFoundError:
        recorded = mine if (out / MANIFEST).exists() else None  # a folder of an earlier sdxlctl: as it was
    except (OSError, ValueError, AttributeError):
        recorded = None  # damaged: this batch's from now on
    if recorded is not None and recorded != mine:
        raise UsageError(
            f"{out} holds the batch of {recorded}, not of {mine}",
            hint="pass --out with another folder (or run the batch of that file)",
        )


def _write_input(out: Path, batch: Batch, *, keep: bool) -> None:
    """<out>/input.jsonl: the normalised lines; a --retry-failed run (a part of them) keeps the whole one there."""
    import json

    from sdxlctl.batch import files

    files.write_atomic(out / SOURCE, (json.dumps({"source": str(batch.source.resolve())}) + "\n").encode())
    path = out / INPUT
    if keep and path.is_file():
        return
    files.write_atomic(path, batch.jsonl())


def _write_images(
    config: Config, out: Path, images: list[tuple[str, bytes]], seeds: list[int], tally: _Tally, total: int
) -> None:
    """Each image whole or not at all; when they cannot be written (disk full) predict's way keeps them: the
    rescue folder, and the batch stops (their rows are not written, so a rerun makes these lines again)."""
    from sdxlctl import outputs
    from sdxlctl.batch import manifest

    try:
        manifest.write_images(out, images)
    except OSError:
        names = [out / relative for relative, _ in images]
        try:
            outputs.write(names, [data for _, data in images], rescue=[config.home / "rescued"], seeds=seeds)
        except PredictError as exc:
            raise _stopped(exc, tally, total) from None


def _append(out: Path, rows: list[Row]) -> None:
    from sdxlctl.batch import manifest

    manifest.append(out / MANIFEST, rows)
