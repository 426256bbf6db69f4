"""The emulator refuses a Cloud Run GPU service as Google does (through google-cloud-run's ServicesClient on the
REST transport), and sdxlctl's config refuses the same thing first, naming the key.

Not configurable in sdxlctl, so tested on the emulator alone: the GPU count (sdxlctl always asks for one),
cpuIdle (always false), a GPU limit without an accelerator or the reverse (spec.py sets both), the
accelerator type itself (sdxlctl's only Cloud Run GPU is the L4: a config's other GPU is refused as
deploy.gpu, which is where the a100 row lands).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.emulator import project
from tests.emulator.app import create_app
from tests.emulator.core import World
from tests.servers import Server, serve_app

PROJECT = "demo-project"
IMAGE = "europe-west4-docker.pkg.dev/demo-project/sdxl/server:1"


@pytest.fixture
def run_api() -> Iterator[tuple[Server, World]]:
    world = World(polls_to_finish=1)
    with serve_app(create_app(world)) as server:
        yield server, world


def _client(url: str) -> Any:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import run_v2

    return run_v2.ServicesClient(
        credentials=AnonymousCredentials(), transport="rest", client_options={"api_endpoint": url}
    )


def gpu_service() -> Any:
    """The model's service as the contract shapes it (an L4, 8 vCPU, 32 GiB, CPU always on, max 1)."""
    from google.cloud import run_v2
    from google.protobuf import duration_pb2

    return run_v2.Service(
        ingress=run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL,
        scaling=run_v2.ServiceScaling(min_instance_count=0),
        template=run_v2.RevisionTemplate(
            scaling=run_v2.RevisionScaling(min_instance_count=0, max_instance_count=1),
            max_instance_request_concurrency=5,
            timeout=duration_pb2.Duration(seconds=600),
            node_selector=run_v2.NodeSelector(accelerator="nvidia-l4"),
            gpu_zonal_redundancy_disabled=True,
            execution_environment=run_v2.ExecutionEnvironment.EXECUTION_ENVIRONMENT_GEN2,
            containers=[
                run_v2.Container(
                    image=IMAGE,
                    ports=[run_v2.ContainerPort(name="http1", container_port=8080)],
                    resources=run_v2.ResourceRequirements(
                        limits={"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
                        cpu_idle=False,
                        startup_cpu_boost=True,
                    ),
                )
            ],
        ),
    )


def create(url: str, service: Any, region: str = "europe-west4", service_id: str = "sdxl-server") -> Any:
    operation = _client(url).create_service(
        parent=f"projects/{PROJECT}/locations/{region}", service=service, service_id=service_id
    )
    return operation.result(timeout=30)


def _limits(service: Any) -> Any:
    return service.template.containers[0].resources.limits


def _set(key: str, value: str) -> Callable[[Any], None]:
    def change(service: Any) -> None:
        _limits(service)[key] = value

    return change


def _accelerator(value: str) -> Callable[[Any], None]:
    def change(service: Any) -> None:
        service.template.node_selector.accelerator = value

    return change


def _no_gpu_limit(service: Any) -> None:
    del _limits(service)["nvidia.com/gpu"]


def _no_node_selector(service: Any) -> None:
    service.template._pb.ClearField("node_selector")


def _cpu_idle(service: Any) -> None:
    service.template.containers[0].resources.cpu_idle = True


def _unchanged(service: Any) -> None:
    pass


# (case, change to the service, region, what the emulator's message names, the sdxlctl.toml key and value that
# ask for the same (None: not configurable in sdxlctl))
REFUSALS = [
    ("cpu under 4", _set("cpu", "2"), "europe-west4", "containers[0].resources.limits.cpu", ("cloudrun.cpu", "2")),
    ("memory under 16 GiB", _set("memory", "8Gi"), "europe-west4", "containers[0].resources.limits.memory",
     ("cloudrun.memory_gib", "8")),
    ("another accelerator", _accelerator("nvidia-tesla-a100"), "europe-west4", "nodeSelector.accelerator",
     ("deploy.gpu", '"a100"')),
    ("a region without L4", _unchanged, "us-west1", "not supported in region us-west1", ("gcp.region", '"us-west1"')),
    ("two GPUs", _set("nvidia.com/gpu", "2"), "europe-west4", "limits[nvidia.com/gpu]", None),
    ("cpuIdle true", _cpu_idle, "europe-west4", "cpu-throttling", None),
    ("a GPU limit without nodeSelector", _no_node_selector, "europe-west4", "spec.template.spec.nodeSelector", None),
    ("nodeSelector without a GPU limit", _no_gpu_limit, "europe-west4", "limits[nvidia.com/gpu]", None),
]  # fmt: skip


@pytest.mark.parametrize(("change", "region", "named"), [r[1:4] for r in REFUSALS], ids=[r[0] for r in REFUSALS])
def test_emulator_refuses_what_google_refuses(
    run_api: tuple[Server, World], change: Callable[[Any], None], region: str, named: str
) -> None:
    from google.api_core import exceptions

    server, world = run_api
    service = gpu_service()
    change(service)
    with pytest.raises(exceptions.BadRequest) as refused:
        create(server.url, service, region)
    assert refused.value.code == 400
    assert named in refused.value.message
    assert world.table("services") == {}, "a refused service is not made"


def test_the_contract_service_is_accepted(run_api: tuple[Server, World]) -> None:
    server, _ = run_api
    made = create(server.url, gpu_service())
    assert made.template.node_selector.accelerator == "nvidia-l4"
    assert _limits(made)["nvidia.com/gpu"] == "1"


@pytest.mark.parametrize("setting", [r[4] for r in REFUSALS if r[4]], ids=[r[0] for r in REFUSALS if r[4]])
def test_sdxlctl_refuses_it_first_naming_the_key(tmp_path: Path, setting: tuple[str, str]) -> None:
    from sdxlctl.config import load_config
    from sdxlctl.errors import ConfigError

    key, value = setting
    tables: dict[str, dict[str, str]] = {"gcp": {"project": '"demo-project"', "region": '"europe-west4"'}}
    section, name = key.split(".")
    tables.setdefault(section, {})[name] = value
    text = 'target = "cloudrun"\n' + "".join(
        f"[{table}]\n" + "".join(f"{k} = {v}\n" for k, v in values.items()) for table, values in tables.items()
    )
    path = tmp_path / "sdxlctl.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as refused:
        load_config(path, environ={})
    assert f"{key} = {value.replace(chr(34), chr(39))}" in str(refused.value)
    assert "\n" not in str(refused.value), "one line"


def test_the_l4_quota_of_each_kind_bounds_max_instances(run_api: tuple[Server, World]) -> None:
    from google.api_core import exceptions

    server, world = run_api
    service = gpu_service()
    service.template.scaling.max_instance_count = 4  # the default quota is 3 of each kind
    with pytest.raises(exceptions.BadRequest) as refused:
        create(server.url, service)
    message = refused.value.message
    assert "You do not have quota for using GPUs without zonal redundancy" in message
    assert "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion requested: 4 allowed: 3" in message

    # zonal redundancy (the default when the field is unset) counts against the other quota
    project.set_quota(world, "run.googleapis.com/NvidiaL4GpuAllocPerProjectRegion", 0, "europe-west4")
    service = gpu_service()
    service.template._pb.ClearField("gpu_zonal_redundancy_disabled")
    with pytest.raises(exceptions.BadRequest, match="GPUs with zonal redundancy"):
        create(server.url, service)
    create(server.url, gpu_service(), "europe-west1", "other-region")  # its own region's quota

    project.set_quota(world, "run.googleapis.com/NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion", 4)
    service = gpu_service()
    service.template.scaling.max_instance_count = 4
    assert create(server.url, service).template.scaling.max_instance_count == 4


def test_unset_max_instances_is_googles_default_of_100(run_api: tuple[Server, World]) -> None:
    from google.api_core import exceptions

    server, _ = run_api
    service = gpu_service()
    service.template._pb.scaling.ClearField("max_instance_count")
    with pytest.raises(exceptions.BadRequest, match="requested: 100 allowed: 3"):
        create(server.url, service)


def test_cloud_quotas_lists_the_l4_quotas(run_api: tuple[Server, World]) -> None:
    """What `sdxlctl check` reads: both kinds, 3 in every region until set, a region's own value first."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import cloudquotas_v1

    server, world = run_api
    project.set_quota(world, "run.googleapis.com/NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion", 1, "us-east4")
    client = cloudquotas_v1.CloudQuotasClient(
        credentials=AnonymousCredentials(), transport="rest", client_options={"api_endpoint": server.url}
    )
    infos = client.list_quota_infos(parent=f"projects/{PROJECT}/locations/global/services/run.googleapis.com")
    values = {
        info.quota_id: {dict(d.dimensions).get("region", ""): d.details.value for d in info.dimensions_infos}
        for info in infos
    }
    assert values == {
        "NvidiaL4GpuAllocPerProjectRegion": {"": 3},
        "NvidiaL4GpuAllocNoZonalRedundancyPerProjectRegion": {"us-east4": 1, "": 3},
    }
