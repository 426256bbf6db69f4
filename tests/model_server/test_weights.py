"""SDXL as published: the variant from the files present, only those files, every component named.

Fake Hub caches and gs:// folders hold the published file names (tests/model_server/published.py) with the
tiny pipeline's weights; each load is compared with plain diffusers `from_pretrained` of the same files.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from sdxl_server.errors import ModelLoadError
from sdxl_server.sources import Placement, load_pipeline
from sdxl_server.weights import select_model, select_pipeline
from tests.model_server import published
from tests.model_server.conftest import Lines
from tests.model_server.published import (
    COMMIT,
    FP16_FIX,
    REQUEST,
    SDXL_BASE,
    assert_close,
    pixels,
    reference,
    served,
    snapshot,
)
from tests.servers import server_process

pytestmark = pytest.mark.usefixtures("loopback_only")
FP32, FP16 = Placement("cpu", torch.float32), Placement("cpu", torch.float16)
SDXL_INDEX = json.loads(
    (Path(__file__).parents[2] / "containers/model/sdxl_server/configs/sdxl-base-1.0/model_index.json").read_text()
)


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
    got = pixels(response.json())
    cache = hubs["fp16+fp32"]
    want = reference(snapshot(cache, SDXL_BASE), "fp16", torch.float16, vae=snapshot(cache, FP16_FIX))
    assert_close(got, want)


# Loading from gs:// (the GCS emulator, through the real client)


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


def test_a_folder_of_pickled_weights_loads_and_matches_diffusers(tmp_path: Path) -> None:
    # As older fine-tunes are published: transformers names its pickles pytorch_model.bin (not model.bin),
    # diffusers diffusion_pytorch_model.bin. Transformers 5 only saves safetensors, so they are written here.
    from safetensors.torch import load_file

    from sdxl_server.sources import build_tiny_pipeline

    folder = tmp_path / "pickles"
    build_tiny_pipeline().save_pretrained(folder)
    for weights in [*folder.glob("*/model.safetensors"), *folder.glob("*/diffusion_pytorch_model.safetensors")]:
        name = "pytorch_model.bin" if weights.name == "model.safetensors" else "diffusion_pytorch_model.bin"
        torch.save(load_file(weights), weights.with_name(name))
        weights.unlink()
    assert (folder / "text_encoder_2" / "pytorch_model.bin").is_file()
    pipe = load_pipeline(str(folder), FP32, cache_dir=tmp_path / "cache")
    assert_close(served(pipe), reference(folder, None, torch.float32, None))


@pytest.mark.parametrize(
    "index",
    [{}, {"unet": "UNet2DConditionModel"}, {k: v for k, v in SDXL_INDEX.items() if k != "_class_name"}],
    ids=["empty", "no-pairs", "no-class-name"],
)
def test_a_model_index_that_names_no_pipeline_is_named(index: dict[str, object], work: Path, tmp_path: Path) -> None:
    folder = published.write(tmp_path / "sdxl", published.sdxl_base(work))
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelLoadError, match=r"model_index\.json .*_class_name"):
        load_pipeline(str(folder), FP32, cache_dir=tmp_path)


@pytest.mark.parametrize("damaged", ["text_encoder_2/model.safetensors", "unet/diffusion_pytorch_model.safetensors"])
def test_a_truncated_weights_file_is_named(damaged: str, work: Path, tmp_path: Path) -> None:
    # an interrupted copy of a folder (gs:// downloads are checked by crc32c; this is a folder or a bake's copy)
    folder = published.write(tmp_path / "sdxl", published.sdxl_base(work))
    path = folder / damaged
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match=rf"{damaged}: .*truncated"):
        load_pipeline(str(folder), FP32, cache_dir=tmp_path)
