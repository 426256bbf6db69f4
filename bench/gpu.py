"""The model server's speed on one GPU, in one unattended run with a time budget.

    python bench/gpu.py --budget 540 --out results/                  # a GPU: random-sdxl at 1024x1024
    python bench/gpu.py --model tiny --size 64 --steps 2 --out /tmp/b # a CPU: checks the harness end to end
    python bench/gpu.py --run none,compile --modes img2img,heun,ensemble  # modes at each level too

--run lists what to measure, in order. Variants: the original deployment's pipeline (`none`, the
baseline), each SDXL_OPTIMIZE level (`eager`, `compile`, `max`) and their parts alone (`transformers`:
diffusers' regional recipe; `blocks`: `compile` without CUDA graphs; `unet`: `max` without them) and
candidates for a level (`cudnn`: cuDNN attention; `autotune`: Triton templates timed; both), each
with first call, median latency, peak memory and difference from the baseline image. Phases, on the
variant measured last: `server` (the HTTP server's overhead: JSON, JPEG, queue), `throughput` (1, 2
and 4 concurrent requests), `breakdown` (prompt encoding, denoising, VAE decode, pixels to the
host), `attention` (each SDPA backend on SDXL's attention shapes), `batching` (two same-shape
prompts in one batch), `cold` (process start to health 200, with the compile cache this run filled
and/or an empty one), `lora` (bench/gpu_lora.py: the LoRA slot's cost per image and per swap; run it
last). --modes adds, on each variant's pipeline, other generation modes (bench/gpu_modes.py:
image-to-image, the Heun sampler, the refiner as an expert ensemble), each timed against the variant's
own text-to-image and the run's baseline. Each step is skipped when the budget left is below its
estimate, and written to results.json and results.md as soon as it ends. Weights are random
(no downloads): the arithmetic is SDXL 1.0's (and the refiner's).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "containers" / "model"))  # runs from a checkout, installed or not
sys.path.insert(0, str(ROOT / "bench"))  # imported by the tests as well as run

import gpu_lora  # noqa: E402
import gpu_modes  # noqa: E402

from sdxl_server import optimize  # noqa: E402  (light: no torch until a plan is applied)


class Run:
    """The budget, and the results written after every phase."""

    def __init__(self, out: Path, budget_s: float) -> None:
        self.out, self.deadline = out, time.monotonic() + budget_s
        self.results: dict[str, Any] = {"phases": {}, "skipped": []}
        out.mkdir(parents=True, exist_ok=True)

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def phase(self, name: str, estimate_s: float) -> bool:
        if self.left() < estimate_s:
            self.results["skipped"].append(f"{name} (needs ~{estimate_s:.0f} s, {self.left():.0f} s left)")
            self.write()
            print(f"-- skip {name}: {self.left():.0f} s left", flush=True)
            return False
        print(f"-- {name} ({self.left():.0f} s left)", flush=True)
        return True

    def record(self, name: str, data: Any) -> None:
        self.results["phases"][name] = data
        self.write()
        print(json.dumps({name: data}, default=str), flush=True)

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=2, default=str))
        (self.out / "results.md").write_text(markdown(self.results))


def environment(device: str) -> dict[str, Any]:
    import diffusers
    import torch
    import transformers

    info: dict[str, Any] = {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": device,
    }
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
        with contextlib.suppress(Exception):
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
    else:
        info["cpu"] = platform.processor() or platform.machine()
        info["threads"] = torch.get_num_threads()
    return info


def sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def warm_gpu(device: str, seconds: float = 5.0) -> None:
    """Clocks ramp up under load: time nothing on an idle card."""
    import torch

    if not device.startswith("cuda"):
        return
    a = torch.randn(8192, 8192, device=device, dtype=torch.float16)
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        a @ a
    sync(device)


def build(args: argparse.Namespace) -> Any:
    import torch

    from sdxl_server.sources import Placement, load_pipeline

    torch.manual_seed(0)  # the same random weights each build
    placement = Placement.resolve(args.device, args.dtype)
    return load_pipeline(args.model, placement, cache_dir=Path(tempfile.mkdtemp()))


def generate(pipe: Any, args: argparse.Namespace, seed: int = 1, prompts: int = 1) -> list[Any]:
    import torch

    generators = [torch.Generator("cpu").manual_seed(seed + i) for i in range(prompts)]
    with torch.inference_mode():
        return list(
            pipe(
                prompt=["a red fox in the snow, golden hour"] * prompts,
                num_inference_steps=args.steps,
                guidance_scale=5.0,
                width=args.size,
                height=args.size,
                generator=generators,
            ).images
        )


def timed(fn: Callable[[], Any], device: str) -> tuple[float, Any]:
    sync(device)
    started = time.perf_counter()
    result = fn()
    sync(device)
    return time.perf_counter() - started, result


def difference(a: Any, b: Any) -> dict[str, float]:
    import numpy as np

    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    mse = float(((x - y) ** 2).mean())
    return {
        "max_abs": float(np.abs(x - y).max()),
        "mean_abs": float(np.abs(x - y).mean()),
        "psnr_db": float("inf") if mse == 0 else 10 * float(np.log10(255**2 / mse)),
    }


# What each variant is: the SDXL_OPTIMIZE levels, and the parts of them measured alone.
VARIANTS: dict[str, optimize.Plan] = {
    **{level: optimize.PLANS[level] for level in ("none", "eager")},
    "transformers": optimize.Plan(fuse=True, compile=("BasicTransformerBlock",)),  # diffusers' regional recipe
    "blocks": optimize.Plan(fuse=True, compile=optimize.BLOCKS),  # `compile` without CUDA graphs
    "compile": optimize.PLANS["compile"],
    "unet": optimize.Plan(fuse=True, compile="unet"),  # `max` without CUDA graphs
    "max": optimize.PLANS["max"],
    # `compile` with cuDNN's attention preferred: 28% less attention time on an H200 alone (run 5)
    "cudnn": optimize.Plan(fuse=True, compile=optimize.BLOCKS, cuda_graphs=True, attention="cudnn"),
    # `compile` with Triton templates timed against cuBLAS and cuDNN for every matmul and convolution
    "autotune": optimize.Plan(fuse=True, compile=optimize.BLOCKS, cuda_graphs=True, autotune=True),
    "cudnn-autotune": optimize.Plan(
        fuse=True, compile=optimize.BLOCKS, cuda_graphs=True, attention="cudnn", autotune=True
    ),
}
PHASES = ("server", "throughput", "breakdown", "attention", "batching", "cold", "lora")
# Seconds each variant needs on an H200 with an empty compile cache (build, compile, four images);
# 15 when it only adds to a pipeline compiled the same way.
ESTIMATE_S = {
    "none": 35,
    "eager": 15,
    "transformers": 60,
    "blocks": 120,
    "compile": 120,
    "unet": 280,
    "max": 280,
    "cudnn": 120,
    "autotune": 420,  # a guess: not measured yet
    "cudnn-autotune": 420,
}


class Bench:
    """The pipeline under measurement, and what the steps that follow need from the ones before."""

    def __init__(self) -> None:
        self.pipe: Any = None
        self.plan: optimize.Plan | None = None  # what was applied to `pipe`
        self.level = "none"
        self.baseline_image: Any = None
        self.baseline_s = 1.0
        self.pipeline_s = 0.0
        self.refiner: Any = None  # shares `pipe`'s VAE and second text encoder: rebuilt with it
        self.generator: Any = None  # the server's, around `pipe` and `refiner`: the modes run through it
        self.mode_baselines: dict[str, tuple[Any, float]] = {}  # each mode's image and median at `none`


def reusable(last: optimize.Plan, wanted: optimize.Plan) -> bool:
    """Whether `wanted` can be had by adding to a pipeline `last` made (compiling is not undone)."""
    if last.compile and (last.compile, last.attention, last.autotune) != (
        wanted.compile,
        wanted.attention,
        wanted.autotune,
    ):
        return False
    return not ((last.fuse and not wanted.fuse) or (last.cuda_graphs and not wanted.cuda_graphs))


def measure_variant(run: Run, args: argparse.Namespace, bench: Bench, variant: str) -> None:
    """One variant: on the pipeline as it is when only CUDA graphs are added, on a fresh one otherwise."""
    import torch

    wanted, last, pipe = VARIANTS[variant], bench.plan, bench.pipe
    reuse = pipe is not None and last is not None and reusable(last, wanted)
    adds_only = reuse and last is not None and last.compile == wanted.compile
    if not run.phase(f"variant {variant}", (15 if adds_only else ESTIMATE_S[variant]) * args.scale):
        return
    if not reuse:
        bench.pipe = pipe = bench.refiner = bench.generator = None
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
        # Dynamo keeps compiled code per Python function, and its guards do not cover the compiler's
        # settings or the attention backend: without a reset a fresh pipeline's blocks would run the
        # code compiled for the variant before (a server compiles once per process: no such problem).
        torch._dynamo.reset()
        build_s, pipe = timed(lambda: build(args), args.device)
        run.record("build", {"seconds": round(build_s, 1), "model": args.model})
        warm_gpu(args.device)
        bench.pipe = pipe
    optimize.apply(pipe, wanted)
    bench.plan = wanted
    first_s, images = timed(lambda: generate(pipe, args), args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    samples = []
    # The eager baseline wanders with the host (1.565 to 2.021 s over five H200 runs, 1.874 to 2.524 s
    # within one): more samples for the figure every ratio is taken against.
    for _ in range(2 * args.repeats + 1 if variant == "none" else args.repeats):
        seconds, images = timed(lambda: generate(pipe, args), args.device)
        samples.append(seconds)
    entry: dict[str, Any] = {
        "plan": dataclasses.asdict(wanted),
        "first_call_s": round(first_s, 2),
        "median_s": round(statistics.median(samples), 3),
        "min_s": round(min(samples), 3),
        "samples_s": [round(s, 3) for s in samples],
    }
    if args.device.startswith("cuda"):
        entry["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    graphs = pipe.unet.forward if isinstance(pipe.unet.forward, optimize.GraphedForward) else None
    if graphs is not None:
        entry["cuda_graphs"] = {"captured": len(graphs.graphs), "off_because": graphs.broken}
    if variant == "none":
        bench.baseline_image, bench.baseline_s = images[0], entry["median_s"]
    if bench.baseline_image is not None:
        entry["vs_baseline"] = difference(bench.baseline_image, images[0])
        entry["ratio_to_baseline"] = round(entry["median_s"] / bench.baseline_s, 3)
    run.record(f"variant {variant}", entry)
    bench.level = variant if variant in optimize.LEVELS else "compile"
    bench.pipeline_s = entry["median_s"]
    for mode in args.modes:
        measure_mode(run, args, bench, variant, mode)


def measure_mode(run: Run, args: argparse.Namespace, bench: Bench, variant: str, mode: str) -> None:
    """One generation mode on the variant's pipeline, recorded in the variant's entry under "modes"."""
    import torch

    from sdxl_server.generator import Generator

    plan, entry = VARIANTS[variant], run.results["phases"][f"variant {variant}"]
    fresh_refiner = mode == "ensemble" and bench.refiner is None
    calls = args.repeats + 1
    estimate = gpu_modes.estimate_s(mode, bench.pipeline_s, calls, bool(plan.compile) and fresh_refiner)
    if not run.phase(f"variant {variant}, {mode}", estimate * args.scale):
        return
    modes = entry.setdefault("modes", {})
    try:
        if mode == "ensemble" and bench.refiner is None:
            build_s, bench.refiner = timed(lambda: gpu_modes.build_refiner(bench.pipe, args), args.device)
            run.record("build refiner", {"seconds": round(build_s, 1)})
            bench.generator = None
        if bench.refiner is not None:
            optimize.apply(bench.refiner, plan)  # as the server's loader does
        if bench.generator is None or bench.generator.optimize_level != bench.level:
            bench.generator = Generator(bench.pipe, optimize_level=bench.level, refiner=bench.refiner)
        generator, dtype = bench.generator, bench.pipe.unet.dtype

        def one() -> tuple[Any, int]:
            return gpu_modes.run(generator, mode, args.steps, args.size)

        first_s, (image, calls_of) = timed(one, args.device)
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        samples = []
        for _ in range(args.repeats):
            seconds, (image, calls_of) = timed(one, args.device)
            samples.append(seconds)
    except Exception as exc:  # a mode the server cannot run is a result too; the variants go on
        traceback.print_exc()
        modes[mode] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        run.record(f"variant {variant}", entry)
        return
    median = statistics.median(samples)
    result: dict[str, Any] = {
        "unet_calls": calls_of,
        "first_call_s": round(first_s, 2),
        "median_s": round(median, 3),
        "samples_s": [round(s, 3) for s in samples],
        "ratio_to_text": round(median / entry["median_s"], 3),
    }
    if bench.baseline_image is not None:
        result["ratio_to_baseline"] = round(median / bench.baseline_s, 3)
    if args.device.startswith("cuda"):
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    # A mode that needed a graph of its own (a shape text-to-image did not have) shows here.
    for name, model in (("base", bench.pipe), ("refiner", bench.refiner)):
        graphs = getattr(getattr(model, "unet", None), "forward", None)
        if isinstance(graphs, optimize.GraphedForward):
            result.setdefault("cuda_graphs", {})[name] = {"captured": len(graphs.graphs), "off_because": graphs.broken}
    if bench.pipe.unet.dtype != dtype:  # from_pipe casting the shared weights would make every later figure wrong
        result["error"] = f"the base UNet went from {dtype} to {bench.pipe.unet.dtype}"
    if variant == "none":
        bench.mode_baselines[mode] = (image, median)
    if mode in bench.mode_baselines:
        base_image, base_s = bench.mode_baselines[mode]
        result["vs_mode_baseline"] = difference(base_image, image)
        result["ratio_to_mode_baseline"] = round(median / base_s, 3)
    modes[mode] = result
    run.record(f"variant {variant}", entry)


@contextlib.contextmanager
def serve(pipe: Any, level: str, queue: int) -> Iterator[str]:
    """The real app (HTTP, JSON, encoding, queue) around this pipeline, in a uvicorn thread."""
    import uvicorn

    from sdxl_server.app import create_app
    from sdxl_server.generator import Generator
    from sdxl_server.settings import Settings

    settings = Settings(
        host="127.0.0.1",
        queue_size=queue,
        time_limit_s=600,
        warmup=(),
        max_response_bytes=50_000_000,
        max_images=8,
        compile_cache=tempfile.mkdtemp(prefix="sdxl-bench-cache-"),
    )
    app = create_app(settings, load=lambda _: Generator(pipe, optimize_level=level))
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    wait_healthy(url, 60)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(url: str, timeout_s: float, process: subprocess.Popen[bytes] | None = None) -> float:
    import httpx

    started, last = time.monotonic(), ""
    while time.monotonic() - started < timeout_s:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        with contextlib.suppress(httpx.HTTPError):
            answer = httpx.get(url + "/health", timeout=2)
            if answer.status_code == 200:
                return time.monotonic() - started
            last = answer.text
            if '"failed"' in last:
                raise RuntimeError(f"the server failed: {last}")
        time.sleep(0.1)
    raise TimeoutError(f"{url} not healthy after {timeout_s:.0f} s (last: {last})")


def body(args: argparse.Namespace, seed: int, fmt: str = "jpeg") -> dict[str, Any]:
    return {
        "instances": [{"prompt": "a red fox in the snow, golden hour", "seed": seed}],
        "parameters": {
            "num_inference_steps": args.steps,
            "guidance_scale": 5.0,
            "width": args.size,
            "height": args.size,
            "output_format": fmt,
            "quality": 90,
        },
    }


def measure_server(run: Run, args: argparse.Namespace, bench: Bench, throughput_too: bool) -> None:
    import httpx

    pipe = bench.pipe
    if not run.phase("server overhead", (25 if throughput_too else 8) * bench.pipeline_s + 20):
        return
    with serve(pipe, bench.level, queue=8) as url, httpx.Client(timeout=600) as client:
        predict = url + "/predict"
        client.post(predict, json=body(args, 0)).raise_for_status()  # warm path (and connection)
        direct, http, timings = [], [], []
        for i in range(max(args.repeats, 5)):  # interleaved: clock drift hits both alike
            direct.append(timed(lambda: generate(pipe, args), args.device)[0])
            request = body(args, i)
            seconds, response = timed(lambda: client.post(predict, json=request), args.device)  # noqa: B023
            response.raise_for_status()
            http.append(seconds)
            timings.append(server_timing(response.headers.get("server-timing", "")))
        overhead = statistics.median(http) - statistics.median(direct)
        run.record(
            "server overhead (jpeg)",
            {
                "pipeline_median_s": round(statistics.median(direct), 4),
                "http_median_s": round(statistics.median(http), 4),
                "overhead_s": round(overhead, 4),
                "overhead_pct": round(100 * overhead / statistics.median(direct), 2),
                "server_timing_median_ms": {
                    name: round(statistics.median(t.get(name, 0.0) for t in timings), 1) for name in timings[0]
                },
                "response_bytes": len(response.content),
                "samples": len(http),
            },
        )
        if not throughput_too:
            return
        throughput = {}
        for concurrency in (1, 2, 4):
            requests = concurrency * 2
            with ThreadPoolExecutor(concurrency) as pool:
                started = time.perf_counter()
                answers = list(
                    pool.map(lambda i: httpx.post(predict, json=body(args, i), timeout=600), range(requests))
                )
                elapsed = time.perf_counter() - started
            throughput[str(concurrency)] = {
                "requests": requests,
                "ok": sum(a.status_code == 200 for a in answers),
                "images_per_s": round(requests / elapsed, 3),
            }
        run.record("throughput (HTTP, concurrent requests)", throughput)


def server_timing(header: str) -> dict[str, float]:
    """`generate;dur=1012.3, encode;dur=9.1` as {"generate": 1012.3, "encode": 9.1}."""
    out = {}
    for part in header.split(","):
        name, _, duration = part.strip().partition(";dur=")
        if name and duration:
            out[name] = float(duration)
    return out


def measure_breakdown(run: Run, args: argparse.Namespace, bench: Bench) -> None:
    """Where an image's time goes: prompt encoding, the denoising loop, VAE decode, pixels to the host."""
    import torch

    from sdxl_server.generator import to_pil

    pipe = bench.pipe
    if not run.phase("breakdown", 4 * bench.pipeline_s + 10):
        return
    prompt = "a red fox in the snow, golden hour"
    parts: dict[str, list[float]] = {"encode_prompt": [], "denoise": [], "vae_decode": [], "to_pil": []}
    with torch.inference_mode():
        for _ in range(args.repeats):
            seconds, _ = timed(lambda: pipe.encode_prompt(prompt, device=pipe.device), args.device)
            parts["encode_prompt"].append(seconds)
            seconds, latents = timed(
                lambda: (
                    pipe(
                        prompt,
                        num_inference_steps=args.steps,
                        guidance_scale=5.0,
                        width=args.size,
                        height=args.size,
                        output_type="latent",
                        generator=torch.Generator("cpu").manual_seed(1),
                    ).images
                ),
                args.device,
            )
            parts["denoise"].append(seconds)  # prompt encoding included
            scaled = latents / pipe.vae.config.scaling_factor
            seconds, decoded = timed(lambda: pipe.vae.decode(scaled, return_dict=False)[0], args.device)  # noqa: B023
            parts["vae_decode"].append(seconds)
            pixels = pipe.image_processor.postprocess(decoded, output_type="pt")
            seconds, _ = timed(lambda: to_pil(pixels), args.device)  # noqa: B023
            parts["to_pil"].append(seconds)
    run.record("breakdown", {f"{name}_ms": round(1000 * statistics.median(v), 1) for name, v in parts.items()})


