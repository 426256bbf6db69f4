"""SDXL_REFINER: the refiner's UNet and scheduler from its source, the base's VAE and text encoder shared.

The published refiner is faked as tests/model_server/published.py fakes the base (published_refiner.py);
each load is compared with plain diffusers, loading the same files the way its docs load a refiner
(`StableDiffusionXLImg2ImgPipeline.from_pretrained(..., text_encoder_2=base.text_encoder_2, vae=base.vae)`).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdxl_server.errors import ModelLoadError
from sdxl_server.loader import load_generator
from sdxl_server.refiner import REFINER_CONFIGS, SHARED, build_random_refiner, build_tiny_refiner, load_refiner
from sdxl_server.settings import Settings
from sdxl_server.sources import Placement, build_tiny_pipeline
from sdxl_server.weights import select_pipeline
from tests.model_server import published
from tests.model_server.conftest import Lines
from tests.model_server.published_refiner import (
    REFINER_COMMIT,
    REFINER_FP16,
    REFINER_FP32,
    REFINER_LISTING,
    REFINER_OWN,
    SDXL_REFINER,
    sdxl_refiner,
)
from tests.servers import gcs_emulator, serve_app, server_process

pytestmark = pytest.mark.usefixtures("loopback_only")
FP32, FP16 = Placement("cpu", torch.float32), Placement("cpu", torch.float16)
REAL_UNET_PARAMETERS = 2_259_526_660  # 4.52 GB in fp16: the published unet/diffusion_pytorch_model.fp16.safetensors


@pytest.fixture(scope="module")
def base() -> Any:
    return build_tiny_pipeline()


@pytest.fixture(scope="module")
def pair(base: Any) -> tuple[Any, Any]:
    return base, build_tiny_refiner(base)


def _generator(seed: int) -> Any:
    return torch.Generator("cpu").manual_seed(seed)


def refined(base: Any, refiner: Any, seed: int = 3) -> np.ndarray:
    """base_image refining of a 64x64 image, as uint8 pixels (int16 for differences)."""
    finished = base("a fox", num_inference_steps=2, width=64, height=64, generator=_generator(seed)).images[0]
    image = refiner("a fox", image=finished, strength=0.5, num_inference_steps=4, generator=_generator(seed)).images[0]
    return np.asarray(image).astype(np.int16)


# The tiny refiner (SDXL_REFINER=tiny), the one the generation tests use


def test_tiny_refiner_finishes_the_base_latents_in_an_expert_ensemble(pair: tuple[Any, Any]) -> None:
    base, refiner = pair
    latents = base(
        "a lighthouse",
        num_inference_steps=5,
        width=64,
        height=96,
        denoising_end=0.8,
        output_type="latent",
        generator=_generator(1),
    ).images
    image = refiner(
        "a lighthouse", image=latents, num_inference_steps=5, denoising_start=0.8, generator=_generator(1)
    ).images[0]
    assert image.size == (64, 96)
    assert len(set(image.getdata())) > 1  # a picture, not a flat fill


def test_tiny_refiner_reworks_a_finished_base_image(pair: tuple[Any, Any]) -> None:
    base, refiner = pair
    finished = base("a lighthouse", num_inference_steps=3, width=96, height=64, generator=_generator(2)).images[0]
    image = refiner("a lighthouse", image=finished, strength=0.3, num_inference_steps=4, generator=_generator(2))
    assert image.images[0].size == (96, 64)


def test_tiny_refiner_is_deterministic_and_has_the_refiners_traits(pair: tuple[Any, Any]) -> None:
    base, refiner = pair
    again = build_tiny_refiner(base)
    for mine, theirs in zip(refiner.unet.parameters(), again.unet.parameters(), strict=True):
        assert torch.equal(mine, theirs)
    assert refiner.unet.config.cross_attention_dim == base.text_encoder_2.config.hidden_size
    assert refiner.config.requires_aesthetics_score and not refiner.config.force_zeros_for_empty_prompt


def test_refiner_holds_the_base_vae_and_second_text_encoder_once(pair: tuple[Any, Any]) -> None:
    base, refiner = pair
    assert refiner.vae is base.vae
    assert refiner.text_encoder_2 is base.text_encoder_2
    assert refiner.tokenizer_2 is base.tokenizer_2
    assert refiner.text_encoder is None and refiner.tokenizer is None


# The loader: SDXL_REFINER after SDXL_MODEL, one copy of the shared modules


def unique_parameters(*pipes: Any) -> int:
    seen: dict[int, int] = {}
    for pipe in pipes:
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                seen.update({id(p): p.numel() for p in module.parameters()})
    return sum(seen.values())


def test_the_loaded_refiner_adds_its_unet_and_nothing_else(log_lines: Lines) -> None:
    generator = load_generator(Settings(model="tiny", refiner="tiny", device="cpu", optimize="none"))
    base, refiner = generator.pipeline, generator.refiner
    assert refiner is not None and generator.refiner_source == "tiny"
    assert refiner.vae is base.vae and refiner.text_encoder_2 is base.text_encoder_2
    unet = sum(p.numel() for p in refiner.unet.parameters())
    assert unique_parameters(base, refiner) == unique_parameters(base) + unet
    loaded = log_lines.one("model loaded")
    assert loaded["refiner"] == "tiny" and loaded["refiner_s"] >= 0


def test_a_server_process_with_sdxl_refiner_serves_both_refine_modes(tmp_path: Path) -> None:
    env = {"SDXL_MODEL": "tiny", "SDXL_REFINER": "tiny", "SDXL_WARMUP": "none"}
    with server_process(env, tmp_path) as server:
        health = server.wait_until("ready").json()
        request: dict[str, Any] = {
            "instances": [{"prompt": "a fox", "seed": 7}],
            "parameters": {"num_inference_steps": 4, "width": 64, "height": 64},
        }
        answers = [
            server.predict({**request, "parameters": {**request["parameters"], "refine": refine}})
            for refine in ("expert_ensemble", "base_image")
        ]
        lines = [json.loads(line) for line in server.log().splitlines() if line.startswith("{")]
    assert health["refiner"] == "tiny" and health["refine"] == ["none", "expert_ensemble", "base_image"]
    assert [answer.status_code for answer in answers] == [200, 200], [answer.text for answer in answers]
    loaded = next(line for line in lines if line["message"] == "model loaded")
    assert loaded["refiner"] == "tiny" and loaded["refiner_s"] >= 0


def test_without_a_refiner_nothing_changes(log_lines: Lines) -> None:
    generator = load_generator(Settings(model="tiny", device="cpu", optimize="none"))
    assert generator.refiner is None
    assert "refiner" not in log_lines.one("model loaded")


def test_the_refiner_gets_the_same_optimize_level(log_lines: Lines) -> None:
    generator = load_generator(Settings(model="tiny", refiner="tiny", device="cpu", optimize="eager"))
    reference = build_tiny_pipeline()
    want = refined(reference, build_tiny_refiner(reference))
    assert getattr(generator.refiner, "_sdxl_fused", False)  # fused QKV, as the base
    assert np.abs(refined(generator.pipeline, generator.refiner) - want).max() <= 2


def test_a_compiled_level_compiles_the_refiners_unet_and_the_shared_vae_once(tmp_path: Path) -> None:
    from torch._dynamo.eval_frame import OptimizedModule

    from sdxl_server import optimize

    settings = Settings(model="tiny", refiner="tiny", device="cpu", optimize="compile", cache_dir=tmp_path)
    generator = load_generator(settings)
    base, refiner = generator.pipeline, generator.refiner
    assert refiner is not None and refiner.vae is base.vae
    decoder = base.vae.decoder
    assert isinstance(decoder, OptimizedModule) and not isinstance(decoder._orig_mod, OptimizedModule)
    assert isinstance(decoder.forward, optimize.CompilerSettings)
    assert not isinstance(decoder.forward.forward, optimize.CompilerSettings)
    assert isinstance(refiner.unet.forward, optimize.CompilerSettings)  # the refiner's own UNet is compiled


# SDXL_REFINER=random: the real refiner's configs


def test_the_random_refiner_has_the_published_refiners_architecture() -> None:
    real_sized = build_tiny_pipeline()  # only text_encoder_2's widths matter to the refiner: make them SDXL's
    real_sized.text_encoder_2.config.hidden_size = real_sized.text_encoder_2.config.projection_dim = 1280
    refiner = build_random_refiner(real_sized, Placement("meta", torch.float16))
    assert sum(p.numel() for p in refiner.unet.parameters()) == REAL_UNET_PARAMETERS
    assert refiner.unet.dtype == torch.float16
    assert refiner.config.requires_aesthetics_score and not refiner.config.force_zeros_for_empty_prompt
    index = json.loads((REFINER_CONFIGS / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLImg2ImgPipeline" and index["text_encoder"] == [None, None]


def test_random_with_the_tiny_base_says_what_goes_with_what(base: Any, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"SDXL_REFINER='random'.*'random' with random-sdxl"):
        load_refiner("random", base, FP32, cache_dir=tmp_path)


# The published refiner: only its UNet and scheduler are chosen, fetched and loaded


def test_an_fp16_run_chooses_the_refiners_fp16_unet_and_scheduler_only() -> None:
    index = json.loads((REFINER_CONFIGS / "model_index.json").read_text())
    chosen = select_pipeline(REFINER_LISTING, index, "fp16", without=SHARED)
    assert set(chosen.files) == set(REFINER_OWN + REFINER_FP16) and chosen.variant == "fp16"
    chosen = select_pipeline(REFINER_LISTING, index, "fp32", without=SHARED)
    assert set(chosen.files) == set(REFINER_OWN + REFINER_FP32) and chosen.variant is None


def diffusers_refiner(folder: Path, base: Any, variant: str | None, dtype: torch.dtype) -> Any:
    """The diffusers docs' way: the refiner repo with the base's text_encoder_2 (and tokenizer) and VAE passed in."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(
        folder,
        text_encoder_2=base.text_encoder_2,
        tokenizer_2=base.tokenizer_2,
        vae=base.vae,
        variant=variant,
        dtype=dtype,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory, base: Any) -> Path:
    """A Hugging Face cache holding the published refiner (fp16 and fp32 UNet)."""
    work = tmp_path_factory.mktemp("refiner")
    cache = work / "hf" / "hub"
    published.hub_cache(cache, SDXL_REFINER, sdxl_refiner(work, base), REFINER_COMMIT)
    return cache


