"""What `sdxlctl check` reads of a project: Service Usage (enabled APIs), Cloud Quotas (Vertex AI serving GPU
quotas and Cloud Run's L4 quotas, per region) and Artifact Registry repositories.

Every API is enabled and every GPU quota is DEFAULT_GPUS (Cloud Run's L4s: run_gpu.DEFAULT_QUOTA) until a test
says otherwise (`disable`, `set_quota`, `add_repository`), as in a project that was set up.
"""

from __future__ import annotations

from typing import Any

from starlette.requests import Request

from tests.emulator.core import ApiError, Route, World, routes
from tests.emulator.run_gpu import DEFAULT_QUOTA, L4_QUOTAS

DEFAULT_GPUS = 4
SERVING_GPUS = ("t4", "l4", "a100", "a100_80gb", "h100", "h200")  # custom_model_serving_nvidia_<this>_gpus


def disable(world: World, service: str) -> None:
    """The project has `service` (aiplatform.googleapis.com, ...) disabled."""
    with world.lock:
        world.table("disabledServices")[service] = {"name": service}


def set_quota(world: World, metric: str, value: int, region: str = "") -> None:
    """The project's limit of `metric` in `region` ("": every region without a value of its own).

    `metric` is a metric (aiplatform.googleapis.com/custom_model_serving_nvidia_l4_gpus) or a Cloud Run quota
    id under its service (run.googleapis.com/NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion)."""
    service, _, quota_id = metric.partition("/")
    if service == "run.googleapis.com" and quota_id in L4_QUOTAS:
        metric = L4_QUOTAS[quota_id]
    with world.lock:
        _quotas(world).setdefault(metric, {})[region] = value


def quota_value(world: World, metric: str, region: str) -> int:
    """The project's limit of `metric` in `region`: the region's own value, else every region's."""
    with world.lock:
        values = _quotas(world).get(metric, {})
        return values.get(region, values.get("", 0))


def add_repository(world: World, project: str, region: str, repository: str) -> None:
    name = f"projects/{project}/locations/{region}/repositories/{repository}"
    with world.lock:
        world.table("repositories")[name] = {"name": name, "format": "DOCKER"}


def _quotas(world: World) -> dict[str, dict[str, int]]:
    table = world.table("quotaLimits")
    if not table:
        for gpu in SERVING_GPUS:
            table[f"aiplatform.googleapis.com/custom_model_serving_nvidia_{gpu}_gpus"] = {"": DEFAULT_GPUS}
        for metric in L4_QUOTAS.values():
            table[metric] = {"": DEFAULT_QUOTA}
    return table


class Project:
    def __init__(self, world: World) -> None:
        self.world = world

    def routes(self) -> list[Route]:
        return routes(
            [
                ("GET", r"/v1/(?P<parent>projects/[^/]+)/services:batchGet", self.batch_get),
                ("GET", r"/v1/(?P<parent>projects/[^/]+/locations/global/services/[^/]+)/quotaInfos", self.quotas),
                ("GET", r"/v1/(?P<name>projects/[^/]+/locations/[^/]+/repositories/[^/]+)", self.repository),
            ]
        )

    def batch_get(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        names = request.query_params.getlist("names")
        if not names or len(names) > 30:
            raise ApiError(400, "names: between 1 and 30 service names")
        disabled = self.world.table("disabledServices")
        return {
            "services": [
                {
                    "name": name,
                    "parent": p["parent"],
                    "state": "DISABLED" if name.rsplit("/", 1)[-1] in disabled else "ENABLED",
                }
                for name in names
            ]
        }

    def quotas(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        service = p["parent"].rsplit("/", 1)[-1]
        if service in self.world.table("disabledServices"):
            raise ApiError(403, f"{service} has not been used in this project or it is disabled")
        infos = []
        for metric, values in _quotas(self.world).items():
            if not metric.startswith(service + "/"):
                continue
            quota_id = next((q for q, m in L4_QUOTAS.items() if m == metric), None) or (
                "".join(part.title() for part in metric.split("/")[-1].split("_")) + "PerProjectPerRegion"
            )
            infos.append(
                {
                    "name": f"{p['parent']}/quotaInfos/{quota_id}",
                    "quotaId": quota_id,
                    "metric": metric,
                    "service": service,
                    "dimensions": ["region"],
                    "dimensionsInfos": [
                        {
                            "dimensions": {"region": region} if region else {},
                            "details": {"value": str(value)},
                            **({"applicableLocations": [region]} if region else {}),
                        }
                        for region, value in sorted(values.items(), reverse=True)  # own regions first
                    ],
                }
            )
        return {"quotaInfos": infos}

    def repository(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        return self.world.get("repositories", p["name"], "Repository")