# SDXL 1.0's attention calls per UNet call at 1024x1024 with guidance (batch 2): (heads, query
# tokens, key tokens, layers). 64x64 latents' level: 10 layers of 10 heads; 32x32: 60 layers of 20.
SDXL_ATTENTION = ((10, 4096, 4096, 10), (10, 4096, 77, 10), (20, 1024, 1024, 60), (20, 1024, 77, 60))


def measure_attention(run: Run, args: argparse.Namespace, bench: Bench) -> None:
    """Each SDPA backend on SDXL's attention shapes alone: what one UNet call spends in attention."""
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel

    if not args.device.startswith("cuda") or not run.phase("attention backends", 20):
        return
    results: dict[str, Any] = {}
    for backend in ("FLASH_ATTENTION", "CUDNN_ATTENTION", "EFFICIENT_ATTENTION"):
        total_ms = 0.0
        try:
            for heads, queries, keys, layers in SDXL_ATTENTION:
                q = torch.randn(2, heads, queries, 64, device="cuda", dtype=torch.float16)
                k = torch.randn(2, heads, keys, 64, device="cuda", dtype=torch.float16)
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    for _ in range(3):
                        torch.nn.functional.scaled_dot_product_attention(q, k, k)
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    for _ in range(50):
                        torch.nn.functional.scaled_dot_product_attention(q, k, k)
                    end.record()
                    end.synchronize()
                total_ms += start.elapsed_time(end) / 50 * layers
            results[backend.lower()] = {"per_unet_call_ms": round(total_ms, 2)}
        except Exception as exc:  # a backend that does not take these shapes here
            results[backend.lower()] = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
    run.record("attention backends (SDXL shapes, fp16, batch 2)", results)


