"""The gs:// download through the real google-cloud-storage client against a GCS emulator on loopback."""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sdxl_server.errors import ModelLoadError
from sdxl_server.gcs import download_folder
from tests.model_server.gcs_proxy import forward
from tests.servers import gcs_emulator, serve_app

KIB = 1024
CHUNK = 64 * KIB  # small chunks, so a 300 KiB "unet" goes through the concurrent ranged download


@dataclass
class Bucket:
    """A bucket in the emulator, seen through the real client."""

    bucket: Any
    url: str

    def put(self, name: str, data: bytes) -> None:
        self.bucket.blob(name).upload_from_string(data)

    def delete(self, name: str) -> None:
        self.bucket.blob(name).delete()


def _bucket(url: str, monkeypatch: pytest.MonkeyPatch) -> Bucket:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
    client = storage.Client(project="test", credentials=AnonymousCredentials())
    return Bucket(client.create_bucket("weights"), url)


@pytest.fixture
def bucket(monkeypatch: pytest.MonkeyPatch) -> Iterator[Bucket]:
    with gcs_emulator() as url:
        yield _bucket(url, monkeypatch)


@pytest.fixture
def logged() -> Iterator[list[logging.LogRecord]]:
    """The server's log records (its logger may not propagate to pytest's capture)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("sdxl_server")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield records
    logger.removeHandler(handler)
    logger.setLevel(level)


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


MODEL = {
    "sdxl/model_index.json": b'{"_class_name": "StableDiffusionXLPipeline"}',
    "sdxl/unet/config.json": b'{"in_channels": 4}',
    "sdxl/unet/diffusion_pytorch_model.fp16.safetensors": os.urandom(300 * KIB),
    "sdxl/vae/diffusion_pytorch_model.fp16.safetensors": os.urandom(100 * KIB),
}


def put_model(bucket: Bucket) -> None:
    for name, data in MODEL.items():
        bucket.put(name, data)


def test_every_file_arrives_verified_in_place_and_a_final_line_gives_bytes_seconds_and_rate(
    bucket: Bucket, tmp_path: Path, logged: list[logging.LogRecord]
) -> None:
    put_model(bucket)
    folder = download_folder("gs://weights/sdxl", tmp_path, workers=4, chunk_bytes=CHUNK)
    assert files_under(folder) == {name.removeprefix("sdxl/"): data for name, data in MODEL.items()}
    assert not list(tmp_path.rglob("*.partial"))
    final = [r for r in logged if {"bytes", "seconds", "mb_per_s"} <= set(getattr(r, "fields", {}))]
    assert len(final) == 1
    fields = vars(final[0])["fields"]
    assert fields["bytes"] == sum(len(d) for d in MODEL.values()) and fields["objects"] == 4
    assert "MB/s" in final[0].getMessage()


def test_an_unchanged_folder_is_not_fetched_again(bucket: Bucket, tmp_path: Path, logged) -> None:
    put_model(bucket)
    folder = download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK)
    inodes = {p: p.stat().st_ino for p in folder.rglob("*") if p.is_file()}
    logged.clear()
    assert download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK) == folder
    assert {p: p.stat().st_ino for p in folder.rglob("*") if p.is_file()} == inodes  # nothing renamed in
    assert any("cached and current" in r.getMessage() for r in logged)


@pytest.mark.parametrize("spelling", ["gs://weights/sdxl/", "gs://weights//sdxl", "gs://weights/sdxl//"])
def test_one_folder_spelled_another_way_shares_its_cache(bucket: Bucket, tmp_path: Path, spelling, logged) -> None:
    put_model(bucket)
    folder = download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK)
    logged.clear()
    assert download_folder(spelling, tmp_path, chunk_bytes=CHUNK) == folder  # not 7 GB downloaded twice
    assert any("cached and current" in r.getMessage() for r in logged)


@pytest.mark.parametrize("name", ["sdxl/unet/diffusion_pytorch_model.fp16.safetensors", "sdxl/unet/config.json"])
def test_an_object_replaced_by_one_of_the_same_size_is_fetched_again(bucket: Bucket, tmp_path: Path, name) -> None:
    put_model(bucket)
    download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK)
    replacement = bytes(b ^ 0xFF for b in MODEL[name])
    bucket.put(name, replacement)
    folder = download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK)
    assert (folder / name.removeprefix("sdxl/")).read_bytes() == replacement


def test_a_cached_file_edited_on_disk_is_fetched_again(bucket: Bucket, tmp_path: Path) -> None:
    put_model(bucket)
    folder = download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK)
    unet = folder / "unet/diffusion_pytorch_model.fp16.safetensors"
    unet.write_bytes(b"\0" * unet.stat().st_size)  # same size, new mtime
    (folder / "unet/config.json").unlink()
    download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK)
    assert files_under(folder) == {name.removeprefix("sdxl/"): data for name, data in MODEL.items()}


def test_an_object_deleted_from_the_bucket_leaves_the_cache_too(bucket: Bucket, tmp_path: Path) -> None:
    put_model(bucket)
    folder = download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK)
    bucket.delete("sdxl/vae/diffusion_pytorch_model.fp16.safetensors")
    download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK)
    assert not (folder / "vae/diffusion_pytorch_model.fp16.safetensors").exists()


def test_select_sees_every_relative_name_and_only_its_choice_is_downloaded(bucket: Bucket, tmp_path: Path) -> None:
    put_model(bucket)
    bucket.put("sdxl/unet/diffusion_pytorch_model.safetensors", os.urandom(600 * KIB))  # the fp32 duplicate
    seen: list[list[str]] = []

    def fp16_only(names: list[str]) -> list[str]:
        seen.append(names)
        return [n for n in names if n.endswith(".json") or ".fp16." in n]

    folder = download_folder("gs://weights/sdxl", tmp_path, select=fp16_only, chunk_bytes=CHUNK)
    assert seen == [sorted([n.removeprefix("sdxl/") for n in MODEL] + ["unet/diffusion_pytorch_model.safetensors"])]
    assert files_under(folder) == {name.removeprefix("sdxl/"): data for name, data in MODEL.items()}


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("sdxl/../../x.pth", "'..' segment"),
        ("sdxl/unet/../../../../usr/lib/python3/site-packages/evil.pth", "'..' segment"),
        ("sdxl//etc/evil.pth", "absolute path"),
        ("sdxl/..\\..\\evil.pth", "backslash"),
        ("sdxl/unet/./x", "'.' segment"),
    ],
)
def test_an_object_named_to_escape_the_cache_is_refused_before_anything_is_written(
    bucket: Bucket, tmp_path: Path, name: str, why: str
) -> None:
    put_model(bucket)
    bucket.put(name, b"import os; os.system('echo pwned')\n")
    cache = tmp_path / "a" / "b" / "cache"
    with pytest.raises(ModelLoadError) as refused:
        download_folder("gs://weights/sdxl", cache, chunk_bytes=CHUNK)
    assert f"gs://weights/{name}" in str(refused.value) and why in str(refused.value)
    assert "\n" not in str(refused.value)
    assert files_under(tmp_path) == {}  # not the hostile file, not even the honest ones


def test_a_symlink_planted_in_the_cache_does_not_redirect_a_download(bucket: Bucket, tmp_path: Path) -> None:
    put_model(bucket)
    folder = download_folder("gs://weights/sdxl", tmp_path / "cache", chunk_bytes=CHUNK)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for path in (folder / "unet").iterdir():
        path.unlink()
    (folder / "unet").rmdir()
    (folder / "unet").symlink_to(elsewhere)
    with pytest.raises(ModelLoadError, match="outside the cache folder"):
        download_folder("gs://weights/sdxl", tmp_path / "cache", chunk_bytes=CHUNK)
    assert list(elsewhere.iterdir()) == []


def test_an_object_replaced_after_the_listing_is_fetched_at_its_new_version(bucket: Bucket, tmp_path: Path) -> None:
    put_model(bucket)
    name = "unet/diffusion_pytorch_model.fp16.safetensors"
    newer = os.urandom(200 * KIB)

    def replace_then_choose_all(names: list[str]) -> list[str]:
        bucket.put(f"sdxl/{name}", newer)  # between the listing and the download
        return names

    folder = download_folder("gs://weights/sdxl", tmp_path, select=replace_then_choose_all, chunk_bytes=CHUNK)
    assert (folder / name).read_bytes() == newer
    assert download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK) == folder  # the manifest has it
    assert (folder / name).read_bytes() == newer


def test_an_object_deleted_after_the_listing_is_named_in_the_error(bucket: Bucket, tmp_path: Path) -> None:
    put_model(bucket)

    def delete_then_choose_all(names: list[str]) -> list[str]:
        bucket.delete("sdxl/unet/config.json")
        return names

    with pytest.raises(ModelLoadError, match=r"gs://weights/sdxl/unet/config\.json.*NotFound"):
        download_folder("gs://weights/sdxl", tmp_path, select=delete_then_choose_all, chunk_bytes=CHUNK)


def media_proxy(upstream: str, change: Callable[[bytes], Awaitable[bytes]], *, refuse: bool = False) -> Any:
    """An ASGI app that forwards to the emulator and passes each object download's bytes through `change`.

    With `refuse`, downloads get Cloud Storage's 403 for an account without storage.objects.get instead.
    """
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response

    refused: list[str] = []
    ranges: list[str] = []  # the Range header of each object download ("" for a whole object)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        request = Request(scope, receive)
        query = request.url.query
        if refuse and "alt=media" in query:
            message = "sdxl@p.iam.gserviceaccount.com does not have storage.objects.get access"
            refused.append(request.url.path)
            error = {"error": {"code": 403, "message": message, "errors": [{"reason": "forbidden"}]}}
            await JSONResponse(error, status_code=403)(scope, receive, send)
            return
        answer = await forward(upstream, request)
        if "alt=media" in query:
            ranges.append(request.headers.get("range", ""))
        body = await change(answer.content) if "alt=media" in query else answer.content
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "content-encoding")}
        await Response(body, status_code=answer.status_code, headers=headers)(scope, receive, send)

    app.refused = refused  # type: ignore[attr-defined]
    app.ranges = ranges  # type: ignore[attr-defined]
    return app


async def flip_first_byte(body: bytes) -> bytes:
    """A bad network: every response (every chunk of a ranged download too) arrives with one bit wrong."""
    return bytes([body[0] ^ 1]) + body[1:] if body else body


def test_progress_is_logged_while_bytes_are_still_on_their_way(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, logged: list[logging.LogRecord]
) -> None:
    import anyio

    progressed = threading.Event()

    class OnProgress(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "bytes_done" in vars(record).get("fields", {}):
                progressed.set()

    async def after_a_progress_line(body: bytes) -> bytes:
        await anyio.to_thread.run_sync(lambda: progressed.wait(30))  # no byte arrives before progress is logged
        return body

    logger, handler = logging.getLogger("sdxl_server"), OnProgress()
    logger.addHandler(handler)
    try:
        with gcs_emulator() as upstream:
            holding = media_proxy(upstream, after_a_progress_line)
            with serve_app(holding) as proxy:
                put_model(_bucket(proxy.url, monkeypatch))
                download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK, progress_every_s=0.01)
    finally:
        logger.removeHandler(handler)
    # objects over a chunk came as concurrent 64 KiB ranges (the emulator answers Range with 206)
    sizes = [len(d) for d in MODEL.values() if len(d) > CHUNK]
    chunks = [f"bytes={start}-{min(start + CHUNK, size) - 1}" for size in sizes for start in range(0, size, CHUNK)]
    assert sorted(r for r in holding.ranges if r) == sorted(chunks)
    progress = [vars(r)["fields"] for r in logged if "bytes_done" in vars(r).get("fields", {})]
    assert progress, "no progress line"
    total = sum(len(d) for d in MODEL.values())
    assert all(p["bytes_total"] == total and 0 <= p["bytes_done"] <= total and "mb_per_s" in p for p in progress)
    assert [p["bytes_done"] for p in progress] == sorted(p["bytes_done"] for p in progress)


@pytest.mark.parametrize("name", ["unet/diffusion_pytorch_model.fp16.safetensors", "unet/config.json"])
def test_bytes_that_never_match_the_checksum_fail_naming_the_object(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    with gcs_emulator() as upstream, serve_app(media_proxy(upstream, flip_first_byte)) as proxy:
        bucket = _bucket(proxy.url, monkeypatch)  # the Host header makes the objects' media links the proxy's
        bucket.put(f"sdxl/{name}", MODEL[f"sdxl/{name}"])
        with pytest.raises(ModelLoadError) as failed:
            download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK)
    assert f"gs://weights/sdxl/{name}" in str(failed.value) and "checksum" in str(failed.value)
    assert files_under(tmp_path) == {}  # no partial file, no file that looks whole


def test_the_manifest_lives_beside_the_folder_not_in_it(bucket: Bucket, tmp_path: Path) -> None:
    put_model(bucket)
    folder = download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK)
    manifest = json.loads((tmp_path / f"{folder.name}.manifest.json").read_text())
    assert set(manifest["objects"]) == {name.removeprefix("sdxl/") for name in MODEL}
    assert all({"generation", "crc32c", "size", "mtime_ns"} <= set(e) for e in manifest["objects"].values())


async def unchanged(body: bytes) -> bytes:
    return body


def test_a_refused_download_is_named_and_not_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with gcs_emulator() as upstream:
        refusing = media_proxy(upstream, unchanged, refuse=True)
        with serve_app(refusing) as proxy:
            _bucket(proxy.url, monkeypatch).put("sdxl/model_index.json", b"{}")
            with pytest.raises(ModelLoadError) as failed:
                download_folder("gs://weights/sdxl", tmp_path)
    assert "gs://weights/sdxl/model_index.json" in str(failed.value) and "Forbidden" in str(failed.value)
    assert "storage.objects.get" in str(failed.value)
    assert len(refusing.refused) == 1  # a refusal does not change on a second try
    assert files_under(tmp_path) == {}


def test_an_object_at_the_bucket_root_named_as_an_absolute_path_is_refused(bucket: Bucket, tmp_path: Path) -> None:
    bucket.put("model_index.json", b"{}")
    bucket.put("/tmp/evil.pth", b"import os\n")
    with pytest.raises(ModelLoadError, match=r"refusing gs://weights//tmp/evil\.pth: .*absolute path"):
        download_folder("gs://weights", tmp_path / "cache")
    assert files_under(tmp_path) == {}


@pytest.mark.parametrize("garbage", ["", "[]", '{"objects": []}', '{"objects": {"model_index.json": 5}}'])
def test_an_unreadable_manifest_means_every_file_is_fetched_again(bucket: Bucket, tmp_path: Path, garbage) -> None:
    put_model(bucket)
    folder = download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK)
    (folder / "model_index.json").write_bytes(b"{}")
    (tmp_path / f"{folder.name}.manifest.json").write_text(garbage)
    download_folder("gs://weights/sdxl", tmp_path, chunk_bytes=CHUNK)
    assert files_under(folder) == {name.removeprefix("sdxl/"): data for name, data in MODEL.items()}
