"""`python -m sdxl_server.fetch`: what a baked image holds, from a Hub cache, a Hub on loopback, gs:// and bad input."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sdxl_server.sources import Placement, load_pipeline
from tests.model_server import published
from tests.model_server.conftest import Lines
from tests.model_server.published import (
    COMMIT,
    FP16_FIX,
    SDXL_BASE,
    VAE_COMMIT,
    assert_close,
    reference,
    served,
    snapshot,
)
from tests.servers import serve_app

pytestmark = pytest.mark.usefixtures("loopback_only")
FP16 = Placement("cpu", torch.float16)


def test_fetch_copies_the_fp16_files_and_the_fp16_fix_vae_and_records_where_from(
    work: Path, hubs: dict[str, Path], log_lines: Lines, tmp_path: Path
) -> None:
    dest = tmp_path / "weights"
    env = {**os.environ, "HF_HOME": str(hubs["fp16+fp32"].parent), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "sdxl_server.fetch", "--model", SDXL_BASE, str(dest)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "fp16 weights" in done.stdout and done.stderr == ""
    expected = {n for n in published.sdxl_base(work) if not n.startswith("vae/") and n in _configs(work)}
    expected |= {n for n in published.SDXL_BASE_FP16 if not n.startswith("vae/")}
    expected |= {f"vae/{n}" for n in published.FP16_FIX_FILES}
    assert set(published.tree(dest)) == expected | {"SOURCE.json"}
    record = json.loads((dest / "SOURCE.json").read_text())
    assert (record["source"], record["variant"], record["revision"]) == (SDXL_BASE, "fp16", COMMIT)
    assert (record["vae"]["source"], record["vae"]["revision"]) == (FP16_FIX, VAE_COMMIT)
    assert set(record["files"]) == expected
    unet = "unet/diffusion_pytorch_model.fp16.safetensors"
    assert record["files"][unet]["sha256"] == hashlib.sha256((dest / unet).read_bytes()).hexdigest()

    # The baked folder serves what the Hub source served: fp16 weights, the fp16-fix VAE.
    pipe = load_pipeline(str(dest), FP16, cache_dir=tmp_path)
    assert log_lines.one("weights chosen")["variant"] == "fp16"
    cache = hubs["fp16+fp32"]
    want = reference(snapshot(cache, SDXL_BASE), "fp16", torch.float16, vae=snapshot(cache, FP16_FIX))
    assert_close(served(pipe), want)


def test_fetch_from_gs_records_each_object_generation(bucket: str, work: Path, tmp_path: Path) -> None:
    from sdxl_server.fetch import fetch

    record = fetch(f"{bucket}/fp16+fp32", tmp_path / "weights", vae="auto")  # a gs:// folder's own
    assert record["variant"] == "fp16" and record["vae"] == {"source": "model"}
    assert set(record["files"]) == _configs(work) | set(published.SDXL_BASE_FP16)
    assert set(record["generations"]) == set(record["files"])
    assert all(entry["generation"] and entry["crc32c"] for entry in record["generations"].values())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["weights"]  # the download moved in, nothing left


def test_fetch_of_something_that_is_not_a_model_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sdxl_server.fetch import main

    (tmp_path / "empty").mkdir()
    assert main(["--model", str(tmp_path / "empty"), "--vae", "model", str(tmp_path / "weights")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("fetch: ") and "no model_index.json" in err and len(err.splitlines()) == 1


def _configs(work: Path) -> set[str]:
    return {n for n in published.tree(work / "plain") if not n.endswith(".safetensors")}


def test_fetch_online_downloads_only_the_chosen_files(work: Path, tmp_path: Path) -> None:
    downloads: list[str] = []
    repos = {SDXL_BASE: (COMMIT, published.sdxl_base(work)), FP16_FIX: (VAE_COMMIT, published.fp16_fix(work))}
    with serve_app(published.hub_app(repos, downloads)) as hub:
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
        done = subprocess.run(
            [sys.executable, "-m", "sdxl_server.fetch", "--model", SDXL_BASE, str(tmp_path / "weights")],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
    assert done.returncode == 0, done.stderr
    model = {n for n in _configs(work) | set(published.SDXL_BASE_FP16) if not n.startswith("vae/")}
    chosen = {f"{SDXL_BASE}/{n}" for n in model} | {f"{FP16_FIX}/{n}" for n in published.FP16_FIX_FILES}
    # Never a duplicate or another variant; identical files (the two tokenizers) are fetched once.
    assert set(downloads) <= chosen and any(".fp16." in name for name in downloads)
    assert set(published.tree(tmp_path / "weights")) == model | {f"vae/{n}" for n in published.FP16_FIX_FILES} | {
        "SOURCE.json"
    }
    record = json.loads((tmp_path / "weights" / "SOURCE.json").read_text())
    assert (record["revision"], record["vae"]["revision"]) == (COMMIT, VAE_COMMIT)


def test_fetch_again_into_the_same_folder_leaves_only_the_files_it_records(
    work: Path, log_lines: Lines, tmp_path: Path
) -> None:
    from sdxl_server.fetch import fetch

    source = published.write(tmp_path / "sdxl", published.sdxl_base(work))
    vae = published.write(tmp_path / "fp16-fix", published.fp16_fix(work))
    dest = tmp_path / "weights"
    fetch(str(source), dest, vae="model")  # the model's own VAE: vae/diffusion_pytorch_model.fp16.safetensors
    record = fetch(str(source), dest, vae=str(vae))  # then the fp16-fix VAE, which has plain files only
    assert set(published.tree(dest)) == set(record["files"]) | {"SOURCE.json"}
    # left there, the first VAE's fp16 file would be loaded with the second VAE's config
    load_pipeline(str(dest), FP16, cache_dir=tmp_path / "cache")
    assert log_lines.one("weights chosen")["note"] == "fp16 weights, plain weights for vae"


@pytest.mark.parametrize("model", ["/data/sdxl-typo", "./sdxl-typo"])
def test_fetch_of_a_folder_that_does_not_exist_names_it_not_the_hub(
    model: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdxl_server.fetch import main

    monkeypatch.chdir(tmp_path)
    assert main(["--model", model, "--vae", "model", str(tmp_path / "weights")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"fetch: {model} is not an existing folder, a gs://")
    assert "Hugging Face repo id (owner/name)" in err
