"""Which files of a published pipeline to load: one weights variant, the listed components, nothing else.

A published repository holds each model several times: stabilityai/stable-diffusion-xl-base-1.0 has fp32
and fp16 safetensors of every component, single-file checkpoints at its root, ONNX, OpenVINO and Flax
exports, and spare VAEs (vae_1_0/, vae_encoder/, vae_decoder/). diffusers loads one variant and does not
fall back from a variant that is missing, so the choice is made here, from the file names alone (a Hub
listing, a cache snapshot, a folder or a gs:// listing), before a byte of weights is fetched.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from sdxl_server.errors import ModelLoadError

MODEL_INDEX = "model_index.json"
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # a Hugging Face repo id: owner/name
# model.safetensors, model.fp16.safetensors, diffusion_pytorch_model.fp16-00001-of-00002.safetensors, ...
# and the pickles: transformers' pytorch_model.bin (its safetensors are model.*), diffusion_pytorch_model.bin
_WEIGHTS = re.compile(
    r"^(?P<base>model|pytorch_model|diffusion_pytorch_model)(?:\.(?P<variant>\w+))?(?:-\d+-of-\d+)?"
    r"\.(?P<format>safetensors|bin)$"
)
# The index of sharded weights: model.safetensors.index.json, model.safetensors.index.fp16.json
_INDEX = re.compile(
    r"^(?P<base>model|pytorch_model|diffusion_pytorch_model)\.(?P<format>safetensors|bin)"
    r"\.index(?:\.(?P<variant>\w+))?\.json$"
)
# Weights in formats a torch pipeline never reads (and the weights not chosen): never fetched.
_NOT_LOADED = (".safetensors", ".bin", ".msgpack", ".onnx", ".onnx_data", ".xml", ".pb", ".h5", ".ckpt", ".pt", ".pth")
# Components that are configuration only (no weights): tokenizers, schedulers, image processors.
_CONFIG_ONLY = ("Tokenizer", "TokenizerFast", "Scheduler", "FeatureExtractor", "ImageProcessor", "Processor")
# What each precision would rather load, best first; None is the plain files (fp32 in published repos).
PREFERENCE: dict[str, tuple[str | None, ...]] = {
    "fp16": ("fp16", None, "bf16"),
    "bf16": ("bf16", "fp16", None),
    "fp32": (None, "fp16", "bf16"),
}


@dataclass(frozen=True)
class Selection:
    """The files to fetch and load, and the `variant` to pass to diffusers."""

    files: tuple[str, ...]
    variant: str | None
    weights: Mapping[str, str | None] = field(default_factory=dict)  # model component -> its variant
    note: str = ""  # why the variant is not the precision's first choice (upcast, downcast, mixed)

    @property
    def label(self) -> str:
        """The variant as logs and SOURCE.json say it: fp16, bf16 or plain."""
        return self.variant or "plain"


def precision(dtype: Any) -> str:
    """fp16, bf16 or fp32, from a torch dtype."""
    return {"torch.float16": "fp16", "torch.bfloat16": "bf16"}.get(str(dtype), "fp32")


def components(model_index: Mapping[str, Any]) -> dict[str, tuple[str, str]]:
    """Component name -> (library, class name), for every component model_index.json lists (not the nulls)."""
    found: dict[str, tuple[str, str]] = {}
    for name, value in model_index.items():
        if name.startswith("_") or not isinstance(value, list) or len(value) != 2:
            continue
        library, class_name = value
        if library is not None and class_name is not None:
            found[name] = (str(library), str(class_name))
    return found


def select_pipeline(
    names: Iterable[str], model_index: Mapping[str, Any], precision: str, *, without: Iterable[str] = ()
) -> Selection:
    """The files of a diffusers pipeline to load for a run in `precision` (fp16, bf16, fp32).

    `without` names components supplied another way (the VAE when SDXL_VAE replaces it): none of their
    files are chosen. Raises ModelLoadError naming every component that is missing or incomplete.
    """
    folders = _by_folder(names)
    if MODEL_INDEX not in folders.get("", {}):
        raise ModelLoadError(f"not a diffusers pipeline: no {MODEL_INDEX}")
    if "_class_name" not in model_index or not components(model_index):
        raise ModelLoadError(
            f"{MODEL_INDEX} names no pipeline: a diffusers pipeline's has _class_name and a "
            '[library, class] pair per component, such as "unet": ["diffusers", "UNet2DConditionModel"]'
        )
    listed = {name: cls for name, cls in components(model_index).items() if name not in set(without)}
    problems: list[str] = []
    available: dict[str, dict[str | None, list[str]]] = {}
    config_only: dict[str, list[str]] = {}
    for name, (library, class_name) in listed.items():
        present = folders.get(name)
        if not present:
            problems.append(f"{name}: no folder {name}/ ({class_name}, listed in {MODEL_INDEX})")
        elif class_name.endswith(_CONFIG_ONLY):
            kept = [f for f in present if not f.endswith(_NOT_LOADED)]
            if "Scheduler" in class_name and "scheduler_config.json" not in kept:
                problems.append(f"{name}: no scheduler_config.json")
            config_only[name] = [f"{name}/{f}" for f in kept]
        else:
            problem, by_variant = _model_weights(name, present, base=_base(library))
            if problem:
                problems.append(problem)
            available[name] = by_variant
    if problems:
        raise ModelLoadError(
            "the pipeline is incomplete: " + "; ".join(problems) + ". Copy the whole component folders"
        )
    variant, weights, note = _choose(available, precision)
    files = [MODEL_INDEX]
    for name, chosen in weights.items():
        files += [f"{name}/config.json", *(f"{name}/{f}" for f in available[name][chosen])]
    for listed_files in config_only.values():
        files += listed_files
    return Selection(tuple(sorted(files)), variant, weights, note)


def select_model(names: Iterable[str], precision: str) -> Selection:
    """The files of a single model repository (a VAE such as madebyollin/sdxl-vae-fp16-fix) to load."""
    files = _by_folder(names).get("", {})
    problem, by_variant = _model_weights("", list(files), base="diffusion_pytorch_model")
    if problem:
        raise ModelLoadError(f"not a diffusers model: {problem.removeprefix(': ')}")
    variant, _, note = _choose({"": by_variant}, precision)
    return Selection(tuple(sorted(["config.json", *by_variant[variant]])), variant, {"": variant}, note)


def _by_folder(names: Iterable[str]) -> dict[str, dict[str, None]]:
    """Top-level folder -> the file names directly in it ('' is the root); deeper files are not loaded."""
    folders: dict[str, dict[str, None]] = {}
    for name in names:
        parts = PurePosixPath(name.replace("\\", "/").lstrip("/")).parts
        if len(parts) == 1:
            folders.setdefault("", {})[parts[0]] = None
        elif len(parts) == 2:
            folders.setdefault(parts[0], {})[parts[1]] = None
    return folders


def _base(library: str) -> str:
    # transformers models save model.safetensors; diffusers models diffusion_pytorch_model.safetensors
    return "model" if library == "transformers" else "diffusion_pytorch_model"


def _model_weights(name: str, files: Iterable[str], *, base: str) -> tuple[str, dict[str | None, list[str]]]:
    """(a problem or '', variant -> the weight files of that variant in the best format present)."""
    files = list(files)
    found: dict[str | None, dict[str, list[str]]] = {}
    for file in files:
        match = _WEIGHTS.match(file) or _INDEX.match(file)
        if match:
            found.setdefault(match["variant"], {}).setdefault(match["format"], []).append(file)
    # safetensors when present: .bin is a pickle (slower, and it can run code); only if nothing else
    by_variant = {v: sorted(formats.get("safetensors") or formats["bin"]) for v, formats in found.items()}
    missing = []
    if "config.json" not in files:
        missing.append("no config.json")
    if not by_variant:
        missing.append(f"no weights ({base}.safetensors or {base}.fp16.safetensors)")
    return (f"{name}: {', '.join(missing)}" if missing else ""), by_variant


def _choose(
    available: Mapping[str, Mapping[str | None, list[str]]], precision: str
) -> tuple[str | None, dict[str, str | None], str]:
    """One variant for the whole pipeline if every model has it; else each model its best, plain as the
    fallback diffusers itself takes for a model without the requested variant."""
    preference = PREFERENCE[precision]
    for variant in preference:
        if all(variant in by_variant for by_variant in available.values()):
            note = "" if variant == preference[0] else _cast_note(variant, precision)
            return variant, dict.fromkeys(available, variant), note
    # Mixed (an fp16 pipeline with the fp32-only fp16-fix VAE in vae/): diffusers loads the requested
    # variant where it exists and the plain files elsewhere, which is exactly what is chosen here.
    variant = next(v for v in preference if v is not None and any(v in b for b in available.values()))
    weights: dict[str, str | None] = {}
    for name, by_variant in available.items():
        if variant in by_variant:
            weights[name] = variant
        elif None in by_variant:
            weights[name] = None
        else:
            raise ModelLoadError(
                f"{name}: only {', '.join(sorted(str(v) for v in by_variant))} weights, and the other components "
                f"have {variant} or plain weights: diffusers cannot load that mix"
            )
    plain = sorted(name for name, v in weights.items() if v is None)
    return variant, weights, f"{variant} weights, plain weights for {', '.join(plain)}"


def _cast_note(variant: str | None, precision: str) -> str:
    first = PREFERENCE[precision][0] or "plain"
    return f"no {first} weights for every component: {variant or 'plain'} weights cast to {precision}"


def damaged(folder: Path, files: Iterable[str]) -> str | None:
    """The first safetensors file of `files` shorter than its header says, or unreadable, and why; else None.

    Header reads only (a few kB each): asked after a load failed, to name the file a library did not.
    """
    for name in files:
        if not name.endswith(".safetensors"):
            continue
        path = folder / name
        try:
            size = path.stat().st_size
            with path.open("rb") as file:
                (length,) = struct.unpack("<Q", file.read(8))
                if 8 + length > size:
                    return f"{name}: {size} bytes, shorter than its own header; truncated"
                header = json.loads(file.read(length))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, struct.error, KeyError, TypeError, IndexError, AttributeError) as exc:
            return f"{name}: not a readable safetensors file, damaged or truncated ({type(exc).__name__}: {exc})"
        if 8 + length + end > size:
            return f"{name}: {size} bytes, its header says {8 + length + end}; truncated"
    return None


@dataclass(frozen=True)
class Located:
    """A source's chosen files, on local disk: `folder` holds every file of `selection`."""

    source: str
    folder: Path
    selection: Selection
    revision: str | None = None  # the Hub commit the files come from


