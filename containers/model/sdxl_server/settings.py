"""Server settings, read once from the environment (Vertex AI sets the AIP_* ones, Cloud Run sets PORT)."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from sdxl_server.errors import SettingsError
from sdxl_server.lora.sources import AllowList, parse_preloaded
from sdxl_server.optimize import LEVELS
from sdxl_server.schema import MAX_SIDE, MIN_SIDE, SIDE_STEP

MB = 1_000_000
# Vertex AI documents "1.5 MB" for a shared public endpoint; the decimal reading is the safe one.
VERTEX_SHARED_PAYLOAD_BYTES = 1_500_000


def _parse_bool(raw: str) -> bool:
    value = raw.strip().lower()
    if value in {"1", "true", "yes", "on"}:
        return True
    if value in {"0", "false", "no", "off", ""}:
        return False
    raise ValueError("expected 1/0, true/false, yes/no or on/off")


def _parse_sizes(raw: str) -> tuple[tuple[int, int], ...]:
    """'1024x1024,768x1344' -> ((1024, 1024), (768, 1344)); 'none' or '' -> ()."""
    raw = raw.strip().lower()
    if raw in {"", "none", "off"}:
        return ()
    sizes = []
    for part in raw.split(","):
        width, sep, height = part.strip().partition("x")
        if not sep or not width.isdigit() or not height.isdigit():
            raise ValueError(f"{part!r} is not WIDTHxHEIGHT")
        size = (int(width), int(height))
        if not all(MIN_SIDE <= side <= MAX_SIDE and side % SIDE_STEP == 0 for side in size):
            raise ValueError(f"{part!r}: each side must be a multiple of {SIDE_STEP} from {MIN_SIDE} to {MAX_SIDE}")
        sizes.append(size)
    return tuple(sizes)


def _refiner(raw: str) -> str:
    # The words are case-insensitive; folders and repo ids are not (they are checked when loading).
    value = raw.strip()
    return value.lower() if value.lower() in {"off", "tiny", "random"} else value


def _lora_sources(raw: str) -> str:
    """SDXL_LORA_SOURCES checked at start (a malformed prefix fails it) and kept as its canonical text:
    the prefixes comma-joined, each ending in '/'; '' when it names none."""
    return ",".join(AllowList.parse(raw).prefixes)


def _loras(raw: str) -> str:
    """SDXL_LORAS checked at start (names, sources, duplicates) and kept as given; '' when it names none."""
    return raw.strip() if parse_preloaded(raw) else ""


def _between(low: int, high: int) -> Callable[[str], int]:
    def parse(raw: str) -> int:
        value = int(raw)
        if not low <= value <= high:
            raise ValueError(f"must be from {low} to {high}")
        return value

    return parse


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        value = raw.strip().lower()
        if value not in allowed:
            raise ValueError(f"expected one of {', '.join(allowed)}")
        return value

    return parse


def _at_least(minimum: float, kind: Callable[[str], Any]) -> Callable[[str], Any]:
    def parse(raw: str) -> Any:
        value = kind(raw)
        if value < minimum:
            raise ValueError(f"must be at least {minimum}")
        return value

    return parse


def _positive(kind: Callable[[str], Any]) -> Callable[[str], Any]:
    return _at_least(1, kind) if kind is int else _at_least(0.001, kind)


@dataclass(frozen=True)
class Settings:
    """Everything the server can be told; each field has an env var (`env` metadata) and a default."""

    http_port: int = 8080
    host: str = "0.0.0.0"  # Vertex AI connects from outside the container; the local target passes 127.0.0.1
    health_route: str = "/health"
    predict_route: str = "/predict"
    storage_uri: str = ""
    model: str = ""
    vae: str = "auto"
    refiner: str = "off"  # SDXL_REFINER: off, tiny, random, a folder, gs:// or a Hub id (refiner.load_refiner)
    device: str = "auto"
    dtype: str = "auto"
    queue_size: int = 4
    time_limit_s: float = 55.0
    max_request_bytes: int = VERTEX_SHARED_PAYLOAD_BYTES
    max_response_bytes: int = VERTEX_SHARED_PAYLOAD_BYTES
    max_images: int = 4
    # Slow or stalled clients: how long request headers and then the body may take to arrive, how long
    # an idle keep-alive connection stays open, and how many connections are served at once (more are
    # answered 503 and closed). A stalled client holds a connection for one of these timeouts at most.
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_s: int = 5
    max_connections: int = 256
    warmup: tuple[tuple[int, int], ...] | None = None  # None: the model's native size
    cache_dir: Path = Path.home() / ".cache" / "sdxl_server"
    log_prompts: bool = False
    optimize: str = "auto"
    compile_cache: str = ""  # a folder, or gs://bucket/folder restored at start; "" means cache_dir/compile
    # LoRA (issue 16). lora_sources and loras are the variables' text, validated when read: the service
    # parses them with lora.sources' AllowList.parse and parse_preloaded (which cannot fail on them then).
    lora_sources: str = ""  # SDXL_LORA_SOURCES, canonical: "gs://b/loras/,hf://org/"
    loras: str = ""  # SDXL_LORAS: "name=source,..."
    lora_max_bytes: int = 1_000_000_000  # one adapter file
    lora_max_rank: int = 64  # the slot's rank: the sum of a request's adapters' ranks must fit in it
    lora_cache_bytes: int = 10_000_000_000  # the disk cache under cache_dir/loras
    lora_memory: int = 8  # adapters kept converted on the device (preloaded ones not counted)

    @property
    def model_source(self) -> str:
        """SDXL_MODEL if set, else the Vertex AI artifact copy, else the tiny test model."""
        return self.model or self.storage_uri or "tiny"

    @property
    def lora_enabled(self) -> bool:
        """LoRA is on when the operator allowed sources or preloaded adapters; off, a request naming one is a 403."""
        return bool(self.lora_sources or self.loras)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read settings from `environ` (default os.environ); a bad value raises SettingsError naming it."""
        environ = os.environ if environ is None else environ
        if not environ.get("AIP_HTTP_PORT") and environ.get("PORT"):
            # Cloud Run (and most container hosts) say the port in PORT; Vertex AI's AIP_HTTP_PORT wins when
            # both are set. The mapping is copied so a bad PORT is named as PORT, not AIP_HTTP_PORT.
            environ = {**environ, "AIP_HTTP_PORT": environ["PORT"]}
            port_var = "PORT"
        else:
            port_var = "AIP_HTTP_PORT"
        values: dict[str, Any] = {}
        for field in fields(cls):
            var, parse = _ENV[field.name]
            raw = environ.get(var)
            var = port_var if field.name == "http_port" else var
            if raw is None or (raw == "" and field.name not in {"storage_uri", "model"}):
                continue
            try:
                values[field.name] = parse(raw)
            except ValueError as exc:
                raise SettingsError(f"{var}={raw!r} is invalid: {exc}", field=var) from None
        for route in ("health_route", "predict_route"):
            if route in values and not values[route].startswith("/"):
                var = _ENV[route][0]
                raise SettingsError(f"{var}={values[route]!r} is invalid: must start with '/'", field=var)
        return cls(**values)


