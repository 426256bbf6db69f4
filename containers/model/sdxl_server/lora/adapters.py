"""Reading and checking one LoRA file: what the slot can take, or a 400 that says why not.

The header is checked by hand before any tensor is read (a file is untrusted input: its first 8 bytes say
how much JSON to parse). The tensors are then read with the safetensors library (never pickle) and turned
into per-module (A, B, scaling) by diffusers' own conversions, the ones `load_lora_weights` applies, so
every format diffusers reads (diffusers, peft, kohya/A1111) reads the same here, with the same alphas.
"""

from __future__ import annotations

import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import InvalidRequest

Targets = dict[str, dict[str, tuple[int, int]]]  # component -> module path -> (in_features, out_features)

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
MAX_HEADER_BYTES = 100_000_000  # the safetensors library's own limit
MAX_TENSORS = 10_000  # an SDXL LoRA of every Linear and conv layer has ~2,500 (A, B, alpha each)
DTYPE_BYTES = {"F16": 2, "BF16": 2, "F32": 4}
# Module kinds a base SDXL has but the slot does not adapt (LoCon/LyCORIS and full-coverage trainers). A
# module of any other kind missing from the slot's targets (which cover every attention, feed-forward and
# projection Linear the base has), or of another shape, means the file was made for another base.
UNCOVERED = {
    "conv": "convolution", "conv1": "convolution", "conv2": "convolution", "conv_shortcut": "convolution",
    "conv_in": "convolution", "conv_out": "convolution", "time_emb_proj": "time-embedding",
    "time_embedding": "time-embedding", "add_embedding": "time-embedding", "text_projection": "text-projection",
    "token_embedding": "embedding", "position_embedding": "embedding",
}  # fmt: skip
PLAIN = "only plain LoRA (lora_A/lora_B or lora_down/lora_up matrices)"


@dataclass(frozen=True)
class Adapter:
    """One adapter, read and checked: per component and module, (A [r, in], B [out, r], scaling) in the
    file's dtype on the CPU, where scaling is what peft multiplies B @ A by (alpha / r; alpha / sqrt(r) for rsLoRA)."""

    key: str
    label: str  # the name, or the source URI
    rank: int  # its largest rank over all modules
    size: int  # bytes of the file
    layers: dict[str, dict[str, tuple[Any, Any, float]]]


class _Refused(Exception):
    """A check failed; the message is the client's (read_adapter adds the label and the field)."""


def read_adapter(path: Path, *, key: str, label: str, targets: Targets, field: str) -> Adapter:
    """Read the LoRA at `path` and check it against the slot's `targets`; InvalidRequest(field=field) if not."""
    try:
        size, metadata = _read_header(path)
        tensors = _load(path)
        layers = _convert(tensors, metadata, targets)
    except _Refused as refused:
        raise InvalidRequest(f"{field}: {label} {refused}", field=field) from None
    rank = max(a.shape[0] for component in layers.values() for a, _b, _s in component.values())
    return Adapter(key=key, label=label, rank=rank, size=size, layers=layers)


def _read_header(path: Path) -> tuple[int, dict[str, str]]:
    """Check a .safetensors header without reading a tensor; returns the file size and its __metadata__."""
    invalid = _Refused("is not a valid .safetensors file")
    try:
        with path.open("rb") as file:
            size = path.stat().st_size
            prefix = file.read(8)
            if len(prefix) < 8:
                raise invalid
            (length,) = struct.unpack("<Q", prefix)
            if length > MAX_HEADER_BYTES or 8 + length > size:
                raise invalid
            raw = file.read(length)
    except OSError as error:
        raise _Refused(f"could not be read ({error.strerror})") from None
    try:
        header = json.loads(raw)
    except (ValueError, RecursionError):  # bad UTF-8 or JSON; "[[[[..." past the parser's recursion limit
        raise invalid from None
    if not isinstance(header, dict):
        raise invalid
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise invalid
    if not header or len(header) > MAX_TENSORS:
        raise invalid
    data_bytes = size - 8 - length
    for entry in header.values():
        if not isinstance(entry, dict) or entry.get("dtype") not in DTYPE_BYTES:
            raise invalid
        shape, offsets = entry.get("shape"), entry.get("data_offsets")
        if not isinstance(shape, list) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise invalid
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(n, int) for n in offsets)):
            raise invalid
        begin, end = offsets
        if not 0 <= begin <= end <= data_bytes or end - begin != math.prod(shape) * DTYPE_BYTES[entry["dtype"]]:
            raise invalid
    return size, metadata


def _load(path: Path) -> dict[str, Any]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError):
        raise _Refused("is not a valid .safetensors file") from None


