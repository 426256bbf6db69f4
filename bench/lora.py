"""LoRA adapters at SDXL's real shapes: reading one file, and switching the slot between adapters.

    python bench/lora.py --out /tmp/lora                 # CPU: read_adapter, and Slots.use on the CPU
    python bench/lora.py --device cuda --out results/    # a GPU: the slot's switch on the device

`read`: read_adapter (header check, safetensors, diffusers' conversion, the checks) of a file covering every
slot target of SDXL 1.0 (all attention, feed-forward and projection Linears of the UNet, both text encoders'
attention and MLP), fp16 as published, at each --ranks, in peft's key layout and in kohya's (SGM names,
.alpha keys: what most published SDXL LoRAs are). `switch`: Slots.prepare at --slot-rank on SDXL's modules,
then Slots.use between two rank-32 adapters, both, and none: the first use of an adapter (moved to the
device) and the switches once both are resident. The base weights are not needed for either, so the
models are built on the meta device and only the slot's parameters are made real (on --device, in
--dtype): the switch copies into exactly the tensors the server's slot has. Weights are random.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "containers" / "model"))  # runs from a checkout, installed or not
sys.path.insert(0, str(ROOT))  # tests.model_server.loras: kohya's layout
sys.path.insert(0, str(ROOT / "bench"))

from gpu import environment, sync  # noqa: E402

CONFIGS = ROOT / "containers" / "model" / "sdxl_server" / "configs" / "sdxl-base-1.0"


def meta_sdxl() -> Any:
    """SDXL 1.0's UNet and text encoders (real configs) on the meta device: modules and shapes, no weights."""
    import torch
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    def text(name: str) -> Any:
        return CLIPTextConfig.from_dict(json.loads((CONFIGS / name / "config.json").read_text()))

    with torch.device("meta"):
        return SimpleNamespace(
            unet=UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(CONFIGS / "unet")),
            text_encoder=CLIPTextModel(text("text_encoder")),
            text_encoder_2=CLIPTextModelWithProjection(text("text_encoder_2")),
        )


def lora_file(targets: Any, rank: int, folder: Path, seed: int) -> Path:
    """A LoRA of every slot target at `rank`, fp16, peft's key layout (component.path.lora_A/B.weight)."""
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for component, modules in targets.items():
        for path, (n_in, n_out) in modules.items():
            tensors[f"{component}.{path}.lora_A.weight"] = (torch.randn(rank, n_in, generator=generator) * 0.01).half()
            tensors[f"{component}.{path}.lora_B.weight"] = (torch.randn(n_out, rank, generator=generator) * 0.01).half()
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "pytorch_lora_weights.safetensors"))
    return folder / "pytorch_lora_weights.safetensors"


def timings(fn: Any, repeat: int, device: str) -> dict[str, float]:
    values = []
    for _ in range(repeat):
        sync(device)
        started = time.perf_counter()
        fn()
        sync(device)
        values.append(time.perf_counter() - started)
    return {"median_s": round(statistics.median(values), 4), "min_s": round(min(values), 4), "runs": repeat}


def bench_read(targets: Any, ranks: list[int], folder: Path, repeat: int) -> dict[str, Any]:
    from sdxl_server.lora.adapters import read_adapter
    from tests.model_server import loras

    results: dict[str, Any] = {}
    for rank in ranks:
        peft = lora_file(targets, rank, folder / f"peft-{rank}", seed=rank)
        kohya = loras.kohya_lora(peft, folder / f"kohya-{rank}", layers_per_block=2)
        for layout, path in (("peft", peft), ("kohya", kohya)):

            def read(path: Path = path) -> Any:
                return read_adapter(path, key="k", label=path.name, targets=targets, field="bench")

            adapter = read()
            size = path.stat().st_size
            entry = {
                "bytes": size,
                "modules": sum(len(m) for m in adapter.layers.values()),
                **timings(read, repeat, "cpu"),
            }
            entry["MB_per_s"] = round(size / 1e6 / entry["median_s"], 1)
            results[f"rank {rank} {layout}"] = entry
            print(json.dumps({f"read rank {rank} {layout}": entry}), flush=True)
    return results


def real_slot(models: Any, rank: int, device: str, dtype: Any) -> Any:
    """Slots.prepare on the meta models, then only the slot's own parameters made real on `device`."""
    import torch

    from sdxl_server.lora.slots import NAME, Slots

    slots = Slots.prepare(models, rank=rank, memory=8)
    for component, modules in slots.targets.items():
        model = getattr(models, component)
        for path in modules:
            layer = model.get_submodule(path)
            for part in (layer.lora_A[NAME], layer.lora_B[NAME]):
                # Swapped, not moved: to_empty/to give a meta parameter a new Parameter object, and the slot
                # would go on copying into the meta ones it holds (no work at all: a switch measured as ~0).
                real = torch.nn.Parameter(torch.zeros(part.weight.shape, device=device, dtype=dtype))
                torch.utils.swap_tensors(part.weight, real)
    down, _up = next(iter(slots._params.values()))
    assert down.device.type == torch.device(device).type and down.dtype == dtype, "the slot holds the real tensors"
    return slots


def bench_switch(models: Any, targets: Any, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    import torch

    from sdxl_server.lora.adapters import read_adapter

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    slots = real_slot(models, args.slot_rank, args.device, dtype)
    one, two = (
        read_adapter(
            lora_file(targets, 32, folder / f"switch-{n}", n), key=f"a{n}", label="x", targets=targets, field=""
        )
        for n in (1, 2)
    )
    results: dict[str, Any] = {"slot_rank": args.slot_rank, "dtype": args.dtype}
    results["first use of A (moved to the device)"] = timings(lambda: slots.use([(one, 1.0)]), 1, args.device)
    results["first use of B (moved to the device)"] = timings(lambda: slots.use([(two, 0.8)]), 1, args.device)
    cycle = [[(one, 1.0)], [(two, 0.8)], [(one, 0.5), (two, 0.5)], []]
    names = ["to A", "to B", "to A+B", "to none"]
    for name, wanted, before in zip(names, cycle, [cycle[-1], *cycle[:-1]], strict=True):
        values: list[float] = []
        for _ in range(args.repeat):
            slots.use(before)
            sync(args.device)
            started = time.perf_counter()
            slots.use(wanted)
            sync(args.device)
            values.append(time.perf_counter() - started)
        results[f"switch {name}"] = {"median_s": round(statistics.median(values), 4), "min_s": round(min(values), 4)}
    results["same again (no-op)"] = timings(lambda: slots.use([]), args.repeat, args.device)
    print(json.dumps({"switch": results}), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/sdxl-lora-bench"))
    parser.add_argument("--ranks", default="16,64")
    parser.add_argument("--slot-rank", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="fp16", help="the slot's dtype (fp16 as the server's on a GPU)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--only", default="read,switch")
    args = parser.parse_args()

    from sdxl_server.lora.slots import find_targets

    models = meta_sdxl()
    targets = find_targets(models)
    results: dict[str, Any] = {
        "environment": environment(args.device),
        "targets": {c: len(m) for c, m in targets.items()},
    }
    with tempfile.TemporaryDirectory() as work:
        if "read" in args.only:
            results["read"] = bench_read(targets, [int(r) for r in args.ranks.split(",")], Path(work), args.repeat)
        if "switch" in args.only:
            results["switch"] = bench_switch(models, targets, args, Path(work))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "lora.json").write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out / 'lora.json'}")


if __name__ == "__main__":
    main()
