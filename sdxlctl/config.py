"""sdxlctl.toml as one validated object, loaded once and passed down."""

from __future__ import annotations

import copy
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError, field_validator, model_validator

from sdxlctl.errors import ConfigError
from sdxlctl.gpus import GPUS
from sdxlctl.model_config import Model, Section, check_model

__all__ = ["Model", "Section"]  # [model] lives in model_config.py; `from sdxlctl.config import Model` still works

CONFIG_NAME = "sdxlctl.toml"
ENV_PREFIX = "SDXLCTL_"
GPU_KEYS = tuple(GPUS)  # the choices of [deploy] gpu and of --gpu, from the one GPU table


class Gcp(Section):
    """Where in Google Cloud the deployment lives."""

    project: str = Field("", description="Google Cloud project id", examples=["my-project"])
    region: str = Field("us-central1", description="region of the endpoint, build and UI")
    staging_bucket: str = Field("", description="gs:// bucket for build sources (default: gs://PROJECT-sdxlctl)")
    artifact_repository: str = Field("sdxlctl", description="Artifact Registry Docker repository")
    api_endpoint: str = Field("", description="base URL of the Google APIs; empty: Google's (set for the emulator)")
    poll_interval_s: float = Field(10.0, gt=0, le=300, description="how often long operations are polled")
    retry_s: float = Field(
        120.0, gt=0, le=3600, description="how long a call is retried through 429/5xx and dropped connections"
    )


class Deploy(Section):
    """The GPU endpoint."""

    gpu: str = Field("l4", description=f"the GPU of each replica: {', '.join(GPU_KEYS)}")
    min_replicas: int = Field(1, ge=0, le=100, description="0: scale to zero (Preview, dedicated endpoints only)")
    max_replicas: int = Field(1, ge=1, le=100)
    endpoint: Literal["shared", "dedicated"] = "shared"
    timeout_min: int = Field(60, ge=1, le=120, description="minutes to wait for a deploy to finish")
    spot: bool = Field(
        False, description="Spot VMs for the replicas: cheaper, may be preempted (Vertex AI restarts them)"
    )

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, value: str) -> str:
        if value not in GPUS:
            raise ValueError("Input should be " + ", ".join(map(repr, GPU_KEYS[:-1])) + f" or {GPU_KEYS[-1]!r}")
        return value


class Ui(Section):
    """The Gradio UI."""

    public: bool = Field(False, description="allow unauthenticated access to the Cloud Run service")


class CloudRun(Section):
    """The model server as a Cloud Run service on an NVIDIA L4 (target cloudrun); the GPU is [deploy] gpu = "l4"."""

    cpu: int = Field(8, ge=1, le=80, description="vCPUs of each instance (the L4 needs at least 4)")
    memory_gib: int = Field(32, ge=1, le=512, description="GiB of memory of each instance (the L4 needs 16)")
    min_instances: int = Field(0, ge=0, le=100, description="0: scale to zero, nothing billed while idle")
    max_instances: int = Field(1, ge=1, le=100, description="instances at most (each is one L4 of quota)")
    zonal_redundancy: bool = Field(False, description="GPU capacity reserved across zones: dearer, its own quota")
    timeout_s: int = Field(600, ge=1, le=3600, description="how long one request may take")
    startup_timeout_s: int = Field(
        600, ge=10, le=1800, description="how long an instance may load and warm up before it must answer health"
    )


class Batch(Section):
    """`sdxlctl batch`: many prompts through Vertex AI batch prediction (or the local server)."""

    gpu: str = Field("", description="the GPU of each batch replica; empty: [deploy] gpu")
    min_replicas: int = Field(1, ge=1, le=100, description="replicas a job starts with")
    max_replicas: int = Field(1, ge=1, le=100, description="replicas a job may grow to")
    batch_size: int = Field(0, ge=0, le=64, description="instances per request to a replica; 0: chosen for the GPU")
    spot: bool = Field(False, description="Spot VMs: cheaper, may be preempted (the job retries the lost lines)")
    max_lines: int = Field(50_000, ge=1, le=1_000_000, description="a prompts file longer than this is refused")
    budget_usd: float = Field(25.0, ge=0, description="a batch estimated above this asks for confirmation")
    out: str = Field("", description="gs:// prefix for a job's output; empty: the staging bucket's batch/ folder")

    @field_validator("gpu")
    @classmethod
    def _gpu(cls, value: str) -> str:
        if value and value not in GPUS:
            raise ValueError("Input should be '' or " + ", ".join(map(repr, GPU_KEYS)))
        return value

    @field_validator("out")
    @classmethod
    def _out(cls, value: str) -> str:
        # a job writes only to Cloud Storage; "bucket/x" would be taken as a gs:// path and fail at the upload
        if value and not re.fullmatch(r"gs://[a-z0-9][a-z0-9._-]{1,221}[a-z0-9](/.*)?", value):
            raise ValueError("must be empty or a gs:// prefix (gs://BUCKET/PREFIX/)")
        return value

    @model_validator(mode="after")
    def _replicas(self) -> Batch:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas {self.min_replicas} is above max_replicas {self.max_replicas}")
        return self