def measure_batching(run: Run, args: argparse.Namespace, bench: Bench) -> None:
    pipe = bench.pipe
    if not run.phase("micro-batching", 10 * bench.pipeline_s + 10):
        return
    generate(pipe, args, prompts=2)  # a batch of 2 is a new shape for compiled code
    one = statistics.median(timed(lambda: generate(pipe, args), args.device)[0] for _ in range(args.repeats))
    two = statistics.median(timed(lambda: generate(pipe, args, prompts=2), args.device)[0] for _ in range(args.repeats))
    run.record(
        "micro-batching",
        {
            "one_image_s": round(one, 3),
            "batch_of_two_s": round(two, 3),
            "per_image_batched_s": round(two / 2, 3),
            "throughput_gain_pct": round(100 * (2 * one / two - 1), 1),
            "latency_cost_pct": round(100 * (two / one - 1), 1),
        },
    )


def measure_cold_start(run: Run, args: argparse.Namespace, bench: Bench) -> None:
    """Process start to health 200 with weights on local disk, at the level measured last.

    `warm` starts with the compile cache this run has filled (what a restart, or an image with the
    cache baked in, sees); `empty` with none (a first deployment's first replica).
    """

    level = bench.level
    if not optimize.compiles(level) or not run.phase(f"cold start ({level})", 60 * args.scale):
        return
    folder = Path(tempfile.mkdtemp(prefix="sdxl-weights-"))
    pipe = build(args)
    pipe.save_pretrained(folder)  # a diffusers folder, as `python -m sdxl_server.fetch` would make
    del pipe
    optimize.save_cache(args.cache)  # the portable artifacts of all this run compiled
    results: dict[str, Any] = {"optimize": level}
    for label in args.cold:
        if run.left() < 30 * args.scale:
            run.results["skipped"].append(f"cold start, {label} cache")
            break
        cache = args.cache.folder if label == "warm" else Path(tempfile.mkdtemp(prefix="sdxl-compile-"))
        port = free_port()
        env = {
            **os.environ,
            "SDXL_MODEL": str(folder),
            "SDXL_VAE": "model",
            "SDXL_OPTIMIZE": level,
            "SDXL_COMPILE_CACHE": str(cache),
            "AIP_HTTP_PORT": str(port),
            "SDXL_HOST": "127.0.0.1",
            "SDXL_DEVICE": args.device,
            "SDXL_DTYPE": args.dtype,
            "SDXL_WARMUP": f"{args.size}x{args.size}",
            "PYTHONPATH": os.pathsep.join([str(ROOT / "containers" / "model"), os.environ.get("PYTHONPATH", "")]),
        }
        log = (run.out / f"cold-{level}-{label}.log").open("wb")
        started = time.monotonic()
        process = subprocess.Popen([sys.executable, "-m", "sdxl_server"], env=env, stdout=log, stderr=log)
        try:
            wait_healthy(f"http://127.0.0.1:{port}", run.left() - 5, process)
            results[f"{label} cache"] = {"seconds_to_health_200": round(time.monotonic() - started, 1)}
        except (TimeoutError, RuntimeError) as exc:
            results[f"{label} cache"] = {"error": str(exc)}
        finally:
            process.terminate()
            process.wait(30)
        run.record(f"cold start ({level})", results)


