"""The fast path: lossless speed-ups of the SDXL pipeline, chosen by SDXL_OPTIMIZE.

    none     the pipeline as the 2023 deployment ran it (fp16, fp16-fix VAE, Euler, SDPA, eager)
    eager    + fused QKV projections + channels_last + cuDNN autotuning of convolutions (no compilation)
    compile  + torch.compile, regional: each kind of block the UNet repeats (transformer stacks, ResNet
             blocks, up/down samplers) compiled once per shape, with static shapes, and the VAE decoder;
             + on a GPU, each UNet call replayed as one CUDA graph (no per-kernel launches, no guards)
    max      like compile, but the whole UNet as one graph (minutes to compile without a warm cache)
    auto     compile on a GPU, none on a CPU (inductor on a CPU is slow to compile and gains little)

Compiling and capturing happen for the sizes in SDXL_WARMUP, before health turns 200; after that
(`freeze`) a size not warmed up runs uncompiled, at about the `eager` speed, instead of holding the
queue for a minute or more of compiling.

Compiled code is cached in SDXL_COMPILE_CACHE (inductor's and Triton's caches, plus a portable
artifact file), so a restart with a warm cache does not compile again. The cache folder can be baked
into the image, kept on a volume, or restored from (and published to) a gs:// folder.
Measured on an H200 (docs/benchmarks.md): compile 0.55x the `none` pipeline's time, max the same.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdxl_server import logs

LEVELS = ("none", "eager", "compile", "max")
ARTIFACTS = "sdxl-compile-artifacts.bin"

# What regional compilation compiles: together these hold all of the UNet's arithmetic but its first
# and last convolutions and the timestep embedding. Each class compiles once per distinct shape.
BLOCKS = ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D")
# SDXL has about a dozen distinct ResNet block shapes per image size: static shapes need room for
# several image sizes before dynamo gives up on a block and runs it eagerly.
RECOMPILE_LIMIT = 256


@dataclass(frozen=True)
class Plan:
    """What a level does; the benchmark builds its own plans to measure each part alone."""

    fuse: bool = False  # fused QKV projections, channels_last, cuDNN autotuning
    compile: tuple[str, ...] | str = ()  # class names to compile regionally, or "unet" for the whole UNet
    cuda_graphs: bool = False  # replay each UNet call as one CUDA graph (GPU only)
    attention: str = ""  # "cudnn": cuDNN's attention first where it applies (else PyTorch's own order)
    autotune: bool = False  # time Triton templates against cuBLAS/cuDNN for each matmul and conv (minutes more)


PLANS = {
    "none": Plan(),
    "eager": Plan(fuse=True),
    "compile": Plan(fuse=True, compile=BLOCKS, cuda_graphs=True),
    "max": Plan(fuse=True, compile="unet", cuda_graphs=True),
}


def resolve(level: str, device: str) -> str:
    """The level `auto` means on this device."""
    if level != "auto":
        return level
    return "compile" if device.startswith("cuda") else "none"


def compiles(level: str) -> bool:
    """Whether `level` compiles (and so has a compile cache, and shapes worth keeping few)."""
    return bool(plan_for(level).compile)


def plan_for(level: str | Plan) -> Plan:
    if isinstance(level, Plan):
        return level
    if level not in PLANS:
        raise ValueError(f"SDXL_OPTIMIZE={level!r}: expected auto, {', '.join(LEVELS)}")
    return PLANS[level]


@dataclass(frozen=True)
class CompileCache:
    """Where compiled code is kept, and what it held at start."""

    folder: Path
    loaded: frozenset[str] = frozenset()  # the artifacts loaded at start (none: a cold cache)
    uri: str = ""  # the gs:// folder it was restored from, and is published to

    @property
    def warm(self) -> bool:
        return bool(self.loaded)


def use_cache(folder: Path, uri: str = "") -> CompileCache:
    """Point inductor and Triton at `folder` and load its portable artifacts, if it has any."""
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(folder / "triton")
    os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
    os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
    artifacts = folder / ARTIFACTS
    if not artifacts.is_file():
        return CompileCache(folder, uri=uri)
    import torch

    try:
        info = torch.compiler.load_cache_artifacts(artifacts.read_bytes())
    except Exception:  # another torch or GPU wrote it: compile afresh, and overwrite it after warm-up
        return CompileCache(folder, uri=uri)
    return CompileCache(folder, _keys(info), uri)


def cache_key(device: str) -> str:
    """The sub-folder of a shared cache for this torch and this kind of device: compiled code fits only them.

    Replicas on another GPU, or an image with another torch, then neither load artifacts they cannot use
    nor overwrite the ones that fit the others.
    """
    import platform
    import re

    import torch

    kind = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.machine()
    return re.sub(r"[^a-z0-9.]+", "-", f"torch-{torch.__version__}-{kind}".lower()).strip("-")


def save_cache(cache: CompileCache) -> frozenset[str]:
    """After warm-up: write the portable artifacts of what was compiled, for the next start; their keys."""
    import torch

    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return frozenset()
    data, info = saved
    partial = cache.folder / (ARTIFACTS + ".partial")
    partial.write_bytes(data)
    partial.replace(cache.folder / ARTIFACTS)
    return _keys(info)


def _keys(info: Any) -> frozenset[str]:
    """What a set of portable artifacts holds (the bytes differ from one save to the next; the keys don't)."""
    artifacts = getattr(info, "artifacts", None) or {}
    return frozenset(f"{kind}:{key}" for kind, keys in artifacts.items() for key in keys)


def apply(pipe: Any, level: str | Plan, *, fuse_qkv: bool = True) -> None:
    """Make `pipe` faster at `level` (see the module's doc); outputs match `none` within fp16 noise.

    fuse_qkv False (LoRA on): the UNet's Q, K and V projections stay apart. A fused to_qkv reads the base
    weights of to_q/to_k/to_v and would silently bypass the LoRA slot on them; the VAE is fused as before.
    """
    plan = plan_for(level)
    if not plan.fuse:
        return
    import torch

    if fuse_qkv and _has_lora(pipe.unet):
        raise ValueError("fusing QKV projections would bypass the UNet's LoRA layers: apply with fuse_qkv=False")
    if not getattr(pipe, "_sdxl_fused", False):  # idempotent: eager, then compile, on one pipeline
        # A refiner shares the base's VAE, which the base's apply fused already.
        vae = not getattr(pipe.vae, "_sdxl_fused", False)
        # one matmul for Q, K and V instead of three, in UNet and VAE attention
        if fuse_qkv or vae:
            pipe.fuse_qkv_projections(unet=fuse_qkv, vae=vae)
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
        pipe._sdxl_fused = pipe.vae._sdxl_fused = True
    torch.backends.cudnn.benchmark = True  # image sizes are few and fixed: time each conv algorithm once
    if plan.compile and not getattr(pipe, "_sdxl_compiled", ()):
        _compile(pipe, plan)
        pipe._sdxl_compiled = plan.compile
    if plan.cuda_graphs and pipe.device.type == "cuda" and not isinstance(pipe.unet.forward, GraphedForward):
        pipe.unet.forward = GraphedForward(pipe.unet.forward)


def _has_lora(module: Any) -> bool:
    return any(hasattr(layer, "lora_A") for layer in module.modules())


def freeze(pipe: Any) -> bool:
    """After warm-up: compile nothing and capture no CUDA graph from now on; True if there was any to stop.

    A size that was not warmed up then runs uncompiled (at about the `eager` speed) instead of stalling
    the queue for a compile of a minute or more, which a shared endpoint's 60 s cannot absorb.
    """
    frozen = False
    for forward in (pipe.unet.forward, pipe.vae.decoder.forward):
        while isinstance(forward, (GraphedForward, CompilerSettings)):
            forward.frozen = frozen = True
            forward = forward.forward
    return frozen


def _compile(pipe: Any, plan: Plan) -> None:
    import torch

    what = plan.compile
    # Static shapes: each image size compiles once (SDXL_WARMUP's, before health turns 200; after that
    # `freeze`), and every kernel is specialised to its shape instead of being generic in it. No fullgraph:
    # past the recompile limit a block runs eagerly instead of failing the request.
    if what == "unet":
        pipe.unet = torch.compile(pipe.unet, dynamic=False)
    else:
        compiled = 0
        for module in pipe.unet.modules():
            if type(module).__name__ in what:
                module.compile(dynamic=False)
                compiled += 1
        if not compiled:
            raise ValueError(f"no {', '.join(what)} in {type(pipe.unet).__name__}: nothing to compile")
    # The compiler's settings are thread-local, and the server compiles in whichever thread first
    # runs a shape: each call carries them.
    pipe.unet.forward = CompilerSettings(pipe.unet.forward, plan)
    if not isinstance(pipe.vae.decoder.forward, CompilerSettings):  # a refiner's VAE: the base's, compiled
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, dynamic=False)
        pipe.vae.decoder.forward = CompilerSettings(pipe.vae.decoder.forward, plan)


