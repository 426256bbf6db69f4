"""Vertex AI v1: models, endpoints, deployModel/undeployModel, predict, IAM on endpoints, operations."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote

import httpx
from google.cloud.aiplatform_v1 import types as aip
from starlette.requests import Request

from tests.emulator.core import ApiError, Route, World, label_filter, now, packed, parse, routes
from tests.emulator.iam_roles import check_bound_roles
from tests.emulator.model_servers import ModelServers

LOCATION = r"/v1/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
BETA = r"/(?:v1beta1|ui)/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
SHARED_PAYLOAD_LIMIT = 1_572_864  # what Vertex AI says when it refuses: "exceeds the limit: 1572864 bytes"

# machine type -> (accelerator, allowed counts): what Vertex AI accepts together
MACHINES: dict[str, tuple[str, set[int]]] = {
    **{f"n1-standard-{n}": ("NVIDIA_TESLA_T4", {1, 2, 4}) for n in (4, 8, 16, 32)},
    **{f"g2-standard-{n}": ("NVIDIA_L4", {1}) for n in (4, 8, 12, 16, 32)},
    "a2-highgpu-1g": ("NVIDIA_TESLA_A100", {1}),
    "a2-highgpu-2g": ("NVIDIA_TESLA_A100", {2}),
    "a2-ultragpu-1g": ("NVIDIA_A100_80GB", {1}),
    "a3-highgpu-1g": ("NVIDIA_H100_80GB", {1}),
    "a3-highgpu-8g": ("NVIDIA_H100_80GB", {8}),
    "a3-ultragpu-8g": ("NVIDIA_H200_141GB", {8}),
}


class Vertex:
    """The Vertex AI routes sdxlctl (and any other client) uses."""

    def __init__(self, world: World, servers: ModelServers) -> None:
        self.world, self.servers = world, servers

    def routes(self) -> list[Route]:

        table = [
            ("POST", LOCATION + r"/models:upload", self.upload_model),
            ("GET", LOCATION + r"/models/(?P<model>[^/:]+)", self.get_model),
            ("GET", LOCATION + r"/models", self.list_models),
            ("DELETE", LOCATION + r"/models/(?P<model>[^/:]+)", self.delete_model),
            ("POST", LOCATION + r"/endpoints", self.create_endpoint),
            ("GET", LOCATION + r"/endpoints/(?P<endpoint>[^/:]+)", self.get_endpoint),
            ("GET", LOCATION + r"/endpoints", self.list_endpoints),
            ("DELETE", LOCATION + r"/endpoints/(?P<endpoint>[^/:]+)", self.delete_endpoint),
            ("POST", LOCATION + r"/endpoints/(?P<endpoint>[^/:]+):deployModel", self.deploy_model),
            ("POST", BETA + r"/endpoints/(?P<endpoint>[^/:]+):deployModel", self.deploy_model),
            ("POST", LOCATION + r"/endpoints/(?P<endpoint>[^/:]+):undeployModel", self.undeploy_model),
            ("POST", LOCATION + r"/endpoints/(?P<endpoint>[^/:]+):predict", self.predict),
            # Endpoint IAM is a v1beta1 method (cloud.google.com/vertex-ai/docs/general/endpoint-access-control)
            ("POST", BETA + r"/endpoints/(?P<endpoint>[^/:]+):setIamPolicy", self.set_iam_policy),
            ("POST", BETA + r"/endpoints/(?P<endpoint>[^/:]+):getIamPolicy", self.get_iam_policy),
            (
                "GET",
                r"/(?:ui|v1)/(?P<name>projects/[^/]+/locations/[^/]+(?:/[^/]+/[^/]+)?/operations/[^/]+)",
                self.get_operation,
            ),
            (
                "GET",
                r"/(?:ui|v1)/(?P<name>projects/[^/]+/locations/[^/]+/(?:endpoints|models)/[^/:]+)/operations",
                self.list_operations,
            ),
        ]
        return routes(table)

    # ------------------------------------------------------------------ models

    def upload_model(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        upload = parse(aip.UploadModelRequest, body, "UploadModelRequest")
        model = upload.get("model") or {}
        if not model.get("displayName"):
            raise ApiError(400, "Model display name is required.")
        spec = model.get("containerSpec")
        if not spec or not spec.get("imageUri"):
            raise ApiError(400, "Model.container_spec.image_uri is required for a custom container model.")
        parent = f"projects/{p['project']}/locations/{p['location']}"
        models = self.world.table("models")
        if upload.get("parentModel"):
            base = self.world.get("models", upload["parentModel"], "Model")
            name = base["name"]
            version = str(max(int(v) for v in base["_versions"]) + 1)
        else:
            name, version = f"{parent}/models/{upload.get('modelId') or self.world.new_id()}", "1"
            if name in models:
                raise ApiError(409, f"Model {name} already exists.")
        stamp = now()
        record = {
            **model,
            "name": name,
            "versionId": version,
            "versionAliases": ["default"],
            "createTime": stamp,
            "updateTime": stamp,
            "versionCreateTime": stamp,
            "versionUpdateTime": stamp,
            "etag": f"e{self.world.new_id()}",
            # Custom containers deploy on dedicated resources; sdxlctl checks this before deploying.
            "supportedDeploymentResourcesTypes": ["DEDICATED_RESOURCES"],
        }
        if name in models:
            versions = models[name]["_versions"]
            for other in versions.values():
                other["versionAliases"] = []
        else:
            versions = {}
        versions[version] = record
        models[name] = {**record, "_versions": versions}
        fault = self.world.take_fault("POST", request.url.path, operation=True)
        return self.world.start_operation(
            f"{name}/operations/{self.world.new_id()}",
            packed(aip.UploadModelOperationMetadata, {"genericMetadata": {"createTime": stamp, "updateTime": stamp}}),
            lambda: packed(aip.UploadModelResponse, {"model": name, "modelVersionId": version}),
            fault=fault,
        )

    def _model(self, p: dict[str, str]) -> tuple[dict[str, Any], str | None]:
        model_id, _, version = unquote(p["model"]).partition("@")
        name = f"projects/{p['project']}/locations/{p['location']}/models/{model_id}"
        model = self.world.get("models", name, "Model")
        return model, version or None

    def get_model(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        model, version = self._model(p)
        if version in (None, "default"):
            return _public(model)
        try:
            return _public(model["_versions"][version])
        except KeyError:
            raise ApiError(404, f"Model {model['name']}@{version} not found.") from None

    def list_models(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        parent = f"projects/{p['project']}/locations/{p['location']}/"
        keep = label_filter(request.query_params.get("filter", ""))
        models = [_public(m) for n, m in self.world.table("models").items() if n.startswith(parent) and keep(m)]
        return {"models": models} if models else {}

    def delete_model(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        model, _ = self._model(p)
        for endpoint in self.world.table("endpoints").values():
            if any(d["model"].split("@")[0] == model["name"] for d in endpoint.get("deployedModels", [])):
                raise ApiError(
                    400,
                    f"The Model {model['name']} is deployed to Endpoint {endpoint['name']}; undeploy it first.",
                    "FAILED_PRECONDITION",
                )
        fault = self.world.take_fault("DELETE", request.url.path, operation=True)
        if fault is None:
            del self.world.table("models")[model["name"]]
        return self.world.start_operation(
            f"{model['name']}/operations/{self.world.new_id()}",
            packed(aip.DeleteOperationMetadata, {"genericMetadata": {"createTime": now()}}),
            lambda: {"@type": "type.googleapis.com/google.protobuf.Empty"},
            fault=fault,
        )

    # ------------------------------------------------------------------ endpoints

    def _endpoint(self, p: dict[str, str]) -> dict[str, Any]:
        name = f"projects/{p['project']}/locations/{p['location']}/endpoints/{p['endpoint']}"
        return self.world.get("endpoints", name, "Endpoint")

    def create_endpoint(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        endpoint = parse(aip.Endpoint, body, "Endpoint")
        if not endpoint.get("displayName"):
            raise ApiError(400, "Endpoint display name is required.")
        name = (
            f"projects/{p['project']}/locations/{p['location']}/endpoints/"
            f"{request.query_params.get('endpointId') or self.world.new_id()}"
        )
        stamp = now()
        record = {**endpoint, "name": name, "createTime": stamp, "updateTime": stamp, "etag": f"e{self.world.new_id()}"}
        if endpoint.get("dedicatedEndpointEnabled"):
            # Google gives a DNS name of its own; here, predict must reach the emulator itself.
            record["dedicatedEndpointDns"] = request.url.netloc
        if name in self.world.table("endpoints"):
            raise ApiError(409, f"Endpoint {name} already exists.")
        fault = self.world.take_fault("POST", request.url.path, operation=True)
        if fault is None:
            # Listed (by label too) from the moment the create is accepted, as models and services are here:
            # a client that lost the answer finds it before creating a second one.
            self.world.table("endpoints")[name] = record

        def finish() -> dict[str, Any]:
            return packed(aip.Endpoint, record)

        return self.world.start_operation(
            f"{name}/operations/{self.world.new_id()}",
            packed(aip.CreateEndpointOperationMetadata, {"genericMetadata": {"createTime": stamp}}),
            finish,
            fault=fault,
        )

    def get_endpoint(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        return self._endpoint(p)

    def list_endpoints(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        parent = f"projects/{p['project']}/locations/{p['location']}/"
        keep = label_filter(request.query_params.get("filter", ""))
        endpoints = [e for n, e in self.world.table("endpoints").items() if n.startswith(parent) and keep(e)]
        return {"endpoints": endpoints} if endpoints else {}

    def delete_endpoint(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        endpoint = self._endpoint(p)
        if endpoint.get("deployedModels"):
            raise ApiError(
                400, f"Endpoint {endpoint['name']} has deployed models; undeploy them first.", "FAILED_PRECONDITION"
            )
        fault = self.world.take_fault("DELETE", request.url.path, operation=True)
        if fault is None:
            del self.world.table("endpoints")[endpoint["name"]]
        return self.world.start_operation(
            f"{endpoint['name']}/operations/{self.world.new_id()}",
            packed(aip.DeleteOperationMetadata, {"genericMetadata": {"createTime": now()}}),
            lambda: {"@type": "type.googleapis.com/google.protobuf.Empty"},
            fault=fault,
        )

    def deploy_model(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        endpoint = self._endpoint(p)
        beta = request.url.path.startswith("/v1beta1/")
        if beta:
            from google.cloud import aiplatform_v1beta1

            deploy = parse(aiplatform_v1beta1.DeployModelRequest, body, "DeployModelRequest")
        else:
            deploy = parse(aip.DeployModelRequest, body, "DeployModelRequest")
        wanted = deploy.get("deployedModel") or {}
        model_name, _, version = wanted.get("model", "").partition("@")
        model = self.world.get("models", model_name, "Model")
        model_version = model["_versions"].get(version or model["versionId"])
        if model_version is None:
            raise ApiError(404, f"Model {wanted['model']} not found.")
        resources = wanted.get("dedicatedResources")
        if resources is None:
            raise ApiError(400, "Model requires DedicatedResources: set deployed_model.dedicated_resources.")
        if "DEDICATED_RESOURCES" not in model_version.get("supportedDeploymentResourcesTypes", []):
            raise ApiError(400, f"Model {model_name} does not support DedicatedResources.")
        machine = resources.get("machineSpec") or {}
        _check_machine(machine)
        low, high = resources.get("minReplicaCount", 0), resources.get("maxReplicaCount", 0)
        if low < 1 and not beta:
            raise ApiError(
                400, "dedicated_resources.min_replica_count must be at least 1 in v1 (scale to zero is v1beta1 only)."
            )
        if low < 1 and not endpoint.get("dedicatedEndpointEnabled"):
            raise ApiError(400, "Scale to zero (min_replica_count 0) requires a dedicated endpoint.")
        if high and high < low:
            raise ApiError(400, "dedicated_resources.max_replica_count must not be below min_replica_count.")
        account = wanted.get("serviceAccount", "")
        if account and account not in self.world.table("accounts"):
            raise ApiError(400, f"Service account {account} does not exist.", "INVALID_ARGUMENT")
        deployed_id = self.world.new_id()
        replica = self.servers.start(
            deployed_id, model_version, endpoint["name"].rsplit("/", 1)[-1], machine, self.world.project_number
        )
        stamp = now()
        deployed = {
            **wanted,
            "id": deployed_id,
            "model": model_name,
            "modelVersionId": model_version["versionId"],
            "displayName": wanted.get("displayName") or model_version["displayName"],
            "createTime": stamp,
        }
        fault = self.world.take_fault("POST", request.url.path, operation=True)

        def ready() -> bool:
            return replica.state() != "loading"

        def finish() -> dict[str, Any]:
            if replica.state() == "failed":
                self.servers.stop(deployed_id)
                raise ApiError(
                    400,
                    "Model server never became ready. Please validate that your model file or "
                    f"container configuration are valid. Container log: {replica.reason()}",
                    "FAILED_PRECONDITION",
                )
            current = self.world.table("endpoints").get(endpoint["name"])
            if current is None:
                self.servers.stop(deployed_id)
                raise ApiError(404, f"Endpoint {endpoint['name']} was deleted during the deployment.")
            current.setdefault("deployedModels", []).append(deployed)
            current["trafficSplit"] = {deployed_id: 100}
            current["updateTime"] = now()
            return packed(aip.DeployModelResponse, {"deployedModel": deployed})

        if fault is not None:
            self.servers.stop(deployed_id)
        return self.world.start_operation(
            f"{endpoint['name']}/operations/{self.world.new_id()}",
            packed(aip.DeployModelOperationMetadata, {"genericMetadata": {"createTime": stamp}}),
            finish,
            ready=ready,
            fault=fault,
        )

    def undeploy_model(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        endpoint = self._endpoint(p)
        undeploy = parse(aip.UndeployModelRequest, body, "UndeployModelRequest")
        deployed_id = undeploy.get("deployedModelId", "")
        models = endpoint.get("deployedModels", [])
        if not any(d["id"] == deployed_id for d in models):
            raise ApiError(404, f"DeployedModel {deployed_id} not found on Endpoint {endpoint['name']}.")

        def finish() -> dict[str, Any]:
            self.servers.stop(deployed_id)
            endpoint["deployedModels"] = [d for d in models if d["id"] != deployed_id]
            endpoint["trafficSplit"] = {k: v for k, v in endpoint.get("trafficSplit", {}).items() if k != deployed_id}
            if not endpoint["deployedModels"]:
                endpoint.pop("deployedModels")
                endpoint.pop("trafficSplit", None)
            return packed(aip.UndeployModelResponse, {})

        return self.world.start_operation(
            f"{endpoint['name']}/operations/{self.world.new_id()}",
            packed(aip.UndeployModelOperationMetadata, {"genericMetadata": {"createTime": now()}}),
            finish,
            fault=self.world.take_fault("POST", request.url.path, operation=True),  # it fails midway
        )

    async def predict(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        with self.world.lock:
            endpoint = self._endpoint(p)
            if not endpoint.get("deployedModels"):
                raise ApiError(
                    400, f"Endpoint {endpoint['name']} does not have any deployed models.", "FAILED_PRECONDITION"
                )
            deployed = endpoint["deployedModels"][0]
            replica = self.servers.get(deployed["id"])
            dedicated = bool(endpoint.get("dedicatedEndpointEnabled"))
        parsed = parse(aip.PredictRequest, {"endpoint": endpoint["name"], **(body or {})}, "PredictRequest")
        raw = await request.body()
        if not dedicated and len(raw) > SHARED_PAYLOAD_LIMIT:
            raise ApiError(400, f"Request payload size exceeds the limit: {SHARED_PAYLOAD_LIMIT} bytes.")
        if replica is None:
            raise ApiError(503, "The deployed model is not serving.")
        payload = {"instances": parsed.get("instances", []), "parameters": parsed.get("parameters")}
        if payload["parameters"] is None:
            payload.pop("parameters")
        async with httpx.AsyncClient(timeout=3600 if dedicated else 60) as client:
            try:
                answer = await client.post(replica.url + replica.predict_route, json=payload)
            except httpx.TimeoutException:
                raise ApiError(504, "Timed out waiting for the model server.") from None
            except httpx.HTTPError as exc:
                raise ApiError(503, f"The model server is unreachable: {exc}") from None
        if answer.status_code != 200:
            status = {400: "INVALID_ARGUMENT", 429: "RESOURCE_EXHAUSTED", 503: "UNAVAILABLE"}.get(
                answer.status_code, "FAILED_PRECONDITION"
            )
            raise ApiError(answer.status_code if answer.status_code in (400, 429, 503) else 400, answer.text, status)
        if not dedicated and len(answer.content) > SHARED_PAYLOAD_LIMIT:
            raise ApiError(
                400,
                f"Response size too large. Received at least {len(answer.content)} bytes; "
                f"max is {SHARED_PAYLOAD_LIMIT}.",
                "FAILED_PRECONDITION",
            )
        predictions = answer.json().get("predictions")
        return {
            "predictions": predictions,
            "deployedModelId": deployed["id"],
            "model": deployed["model"],
            "modelVersionId": deployed.get("modelVersionId", "1"),
            "modelDisplayName": deployed.get("displayName", ""),
        }

    def set_iam_policy(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        check_bound_roles(self.world, body)
        return self.world.set_policy("endpoint-policies", self._endpoint(p)["name"], body)

    def get_iam_policy(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        return self.world.get_policy("endpoint-policies", self._endpoint(p)["name"])

    def get_operation(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        return self.world.poll(p["name"])

    def list_operations(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        operations = self.world.list_operations(p["name"])
        return {"operations": operations} if operations else {}


def _public(model: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in model.items() if not k.startswith("_")}


def _check_machine(machine: dict[str, Any]) -> None:
    machine_type = machine.get("machineType", "")
    if machine_type not in MACHINES:
        raise ApiError(400, f'Machine type "{machine_type}" is not supported.')
    accelerator, counts = MACHINES[machine_type]
    given, count = machine.get("acceleratorType"), machine.get("acceleratorCount", 0)
    if given != accelerator or count not in counts:
        raise ApiError(
            400,
            f'Accelerator "{given}" x {count} is not supported for machine type '
            f'"{machine_type}"; it takes {accelerator} x {sorted(counts)}.',
        )
