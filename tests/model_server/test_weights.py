"""SDXL as published: the variant from the files present, only those files, every component named.

Fake Hub caches and gs:// folders hold the published file names (tests/model_server/published.py) with the
tiny pipeline's weights; each load is compared with plain diffusers `from_pretrained` of the same files.
"""

from __future__ import annotations

import base64
import hashlib
import io
import json
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from sdxl_server import logs
from sdxl_server.app import create_app
from sdxl_server.errors import ModelLoadError
from sdxl_server.generator import Generator
from sdxl_server.settings import Settings
from sdxl_server.sources import Placement, load_pipeline
from sdxl_server.weights import select_model, select_pipeline
from tests.model_server import published
from tests.model_server.published import FP16_FIX, SDXL_BASE
from tests.servers import gcs_emulator, serve_app, server_process

FP32, FP16 = Placement("cpu", torch.float32), Placement("cpu", torch.float16)
COMMIT = "462165984030d82259a11f4367a4eed129e94a7b"
VAE_COMMIT = "207b116dae70ace3637169f1ddd2434b91b3a8cd"
SEED = 7
REQUEST = {
    "instances": [{"prompt": "a fox", "seed": SEED}],
    "parameters": {"num_inference_steps": 2, "width": 64, "height": 64, "output_format": "png"},
}
SDXL_INDEX = json.loads(
    (Path(__file__).parents[2] / "containers/model/sdxl_server/configs/sdxl-base-1.0/model_index.json").read_text()
)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("published")


@pytest.fixture(scope="module")
def hubs(work: Path) -> dict[str, Path]:
    """One Hugging Face cache per layout of the SDXL repo, each with the fp16-fix VAE repo."""
    caches = {}
    for layout in published.LAYOUTS:
        cache = work / f"hf-{layout}" / "hub"
        published.hub_cache(cache, SDXL_BASE, published.sdxl_base(work, layout), COMMIT)
        published.hub_cache(cache, FP16_FIX, published.fp16_fix(work), VAE_COMMIT)
        caches[layout] = cache
    return caches


class Lines(logging.Handler):
    """The fields of every sdxl_server log line, as the JSON log would show them."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append({"message": record.getMessage(), **getattr(record, "fields", {})})

    def one(self, message: str) -> dict[str, Any]:
        found = [line for line in self.lines if line["message"] == message]
        assert len(found) == 1, self.lines
        return found[0]


_LOOPBACK = ("127.0.0.1", "::1", "localhost")
_left_the_machine: list[str] | None = None  # while a test runs: every address outside it that was tried


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if _left_the_machine is None:
        return
    if event == "socket.connect" and isinstance(args[1], tuple) and args[1][0] not in _LOOPBACK:
        _left_the_machine.append(f"connect {args[1]}")
        raise ConnectionRefusedError(f"a test may not leave the machine: {args[1]}")
    if event == "socket.getaddrinfo" and args[0] not in _LOOPBACK and args[0] is not None:
        _left_the_machine.append(f"resolve {args[0]}")


sys.addaudithook(_audit)  # hooks stay for the process: it does nothing outside this module's tests


@pytest.fixture(autouse=True)
def loopback_only() -> Iterator[None]:
    """Fail a test whose process tried to reach anything but 127.0.0.1 (a Hub, a bucket, a DNS server)."""
    global _left_the_machine
    tried: list[str] = []
    _left_the_machine = tried
    try:
        yield
    finally:
        _left_the_machine = None
    assert not tried, tried


@pytest.fixture
def log_lines() -> Iterator[Lines]:
    handler = Lines()
    logs.logger.addHandler(handler)
    level = logs.logger.level
    logs.logger.setLevel(logging.INFO)
    try:
        yield handler
    finally:
        logs.logger.removeHandler(handler)
        logs.logger.setLevel(level)


def snapshot(cache: Path, repo_id: str) -> Path:
    """Where a fake Hub cache holds repo_id's files."""
    commit = COMMIT if repo_id == SDXL_BASE else VAE_COMMIT
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def reference(folder: Path, variant: str | None, dtype: torch.dtype, vae: Path | None) -> np.ndarray:
    """Plain diffusers: from_pretrained of the same files, the same call the server makes, as uint8 pixels."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    extra = {"vae": AutoencoderKL.from_pretrained(vae, dtype=dtype)} if vae else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(
        folder, dtype=dtype, variant=variant, add_watermarker=False, **extra
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "a fox",
        num_inference_steps=2,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=[torch.Generator("cpu").manual_seed(SEED)],
        output_type="np",
    ).images
    return np.asarray(images[0] * 255).round().astype(np.int16)


def served(pipe: Any) -> np.ndarray:
    """The image the server's app answers with for REQUEST, as uint8 pixels."""
    with serve_app(create_app(Settings(warmup=((64, 64),)), load=lambda _: Generator(pipe))) as server:
        server.wait_until("ready")
        response = server.predict(REQUEST)
    assert response.status_code == 200, response.text
    png = base64.b64decode(response.json()["predictions"][0]["images"][0])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 2, f"max difference {np.abs(got - want).max()}/255"


