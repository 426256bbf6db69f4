"""Vertex AI: models, endpoints, deployments and predictions, through the v1 GAPIC clients (REST).

The GAPIC clients rather than `aiplatform.Model.deploy`: that one silently drops the machine and GPU
unless the model reports DEDICATED_RESOURCES; here the request says exactly what it asks for, and
`check_dedicated` refuses a model that cannot take it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdxlctl.gcp.errors import CloudError, translated
from sdxlctl.gcp.session import Cloud, Progress, create_once, wait_for
from sdxlctl.gpus import GpuOption
from sdxlctl.steps import quiet

DUTY_CYCLE_METRIC = "aiplatform.googleapis.com/prediction/online/accelerator/duty_cycle"
# What a create's `find` returns: an operation name to wait for, the resource itself, or None (not there)
Find = Callable[[], Any]


def _nothing() -> None:
    return None


@dataclass(frozen=True)
class ContainerSpec:
    """What Vertex AI needs to run the model server image."""

    image: str
    env: dict[str, str]
    port: int = 8080
    health_route: str = "/health"
    predict_route: str = "/predict"
    deployment_timeout_s: int = 3600


class Vertex:
    """Vertex AI in one project and region."""

    def __init__(self, cloud: Cloud) -> None:
        from google.cloud import aiplatform_v1

        self.cloud = cloud
        self.aip = aiplatform_v1
        host = f"{cloud.region}-aiplatform.googleapis.com"
        self.models: Any = cloud.client(aiplatform_v1.ModelServiceClient, host)
        self.endpoints: Any = cloud.client(aiplatform_v1.EndpointServiceClient, host)

    def _call(self, action: str) -> Any:
        return translated(action, api="aiplatform", project=self.cloud.project, region=self.cloud.region)

    def wait(self, operation_name: str, *, what: str, timeout_s: float, progress: Progress) -> Any:
        """Wait for an operation by name (also one started by an earlier, interrupted run)."""
        return wait_for(
            self.endpoints,
            operation_name,
            what=what,
            timeout_s=timeout_s,
            progress=progress,
            api="aiplatform",
            cloud=self.cloud,
        )

    def pending_operations(self, resource: str, metadata: str) -> list[str]:
        """Names of the operations on `resource` (an endpoint or model) still running whose metadata is of
        type `metadata` (e.g. DeployModelOperationMetadata): how a lost answer is found again."""
        with self._call(f"list the operations of {resource}"):
            operations = self.endpoints.list_operations(request={"name": resource}, retry=self.cloud.retry())
        return [op.name for op in operations.operations if not op.done and op.metadata.type_url.endswith(metadata)]

    def _create(self, what: str, send: Callable[[], Any], find: Find, progress: Progress) -> Any:
        """`send` (which returns an operation) without blind retries: see `create_once`."""

        def start() -> Any:
            return str(send().operation.name)

        return create_once(start, find, what=what, cloud=self.cloud, api="aiplatform", progress=progress)

    # ------------------------------------------------------------------ models

    def find_models(self, label: tuple[str, str]) -> list[Any]:
        with self._call("list models"):
            request = {"parent": self.cloud.parent, "filter": f"labels.{label[0]}={label[1]}"}
            return list(self.models.list_models(request=request, retry=self.cloud.retry()))

    def get_model(self, name: str) -> Any:
        with self._call(f"get model {name}"):
            return self.models.get_model(name=name, retry=self.cloud.retry())

    def upload_model(
        self,
        *,
        display_name: str,
        labels: dict[str, str],
        spec: ContainerSpec,
        artifact_uri: str = "",
        parent_model: str = "",
        find: Find = _nothing,
        progress: Progress = quiet,
    ) -> Any:
        """Start an upload (a new version under `parent_model` when given); return the operation name, or
        what `find` found when the answer was lost but the upload happened."""
        aip = self.aip
        model = aip.Model(
            display_name=display_name,
            labels=labels,
            artifact_uri=artifact_uri,
            container_spec=aip.ModelContainerSpec(
                image_uri=spec.image,
                env=[aip.EnvVar(name=k, value=v) for k, v in sorted(spec.env.items())],
                ports=[aip.Port(container_port=spec.port)],
                health_route=spec.health_route,
                predict_route=spec.predict_route,
                deployment_timeout={"seconds": min(spec.deployment_timeout_s, 7200)},
            ),
        )
        request = aip.UploadModelRequest(parent=self.cloud.parent, model=model, parent_model=parent_model)
        return self._create(
            "upload the model", lambda: self.models.upload_model(request=request, retry=None), find, progress
        )

    @staticmethod
    def uploaded_version(response: Any) -> str:
        """'model@version' from a finished upload operation's response."""
        from google.cloud import aiplatform_v1

        uploaded = aiplatform_v1.UploadModelResponse.deserialize(response.value)
        return f"{uploaded.model}@{uploaded.model_version_id}"

    def delete_model(self, name: str) -> str:
        with self._call(f"delete model {name}"):
            return str(self.models.delete_model(name=name, retry=self.cloud.retry()).operation.name)

    @staticmethod
    def check_dedicated(model: Any) -> None:
        """Refuse a model that would make Vertex AI ignore the machine and GPU asked for."""
        from google.cloud import aiplatform_v1

        dedicated = aiplatform_v1.Model.DeploymentResourcesType.DEDICATED_RESOURCES
        if dedicated not in list(model.supported_deployment_resources_types):
            raise CloudError(
                f"model {model.name} does not support dedicated resources: a deploy would ignore "
                "the machine type and GPU",
                hint="upload it again with `sdxlctl upload` (custom container)",
            )

    # ------------------------------------------------------------------ endpoints

    def find_endpoints(self, label: tuple[str, str]) -> list[Any]:
        with self._call("list endpoints"):
            request = {"parent": self.cloud.parent, "filter": f"labels.{label[0]}={label[1]}"}
            return list(self.endpoints.list_endpoints(request=request, retry=self.cloud.retry()))

    def get_endpoint(self, name: str, *, missing_ok: bool = False) -> Any:
        """The endpoint; None if it does not exist and `missing_ok`."""
        from google.api_core.exceptions import NotFound

        with self._call(f"get endpoint {name}"):
            try:
                return self.endpoints.get_endpoint(name=name, retry=self.cloud.retry())
            except NotFound:
                if missing_ok:
                    return None
                raise

    @staticmethod
    def created_endpoint(response: Any) -> Any:
        """The endpoint in a finished create operation's response."""
        from google.cloud import aiplatform_v1

        return aiplatform_v1.Endpoint.deserialize(response.value)

    def create_endpoint(
        self,
        *,
        display_name: str,
        labels: dict[str, str],
        dedicated: bool,
        inference_timeout_s: int,
        find: Find = _nothing,
        progress: Progress = quiet,
    ) -> Any:
        """Start creating the endpoint; the operation name, or what `find` found (see `create_once`)."""
        aip = self.aip
        endpoint = aip.Endpoint(display_name=display_name, labels=labels, dedicated_endpoint_enabled=dedicated)
        if dedicated:
            endpoint.client_connection_config = aip.ClientConnectionConfig(
                inference_timeout={"seconds": inference_timeout_s}
            )
        return self._create(
            "create the endpoint",
            lambda: self.endpoints.create_endpoint(parent=self.cloud.parent, endpoint=endpoint, retry=None),
            find,
            progress,
        )

    def deploy(
        self,
        *,
        endpoint: str,
        model: str,
        display_name: str,
        gpu: GpuOption,
        min_replicas: int,
        max_replicas: int,
        spot: bool = False,
        service_account: str = "",
        find: Find = _nothing,
        progress: Progress = quiet,
    ) -> Any:
        """Start deploying `model` (name@version) on `gpu` with 100% of the traffic; return the operation
        (or what `find` found when the answer was lost: a deployment must not be started twice).

        min_replicas 0 is scale to zero: a Preview of the v1beta1 API, on dedicated endpoints only. `spot`:
        the replicas on Spot VMs (DedicatedResources.spot, in v1 and v1beta1).
        `service_account`: what the container runs as (empty: Vertex AI's own, which may only read the
        Model's artifacts).
        """
        if min_replicas == 0:
            from google.cloud import aiplatform_v1beta1 as aip

            client = self.cloud.client(aip.EndpointServiceClient, f"{self.cloud.region}-aiplatform.googleapis.com")
        else:
            aip, client = self.aip, self.endpoints
        resources = aip.DedicatedResources(
            machine_spec=aip.MachineSpec(
                machine_type=gpu.machine_type,
                accelerator_type=aip.AcceleratorType[gpu.accelerator],
                accelerator_count=gpu.count,
            ),
            min_replica_count=min_replicas,
            max_replica_count=max_replicas,
            spot=spot,
        )
        if max_replicas > max(min_replicas, 1):
            resources.autoscaling_metric_specs = [aip.AutoscalingMetricSpec(metric_name=DUTY_CYCLE_METRIC, target=60)]
        deployed = aip.DeployedModel(
            model=model, display_name=display_name, dedicated_resources=resources, service_account=service_account
        )
        return self._create(
            "deploy the model",
            lambda: client.deploy_model(
                endpoint=endpoint, deployed_model=deployed, traffic_split={"0": 100}, retry=None
            ),
            find,
            progress,
        )

    def undeploy(self, *, endpoint: str, deployed_model_id: str) -> str:
        with self._call(f"undeploy {deployed_model_id}"):
            operation = self.endpoints.undeploy_model(
                endpoint=endpoint, deployed_model_id=deployed_model_id, retry=self.cloud.retry()
            )
        return str(operation.operation.name)

    def delete_endpoint(self, name: str) -> str:
        with self._call(f"delete endpoint {name}"):
            return str(self.endpoints.delete_endpoint(name=name, retry=self.cloud.retry()).operation.name)

    def allow_predict(self, endpoint: str, member: str, role: str) -> bool:
        """Make `role` the only role `member` holds on this endpoint (endpoint IAM is a v1beta1 method);
        True when the policy changed."""
        from google.iam.v1 import policy_pb2

        client = self._endpoint_iam()
        with self._call("allow the UI to call the endpoint"):
            policy = client.get_iam_policy(request={"resource": endpoint}, retry=self.cloud.retry())
            holds = [binding.role for binding in policy.bindings if member in binding.members]
            if holds == [role]:
                return False
            _drop_member(policy, member)
            policy.bindings.append(policy_pb2.Binding(role=role, members=[member]))
            client.set_iam_policy(request={"resource": endpoint, "policy": policy}, retry=self.cloud.retry())
        return True

    def revoke(self, endpoint: str, member: str) -> bool:
        """Take every role of `member` on this endpoint away; True when it had any (False: endpoint gone)."""
        from google.api_core import exceptions as gexc

        client = self._endpoint_iam()
        with self._call(f"revoke {member} on the endpoint"):
            try:
                policy = client.get_iam_policy(request={"resource": endpoint}, retry=self.cloud.retry())
            except gexc.NotFound:
                return False
            if not _drop_member(policy, member):
                return False
            client.set_iam_policy(request={"resource": endpoint, "policy": policy}, retry=self.cloud.retry())
        return True

    def _endpoint_iam(self) -> Any:
        from google.cloud import aiplatform_v1beta1

        return self.cloud.client(
            aiplatform_v1beta1.EndpointServiceClient, f"{self.cloud.region}-aiplatform.googleapis.com"
        )

    # ------------------------------------------------------------------ predict

    def predict(self, endpoint: Any, body: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
        """The server contract's body through Vertex AI's predict; the answer as plain JSON."""
        from google.cloud import aiplatform_v1
        from google.protobuf import json_format

        if endpoint.dedicated_endpoint_enabled and endpoint.dedicated_endpoint_dns:
            # A dedicated endpoint answers only on its own DNS name, not on the regional API host.
            scheme = "http://" if self.cloud.emulated else ""
            client = aiplatform_v1.PredictionServiceClient(
                credentials=self.cloud.credentials(),
                transport="rest",
                client_options={"api_endpoint": scheme + endpoint.dedicated_endpoint_dns},
            )
        else:
            client = self.cloud.client(
                aiplatform_v1.PredictionServiceClient, f"{self.cloud.region}-aiplatform.googleapis.com"
            )
        request = aiplatform_v1.PredictRequest(endpoint=endpoint.name)
        json_format.ParseDict(
            {"instances": body["instances"], "parameters": body.get("parameters", {})},
            request._pb,
            ignore_unknown_fields=False,
        )
        with self._call("predict"):
            response = client.predict(request=request, timeout=timeout_s, retry=self.cloud.retry())
        return json_format.MessageToDict(response._pb)


def _drop_member(policy: Any, member: str) -> bool:
    """Remove `member` from every binding of `policy` (and bindings left empty); whether it was in any."""
    from google.iam.v1 import policy_pb2

    kept, had = [], False
    for binding in policy.bindings:
        members = [m for m in binding.members if m != member]
        had = had or len(members) != len(binding.members)
        if members:
            copy = policy_pb2.Binding()
            copy.CopyFrom(binding)
            del copy.members[:]
            copy.members.extend(members)
            kept.append(copy)
    del policy.bindings[:]
    policy.bindings.extend(kept)
    return had
