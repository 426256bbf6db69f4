"""The LoRA disk cache: real google-cloud-storage against the GCS emulator (through a counting proxy on loopback),
real files, a hostile cache folder; nothing leaves the machine. hf:// sources: test_lora_hub.py."""

from __future__ import annotations

import itertools
import json
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdxl_server.errors import FetchFailed, InvalidRequest
from sdxl_server.lora.sources import Source, parse_source
from sdxl_server.lora.store import GRANT, Store, key_of
from tests.model_server.conftest import Lines
from tests.model_server.gcs_proxy import Bucket, Proxy
from tests.servers import gcs_emulator, serve_app

pytestmark = pytest.mark.usefixtures("loopback_only")
FIELD = "parameters.lora[0].source"
MB = 1_000_000
_BUCKETS = itertools.count()


@pytest.fixture(scope="module")
def emulator() -> Iterator[tuple[Any, Proxy]]:
    """One emulator behind one proxy for the module (each test gets its own bucket): a client, the proxy."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with gcs_emulator() as upstream, pytest.MonkeyPatch.context() as env:
        proxy = Proxy(upstream)
        with serve_app(proxy) as served:
            # the emulator writes its Host into media links: every request, downloads too, goes through the proxy
            env.setenv("STORAGE_EMULATOR_HOST", served.url)
            yield storage.Client(project="test", credentials=AnonymousCredentials()), proxy


@pytest.fixture
def bucket(emulator: tuple[Any, Proxy]) -> Bucket:
    client, proxy = emulator
    proxy.reset()
    return Bucket(client.create_bucket(f"loras-{next(_BUCKETS)}"), proxy)


def store(folder: Path, *, max_bytes: int = MB, budget: int = 10 * MB, in_use_s: float = 0.0) -> Store:
    return Store(folder, max_bytes=max_bytes, budget_bytes=budget, in_use_s=in_use_s)


def cached_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} - {"index.json"}


# -- gs:// ---------------------------------------------------------------------------------------------------


def test_a_gs_object_arrives_verified_under_its_generation_and_the_fetch_is_logged(
    bucket: Bucket, tmp_path: Path, log_lines: Lines
) -> None:
    data = os.urandom(50_000)
    source = bucket.put("styles/pixel.safetensors", data)
    fetched = store(tmp_path / "loras").fetch(source, field=FIELD)
    generation = bucket.generation("styles/pixel.safetensors")
    assert fetched.path.read_bytes() == data and fetched.path.parent == tmp_path / "loras"
    assert (fetched.version, fetched.size, fetched.source) == (generation, len(data), source)
    assert fetched.key == key_of(f"gs://{bucket.name}/styles/pixel.safetensors", generation)
    line = log_lines.one("lora fetched")
    assert (line["adapter"], line["bytes"]) == (source.uri, len(data)) and {"seconds", "mb_per_s"} <= set(line)
    assert cached_files(tmp_path / "loras") == {fetched.path.name}  # no .partial left
    assert [p.rsplit("/o/", 1)[1] for p in bucket.proxy.media] == ["styles/pixel.safetensors"]


@pytest.mark.parametrize("weight_name", [None, "v2.safetensors"])
def test_a_gs_folder_means_its_weight_file_and_nothing_is_listed(
    bucket: Bucket, tmp_path: Path, weight_name: str | None
) -> None:
    bucket.put(f"pixel/{weight_name or 'pytorch_lora_weights.safetensors'}", b"w" * 100)
    source = parse_source(f"gs://{bucket.name}/pixel/", weight_name=weight_name)
    assert store(tmp_path).fetch(source, field=FIELD).path.read_bytes() == b"w" * 100
    assert len(bucket.proxy.metadata) == 1 and len(bucket.proxy.media) == 1  # one object read, no listing


def test_a_second_use_reads_metadata_only_even_after_a_restart(bucket: Bucket, tmp_path: Path) -> None:
    source = bucket.put("a.safetensors", os.urandom(10_000))
    first = store(tmp_path).fetch(source, field=FIELD)
    again = store(tmp_path).fetch(source, field=FIELD)  # a new Store: the server restarted on the same disk
    assert again == first
    assert len(bucket.proxy.media) == 1 and len(bucket.proxy.metadata) == 2


def test_eight_concurrent_first_uses_download_once(bucket: Bucket, tmp_path: Path) -> None:
    data = os.urandom(200_000)
    source = bucket.put("a.safetensors", data)
    cache = store(tmp_path)
    start = threading.Barrier(8)
    results: list[Any] = []

    def use() -> None:
        start.wait()
        results.append(cache.fetch(source, field=FIELD))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len({r.path for r in results}) == 1 and results[0].path.read_bytes() == data
    assert len(bucket.proxy.media) == 1


def test_a_replaced_object_is_fetched_again_at_its_new_generation(bucket: Bucket, tmp_path: Path) -> None:
    source = bucket.put("a.safetensors", b"first" * 1000)
    cache = store(tmp_path)
    first = cache.fetch(source, field=FIELD)
    bucket.put("a.safetensors", b"again" * 1000)  # the same size: only the generation tells them apart
    second = cache.fetch(source, field=FIELD)
    assert second.version != first.version and second.key != first.key
    assert second.path.read_bytes() == b"again" * 1000 and len(bucket.proxy.media) == 2
    assert not first.path.exists() and [e["key"] for e in cache.entries()] == [second.key]  # the old one is dead


def test_a_missing_object_is_a_400_not_found(bucket: Bucket, tmp_path: Path) -> None:
    with pytest.raises(InvalidRequest) as refused:
        store(tmp_path).fetch(parse_source(f"gs://{bucket.name}/nope.safetensors"), field=FIELD)
    assert refused.value.field == FIELD and refused.value.message == f"gs://{bucket.name}/nope.safetensors not found"
    assert cached_files(tmp_path) == set() and bucket.proxy.media == []


def test_an_object_over_the_limit_is_refused_before_any_byte_moves(bucket: Bucket, tmp_path: Path) -> None:
    source = bucket.put("big.safetensors", os.urandom(5_000))
    with pytest.raises(InvalidRequest) as refused:
        store(tmp_path, max_bytes=4_999).fetch(source, field=FIELD)
    assert "is 5000 bytes, over SDXL_LORA_MAX_BYTES=4999" in refused.value.message
    assert refused.value.field == FIELD and bucket.proxy.media == [] and cached_files(tmp_path) == set()


def test_a_download_that_grows_past_the_limit_is_stopped(bucket: Bucket, tmp_path: Path) -> None:
    source = bucket.put("a.safetensors", os.urandom(4_000))  # its metadata says 4000 bytes: under the limit
    bucket.proxy.append = os.urandom(100_000)
    with pytest.raises(InvalidRequest, match="grew past the limit while downloading") as refused:
        store(tmp_path, max_bytes=50_000).fetch(source, field=FIELD)
    assert refused.value.field == FIELD and cached_files(tmp_path) == set()


def test_the_server_account_refused_is_a_502_that_says_what_to_grant_and_is_not_retried(
    bucket: Bucket, tmp_path: Path
) -> None:
    source = bucket.put("a.safetensors", b"x" * 100)
    bucket.proxy.fail_metadata = [403, 403]
    with pytest.raises(FetchFailed) as failed:
        store(tmp_path).fetch(source, field=FIELD)
    assert failed.value.status == 502 and failed.value.field == FIELD
    assert failed.value.message == f"the server may not read {source.uri} (403): {GRANT}"
    assert len(bucket.proxy.metadata) == 1 and bucket.proxy.fail_metadata == [403]


def test_one_server_error_is_retried_and_two_are_a_502(bucket: Bucket, tmp_path: Path) -> None:
    source = bucket.put("a.safetensors", b"x" * 100)
    bucket.proxy.fail_media = [503]
    assert store(tmp_path / "once").fetch(source, field=FIELD).path.read_bytes() == b"x" * 100
    bucket.proxy.fail_media = [503, 500]
    with pytest.raises(FetchFailed, match=rf"could not fetch gs://{bucket.name}/a\.safetensors: .*\(twice\)"):
        store(tmp_path / "twice").fetch(source, field=FIELD)
    assert cached_files(tmp_path / "twice") == set()


def test_bytes_that_never_match_the_crc32c_are_a_502_and_leave_nothing(bucket: Bucket, tmp_path: Path) -> None:
    source = bucket.put("a.safetensors", os.urandom(1_000))
    bucket.proxy.flip = True
    with pytest.raises(FetchFailed, match="do not match its crc32c"):
        store(tmp_path).fetch(source, field=FIELD)
    assert len(bucket.proxy.media) == 2 and cached_files(tmp_path) == set()


def test_an_object_gone_during_its_download_is_fetched_again_from_its_metadata(bucket: Bucket, tmp_path: Path) -> None:
    source = bucket.put("a.safetensors", b"x" * 100)
    bucket.proxy.fail_media = [404]  # replaced between the metadata and the download: that generation is gone
    assert store(tmp_path).fetch(source, field=FIELD).path.read_bytes() == b"x" * 100
    assert len(bucket.proxy.metadata) == 2 and len(bucket.proxy.media) == 2


@pytest.mark.parametrize(
    ("path", "why"),
    [
        ("a/../../x.safetensors", "'..' segment"),
        ("a//x.safetensors", "empty or '.' segment"),
        ("/x.safetensors", "absolute"),
    ],
)
def test_an_object_name_that_could_escape_is_refused_before_any_request(
    bucket: Bucket, tmp_path: Path, path: str, why: str
) -> None:
    with pytest.raises(InvalidRequest, match=why) as refused:
        store(tmp_path).fetch(Source("gs", bucket.name, path), field=FIELD)  # past the parser: the store checks too
    assert refused.value.field == FIELD and bucket.proxy.metadata == [] and cached_files(tmp_path) == set()


# -- the budget ----------------------------------------------------------------------------------------------


def test_past_the_budget_the_least_recently_used_file_goes_and_the_order_survives_a_restart(
    bucket: Bucket, tmp_path: Path, log_lines: Lines
) -> None:
    a, b, c, d = (bucket.put(f"{n}.safetensors", os.urandom(1_000)) for n in "abcd")
    cache = store(tmp_path, budget=2_500)
    cache.fetch(a, field=FIELD)
    cache.fetch(b, field=FIELD)
    cache.fetch(a, field=FIELD)  # a used after b
    cache.fetch(c, field=FIELD)
    assert [e["adapter"] for e in cache.entries()] == [c.uri, a.uri]
    assert [(line["adapter"], line["bytes"]) for line in log_lines.lines if line["message"] == "lora evicted"] == [
        (b.uri, 1_000)
    ]
    restarted = store(tmp_path, budget=2_500)
    restarted.fetch(d, field=FIELD)  # a was used before c, in the index the first Store saved
    assert [e["adapter"] for e in restarted.entries()] == [d.uri, c.uri]
    assert len(cached_files(tmp_path)) == 2


def test_pinned_files_and_the_file_returned_are_never_evicted(bucket: Bucket, tmp_path: Path) -> None:
    a, b, c = (bucket.put(f"{n}.safetensors", os.urandom(1_000)) for n in "abc")
    big = bucket.put("big.safetensors", os.urandom(3_000))
    cache = store(tmp_path, budget=2_000)
    cache.pin(cache.fetch(a, field=FIELD).key)
    cache.fetch(b, field=FIELD)
    cache.fetch(c, field=FIELD)  # over budget: b goes, a is pinned
    assert {e["adapter"] for e in cache.entries()} == {a.uri, c.uri}
    fetched = cache.fetch(big, field=FIELD)  # bigger than the budget on its own: kept, as it is being returned
    assert fetched.path.is_file() and {e["adapter"] for e in cache.entries()} == {a.uri, big.uri}


def test_files_used_just_now_are_kept_over_the_budget(bucket: Bucket, tmp_path: Path) -> None:
    a, b = (bucket.put(f"{n}.safetensors", os.urandom(1_000)) for n in "ab")
    cache = store(tmp_path, budget=1_000, in_use_s=3600)  # a caller may be reading a right now
    first = cache.fetch(a, field=FIELD)
    cache.fetch(b, field=FIELD)
    assert first.path.is_file() and len(cache.entries()) == 2


# -- a hostile or damaged cache folder -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "garbage",
    [
        "",
        "[]",
        "{",
        '{"entries": []}',
        json.dumps(
            {
                "entries": {
                    "../../etc/passwd": {"adapter": "x", "version": "1", "bytes": 1, "mtime_ns": 1, "last_used": 1}
                }
            }
        ),
        '{"entries": {"KEY": {"adapter": 5}}}',
        '{"entries": {"KEY": {"adapter": "x", "version": "1", "bytes": -1, "mtime_ns": 1, "last_used": "soon"}}}',
    ],
)
def test_a_garbage_index_is_ignored_and_the_file_fetched_again(bucket: Bucket, tmp_path: Path, garbage: str) -> None:
    data = os.urandom(1_000)
    source = bucket.put("a.safetensors", data)
    key = store(tmp_path).fetch(source, field=FIELD).key
    (tmp_path / "index.json").write_text(garbage.replace("KEY", key))
    fetched = store(tmp_path).fetch(source, field=FIELD)
    assert fetched.path.read_bytes() == data and len(bucket.proxy.media) == 2
    assert json.loads((tmp_path / "index.json").read_text())["entries"].keys() == {key}
    assert (tmp_path / "index.json").is_file() and not (tmp_path / "index.json").is_symlink()


def test_a_last_use_in_the_future_does_not_keep_a_file_forever(bucket: Bucket, tmp_path: Path) -> None:
    a, b, c = (bucket.put(f"{n}.safetensors", os.urandom(1_000)) for n in "abc")
    cache = store(tmp_path, budget=3_000)
    key = cache.fetch(a, field=FIELD).key
    cache.fetch(b, field=FIELD)
    index = json.loads((tmp_path / "index.json").read_text())
    index["entries"][key]["last_used"] = 1e12  # a clock set wrong, or a hand edit
    (tmp_path / "index.json").write_text(json.dumps(index))
    restarted = store(tmp_path, budget=1_000)
    restarted.fetch(c, field=FIELD)
    assert [e["adapter"] for e in restarted.entries()] == [c.uri]


def test_a_cached_file_edited_on_disk_is_fetched_again(bucket: Bucket, tmp_path: Path) -> None:
    data = os.urandom(1_000)
    source = bucket.put("a.safetensors", data)
    path = store(tmp_path).fetch(source, field=FIELD).path
    path.write_bytes(bytes(1_000))  # the same size, a new mtime
    assert store(tmp_path).fetch(source, field=FIELD).path.read_bytes() == data
    assert len(bucket.proxy.media) == 2


@pytest.mark.parametrize("suffix", [".safetensors", ".partial"])
def test_a_link_planted_in_the_cache_is_never_followed(bucket: Bucket, tmp_path: Path, suffix: str) -> None:
    data = os.urandom(1_000)
    source = bucket.put("a.safetensors", data)
    folder, victim = tmp_path / "loras", tmp_path / "victim"
    folder.mkdir()
    victim.write_bytes(b"precious")
    key = key_of(source.uri, bucket.generation("a.safetensors"))
    cache = store(folder)  # planted while the server runs, past the sweep of stray files at start
    (folder / f"{key}{suffix}").symlink_to(victim)
    fetched = cache.fetch(source, field=FIELD)
    assert fetched.path.read_bytes() == data and not fetched.path.is_symlink()
    assert victim.read_bytes() == b"precious" and cached_files(folder) == {f"{key}.safetensors"}


def test_links_planted_before_a_start_are_removed_not_followed(bucket: Bucket, tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_bytes(b"precious")
    folder = tmp_path / "loras"
    folder.mkdir()
    for name in (f"{'0' * 32}.partial", f"{'1' * 32}.safetensors", "index.json.partial"):
        (folder / name).symlink_to(victim)
    store(folder)
    assert cached_files(folder) == set() and victim.read_bytes() == b"precious"


def test_a_folder_planted_under_a_file_name_is_a_502_not_a_crash(
    bucket: Bucket, tmp_path: Path, log_lines: Lines
) -> None:
    source = bucket.put("a.safetensors", b"x" * 100)
    cache = store(tmp_path)
    (tmp_path / f"{key_of(source.uri, bucket.generation('a.safetensors'))}.safetensors").mkdir()
    with pytest.raises(FetchFailed, match=f"could not store {source.uri} in its LoRA cache") as raised:
        cache.fetch(source, field=FIELD)
    assert str(tmp_path) not in raised.value.message  # the client is not told the server's paths; its log is
    assert str(tmp_path) in log_lines.one("lora cache not writable")["reason"]
    assert not list(tmp_path.glob("*.partial"))


def test_a_planted_link_named_as_an_indexed_file_is_not_served(bucket: Bucket, tmp_path: Path) -> None:
    data = os.urandom(1_000)
    source = bucket.put("a.safetensors", data)
    fetched = store(tmp_path).fetch(source, field=FIELD)
    victim = tmp_path.parent / f"{tmp_path.name}-victim"
    victim.write_bytes(fetched.path.read_bytes())  # even with the same bytes and size
    fetched.path.unlink()
    fetched.path.symlink_to(victim)
    again = store(tmp_path).fetch(source, field=FIELD)
    assert not again.path.is_symlink() and again.path.read_bytes() == data and len(bucket.proxy.media) == 2


# -- operator's files (SDXL_LORAS) ---------------------------------------------------------------------------


def test_a_local_file_is_used_where_it_is_versioned_by_mtime_and_size(tmp_path: Path) -> None:
    path = tmp_path / "pixel.safetensors"
    path.write_bytes(b"x" * 100)
    source = parse_source(str(path), allow_files=True)
    cache = store(tmp_path / "loras")
    fetched = cache.fetch(source, field="SDXL_LORAS")
    info = path.stat()
    assert (fetched.path, fetched.size, fetched.version) == (path, 100, f"{info.st_mtime_ns}-100")
    assert cached_files(tmp_path / "loras") == set() and cache.entries() == []
    path.write_bytes(b"y" * 101)
    assert cache.fetch(source, field="SDXL_LORAS").key != fetched.key


def test_a_local_file_missing_or_too_big_is_a_400(tmp_path: Path) -> None:
    missing = parse_source(str(tmp_path / "gone.safetensors"), allow_files=True)
    with pytest.raises(InvalidRequest, match="not found"):
        store(tmp_path).fetch(missing, field="SDXL_LORAS")
    big = tmp_path / "big.safetensors"
    big.write_bytes(b"x" * 101)
    with pytest.raises(InvalidRequest, match="is 101 bytes, over SDXL_LORA_MAX_BYTES=100"):
        store(tmp_path, max_bytes=100).fetch(parse_source(str(big), allow_files=True), field="SDXL_LORAS")