class Local(Section):
    """Ports and waits of the local target."""

    host: str = "127.0.0.1"
    server_port: int = Field(8080, ge=1, le=65535)
    ui_port: int = Field(7860, ge=1, le=65535)
    startup_timeout_s: float = Field(300.0, gt=0, le=7200)


class Config(Section):
    """The whole of sdxlctl.toml."""

    name: str = Field("sdxl", pattern=r"^[a-z][a-z0-9-]{0,30}[a-z0-9]$", description="deployment name")
    target: Literal["local", "vertex", "cloudrun"] = "local"
    gcp: Gcp = Field(default_factory=Gcp)
    model: Model = Field(default_factory=Model)
    deploy: Deploy = Field(default_factory=Deploy)
    ui: Ui = Field(default_factory=Ui)
    cloudrun: CloudRun = Field(default_factory=CloudRun)
    batch: Batch = Field(default_factory=Batch)
    local: Local = Field(default_factory=Local)

    # Where the config came from (None: built-in defaults); the state lives beside it.
    path: Path | None = Field(None, exclude=True)

    @model_validator(mode="after")
    def _batch_fits_the_server(self) -> Config:
        # the server refuses a request of more instances than max_images: a job would bill GPUs to fail them all
        if self.batch.batch_size > self.model.max_images:
            sizes = f"[batch] batch_size {self.batch.batch_size} is above [model] max_images {self.model.max_images}"
            raise ValueError(f"{sizes}, the most instances the server takes a request; lower it (0: sdxlctl chooses)")
        return self

    @property
    def home(self) -> Path:
        """The folder sdxlctl keeps its state in: beside the config file, else the current folder."""
        return (self.path.parent if self.path else Path.cwd()) / ".sdxlctl"


# The env forms of the global options (as gcloud's CLOUDSDK_*): not config keys, so never refused as such.
GLOBAL_ENV = {"SDXLCTL_CONFIG": "--config", "SDXLCTL_DEBUG": "--debug"}


def load_config(path: Path | None = None, environ: Mapping[str, str] | None = None) -> Config:
    """Read `path` (default ./sdxlctl.toml if present), apply SDXLCTL_<SECTION>_<KEY> overrides, validate."""
    return _load(path, environ)[0]


def _load(
    path: Path | None, environ: Mapping[str, str] | None
) -> tuple[Config, dict[str, Any], dict[tuple[str, ...], str]]:
    """The config, the file's own tables, and which keys came from which variable."""
    environ = os.environ if environ is None else environ
    if path is None and Path(CONFIG_NAME).is_file():
        path = Path(CONFIG_NAME)
    data: dict[str, Any] = {}
    source = "built-in defaults"
    if path is not None:
        source = str(path)
        try:
            data = tomllib.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(
                f"{path}: no such file", hint="pass --config PATH, or leave it out for defaults"
            ) from None
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    from_file = copy.deepcopy(data)
    from_env = _apply_env(data, environ)
    try:
        config = Config.model_validate({**data, "path": path.resolve() if path else None})
    except ValidationError as exc:
        raise _config_error(exc, source, from_env) from None
    if config.target == "cloudrun":  # sized by [cloudrun]; [deploy]'s replicas are Vertex AI's, unread there
        _check_cloudrun(config, source)
    elif config.deploy.min_replicas == 0 and config.deploy.endpoint != "dedicated":
        raise ConfigError(
            f'{source}: deploy.min_replicas = 0 (scale to zero) needs deploy.endpoint = "dedicated"',
            hint="Vertex AI scales to zero only dedicated endpoints (Preview); or set min_replicas = 1",
        )
    elif config.deploy.min_replicas > config.deploy.max_replicas:
        raise ConfigError(
            f"{source}: deploy.min_replicas ({config.deploy.min_replicas}) is above deploy.max_replicas "
            f"({config.deploy.max_replicas})",
            hint="raise max_replicas or lower min_replicas",
        )
    # The one check besides dispatch that reads the target: a file on this machine reaches only a local server.
    model = check_model(config.model, source, from_env, local=config.target == "local", home=config.path)
    return config.model_copy(update={"model": model}), from_file, from_env


