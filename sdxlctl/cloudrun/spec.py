"""Target cloudrun: the model server's Cloud Run service as sdxlctl wants it, and how a live one differs from it.

Pure functions of the config (no call is made): the deploy plan, the deploy and the tests all read the
service from here. Cloud Run fills in fields of its own (revision names, defaults, conditions): only the
fields sdxlctl sets are compared, so a service deployed from the same config reads as unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from sdxlctl.config import Config
from sdxlctl.context import BAKED_FOLDER
from sdxlctl.errors import UsageError
from sdxlctl.gcp.run import service_dict, service_message
from sdxlctl.gpus import CLOUD_RUN_GPU
from sdxlctl.inputs import CLOUD_RUN_LIMIT_BYTES
from sdxlctl.server_env import server_env
from sdxlctl.vertex.names import names, own_cache

PORT = 8080
HEALTH_ROUTE = "/health"
PROBE_PERIOD_S = 10
PROBE_TIMEOUT_S = 5
TIME_MARGIN_S = 5  # the server answers 504 itself before Cloud Run cuts the request


def check(config: Config) -> None:
    """Cloud Run's GPU and region rules, before any request: the config was checked at load, but `--gpu`
    replaces [deploy] gpu after that."""
    problem = CLOUD_RUN_GPU.gpu_problem(config.deploy.gpu)
    if problem:
        raise UsageError(
            f"--gpu {config.deploy.gpu}: {problem}",
            hint=f'leave --gpu out (target cloudrun runs on the {CLOUD_RUN_GPU.key}), or set target = "vertex"',
        )
    problem = CLOUD_RUN_GPU.region_problem(config.gcp.region)
    if problem:
        raise UsageError(f"gcp.region = {config.gcp.region!r}: {problem}", hint='or set target = "vertex"')


def time_limit_s(config: Config) -> float:
    """SDXL_TIME_LIMIT: the server's own limit, cut to end before Cloud Run's request timeout does."""
    return float(min(config.model.time_limit_s, max(config.cloudrun.timeout_s - TIME_MARGIN_S, 1)))


def container_env(config: Config) -> dict[str, str]:
    """The model server's environment on Cloud Run: as on Vertex AI, with Cloud Run's limits. gs:// weights
    are read where they are by the server's own account (in parallel); baked weights from the image."""
    return server_env(
        config.model,
        auto_cache=own_cache(config),
        time_limit_s=time_limit_s(config),
        byte_limit=CLOUD_RUN_LIMIT_BYTES,
        with_source=True,
        baked_folder=BAKED_FOLDER,
    )


def concurrency(config: Config) -> int:
    """Requests one instance takes at once: the one generating and the server's queue (more get 429 there)."""
    return config.model.queue_size + 1


def startup_failures(config: Config) -> int:
    """Failed probes before Cloud Run gives up on a start: the window covers loading and warming up."""
    return max(1, math.ceil(config.cloudrun.startup_timeout_s / PROBE_PERIOD_S))


def server_service(config: Config, *, image: str, account: str) -> Any:
    """The run_v2.Service of the model server: one L4, private, scaling between the configured instances."""
    run, labels = config.cloudrun, names(config).labels
    scaling = {"min_instance_count": run.min_instances, "max_instance_count": run.max_instances}
    container = {
        "image": image,
        "env": [{"name": k, "value": v} for k, v in sorted(container_env(config).items())],
        "ports": [{"name": "http1", "container_port": PORT}],
        "resources": {
            "limits": {"cpu": str(run.cpu), "memory": f"{run.memory_gib}Gi", "nvidia.com/gpu": "1"},
            "cpu_idle": False,  # a GPU needs its CPU always allocated (instance-based billing)
            "startup_cpu_boost": True,
        },
        "startup_probe": {
            "http_get": {"path": HEALTH_ROUTE, "port": PORT},
            "period_seconds": PROBE_PERIOD_S,
            "timeout_seconds": PROBE_TIMEOUT_S,
            "failure_threshold": startup_failures(config),
        },
    }
    return service_message(
        {
            "labels": labels,
            "ingress": "INGRESS_TRAFFIC_ALL",
            "invoker_iam_disabled": False,  # private: only invokers (the deployer, the UI's account) may call it
            "scaling": {"min_instance_count": run.min_instances},
            "template": {
                "service_account": account,
                "labels": labels,
                "scaling": scaling,
                "max_instance_request_concurrency": concurrency(config),
                "timeout": f"{run.timeout_s}s",
                "node_selector": {"accelerator": CLOUD_RUN_GPU.accelerator},
                "gpu_zonal_redundancy_disabled": not run.zonal_redundancy,
                "execution_environment": "EXECUTION_ENVIRONMENT_GEN2",
                "containers": [container],
            },
        }
    )


