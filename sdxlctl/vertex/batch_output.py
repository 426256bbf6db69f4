"""A Vertex AI batch job's output made into <out>images/ and <out>manifest.jsonl in gs:// (and on disk with
--download): read back, chunk by chunk, so 10,000 images never sit in memory at once."""

from __future__ import annotations

import json
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdxlctl.batch import IMAGES, KEY_FIELD, MANIFEST, Batch, Line, Row
from sdxlctl.batch.rules import MAX_SIDE
from sdxlctl.errors import DeployError
from sdxlctl.steps import Progress

if TYPE_CHECKING:
    from sdxlctl.gcp.session import Cloud
    from sdxlctl.gcp.storage import Storage

CHUNK_FILES = 32  # images decoded before they are uploaded, in parallel (what sits in memory)
WORKERS = 8  # parallel uploads and downloads
# The longest output line an answer can make, per image: a 2048x2048 PNG at its worst (RGB not compressed at
# all, a filter byte a row, zlib's few bytes a block), in base64, twice over for room; a line past
# num_images of these plus LINE_ROOM is no answer of this server and is skipped unread.
IMAGE_CHARS_MOST = 2 * 4 * (MAX_SIDE * (MAX_SIDE * 3 + 1) * 1001 // 1000 + 1024) // 3
LINE_ROOM = 1 << 20  # the JSON around the images: key, instance echo, seeds, parameters
KEY_IN_HEAD = re.compile(r'"key"\s*:\s*"?(\d{1,18})"?')
SOURCE = "batch.json"  # which prompts file the batch in this folder is of
RAW = "raw/"  # the job's outputUriPrefix under <out>: Vertex AI adds prediction-<model>-<time>/ below it
CONTENT_TYPES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".webp": "image/webp"}


def split_gs(uri: str) -> tuple[str, str]:
    """gs://bucket/a/b/ -> ("bucket", "a/b/")."""
    bucket, _, folder = uri.removeprefix("gs://").partition("/")
    return bucket, folder


def out_of(job: dict[str, Any]) -> str:
    """The folder of the images and the manifest: the job's outputUriPrefix less raw/."""
    prefix = str(job.get("outputConfig", {}).get("gcsDestination", {}).get("outputUriPrefix", ""))
    if not prefix.startswith("gs://"):
        raise DeployError(f"job {job.get('name')} writes no gs:// output", hint="it was not started by `sdxlctl batch`")
    prefix = prefix.rstrip("/") + "/"
    return prefix.removesuffix(RAW) if prefix.endswith(RAW) else prefix


def input_of(job: dict[str, Any]) -> str:
    uris = job.get("inputConfig", {}).get("gcsSource", {}).get("uris", [])
    if len(uris) != 1:
        raise DeployError(
            f"job {job.get('name')} does not read one JSONL file", hint="it was not started by `sdxlctl batch`"
        )
    return str(uris[0])


def claim_folder(storage: Storage, folder: str, out: str, source: Path) -> None:
    """Refuse `out` when it holds another prompts file's batch (a second file sent to the same --out would mix
    its rows and images into that batch's manifest), else record `source` there as <out>batch.json (as the
    local target's <out>/batch.json). A folder of an earlier sdxlctl, a manifest and no batch.json: this file's."""
    from sdxlctl.errors import UsageError

    mine = str(source.resolve())
    data = storage.read(folder + SOURCE)
    if data is None:
        recorded = mine if storage.read(folder + MANIFEST) is not None else None
    else:
        try:
            recorded = json.loads(data.decode("utf-8")).get("source")
        except (ValueError, AttributeError):
            recorded = None  # damaged: this batch's from now on
    if recorded is not None and recorded != mine:
        raise UsageError(
            f"--out {out} holds the batch of {recorded}, not of {mine}",
            hint="pass --out with another gs:// folder (or run the batch of that file)",
        )
    if data is None or recorded is None:
        storage.upload(folder + SOURCE, (json.dumps({"source": mine}) + "\n").encode(), content_type="application/json")


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