def _check_cloudrun(config: Config, source: str) -> None:
    """What Cloud Run refuses of a GPU service, refused here first, naming the key."""
    from sdxlctl.gpus import CLOUD_RUN_GPU as rules

    run = config.cloudrun
    problem = rules.gpu_problem(config.deploy.gpu)
    if problem:
        raise ConfigError(
            f"{source}: deploy.gpu = {config.deploy.gpu!r}: {problem}", hint='set gpu = "l4" or target = "vertex"'
        )
    problem = rules.region_problem(config.gcp.region)
    if problem:
        raise ConfigError(f"{source}: gcp.region = {config.gcp.region!r}: {problem}")
    if run.cpu < rules.min_cpu:
        raise ConfigError(
            f"{source}: cloudrun.cpu = {run.cpu}: an L4 instance needs at least {rules.min_cpu} vCPUs",
            hint=f"set cpu = {rules.min_cpu} or more (8 is the default)",
        )
    if run.memory_gib < rules.min_memory_gib:
        raise ConfigError(
            f"{source}: cloudrun.memory_gib = {run.memory_gib}: "
            f"an L4 instance needs at least {rules.min_memory_gib} GiB",
            hint=f"set memory_gib = {rules.min_memory_gib} or more (32 is the default)",
        )
    if run.min_instances > run.max_instances:
        raise ConfigError(
            f"{source}: cloudrun.min_instances ({run.min_instances}) is above "
            f"cloudrun.max_instances ({run.max_instances})",
            hint="raise max_instances or lower min_instances",
        )


@dataclass(frozen=True)
class Setting:
    """One key of the effective config and where its value came from."""

    key: str  # "name", "gcp.project"
    value: Any
    source: str  # "default", the config file's path, or the SDXLCTL_* variable


def settings(path: Path | None = None, environ: Mapping[str, str] | None = None) -> tuple[Config, list[Setting]]:
    """The effective config, each key with its source: an SDXLCTL_* variable over the file over the default."""
    config, from_file, from_env = _load(path, environ)
    file = str(config.path) if config.path else ""
    rows: list[Setting] = []
    for name, field in Config.model_fields.items():
        if field.exclude:
            continue
        if not _is_section(field.annotation):
            rows.append(Setting(name, getattr(config, name), _source((name,), from_file, from_env, file)))
            continue
        section = getattr(config, name)
        for key in type(section).model_fields:
            where = _source((name, key), from_file.get(name, {}), from_env, file)
            rows.append(Setting(f"{name}.{key}", getattr(section, key), where))
    return config, rows


def _source(key: tuple[str, ...], table: Any, from_env: dict[tuple[str, ...], str], file: str) -> str:
    if key in from_env:
        return from_env[key]
    return file if isinstance(table, dict) and key[-1] in table else "default"


def env_var(key: str) -> str:
    """The variable that overrides `key` ("gcp.project" -> SDXLCTL_GCP_PROJECT)."""
    return ENV_PREFIX + key.replace(".", "_").upper()


def gcloud_project(environ: Mapping[str, str] | None = None) -> str:
    """What `gcloud config get-value project` answers, read offline from gcloud's files ("" if none).

    As gcloud resolves it: CLOUDSDK_CORE_PROJECT, else [core] project of the active configuration
    (CLOUDSDK_ACTIVE_CONFIG_NAME, else the file active_config, else "default") under CLOUDSDK_CONFIG.
    """
    import configparser

    environ = os.environ if environ is None else environ
    if environ.get("CLOUDSDK_CORE_PROJECT"):
        return environ["CLOUDSDK_CORE_PROJECT"].strip()
    folder = Path(environ.get("CLOUDSDK_CONFIG") or Path.home() / ".config" / "gcloud")
    try:
        active = environ.get("CLOUDSDK_ACTIVE_CONFIG_NAME") or (folder / "active_config").read_text().strip()
    except OSError:
        active = ""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read(folder / "configurations" / f"config_{active or 'default'}", encoding="utf-8")
    except (configparser.Error, UnicodeDecodeError):
        return ""
    return parser.get("core", "project", fallback="").strip()


