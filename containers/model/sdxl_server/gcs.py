"""Copy a gs:// folder to local disk before loading it (diffusers reads local files only)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Collection
from pathlib import Path
from typing import Any

from sdxl_server.errors import ModelLoadError


def download_folder(
    uri: str,
    cache_dir: Path,
    *,
    missing_ok: bool = False,
    select: Callable[[list[str]], Collection[str]] | None = None,
) -> Path:
    """Download the objects under gs://bucket/prefix to a folder under cache_dir; unchanged files are kept.

    `select` gets every object's name relative to the folder and returns those to download (None: all), so
    a caller can skip files it will not load (fp32 duplicates of an fp16 variant). An empty or missing
    folder is an error, unless `missing_ok` (a cache nobody has filled yet).
    """
    bucket_name, prefix = _split(uri)
    destination = cache_dir / hashlib.sha256(uri.encode()).hexdigest()[:16]
    try:
        from google.cloud import storage

        client: Any = _client(storage)
        blobs = [
            b
            for b in client.list_blobs(bucket_name, prefix=f"{prefix}/" if prefix else None)
            if not b.name.endswith("/")
        ]
        if not blobs and missing_ok:
            destination.mkdir(parents=True, exist_ok=True)
            return destination
        if not blobs:
            raise ModelLoadError(f"{uri} is empty or does not exist")
        if select is not None:
            wanted = set(select([b.name[len(prefix) :].lstrip("/") for b in blobs]))
            blobs = [b for b in blobs if b.name[len(prefix) :].lstrip("/") in wanted]
        for blob in blobs:
            target = destination / blob.name[len(prefix) :].lstrip("/")
            if target.is_file() and target.stat().st_size == blob.size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            blob.download_to_filename(partial)
            partial.replace(target)  # a crash mid-download never leaves a truncated file that looks whole
    except ModelLoadError:
        raise
    except Exception as exc:  # auth, network, permissions: all end the load with a reason
        raise ModelLoadError(f"could not download {uri}: {type(exc).__name__}: {exc}") from exc
    return destination


def upload_file(path: Path, uri: str) -> None:
    """Copy one local file to gs://bucket/folder/<its name>."""
    bucket_name, prefix = _split(uri)
    from google.cloud import storage

    name = f"{prefix}/{path.name}" if prefix else path.name
    _client(storage).bucket(bucket_name).blob(name).upload_from_filename(str(path))


def _split(uri: str) -> tuple[str, str]:
    bucket_name, _, prefix = uri.removeprefix("gs://").partition("/")
    if not bucket_name:
        raise ModelLoadError(f"{uri!r} is not gs://BUCKET/FOLDER")
    return bucket_name, prefix.strip("/")


def _client(storage: Any) -> Any:
    """Anonymous against an emulator (STORAGE_EMULATOR_HOST), else the container's service account."""
    if os.environ.get("STORAGE_EMULATOR_HOST"):
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(project="emulator", credentials=AnonymousCredentials())
    return storage.Client()
