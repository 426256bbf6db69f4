"""Copy a gs:// folder to local disk before loading it (diffusers reads local files only).

Objects are fetched in parallel (google-cloud-storage's transfer manager, thread workers: the client must
not be pickled), each verified against the crc32c GCS keeps for it. A manifest beside the cache folder
records what was verified (generation, crc32c, size, local mtime), so a later start fetches only what
changed in the bucket or on disk; a size match alone proves nothing (a replaced unet can have the same size).
"""

from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl_server.errors import ModelLoadError
from sdxl_server.logs import log

WORKERS = 8  # the transfer manager's default: connections at once, per object and for the small files
CHUNK_BYTES = 32 * 1024 * 1024  # objects bigger than this are fetched as concurrent ranged reads
PROGRESS_EVERY_S = 5.0
REQUEST_TIMEOUT_S = 60.0  # per HTTP request (connect and each read), not per object: a 5 GB unet takes longer


@dataclass
class _Object:
    """One object to fetch: its name relative to the folder, the listed blob, where it goes, what it is."""

    name: str
    blob: Any
    target: Path
    generation: int | None = None
    crc32c: str | None = None
    size: int = 0

    def __post_init__(self) -> None:
        self.remember()

    def remember(self) -> None:
        """Keep the listed version: a download overwrites the blob's fields from its response's headers."""
        self.generation, self.crc32c, self.size = self.blob.generation, self.blob.crc32c, self.blob.size or 0

    @property
    def uri(self) -> str:
        return f"gs://{self.blob.bucket.name}/{self.blob.name}"


def download_folder(
    uri: str,
    cache_dir: Path,
    *,
    missing_ok: bool = False,
    select: Callable[[list[str]], Collection[str]] | None = None,
    workers: int = WORKERS,
    chunk_bytes: int = CHUNK_BYTES,
    progress_every_s: float = PROGRESS_EVERY_S,
) -> Path:
    """Download the objects under gs://bucket/prefix to a folder under cache_dir; verified files are kept.

    `select` gets every object's name relative to the folder and returns those to download (None: all), so
    a caller can skip files it will not load (fp32 duplicates of an fp16 variant). An empty or missing
    folder is an error, unless `missing_ok` (a cache nobody has filled yet).
    """
    bucket_name, prefix = _split(uri)
    # A hash of the folder (bucket and prefix, however the URI spelled its slashes): two folders never share a
    # cache, one folder always has the same one, and its name needs no escaping.
    destination = cache_dir / hashlib.sha256(f"gs://{bucket_name}/{prefix}".encode()).hexdigest()[:16]
    try:
        gcs = client()
        listed = [
            b
            for b in gcs.list_blobs(bucket_name, prefix=f"{prefix}/" if prefix else None, timeout=REQUEST_TIMEOUT_S)
            if not b.name.endswith("/")  # folder placeholders that consoles create
        ]
    except Exception as exc:  # auth, network, permissions: all end the load with a reason
        raise ModelLoadError(f"could not list {uri}: {type(exc).__name__}: {exc}") from exc
    if not listed and missing_ok:
        destination.mkdir(parents=True, exist_ok=True)
        return destination
    if not listed:
        raise ModelLoadError(f"{uri} is empty or does not exist")

    # every listed name is checked before select and before anything is written: one hostile object
    # in the folder is reason enough to load nothing from it
    objects: dict[str, _Object] = {}
    for blob in listed:
        name = blob.name[len(prefix) + 1 :] if prefix else blob.name
        objects[name] = _Object(name, blob, _target(destination, name, f"gs://{bucket_name}/{blob.name}"))
    wanted = set(objects) if select is None else set(select(sorted(objects))) & set(objects)

    manifest = _Manifest(cache_dir / f"{destination.name}.manifest.json", destination)
    manifest.forget_all_but(set(objects))
    stale = [objects[n] for n in sorted(wanted) if not manifest.is_current(objects[n])]
    if not stale:
        log(f"{uri}: all {len(wanted)} files are cached and current", uri=uri, objects=len(wanted))
        return destination
    _Transfer(uri, manifest, workers, chunk_bytes, progress_every_s).run(stale, cached=len(wanted) - len(stale))
    return destination


def upload_file(path: Path, uri: str) -> None:
    """Copy one local file to gs://bucket/folder/<its name>."""
    bucket_name, prefix = _split(uri)
    name = f"{prefix}/{path.name}" if prefix else path.name
    client().bucket(bucket_name).blob(name).upload_from_filename(str(path), timeout=REQUEST_TIMEOUT_S)


def _target(destination: Path, name: str, uri: str) -> Path:
    """Where object `name` goes under destination, or ModelLoadError if it would land anywhere else."""
    reason = name_problem(name)
    if reason is None:
        target = destination.joinpath(*name.split("/"))
        # a symlink planted in the cache folder would redirect an innocent name
        if not target.resolve().is_relative_to(destination.resolve()):
            reason = f"it resolves to {target.resolve()}"
        else:
            return target
    raise ModelLoadError(
        f"refusing {uri}: its file would be written outside the cache folder {destination} ({reason}); "
        "rename or delete that object"
    )