# The choice, from the published listing alone


def test_an_fp16_run_chooses_the_fp16_variant_and_nothing_else() -> None:
    chosen = select_pipeline(published.SDXL_BASE_LISTING, SDXL_INDEX, "fp16")
    assert chosen.variant == "fp16" and chosen.note == ""
    assert set(chosen.files) == set(published.SDXL_BASE_CONFIGS + published.SDXL_BASE_FP16)


def test_an_fp32_run_chooses_the_plain_files() -> None:
    chosen = select_pipeline(published.SDXL_BASE_LISTING, SDXL_INDEX, "fp32")
    assert chosen.variant is None and chosen.label == "plain"
    assert set(chosen.files) == set(published.SDXL_BASE_CONFIGS + published.SDXL_BASE_FP32)


def test_a_replaced_vae_is_not_fetched() -> None:
    chosen = select_pipeline(published.SDXL_BASE_LISTING, SDXL_INDEX, "fp16", without=["vae"])
    assert not [name for name in chosen.files if name.startswith("vae")]
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in chosen.files


@pytest.mark.parametrize(
    ("present", "precision", "variant", "note"),
    [
        (published.SDXL_BASE_FP16, "fp32", "fp16", "fp16 weights cast to fp32"),
        (published.SDXL_BASE_FP32, "fp16", None, "plain weights cast to fp16"),
        (published.SDXL_BASE_FP32, "bf16", None, "plain weights cast to bf16"),
    ],
)
def test_without_the_preferred_files_the_other_variant_is_cast(
    present: tuple[str, ...], precision: str, variant: str | None, note: str
) -> None:
    chosen = select_pipeline(published.SDXL_BASE_CONFIGS + present, SDXL_INDEX, precision)
    assert chosen.variant == variant and note in chosen.note
    assert set(chosen.files) == set(published.SDXL_BASE_CONFIGS + present)


def test_an_fp16_pipeline_with_a_plain_vae_loads_each_as_it_is() -> None:
    names = [n for n in published.SDXL_BASE_CONFIGS + published.SDXL_BASE_FP16 if not n.startswith("vae/")]
    names += ["vae/config.json", "vae/diffusion_pytorch_model.safetensors"]  # what fetch puts there
    for precision in ("fp16", "fp32"):
        chosen = select_pipeline(names, SDXL_INDEX, precision)
        assert chosen.variant == "fp16" and chosen.weights["vae"] is None and chosen.weights["unet"] == "fp16"
        assert set(chosen.files) == set(names)


def test_the_fp16_fix_repo_loads_its_diffusers_files_only() -> None:
    chosen = select_model(published.FP16_FIX_FILES + published.FP16_FIX_UNUSED, "fp16")
    assert chosen.files == ("config.json", "diffusion_pytorch_model.safetensors") and chosen.variant is None


def test_sharded_weights_come_with_their_index() -> None:
    names = [n for n in published.SDXL_BASE_CONFIGS + published.SDXL_BASE_FP16 if not n.startswith("unet/diff")]
    shards = [f"unet/diffusion_pytorch_model.fp16-0000{i}-of-00002.safetensors" for i in (1, 2)]
    index = "unet/diffusion_pytorch_model.safetensors.index.fp16.json"
    chosen = select_pipeline([*names, *shards, index, "unet/diffusion_pytorch_model.bin"], SDXL_INDEX, "fp16")
    assert {*shards, index} <= set(chosen.files) and "unet/diffusion_pytorch_model.bin" not in chosen.files


