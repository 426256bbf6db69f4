"""The LoRA slot against plain diffusers: a request's adapters, combined into the one slot and swapped in place,
make the images `load_lora_weights` + `set_adapters` make with the same scales (within 2/255), and leave
nothing behind when the next request asks for others, or none."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdxl_server.generator import Generator
from sdxl_server.lora.adapters import Adapter, read_adapter
from sdxl_server.lora.slots import NAME, Slots, find_targets
from sdxl_server.refiner import build_tiny_refiner
from sdxl_server.schema import Job, Request
from sdxl_server.sources import build_tiny_pipeline
from tests.model_server import loras

TOLERANCE = 2  # of 255
PROMPT, SEED, STEPS, SIDE, GUIDANCE = "a lighthouse at dusk", 7, 2, 64, 5.0
CALL = {"prompt": PROMPT, "num_inference_steps": STEPS, "guidance_scale": GUIDANCE, "width": SIDE, "height": SIDE}


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny LoRAs as trainers publish them: alpha != rank, two ranks, UNet only, text encoders only."""
    folder = tmp_path_factory.mktemp("loras")
    return {
        "a": loras.tiny_lora(folder / "a", seed=1, rank=4, alpha=8),
        "b": loras.tiny_lora(folder / "b", seed=2, rank=8),
        "unet": loras.tiny_lora(folder / "unet", seed=3, rank=4, text_encoders=False),
        "text": loras.tiny_lora(folder / "text", seed=4, rank=4, unet=False),
    }


@pytest.fixture(scope="module")
def server() -> Generator:
    """One generator with the slot, as the server keeps it across requests (rank 16: room for a + b)."""
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return Generator(pipe, slots=Slots.prepare(pipe, rank=16, memory=2))


@pytest.fixture(scope="module")
def adapters(files: dict[str, Path], server: Generator) -> dict[str, Adapter]:
    assert server.slots is not None
    targets = server.slots.targets
    return {name: read_adapter(path, key=name, label=name, targets=targets, field="x") for name, path in files.items()}


@pytest.fixture(scope="module")
def base() -> np.ndarray:
    """The tiny base's image without any LoRA."""
    return served(Generator(build_tiny_pipeline()))


def request() -> Request:
    job = Job(PROMPT, None, None, None, (SEED,), model_garden=False)
    return Request(
        (job,), steps=STEPS, guidance_scale=GUIDANCE, width=SIDE, height=SIDE, output_format="png", quality=90
    )


def served(generator: Generator, adapters: tuple[tuple[Adapter, float], ...] = (), **fields: Any) -> np.ndarray:
    ((image,),) = generator.generate(replace(request(), **fields), adapters=adapters)
    return np.asarray(image).astype(int)


def theirs(files: dict[str, Path], *names_scales: tuple[str, float]) -> np.ndarray:
    images = loras.diffusers_images(
        [(files[name], scale) for name, scale in names_scales], **CALL, generator=torch.Generator().manual_seed(SEED)
    )
    return (images[0] * 255).round().astype(int)


def assert_close(ours: np.ndarray, reference: np.ndarray, base: np.ndarray) -> None:
    assert np.abs(ours - reference).max() <= TOLERANCE
    assert np.abs(ours - base).max() > 10  # the adapter changed the image plainly: the comparison means something