def require_project(config: Config, environ: Mapping[str, str] | None = None) -> str:
    """[gcp] project, or a config error (exit 2) naming the key, its variable and gcloud's default."""
    if config.gcp.project:
        return config.gcp.project
    where = str(config.path) if config.path else f"{CONFIG_NAME} (there is none here)"
    found = gcloud_project(environ)
    if found:
        hint = (
            f'gcloud\'s default project is {found!r}: set project = "{found}" in [gcp] of {where}, '
            f"or SDXLCTL_GCP_PROJECT={found}"
        )
    else:
        hint = (
            f"set project in [gcp] of {where}, or SDXLCTL_GCP_PROJECT; "
            "`gcloud config get-value project` shows gcloud's default, if it has one"
        )
    # Never taken from gcloud silently: the project is who pays, and gcloud's default may be another one's.
    raise ConfigError(
        f"target {config.target} needs a Google Cloud project: [gcp] project (or SDXLCTL_GCP_PROJECT) is not set",
        hint=hint,
    )


def _is_section(annotation: object) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, Section)


def _apply_env(data: dict[str, Any], environ: Mapping[str, str]) -> dict[tuple[str, ...], str]:
    """Merge SDXLCTL_* variables into `data`; return which keys came from which variable.

    By hand rather than with pydantic-settings: its env source ignores a stray SDXLCTL_* instead of
    refusing it, splits keys that hold "_" (staging_bucket) only with extra settings, and keeps no record
    of which variable set which key, which the error messages and `sdxlctl config` need.
    """
    sections = {name for name, field in Config.model_fields.items() if _is_section(field.annotation)}
    applied: dict[tuple[str, ...], str] = {}
    for var, value in environ.items():
        if not var.startswith(ENV_PREFIX):
            continue
        if var in GLOBAL_ENV:
            continue
        rest = var[len(ENV_PREFIX) :].lower()
        section, _, key = rest.partition("_")
        if section in sections and key:
            table = data.setdefault(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"[{section}] must be a table to apply {var}")
            table[key] = value
            applied[(section, key)] = var
        elif rest in Config.model_fields and rest != "path":
            data[rest] = value
            applied[(rest,)] = var
        else:
            raise ConfigError(
                f"{var} (environment): not an sdxlctl variable",
                hint=f"unset it; sdxlctl reads {', '.join(env_names())}",
            )
    return applied


def env_names() -> list[str]:
    """Every SDXLCTL_* variable sdxlctl reads: the global options' and one per config key."""
    keys: list[str] = []
    for name, field in Config.model_fields.items():
        if _is_section(field.annotation):
            keys += [f"{name}.{key}" for key in field.annotation.model_fields]  # type: ignore[union-attr]
        elif not field.exclude:
            keys.append(name)
    return [*GLOBAL_ENV, *map(env_var, keys)]


def _config_error(exc: ValidationError, source: str, from_env: dict[tuple[str, ...], str]) -> ConfigError:
    """The first problem as 'file: section.key = value: what is allowed'."""
    error = exc.errors(include_url=False)[0]
    location = tuple(str(part) for part in error["loc"])
    key = ".".join(location)
    where = f"{from_env[location]} (environment)" if location in from_env else f"{source}: {key}"
    if error["type"] == "extra_forbidden":
        section = location[:-1]
        model: type[BaseModel] = Config
        for part in section:
            model = Config.model_fields[part].annotation  # type: ignore[assignment]
        allowed = [name for name in model.model_fields if name != "path"]
        if location in from_env:  # a variable: name the variables of that section
            allowed = [env_var(".".join((*section, name))) for name in allowed]
        return ConfigError(
            f"{where}: unknown key",
            hint=f"allowed in {'[' + section[0] + ']' if section else 'the top level'}: {', '.join(allowed)}",
        )
    value = error.get("input")
    message = error["msg"].removeprefix("Value error, ")
    if not location or (key in Config.model_fields and _is_section(Config.model_fields[key].annotation)):
        # a rule across keys (min above max): name the section, and the variables that set the sections it names
        named = location or tuple(part for part in Config.model_fields if f"[{part}]" in message)
        given = ", ".join(var for at, var in from_env.items() if at[0] in named)
        where = f"{source}: [{key}]" if location else source
        return ConfigError(where + (f" with {given}" if given else "") + f": {message}")
    if error["type"] == "string_pattern_mismatch" and location == ("name",):
        message = "must be 2-32 lowercase letters, digits or '-', starting with a letter (it names cloud resources)"
    return ConfigError(f"{where} = {value!r}: {message}")
