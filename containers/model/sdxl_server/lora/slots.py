"""The slot: one zero LoRA adapter on the base's UNet and text encoders, and the swap of requests' adapters into it.

The slot is added before optimize.apply compiles anything, at a fixed rank with alpha = rank (peft's scaling
is then the constant 1.0). A request's adapters are combined into it by copying into the slot's own
parameters, in place, as peft's hot-swap does: per module, lora_A = the adapters' A stacked, lora_B = their
B side by side, each B times scale * alpha / r, zeros after. B A x is then exactly the sum diffusers'
`set_adapters` computes, and nothing the compiled code or a CUDA graph holds (shapes, dtypes, storage,
Python attributes) changes: nothing recompiles, graphs replay the new values.

A refiner shares the base's text_encoder_2, so it reads the slot there too, as a diffusers refiner built
around a base reads a LoRA loaded into that shared module; the refiner's own UNet has no slot.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

    from sdxl_server.lora.adapters import Adapter, Targets

NAME = "sdxlctl"  # the slot's peft adapter name
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
# kohya's default LoRA targets and diffusers' training scripts': attention, feed-forward and projections.
TEXT_TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj", "mlp.fc1", "mlp.fc2")

Layers = dict[str, dict[str, tuple[Any, Any, float]]]  # component -> module path -> (A [r, in], B [out, r], scaling)


def find_targets(pipe: Any) -> Targets:
    """What the slot covers on `pipe`, with each module's shape: in the UNet every nn.Linear inside a
    Transformer2DModel, in each text encoder every layer's attention projections and MLP."""
    import torch

    targets: Targets = {}
    unet: dict[str, tuple[int, int]] = {}
    for name, module in pipe.unet.named_modules():
        if type(module).__name__ == "Transformer2DModel":
            for inner, layer in module.named_modules():
                if isinstance(layer, torch.nn.Linear):
                    unet[f"{name}.{inner}"] = (layer.in_features, layer.out_features)
    targets["unet"] = unet
    for component in COMPONENTS[1:]:
        encoder = getattr(pipe, component, None)
        if encoder is None:
            continue
        targets[component] = {
            name: (module.in_features, module.out_features)
            for name, module in encoder.named_modules()
            if isinstance(module, torch.nn.Linear) and name.endswith(TEXT_TARGETS)
        }
    return targets