_ENV: dict[str, tuple[str, Callable[[str], Any]]] = {
    "http_port": ("AIP_HTTP_PORT", _between(1, 65535)),
    "host": ("SDXL_HOST", str),
    "health_route": ("AIP_HEALTH_ROUTE", str),
    "predict_route": ("AIP_PREDICT_ROUTE", str),
    "storage_uri": ("AIP_STORAGE_URI", str),
    "model": ("SDXL_MODEL", str),
    "vae": ("SDXL_VAE", str),
    "refiner": ("SDXL_REFINER", _refiner),
    "device": ("SDXL_DEVICE", str),
    "dtype": ("SDXL_DTYPE", _choice("auto", "fp16", "bf16", "fp32")),
    "queue_size": ("SDXL_QUEUE_SIZE", _at_least(0, int)),
    "time_limit_s": ("SDXL_TIME_LIMIT", _positive(float)),
    "max_request_bytes": ("SDXL_MAX_REQUEST_BYTES", _positive(int)),
    "max_response_bytes": ("SDXL_MAX_RESPONSE_BYTES", _positive(int)),
    "max_images": ("SDXL_MAX_IMAGES", _positive(int)),
    "header_timeout_s": ("SDXL_HEADER_TIMEOUT", _positive(float)),
    "body_timeout_s": ("SDXL_BODY_TIMEOUT", _positive(float)),
    "keep_alive_s": ("SDXL_KEEP_ALIVE", _positive(int)),
    "max_connections": ("SDXL_MAX_CONNECTIONS", _at_least(2, int)),
    "warmup": ("SDXL_WARMUP", _parse_sizes),
    "cache_dir": ("SDXL_CACHE_DIR", Path),
    "log_prompts": ("SDXL_LOG_PROMPTS", _parse_bool),
    "optimize": ("SDXL_OPTIMIZE", _choice("auto", *LEVELS)),
    "compile_cache": ("SDXL_COMPILE_CACHE", str),
    "lora_sources": ("SDXL_LORA_SOURCES", _lora_sources),
    "loras": ("SDXL_LORAS", _loras),
    "lora_max_bytes": ("SDXL_LORA_MAX_BYTES", _positive(int)),
    "lora_max_rank": ("SDXL_LORA_MAX_RANK", _between(1, 1024)),
    "lora_cache_bytes": ("SDXL_LORA_CACHE_BYTES", _positive(int)),
    "lora_memory": ("SDXL_LORA_MEMORY", _positive(int)),
}