def snapshot(hub: Path) -> Path:
    return hub / f"models--{SDXL_REFINER.replace('/', '--')}" / "snapshots" / REFINER_COMMIT


def test_a_hub_cache_refiner_loads_its_unet_and_matches_diffusers(
    hub: Path, base: Any, log_lines: Lines, tmp_path: Path
) -> None:
    refiner = load_refiner(SDXL_REFINER, base, FP32, cache_dir=tmp_path, hub_cache=hub)
    chosen = log_lines.one("refiner weights chosen")
    assert (chosen["variant"], chosen["revision"], chosen["files"]) == ("plain", REFINER_COMMIT, 4)
    assert refiner.vae is base.vae and refiner.text_encoder_2 is base.text_encoder_2
    assert refiner.config.requires_aesthetics_score and not refiner.config.force_zeros_for_empty_prompt
    want = refined(base, diffusers_refiner(snapshot(hub), base, None, torch.float32))
    assert np.abs(refined(base, refiner) - want).max() == 0


def test_an_fp16_server_loads_the_fp16_unet(hub: Path, base: Any, log_lines: Lines, tmp_path: Path) -> None:
    refiner = load_refiner(SDXL_REFINER, base, FP16, cache_dir=tmp_path, hub_cache=hub)
    assert log_lines.one("refiner weights chosen")["variant"] == "fp16"
    assert refiner.unet.dtype == torch.float16
    want = diffusers_refiner(snapshot(hub), base, "fp16", torch.float16).unet.state_dict()
    got = refiner.unet.state_dict()
    assert all(torch.equal(got[name], want[name]) for name in want)


