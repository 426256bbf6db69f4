"""A batch's files on disk: atomic writes, and the parallel, resumable copy of a gs:// folder to a local one.

The copy reads through callables (`list_objects() -> [(name, size)]`, `read(name) -> bytes`) so this module stays
plain (layer 3, no google imports): the target (vertex/batch.py) passes sdxlctl.gcp.storage-backed ones.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

PART = ".part"  # the suffix of a file being written: never a name a reader trusts

ListObjects = Callable[[], Iterable[tuple[str, int]]]
ReadObject = Callable[[str], bytes]
CopyProgress = Callable[[int, int], None]  # files done (written or already there), files in all


def write_atomic(path: Path, data: bytes) -> Path:
    """Write `data` to `path` through a temporary file beside it and a rename: an interrupted write leaves the
    old file (or none) and a stray *.part, never a half file under the real name that a resume would trust."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=PART)
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())  # the rename must not land before the bytes (a power cut after it)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return path


def safe_name(name: str) -> PurePosixPath | None:
    """`name` as a relative path that stays inside its folder, or None (absolute, `..`, empty parts, backslash)."""
    if not name or "\\" in name or "\x00" in name or name.startswith("/"):
        return None
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    return PurePosixPath(*parts)


@dataclass
class Copied:
    """What a copy did: files written, files already there (right size), and the names it could not copy."""

    written: int = 0
    present: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # name -> one-line reason
    refused: list[str] = field(default_factory=list)  # names that would land outside the folder

    @property
    def ok(self) -> bool:
        return not self.failed and not self.refused


def download(
    list_objects: ListObjects,
    read: ReadObject,
    dest: Path,
    *,
    workers: int = 8,
    progress: CopyProgress | None = None,
) -> Copied:
    """Copy every listed object to `dest`/<name>, `workers` at a time. A file already there with the listed size
    is skipped (a rerun resumes); each file is written atomically. One object that fails is reported in
    `failed` and the others go on; a name that would escape `dest` is refused, never written."""
    from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

    result = Copied()
    todo: list[tuple[str, Path]] = []
    listed = list(list_objects())
    for name, size in listed:
        relative = safe_name(name)
        if relative is None:
            result.refused.append(name)
            continue
        target = dest.joinpath(*relative.parts)
        if target.is_file() and target.stat().st_size == size:
            result.present += 1
        else:
            todo.append((name, target))
    total = result.present + len(todo)
    done = result.present
    if progress:
        progress(done, total)

    def copy(name: str, target: Path) -> None:
        write_atomic(target, read(name))

    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="sdxlctl-copy")
    try:
        running: dict[Future[None], str] = {}
        pending = iter(todo)
        # A bounded window rather than submitting everything: Ctrl-C leaves at most `workers` files in flight.
        for name, target in pending:
            running[pool.submit(copy, name, target)] = name
            if len(running) >= workers * 2:
                break
        while running:
            finished, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in finished:
                name = running.pop(future)
                error = future.exception()
                if error is None:
                    result.written += 1
                else:
                    result.failed[name] = one_line(f"{type(error).__name__}: {error}")
                done += 1
                if progress:
                    progress(done, total)
                following = next(pending, None)
                if following is not None:
                    running[pool.submit(copy, *following)] = following[0]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return result


def one_line(text: str, limit: int = 500) -> str:
    """`text` on one line (whitespace runs collapsed), cut to `limit` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= limit else flat[: limit - 1] + "…"
