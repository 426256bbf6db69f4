"""LoRA files fetched into a disk cache with a byte budget (SDXL_CACHE_DIR/loras/, SDXL_LORA_CACHE_BYTES).

One file per (source URI, version): the version is the GCS object's generation, the Hub file's commit and
etag, or a local file's mtime and size, so a replaced object is fetched again and an unchanged one never is
(a second use costs one metadata request). Downloads go to a `.partial` file, are verified (crc32c for GCS,
the size for the Hub), and are renamed into place; a download that passes SDXL_LORA_MAX_BYTES is stopped.
Concurrent fetches of one source wait for a single download. The index (index.json, beside the files) keeps
each file's source and last use across restarts; least recently used files are evicted past the budget.
Files are named by a hash, never by anything a request or a bucket chose, so no name reaches the filesystem.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from sdxl_server.errors import FetchFailed, InvalidRequest
from sdxl_server.logs import log

if TYPE_CHECKING:
    from sdxl_server.lora.hub import Hub
    from sdxl_server.lora.sources import Source

INDEX = "index.json"
REQUEST_TIMEOUT_S = 60.0  # per HTTP request (connect and each read), as gcs.py
# A file returned by fetch is read right after (adapters.read_adapter), outside the store's lock: for this long
# after its last use, eviction leaves it alone, so a concurrent fetch of another adapter cannot delete it first.
IN_USE_S = 120.0
GRANT = "grant the server's service account roles/storage.objectViewer on it (sdxlctl does for [model] lora_sources)"
_KEY = re.compile(r"[0-9a-f]{32}")


@dataclass(frozen=True)
class Fetched:
    """A LoRA file on local disk and what it is: the source, its version, the cache key, its size."""

    source: Source
    path: Path  # the local .safetensors file (in the cache; for "file" sources the file itself)
    version: str  # GCS generation / Hub commit+etag / file mtime_ns+size
    key: str  # stable id of (source.uri, version): the memory cache's key too
    size: int


@dataclass
class Remote:
    """What a source's metadata says: the version and size, and how to download exactly that version."""

    version: str
    size: int
    download: Callable[[Sink], None]  # writes the bytes to the sink it is given
    crc32c: str | None = None  # base64, as GCS gives it; None: only the size is checked


class Retry(Exception):
    """A failure worth one more try (a 5xx, a timeout, a checksum mismatch); the message says what failed."""


class TooBig(Exception):
    """The download passed the byte limit."""


def key_of(uri: str, version: str) -> str:
    """The cache key of one version of one source: also its file name, so it is hex and nothing else."""
    return hashlib.sha256(f"{uri}\n{version}".encode()).hexdigest()[:32]