def _variant(keys: list[str], metadata: dict[str, Any] | None) -> str | None:
    """Adapters diffusers reads but applies otherwise than B @ A * scaling, or drops parts of (DoRA)."""
    flags = metadata or {}
    if any("dora_scale" in k or "lora_magnitude_vector" in k for k in keys) or any(
        k.endswith("use_dora") and v for k, v in flags.items()
    ):
        return "DoRA (a magnitude vector per module)"
    if any(".lokr_" in k or "lokr_w" in k for k in keys):
        return "LoKr"
    if any("hada_" in k for k in keys):
        return "LoHa"
    if any("lora_controlnet" in k for k in keys):
        return "Control-LoRA"
    if any(k.endswith(("lora_B.bias", "lora_up.bias", "lora.up.bias")) for k in keys) or any(
        k.endswith("lora_bias") and v for k, v in flags.items()
    ):
        return "LoRA with bias terms"
    return None


def _adapter_metadata(metadata: dict[str, str]) -> dict[str, Any] | None:
    from diffusers.loaders.lora_base import LORA_ADAPTER_METADATA_KEY

    raw = metadata.get(LORA_ADAPTER_METADATA_KEY)
    if not raw:
        return None
    try:
        parsed = json.loads(raw)
    except ValueError:
        raise _Refused("is not a LoRA diffusers can read (its lora_adapter_metadata is not JSON)") from None
    if not isinstance(parsed, dict):
        raise _Refused("is not a LoRA diffusers can read (its lora_adapter_metadata is not an object)")
    return parsed


def _convert(tensors: dict[str, Any], file_metadata: dict[str, str], targets: Targets) -> dict[str, Any]:
    """Per component, what diffusers' loaders would put into each peft layer, then the checks."""
    from types import SimpleNamespace

    from diffusers import StableDiffusionXLPipeline

    metadata = _adapter_metadata(file_metadata)
    variant = _variant(list(tensors), metadata)
    if variant:
        raise _Refused(f"is a {variant} adapter, which this server does not apply: {PLAIN}")
    # The kohya/SGM block renumbering reads only layers_per_block; the slot's targets show it.
    config = SimpleNamespace(layers_per_block=_layers_per_block(targets))
    try:
        state_dict, alphas = StableDiffusionXLPipeline.lora_state_dict(dict(tensors), unet_config=config)
        if not state_dict or not all("lora" in k for k in state_dict):
            raise _Refused("is not a LoRA diffusers can read (keys without lora_A/lora_B or lora_down/lora_up)")
        if alphas and metadata:
            raise _Refused("is not a LoRA diffusers can read (both network alphas and adapter metadata)")
        for k in state_dict:
            if k.split(".")[0] not in COMPONENTS:
                raise _Refused(f"was made for another model than SDXL (e.g. SD 1.5): {k}")
        parts = {c: _component(c, state_dict, alphas, metadata, targets.get(c, {})) for c in COMPONENTS}
        parts = {c: modules for c, modules in parts.items() if modules}
        _check(parts, targets)  # peft matches the metadata's target_modules as regexes: "(" raises re.error
    except _Refused:
        raise
    except Exception as error:  # diffusers' conversions raise anything from KeyError to ValueError
        raise _Refused(f"is not a LoRA diffusers can read ({type(error).__name__})") from None
    return {c: {m: layer for m, (layer, _config) in modules.items()} for c, modules in parts.items()}


def _layers_per_block(targets: Targets) -> int:
    indices = [int(p.split(".")[3]) for p in targets.get("unet", {}) if p.startswith("down_blocks.")]
    return max(indices) + 1 if indices else 2  # SDXL's


def _component(
    component: str,
    state_dict: dict[str, Any],
    alphas: dict[str, float] | None,
    metadata: dict[str, Any] | None,
    targets: dict[str, tuple[int, int]],
) -> dict[str, Any]:
    """Module path -> ((A, B, scaling), peft config) as diffusers' load_lora_into_unet/_text_encoder get them."""
    from diffusers.utils.peft_utils import get_peft_kwargs
    from diffusers.utils.state_dict_utils import (
        convert_state_dict_to_diffusers,
        convert_state_dict_to_peft,
        convert_unet_state_dict_to_peft,
    )
    from peft import LoraConfig

    prefix = f"{component}."
    part = {k.removeprefix(prefix): v for k, v in state_dict.items() if k.startswith(prefix)}
    if not part:
        return {}
    meta = {k.removeprefix(prefix): v for k, v in (metadata or {}).items() if k.startswith(prefix)} or None
    own_alphas = None
    if component == "unet":
        if "lora_A" not in next(iter(part)):
            part = convert_unet_state_dict_to_peft(part)
        rank = {f"^{k}": v.shape[1] for k, v in part.items() if "lora_B" in k and v.ndim > 1}
        if alphas:
            own_alphas = {k.removeprefix(prefix): v for k, v in alphas.items() if k.startswith(prefix)}
    else:
        part = convert_state_dict_to_peft(convert_state_dict_to_diffusers(part))
        if not any(p.startswith("text_model.") for p in targets):  # transformers flattened CLIPTextModel
            part = {k.removeprefix("text_model."): v for k, v in part.items()}
        rank = {
            f"{p}.lora_B.weight": part[f"{p}.lora_B.weight"].shape[1] for p in targets if f"{p}.lora_B.weight" in part
        }
        if alphas:
            own_alphas = {k.removeprefix(prefix): v for k, v in alphas.items() if k.split(".")[0] == component}
    modules: dict[str, dict[str, Any]] = {}
    for k, v in part.items():
        module, _, rest = k.partition(".lora_")
        if rest not in ("A.weight", "B.weight"):
            raise _Refused(f"is not a LoRA diffusers can read ({component}.{k})")
        modules.setdefault(module, {})[rest[0]] = v
    if not rank and meta is None:
        return {m: ((ab.get("A"), ab.get("B"), 1.0), None) for m, ab in modules.items()}  # _check refuses
    config = LoraConfig(**(meta or get_peft_kwargs(rank, own_alphas, part, is_unet=component == "unet")))
    _tame(config)
    return {m: ((ab.get("A"), ab.get("B"), _scaling(config, m)), config) for m, ab in modules.items()}