def markdown(results: dict[str, Any]) -> str:
    phases = results["phases"]
    lines = ["# SDXL model server benchmark", ""]
    env = phases.get("environment", {})
    lines.append(", ".join(f"{k} {v}" for k, v in env.items()))
    lines += [
        "",
        "| variant | first call s | median s | x baseline | peak GiB | max abs diff vs baseline | CUDA graphs |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, entry in phases.items():
        if name.startswith("variant "):
            diff = entry.get("vs_baseline", {})
            graphs = entry.get("cuda_graphs", {})
            lines.append(
                f"| {name[8:]} | {entry['first_call_s']} | {entry['median_s']} | "
                f"{entry.get('ratio_to_baseline', '')} | {entry.get('peak_gib', '')} | "
                f"{diff.get('max_abs', '')} | {graphs.get('off_because') or graphs.get('captured', '')} |"
            )
    for name, entry in phases.items():
        if not name.startswith(("variant ", "environment", "build")):
            lines += ["", f"**{name}**: `{json.dumps(entry)}`"]
    lines += gpu_modes.markdown(phases)
    if results["skipped"]:
        lines += ["", "Skipped: " + "; ".join(results["skipped"])]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=480, help="seconds for everything")
    parser.add_argument("--out", type=Path, default=Path("results"))
    parser.add_argument("--model", default="random-sdxl")
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--run",
        default="none,eager,transformers,blocks,compile,server,throughput,cold,batching,unet,max",
        help=f"what to measure, in order: variants ({', '.join(VARIANTS)}) and phases ({', '.join(PHASES)})",
    )
    parser.add_argument(
        "--modes",
        default="",
        help=f"generation modes to measure on each variant besides text-to-image: {', '.join(gpu_modes.MODES)}",
    )
    parser.add_argument("--cold", default="warm,empty", help="cold starts to measure: warm and/or empty cache")
    parser.add_argument("--cache", type=Path, help="compile cache folder to start from and leave filled")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    args.device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    args.cold = [label for label in args.cold.split(",") if label]
    args.modes = [mode for mode in args.modes.split(",") if mode]
    if unknown_modes := [mode for mode in args.modes if mode not in gpu_modes.MODES]:
        parser.error(f"--modes: unknown {', '.join(unknown_modes)}; expected {', '.join(gpu_modes.MODES)}")
    args.scale = 1.0 if args.device.startswith("cuda") else 0.3  # phase estimates are for a GPU at 1024x1024
    steps = args.run.split(",")
    unknown = [step for step in steps if step not in VARIANTS and step not in PHASES]
    if unknown:
        parser.error(f"--run: unknown {', '.join(unknown)}; expected {', '.join([*VARIANTS, *PHASES])}")
    # What this run compiles, a cold start can start warm from (and, with --cache, the next run too).
    args.cache = optimize.use_cache(args.cache or Path(tempfile.mkdtemp(prefix="sdxl-compile-")))
    run = Run(args.out, args.budget)
    run.record("environment", {**environment(args.device), "model": args.model, "size": args.size, "steps": args.steps})
    bench = Bench()
    for step in steps:
        try:
            if step in VARIANTS:
                measure_variant(run, args, bench, step)
            elif bench.pipe is None:
                run.results["skipped"].append(f"{step} (no pipeline measured before it)")
            elif step in ("server", "throughput"):
                if step == "server" or "server" not in steps:
                    measure_server(run, args, bench, throughput_too="throughput" in steps)
            elif step == "batching":
                measure_batching(run, args, bench)
            elif step == "breakdown":
                measure_breakdown(run, args, bench)
            elif step == "attention":
                measure_attention(run, args, bench)
            elif step == "cold":
                measure_cold_start(run, args, bench)
            elif step == "lora":  # bench/gpu_lora.py: the LoRA slot's cost per image and per swap
                gpu_lora.measure(run, args, bench, build, difference)
        except Exception as exc:  # one step's failure is a result too: record it and measure the rest
            traceback.print_exc()
            run.record(f"{step} failed", f"{type(exc).__name__}: {exc}")
    optimize.save_cache(args.cache)
    run.write()
    print(f"== done, {run.left():.0f} s of the budget left; results in {args.out}", flush=True)


if __name__ == "__main__":
    main()