class Slots:
    """The slot on one pipeline's modules, and the adapters kept on its device (the last `memory` used, and
    the pinned ones). `use` is called from the runner's worker thread only; `resident` from any thread."""

    def __init__(self, params: dict[tuple[str, str], tuple[Any, Any]], targets: Targets, *, rank: int, memory: int):
        self.rank = rank
        self.targets = targets
        self.memory = memory
        self._params = params  # (component, path) -> (lora_A weight [rank, in], lora_B weight [out, rank])
        self._filled: dict[tuple[str, str], int] = {}  # modules holding non-zero weights: the rank used
        self._holding: tuple[tuple[str, float], ...] | None = ()  # the combination in the slot (None: unknown)
        self._device: OrderedDict[str, Layers] = OrderedDict()  # key -> layers on the device, least recent first
        self._pinned: set[str] = set()
        self._lock = threading.Lock()  # guards the device cache's bookkeeping, read by health

    @classmethod
    def prepare(cls, pipe: Any, *, rank: int, memory: int) -> Slots:
        """Add the zero slot to `pipe`'s UNet and text encoders: before optimize.apply (compiled code and
        CUDA graphs then include it). Its output equals the base's exactly (B = 0)."""
        import torch
        from peft import LoraConfig

        if rank < 1 or memory < 1:
            raise ValueError(f"rank and memory must be >= 1, got rank={rank}, memory={memory}")
        if getattr(pipe, "fusing_unet", False) or getattr(pipe, "_sdxl_compiled", ()):
            # fused to_qkv would bypass the slot, and compiled code would not contain it
            raise ValueError("prepare the LoRA slot before optimize.apply (and apply with fuse_qkv=False)")
        targets = find_targets(pipe)
        params: dict[tuple[str, str], tuple[Any, Any]] = {}
        for component, modules in targets.items():
            if not modules:
                continue
            model = getattr(pipe, component)
            config = LoraConfig(
                r=rank,
                lora_alpha=rank,  # scaling 1.0: a constant compiled code may bake in; the scales go into B
                lora_dropout=0.0,
                target_modules=sorted(modules),  # exact paths: nothing else is wrapped
            )
            # diffusers' and transformers' own add_adapter, as diffusers' training scripts add a LoRA;
            # the adapter takes the base layer's dtype and device.
            model.add_adapter(config, adapter_name=NAME)
            for path in modules:
                layer = model.get_submodule(path)
                down, up = layer.lora_A[NAME].weight, layer.lora_B[NAME].weight
                with torch.no_grad():
                    down.zero_()  # peft draws A at random: zero it too, so no inf x 0 can make a NaN
                    up.zero_()
                params[(component, path)] = (down, up)
        return cls(params, targets, rank=rank, memory=memory)

    def use(self, adapters: Sequence[tuple[Adapter, float]]) -> None:
        """Put `adapters` (adapter, scale) in the slot, combined; () zeroes it. A no-op when it holds them already."""
        import torch

        wanted = tuple((adapter.key, float(scale)) for adapter, scale in adapters)
        if wanted == self._holding:
            return
        # A scale of 0 adds nothing: leaving the adapter out gives the base's output exactly.
        active = [(adapter, float(scale)) for adapter, scale in adapters if scale != 0]
        total = sum(adapter.rank for adapter, _ in active)
        if total > self.rank:
            ranks = " + ".join(str(adapter.rank) for adapter, _ in active)
            raise ValueError(f"ranks {ranks} = {total} exceed the slot's rank {self.rank}")
        layers = [(self._on_device(adapter), scale) for adapter, scale in active]
        self._holding = None  # a swap that fails half way leaves the slot unknown: the next use rewrites it
        with torch.no_grad():
            for where, (down, up) in self._params.items():
                component, path = where
                parts = [(layer[component][path], scale) for layer, scale in layers if path in layer.get(component, {})]
                self._fill(where, down, up, parts)
        self._holding = wanted
        self._evict(keep={adapter.key for adapter, _ in active})

    def pin(self, adapter: Adapter) -> None:
        """Keep `adapter` on the device for good (a preloaded one): not counted in `memory`."""
        self._on_device(adapter)
        with self._lock:
            self._pinned.add(adapter.key)

    def resident(self) -> set[str]:
        """The keys of the adapters on the device now."""
        with self._lock:
            return set(self._device)

    def _fill(
        self, where: tuple[str, str], down: Any, up: Any, parts: list[tuple[tuple[Any, Any, float], float]]
    ) -> None:
        # Straight into the slot's slices, no stacked copy in between: two or three small kernels per adapter
        # and module, ~1,000 modules in SDXL (the switch time bench/gpu_lora.py measures).
        before, rank = self._filled.get(where, 0), 0
        for (a, b, factor), scale in parts:
            end = rank + a.shape[0]
            down.data[rank:end].copy_(a)
            added = up.data[:, rank:end]
            added.copy_(b)
            if scale * factor != 1.0:
                added.mul_(scale * factor)
            rank = end
        if rank:
            self._filled[where] = rank
        else:
            self._filled.pop(where, None)
        if before > rank:  # what the previous combination left past this one's rank
            down.data[rank:before].zero_()
            up.data[:, rank:before].zero_()

    def _on_device(self, adapter: Adapter) -> Layers:
        """`adapter`'s tensors on the slot's device and in its dtype, moved once (LRU)."""
        with self._lock:
            layers = self._device.get(adapter.key)
            if layers is not None:
                self._device.move_to_end(adapter.key)
                return layers
        layers = {}
        for component, modules in adapter.layers.items():
            layers[component] = {}
            for path, (a, b, factor) in modules.items():
                where = (component, path)
                if where not in self._params:
                    raise ValueError(f"{adapter.key}: {component} has no slot on {path}")
                down, up = self._params[where]
                if a.shape[1] != down.shape[1] or b.shape[0] != up.shape[0] or a.shape[0] != b.shape[1]:
                    shapes = f"A {tuple(a.shape)}, B {tuple(b.shape)}"
                    raise ValueError(f"{adapter.key}: {component} {path} has {shapes}, the slot {tuple(up.shape)}")
                layers[component][path] = (_moved(a, down), _moved(b, up), float(factor))
        with self._lock:
            self._device[adapter.key] = layers
        return layers

    def _evict(self, *, keep: set[str]) -> None:
        with self._lock:
            counted = [key for key in self._device if key not in self._pinned]
            for key in counted[: max(0, len(counted) - self.memory)]:
                if key not in keep:
                    del self._device[key]


def _moved(tensor: Any, like: torch.Tensor) -> Any:
    return tensor.to(device=like.device, dtype=like.dtype).contiguous()