@pytest.mark.parametrize(
    ("drop", "message"),
    [
        ("unet/", r"unet: no folder unet/ \(UNet2DConditionModel"),
        ("unet/config.json", "unet: no config.json"),
        ("text_encoder_2/model", r"text_encoder_2: no weights \(model.safetensors or model.fp16.safetensors\)"),
        ("scheduler/", "scheduler: no folder scheduler/"),
    ],
)
def test_a_missing_component_is_named(drop: str, message: str) -> None:
    names = [n for n in published.SDXL_BASE_LISTING if not n.startswith(drop)]
    with pytest.raises(ModelLoadError, match=message):
        select_pipeline(names, SDXL_INDEX, "fp16")


# Loading from a Hugging Face cache, offline


@pytest.mark.parametrize(
    ("layout", "placement", "variant"),
    [
        # fp16+fp32 in fp16: test_a_server_process_loads_the_hub_cache_and_logs_each_phase
        ("fp16+fp32", FP32, None),
        ("fp16", FP32, "fp16"),  # upcast
        ("fp32", FP16, None),  # downcast
    ],
)
def test_a_hub_cache_loads_serves_and_matches_diffusers(
    hubs: dict[str, Path], log_lines: Lines, tmp_path: Path, layout: str, placement: Placement, variant: str | None
) -> None:
    pipe = load_pipeline(SDXL_BASE, placement, cache_dir=tmp_path, hub_cache=hubs[layout])
    chosen = log_lines.one("weights chosen")
    assert chosen["variant"] == (variant or "plain") and chosen["revision"] == COMMIT
    assert chosen["vae"] == f"{FP16_FIX} (plain)"
    assert pipe.unet.dtype == placement.dtype and pipe.vae.dtype == placement.dtype
    cache = hubs[layout]
    want = reference(snapshot(cache, SDXL_BASE), variant, placement.dtype, vae=snapshot(cache, FP16_FIX))
    assert_close(served(pipe), want)


def test_the_model_vae_is_kept_when_asked(hubs: dict[str, Path], log_lines: Lines, tmp_path: Path) -> None:
    pipe = load_pipeline(SDXL_BASE, FP32, vae="model", cache_dir=tmp_path, hub_cache=hubs["fp16+fp32"])
    assert log_lines.one("weights chosen")["vae"] == "the model's own"
    assert_close(served(pipe), reference(snapshot(hubs["fp16+fp32"], SDXL_BASE), None, torch.float32, vae=None))


def test_a_server_process_loads_the_hub_cache_and_logs_each_phase(
    work: Path, hubs: dict[str, Path], tmp_path: Path
) -> None:
    """The published repo in fp16, as a GPU server runs it (here on the CPU): the fp16 variant, fp16-fix VAE."""
    hf_home = hubs["fp16+fp32"].parent
    env = {
        "SDXL_MODEL": SDXL_BASE,
        "HF_HOME": str(hf_home),
        "SDXL_DEVICE": "cpu",
        "SDXL_DTYPE": "fp16",
        "SDXL_WARMUP": "64x64",
    }
    with server_process(env, tmp_path) as server:
        server.wait_until("ready")
        response = server.predict(REQUEST)
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert response.status_code == 200, response.text
    by_message = {line["message"]: line for line in lines}
    chosen, loaded, ready = by_message["weights chosen"], by_message["model loaded"], by_message["model ready"]
    assert (chosen["variant"], chosen["vae"], chosen["revision"]) == ("fp16", f"{FP16_FIX} (plain)", COMMIT)
    assert all(loaded[phase] >= 0 for phase in ("import_s", "load_s", "move_s")) and loaded["dtype"] == "float16"
    assert ready["warmup_s"] >= 0 and ready["total_s"] >= loaded["load_s"]
    png = base64.b64decode(response.json()["predictions"][0]["images"][0])
    got = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)
    cache = hubs["fp16+fp32"]
    want = reference(snapshot(cache, SDXL_BASE), "fp16", torch.float16, vae=snapshot(cache, FP16_FIX))
    assert_close(got, want)


