"""hf:// sources for the LoRA store: a Hub file's metadata (commit, etag, size), and a download of that commit.

Online, one HEAD (huggingface_hub's get_hf_file_metadata, as hf_hub_download makes) tells the version; the
bytes are streamed through huggingface_hub's own HTTP session (its token, headers and offline guard) into the
store's .partial file, counted as they arrive, so a file that grows past SDXL_LORA_MAX_BYTES is stopped. This is
instead of hf_hub_download(local_dir=...), which has no byte limit and keeps its own metadata beside the file;
the bytes land once, in the store's folder, where its budget counts them (the Hub cache has no budget).
Offline (HF_HUB_OFFLINE=1), the Hub cache (HF_HUB_CACHE, HF_HOME) is the only source: a file found there is used
in place, as an operator's file is; nothing is downloaded, so nothing counts against the budget.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdxl_server.errors import FetchFailed, InvalidRequest
from sdxl_server.lora.store import Remote, Retry, TooBig

if TYPE_CHECKING:
    from sdxl_server.lora.sources import Source
    from sdxl_server.lora.store import Sink

CHUNK_BYTES = 1 << 20
GATED = "the server's Hugging Face token (HF_TOKEN) has no access to it: accept its terms on the Hub with that account"


@dataclass(frozen=True)
class Hub:
    """Where hf:// sources come from; None: huggingface_hub's own setting (HF_ENDPOINT, HF_HUB_CACHE or HF_HOME,
    HF_HUB_OFFLINE, read when it is imported)."""

    endpoint: str | None = None
    cache: Path | None = None
    offline: bool | None = None

    def is_offline(self) -> bool:
        from huggingface_hub import constants

        return constants.is_offline_mode() if self.offline is None else self.offline


@dataclass(frozen=True)
class Cached:
    """A Hub file found in the Hub cache (offline): where it is, its commit and etag, its size."""

    path: Path
    version: str
    size: int


def describe(source: Source, *, hub: Hub, field: str, timeout: float) -> Remote | Cached:
    """The version and size of source's file and how to download it; offline, the cached file itself.

    InvalidRequest (on `field`) when the Hub (or the cache, offline) does not have it; FetchFailed when the server
    may not read it; Retry for what another try may fix (5xx, 429, a timeout, a dropped connection)."""
    if hub.is_offline():
        return _cached(source, hub, field)
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    url = hf_hub_url(source.location, source.path, revision=source.revision, endpoint=hub.endpoint)
    try:
        meta = get_hf_file_metadata(url, timeout=timeout)
    except Exception as exc:
        raise _error(exc, source.uri, field) from exc
    if not meta.commit_hash or not meta.etag or meta.size is None:
        raise FetchFailed(
            f"{source.uri}: {hub.endpoint or 'the Hub'} did not say its commit, etag and size", field=field
        )
    commit = meta.commit_hash
    # the commit, not the branch: the bytes downloaded are the version the metadata described
    file_url = hf_hub_url(source.location, source.path, revision=commit, endpoint=hub.endpoint)

    def download(sink: Sink) -> None:
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        headers = build_hf_headers()
        headers["Accept-Encoding"] = "identity"  # the bytes counted are the file's, not a compressed body's
        try:
            # httpx drops the token when a redirect leaves the Hub's origin (LFS and Xet files live on a CDN)
            with get_session().stream(
                "GET", file_url, headers=headers, follow_redirects=True, timeout=timeout
            ) as response:
                if response.status_code >= 400:
                    response.read()
                    hf_raise_for_status(response)
                for chunk in response.iter_bytes(CHUNK_BYTES):
                    sink.write(chunk)
        except TooBig:
            raise
        except Exception as exc:
            raise _error(exc, source.uri, field, downloading=True) from exc

    return Remote(f"{commit}:{meta.etag}", meta.size, download)


def _cached(source: Source, hub: Hub, field: str) -> Cached:
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(source.location, source.path, cache_dir=hub.cache, revision=source.revision)
    if not isinstance(found, str) or not Path(found).is_file():
        raise InvalidRequest(
            f"{source.uri} not found in the Hugging Face cache (HF_HUB_OFFLINE=1: nothing is downloaded; "
            "use a gs:// source, or bake the file into the image's Hub cache)",
            field=field,
        )
    path = Path(found)
    snapshot = path
    for _ in source.path.split("/"):
        snapshot = snapshot.parent  # snapshots/<commit>/<path in the repo>
    # the blob's name is the file's etag (sha256 for LFS files): a changed file under one commit is another version
    return Cached(path, f"{snapshot.name}:{path.resolve().name}", path.stat().st_size)


def _error(exc: Exception, uri: str, field: str, *, downloading: bool = False) -> Exception:
    """A Hub failure as what the client is told: not found (400), refused (502, the fix), or worth a retry."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(exc, GatedRepoError):
        return FetchFailed(f"the server may not read {uri}: {GATED}", field=field)
    if isinstance(exc, EntryNotFoundError | RevisionNotFoundError | RepositoryNotFoundError):
        # private repos answer as missing ones do, unless the token may read them
        return (
            Retry(f"{uri} changed while downloading")
            if downloading
            else InvalidRequest(f"{uri} not found", field=field)
        )
    if isinstance(exc, HfHubHTTPError):
        status = _status(exc)
        if status is not None and 400 <= status < 500 and status != 429:
            return FetchFailed(f"could not fetch {uri}: HTTP {status}: {_first_line(exc)}", field=field)
    return Retry(f"{type(exc).__name__}: {_first_line(exc)}")


def _status(exc: Any) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


def _first_line(exc: Exception) -> str:
    """huggingface_hub's messages run over several lines (request ids, hints); a log line and a reply need one."""
    return (str(exc).strip().splitlines() or [""])[0]