def test_the_slot_covers_the_contracts_targets_and_alone_changes_nothing(base: np.ndarray) -> None:
    pipe = build_tiny_pipeline()
    slots = Slots.prepare(pipe, rank=8, memory=1)
    assert slots.targets == find_targets(build_tiny_pipeline())  # computed on the base modules, not the wrappers
    unet = slots.targets["unet"]
    assert len(unet) == 88  # 11 Linear per transformer block x 2 blocks + proj_in/out, in 4 Transformer2DModels
    kinds = ("attn1.to_q", "attn2.to_k", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
    assert all(any(path.endswith(kind) for path in unet) for kind in kinds)
    assert all(".attentions." in path for path in unet)
    for encoder in ("text_encoder", "text_encoder_2"):
        assert {path.rsplit(".", 1)[-1] for path in slots.targets[encoder]} == {
            "q_proj",
            "k_proj",
            "v_proj",
            "out_proj",
            "fc1",
            "fc2",
        }
        assert len(slots.targets[encoder]) == 2 * 6  # two layers
    layer = pipe.unet.get_submodule(next(iter(unet)))
    assert layer.lora_A[NAME].weight.shape[0] == 8 and layer.scaling[NAME] == 1.0
    assert layer.lora_A[NAME].weight.dtype == layer.base_layer.weight.dtype
    assert np.array_equal(served(Generator(pipe, slots=slots)), base)  # bit for bit


def test_one_adapter_matches_diffusers(server: Generator, adapters: dict[str, Adapter], files: Any, base: Any) -> None:
    assert_close(served(server, ((adapters["a"], 0.8),)), theirs(files, ("a", 0.8)), base)


def test_two_adapters_of_different_ranks_combine_as_set_adapters(
    server: Generator, adapters: dict[str, Adapter], files: Any, base: Any
) -> None:
    ours = served(server, ((adapters["a"], 0.8), (adapters["b"], 0.5)))
    assert_close(ours, theirs(files, ("a", 0.8), ("b", 0.5)), base)


def test_scale_zero_is_no_adapter_exactly(server: Generator, adapters: dict[str, Adapter], base: Any) -> None:
    assert np.array_equal(served(server, ((adapters["b"], 0.0),)), base)


def test_a_negative_scale_matches_diffusers(
    server: Generator, adapters: dict[str, Adapter], files: Any, base: Any
) -> None:
    assert_close(served(server, ((adapters["a"], -0.7),)), theirs(files, ("a", -0.7)), base)


@pytest.mark.parametrize("name", ["unet", "text"])
def test_an_adapter_of_the_unet_or_the_text_encoders_alone(
    server: Generator, adapters: dict[str, Adapter], files: Any, base: Any, name: str
) -> None:
    assert_close(served(server, ((adapters[name], 1.0),)), theirs(files, (name, 1.0)), base)


def test_switching_leaves_nothing_behind(server: Generator, adapters: dict[str, Adapter], base: Any) -> None:
    """a -> b -> none -> a in one generator: each time what a generator fresh from the base makes."""

    def fresh(*chosen: tuple[Adapter, float]) -> np.ndarray:
        pipe = build_tiny_pipeline()
        pipe.set_progress_bar_config(disable=True)
        return served(Generator(pipe, slots=Slots.prepare(pipe, rank=16, memory=2)), chosen)

    a, b = ((adapters["a"], 1.0),), ((adapters["b"], 1.0),)
    first = served(server, a)
    assert np.array_equal(first, fresh(*a))
    assert np.array_equal(served(server, b), fresh(*b))  # b has the larger rank: a's rows are overwritten
    assert np.array_equal(served(server, ()), base)
    assert np.array_equal(served(server, a), first)  # b's rows past a's rank were zeroed


def test_the_device_cache_keeps_the_last_used_and_the_pinned(adapters: dict[str, Adapter]) -> None:
    slots = Slots.prepare(build_tiny_pipeline(), rank=12, memory=1)
    slots.pin(adapters["text"])
    slots.use(((adapters["a"], 1.0),))
    slots.use(((adapters["b"], 1.0),))
    assert slots.resident() == {"text", "b"}  # a evicted (memory 1); the pinned one not counted
    slots.use(((adapters["a"], 1.0), (adapters["unet"], 1.0)))
    assert slots.resident() == {"text", "a", "unet"}  # both in use: neither evicted while in the slot
    slots.use(((adapters["a"], 1.0), (adapters["b"], 1.0)))  # 4 + 8 = 12: fits
    with pytest.raises(ValueError, match="4 \\+ 8 \\+ 4 = 16 exceed the slot's rank 12"):
        slots.use(((adapters["a"], 1.0), (adapters["b"], 1.0), (adapters["unet"], 1.0)))


def test_the_refiners_shared_text_encoder_2_carries_the_slot_as_in_diffusers(files: Any) -> None:
    """The refiner shares the base's text_encoder_2 (and VAE), so it reads the slot there, as a refiner built
    around a diffusers base with `load_lora_weights` reads the LoRA loaded into that shared module. The
    refiner's own UNet has no slot: a LoRA is made for the base's UNet."""
    plain = build_tiny_pipeline()
    plain.load_lora_weights(str(files["text"].parent), weight_name=files["text"].name, adapter_name="text")
    plain.set_adapters(["text"], adapter_weights=[0.9])
    refiner = build_tiny_refiner(plain)
    generator = torch.Generator().manual_seed(SEED)
    latents = plain(**CALL, denoising_end=0.5, output_type="latent", generator=generator).images
    call = {key: value for key, value in CALL.items() if key not in ("width", "height")}
    reference = refiner(**call, denoising_start=0.5, image=latents, generator=generator, output_type="np").images
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    slots = Slots.prepare(pipe, rank=8, memory=1)
    ours = Generator(pipe, refiner=build_tiny_refiner(pipe), refiner_source="tiny", slots=slots)
    text = read_adapter(files["text"], key="text", label="text", targets=slots.targets, field="x")
    refined = served(ours, ((text, 0.9),), refine="expert_ensemble", high_noise_frac=0.5)
    unrefined = served(ours, (), refine="expert_ensemble", high_noise_frac=0.5)
    assert_close(refined, (reference[0] * 255).round().astype(int), unrefined)
