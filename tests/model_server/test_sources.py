"""Model sources: tiny, random-sdxl, a folder, gs:// (through a real GCS emulator), and the Hub offline."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from sdxl_server.errors import ModelLoadError
from sdxl_server.sources import Placement, build_random_sdxl, byte_level_clip_tokenizer, load_pipeline
from tests.servers import gcs_emulator

CPU = Placement("cpu", torch.float32)


def image(pipe, seed: int = 3):
    return np.asarray(
        pipe(
            "a fox", num_inference_steps=2, width=64, height=64, generator=torch.Generator("cpu").manual_seed(seed)
        ).images[0]
    )


def test_the_byte_level_tokenizer_needs_no_files_and_covers_every_byte() -> None:
    tokenizer = byte_level_clip_tokenizer()
    assert len(tokenizer) == 514
    ids = tokenizer("héllo 🦊", padding="max_length", max_length=77, truncation=True).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
    assert tokenizer.unk_token_id not in ids[1 : ids.index(tokenizer.eos_token_id)]
    assert tokenizer.eos_token_id == 513


def test_tiny_is_deterministic_across_builds(tiny_pipeline) -> None:
    again = load_pipeline("tiny", CPU, cache_dir=Path("/nonexistent"))
    assert np.array_equal(image(tiny_pipeline), image(again))


def test_the_native_size_of_tiny_is_256_and_of_sdxl_1024(tiny_pipeline) -> None:
    from sdxl_server.generator import Generator

    assert Generator(tiny_pipeline).native_size == (256, 256)
    meta = build_random_sdxl(Placement("meta", torch.float16))
    assert Generator(meta).native_size == (1024, 1024)


def test_random_sdxl_is_the_full_architecture() -> None:
    pipe = build_random_sdxl(Placement("meta", torch.float16))  # shapes only: no memory, no time
    assert sum(p.numel() for p in pipe.unet.parameters()) == 2_567_463_684
    assert sum(p.numel() for p in pipe.vae.parameters()) == 83_653_863
    assert pipe.unet.dtype == torch.float16
    assert pipe.vae.config.force_upcast is False  # the fp16-fix VAE's config
    assert pipe.text_encoder_2.config.hidden_size == 1280 and pipe.text_encoder_2.config.num_hidden_layers == 32


def test_a_saved_folder_loads_to_the_same_pipeline(tiny_pipeline, tmp_path: Path) -> None:
    tiny_pipeline.save_pretrained(tmp_path / "tiny")
    loaded = load_pipeline(str(tmp_path / "tiny"), CPU, cache_dir=tmp_path / "cache")
    assert np.array_equal(image(tiny_pipeline), image(loaded))


def test_a_folder_without_model_index_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match=r"model_index\.json"):
        load_pipeline(str(tmp_path), CPU, cache_dir=tmp_path)


def test_a_gs_folder_is_downloaded_then_loaded(
    tiny_pipeline,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    tiny_pipeline.save_pretrained(tmp_path / "tiny")
    with gcs_emulator() as url:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        client = storage.Client(project="test", credentials=AnonymousCredentials())
        bucket = client.create_bucket("weights")
        for path in (tmp_path / "tiny").rglob("*"):
            if path.is_file():
                bucket.blob(f"models/tiny/{path.relative_to(tmp_path / 'tiny')}").upload_from_filename(path)

        loaded = load_pipeline("gs://weights/models/tiny", CPU, cache_dir=tmp_path / "cache")
        assert np.array_equal(image(tiny_pipeline), image(loaded))
        downloaded = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
        assert "model_index.json" in downloaded and not any(n.endswith(".partial") for n in downloaded)

        with pytest.raises(ModelLoadError, match="empty or does not exist"):
            load_pipeline("gs://weights/models/nothing", CPU, cache_dir=tmp_path / "cache")


def test_a_hub_id_offline_fails_with_the_reason_and_the_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ModelLoadError) as raised:
        load_pipeline("stabilityai/stable-diffusion-xl-base-1.0", CPU, vae="model", cache_dir=tmp_path)
    assert "Hugging Face Hub" in str(raised.value) and "SDXL_MODEL" in str(raised.value)


@pytest.mark.parametrize("source", ["", "not a model", "./missing/dir/x/y"])
def test_an_unknown_source_says_what_is_accepted(source: str, tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="random-sdxl"):
        load_pipeline(source, CPU, cache_dir=tmp_path)


def test_sdxl_vae_replaces_the_folder_vae(tiny_pipeline, tmp_path: Path) -> None:
    tiny_pipeline.save_pretrained(tmp_path / "tiny")
    other = load_pipeline("tiny", CPU, cache_dir=tmp_path)
    torch.nn.init.constant_(other.vae.decoder.conv_out.bias, 0.5)
    other.vae.save_pretrained(tmp_path / "other-vae")
    swapped = load_pipeline(str(tmp_path / "tiny"), CPU, vae=str(tmp_path / "other-vae"), cache_dir=tmp_path)
    assert torch.equal(swapped.vae.decoder.conv_out.bias, other.vae.decoder.conv_out.bias)
    assert not np.array_equal(image(tiny_pipeline), image(swapped))
    with pytest.raises(ModelLoadError, match="SDXL_VAE=model"):
        load_pipeline(str(tmp_path / "tiny"), CPU, vae=str(tmp_path / "missing"), cache_dir=tmp_path)