def _path(data: Any, *keys: Any, default: Any = "") -> Any:
    for key in keys:
        if isinstance(key, int):
            data = data[key] if isinstance(data, list) and len(data) > key else None
        else:
            data = data.get(key) if isinstance(data, dict) else None
        if data is None:
            return default
    return data


def _template(*keys: Any, default: Any = "") -> Callable[[dict[str, Any]], Any]:
    return lambda s: _path(s, "template", *keys, default=default)


def _container(*keys: Any, default: Any = "") -> Callable[[dict[str, Any]], Any]:
    return lambda s: _path(s, "template", "containers", 0, *keys, default=default)


def _on_off(value: Any) -> str:
    return "on" if value else "off"


# Each field sdxlctl sets, by the name a person reads it under; "said": whether its values are shown.
FIELDS: list[tuple[str, Callable[[dict[str, Any]], Any], bool]] = [
    ("image", _container("image"), False),
    ("service account", _template("service_account"), True),
    ("cpu", _container("resources", "limits", "cpu"), True),
    ("memory", _container("resources", "limits", "memory"), True),
    ("gpus", _container("resources", "limits", "nvidia.com/gpu"), True),
    ("accelerator", _template("node_selector", "accelerator"), True),
    (
        "zonal redundancy",
        lambda s: _on_off(not _path(s, "template", "gpu_zonal_redundancy_disabled", default=False)),
        True,
    ),
    ("min instances", _template("scaling", "min_instance_count", default=0), True),
    ("max instances", _template("scaling", "max_instance_count", default=0), True),
    ("service min instances", lambda s: _path(s, "scaling", "min_instance_count", default=0), True),
    ("concurrency", _template("max_instance_request_concurrency", default=0), True),
    ("timeout", _template("timeout"), True),
    ("execution environment", _template("execution_environment"), True),
    (
        "cpu always allocated",
        lambda s: _on_off(not _path(s, "template", "containers", 0, "resources", "cpu_idle", default=False)),
        True,
    ),
    (
        "startup cpu boost",
        lambda s: _on_off(_path(s, "template", "containers", 0, "resources", "startup_cpu_boost", default=False)),
        True,
    ),
    (
        "port",
        lambda s: [(p.get("name", ""), p.get("container_port", 0)) for p in _container("ports", default=[])(s)],
        True,
    ),
    ("startup probe", _container("startup_probe", default={}), False),
    ("ingress", lambda s: _path(s, "ingress"), True),
    ("invoker IAM check", lambda s: _on_off(not _path(s, "invoker_iam_disabled", default=False)), True),
    ("labels", lambda s: _path(s, "labels", default={}), False),
    ("revision labels", _template("labels", default={}), False),
]


def differences(live: Any, wanted: Any) -> list[str]:
    """The fields sdxlctl sets that differ between the live service and the wanted one ("cpu 8 -> 4",
    "image", "env SDXL_QUEUE_SIZE"); empty when the live service is what the config asks for."""
    have, want = service_dict(live), service_dict(wanted)
    changed = []
    for name, read, said in FIELDS:
        before, after = read(have), read(want)
        if isinstance(before, dict) and isinstance(after, dict):  # labels or a probe: what Google adds is its own
            before = _within(before, after)
        if before != after:
            changed.append(f"{name} {_said(before)} -> {_said(after)}" if said else name)
    old, new = _env(have), _env(want)
    changed += [f"env {key}" for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
    return changed


def _within(have: dict[str, Any], want: dict[str, Any]) -> dict[str, Any]:
    """`have` cut to the keys `want` sets, at every depth: a label or default the server added is no difference."""
    return {
        key: _within(have[key], value) if isinstance(have[key], dict) and isinstance(value, dict) else have[key]
        for key, value in want.items()
        if key in have
    }


def _said(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(f"{name or '-'}:{port}" for name, port in value) or "none"
    return str(value) if value not in ("", None) else "none"


def _env(service: dict[str, Any]) -> dict[str, str]:
    return {
        e.get("name", ""): e.get("value", "") for e in _path(service, "template", "containers", 0, "env", default=[])
    }