class Store:
    """The disk cache of LoRA files: fetch (thread-safe, one download per source at a time), pin, entries."""

    def __init__(
        self, folder: Path, *, max_bytes: int, budget_bytes: int, in_use_s: float = IN_USE_S, hub: Hub | None = None
    ) -> None:
        """`hub`: where hf:// sources come from (None: huggingface_hub's settings from the environment)."""
        from sdxl_server.lora.hub import Hub

        self.folder = folder
        self.hub = hub or Hub()
        self.max_bytes = max_bytes
        self.budget_bytes = budget_bytes
        self.in_use_s = in_use_s
        self._lock = threading.Lock()  # the index and the pins
        self._flights: dict[str, tuple[threading.Lock, int]] = {}  # uri -> (its lock, fetches waiting on it)
        self._pinned: set[str] = set()
        self._gcs: Any = None
        folder.mkdir(parents=True, exist_ok=True)
        self._index = self._load()

    def fetch(self, source: Source, *, field: str) -> Fetched:
        """The local file of `source`, downloaded unless the cache holds its current version.

        InvalidRequest (on `field`) when it does not exist or is too big; FetchFailed when the server could not
        fetch it (refused, or failing twice)."""
        if source.scheme == "file":
            return self._local(source, field)
        with self._flight(source.uri):
            for attempt in (1, 2):
                try:
                    return self._fetch_once(source, field)
                except Retry as exc:
                    if attempt == 2:
                        raise FetchFailed(f"could not fetch {source.uri}: {exc} (twice)", field=field) from exc
                    log("lora fetch failed, retrying", level=logging.WARNING, adapter=source.uri, reason=str(exc))
        raise AssertionError("unreachable")

    def pin(self, key: str) -> None:
        """Never evict this file (a preloaded adapter)."""
        with self._lock:
            self._pinned.add(key)

    def entries(self) -> list[dict[str, Any]]:
        """The cached files, most recently used first: adapter (its source URI), bytes, last_used (epoch), key."""
        with self._lock:
            rows = sorted(self._index.items(), key=lambda item: item[1]["last_used"], reverse=True)
            return [
                {"adapter": e["adapter"], "bytes": e["bytes"], "last_used": e["last_used"], "key": key}
                for key, e in rows
            ]

    # -- one fetch -----------------------------------------------------------------------------------------

    def _fetch_once(self, source: Source, field: str) -> Fetched:
        if source.scheme == "gs":
            remote = self._describe_gcs(source, field)
        elif source.scheme == "hf":
            from sdxl_server.lora.hub import Cached, describe

            found = describe(source, hub=self.hub, field=field, timeout=REQUEST_TIMEOUT_S)
            if isinstance(found, Cached):  # offline: the Hub cache's file, used in place
                if found.size > self.max_bytes:
                    raise InvalidRequest(_too_big(source.uri, found.size, self.max_bytes), field=field)
                return Fetched(source, found.path, found.version, key_of(source.uri, found.version), found.size)
            remote = found
        else:
            raise InvalidRequest(f"{source.uri}: unknown source scheme {source.scheme!r}", field=field)
        if remote.size > self.max_bytes:
            raise InvalidRequest(_too_big(source.uri, remote.size, self.max_bytes), field=field)
        key = key_of(source.uri, remote.version)
        with self._lock:
            entry = self._index.get(key)
            if entry is not None and self._intact(key, entry):
                entry["last_used"] = time.time()
                self._save()
                return Fetched(source, self._path(key), remote.version, key, entry["bytes"])
        path = self._download(source, remote, key, field)
        size = path.stat().st_size
        with self._lock:
            self._index[key] = {
                "adapter": source.uri,
                "version": remote.version,
                "bytes": size,
                "mtime_ns": path.stat().st_mtime_ns,
                "last_used": time.time(),
            }
            self._evict(keep=key)
            self._save()
        return Fetched(source, path, remote.version, key, size)

    def _unwritable(self, what: str, exc: OSError, field: str) -> FetchFailed:
        """The 502 of a cache the server cannot write: its paths go to the log, never to the client."""
        log("lora cache not writable", level=logging.ERROR, folder=str(self.folder), reason=str(exc))
        return FetchFailed(f"{what} its LoRA cache (SDXL_CACHE_DIR): the server's log says why", field=field)

    def _download(self, source: Source, remote: Remote, key: str, field: str) -> Path:
        """remote's bytes into the cache: a .partial file (never through a link), verified, then renamed."""
        target = self._path(key)
        partial = self.folder / f"{key}.partial"
        started = time.monotonic()
        try:
            partial.unlink(missing_ok=True)  # a link planted there is removed, not followed
            # O_EXCL | O_NOFOLLOW: a link planted between the unlink and the open is refused, not written through
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise self._unwritable(f"could not fetch {source.uri} into", exc, field) from exc
        try:
            with os.fdopen(fd, "wb") as file:
                sink = Sink(file, self.max_bytes)
                try:
                    remote.download(sink)
                except TooBig:
                    raise InvalidRequest(_too_big(source.uri, None, self.max_bytes), field=field) from None
            if sink.size != remote.size:
                raise Retry(f"got {sink.size} bytes, its metadata says {remote.size}")
            if remote.crc32c and sink.crc32c() != remote.crc32c:
                raise Retry(f"the bytes received do not match its crc32c ({sink.crc32c()}, not {remote.crc32c})")
            try:
                partial.replace(target)
            except OSError as exc:  # something that is not a file in the way: a folder planted under its name
                raise self._unwritable(f"could not store {source.uri} in", exc, field) from exc
        except BaseException:
            partial.unlink(missing_ok=True)
            raise
        seconds = max(time.monotonic() - started, 1e-9)
        log(
            "lora fetched",
            adapter=source.uri,
            bytes=sink.size,
            seconds=round(seconds, 3),
            mb_per_s=round(sink.size / 1e6 / seconds, 1),
        )
        return target

    def _local(self, source: Source, field: str) -> Fetched:
        """An operator's file (SDXL_LORAS), used where it is: its version is its mtime and size."""
        path = Path(source.location)
        try:
            info = path.stat()
        except OSError:
            raise InvalidRequest(f"{path} not found", field=field) from None
        if not stat.S_ISREG(info.st_mode):
            raise InvalidRequest(f"{path} is not a file", field=field)
        if info.st_size > self.max_bytes:
            raise InvalidRequest(_too_big(str(path), info.st_size, self.max_bytes), field=field)
        version = f"{info.st_mtime_ns}-{info.st_size}"
        return Fetched(source, path, version, key_of(source.uri, version), info.st_size)

    # -- GCS -----------------------------------------------------------------------------------------------

    def _describe_gcs(self, source: Source, field: str) -> Remote:
        """The object's generation, size and crc32c (one metadata GET), and a download of that generation."""
        from sdxl_server.gcs import name_problem

        name = source.path  # a folder's weight file is resolved in when parsed (sources.py)
        uri = source.uri
        problem = name_problem(name)
        if problem:
            raise InvalidRequest(f"refusing {uri}: {problem}", field=field)
        client = self._gcs_client()
        try:
            blob = client.bucket(source.location).get_blob(name, timeout=REQUEST_TIMEOUT_S, retry=None)
        except Exception as exc:
            raise _gcs_error(exc, uri, field) from exc
        if blob is None:
            raise InvalidRequest(f"{uri} not found", field=field)

        def download(sink: Sink) -> None:
            # the blob carries its generation: a replacement since the metadata is a 404, then one more try
            try:
                blob.download_to_file(sink, checksum=None, timeout=REQUEST_TIMEOUT_S, retry=None)
            except TooBig:
                raise
            except Exception as exc:
                raise _gcs_error(exc, uri, field, downloading=True) from exc

        return Remote(str(blob.generation), int(blob.size or 0), download, crc32c=blob.crc32c)

    def _gcs_client(self) -> Any:
        with self._lock:
            if self._gcs is None:
                from sdxl_server.gcs import client

                self._gcs = client()
            return self._gcs

    # -- the index and the budget --------------------------------------------------------------------------

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def _intact(self, key: str, entry: dict[str, Any]) -> bool:
        """Whether key's file is the one the index recorded: a plain file (not a link), same size and mtime."""
        try:
            info = os.lstat(self._path(key))
        except OSError:
            return False
        return stat.S_ISREG(info.st_mode) and info.st_size == entry["bytes"] and info.st_mtime_ns == entry["mtime_ns"]

    def _load(self) -> dict[str, dict[str, Any]]:
        """The index as saved, less anything unreadable or whose file changed; stray files of ours are deleted."""
        try:
            raw = json.loads((self.folder / INDEX).read_text())
            saved = raw.get("entries") if isinstance(raw, dict) else None
        except (OSError, ValueError):
            saved = None  # none yet, or garbage: the cache starts empty
        index: dict[str, dict[str, Any]] = {}
        for key, entry in (saved or {}).items() if isinstance(saved, dict) else ():
            if _KEY.fullmatch(str(key)) and _well_formed(entry) and self._intact(key, entry):
                index[key] = {name: entry[name] for name in ("adapter", "version", "bytes", "mtime_ns")}
                # a time in the future would look in use, and never be evicted
                index[key]["last_used"] = min(entry["last_used"], time.time())
        for path in self.folder.iterdir():
            stem, dot, suffix = path.name.partition(".")
            ours = _KEY.fullmatch(stem) and dot and suffix in ("safetensors", "partial")
            if (ours and not (suffix == "safetensors" and stem in index)) or path.name == f"{INDEX}.partial":
                with contextlib.suppress(OSError):
                    path.unlink()  # an interrupted download, or a file nobody can vouch for (a link: the link)
        return index

    def _save(self) -> None:
        partial = self.folder / f"{INDEX}.partial"
        try:
            partial.unlink(missing_ok=True)
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "w") as file:
                json.dump({"entries": self._index}, file, indent=1, sort_keys=True)
            partial.replace(self.folder / INDEX)
        except OSError as exc:  # a full disk: the files stay usable, their order of use is lost at restart
            log("lora cache index not saved", level=logging.WARNING, folder=str(self.folder), reason=str(exc))

    def _evict(self, *, keep: str) -> None:
        """After `keep` arrived: delete the versions it replaced (a new generation or commit of the same source is
        all a later fetch will ask for), then least recently used files until the cache fits its budget; never
        `keep`, a pinned file or one in use."""
        total = sum(e["bytes"] for e in self._index.values())
        recent = time.time() - self.in_use_s
        for key, entry in sorted(self._index.items(), key=lambda item: item[1]["last_used"]):
            replaced = entry["adapter"] == self._index[keep]["adapter"]
            if key == keep or key in self._pinned or entry["last_used"] > recent:
                continue
            if replaced or total > self.budget_bytes:
                with contextlib.suppress(OSError):
                    self._path(key).unlink(missing_ok=True)
                del self._index[key]
                total -= entry["bytes"]
                log("lora evicted", adapter=entry["adapter"], bytes=entry["bytes"], replaced=replaced)

    @contextlib.contextmanager
    def _flight(self, uri: str) -> Iterator[None]:
        """Hold uri's lock: a second fetch of it waits, then finds the first one's file in the cache."""
        with self._lock:
            lock, waiting = self._flights.get(uri, (threading.Lock(), 0))
            self._flights[uri] = (lock, waiting + 1)
        try:
            with lock:
                yield
        finally:
            with self._lock:
                lock, waiting = self._flights[uri]
                if waiting == 1:
                    del self._flights[uri]
                else:
                    self._flights[uri] = (lock, waiting - 1)