# Loading from gs:// (the GCS emulator, through the real client)


@pytest.fixture(scope="module")
def bucket(work: Path) -> Iterator[str]:
    """gs://weights/<layout> for each layout, and gs://weights/fp16-fix; STORAGE_EMULATOR_HOST set."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with gcs_emulator() as url, pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", url)
        client = storage.Client(project="test", credentials=AnonymousCredentials())
        weights = client.create_bucket("weights")
        for layout in published.LAYOUTS:
            published.upload(weights, layout, published.sdxl_base(work, layout))
        published.upload(weights, "fp16-fix", published.fp16_fix(work))
        yield "gs://weights"


def downloaded(cache: Path) -> set[str]:
    folders = [p for p in (cache / "gcs").iterdir() if p.is_dir()]
    return {p.relative_to(folder).as_posix() for folder in folders for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("layout", "placement", "variant"),
    [("fp16+fp32", FP16, "fp16"), ("fp16", FP32, "fp16"), ("fp32", FP16, None)],
)
def test_a_gs_folder_downloads_only_the_chosen_files_and_matches_diffusers(
    bucket: str, work: Path, log_lines: Lines, tmp_path: Path, layout: str, placement: Placement, variant: str | None
) -> None:
    pipe = load_pipeline(f"{bucket}/{layout}", placement, cache_dir=tmp_path)
    chosen = log_lines.one("weights chosen")
    assert (chosen["variant"], chosen["vae"]) == (variant or "plain", "the model's own")
    weights = published.SDXL_BASE_FP16 if variant else published.SDXL_BASE_FP32
    configs = {n for n in published.tree(work / "plain") if not n.endswith(".safetensors")}
    assert downloaded(tmp_path) == configs | set(weights)  # no duplicates, no other variant
    folder = published.write(tmp_path / "plain-copy", published.sdxl_base(work, layout))
    assert_close(served(pipe), reference(folder, variant, placement.dtype, vae=None))


def test_a_gs_folder_with_the_fp16_fix_vae_from_gs(bucket: str, work: Path, log_lines: Lines, tmp_path: Path) -> None:
    pipe = load_pipeline(f"{bucket}/fp16+fp32", FP16, vae=f"{bucket}/fp16-fix", cache_dir=tmp_path)
    assert log_lines.one("weights chosen")["vae"] == f"{bucket}/fp16-fix (plain)"
    assert not {n for n in downloaded(tmp_path) if n.startswith("vae/")}  # replaced: never fetched
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= downloaded(tmp_path)
    assert "sdxl_vae.safetensors" not in downloaded(tmp_path)
    folder = published.write(tmp_path / "plain-copy", published.sdxl_base(work))
    vae = published.write(tmp_path / "vae-copy", published.fp16_fix(work))
    assert_close(served(pipe), reference(folder, "fp16", torch.float16, vae=vae))


def test_a_gs_folder_missing_a_component_names_it_before_fetching_weights(
    bucket: str, work: Path, tmp_path: Path
) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    client = storage.Client(project="test", credentials=AnonymousCredentials())
    files = {n: d for n, d in published.sdxl_base(work).items() if not n.startswith("text_encoder_2/model")}
    published.upload(client.bucket("weights"), "broken", files)
    with pytest.raises(ModelLoadError, match=r"text_encoder_2: no weights \(model\.safetensors or model\.fp16"):
        load_pipeline(f"{bucket}/broken", FP16, cache_dir=tmp_path)
    assert downloaded(tmp_path) == {"model_index.json"}


# Folders


def test_a_folder_missing_a_component_names_it(work: Path, tmp_path: Path) -> None:
    folder = published.write(tmp_path / "sdxl", published.sdxl_base(work))
    shutil.rmtree(folder / "unet")
    with pytest.raises(ModelLoadError, match=r"unet: no folder unet/"):
        load_pipeline(str(folder), FP32, cache_dir=tmp_path)
    (folder / "unet").mkdir()
    (folder / "unet" / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match=r"unet: no config\.json"):
        load_pipeline(str(folder), FP32, cache_dir=tmp_path)


# python -m sdxl_server.fetch: what a baked image holds


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
