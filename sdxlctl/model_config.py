"""[model] of sdxlctl.toml: what the model server loads and serves, and the checks that need more than one key."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from sdxlctl import lora_sources as rules
from sdxlctl.errors import ConfigError


class Section(BaseModel):
    """Unknown keys are refused: a typo must not silently fall back to a default."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


class Model(Section):
    """What the model server loads and how it serves."""

    source: str = Field("tiny", description="tiny | random-sdxl | local folder | Hub repo id | gs:// folder")
    vae: str = Field("auto", description="auto | model | a VAE source")
    dtype: Literal["auto", "fp16", "bf16", "fp32"] = "auto"
    queue_size: int = Field(4, ge=0, le=1000)
    time_limit_s: float = Field(55.0, gt=0, le=3600)
    max_images: int = Field(4, ge=1, le=16)
    optimize: Literal["auto", "none", "eager", "compile", "max"] = Field(
        "auto", description="the fast path: auto (compile on a GPU, none on a CPU), none, eager, compile, max"
    )
    warmup: list[str] = Field(
        default_factory=list,
        description="sizes warmed up (and compiled) before the server reports ready, as WIDTHxHEIGHT; "
        "empty: the model's native size",
    )
    bake: bool = Field(
        False,
        description="fetch the weights of `source` (a Hub repo id or a gs:// folder) into the server image at build "
        "time, so that a replica starts without downloading them",
    )
    compile_cache: str = Field(
        "auto",
        description="where compiled code is kept: auto, none, a gs:// folder, or a folder the server can reach",
    )
    refiner: str = Field("off", description="off | tiny | random | Hub repo id | folder | gs:// folder")
    lora_sources: list[str] = Field(
        default_factory=list,
        description="where requests may fetch LoRA adapters from: gs://BUCKET/FOLDER/, hf://ORG/ or hf://ORG/REPO; "
        "empty: a request naming a source is refused (403)",
    )
    loras: dict[str, str] = Field(
        default_factory=dict,
        description='LoRA adapters loaded at start, by name (requests ask for {"name": ...}): a gs:// or Hub source, '
        "or with target local a file or folder on this machine",
    )
    lora_max_rank: int = Field(
        64, ge=1, le=rules.MAX_RANK, description="the rank a request's adapters may add up to (prepared at start)"
    )

    @field_validator("warmup", mode="before")
    @classmethod
    def _sizes(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment: "1024x1024,768x1344"
            value = [part for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            return value
        for size in value:
            width, _, height = str(size).strip().lower().partition("x")
            sides = [int(side) if side.isdigit() else 0 for side in (width, height)]
            if not all(64 <= side <= 2048 and side % 8 == 0 for side in sides):
                raise ValueError(f"{size!r} is not WIDTHxHEIGHT with sides multiples of 8 from 64 to 2048")
        return [str(size).strip().lower() for size in value]

    @field_validator("refiner")
    @classmethod
    def _refiner(cls, value: str) -> str:
        value = value.strip()
        if value.lower() in ("off", "tiny", "random"):
            return value.lower()
        if value in ("gs://", "", "random-sdxl") or value.startswith("gs:///"):
            raise ValueError(
                "expected off, tiny, random (random-sdxl is the base's), a Hub repo id, a folder, or gs://bucket/folder"
            )
        return value.rstrip("/") if value.startswith("gs://") else value  # a Hub id or a folder: as `source`

    @field_validator("lora_sources", mode="before")
    @classmethod
    def _lora_sources(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment: "gs://b/loras/,hf://org/"
            value = [part.strip() for part in value.split(",") if part.strip()]
        if not isinstance(value, list):
            return value
        prefixes = [rules.check_prefix(str(entry).strip()) for entry in value]
        return list(dict.fromkeys(prefixes))

    @field_validator("loras", mode="before")
    @classmethod
    def _loras(cls, value: Any) -> Any:
        if isinstance(value, str):  # from the environment, as the server's SDXL_LORAS: "pixel=gs://...,ink=org/repo"
            entries = [part.strip() for part in value.split(",") if part.strip()]
            if bad := [entry for entry in entries if "=" not in entry]:
                raise ValueError(f"{bad[0]!r} is not NAME=SOURCE (e.g. pixel-art=gs://bucket/loras/pixel.safetensors)")
            value = dict(entry.split("=", 1) for entry in entries)
        if not isinstance(value, dict):
            return value
        loras: dict[str, str] = {}
        for name, source in value.items():
            key = rules.check_name(str(name))
            if key in loras:
                raise ValueError(f"{key!r} is named twice (names are not case-sensitive); each name once")
            if not isinstance(source, str):
                raise ValueError(f'{key}: the source must be a string, e.g. "gs://bucket/loras/{key}.safetensors"')
            text = source.strip()
            try:
                if not rules.is_local_path(text):  # a file is checked once the target is known (check_model)
                    rules.check_source(text, allow_files=True)
                elif "," in text:
                    raise ValueError(f"{text!r}: a ',' cannot travel in SDXL_LORAS; rename the file")
            except ValueError as exc:
                raise ValueError(f"{key}: {exc}") from None
            loras[key] = text
        return loras

    @field_validator("compile_cache")
    @classmethod
    def _cache(cls, value: str) -> str:
        value = value.strip()
        if value in {"auto", "none"} or value.startswith("/"):
            return value
        if value.startswith("gs://") and len(value) > len("gs://") and not value.startswith("gs:///"):
            return value.rstrip("/")
        raise ValueError("expected auto, none, a gs://bucket/folder, or an absolute folder path")


def check_model(
    model: Model, source: str, from_env: dict[tuple[str, ...], str], *, local: bool, home: Path | None
) -> Model:
    """What needs more than one key: bake and refiner against source; files among [model] loras against the
    target. Returns [model] with those files as the absolute paths the server takes (relative: to `home`'s
    folder, the config file's)."""
    if model.bake:
        _check_bake(model, source, from_env)
    _check_refiner(model, source, from_env)
    return _check_lora_files(model, source, from_env, local=local, home=home)


_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # as the server tells a Hub id (owner/name) from a path


def _check_bake(model: Model, source: str, from_env: dict[tuple[str, ...], str]) -> None:
    """A build can fetch from the Hub or gs://; not from this machine's folders, and tiny/random have no files."""
    if model.source.startswith("gs://") or (_REPO_ID.match(model.source) and not Path(model.source).exists()):
        return
    where = f"{from_env[('model', 'bake')]} (environment)" if ("model", "bake") in from_env else source
    if model.source in ("tiny", "random-sdxl"):
        why = f"{model.source!r} is built in code: there are no weights to bake"
        hint = "set [model] source to a Hub repo id or a gs:// folder, or bake = false"
    else:
        why = f"{model.source!r} is a folder on this machine, which Cloud Build cannot read"
        hint = f"copy it to a bucket (gcloud storage cp -r {model.source} gs://BUCKET/sdxl) and set source to that"
    raise ConfigError(
        f"{where}: [model] bake = true needs [model] source to be a Hub repo id or a gs:// folder; {why}", hint=hint
    )


def _check_refiner(model: Model, source: str, from_env: dict[tuple[str, ...], str]) -> None:
    """The refiner shares the base's VAE and text encoder 2: sizes must match (a folder's: the server tells)."""
    full_size = model.refiner == "random" or (_REPO_ID.match(model.refiner) and not Path(model.refiner).exists())
    if (model.refiner == "tiny") == (model.source == "tiny") or not (model.refiner == "tiny" or full_size):
        return
    where = f"{from_env[('model', 'refiner')]} (environment)" if ("model", "refiner") in from_env else source
    why, hint = (
        ("the tiny refiner is made for the tiny base", "set [model] refiner to a Hub repo id, or random")
        if model.refiner == "tiny"
        else ("a full-size refiner cannot share the tiny base's VAE and text encoder", 'set refiner = "tiny"')
    )
    message = f"{where}: [model] refiner = {model.refiner!r} does not fit source = {model.source!r}: {why}"
    raise ConfigError(message, hint=hint)


def _check_lora_files(
    model: Model, source: str, from_env: dict[tuple[str, ...], str], *, local: bool, home: Path | None
) -> Model:
    """A file in [model] loras reaches only a server on this machine; there it is given as an absolute path."""
    files = {name: text for name, text in model.loras.items() if rules.is_local_path(text)}
    if not files:
        return model
    where = f"{from_env[('model', 'loras')]} (environment)" if ("model", "loras") in from_env else source
    name, text = next(iter(files.items()))
    if not local:
        raise ConfigError(
            f"{where}: [model] loras: {name} = {text!r} is a file on this machine, which the model server on "
            "Vertex AI cannot read",
            hint=f"push it with `sdxlctl lora push {text}` and use the gs:// source it prints, or give a gs:// or "
            "Hub source (hf://ORG/REPO)",
        )
    base = home.parent if home else Path.cwd()
    resolved = dict(model.loras)
    for name, text in files.items():
        path = str((base / Path(text).expanduser()).resolve()) + ("/" if text.endswith("/") else "")
        try:
            rules.check_source(path, allow_files=True)
            if "," in path:  # a folder's path is not checked by segment: it would split SDXL_LORAS's entries
                raise ValueError(f"{path!r}: a ',' cannot pass in SDXL_LORAS (comma-separated); move or rename it")
        except ValueError as exc:
            raise ConfigError(f"{where}: [model] loras: {name} = {text!r}: {exc}") from None
        resolved[name] = path
    return model.model_copy(update={"loras": resolved})