def name_problem(name: str) -> str | None:
    """Why an object name could not safely become a relative file path (None: it can)."""
    parts = name.split("/")
    if "\\" in name:
        return "it contains a backslash, a path separator on Windows and in some tools"
    if "\x00" in name:
        return "it contains a NUL byte"
    if name.startswith("/"):
        return "it is an absolute path"
    if ".." in parts:
        return "it has a '..' segment"
    if "." in parts or "" in parts:
        return "it has an empty or '.' segment, so two objects could map to one file"
    return None


class _Manifest:
    """What was verified in the cache folder: name -> generation, crc32c, size and local mtime (JSON)."""

    def __init__(self, path: Path, destination: Path) -> None:
        self.path = path
        self.destination = destination
        self._lock = threading.Lock()
        try:
            entries = json.loads(path.read_text())["objects"]
        except (OSError, ValueError, KeyError, TypeError):
            entries = {}  # none yet, or unreadable: every file counts as unverified
        valid = isinstance(entries, dict)
        self.entries: dict[str, dict[str, Any]] = {
            k: v for k, v in (entries.items() if valid else ()) if isinstance(k, str) and isinstance(v, dict)
        }

    def is_current(self, obj: _Object) -> bool:
        """Whether obj's file holds the listed object's bytes: same object version, untouched since verified."""
        entry = self.entries.get(obj.name)
        if not entry:
            return False
        try:
            stat = obj.target.stat()
        except OSError:
            return False
        return (
            entry.get("generation") == obj.generation
            and entry.get("crc32c") == obj.crc32c
            and entry.get("size") == obj.size == stat.st_size
            and entry.get("mtime_ns") == stat.st_mtime_ns
        )

    def forget_all_but(self, listed: set[str]) -> None:
        """Delete files this cache fetched for objects the bucket no longer has, so the folder mirrors it."""
        gone = [name for name in self.entries if name not in listed]
        for name in gone:
            del self.entries[name]
            with contextlib.suppress(ModelLoadError, OSError):  # a hand-edited manifest names nothing to touch
                _target(self.destination, name, name).unlink(missing_ok=True)
        if gone:
            self._write()

    def record(self, obj: _Object) -> None:
        """Note that obj's file now holds this verified version of the object."""
        with self._lock:
            self.entries[obj.name] = {
                "generation": obj.generation,
                "crc32c": obj.crc32c,
                "size": obj.size,
                "mtime_ns": obj.target.stat().st_mtime_ns,
            }
            self._write()

    def _write(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps({"objects": self.entries}, indent=1, sort_keys=True))
        partial.replace(self.path)


