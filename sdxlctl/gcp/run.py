"""Cloud Run v2: the UI service, and who may invoke it."""

from __future__ import annotations

from typing import Any

from sdxlctl.gcp.errors import translated
from sdxlctl.gcp.session import Cloud, Progress, create_once, wait_for


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
    ) -> Any:
        """Create the service, or update it when it exists; wait until it serves; return it."""
        run_v2 = self.run_v2
        service = run_v2.Service(
            labels=labels,
            ingress=run_v2.IngressTraffic.INGRESS_TRAFFIC_ALL,
            invoker_iam_disabled=public,
            template=run_v2.RevisionTemplate(
                service_account=service_account,
                labels=labels,
                containers=[
                    run_v2.Container(
                        image=image,
                        env=[run_v2.EnvVar(name=k, value=v) for k, v in sorted(env.items())],
                        ports=[run_v2.ContainerPort(container_port=8080)],
                        resources=run_v2.ResourceRequirements(limits={"cpu": "1", "memory": "1Gi"}),
                    )
                ],
                scaling=run_v2.RevisionScaling(min_instance_count=0, max_instance_count=4),
            ),
        )
        existing = self.get(service_id)
        operation: Any = None
        if existing is None:

            def create() -> str:
                return str(
                    self.client.create_service(
                        parent=self.cloud.parent, service=service, service_id=service_id, retry=None
                    ).operation.name
                )

            # A lost answer (or a 409 from a create that did happen) leaves the service there: update it
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
            service.name = existing.name
            with self._call(f"deploy service {service_id}"):
                operation = self.client.update_service(service=service, retry=self.cloud.retry()).operation.name
        self.wait(str(operation), what=f"service {service_id}", progress=progress, timeout_s=timeout_s)
        found = self.get(service_id)
        assert found is not None
        return found

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
