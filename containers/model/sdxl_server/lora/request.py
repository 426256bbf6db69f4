"""parameters.lora and parameters.lora_id: which adapters a request asks for, parsed and checked on their own.

What needs the server's settings (the allow-list, the preloaded names, fetching, ranks) is the service's; this
module only refuses what no server would take, so a malformed source never reaches the allow-list.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr, ValidationError

from sdxl_server.errors import InvalidRequest
from sdxl_server.lora.sources import MAX_ADAPTERS, NAME, Source, SourceError, parse_source

MIN_LORA_SCALE, MAX_LORA_SCALE = -4, 4
LORA_SHAPE = (
    'an object {"source": "gs://BUCKET/PATH.safetensors" or "hf://ORG/REPO", "scale": 0.8} or '
    '{"name": "A-PRELOADED-NAME", "scale": 0.8}'
)


class LoraItem(BaseModel):
    """One adapter of parameters.lora: a source (fetched, under SDXL_LORA_SOURCES) or a preloaded name."""

    model_config = ConfigDict(extra="forbid")

    source: StrictStr | None = None
    name: StrictStr | None = None
    scale: Annotated[StrictFloat | StrictInt, Field(ge=MIN_LORA_SCALE, le=MAX_LORA_SCALE)] = 1.0
    weight_name: StrictStr | None = None  # the file in a gs:// folder or a Hub repo


@dataclass(frozen=True)
class LoraRef:
    """One adapter a request asks for, its source parsed (not yet allowed: the service checks SDXL_LORA_SOURCES)."""

    field: str  # "parameters.lora[0]" (or "parameters.lora_id"), for error messages
    scale: float
    source: Source | None = None
    name: str | None = None  # a preloaded adapter's name, lower case


def lora_refs(lora: Any, lora_id: Any) -> tuple[LoraRef, ...]:
    """parameters.lora (one object or a list of 1..3) or parameters.lora_id, parsed; InvalidRequest names the
    field. Sources are parsed here, so a malformed one is refused before anything else happens."""
    if lora is not None and lora_id not in (None, ""):
        raise InvalidRequest(
            "parameters.lora_id: give either lora or lora_id (Model Garden's alias for one source at scale 1), "
            "not both",
            field="parameters.lora_id",
        )
    if lora is None:
        return _lora_id(lora_id)
    items = [lora] if isinstance(lora, dict) else lora
    if not isinstance(items, list) or not 1 <= len(items) <= MAX_ADAPTERS:
        raise _not_a_list(items)
    refs: list[LoraRef] = []
    seen: dict[str, int] = {}
    for index, item in enumerate(items):
        ref = _lora_item(f"parameters.lora[{index}]", item)
        key = ref.source.uri if ref.source is not None else f"name:{ref.name}"
        if key in seen:
            label = ref.name if ref.source is None else ref.source.uri
            raise InvalidRequest(
                f"{ref.field}: the same adapter as parameters.lora[{seen[key]}] ({label}): "
                "give it once, with the sum of the scales",
                field=ref.field,
            )
        seen[key] = index
        refs.append(ref)
    return tuple(refs)


def check_count(parameters: Any) -> None:
    """A list of more than MAX_ADAPTERS adapters, refused before the body is walked or validated (as the
    instances are counted first): a list of 100,000 would otherwise cost every check a pass over it."""
    lora = parameters.get("lora") if isinstance(parameters, dict) else None
    if isinstance(lora, list) and len(lora) > MAX_ADAPTERS:
        raise _not_a_list(lora)


def _not_a_list(items: Any) -> InvalidRequest:
    count = f" ({len(items)} given)" if isinstance(items, list) else ""
    return InvalidRequest(
        f"parameters.lora: {LORA_SHAPE}, or a list of 1 to {MAX_ADAPTERS} of them{count}", field="parameters.lora"
    )


def _lora_id(lora_id: Any) -> tuple[LoraRef, ...]:
    # "" is no adapter, as Model Garden's container reads it (`if lora_id:`).
    if lora_id in (None, ""):
        return ()
    field = "parameters.lora_id"
    if not isinstance(lora_id, str):
        raise InvalidRequest(f"{field}: must be a string: a Hub id (ORG/REPO) or a gs:// source", field=field)
    try:
        return (LoraRef(field=field, scale=1.0, source=parse_source(lora_id)),)
    except SourceError as exc:
        raise InvalidRequest(f"{field}: {exc}", field=field) from None


def _lora_item(field: str, item: Any) -> LoraRef:
    if not isinstance(item, dict):
        raise InvalidRequest(f"{field}: must be {LORA_SHAPE}", field=field)
    try:
        parsed = LoraItem.model_validate(item)
    except ValidationError as exc:
        sub, message = _describe(exc.errors(include_url=False)[0])
        raise InvalidRequest(f"{field}.{sub}: {message}", field=f"{field}.{sub}") from None
    if (parsed.source is None) == (parsed.name is None):
        raise InvalidRequest(f"{field}: give exactly one of source and name: {LORA_SHAPE}", field=field)
    scale = float(parsed.scale)
    if parsed.name is not None:
        name = parsed.name.strip().lower()
        if parsed.weight_name is not None:
            raise InvalidRequest(
                f"{field}.weight_name: only with a source (a preloaded adapter's file is chosen by the operator)",
                field=f"{field}.weight_name",
            )
        if not NAME.fullmatch(name):
            raise InvalidRequest(
                f"{field}.name: not a preloaded adapter's name (1 to 64 letters, digits, '.', '_' or '-')",
                field=f"{field}.name",
            )
        return LoraRef(field=field, scale=scale, name=name)
    try:
        source = parse_source(parsed.source or "", weight_name=parsed.weight_name)
    except SourceError as exc:
        raise InvalidRequest(f"{field}.{exc.part}: {exc}", field=f"{field}.{exc.part}") from None
    return LoraRef(field=field, scale=scale, source=source)


def _describe(error: Any) -> tuple[str, str]:
    """A LoraItem error as (its field, what is wrong); pydantic's union branch names are dropped."""
    sub = str(error["loc"][0]) if error["loc"] else ""
    if error["type"] == "extra_forbidden":
        return sub, "unknown field"
    if sub == "scale":
        return sub, f"must be a number from {MIN_LORA_SCALE} to {MAX_LORA_SCALE}"
    return sub, str(error["msg"])
