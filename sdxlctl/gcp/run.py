"""Cloud Run v2: services (the model's on target cloudrun, the UI's on every cloud target), and who may invoke them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from sdxlctl.gcp.errors import translated
from sdxlctl.gcp.session import Cloud, Progress, create_once, wait_for

INVOKER = "roles/run.invoker"


def service_message(data: dict[str, Any]) -> Any:
    """A run_v2.Service from its fields as a dict (proto field names, enum names, durations as "600s")."""
    from google.cloud import run_v2
    from google.protobuf import json_format

    pb = json_format.ParseDict(data, run_v2.Service.pb()())
    return run_v2.Service.wrap(pb)


def service_dict(service: Any) -> dict[str, Any]:
    """A run_v2.Service's fields as a dict (proto field names; fields at their default left out)."""
    from google.cloud import run_v2
    from google.protobuf import json_format

    return dict(json_format.MessageToDict(run_v2.Service.pb(service), preserving_proto_field_name=True))


class CloudRun:
    """Cloud Run services in one project and region."""

    def __init__(self, cloud: Cloud) -> None:
        from google.cloud import run_v2

        self.cloud, self.run_v2 = cloud, run_v2
        self.client: Any = cloud.client(run_v2.ServicesClient, "run.googleapis.com")

    def _call(self, action: str) -> Any:
        return translated(action, api="run", project=self.cloud.project, region=self.cloud.region)

    def name(self, service_id: str) -> str:
        return f"{self.cloud.parent}/services/{service_id}"

    def get(self, service_id: str) -> Any | None:
        from google.api_core.exceptions import NotFound

        with self._call(f"get service {service_id}"):
            try:
                return self.client.get_service(name=self.name(service_id), retry=self.cloud.retry())
            except NotFound:
                return None

    def find(self, label: tuple[str, str]) -> list[Any]:
        """Services carrying the label (Cloud Run's list has no label filter: filtered here)."""
        with self._call("list services"):
            services = self.client.list_services(parent=self.cloud.parent, retry=self.cloud.retry())
            return [s for s in services if s.labels.get(label[0]) == label[1]]

    def apply(
        self,
        service_id: str,
        service: Any,
        *,
        progress: Progress,
        timeout_s: float,
        on_operation: Callable[[str], None] | None = None,
    ) -> Any:
        """Create the service, or update it when it exists; wait until its revision serves; return it as it is.

        A create whose answer was lost (or a 409 from one that did happen) finds the service there and
        updates it to `service`, so one run never makes two and always ends with what was asked.
        `on_operation` is told the operation before it is waited on (to record it: a rerun waits for it).
        """
        existing = self.get(service_id)
        operation: Any = None
        if existing is None:

            def create() -> str:
                return str(
                    self.client.create_service(
                        parent=self.cloud.parent, service=service, service_id=service_id, retry=None
                    ).operation.name
                )

            operation = create_once(
                create,
                lambda: self.get(service_id),
                what=f"create service {service_id}",
                cloud=self.cloud,
                api="run",
                progress=progress,
            )
            if not isinstance(operation, str):
                existing = operation
        if existing is not None:
            update = self.run_v2.Service(service)
            update.name = existing.name
            with self._call(f"update service {service_id}"):
                operation = self.client.update_service(service=update, retry=self.cloud.retry()).operation.name
        if on_operation is not None:
            on_operation(str(operation))
        return self.settle(service_id, str(operation), progress=progress, timeout_s=timeout_s)

    def settle(self, service_id: str, operation: str, *, progress: Progress, timeout_s: float) -> Any:
        """Wait for an operation on the service (this run's, or one an earlier run started); the service then."""
        self.wait(operation, what=f"service {service_id}", progress=progress, timeout_s=timeout_s)
        found = self.get(service_id)
        if found is None:
            from sdxlctl.gcp.errors import CloudError

            raise CloudError(f"service {service_id} was deployed but is gone", hint="run the step again")
        return found

    def deploy(
        self,
        *,
        service_id: str,
        image: str,
        env: dict[str, str],
        labels: dict[str, str],
        service_account: str,
        public: bool,
        progress: Progress,
        timeout_s: float,
        request_timeout_s: int | None = None,
    ) -> Any:
        """The UI's service: created, or updated when it exists; waited for until it serves; returned.
        `request_timeout_s`: how long one request may take (None: Cloud Run's default, 300 s)."""
        service = service_message(
            {
                "labels": labels,
                "ingress": "INGRESS_TRAFFIC_ALL",
                "invoker_iam_disabled": public,
                "template": {
                    "service_account": service_account,
                    "labels": labels,
                    "containers": [
                        {
                            "image": image,
                            "env": [{"name": k, "value": v} for k, v in sorted(env.items())],
                            "ports": [{"container_port": 8080}],
                            "resources": {"limits": {"cpu": "1", "memory": "1Gi"}},
                        }
                    ],
                    "scaling": {"min_instance_count": 0, "max_instance_count": 4},
                    **({"timeout": f"{request_timeout_s}s"} if request_timeout_s else {}),
                },
            }
        )
        return self.apply(service_id, service, progress=progress, timeout_s=timeout_s)

    def allow_invoker(self, service_id: str, member: str) -> bool:
        """Give `member` roles/run.invoker on the service (its other roles stay); True when the policy changed."""
        with self._call(f"allow {member} to invoke service {service_id}"):
            policy = self.client.get_iam_policy(request={"resource": self.name(service_id)}, retry=self.cloud.retry())
            binding = next((b for b in policy.bindings if b.role == INVOKER), None)
            if binding is not None and member in binding.members:
                return False
            if binding is None:
                binding = policy.bindings.add(role=INVOKER)
            binding.members.append(member)
            self.client.set_iam_policy(
                request={"resource": self.name(service_id), "policy": policy}, retry=self.cloud.retry()
            )
        return True

    def revoke_invoker(self, service_id: str, member: str) -> bool:
        """Take roles/run.invoker on the service from `member`; True when it held it (False: the service is gone)."""
        from google.api_core.exceptions import NotFound

        with self._call(f"revoke {member}'s invoker role on service {service_id}"):
            try:
                policy = self.client.get_iam_policy(
                    request={"resource": self.name(service_id)}, retry=self.cloud.retry()
                )
            except NotFound:
                return False
            binding = next((b for b in policy.bindings if b.role == INVOKER and member in b.members), None)
            if binding is None:
                return False
            binding.members.remove(member)
            if not binding.members:  # an empty binding is refused by setIamPolicy
                policy.bindings.remove(binding)
            try:
                self.client.set_iam_policy(
                    request={"resource": self.name(service_id), "policy": policy}, retry=self.cloud.retry()
                )
            except NotFound:
                return False
        return True

    def delete(self, service_id: str, *, progress: Progress, timeout_s: float) -> bool:
        """Delete the service; False when it was already gone."""
        from google.api_core.exceptions import NotFound

        with self._call(f"delete service {service_id}"):
            try:
                operation = self.client.delete_service(name=self.name(service_id), retry=self.cloud.retry())
            except NotFound:
                return False
        self.wait(operation.operation.name, what=f"delete service {service_id}", progress=progress, timeout_s=timeout_s)
        return True

    def wait(self, name: str, *, what: str, progress: Progress, timeout_s: float) -> Any:
        return wait_for(
            self.client, name, what=what, timeout_s=timeout_s, progress=progress, api="run", cloud=self.cloud
        )
