"""Cloud Run v2: what Google checks of a service's GPU fields before it makes a revision.

Facts from ../shared/CLOUD-RUN-GPU-FACTS.md §2-3: one GPU per instance ("The only supported 'nvidia.com/gpu'
value is '1'"), chosen by template.nodeSelector.accelerator; CPU always allocated (resources.cpuIdle false,
which a v2 resources block without cpuIdle means); per accelerator a CPU / memory minimum and a set of
regions; a per-project, per-region quota of L4s of each kind (with or without zonal redundancy) that
maxInstanceCount is checked against. Each refusal is a 400 INVALID_ARGUMENT whose message starts with the
field's path as Google's v2 errors write it (the v1 spec paths, e.g.
spec.template.spec.containers[0].resources.limits.cpu). The quota refusal is worded as observed (facts §3)
in the shape of Cloud Run's other max-instances quota errors, which come back as HTTP 400
(firebase/firebase-tools#5867).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tests.emulator.core import ApiError, World

GPU = "nvidia.com/gpu"
LIMITS = "spec.template.spec.containers[{index}].resources.limits"
ANNOTATIONS = "spec.template.metadata.annotations"
DEFAULT_MAX_INSTANCES = 100  # RevisionScaling: "If max is unset, the server default is 100"
DEFAULT_QUOTA = 3  # "Deploy any Cloud Run service with GPU to automatically receive 3 nvidia-l4 GPU quota" (⚠)


@dataclass(frozen=True)
class Accelerator:
    min_cpu: float
    min_memory_gib: float
    regions: tuple[str, ...]


ACCELERATORS = {
    "nvidia-l4": Accelerator(
        4, 16, ("asia-southeast1", "asia-south1", "europe-west1", "europe-west4", "us-central1", "us-east4")
    ),
    "nvidia-rtx-pro-6000": Accelerator(20, 80, ("asia-southeast1", "asia-south2", "europe-west4", "us-central1")),
}

# Cloud Quotas (service run.googleapis.com): the L4 quota of each kind, by id and metric (facts §3, ⚠)
ZONAL_QUOTA = "NvidiaL4GpuAllocPerProjectRegion"
NO_ZONAL_QUOTA = "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion"
L4_QUOTAS = {
    ZONAL_QUOTA: "run.googleapis.com/nvidia_l4_gpu_allocation",
    NO_ZONAL_QUOTA: "run.googleapis.com/nvidia_l4_gpu_allocation_no_zonal_redundancy",
}


def validate_gpu(service: dict[str, Any], location: str, world: World) -> None:
    """Raise ApiError as Google refuses a GPU service (camelCase JSON of a run_v2.Service)."""
    template = service.get("template", {})
    accelerator = (template.get("nodeSelector") or {}).get("accelerator")
    gpus = [
        (index, container)
        for index, container in enumerate(template.get("containers", []))
        if GPU in (container.get("resources") or {}).get("limits", {})
    ]
    if not gpus and accelerator is None:
        return
    if len(gpus) > 1:
        raise ApiError(400, f"{LIMITS.format(index=gpus[1][0])}[{GPU}]: the GPU can only be attached to one container.")
    if accelerator is None:
        raise ApiError(
            400,
            f"spec.template.spec.nodeSelector: a GPU limit ({GPU}) needs an accelerator type: "
            "set template.nodeSelector.accelerator (e.g. nvidia-l4).",
        )
    if not gpus:
        raise ApiError(
            400,
            f"{LIMITS.format(index=0)}[{GPU}]: nodeSelector.accelerator {accelerator} needs a GPU limit: "
            f"set resources.limits['{GPU}'] to '1'.",
        )
    index, container = gpus[0]
    resources = container["resources"]
    limits = LIMITS.format(index=index)
    kind = ACCELERATORS.get(accelerator)
    if kind is None:
        raise ApiError(
            400,
            f"spec.template.spec.nodeSelector.accelerator: Invalid value {accelerator!r}: "
            f"supported GPU types are {', '.join(ACCELERATORS)}.",
        )
    if resources["limits"][GPU] != "1":
        raise ApiError(
            400, f"{limits}[{GPU}]: Invalid value {resources['limits'][GPU]!r}: the only supported value is '1'."
        )
    if location not in kind.regions:
        raise ApiError(
            400,
            f"spec.template.spec.nodeSelector.accelerator: GPU type {accelerator} is not supported in region "
            f"{location}. Supported regions: {', '.join(kind.regions)}.",
        )
    if resources.get("cpuIdle"):
        raise ApiError(
            400,
            f"{ANNOTATIONS}[run.googleapis.com/cpu-throttling]: GPU requires CPU to be always allocated: "
            "set resources.cpuIdle to false (gcloud --no-cpu-throttling).",
        )
    cpu = _cpu(resources["limits"].get("cpu", "1"), limits)
    if cpu < kind.min_cpu:
        raise ApiError(
            400,
            f"{limits}.cpu: Invalid value specified for cpu. Total cpu < {kind.min_cpu:g} is not supported "
            f"with gpu type {accelerator}.",
        )
    memory = _gib(resources["limits"].get("memory", "512Mi"), limits)
    if memory < kind.min_memory_gib:
        raise ApiError(
            400,
            f"{limits}.memory: Invalid value specified for memory. Total memory < {kind.min_memory_gib:g}Gi is not "
            f"supported with gpu type {accelerator}.",
        )
    if accelerator == "nvidia-l4":
        _check_quota(service, location, world)


def l4_quota(world: World, zonal_redundancy: bool, region: str) -> int:
    """The project's quota of L4s of that kind in `region` (project.set_quota, else DEFAULT_QUOTA)."""
    from tests.emulator.project import quota_value

    return quota_value(world, L4_QUOTAS[ZONAL_QUOTA if zonal_redundancy else NO_ZONAL_QUOTA], region)


def _check_quota(service: dict[str, Any], location: str, world: World) -> None:
    template = service["template"]
    wanted = [
        int(scaling["maxInstanceCount"])
        for scaling in (template.get("scaling") or {}, service.get("scaling") or {})
        if "maxInstanceCount" in scaling
    ]
    instances = min(wanted) if wanted else DEFAULT_MAX_INSTANCES
    zonal = not template.get("gpuZonalRedundancyDisabled", False)  # on unless turned off
    allowed = l4_quota(world, zonal, location)
    if instances <= allowed:
        return
    quota_id = ZONAL_QUOTA if zonal else NO_ZONAL_QUOTA
    kind = "with" if zonal else "without"
    raise ApiError(
        400,
        f"{ANNOTATIONS}[autoscaling.knative.dev/maxScale]: You do not have quota for using GPUs {kind} zonal "
        f"redundancy. Max instances must be set to {allowed} or fewer to use {instances} GPUs. Consider requesting "
        f"an increase in quota for this region. Quota violated: {quota_id} requested: {instances} allowed: {allowed}",
    )


def _cpu(value: str, limits: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(m?)", value)
    if not match:
        raise ApiError(400, f"{limits}.cpu: Invalid value specified for cpu: {value!r}.")
    return float(match[1]) / (1000 if match[2] else 1)


UNITS = {"": 1, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}


def _gib(value: str, limits: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)(|k|M|G|T|Ki|Mi|Gi|Ti)", value)
    if not match:
        raise ApiError(400, f"{limits}.memory: Invalid value specified for memory: {value!r}.")
    return float(match[1]) * UNITS[match[2]] / 2**30
