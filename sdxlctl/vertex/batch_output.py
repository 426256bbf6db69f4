"""A Vertex AI batch job's output made into <out>images/ and <out>manifest.jsonl in gs:// (and on disk with
--download): read back, chunk by chunk, so 10,000 images never sit in memory at once."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdxlctl.batch import IMAGES, KEY_FIELD, MANIFEST, Batch, Line, Row
from sdxlctl.errors import DeployError
from sdxlctl.steps import Progress

if TYPE_CHECKING:
    from sdxlctl.gcp.session import Cloud
    from sdxlctl.gcp.storage import Storage

CHUNK_LINES = 64  # output lines turned into images (and uploaded) at once
WORKERS = 8  # parallel uploads and downloads
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


def split_gs(uri: str) -> tuple[str, str]:
    """gs://bucket/a/b/ -> ("bucket", "a/b/")."""
    bucket, _, folder = uri.removeprefix("gs://").partition("/")
    return bucket, folder


def _storage(c: Cloud, uri: str) -> tuple[Storage, str]:
    from sdxlctl.gcp.storage import Storage

    bucket, folder = split_gs(uri)
    return Storage(c, bucket, {}), folder


def read_batch(c: Cloud, input_uri: str, out: str) -> Batch:
    """The batch a job runs, from the input sdxlctl uploaded for it."""
    storage, name = _storage(c, input_uri)
    data = storage.read(name)
    if data is None:
        raise DeployError(f"the job's input {input_uri} is gone", hint=f"its output stays under {out}")
    try:
        return batch_from_jsonl(Path(name.rsplit("/", 1)[-1]), data)
    except (ValueError, KeyError, TypeError) as exc:
        raise DeployError(f"{input_uri} is not an input `sdxlctl batch` wrote ({exc})") from None


def read_manifest(c: Cloud, out: str) -> dict[int, Row]:
    """The manifest under `out` (gs://), the last row of each line winning; {} when there is none."""
    from sdxlctl.batch import manifest

    storage, folder = _storage(c, out)
    data = storage.read(folder + MANIFEST)
    if not data:
        return {}
    with tempfile.TemporaryDirectory(prefix="sdxlctl-manifest-") as tmp:
        path = Path(tmp) / MANIFEST
        path.write_bytes(data)
        return manifest.read(path)


def collect(
    c: Cloud, job: dict[str, Any], batch: Batch, out: str, download: Path | None, say: Progress
) -> tuple[int, list[Row]]:
    """Images and manifest rows from every file under the job's output directory (not by name: Google's file
    names are not a contract); how many lines answered, and the failed rows. Lines with no answer failed too:
    with the job's own error when it has one."""
    from sdxlctl.batch import manifest

    storage, folder = _storage(c, out)
    rows: list[Row] = []
    directory = str(job.get("outputInfo", {}).get("gcsOutputDirectory", ""))
    if directory:
        raw, prefix = _storage(c, directory)
        names = [name for name, size in raw.sizes(prefix.rstrip("/") + "/").items() if size]
        with ThreadPoolExecutor(max_workers=WORKERS) as pool:
            for chunk in _chunks(raw, names):
                keys = {_key(line) for line in chunk}
                part = batch.only({k for k in keys if k is not None})
                got, files = manifest.rows_from_output(part, chunk)
                rows += got
                list(pool.map(lambda f: _put(storage, folder, download, f), files))
                say(f"{len(rows)} of {len(batch.lines)} lines collected")
    answered = {row.line for row in rows}
    missing = {line.number for line in batch.lines} - answered
    if missing:
        lost, _ = manifest.rows_from_output(batch.only(missing), [])
        why = str(job.get("error", {}).get("message", ""))
        rows += [replace(row, error=f"{row.error or 'no answer'} (the job: {why})") if why else row for row in lost]
    rows.sort(key=lambda row: row.line)
    text = _merged(storage.read(folder + MANIFEST), rows)
    storage.upload(folder + MANIFEST, text, content_type="application/jsonl")
    if download is not None:
        _mirror(storage, folder, text, download)
    failed = [row for row in rows if row.error]
    return len(rows) - len(failed), failed


def _chunks(storage: Storage, names: list[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    for name in names:
        for line in (storage.read(name) or b"").decode("utf-8", "replace").splitlines():
            if line.strip():
                chunk.append(line)
                if len(chunk) >= CHUNK_LINES:
                    yield chunk
                    chunk = []
    if chunk:
        yield chunk


def _key(line: str) -> int | None:
    try:
        return int(json.loads(line)["key"])
    except (ValueError, KeyError, TypeError):
        return None


def _put(storage: Storage, folder: str, download: Path | None, file: tuple[str, bytes]) -> None:
    relative, data = file
    storage.upload(
        folder + relative, data, content_type=CONTENT_TYPES.get(Path(relative).suffix, "application/octet-stream")
    )
    if download is not None:
        _write(download / relative, data)


def _write(path: Path, data: bytes, *, always: bool = False) -> None:
    """`data` at `path`, unless a file of that size is there (a resumed download); whole or not at all."""
    if not always and path.is_file() and path.stat().st_size == len(data):
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    partial.write_bytes(data)
    partial.replace(path)


def _merged(previous: bytes | None, rows: list[Row]) -> bytes:
    """The manifest so far with `rows` after it; a line's older rows are dropped (a retry replaces them)."""
    lines = {row.line for row in rows}
    kept = []
    for text in (previous or b"").decode("utf-8", "replace").splitlines():
        try:
            if int(json.loads(text)["line"]) not in lines:
                kept.append(text)
        except (ValueError, KeyError, TypeError):
            continue  # a damaged row: its line runs again with --retry-failed
    kept += [json.dumps(row.as_dict(), ensure_ascii=False) for row in rows]
    return "".join(line + "\n" for line in kept).encode()


def _mirror(storage: Storage, folder: str, manifest_text: bytes, dest: Path) -> None:
    """DIR/manifest.jsonl as in gs://, and every image it names that DIR lacks (an earlier run's too)."""
    sizes = storage.sizes(folder + IMAGES + "/")
    wanted = []
    for text in manifest_text.decode().splitlines():
        for relative in json.loads(text).get("images", []):
            size = sizes.get(folder + relative)
            local = dest / relative
            if size is not None and not (local.is_file() and local.stat().st_size == size):
                wanted.append(relative)

    def fetch(relative: str) -> None:
        data = storage.read(folder + relative)
        if data is not None:
            _write(dest / relative, data)

    with ThreadPoolExecutor(max_workers=WORKERS) as pool:
        list(pool.map(fetch, wanted))
    _write(dest / MANIFEST, manifest_text, always=True)


def batch_from_jsonl(source: Path, data: bytes) -> Batch:
    """The batch a job's uploaded input holds (the lines sdxlctl wrote: key, instance, shared parameters)."""
    lines: list[Line] = []
    parameters: dict[str, Any] = {}
    for text in data.decode().splitlines():
        if not text.strip():
            continue
        item = json.loads(text)
        parameters = item.pop("parameters", parameters)
        lines.append(Line(int(item.pop(KEY_FIELD)), item))
    return Batch(source, tuple(lines), dict(parameters))
