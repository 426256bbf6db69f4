"""The model's Cloud Run service as sdxlctl builds it from the config, and how a live one is told apart from it."""

from __future__ import annotations

from typing import Any

import pytest

from sdxlctl.cloudrun import spec
from sdxlctl.config import Config, load_config
from sdxlctl.errors import UsageError
from sdxlctl.gcp.errors import CloudError, explain
from sdxlctl.gcp.run import service_dict, service_message
from sdxlctl.gpus import CLOUD_RUN_GPU

IMAGE = "europe-west4-docker.pkg.dev/p/sdxlctl/sdxl-server:abc"
ACCOUNT = "sdxl-server-sa@p.iam.gserviceaccount.com"


@pytest.fixture
def config(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> Config:
    monkeypatch.chdir(tmp_path)
    for key, value in {"TARGET": "cloudrun", "GCP_PROJECT": "p", "GCP_REGION": "europe-west4"}.items():
        monkeypatch.setenv(f"SDXLCTL_{key}", value)
    return load_config(None)


def _with(config: Config, section: str, **values: Any) -> Config:
    return config.model_copy(update={section: getattr(config, section).model_copy(update=values)})


def _service(config: Config, **kwargs: str) -> Any:
    return spec.server_service(config, image=kwargs.get("image", IMAGE), account=kwargs.get("account", ACCOUNT))


def test_the_service_is_one_l4_private_and_scales_to_zero(config: Config) -> None:
    data = service_dict(_service(config))
    template = data["template"]
    (container,) = template["containers"]
    assert data["ingress"] == "INGRESS_TRAFFIC_ALL" and not data.get("invoker_iam_disabled")
    assert data["labels"] == {"sdxlctl-deployment": "sdxl", "managed-by": "sdxlctl"} == template["labels"]
    assert template["node_selector"] == {"accelerator": "nvidia-l4"}
    assert template["gpu_zonal_redundancy_disabled"] is True
    assert template["scaling"] == {"max_instance_count": 1}  # min 0: proto3 leaves the zero out
    assert template["timeout"] == "600s" and template["max_instance_request_concurrency"] == 5
    assert template["execution_environment"] == "EXECUTION_ENVIRONMENT_GEN2"
    assert template["service_account"] == ACCOUNT
    assert container["resources"] == {
        "limits": {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"},
        "startup_cpu_boost": True,  # cpu_idle false: left out, which Cloud Run reads as false
    }
    assert container["ports"] == [{"name": "http1", "container_port": 8080}]
    assert container["startup_probe"] == {
        "http_get": {"path": "/health", "port": 8080},
        "period_seconds": 10,
        "timeout_seconds": 5,
        "failure_threshold": 60,
    }


def test_instances_zonal_redundancy_and_windows_follow_the_config(config: Config) -> None:
    changed = _with(config, "cloudrun", min_instances=1, max_instances=3, zonal_redundancy=True, startup_timeout_s=95)
    data = service_dict(_service(changed))
    assert data["scaling"] == {"min_instance_count": 1}
    assert data["template"]["scaling"] == {"min_instance_count": 1, "max_instance_count": 3}
    assert "gpu_zonal_redundancy_disabled" in data["template"]  # set to false, not left to the default
    assert data["template"]["gpu_zonal_redundancy_disabled"] is False
    assert data["template"]["containers"][0]["startup_probe"]["failure_threshold"] == 10  # ceil(95 / 10)


def test_the_server_env_has_cloud_runs_limits(config: Config) -> None:
    env = spec.container_env(_with(_with(config, "cloudrun", timeout_s=30), "model", time_limit_s=120.0))
    assert env["SDXL_TIME_LIMIT"] == "25.0"  # ends before Cloud Run cuts the request
    assert env["SDXL_MAX_REQUEST_BYTES"] == env["SDXL_MAX_RESPONSE_BYTES"] == "33554432"
    assert env["SDXL_COMPILE_CACHE"] == "gs://p-sdxlctl/compile-cache/sdxl"
    gs = spec.container_env(_with(config, "model", source="gs://w/sdxl"))
    assert gs["SDXL_MODEL"] == "gs://w/sdxl"  # read where it is by the server's own account, not an artifact


def test_the_same_service_differs_in_nothing(config: Config) -> None:
    assert spec.differences(_service(config), _service(config)) == []


def test_server_filled_fields_are_not_differences(config: Config) -> None:
    live = service_dict(_service(config))
    live |= {"name": "projects/p/locations/europe-west4/services/sdxl-server", "uri": "https://x.run.app"}
    live["template"]["revision"] = "sdxl-server-00002-abc"
    live["template"]["containers"][0]["name"] = "sdxl-server-1"
    live["latest_ready_revision"] = "projects/p/locations/europe-west4/services/sdxl-server/revisions/r"
    live["labels"]["goog-managed-by"] = "console"  # labels and probe defaults the server or a person adds
    live["template"]["containers"][0]["startup_probe"]["initial_delay_seconds"] = 1
    live["template"]["containers"][0]["startup_probe"]["http_get"]["http_headers"] = [{"name": "x", "value": "y"}]
    assert spec.differences(service_message(live), _service(config)) == []


def test_each_changed_field_is_named(config: Config) -> None:
    before = _service(config)
    after = _service(_with(config, "cloudrun", cpu=4, max_instances=2), image=IMAGE + "d")
    assert spec.differences(before, after) == ["image", "cpu 8 -> 4", "max instances 1 -> 2"]
    queue = _service(_with(config, "model", queue_size=2))
    assert spec.differences(before, queue) == ["concurrency 5 -> 3", "env SDXL_QUEUE_SIZE"]
    zonal = _service(_with(config, "cloudrun", zonal_redundancy=True))
    assert spec.differences(before, zonal) == ["zonal redundancy off -> on"]
    window = _service(_with(config, "cloudrun", startup_timeout_s=300))
    assert spec.differences(before, window) == ["startup probe"]


def test_another_gpu_or_region_is_refused_naming_the_option(config: Config) -> None:
    spec.check(config)
    with pytest.raises(UsageError, match=r"--gpu a100: .*offered by target vertex"):
        spec.check(_with(config, "deploy", gpu="a100"))
    with pytest.raises(UsageError, match=r"us-west1.*no L4"):
        spec.check(_with(config, "gcp", region="us-west1"))


@pytest.mark.parametrize("zonal", [False, True])
def test_a_gpu_quota_refusal_names_the_quota_and_page(zonal: bool) -> None:
    from google.api_core import exceptions as gexc

    kind = "with" if zonal else "without"
    google = f"POST http://x/v2/s: You do not have quota for using GPUs {kind} zonal redundancy."
    error = explain(gexc.BadRequest(google), "create service s", api="run", project="p", region="us-central1")
    assert isinstance(error, CloudError)
    assert CLOUD_RUN_GPU.quota(zonal) in error.message and "us-central1" in error.message
    assert f"You do not have quota for using GPUs {kind} zonal redundancy" in error.message
    assert "POST http" not in error.message
    assert error.hint and CLOUD_RUN_GPU.quota_page in error.hint and "project=p" in error.hint


def test_a_gpu_field_refusal_passes_googles_message_through() -> None:
    from google.api_core import exceptions as gexc

    google = "spec.template.spec.containers[0].resources.limits.cpu: Total cpu < 4 is not supported with gpu type"
    error = explain(gexc.BadRequest(google), "update service s", api="run", project="p")
    assert google in error.message
