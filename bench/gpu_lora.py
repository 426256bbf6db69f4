"""The LoRA slot's cost, bench/gpu.py's `lora` phase (issue 16):

    python bench/gpu.py --run none,compile,lora --budget 540    # the slot at the level measured last

On a fresh pipeline with the slot prepared at rank 64 (SDXL_LORA_MAX_RANK's default) before the level is
applied, as the server's loader does it (QKV projections then stay unfused), and warmed up as the server
warms up (with the slot in place, zero):
  - seconds per image with the slot zero (a request without adapters) and holding a rank-64 adapter,
    against the variant measured just before (no slot, QKV fused): what LoRA costs every request
  - the swap: an adapter's first use (moved to the device, then combined into the slot) and a switch
    between two adapters already on the device, and clearing the slot (a request without adapters)
  - graphs compiled after warm-up across the swaps (0 expected), CUDA graphs captured, and whether the
    images after swaps are the ones a fresh swap gives (CUDA graph replays read the swapped weights)
Adapters are random (rank 64 on every module the slot covers): the arithmetic of a real one. Run it last:
it resets dynamo, so a phase after it would compile the variant's pipeline again.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

RANK = 64
ESTIMATE_S = 200  # on an H200 at 1024x1024, `compile`: build, compile with the slot, warm-up, ~10 images


def random_adapter(targets: dict[str, dict[str, tuple[int, int]]], key: str, seed: int) -> Any:
    """A rank-RANK adapter on every module of `targets`, small random weights (float32 on the CPU)."""
    import torch

    from sdxl_server.lora.adapters import Adapter

    generator = torch.Generator().manual_seed(seed)
    layers: dict[str, dict[str, tuple[Any, Any, float]]] = {}
    size = 0
    for component, modules in targets.items():
        layers[component] = {}
        for path, (inputs, outputs) in modules.items():
            down = torch.randn(RANK, inputs, generator=generator) / inputs**0.5
            up = torch.randn(outputs, RANK, generator=generator) * 0.01
            layers[component][path] = (down, up, 1.0)
            size += 2 * (down.numel() + up.numel())  # as an fp16 file
    return Adapter(key=key, label=key, rank=RANK, size=size, layers=layers)


def measure(run: Any, args: Any, bench: Any, build: Callable[[Any], Any], difference: Callable[..., Any]) -> None:
    """The `lora` phase: see the module's doc. Recorded as "lora"."""
    import numpy as np
    import torch
    from torch._dynamo.utils import counters

    from sdxl_server import optimize
    from sdxl_server.generator import Generator
    from sdxl_server.lora.slots import Slots
    from sdxl_server.schema import Job, Request

    if not run.phase("lora", ESTIMATE_S * args.scale):
        return
    plan = bench.plan or optimize.plan_for("none")

    def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
        sync(args.device)
        started = time.perf_counter()
        result = fn()
        sync(args.device)
        return time.perf_counter() - started, result

    bench.pipe = bench.refiner = bench.generator = None  # the variant's pipeline: memory for this one
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    torch._dynamo.reset()  # a fresh pipeline must not run the variant's compiled code (see measure_variant)
    build_s, pipe = timed(lambda: build(args))
    slots = Slots.prepare(pipe, rank=RANK, memory=4)
    optimize.apply(pipe, plan, fuse_qkv=False)
    generator = Generator(pipe, optimize_level=bench.level, slots=slots)
    warm_s, _ = timed(lambda: generator.warm_up(((args.size, args.size),)))
    counters.clear()
    job = Job("a red fox in the snow, golden hour", None, None, None, (1,), model_garden=False)
    request = Request(
        (job,),
        steps=args.steps,
        guidance_scale=5.0,
        width=args.size,
        height=args.size,
        output_format="jpeg",
        quality=90,
    )

    def images(adapters: tuple[tuple[Any, float], ...]) -> tuple[list[float], Any]:
        samples, image = [], None
        for _ in range(args.repeats):
            seconds, ((image,),) = timed(lambda: generator.generate(request, adapters=adapters))
            samples.append(seconds)
        return samples, image

    a, b = random_adapter(slots.targets, "a", 1), random_adapter(slots.targets, "b", 2)
    zero_samples, zero_image = images(())
    first_use_s, _ = timed(lambda: slots.use(((a, 1.0),)))
    a_samples, a_image = images(((a, 1.0),))
    slots.use(((b, 1.0),))  # b on the device too
    switches = []
    for chosen in (a, b) * 3:
        switches.append(timed(lambda: slots.use(((chosen, 1.0),)))[0])  # noqa: B023 (called at once)
    clear_s, _ = timed(lambda: slots.use(()))
    _, zero_again = images(())
    _, a_again = images(((a, 1.0),))
    zero_median = statistics.median(zero_samples)
    entry: dict[str, Any] = {
        "level": bench.level,
        "rank": RANK,
        "adapter_mib_fp16": round(a.size / 2**20),
        "build_s": round(build_s, 1),
        "warm_up_s": round(warm_s, 1),
        "zero_slot_median_s": round(zero_median, 3),
        "adapter_median_s": round(statistics.median(a_samples), 3),
        "no_slot_median_s": bench.pipeline_s,  # the variant before: no slot, QKV fused
        "slot_cost_ratio": round(zero_median / bench.pipeline_s, 3) if bench.pipeline_s else None,
        "first_use_s": round(first_use_s, 3),
        "switch_s": round(statistics.median(switches), 4),
        "clear_s": round(clear_s, 4),
        "graphs_compiled_after_warm_up": counters["stats"]["unique_graphs"],
        # After swaps the same request gives the same image: replays read the weights swapped in.
        "same_after_swaps": bool(
            np.array_equal(np.asarray(zero_image), np.asarray(zero_again))
            and np.array_equal(np.asarray(a_image), np.asarray(a_again))
        ),
        "adapter_changes_image": difference(zero_image, a_image),
    }
    graphs = pipe.unet.forward
    if isinstance(graphs, optimize.GraphedForward):
        entry["cuda_graphs"] = {"captured": len(graphs.graphs), "off_because": graphs.broken}
    if bench.baseline_image is not None:
        entry["zero_slot_vs_baseline"] = difference(bench.baseline_image, zero_image)
    run.record("lora", entry)


def sync(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