class _Transfer:
    """Fetch objects in parallel: big ones one after another, each in concurrent chunks; small ones side by side."""

    def __init__(self, uri: str, manifest: _Manifest, workers: int, chunk_bytes: int, progress_every_s: float) -> None:
        self.uri = uri
        self.manifest = manifest
        self.workers = max(1, workers)
        self.chunk_bytes = max(1, chunk_bytes)
        self.progress_every_s = progress_every_s
        self._lock = threading.Lock()
        self._done_bytes = 0
        self._reported = 0
        self._in_flight: dict[Path, int] = {}
        self._stop = threading.Event()

    def run(self, objects: list[_Object], *, cached: int) -> None:
        """Fetch every object, logging progress and a final line with the rate; ModelLoadError names a failure."""
        total = sum(o.size for o in objects)
        log(
            f"{self.uri}: downloading {len(objects)} files, {total / 1e6:.1f} MB ({cached} cached and current)",
            uri=self.uri,
            objects=len(objects),
            bytes_total=total,
            cached=cached,
        )
        started = time.monotonic()
        big = [o for o in objects if o.size > self.chunk_bytes]
        small = [o for o in objects if o.size <= self.chunk_bytes]
        pool = concurrent.futures.ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="gcs")
        try:
            futures = [pool.submit(self._fetch, o) for o in small]
            if big:
                futures.append(pool.submit(self._fetch_each, big))
            pending: set[concurrent.futures.Future[None]] = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(
                    pending, timeout=self.progress_every_s, return_when=concurrent.futures.FIRST_EXCEPTION
                )
                for future in done:
                    future.result()  # the first failure ends the download, named by its object
                if pending:
                    self._log_progress(total, started)
        except BaseException:
            self._stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        seconds = max(time.monotonic() - started, 1e-9)
        log(
            f"{self.uri}: downloaded {len(objects)} files, {total / 1e6:.1f} MB in {seconds:.1f} s "
            f"({total / 1e6 / seconds:.1f} MB/s)",
            uri=self.uri,
            objects=len(objects),
            bytes=total,
            seconds=round(seconds, 3),
            mb_per_s=round(total / 1e6 / seconds, 1),
        )

    def _log_progress(self, total: int, started: float) -> None:
        with self._lock:
            done = self._done_bytes + sum(_bytes_on_disk(p, size) for p, size in self._in_flight.items())
            # never backwards: a retry starts over, and a filesystem may count preallocated blocks
            done = self._reported = max(done, self._reported)
        seconds = max(time.monotonic() - started, 1e-9)
        log(
            f"{self.uri}: {done / 1e6:.1f} of {total / 1e6:.1f} MB ({done / 1e6 / seconds:.1f} MB/s)",
            uri=self.uri,
            bytes_done=done,
            bytes_total=total,
            mb_per_s=round(done / 1e6 / seconds, 1),
        )

    def _fetch_each(self, objects: list[_Object]) -> None:
        for obj in objects:
            if self._stop.is_set():
                return
            self._fetch(obj)

    def _fetch(self, obj: _Object) -> None:
        """Download one object to a .partial file, verify it, then rename it into place; one retry."""
        partial = obj.target.with_name(obj.target.name + ".partial")
        for attempt in (1, 2):
            try:
                obj.target.parent.mkdir(parents=True, exist_ok=True)
                with self._lock:
                    self._in_flight[partial] = obj.size
                streamed_check = self._download(obj, partial)
                _verify(partial, obj, crc32c=not streamed_check)
                with self._lock:  # counted as done in the same step it stops counting as in flight
                    self._in_flight.pop(partial, None)
                    self._done_bytes += obj.size
                break
            except Exception as exc:
                partial.unlink(missing_ok=True)
                if attempt == 2 or not _worth_retrying(exc):
                    raise ModelLoadError(f"could not download {obj.uri}: {_reason(exc)}") from exc
                try:
                    # the object may have been replaced since the listing: fetch the version there now
                    obj.blob.reload(timeout=REQUEST_TIMEOUT_S)
                    obj.remember()
                except Exception as reload_exc:
                    raise ModelLoadError(f"could not download {obj.uri}: {_reason(reload_exc)}") from reload_exc
            finally:
                with self._lock:
                    self._in_flight.pop(partial, None)
        try:
            partial.replace(obj.target)  # a crash mid-download never leaves a truncated file that looks whole
            self.manifest.record(obj)
        except OSError as exc:  # a full disk, a read-only cache
            raise ModelLoadError(f"could not store {obj.uri} at {obj.target}: {exc}") from exc

    def _download(self, obj: _Object, partial: Path) -> bool:
        """Fetch obj into partial; True if its crc32c was already checked as the bytes streamed in."""
        blob = obj.blob
        if obj.size > self.chunk_bytes and obj.crc32c:
            from google.cloud.storage import transfer_manager

            # checks the crc32c of the whole object from the listing, combining the chunks' checksums
            transfer_manager.download_chunks_concurrently(
                blob,
                str(partial),
                chunk_size=self.chunk_bytes,
                download_kwargs={"timeout": REQUEST_TIMEOUT_S},
                worker_type=transfer_manager.THREAD,
                max_workers=self.workers,
                crc32c_checksum=True,
            )
            return True
        # checked against the listing's crc32c by _verify, not against this response's header
        blob.download_to_filename(str(partial), checksum=None, timeout=REQUEST_TIMEOUT_S)
        return False


def _verify(path: Path, obj: _Object, *, crc32c: bool) -> None:
    """Raise _Mismatch unless path holds exactly the listed object: its size, and its crc32c if asked."""
    size = path.stat().st_size
    if size != obj.size:
        raise _Mismatch(f"got {size} bytes, the object has {obj.size}")
    if crc32c and obj.crc32c:  # GCS gives every object one; an emulator might not
        import google_crc32c

        checksum = google_crc32c.Checksum()
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                checksum.update(block)
        actual = base64.b64encode(checksum.digest()).decode()
        if actual != obj.crc32c:
            raise _Mismatch(f"crc32c of the bytes received is {actual}, the object's is {obj.crc32c}")


class _Mismatch(Exception):
    """The bytes received are not the object that was listed."""


def _worth_retrying(exc: Exception) -> bool:
    """Anything but a refusal: a mismatch, a 404 or a short read can be a replacement mid-download."""
    from google.api_core.exceptions import Forbidden, Unauthorized

    return not isinstance(exc, Forbidden | Unauthorized)


def _reason(exc: BaseException) -> str:
    from google.cloud.storage.exceptions import DataCorruption

    if isinstance(exc, _Mismatch | DataCorruption):
        return f"the bytes received do not match the object's checksum, twice ({exc})"
    return f"{type(exc).__name__}: {exc}"


def _bytes_on_disk(path: Path, size: int) -> int:
    """Bytes written so far to a file being filled, maybe sparsely, by concurrent chunks (progress only)."""
    try:
        return min(size, path.stat().st_blocks * 512)
    except OSError:
        return 0


def _split(uri: str) -> tuple[str, str]:
    bucket_name, _, prefix = uri.removeprefix("gs://").partition("/")
    if not bucket_name:
        raise ModelLoadError(f"{uri!r} is not gs://BUCKET/FOLDER")
    return bucket_name, prefix.strip("/")


def client() -> Any:
    """A storage client: anonymous against an emulator (STORAGE_EMULATOR_HOST), else the container's service account."""
    from google.cloud import storage

    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    return storage.Client()
