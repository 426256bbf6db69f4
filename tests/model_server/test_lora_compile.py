"""The LoRA slot on the fast path: fused QKV would bypass it (so LoRA skips fusion), and on a compiled level a
request with other adapters, or none, compiles nothing and makes the uncompiled images."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sdxl_server import optimize
from sdxl_server.generator import Generator
from sdxl_server.lora.adapters import Adapter, read_adapter
from sdxl_server.lora.slots import Slots
from sdxl_server.schema import Job, Request
from sdxl_server.sources import build_tiny_pipeline
from tests.model_server import loras

pytestmark = pytest.mark.usefixtures("fresh_compiler")  # each test counts what it compiles itself
TOLERANCE = 2  # of 255
PROMPT, SEED, STEPS, SIDE = "a lighthouse", 5, 2, 64


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {
        "a": loras.tiny_lora(folder / "a", seed=1, rank=4, alpha=8),
        # K and V alone: what fused projections leave out entirely (to_qkv in self-, to_kv in cross-attention)
        "kv": loras.tiny_lora(folder / "kv", seed=2, rank=8, text_encoders=False, unet_targets=("to_k", "to_v")),
    }


def slotted(rank: int = 16) -> tuple[Any, Slots]:
    pipe = build_tiny_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe, Slots.prepare(pipe, rank=rank, memory=4)


def adapter(files: dict[str, Path], name: str, slots: Slots) -> Adapter:
    return read_adapter(files[name], key=name, label=name, targets=slots.targets, field="x")


def request() -> Request:
    job = Job(PROMPT, None, None, None, (SEED,), model_garden=False)
    return Request((job,), steps=STEPS, guidance_scale=5.0, width=SIDE, height=SIDE, output_format="png", quality=90)


def served(generator: Generator, adapters: tuple[tuple[Adapter, float], ...] = ()) -> np.ndarray:
    ((image,),) = generator.generate(request(), adapters=adapters)
    return np.asarray(image).astype(int)


def test_fused_qkv_would_bypass_the_slot_so_lora_keeps_q_k_v_apart(files: dict[str, Path]) -> None:
    """diffusers' fused to_qkv (to_kv in cross-attention) reads the base weights of to_q/to_k/to_v: their LoRA is
    silently dropped. With the slot
    the eager level keeps them apart (the VAE is still fused), and refuses to fuse around it."""
    pipe, slots = slotted()
    kv = ((adapter(files, "kv", slots), 1.0),)
    generator = Generator(pipe, slots=slots)
    unfused = served(generator, kv)
    assert np.abs(unfused - served(generator)).max() > 10  # the adapter changes the image plainly
    pipe.fuse_qkv_projections()  # what `eager` did before LoRA
    assert np.array_equal(served(generator, kv), served(generator))  # the adapter is gone

    pipe, slots = slotted()
    with pytest.raises(ValueError, match="fuse_qkv=False"):
        optimize.apply(pipe, "eager")
    fused = build_tiny_pipeline()
    optimize.apply(fused, "eager")
    with pytest.raises(ValueError, match=r"before optimize\.apply"):  # the loader's order is the only one
        Slots.prepare(fused, rank=4, memory=1)
    optimize.apply(pipe, "eager", fuse_qkv=False)
    assert pipe.fusing_vae and not pipe.fusing_unet
    assert pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)  # the rest of `eager` applies
    kv = ((adapter(files, "kv", slots), 1.0),)
    assert np.abs(served(Generator(pipe, slots=slots), kv) - unfused).max() <= TOLERANCE


@contextmanager
def failing_on_recompile(pipe: Any) -> Iterator[None]:
    """After `freeze` a shape without compiled code runs eagerly (stance eager_on_recompile, set on each call):
    a guard that failed would go unseen. Unfrozen, under fail_on_recompile, any compile raises."""
    forwards = []
    for forward in (pipe.unet.forward, pipe.vae.decoder.forward):
        while isinstance(forward, optimize.CompilerSettings):
            forwards.append(forward)
            forward = forward.forward
    for forward in forwards:
        forward.frozen = False
    try:
        with torch.compiler.set_stance("fail_on_recompile"):
            yield
    finally:
        for forward in forwards:
            forward.frozen = True


def test_switching_adapters_on_a_compiled_level_compiles_nothing(files: dict[str, Path]) -> None:
    from torch._dynamo.utils import counters

    pipe, slots = slotted()
    optimize.apply(pipe, "compile", fuse_qkv=False)
    compiled = Generator(pipe, optimize_level="compile", slots=slots)
    counters.clear()
    compiled.warm_up(((SIDE, SIDE),))  # with the slot in place, zero
    assert compiled.fast_sizes == {(SIDE, SIDE)}
    assert not counters["graph_break"], dict(counters["graph_break"])  # peft's layer traced inside each block
    graphs = counters["stats"]["unique_graphs"]
    assert graphs > 0
    a, kv = adapter(files, "a", slots), adapter(files, "kv", slots)
    requests = [((a, 0.8),), (), ((kv, 1.0),), ((a, 0.8), (kv, -0.5)), ()]
    with failing_on_recompile(pipe):
        ours = [served(compiled, chosen) for chosen in requests]
        with pytest.raises(RuntimeError, match="fail_on_recompile"):  # armed: a size not warmed up would compile
            compiled.generate(replace(request(), width=2 * SIDE), adapters=((a, 1.0),))
    assert counters["stats"]["unique_graphs"] == graphs  # nothing compiled after warm-up

    plain_pipe, plain_slots = slotted()
    plain = Generator(plain_pipe, slots=plain_slots)
    same = {name: adapter(files, name, plain_slots) for name in ("a", "kv")}
    for image, chosen in zip(ours, requests, strict=True):
        theirs = served(plain, tuple((same[adapter.key], scale) for adapter, scale in chosen))
        assert np.abs(image - theirs).max() <= TOLERANCE
    assert np.abs(ours[0] - ours[1]).max() > 10 and np.abs(ours[2] - ours[3]).max() > 10  # each swap took effect