def locate(
    source: str,
    precision: str,
    *,
    gcs_cache: Path,
    hub_cache: Path | None = None,
    without: Iterable[str] = (),
    single_model: bool = False,
    setting: str = "SDXL_MODEL",
) -> Located:
    """Choose the files of a folder, gs:// folder or Hub repo, and fetch only those (nothing for a folder).

    `single_model`: the source is one model (a VAE repository), not a pipeline. `setting`: the variable
    that named the source, which an error tells the user to change.
    """
    without = tuple(without)

    def pick(names: list[str], folder: Path) -> Selection:
        if single_model:
            return select_model(names, precision)
        if MODEL_INDEX not in names:
            raise ModelLoadError(f"{source} is not a diffusers pipeline folder (no {MODEL_INDEX})")
        return select_pipeline(names, _read_index(folder / MODEL_INDEX), precision, without=without)

    if source.startswith("gs://"):
        return _locate_gcs(source, gcs_cache, pick, needs_index=not single_model)
    folder = Path(source).expanduser()
    if folder.is_dir():
        names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        return Located(source, folder, pick(names, folder))
    if not REPO_ID.match(source) or folder.exists():  # a mistyped folder is not a question for the Hub
        raise ModelLoadError(
            f"{source} is not an existing folder, a gs://bucket/folder or a Hugging Face repo id (owner/name)"
        )
    return _locate_hub(source, hub_cache, pick, setting)