class CompilerSettings:
    """Calls `forward` with this plan's compiler settings in force, in any thread."""

    def __init__(self, forward: Any, plan: Plan) -> None:
        self.forward = forward
        self.attention = plan.attention
        self.autotune = plan.autotune
        self.frozen = False  # after warm-up: shapes without compiled code run eagerly (see `freeze`)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        import contextlib

        import torch._dynamo.config as dynamo
        import torch._inductor.config as inductor

        with contextlib.ExitStack() as stack:
            if self.frozen:
                import torch

                stack.enter_context(torch.compiler.set_stance("eager_on_recompile"))
            stack.enter_context(dynamo.patch(recompile_limit=RECOMPILE_LIMIT))
            # 1x1 convolutions (ResNet shortcuts, proj in/out) as matmuls
            stack.enter_context(inductor.patch(conv_1x1_as_mm=True))
            if self.autotune:  # what mode="max-autotune-no-cudagraphs" sets (the CUDA graphs are our own)
                stack.enter_context(inductor.patch(max_autotune=True, coordinate_descent_tuning=True))
            if self.attention == "cudnn":
                from torch.nn.attention import SDPBackend, sdpa_kernel

                order = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
                stack.enter_context(sdpa_kernel([*order, SDPBackend.MATH], set_priority=True))
            return self.forward(*args, **kwargs)


