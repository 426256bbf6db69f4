"""How the cold-start benchmark loads the pipeline: each way in LOADERS, run alone in a fresh process.

    python bench/coldstart_loaders.py load LOADER FOLDER [--verify]   (prints one JSON line)
    python bench/coldstart_loaders.py prepare MODEL FOLDER            (writes the fp16 weights)

Kept apart from bench/coldstart.py, which never imports torch: what it measures must not share its memory.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

SERVER_PATH = Path(__file__).resolve().parents[1] / "containers" / "model"
WEIGHTS = ("unet", "vae", "text_encoder", "text_encoder_2")
CHUNK = 16 << 20
PAGE = mmap.PAGESIZE


def prepare(model: str, folder: str) -> None:
    sys.path.insert(0, str(SERVER_PATH))
    import torch

    from sdxl_server.sources import Placement, build_random_sdxl, build_tiny_pipeline

    placement = Placement("cpu", torch.float16)
    pipe = build_tiny_pipeline().to(torch.float16) if model == "tiny" else build_random_sdxl(placement)
    pipe.save_pretrained(folder, variant="fp16", safe_serialization=True)


def read_file(path: Path) -> int:
    """Read the whole file through one reused buffer: the bytes cross from disk to memory, nothing else."""
    buffer = bytearray(CHUNK)
    total = 0
    with open(path, "rb", buffering=0) as f:
        while count := f.readinto(buffer):
            total += count
    return total


def _components(folder: Path, load_one: Callable[[str], Any], parallel: bool) -> dict[str, Any]:
    if not parallel:
        return {name: load_one(name) for name in WEIGHTS}
    # One thread per component: the unet's read overlaps the others' reads and their Python-side setup.
    with ThreadPoolExecutor(len(WEIGHTS)) as pool:
        return dict(zip(WEIGHTS, pool.map(load_one, WEIGHTS), strict=True))


def _diffusers_component(folder: Path, name: str, **kwargs: Any) -> Any:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    kinds = {"unet": UNet2DConditionModel, "vae": AutoencoderKL}
    kinds |= {"text_encoder": CLIPTextModel, "text_encoder_2": CLIPTextModelWithProjection}
    return kinds[name].from_pretrained(folder, subfolder=name, variant="fp16", torch_dtype=torch.float16, **kwargs)


def _empty_component(folder: Path, name: str) -> Any:
    """The component's module with its parameters on the meta device: no memory, no random init."""
    from accelerate import init_empty_weights
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    with init_empty_weights():
        if name in ("unet", "vae"):
            kind = UNet2DConditionModel if name == "unet" else AutoencoderKL
            return kind.from_config(kind.load_config(folder / name))
        text = CLIPTextModel if name == "text_encoder" else CLIPTextModelWithProjection
        return text(CLIPTextConfig.from_pretrained(folder / name))


def _assigned(folder: Path, name: str, module: Any, read: Callable[[Path], dict[str, Any]]) -> Any:
    """Read the component's tensors with `read` and make them its parameters as they are (no copy)."""
    (path,) = _weights_of(folder, name)
    module.load_state_dict(read(path), strict=True, assign=True)
    return module.eval()


def _fastsafetensors(path: Path) -> dict[str, Any]:
    from fastsafetensors import SafeTensorsFileLoader, SingleGroup

    loader = SafeTensorsFileLoader(SingleGroup(), "cpu", nogds=True)
    loader.add_filenames({0: [str(path)]})
    buffer = loader.copy_files_to_device()
    # The tensors share ownership of the loader's buffer (0.5): they outlive close() without a copy.
    tensors = {key: buffer.get_tensor(key) for key in loader.get_keys()}
    buffer.close()
    loader.close()
    return tensors


def _safetensors(backend: str) -> Callable[[Path], dict[str, Any]]:
    def read(path: Path) -> dict[str, Any]:
        from safetensors.torch import load_file

        return load_file(path, device="cpu", backend=backend)

    return read


def _load_with(folder: Path, loader: str) -> Any:
    """The pipeline, loaded the way `loader` names; tokenizers and scheduler the same way for all."""
    import torch
    from diffusers import StableDiffusionXLPipeline

    common: dict[str, Any] = {"variant": "fp16", "torch_dtype": torch.float16, "add_watermarker": False}
    base, *modes = loader.split("+")
    prefetch = _prefetch(folder) if "prefetch" in modes else []
    if loader.startswith("diffusers") and "threads" not in modes:
        no_mmap = {"disable_mmap": True} if base == "diffusers-no-mmap" else {}
        pipe = StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, **no_mmap, **common)
        return _joined(prefetch, pipe)
    reads = {
        "safetensors": _safetensors("mmap"),
        "safetensors-pread": _safetensors("pread"),
        "fastsafetensors": _fastsafetensors,
    }
    if base == "diffusers":

        def load_one(name: str) -> Any:
            return _diffusers_component(folder, name)
    else:
        # accelerate's init_empty_weights patches nn.Module for every thread: while it is active, a parameter
        # another thread assigns goes to the meta device. So the empty modules are made first, one by one.
        empty = {name: _empty_component(folder, name) for name in WEIGHTS}

        def load_one(name: str) -> Any:
            return _assigned(folder, name, empty[name], reads[base])

    parts = _components(folder, load_one, parallel="threads" in modes)
    return _joined(
        prefetch, StableDiffusionXLPipeline.from_pretrained(folder, local_files_only=True, **parts, **common)
    )


