"""Target local: a process's log file, read (the last lines, those since a time) and followed as it grows."""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from sdxlctl.steps import LogLine, Progress, quiet

FOLLOW_POLL_S = 0.25
# A line that starts with a time: "2026-12-02T10:00:00Z ...", "[2026-12-02 10:00:00,123] ..."
LEADING_TIME = re.compile(r"^\[?(\d{4}-\d\d-\d\d[T ]\d\d:\d\d:\d\d(?:[.,]\d+)?(?:Z|[+-]\d\d:?\d\d)?)")


def line_time(text: str) -> datetime | None:
    """When a line was written, where it says: a JSON line's "time" or "timestamp" (the fields Cloud
    Logging reads as the entry's time), or a time at its start. Without a zone: this machine's."""
    raw: object = None
    if text.startswith("{"):
        try:
            data = json.loads(text)
        except ValueError:
            data = None
        if isinstance(data, dict):
            raw = data.get("time") or data.get("timestamp")
    else:
        match = LEADING_TIME.match(text)
        raw = match.group(1).replace(",", ".") if match else None
    if not isinstance(raw, str):
        return None
    raw = re.sub(r"(\.\d{6})\d+", r"\1", raw.replace(" ", "T"))  # fromisoformat takes microseconds at most
    try:
        stamp = datetime.fromisoformat(raw)
    except ValueError:
        return None
    return stamp if stamp.tzinfo else stamp.astimezone()


def read(
    path: Path,
    *,
    lines: int | None,
    since: datetime | None,
    follow: bool,
    warn: Progress = quiet,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[LogLine]:
    """The file's lines (those since `since`, the last `lines` of them); then, with `follow`, each line
    appended later, across a truncation or a new file of the same name, until the caller stops."""
    with path.open("rb") as file:
        inode, size = _identity(file.fileno())
        start = _tail_start(file, size, lines) if lines is not None and since is None else 0
        file.seek(start)
        data = file.read(size - start)
    # A last line still being written: a follow shows it once it ends
    complete, _, partial = data.rpartition(b"\n")
    texts = _decode(complete) + ([partial.decode(errors="replace")] if partial and not follow else [])
    shown = [LogLine(text, line_time(text)) for text in texts]
    if since is not None:
        shown = _since(shown, since, path, warn)
    if lines is not None:
        shown = shown[-lines:] if lines else []
    yield from shown
    if not follow:
        return
    offset, pending = start + len(data), partial
    while True:
        sleep(FOLLOW_POLL_S)
        try:
            with path.open("rb") as file:
                now, size = _identity(file.fileno())
                if now != inode or size < offset:  # replaced or truncated: read the new one from its start
                    inode, offset, pending = now, 0, b""
                file.seek(offset)
                more = file.read()
        except FileNotFoundError:  # removed, not yet made again: the next one is new (its inode may be reused)
            inode = -1
            continue
        offset += len(more)
        complete, newline, pending = (pending + more).rpartition(b"\n")
        if newline:
            for text in _decode(complete):
                yield LogLine(text, line_time(text))


def _tail_start(file: BinaryIO, size: int, lines: int) -> int:
    """Where the last `lines` lines begin, found from the end in growing blocks: `-n 20` of a big log reads little."""
    block, start = 1 << 16, size
    while start > 0:
        start = max(0, start - block)
        file.seek(start)
        chunk = file.read(size - start)
        if chunk.count(b"\n") > lines:  # the line cut at `start` is not one of them: begin after it
            return start + chunk.index(b"\n") + 1
        block *= 2
    return 0


def _identity(fd: int) -> tuple[int, int]:
    import os

    stat = os.fstat(fd)
    return stat.st_ino, stat.st_size


def _decode(block: bytes) -> list[str]:
    return block.decode(errors="replace").splitlines() if block else []


def _since(shown: list[LogLine], since: datetime, path: Path, warn: Progress) -> list[LogLine]:
    """The lines written at `since` or later: a line with no time of its own (a traceback's) goes with
    the timed line before it; lines before the first timed one with that one."""
    if not any(line.time for line in shown):
        changed = datetime.fromtimestamp(path.stat().st_mtime, UTC)
        warn(f"{path.name}: its lines carry no time; shown whole if it changed since then, else not at all")
        return shown if changed >= since else []
    when = next(line.time for line in shown if line.time)
    kept = []
    for line in shown:
        when = line.time or when
        if when >= since:
            kept.append(line)
    return kept
