"""What went over the wire: the emulator checks bodies against the protobuf schema; these check the content."""

from __future__ import annotations

import re
from typing import Any

import httpx

from tests.conftest import Cli
from tests.emulator_fixtures import PROJECT, REGION, Emulator


def only(requests: list[dict[str, Any]], method: str, pattern: str) -> dict[str, Any]:
    found = [r for r in requests if r["method"] == method and re.search(pattern, r["path"])]
    assert len(found) == 1, [r["path"] for r in requests]
    return found[0]


def test_the_requests_are_what_the_apis_expect(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    for step in (["build"], ["upload"], ["deploy", "--gpu", "a100"]):
        assert cli(*step, env=env).code == 0
    requests = emulator.requests()
    # The service methods ask for JSON with numeric enums; the operations mixin polls without it, and
    # IAM's plain REST API knows no such parameter.
    calls = [r for r in requests if "/operations/" not in r["path"] and "/serviceAccounts" not in r["path"]]
    assert [r["path"] for r in calls if r["query"].get("$alt") != "json;enum-encoding=int"] == []

    build = only(requests, "POST", rf"^/v1/projects/{PROJECT}/builds$")["body"]
    image = build["images"][0]
    assert re.fullmatch(rf"{REGION}-docker\.pkg\.dev/{PROJECT}/sdxlctl/sdxl-server:[0-9a-f]{{12}}", image)
    assert build["steps"][0]["name"] == "gcr.io/cloud-builders/docker" and image in build["steps"][0]["args"]
    from google.cloud.devtools.cloudbuild_v1 import BuildOptions

    assert build["timeout"] == "7200s"
    assert build["options"]["machineType"] == BuildOptions.MachineType.E2_HIGHCPU_8.value
    assert build["source"]["storageSource"]["bucket"] == f"{PROJECT}-sdxlctl"

    upload = only(requests, "POST", rf"^/v1/projects/{PROJECT}/locations/{REGION}/models:upload$")["body"]
    model = upload["model"]
    assert model["labels"] == {"sdxlctl-deployment": "sdxl", "managed-by": "sdxlctl"}
    spec = model["containerSpec"]
    assert spec["imageUri"] == image
    assert spec["ports"] == [{"containerPort": 8080}]
    assert (spec["healthRoute"], spec["predictRoute"]) == ("/health", "/predict")
    env_vars = {e["name"]: e["value"] for e in spec["env"]}
    assert env_vars["SDXL_MODEL"] == "tiny" and float(env_vars["SDXL_TIME_LIMIT"]) < 60
    assert not any(name.startswith("AIP_") for name in env_vars)  # Vertex AI sets those, never the Model
    assert env_vars["SDXL_OPTIMIZE"] == "auto"  # compile on the GPU
    assert env_vars["SDXL_COMPILE_CACHE"] == f"gs://{PROJECT}-sdxlctl/compile-cache/sdxl"

    create = only(requests, "POST", rf"^/v1/projects/{PROJECT}/locations/{REGION}/endpoints$")["body"]
    assert create["labels"]["sdxlctl-deployment"] == "sdxl"
    deploy = only(requests, "POST", r"/endpoints/\d+:deployModel$")["body"]
    resources = deploy["deployedModel"]["dedicatedResources"]
    from google.cloud.aiplatform_v1 import AcceleratorType

    assert resources["machineSpec"] == {
        "machineType": "a2-highgpu-1g",
        "acceleratorType": AcceleratorType.NVIDIA_TESLA_A100.value,
        "acceleratorCount": 1,
    }
    assert (resources["minReplicaCount"], resources["maxReplicaCount"]) == (1, 1)
    assert deploy["trafficSplit"] == {"0": 100}
    assert "@" in deploy["deployedModel"]["model"]  # a pinned version, not "whatever is latest"
    # Vertex AI's own account may only read the Model's artifacts: the server runs as one that may
    # also write the compile cache, and nothing else.
    account = f"sdxl-server-sa@{PROJECT}.iam.gserviceaccount.com"
    assert deploy["deployedModel"]["serviceAccount"] == account
    assert emulator.bucket_roles(f"{PROJECT}-sdxlctl", f"serviceAccount:{account}") == ["roles/storage.objectUser"]


def test_autoscaling_uses_the_gpu_duty_cycle(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env(SDXLCTL_DEPLOY_MAX_REPLICAS="3")
    for step in (["build"], ["upload"], ["deploy"]):
        assert cli(*step, env=env).code == 0
    deploy = only(emulator.requests(), "POST", r":deployModel$")["body"]
    specs = deploy["deployedModel"]["dedicatedResources"]["autoscalingMetricSpecs"]
    assert specs == [{"metricName": "aiplatform.googleapis.com/prediction/online/accelerator/duty_cycle", "target": 60}]


def test_a_wrong_request_is_refused_as_google_refuses_it(emulator: Emulator) -> None:
    parent = f"{emulator.url}/v1/projects/{PROJECT}/locations/{REGION}"
    wrong_field = httpx.post(f"{parent}/models:upload", json={"model": {"displayName": "x", "imageUri": "i"}})
    assert wrong_field.status_code == 400
    assert wrong_field.json()["error"]["status"] == "INVALID_ARGUMENT" and "imageUri" in wrong_field.text

    # A right body is taken (so the refusals below are about their bodies, not about any body at all)
    upload = httpx.post(
        f"{parent}/models:upload", json={"model": {"displayName": "x", "containerSpec": {"imageUri": "i"}}}
    )
    assert upload.status_code == 200, upload.text
    model = upload.json()["name"].split("/operations/")[0]
    assert re.fullmatch(rf"projects/{PROJECT}/locations/{REGION}/models/\d+", model)
    assert httpx.get(f"{emulator.url}/v1/{model}").json()["containerSpec"]["imageUri"] == "i"
    created = httpx.post(f"{parent}/endpoints", json={"displayName": "e"})
    assert created.status_code == 200, created.text
    endpoint = created.json()["name"].split("/operations/")[0]
    assert httpx.get(f"{emulator.url}/v1/{endpoint}").status_code == 200  # it exists: bodies are read

    wrong_enum = httpx.post(
        f"{emulator.url}/v1/{endpoint}:deployModel",
        json={"deployedModel": {"model": model, "dedicatedResources": {"machineSpec": {"acceleratorType": "A100"}}}},
    )
    assert wrong_enum.status_code == 400, wrong_enum.text
    assert wrong_enum.json()["error"]["status"] == "INVALID_ARGUMENT" and "A100" in wrong_enum.text

    missing = httpx.get(f"{parent}/models/404")
    assert missing.status_code == 404
    error = missing.json()["error"]
    assert set(error) == {"code", "message", "status"}
    assert (error["code"], error["status"]) == (404, "NOT_FOUND")
    assert f"projects/{PROJECT}/locations/{REGION}/models/404" in error["message"]

    wrong_gpu_for_machine = {
        "deployedModel": {
            "model": model,
            "dedicatedResources": {
                "machineSpec": {"machineType": "a2-highgpu-1g", "acceleratorType": "NVIDIA_L4", "acceleratorCount": 1},
                "minReplicaCount": 1,
            },
        }
    }
    refused = httpx.post(f"{emulator.url}/v1/{endpoint}:deployModel", json=wrong_gpu_for_machine)
    assert refused.status_code == 400, refused.text
    assert "NVIDIA_L4" in refused.text and "a2-highgpu-1g" in refused.text
    assert emulator.resources()["endpoints"][0].get("deployedModels") is None  # nothing was deployed