def _prefetch(folder: Path) -> list[threading.Thread]:
    """Read every weight file into the page cache, one thread per file, while the loader runs: the loader's
    page faults then find the bytes in memory instead of waiting for one small read-ahead after another."""
    threads = [
        threading.Thread(target=read_file, args=(path,)) for name in WEIGHTS for path in _weights_of(folder, name)
    ]
    for thread in threads:
        thread.start()
    return threads


def _willneed(folder: Path) -> list[threading.Thread]:
    """Ask the kernel to read the files ahead (posix_fadvise WILLNEED): no copy to user space, so next to no
    CPU taken from the imports; the call itself may block while it queues the reads, hence its own thread."""

    def advise() -> None:
        for name in WEIGHTS:
            for path in _weights_of(folder, name):
                with open(path, "rb") as f:
                    os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_WILLNEED)

    thread = threading.Thread(target=advise)
    thread.start()
    return [thread]


def _joined(threads: list[threading.Thread], pipe: Any) -> Any:
    for thread in threads:
        thread.join()
    return pipe


def _weights_of(folder: Path, name: str) -> list[Path]:
    return sorted((folder / name).glob("*.fp16.safetensors"))


LOADERS = (
    "diffusers",  # the baseline: StableDiffusionXLPipeline.from_pretrained(variant="fp16")
    "diffusers-no-mmap",  # disable_mmap=True: each file read whole, then deserialised
    "diffusers+threads",  # each component's from_pretrained in its own thread
    "diffusers+prefetch",  # the baseline, while one thread per file reads it into the page cache
    "diffusers+early",  # the baseline, with that prefetch started before importing torch and diffusers
    "diffusers+willneed",  # the baseline, after posix_fadvise(WILLNEED) on each file before the imports
    "safetensors",  # empty modules, safetensors.load_file (mmap), load_state_dict(assign=True)
    "safetensors+threads",
    "safetensors+threads+prefetch",
    "safetensors-pread",  # load_file(backend="pread"): read into memory instead of mapping
    "safetensors-pread+threads",
    "fastsafetensors+threads",
    "fastsafetensors+threads+early",  # if installed: its loader (no GDS on a CPU), one per component
)


def _touch(pipe: Any) -> int:
    """Fault in every page of every weight: a mapped load reads its bytes here, not in `load`."""
    import torch

    touched = 0
    for name in WEIGHTS:
        for tensor in getattr(pipe, name).state_dict().values():
            flat = tensor.detach().reshape(-1).view(torch.uint8)
            touched += int(flat[::PAGE].sum()) + int(flat[-1])
    return touched


def _checksums(pipe: Any) -> dict[str, str]:
    """crc32 of each component's tensors, by name: identical bytes, identical checksum."""
    import zlib

    import torch

    sums = {}
    for name in WEIGHTS:
        crc = 0
        for key, tensor in sorted(getattr(pipe, name).state_dict().items()):
            crc = zlib.crc32(f"{key}:{tensor.dtype}:{tuple(tensor.shape)}".encode(), crc)
            crc = zlib.crc32(tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy(), crc)
        sums[name] = f"{crc:08x}"
    return sums


def measure(loader: str, folder: str, verify: bool) -> None:
    import resource

    started = time.perf_counter()
    # Started before the 5 s of imports, the reads have the disk to themselves and are done (or nearly) when
    # the loader first faults a page in: what a server could do at its very first line.
    modes = loader.split("+")
    early = _prefetch(Path(folder)) if "early" in modes else _willneed(Path(folder)) if "willneed" in modes else []
    # The classes too: diffusers imports lazily, and its pipeline and models pull in transformers (about 3 s).
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline, UNet2DConditionModel  # noqa: F401
    from transformers import CLIPTextModel, CLIPTextModelWithProjection  # noqa: F401

    torch.set_grad_enabled(False)
    imported = time.perf_counter()
    pipe = _joined(early, _load_with(Path(folder), loader))
    loaded = time.perf_counter()
    _touch(pipe)
    touched = time.perf_counter()
    result = {
        "loader": loader,
        "import_s": imported - started,
        "load_s": loaded - imported,
        "touch_s": touched - loaded,
        "total_s": touched - imported,
        "start_s": touched - started,
        "max_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6,
        "dtypes": sorted({str(p.dtype) for name in WEIGHTS for p in getattr(pipe, name).parameters()}),
        "checksums": _checksums(pipe) if verify else None,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    if sys.argv[1:2] == ["prepare"]:
        prepare(sys.argv[2], sys.argv[3])
    elif sys.argv[1:2] == ["load"]:
        measure(sys.argv[2], sys.argv[3], verify="--verify" in sys.argv)
    else:
        sys.exit(__doc__)
