"""sdxlctl lora push against the GCS emulator, through google-cloud-storage: the object lands under the first
gs:// prefix of [model] lora_sources as <stem>-<sha256[:12]>.safetensors, byte for byte; the same file again
uploads nothing; a large file goes in resumable chunks."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cli.test_lora_push import lora_file
from tests.conftest import Cli
from tests.emulator.app import create_app
from tests.emulator.core import World
from tests.emulator_fixtures import Emulator
from tests.servers import serve_app

BUCKET = "demo-project-loras"


@pytest.fixture
def cloud(gcs: str, tmp_path: Path) -> Iterator[Emulator]:
    """The Google Cloud emulator (no model server: push needs none) on the session's GCS emulator, a bucket made."""
    world = World()
    with serve_app(create_app(world, gcs_url=gcs)) as server:
        emulated = Emulator(server.url, gcs, world)
        if emulated.storage().lookup_bucket(BUCKET) is None:
            emulated.storage().create_bucket(BUCKET)
        (tmp_path / "sdxlctl.toml").write_text(f'[model]\nlora_sources = ["hf://org/", "gs://{BUCKET}/loras"]\n')
        yield emulated


def test_push_uploads_once_under_the_first_gs_prefix_and_prints_the_source(
    cli: Cli, cloud: Emulator, tmp_path: Path
) -> None:
    path = lora_file(tmp_path / "pixel art.safetensors")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    source = f"gs://{BUCKET}/loras/pixel-art-{digest[:12]}.safetensors"

    first = cli("lora", "push", str(path), "--yes", env=cloud.env())
    assert first.code == 0, first.err
    assert first.out.strip() == source
    assert "uploaded" in first.err and f'sdxlctl predict "a prompt" --lora {source}:1.0' in first.err
    blob = cloud.storage().bucket(BUCKET).get_blob(f"loras/pixel-art-{digest[:12]}.safetensors")
    assert blob is not None and blob.download_as_bytes() == path.read_bytes()
    blob.upload_from_string(b"marker")  # what a second upload would overwrite

    again = cli("lora", "push", str(path), "--yes", "--json", env=cloud.env())
    assert again.code == 0, again.err
    assert json.loads(again.out) == {
        "source": source,
        "uploaded": False,
        "bytes": path.stat().st_size,
        "sha256": digest,
    }
    assert "already there" in again.err
    assert cloud.storage().bucket(BUCKET).blob(blob.name).download_as_bytes() == b"marker"  # nothing written


def test_a_large_file_goes_in_chunks_and_arrives_whole(cli: Cli, cloud: Emulator, tmp_path: Path) -> None:
    import numpy as np
    from safetensors.numpy import save_file

    path = tmp_path / "big.safetensors"
    # 20 MB: over the 8 MiB resumable chunk, so the upload takes three requests
    weights = np.random.default_rng(0).standard_normal((2, 1280, 1024)).astype(np.float32)
    save_file({"unet.a.lora_A.weight": weights[0], "unet.a.lora_B.weight": weights[1]}, str(path))
    result = cli("lora", "push", str(path), "--yes", env=cloud.env())
    assert result.code == 0, result.err
    name = result.out.strip().removeprefix(f"gs://{BUCKET}/")
    blob = cloud.storage().bucket(BUCKET).get_blob(name)
    assert blob is not None and blob.size == path.stat().st_size
    assert hashlib.sha256(blob.download_as_bytes()).digest() == hashlib.sha256(path.read_bytes()).digest()


def test_a_missing_bucket_is_one_line_naming_it(cli: Cli, cloud: Emulator, tmp_path: Path) -> None:
    (tmp_path / "sdxlctl.toml").write_text('[model]\nlora_sources = ["gs://no-such-bucket-here/loras/"]\n')
    result = cli("lora", "push", str(lora_file(tmp_path / "a.safetensors")), "--yes", env=cloud.env())
    assert result.code == 1
    assert result.err.startswith("error: upload gs://no-such-bucket-here/loras/a-") and "Traceback" not in result.err


def test_the_progress_is_told_the_bytes_sent_up_to_the_whole_file(cloud: Emulator, tmp_path: Path) -> None:
    """What the transfer bar shows: lora_ops.push tells each chunk's bytes as google-cloud-storage reads them."""
    import numpy as np
    from safetensors.numpy import save_file

    from sdxlctl.config import load_config
    from sdxlctl.lora_ops import push

    path = tmp_path / "mid.safetensors"
    weights = np.random.default_rng(1).standard_normal((2, 2048, 1024)).astype(np.float32)  # 8 MiB each
    save_file({"unet.a.lora_A.weight": weights[0], "unet.a.lora_B.weight": weights[1]}, str(path))
    told: list[tuple[int, int]] = []
    env = cloud.env()
    with pytest.MonkeyPatch.context() as patch:
        for var, value in env.items():
            patch.setenv(var, value)
        config = load_config(tmp_path / "sdxlctl.toml")
        pushed = push(config, path, sent=lambda done, total: told.append((done, total)))
    size = path.stat().st_size
    assert pushed.uploaded and told[-1] == (size, size)
    assert len({done for done, _ in told}) >= 3  # chunk by chunk, not once at the end
    assert [done for done, _ in told] == sorted(done for done, _ in told)