class Sink:
    """A file-like for downloads: counts the bytes and their crc32c, and stops past the byte limit."""

    def __init__(self, file: BinaryIO, limit: int) -> None:
        import google_crc32c

        self.file = file
        self.limit = limit
        self.size = 0
        self._crc = google_crc32c.Checksum()

    def write(self, data: bytes) -> int:
        self.size += len(data)
        if self.size > self.limit:
            raise TooBig
        self._crc.update(data)
        return self.file.write(data)

    def crc32c(self) -> str:
        import base64

        return base64.b64encode(self._crc.digest()).decode()


def _well_formed(entry: Any) -> bool:
    return (
        isinstance(entry, dict)
        and isinstance(entry.get("adapter"), str)
        and isinstance(entry.get("version"), str)
        and all(type(entry.get(n)) is int and entry[n] >= 0 for n in ("bytes", "mtime_ns"))
        and type(entry.get("last_used")) in (int, float)
    )


def _too_big(what: str, size: int | None, limit: int) -> str:
    """size None: the download was stopped when it passed the limit (its metadata said less)."""
    amount = f"is {size} bytes" if size is not None else "grew past the limit while downloading"
    return f"{what} {amount}, over SDXL_LORA_MAX_BYTES={limit}; use a smaller adapter or ask the operator to raise it"


def _gcs_error(exc: Exception, uri: str, field: str, *, downloading: bool = False) -> Exception:
    """A GCS failure as what the client is told: not found (400), refused (502, the fix), or worth a retry."""
    from google.api_core import exceptions

    if isinstance(exc, exceptions.NotFound):
        # during the download: replaced or deleted since its metadata was read; the retry reads it again
        return (
            Retry(f"{uri} changed while downloading")
            if downloading
            else InvalidRequest(f"{uri} not found", field=field)
        )
    if isinstance(exc, exceptions.Forbidden | exceptions.Unauthorized):
        return FetchFailed(f"the server may not read {uri} ({exc.code}): {GRANT}", field=field)
    if isinstance(exc, exceptions.ClientError):  # another 4xx: retrying will not change it
        return FetchFailed(f"could not fetch {uri}: {type(exc).__name__}: {exc}", field=field)
    return Retry(f"{type(exc).__name__}: {exc}")