def _read_index(path: Path) -> Mapping[str, Any]:
    try:
        index = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not readable JSON: {exc}") from exc
    if not isinstance(index, dict):
        raise ModelLoadError(f"{path} is not a JSON object")
    return index


def _locate_gcs(uri: str, cache: Path, pick: Any, *, needs_index: bool) -> Located:
    from sdxl_server.gcs import download_folder

    folder = None
    if needs_index:  # the choice reads model_index.json: fetch it alone first
        folder = download_folder(uri, cache, select=lambda names: [n for n in names if n == MODEL_INDEX])
    chosen: list[Selection] = []

    def select(names: list[str]) -> tuple[str, ...]:
        chosen.append(pick(names, folder or cache))
        return chosen[-1].files

    folder = download_folder(uri, cache, select=select)
    return Located(uri, folder, chosen[-1])


def _locate_hub(repo_id: str, cache: Path | None, pick: Any, setting: str) -> Located:
    from huggingface_hub import HfApi, hf_hub_download, is_offline_mode, snapshot_download

    try:
        if is_offline_mode():  # the cache snapshot is the listing: whatever files it holds
            folder = Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
            names = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
            return Located(repo_id, folder, pick(names, folder), revision=folder.name)
        info = HfApi().model_info(repo_id)
        names = [sibling.rfilename for sibling in info.siblings or ()]
        index = (
            hf_hub_download(repo_id, MODEL_INDEX, revision=info.sha, cache_dir=cache) if MODEL_INDEX in names else ""
        )
        selection = pick(names, Path(index).parent)
        # Exactly the chosen names (no wildcards): the unused duplicates are never downloaded.
        folder = Path(
            snapshot_download(repo_id, revision=info.sha, cache_dir=cache, allow_patterns=list(selection.files))
        )
        return Located(repo_id, folder, selection, revision=info.sha)
    except ModelLoadError:
        raise
    except Exception as exc:  # the hub client raises many types: offline, 404, gated, disk full
        raise ModelLoadError(
            f"could not load {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). "
            f"Without network access, set {setting} to a local diffusers folder or a gs:// folder, "
            "or bake the weights into the image ([model] bake = true)"
        ) from exc
