"""LoRA adapters on sdxlctl's side: --lora flags as the request's `parameters.lora`, the server's refusals
mapped back to the flag, the local checks and the content-addressed name of `sdxlctl lora push`, and the
LoRA part of `sdxlctl status`.

Plain data in, plain data out: the config's lists are passed in, so this module sits below the targets.
The server is the authority on every rule (sdxl_server/lora/sources.py); what is checked here is only what
can be refused before a request or an upload, with a fix the server could not give (a flag, a file).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeGuard

from sdxlctl.errors import PredictError, SdxlctlError, UsageError

MAX_ADAPTERS = 3  # the server's MAX_ADAPTERS: more is a usage error before any request
MAX_SCALE = 4.0  # the server's -4 <= scale <= 4
MAX_BYTES = 1_000_000_000  # the server's default SDXL_LORA_MAX_BYTES
MAX_HEADER_BYTES = 100_000_000  # the server refuses a larger safetensors header
DTYPES = {"F16": 2, "BF16": 2, "F32": 4}  # what the server reads, and the bytes of one number
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
FLAG = "SOURCE[:SCALE]"
_FIELD = re.compile(r"^parameters\.lora(?:_id)?(?:\[(\d+)\])?")


@dataclass(frozen=True)
class Flag:
    """One --lora as given, and what it sends."""

    text: str
    entry: dict[str, Any]  # {"source": ..., "scale": ...} or {"name": ..., "scale": ...}

    @property
    def label(self) -> str:
        return str(self.entry.get("source") or self.entry.get("name"))


def parse_flag(text: str) -> Flag:
    """gs://b/x.safetensors:0.7, org/repo, hf://org/repo@rev/x.safetensors, pixel-art:0.8 -> a Flag.

    SCALE is the text after the LAST ':' when it reads as a number, so the scheme's ':' never counts.
    """
    given = text.strip()
    head, colon, tail = given.rpartition(":")
    scale = 1.0
    if colon and _number(tail):
        given, scale = head, float(tail)
        if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
            raise UsageError(
                f"--lora {text}: scale {tail} is not between -{MAX_SCALE:g} and {MAX_SCALE:g}",
                hint="e.g. --lora pixel-art:0.8 (1 is the adapter as trained, 0 turns it off)",
            )
    if not given:
        raise UsageError(f"--lora {text!r}: no adapter given", hint=f"--lora {FLAG}, e.g. --lora pixel-art:0.8")
    if "://" in given:
        return Flag(text, {"source": given, "scale": scale})
    if given.startswith(("/", ".", "~")) or "\\" in given:
        raise UsageError(
            f"--lora {text}: a local file is not a source the server can fetch",
            hint="copy it to your bucket with `sdxlctl lora push FILE` (it prints the --lora to use), "
            'or preload it: [model] loras = { name = "/abs/path.safetensors" } (target local)',
        )
    if "/" in given:  # a Hub repo id, as Model Garden's lora_id gives it
        return Flag(text, {"source": f"hf://{given}", "scale": scale})
    name = given.lower()
    if not NAME.fullmatch(name):
        raise UsageError(
            f"--lora {text}: {given!r} is neither a source (gs://..., hf://..., ORG/REPO) nor an adapter name",
            hint="names are [model] loras keys: letters, digits, '.', '_' and '-'",
        )
    return Flag(text, {"name": name, "scale": scale})


def _number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return bool(text.strip())


def parse_flags(texts: list[str] | tuple[str, ...]) -> tuple[Flag, ...]:
    """Every --lora, checked together: at most MAX_ADAPTERS, none twice."""
    if len(texts) > MAX_ADAPTERS:
        raise UsageError(
            f"--lora given {len(texts)} times: a request takes at most {MAX_ADAPTERS} adapters",
            hint="drop one; the server combines at most three into its one prepared slot",
        )
    flags = tuple(parse_flag(text) for text in texts)
    seen: dict[str, Flag] = {}
    for flag in flags:
        if flag.label in seen:
            raise UsageError(
                f"--lora {flag.text}: the same adapter as --lora {seen[flag.label].text}",
                hint="give it once, with the sum of the scales",
            )
        seen[flag.label] = flag
    return flags


def parameters(flags: tuple[Flag, ...]) -> dict[str, Any]:
    """The request's LoRA parameters: {"lora": [...]} or nothing (the request stays as it was)."""
    return {"lora": [dict(flag.entry) for flag in flags]} if flags else {}