class GraphedForward:
    """A UNet forward that captures one CUDA graph per input shape and replays it on later calls.

    A compiled UNet still launches every kernel through Python (and, compiled regionally, through each
    block's guards); on a fast GPU the CPU then sets the pace. A replay is one launch: 17% off each
    image on an H200 (docs/benchmarks.md). Calls the graph cannot stand for
    (LoRA scales, a timestep condition, autograd, anything but CUDA tensors) run the forward as is;
    a capture that fails is logged and the forward runs as is from then on.

    The LoRA slot (lora/slots.py) needs nothing of it: a graph's kernels read the slot's parameters where
    they are, like any weight, and a swap copies into that same storage on the stream the replays run on
    (never a new tensor), so the next replay reads the request's adapters.
    """

    def __init__(self, forward: Any) -> None:
        self.forward = forward
        self.graphs: dict[tuple[Any, ...], _Graph] = {}
        self.pool: Any = None
        self.broken = ""
        self.frozen = False  # after warm-up: no new captures, a new shape runs the forward as is

    def __call__(
        self,
        sample: Any,
        timestep: Any,
        encoder_hidden_states: Any,
        *args: Any,
        added_cond_kwargs: dict[str, Any] | None = None,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> Any:
        import torch

        if isinstance(timestep, torch.Tensor) and not timestep.is_floating_point():
            # DPM++, DDIM and UniPC count in integer timesteps, Euler (what warm-up runs) in float ones. The
            # UNet embeds either as float32: as float, every sampler replays the graphs warm-up captured
            # (and on `max` runs the UNet compiled for them) instead of running uncompiled after `freeze`.
            timestep = timestep.float()
        inputs = _graph_inputs(sample, timestep, encoder_hidden_states, added_cond_kwargs)
        if (
            self.broken
            or args
            or any(value is not None for value in kwargs.values())
            or inputs is None
            or not torch.is_inference_mode_enabled()
        ):
            return self.forward(
                sample,
                timestep,
                encoder_hidden_states,
                *args,
                added_cond_kwargs=added_cond_kwargs,
                return_dict=return_dict,
                **kwargs,
            )
        key = tuple((name, tuple(value.shape), value.dtype, value.device) for name, value in inputs.items())
        graph = self.graphs.get(key)
        if graph is None and self.frozen:
            return self.forward(
                sample, timestep, encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, return_dict=return_dict
            )
        if graph is None:
            try:
                graph = self.graphs[key] = self._capture(inputs)
            except Exception as exc:  # a kernel that syncs or allocates on the host: no graph, same result
                self.broken = f"{type(exc).__name__}: {exc}"
                logs.log("CUDA graphs off", level=logging.WARNING, reason=self.broken)
                return self(
                    sample,
                    timestep,
                    encoder_hidden_states,
                    added_cond_kwargs=added_cond_kwargs,
                    return_dict=return_dict,
                    **kwargs,
                )
        for name, value in inputs.items():
            graph.inputs[name].copy_(value)
        graph.graph.replay()
        output = graph.output.clone()  # the static output is overwritten by the next replay
        if not return_dict:
            return (output,)
        from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

        return UNet2DConditionOutput(sample=output)

    def _run(self, inputs: dict[str, Any]) -> Any:
        added = {name[6:]: value for name, value in inputs.items() if name.startswith("added_")}
        return self.forward(
            inputs["sample"],
            inputs["timestep"],
            inputs["encoder_hidden_states"],
            added_cond_kwargs=added or None,
            return_dict=False,
        )[0]

    def _capture(self, inputs: dict[str, Any]) -> _Graph:
        import torch

        static = {name: value.clone() for name, value in inputs.items()}
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # compile, pick cuDNN and cuBLAS algorithms: nothing of it captured
            for _ in range(2):
                self._run(static)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):  # one pool: graphs replay one at a time
            output = self._run(static)
        self.pool = graph.pool()
        return _Graph(graph, static, output)


@dataclass
class _Graph:
    graph: Any
    inputs: dict[str, Any]
    output: Any


def _graph_inputs(
    sample: Any, timestep: Any, encoder_hidden_states: Any, added_cond_kwargs: dict[str, Any] | None
) -> dict[str, Any] | None:
    """The call's tensors by name, if all are CUDA tensors (the timestep may be a number)."""
    import torch

    if not isinstance(sample, torch.Tensor) or sample.device.type != "cuda":
        return None
    if not isinstance(timestep, torch.Tensor):
        timestep = torch.tensor(timestep, device=sample.device)
    inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": encoder_hidden_states}
    for name, value in (added_cond_kwargs or {}).items():
        inputs["added_" + name] = value
    if all(isinstance(v, torch.Tensor) and v.device.type == "cuda" for v in inputs.values()):
        return inputs
    return None
