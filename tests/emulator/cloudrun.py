"""Cloud Run v2 services (with IAM) and IAM service accounts: the UI's side of the cloud."""

from __future__ import annotations

import re
import uuid
from typing import Any

from google.cloud import run_v2
from starlette.requests import Request

from tests.emulator.core import ApiError, Route, World, now, packed, parse, routes
from tests.emulator.run_gpu import validate_gpu
from tests.emulator.run_instances import RunInstances

LOCATION = r"/v2/projects/(?P<project>[^/]+)/locations/(?P<location>[^/]+)"
SERVICE_ID = re.compile(r"^[a-z](?:[a-z0-9-]{0,47}[a-z0-9])?$")
ACCOUNT_ID = re.compile(r"^[a-z](?:[-a-z0-9]{4,28}[a-z0-9])$")


class CloudRun:
    """Services become ready after some polls; IAM policies are kept per service. Each service's URL is a
    loopback listener that plays Google's front end and runs its instances (run_instances.py)."""

    def __init__(self, world: World, instances: RunInstances) -> None:
        self.world = world
        self.instances = instances

    def routes(self) -> list[Route]:
        table = [
            ("POST", LOCATION + r"/services", self.create_service),
            ("GET", LOCATION + r"/services/(?P<service>[^/:]+)", self.get_service),
            ("GET", LOCATION + r"/services", self.list_services),
            ("PATCH", LOCATION + r"/services/(?P<service>[^/:]+)", self.update_service),
            ("DELETE", LOCATION + r"/services/(?P<service>[^/:]+)", self.delete_service),
            ("GET", LOCATION + r"/services/(?P<service>[^/:]+):getIamPolicy", self.get_iam_policy),
            ("POST", LOCATION + r"/services/(?P<service>[^/:]+):setIamPolicy", self.set_iam_policy),
            ("GET", r"/v2/(?P<name>projects/[^/]+/locations/[^/]+/operations/[^/]+)", self.get_operation),
            # IAM (iam.googleapis.com): service accounts
            ("POST", r"/v1/projects/(?P<project>[^/]+)/serviceAccounts", self.create_account),
            ("GET", r"/v1/projects/(?P<project>[^/]+)/serviceAccounts/(?P<account>[^/:]+)", self.get_account),
            ("DELETE", r"/v1/projects/(?P<project>[^/]+)/serviceAccounts/(?P<account>[^/:]+)", self.delete_account),
        ]
        return routes(table)

    def _name(self, p: dict[str, str], service: str | None = None) -> str:
        return f"projects/{p['project']}/locations/{p['location']}/services/{service or p['service']}"

    def _operation(self, p: dict[str, str], service: dict[str, Any], finish: Any, path: str) -> dict[str, Any]:
        name = f"projects/{p['project']}/locations/{p['location']}/operations/{uuid.uuid4()}"
        fault = self.world.take_fault("*", path, operation=True)
        if fault is not None:  # Cloud Run ends a failed rollout: reconciling no more, its terminal condition failed
            error = fault.error

            def failed() -> dict[str, Any]:
                condition = {"type": "Ready", "state": "CONDITION_FAILED", "message": error.message}
                service.update(reconciling=False, terminalCondition={**condition, "lastTransitionTime": now()})
                raise error

            finish, fault = failed, None
        return self.world.start_operation(name, packed(run_v2.Service, service), finish, fault=fault)

    def _validate(self, service: dict[str, Any], location: str) -> None:
        containers = service.get("template", {}).get("containers", [])
        if not containers or not containers[0].get("image"):
            raise ApiError(400, "spec.template.spec.containers[0].image: Required")
        for container in containers:
            if len(container.get("ports", [])) > 1:
                raise ApiError(400, "spec.template.spec.containers[0].ports: at most one port is allowed")
        account = service.get("template", {}).get("serviceAccount")
        if account and account.split("@")[0] not in {
            a["email"].split("@")[0] for a in self.world.table("accounts").values()
        }:
            raise ApiError(400, f"Service account {account} does not exist.")
        validate_gpu(service, location, self.world)

    def _ready(self, record: dict[str, Any], p: dict[str, str]) -> dict[str, Any]:
        generation = int(record.get("generation", "0")) + 1
        revision = f"{p['service'] if 'service' in p else record['name'].rsplit('/', 1)[-1]}-{generation:05d}-abc"
        record.update(
            generation=str(generation),
            observedGeneration=str(generation),
            updateTime=now(),
            latestCreatedRevision=f"{record['name']}/revisions/{revision}",
            latestReadyRevision=f"{record['name']}/revisions/{revision}",
            terminalCondition={"type": "Ready", "state": "CONDITION_SUCCEEDED", "lastTransitionTime": now()},
            reconciling=False,
        )
        if record["name"] in self.world.table("services"):  # not deleted meanwhile
            record["uri"] = self.instances.ready(record)
            record["urls"] = [record["uri"]]
        return record

    def create_service(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        self.instances.emulator_url = str(request.base_url).rstrip("/")  # the instances' metadata server
        service_id = request.query_params.get("serviceId", "")
        if not SERVICE_ID.match(service_id):
            raise ApiError(400, f"service_id {service_id!r} must be 1-49 lowercase letters, digits or '-'")
        service = parse(run_v2.Service, body, "Service")
        self._validate(service, p["location"])
        name = self._name(p, service_id)
        if name in self.world.table("services"):
            raise ApiError(409, f"Resource '{service_id}' already exists.")
        record = {
            **service,
            "name": name,
            "uid": str(uuid.uuid4()),
            "createTime": now(),
            "reconciling": True,
            "etag": f"e{self.world.new_id()}",
        }
        self.world.table("services")[name] = record
        return self._operation(
            p,
            record,
            lambda: packed(run_v2.Service, self._ready(record, {**p, "service": service_id})),
            request.url.path,
        )

    def get_service(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        return self.world.get("services", self._name(p), "Service")

    def list_services(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        prefix = f"projects/{p['project']}/locations/{p['location']}/"
        services = [s for n, s in self.world.table("services").items() if n.startswith(prefix)]
        return {"services": services} if services else {}

    def update_service(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        record = self.world.get("services", self._name(p), "Service")
        service = parse(run_v2.Service, body, "Service")
        self._validate(service, p["location"])
        record.update({k: v for k, v in service.items() if k not in {"name", "uri", "uid", "createTime"}})
        record["reconciling"] = True
        return self._operation(p, record, lambda: packed(run_v2.Service, self._ready(record, p)), request.url.path)

    def delete_service(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        record = self.world.get("services", self._name(p), "Service")
        del self.world.table("services")[record["name"]]
        self.instances.remove(record["name"])
        self.world.table("service-policies").pop(record["name"], None)
        return self._operation(p, record, lambda: packed(run_v2.Service, record), request.url.path)

    def get_iam_policy(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        record = self.world.get("services", self._name(p), "Service")
        return self.world.get_policy("service-policies", record["name"])

    def set_iam_policy(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        record = self.world.get("services", self._name(p), "Service")
        return self.world.set_policy("service-policies", record["name"], body)

    def get_operation(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        return self.world.poll(p["name"])

    # ---------------------------------------------------------------- IAM service accounts

    def create_account(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        body = body or {}
        unknown = set(body) - {"accountId", "serviceAccount"}
        if unknown:
            raise ApiError(400, f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r}")
        account_id = body.get("accountId", "")
        if not ACCOUNT_ID.match(account_id):
            raise ApiError(400, f"accountId {account_id!r} must be 6-30 lowercase letters, digits or '-'")
        email = f"{account_id}@{p['project']}.iam.gserviceaccount.com"
        accounts = self.world.table("accounts")
        if email in accounts:
            raise ApiError(409, f"Service account {account_id} already exists within project projects/{p['project']}.")
        extra = body.get("serviceAccount") or {}
        accounts[email] = {
            "name": f"projects/{p['project']}/serviceAccounts/{email}",
            "projectId": p["project"],
            "uniqueId": self.world.new_id(),
            "email": email,
            "displayName": extra.get("displayName", ""),
            "description": extra.get("description", ""),
        }
        return accounts[email]

    def get_account(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        return self.world.get("accounts", p["account"], "Service account")

    def delete_account(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        self.world.get("accounts", p["account"], "Service account")
        del self.world.table("accounts")[p["account"]]
        return {}