# ---------------------------------------------------------------- the server's refusals


def explained(error: SdxlctlError, flags: tuple[Flag, ...]) -> SdxlctlError:
    """A refusal naming parameters.lora[i] (local: the answer's field; Vertex AI: its JSON in the message)
    as the --lora flag it came from, with sdxlctl's fix; any other error as it is."""
    if not flags:
        return error
    status, field, message = _refusal(error)
    found = _FIELD.match(field or "")
    if found is None:
        return error
    index = found.group(1)
    flag = flags[int(index)] if index is not None and int(index) < len(flags) else None
    which = f"--lora #{int(index or 0) + 1} ({flag.text})" if flag else "--lora"
    message = message.removeprefix(f"{field}: ")  # the flag names the place instead
    return PredictError(f"{which}: the server answered {status}: {message}", hint=_hint(status, message, flag))


def _refusal(error: SdxlctlError) -> tuple[int | str, str | None, str]:
    """(status, field, message) of a server's JSON error carried by `error`."""
    field = getattr(error, "field", None)
    if field is not None:  # the local client's Refused
        return getattr(error, "status", "an error"), field, getattr(error, "server_message", error.message)
    start = error.message.find("{")  # Vertex AI passes the server's body on in its message
    try:
        body = json.loads(error.message[start:]) if start >= 0 else None
    except ValueError:
        return "an error", None, error.message
    inner = body.get("error") if isinstance(body, dict) else None
    if not isinstance(inner, dict) or not isinstance(inner.get("field"), str):
        return "an error", None, error.message
    return inner.get("code", "an error"), inner["field"], str(inner.get("message", "")).strip()


def _hint(status: int | str, message: str, flag: Flag | None) -> str | None:
    """sdxlctl's way to what the server asks of its operator (who is usually the one running sdxlctl)."""
    named = flag is not None and "name" in flag.entry
    if "are off on this server" in message or "not allowed on this server" in message:
        if named:
            return 'preload it: [model] loras = { NAME = "gs://BUCKET/loras/FILE.safetensors" }, then `sdxlctl deploy`'
        return 'allow its prefix: [model] lora_sources = ["gs://BUCKET/loras/"] in sdxlctl.toml, then `sdxlctl deploy`'
    if "not under an allowed prefix" in message:
        return (
            "add its prefix to [model] lora_sources and deploy again, "
            "or copy the file under an allowed one: `sdxlctl lora push FILE`"
        )
    if "SDXL_LORA_MAX_RANK" in message:
        return "use fewer adapters, or raise [model] lora_max_rank and deploy again"
    if "no preloaded adapter" in message:
        return "name one of those, or add it to [model] loras and deploy again"
    if status == 502:
        return "the server could not fetch it; `sdxlctl logs` shows why"
    return None


# ---------------------------------------------------------------- lora push


@dataclass(frozen=True)
class LocalAdapter:
    """A local .safetensors file checked for upload, and its content-addressed object name."""

    path: Path
    size: int
    sha256: str

    @property
    def object_name(self) -> str:
        """<stem>-<sha256 first 12 hex>.safetensors: the same bytes always land on the same name."""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "-", self.path.name[: -len(".safetensors")]).strip(".-") or "lora"
        return f"{stem[:80]}-{self.sha256[:12]}.safetensors"


