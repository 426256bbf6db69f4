"""hf:// sources in the LoRA store: a fake Hugging Face Hub on loopback (the routes huggingface_hub calls) and
offline Hub caches laid out as huggingface_hub lays them; nothing leaves the machine."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sdxl_server.errors import FetchFailed, InvalidRequest
from sdxl_server.lora.hub import GATED, Hub
from sdxl_server.lora.sources import parse_source
from sdxl_server.lora.store import Store
from tests.model_server.published import hub_app, hub_cache
from tests.servers import serve_app

pytestmark = pytest.mark.usefixtures("loopback_only")
FIELD = "parameters.lora[0].source"
MB = 1_000_000


REPO = "someone/pixel-lora"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@dataclass
class FakeHub:
    """published.hub_app (the routes huggingface_hub calls) with a count of HEADs and a way to fail or to lie."""

    repos: dict[str, tuple[str, dict[str, bytes]]]
    downloads: list[str] = field(default_factory=list)  # file bodies sent, "repo/name"
    heads: list[str] = field(default_factory=list)
    fail_get: list[int] = field(default_factory=list)  # statuses for the next file GETs, one each
    head_size: int | None = None  # what HEAD says of every file's size (the truth when None)
    gated: bool = False

    def app(self) -> Any:
        from starlette.responses import JSONResponse

        inner = hub_app(self.repos, self.downloads)

        async def app(scope: Any, receive: Any, send: Any) -> None:
            if scope["type"] != "http":
                return await inner(scope, receive, send)
            if "/".join(scope["path"].split("/")[1:3]) not in self.repos:  # as the Hub answers a repo it lacks
                headers = {"X-Error-Code": "RepoNotFound"}
                return await JSONResponse({"error": "Repository not found"}, 404, headers)(scope, receive, send)
            if self.gated:  # as the Hub answers a gated repo's file to a token without access
                headers = {"X-Error-Code": "GatedRepo"}
                return await JSONResponse({"error": "Access restricted"}, 403, headers)(scope, receive, send)
            if scope["method"] == "HEAD":
                self.heads.append(scope["path"])
            elif self.fail_get and "/resolve/" in scope["path"]:
                status = self.fail_get.pop(0)
                return await JSONResponse({"error": "no"}, status_code=status)(scope, receive, send)

            async def sending(message: dict[str, Any]) -> None:
                if message["type"] == "http.response.start" and scope["method"] == "HEAD" and self.head_size:
                    headers = [(k, v) for k, v in message["headers"] if k.lower() != b"content-length"]
                    message = {**message, "headers": [*headers, (b"content-length", str(self.head_size).encode())]}
                await send(message)

            return await inner(scope, receive, sending)

        return app


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[FakeHub, str]]:
    from huggingface_hub import constants

    # the server runs without HF_HUB_OFFLINE; the tests' process sets it (the session refuses any request)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    fake = FakeHub({REPO: (COMMIT, {"pytorch_lora_weights.safetensors": os.urandom(30_000)})})
    with serve_app(fake.app()) as served:
        yield fake, served.url


def hub_store(folder: Path, url: str, **kwargs: Any) -> Store:
    return Store(folder, max_bytes=kwargs.pop("max_bytes", MB), budget_bytes=10 * MB, hub=Hub(endpoint=url), **kwargs)


def test_a_hub_file_is_downloaded_once_under_its_commit_and_etag(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    data = fake.repos[REPO][1]["pytorch_lora_weights.safetensors"]
    source = parse_source(REPO)
    fetched = hub_store(tmp_path, url).fetch(source, field=FIELD)
    assert fetched.path.read_bytes() == data and fetched.path.parent == tmp_path
    assert fetched.version == f"{COMMIT}:{hashlib.sha256(data).hexdigest()}" and fetched.size == len(data)
    again = hub_store(tmp_path, url).fetch(source, field=FIELD)  # after a restart too: a HEAD, no download
    assert again == fetched
    assert fake.downloads == [f"{REPO}/pytorch_lora_weights.safetensors"] and len(fake.heads) == 2


def test_eight_concurrent_first_uses_of_a_hub_file_download_once(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    cache, start = hub_store(tmp_path, url), threading.Barrier(8)
    results: list[Any] = []

    def use() -> None:
        start.wait()
        results.append(cache.fetch(parse_source(f"hf://{REPO}"), field=FIELD))

    threads = [threading.Thread(target=use) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and len({r.key for r in results}) == 1 and len(fake.downloads) == 1


def test_a_new_commit_is_fetched_again(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    cache = hub_store(tmp_path, url)
    first = cache.fetch(parse_source(REPO), field=FIELD)
    fake.repos[REPO] = ("f" * 40, {"pytorch_lora_weights.safetensors": b"new" * 100})
    second = cache.fetch(parse_source(REPO), field=FIELD)
    assert second.key != first.key and second.path.read_bytes() == b"new" * 100 and len(fake.downloads) == 2


@pytest.mark.parametrize(
    "text", [f"hf://{REPO}/other.safetensors", "someone/missing-repo", f"hf://{REPO}/sub/x.safetensors"]
)
def test_a_file_or_repo_the_hub_lacks_is_a_400_not_found(hub: tuple[FakeHub, str], tmp_path: Path, text: str) -> None:
    fake, url = hub
    source = parse_source(text)
    with pytest.raises((InvalidRequest, FetchFailed)) as refused:
        hub_store(tmp_path, url).fetch(source, field=FIELD)
    assert isinstance(refused.value, InvalidRequest), refused.value.message
    assert refused.value.message == f"{source.uri} not found" and refused.value.field == FIELD
    assert fake.downloads == [] and cached_files(tmp_path) == set()


def test_a_gated_repo_the_token_may_not_read_is_a_502_that_says_so(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    fake.gated = True
    with pytest.raises(FetchFailed) as failed:
        hub_store(tmp_path, url).fetch(parse_source(REPO), field=FIELD)
    assert failed.value.message == f"the server may not read hf://{REPO}/pytorch_lora_weights.safetensors: {GATED}"
    assert failed.value.field == FIELD and fake.downloads == []


def test_a_hub_file_over_the_limit_is_refused_from_its_metadata(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    with pytest.raises(InvalidRequest, match="is 30000 bytes, over SDXL_LORA_MAX_BYTES=29999"):
        hub_store(tmp_path, url, max_bytes=29_999).fetch(parse_source(REPO), field=FIELD)
    assert fake.downloads == [] and cached_files(tmp_path) == set()


def test_a_hub_download_longer_than_its_metadata_is_stopped_at_the_limit(
    hub: tuple[FakeHub, str], tmp_path: Path
) -> None:
    fake, url = hub
    fake.head_size = 100  # the HEAD says 100 bytes; the body is 30000
    with pytest.raises(InvalidRequest, match="grew past the limit while downloading"):
        hub_store(tmp_path, url, max_bytes=10_000).fetch(parse_source(REPO), field=FIELD)
    assert cached_files(tmp_path) == set()


def test_hub_server_errors_are_retried_once_then_a_502(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub
    fake.fail_get = [503]
    assert hub_store(tmp_path / "once", url).fetch(parse_source(REPO), field=FIELD).size == 30_000
    fake.fail_get = [502, 500]
    with pytest.raises(FetchFailed, match=rf"could not fetch hf://{REPO}/pytorch_lora_weights\.safetensors: .*twice"):
        hub_store(tmp_path / "twice", url).fetch(parse_source(REPO), field=FIELD)
    assert cached_files(tmp_path / "twice") == set()


def offline_cache(root: Path, data: bytes) -> Path:
    hub_cache(root / "hub", REPO, {"pytorch_lora_weights.safetensors": data, "sub/x.safetensors": b"x"}, COMMIT)
    return root / "hub"


def test_offline_a_hub_file_comes_from_the_hub_cache_in_place(tmp_path: Path) -> None:
    data = os.urandom(1_000)
    cache = offline_cache(tmp_path, data)
    store_ = Store(tmp_path / "loras", max_bytes=MB, budget_bytes=MB, hub=Hub(cache=cache, offline=True))
    fetched = store_.fetch(parse_source(REPO), field=FIELD)
    assert fetched.path.read_bytes() == data and fetched.path.is_relative_to(cache)
    assert fetched.version == f"{COMMIT}:{hashlib.sha256(data).hexdigest()}"
    assert store_.fetch(parse_source(f"hf://{REPO}@{COMMIT}/sub/x.safetensors"), field=FIELD).size == 1
    assert cached_files(tmp_path / "loras") == set()  # no copy: nothing was downloaded


@pytest.mark.parametrize(
    "text",
    [f"hf://{REPO}/other.safetensors", "someone/else", f"hf://{REPO}@{'e' * 40}/pytorch_lora_weights.safetensors"],
)
def test_offline_a_file_the_hub_cache_lacks_is_a_400(tmp_path: Path, text: str) -> None:
    cache = offline_cache(tmp_path, b"x" * 10)
    store_ = Store(tmp_path / "loras", max_bytes=MB, budget_bytes=MB, hub=Hub(cache=cache, offline=True))
    with pytest.raises(InvalidRequest, match=r"not found in the Hugging Face cache \(HF_HUB_OFFLINE=1") as refused:
        store_.fetch(parse_source(text), field=FIELD)
    assert refused.value.field == FIELD


def test_offline_a_cached_file_over_the_limit_is_a_400(tmp_path: Path) -> None:
    cache = offline_cache(tmp_path, b"x" * 101)
    store_ = Store(tmp_path / "loras", max_bytes=100, budget_bytes=MB, hub=Hub(cache=cache, offline=True))
    with pytest.raises(InvalidRequest, match="is 101 bytes, over SDXL_LORA_MAX_BYTES=100"):
        store_.fetch(parse_source(REPO), field=FIELD)


SCRIPT = """
import json, sys
from pathlib import Path
from sdxl_server.lora.sources import parse_source
from sdxl_server.lora.store import Store
fetched = Store(Path(sys.argv[1]), max_bytes=10**6, budget_bytes=10**7).fetch(parse_source(sys.argv[2]), field="f")
print(json.dumps({"path": str(fetched.path), "version": fetched.version}))
"""


def test_the_environment_chooses_the_hub_as_huggingface_hub_reads_it(hub: tuple[FakeHub, str], tmp_path: Path) -> None:
    fake, url = hub

    def run(env: dict[str, str]) -> dict[str, Any]:
        full = {**os.environ, "HF_HOME": str(tmp_path / "hf"), **env}
        done = subprocess.run(
            [sys.executable, "-c", SCRIPT, str(tmp_path / "loras"), REPO], env=full, capture_output=True, timeout=60
        )
        assert done.returncode == 0, done.stderr.decode()
        return dict(json.loads(done.stdout))

    online = run({"HF_ENDPOINT": url, "HF_HUB_OFFLINE": "0"})  # HF_ENDPOINT honoured
    assert Path(online["path"]).parent == tmp_path / "loras" and fake.downloads == [
        f"{REPO}/pytorch_lora_weights.safetensors"
    ]
    offline_cache(tmp_path / "hf", b"baked")  # HF_HOME/hub, as an image bakes it
    offline = run({"HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "1"})
    assert Path(offline["path"]).read_bytes() == b"baked" and len(fake.downloads) == 1


def cached_files(folder: Path) -> set[str]:
    return {p.name for p in folder.iterdir()} - {"index.json"} if folder.is_dir() else set()