@pytest.fixture(scope="module")
def bucket(tmp_path_factory: pytest.TempPathFactory, base: Any) -> Iterator[str]:
    """gs://weights/refiner holding the published refiner; STORAGE_EMULATOR_HOST set."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    work = tmp_path_factory.mktemp("refiner-gcs")
    with gcs_emulator() as url, pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", url)
        client = storage.Client(project="test", credentials=AnonymousCredentials())
        published.upload(client.create_bucket("weights"), "refiner", sdxl_refiner(work, base))
        yield "gs://weights/refiner"


def test_a_gs_refiner_downloads_its_unet_and_scheduler_only(
    bucket: str, base: Any, hub: Path, log_lines: Lines, tmp_path: Path
) -> None:
    refiner = load_refiner(bucket, base, FP32, cache_dir=tmp_path)
    folders = [p for p in (tmp_path / "gcs").iterdir() if p.is_dir()]
    fetched = {p.relative_to(f).as_posix() for f in folders for p in f.rglob("*") if p.is_file()}
    assert fetched == set(REFINER_OWN + REFINER_FP32)  # never the VAE, text encoder or single-file checkpoints
    want = refined(base, diffusers_refiner(snapshot(hub), base, None, torch.float32))
    assert np.abs(refined(base, refiner) - want).max() == 0


# A bad SDXL_REFINER fails the start with the reason, as a bad SDXL_MODEL does


@pytest.mark.parametrize(
    ("source", "reason"),
    [
        ("on", "is not 'off', 'tiny', 'random', an existing folder"),
        ("./no/such/refiner", "is not 'off', 'tiny', 'random', an existing folder"),
        ("gs://weights/nothing", "empty or does not exist"),
        (SDXL_REFINER, "Hugging Face Hub"),  # offline, nothing cached
    ],
)
def test_a_bad_refiner_fails_the_start_naming_sdxl_refiner(
    source: str, reason: str, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sdxl_server.app import create_app

    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    settings = Settings(model="tiny", refiner=source, device="cpu", cache_dir=tmp_path, warmup=())
    with serve_app(create_app(settings, load=load_generator)) as server:
        health = server.wait_until("failed")
    assert health.status_code == 503
    assert health.json()["reason"].startswith(f"ModelLoadError: SDXL_REFINER={source!r}: ")
    assert reason in health.json()["reason"]
    if source == SDXL_REFINER:
        assert "set SDXL_REFINER to a local diffusers folder" in health.json()["reason"]


def test_the_base_model_as_a_refiner_is_refused_before_serving(base: Any, tmp_path: Path) -> None:
    base.save_pretrained(tmp_path / "base")
    with pytest.raises(ModelLoadError, match=r"not a refiner for this SDXL_MODEL: it takes 64-wide text states and 6"):
        load_refiner(str(tmp_path / "base"), base, FP32, cache_dir=tmp_path)


def test_a_truncated_unet_is_named(hub: Path, base: Any, tmp_path: Path) -> None:
    folder = published.write(tmp_path / "refiner", {n: p.read_bytes() for n, p in _files(snapshot(hub)).items()})
    unet = folder / REFINER_FP32[0]
    unet.write_bytes(unet.read_bytes()[:-100])
    with pytest.raises(ModelLoadError, match=r"SDXL_REFINER=.*unet/diffusion_pytorch_model.safetensors.*truncated"):
        load_refiner(str(folder), base, FP32, cache_dir=tmp_path)


def _files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(
    ("raw", "value"), [(None, "off"), ("OFF", "off"), (" Tiny ", "tiny"), ("gs://b/Refiner", "gs://b/Refiner")]
)
def test_sdxl_refiner_setting(raw: str | None, value: str) -> None:
    assert Settings.from_env({} if raw is None else {"SDXL_REFINER": raw}).refiner == value