def check_file(path: Path) -> LocalAdapter:
    """The file as the server will check it, as far as its header goes: a .safetensors LoRA within 1 GB.

    Only the 8-byte length and the JSON header are parsed (never a tensor, never pickle); the bytes are
    hashed for the name.
    """
    where = f"lora push {path}"
    if not path.name.endswith(".safetensors"):
        raise UsageError(
            f"{where}: only .safetensors files are taken (never pickle: .bin, .ckpt, .pt are refused)",
            hint="convert it with safetensors (e.g. diffusers' save_lora_weights writes .safetensors)",
        )
    if not path.is_file():
        raise UsageError(f"{where}: no such file", hint="give the path of a .safetensors file")
    size = path.stat().st_size
    if size > MAX_BYTES:
        raise UsageError(
            f"{where}: {size / 1e9:.2f} GB is over the server's 1 GB limit for an adapter (SDXL_LORA_MAX_BYTES)",
            hint="a LoRA of SDXL is rarely over 1 GB: is this a full model? Save only the LoRA weights",
        )
    with path.open("rb") as file:
        problem = _header_problem(file.read(8), file, size)
        if problem:
            raise UsageError(
                f"{where}: not a valid .safetensors file ({problem})", hint="save it again with safetensors"
            )
        file.seek(0)
        digest = hashlib.sha256()
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return LocalAdapter(path, size, digest.hexdigest())


def _header_problem(prefix: bytes, file: Any, size: int) -> str:
    """What is wrong with the safetensors header that follows `prefix` in `file`; "" when it is sound."""
    if len(prefix) < 8:
        return "shorter than its 8-byte header length"
    (length,) = struct.unpack("<Q", prefix)
    if length > MAX_HEADER_BYTES or 8 + length > size:
        return f"a header of {length} bytes in a file of {size}"
    try:
        header = json.loads(file.read(length))
    except (UnicodeDecodeError, ValueError):
        return "its header is not JSON"
    if not isinstance(header, dict):
        return "its header is not a JSON object"
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for key, info in tensors.items():
        if not isinstance(info, dict) or info.get("dtype") not in DTYPES:
            dtype = info.get("dtype") if isinstance(info, dict) else None
            return f"{key}: dtype {dtype}, where the server reads only {', '.join(sorted(DTYPES))}"
        offsets, shape = info.get("data_offsets"), info.get("shape")
        if not (_counts(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1] and _counts(shape)):
            return f"{key}: no data_offsets [begin, end] and shape of whole numbers"
        held, wanted = offsets[1] - offsets[0], math.prod(shape) * DTYPES[info["dtype"]]
        if held != wanted:  # the safetensors library refuses such a file, so the server does
            return f"{key}: shape {shape} of {info['dtype']} is {wanted} bytes, its offsets hold {held}"
        end = max(end, offsets[1])
    if end != size - 8 - length:
        return f"its tensors cover {end} bytes of {size - 8 - length}"
    if not any("lora" in key.lower() for key in tensors):
        return "no LoRA weights in it (no key names lora): a full model or another kind of file?"
    return ""


def _counts(value: Any) -> TypeGuard[list[int]]:
    """A JSON list of whole numbers >= 0 (JSON's true is no number)."""
    return isinstance(value, list) and all(type(item) is int and item >= 0 for item in value)


def first_gs_prefix(prefixes: list[str], config_file: Path | None = None) -> str:
    """Where `lora push` uploads: the first gs:// prefix of [model] lora_sources, ending in '/'.
    `config_file`: the file the config was read from, named in the fix (None: no file, sdxlctl.toml)."""
    for prefix in prefixes:
        if prefix.startswith("gs://"):
            return prefix if prefix.endswith("/") else prefix + "/"
    raise UsageError(
        "lora push uploads under the first gs:// prefix of [model] lora_sources, and there is none",
        hint=f"add one to {config_file or 'sdxlctl.toml'}: "
        '[model] lora_sources = ["gs://BUCKET/loras/"], then `sdxlctl deploy`',
    )


def status(prefixes: list[str], preloaded: dict[str, str], health: dict[str, Any] | None) -> dict[str, Any] | None:
    """The LoRA part of `sdxlctl status`; None when LoRA is off (status then says nothing of it).

    `health` is the local server's health body, when there is one: its "lora" object says what it has cached.
    """
    if not prefixes and not preloaded:
        return None
    shown: dict[str, Any] = {"sources": list(prefixes), "preloaded": sorted(preloaded)}
    served = (health or {}).get("lora")
    if isinstance(served, dict) and isinstance(served.get("cached"), list):
        shown["cached"] = [entry for entry in served["cached"] if isinstance(entry, dict)]
    return shown
