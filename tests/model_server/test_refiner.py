"""SDXL_REFINER: the tiny refiner runs with the tiny base; the refiner shares the base's VAE and text encoder."""

from __future__ import annotations

from typing import Any

import pytest

from sdxl_server.refiner import build_tiny_refiner
from sdxl_server.sources import build_tiny_pipeline


@pytest.fixture(scope="module")
def pair() -> tuple[Any, Any]:
    base = build_tiny_pipeline()
    return base, build_tiny_refiner(base)


def _generator(seed: int) -> Any:
    import torch

    return torch.Generator("cpu").manual_seed(seed)


def test_tiny_refiner_finishes_the_base_latents_in_an_expert_ensemble(pair: tuple[Any, Any]) -> None:
    base, refiner = pair
    latents = base(
        "a lighthouse", num_inference_steps=5, denoising_end=0.8, output_type="latent", generator=_generator(1)
    ).images
    image = refiner(
        "a lighthouse", image=latents, num_inference_steps=5, denoising_start=0.8, generator=_generator(1)
    ).images[0]
    assert image.size == (256, 256)
    assert len(set(image.getdata())) > 1  # a picture, not a flat fill


def test_tiny_refiner_reworks_a_finished_base_image(pair: tuple[Any, Any]) -> None:
    base, refiner = pair
    finished = base("a lighthouse", num_inference_steps=3, width=128, height=192, generator=_generator(2)).images[0]
    image = refiner("a lighthouse", image=finished, strength=0.3, num_inference_steps=4, generator=_generator(2))
    assert image.images[0].size == (128, 192)


def test_tiny_refiner_is_deterministic(pair: tuple[Any, Any]) -> None:
    import torch

    base, refiner = pair
    again = build_tiny_refiner(base)
    for mine, theirs in zip(refiner.unet.parameters(), again.unet.parameters(), strict=True):
        assert torch.equal(mine, theirs)


def test_refiner_holds_the_base_vae_and_second_text_encoder_once(pair: tuple[Any, Any]) -> None:
    base, refiner = pair
    assert refiner.vae is base.vae
    assert refiner.text_encoder_2 is base.text_encoder_2
    assert refiner.tokenizer_2 is base.tokenizer_2
    assert refiner.text_encoder is None and refiner.tokenizer is None