def read_manifest(c: Cloud, out: str) -> dict[int, Row] | None:
    """The manifest under `out` (gs://), the last row of each line winning; None when there is none."""
    from sdxlctl.batch import manifest

    storage, folder = _storage(c, out)
    data = storage.read(folder + MANIFEST)
    if data is None:
        return None
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
    directory = str(job.get("outputInfo", {}).get("gcsOutputDirectory", ""))
    raw = out + "raw/"  # the job's outputUriPrefix: Vertex AI writes one folder below it
    if directory and (not directory.startswith(raw) or ".." in directory.split("/")):
        # read nothing a job names elsewhere (another bucket or folder): sdxlctl reads only what it asked for
        raise DeployError(
            f"job {job.get('name')} reports its output in {directory}, outside {raw}",
            hint="it was not started by `sdxlctl batch` with this output folder; nothing was read or written",
        )
    pending: list[tuple[str, bytes]] = []
    written = [0]
    with ThreadPoolExecutor(max_workers=WORKERS, thread_name_prefix="sdxlctl-upload") as pool:

        def flush() -> None:
            list(pool.map(lambda file: _put(storage, folder, download, file), pending))
            written[0] += len(pending)
            pending.clear()
            say(f"{written[0]} images written to {out}{IMAGES}/")

        def sink(files: list[tuple[str, bytes]]) -> None:  # a line's images, as they are decoded
            pending.extend(files)
            if len(pending) >= CHUNK_FILES:
                flush()

        long_lines: list[str] = []
        lines = _lines(c, directory, line_limit(batch), long_lines)
        output = manifest.collect_output(batch, lines, sink=sink)
        flush()
    for skipped in long_lines[:3]:
        say(f"output not used: {skipped}")
    for skipped in output.skipped[:3]:
        say(f"output not used: {skipped}")
    why = str(job.get("error", {}).get("message", ""))
    rows = [
        replace(row, error=f"{row.error} (the job: {why})") if why and row.error == manifest.NO_ANSWER else row
        for row in output.rows
    ]
    text = _merged(storage.read(folder + MANIFEST), rows)
    storage.upload(folder + MANIFEST, text, content_type="application/jsonl")
    if download is not None:
        _mirror(storage, folder, text, download, say)
    failed = [row for row in rows if row.error]
    return len(rows) - len(failed), failed


def line_limit(batch: Batch) -> int:
    """Characters an output line of `batch` may have: num_images of the largest image, and room."""
    most = batch.parameters.get("num_images", 1)
    return (most if isinstance(most, int) and most > 0 else 1) * IMAGE_CHARS_MOST + LINE_ROOM


def _lines(c: Cloud, directory: str, limit: int, long_lines: list[str]) -> Iterator[str]:
    """Every line of every file under the output directory, file by file (in name order). A line over
    `limit` is not read: its line fails (when its key shows in its head), else it is listed in `long_lines`."""
    from sdxlctl.gcp.storage import LongLine

    if not directory:
        return
    raw, prefix = _storage(c, directory)
    for name, size in raw.sizes(prefix.rstrip("/") + "/").items():
        if not size:
            continue
        for position, text in enumerate(raw.lines(name, limit=limit), start=1):
            if not isinstance(text, LongLine):
                yield text
                continue
            why = f"its answer ({text.chars:,} characters) is over the {limit:,} it can be: not read"
            key = KEY_IN_HEAD.search(text.head.split('"prediction"', 1)[0])
            if key:
                yield json.dumps({KEY_FIELD: key[1], "error": {"message": why}})
            else:
                long_lines.append(f"{name.rsplit('/', 1)[-1]} line {position}: {why}")


def _put(storage: Storage, folder: str, download: Path | None, file: tuple[str, bytes]) -> None:
    from sdxlctl.batch.files import write_atomic

    relative, data = file
    kind = CONTENT_TYPES.get(Path(relative).suffix, "application/octet-stream")
    storage.upload(folder + relative, data, content_type=kind)
    if download is not None:
        local = download / relative
        if not (local.is_file() and local.stat().st_size == len(data)):
            write_atomic(local, data)


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


def _mirror(storage: Storage, folder: str, manifest_text: bytes, dest: Path, say: Progress) -> None:
    """DIR/manifest.jsonl as in gs://, and every image it names that DIR lacks (an earlier run's too): parallel,
    and a file already there with the right size is not fetched again."""
    from sdxlctl.batch.files import download, write_atomic

    sizes = storage.sizes(folder + IMAGES + "/")
    named = {image for text in manifest_text.decode().splitlines() for image in _images(text)}
    listed = [(relative, sizes[folder + relative]) for relative in sorted(named) if folder + relative in sizes]

    def read(relative: str) -> bytes:
        data = storage.read(folder + relative)
        if data is None:
            raise FileNotFoundError(f"gs://{storage.bucket_name}/{folder}{relative}")
        return data

    copied = download(lambda: listed, read, dest, workers=WORKERS)
    for name, why in list(copied.failed.items())[:3]:
        say(f"not downloaded: {name}: {why} (run the same --attach --download again: it resumes)")
    write_atomic(dest / MANIFEST, manifest_text)


def _images(text: str) -> list[str]:
    """A manifest row's image names; an older row kept from a damaged or edited manifest may hold anything."""
    try:
        row = json.loads(text)
    except ValueError:
        return []
    images = row.get("images") if isinstance(row, dict) else None
    return [image for image in images if isinstance(image, str)] if isinstance(images, list) else []


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