def _tame(config: Any) -> None:
    """peft matches these as regexes, and they come from the file: refuse what could backtrack for minutes
    (nested or many quantifiers) before any is matched. Module names and diffusers' "^name" pass."""
    patterns = [*config.rank_pattern, *config.alpha_pattern]
    patterns += [p for p in (config.target_modules, config.exclude_modules) if isinstance(p, str)]
    for pattern in patterns:
        if len(pattern) > 1000 or re.search(r"\)[*+?{]|[*+}][*+?{]", pattern) or len(re.findall(r"[*+{]", pattern)) > 4:
            raise _Refused(
                f"is not a LoRA diffusers can read (a module pattern this server will not match: {pattern[:60]!r})"
            )


def _rank(config: Any, module: str) -> int:
    from peft.utils.other import get_pattern_key

    return int(config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r))


def _scaling(config: Any, module: str) -> float:
    """peft's LoraModel: per-module r and alpha from the patterns, then alpha / r (or / sqrt(r): rsLoRA)."""
    from peft.utils.other import get_pattern_key

    r = _rank(config, module)
    alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
    return float(alpha / math.sqrt(r) if config.use_rslora else alpha / r)


def _kind(module: str) -> str | None:
    for part in reversed(module.split(".")):
        if part in UNCOVERED:
            return UNCOVERED[part]
    return None


def _check(parts: dict[str, dict[str, Any]], targets: Targets) -> None:
    """Wrong base first (an SD 1.5 LoCon is foremost an SD 1.5 LoRA), then kinds the slot does not cover."""
    from peft.tuners.tuners_utils import check_target_module_exists

    uncovered: list[tuple[str, str]] = []
    for component, modules in parts.items():
        for module, ((a, b, _scaling), config) in list(modules.items()):
            name = f"{component}.{module}"
            if a is None or b is None:
                raise _Refused(f"is not a LoRA diffusers can read ({name} lacks lora_A or lora_B)")
            shape = targets.get(component, {}).get(module)
            if shape is None:
                kind = _kind(module)
                if kind is None:
                    raise _Refused(f"was made for another model than SDXL (e.g. SD 1.5): {name}")
                uncovered.append((kind, name))
                continue
            if a.ndim != 2 or b.ndim != 2 or a.shape[1] != shape[0] or b.shape[0] != shape[1]:
                raise _Refused(f"was made for another model than SDXL (e.g. SD 1.5): {name}")
            if a.shape[0] != b.shape[1] or a.shape[0] == 0:
                raise _Refused(f"is not a LoRA diffusers can read ({name}: lora_A and lora_B ranks differ)")
            if not (_finite(a) and _finite(b)):  # one NaN makes every image black
                raise _Refused(f"has weights that are not finite numbers (NaN or infinity): {name}")
            if config is not None and not check_target_module_exists(config, module):
                del modules[module]  # peft does not inject it, so diffusers drops its weights too
            elif config is not None and _rank(config, module) != a.shape[0]:  # peft's load would fail
                said = _rank(config, module)
                raise _Refused(f"is not a LoRA diffusers can read ({name}: rank {a.shape[0]}, its config says {said})")
    if uncovered:
        kind, name = uncovered[0]
        raise _Refused(
            f"targets {kind} layers (e.g. {name}), which this server does not adapt: "
            "only attention, feed-forward and projection layers (kohya's default LoRA)"
        )
    # Kept in the file's dtype (F16, BF16 or F32): the slot casts to its own on the one copy to the device.
    # Widening to float32 here took three quarters of a read and doubled the host memory of every cached adapter.
    for modules in parts.values():
        for module, ((a, b, scaling), config) in modules.items():
            modules[module] = ((a.contiguous(), b.contiguous(), scaling), config)
    if not any(parts.values()):
        raise _Refused("is not a LoRA diffusers can read (no layer the base has)")


def _finite(tensor: Any) -> bool:
    """No NaN or infinity in `tensor`: its min and max are finite (NaN propagates into both). One pass, and on a
    CPU about 30x faster than isfinite().all() on fp16, which widens every element (bench/lora.py's read)."""
    import torch

    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low)) and bool(torch.isfinite(high))
