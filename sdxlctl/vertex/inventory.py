"""Target vertex: what exists (status) and deleting it all (teardown), found by label and from the state file."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sdxlctl.config import Config
from sdxlctl.state import Resource, State, StateStore
from sdxlctl.steps import Change, Progress, StepResult, plural, quiet
from sdxlctl.vertex import batch_inventory
from sdxlctl.vertex.access import kept_role, revoke_grants
from sdxlctl.vertex.names import LABEL, OPERATION_TIMEOUT_S, cloud, names, own_cache

if TYPE_CHECKING:
    from sdxlctl.gcp.session import Cloud


def live_states(config: Config, resources: dict[str, Resource]) -> dict[str, str]:
    """What Google says of each recorded resource now: serving, ready, gone, ... (one GET each, at once)."""
    from concurrent.futures import ThreadPoolExecutor

    from sdxlctl.gcp.errors import CloudError
    from sdxlctl.gcp.run import CloudRun
    from sdxlctl.gcp.vertex import Vertex

    c = cloud(config)
    vertex = Vertex(c) if any(r.kind in ("endpoint", "model") for r in resources.values()) else None
    states: dict[str, str] = {}

    def check(key: str, resource: Resource) -> None:
        kind = resource.kind
        if FOUND in resource.details:  # listed a moment ago: what the listing said is as live as a GET
            states[key] = resource.details[FOUND]
            return
        try:
            if kind == "endpoint" and vertex is not None:
                endpoint = vertex.get_endpoint(resource.name, missing_ok=True)
                states[key] = "gone" if endpoint is None else _endpoint_state(endpoint)
            elif kind == "model" and vertex is not None:
                vertex.get_model(resource.name)
                states[key] = "ready"
            elif kind == "ui-service":
                service = CloudRun(c).get(resource.name.rsplit("/", 1)[-1])
                states[key] = "gone" if service is None else _service_state(service)
            elif kind.startswith("batch-"):
                states[key] = batch_inventory.live_state(c, resource)
            elif kind.endswith("-image"):
                states[key] = "built"
            elif kind.endswith("-account"):
                from sdxlctl.gcp.iam import ServiceAccounts

                states[key] = "ready" if ServiceAccounts(c).exists(resource.name) else "gone"
        except CloudError as exc:
            states[key] = "gone" if "not found" in exc.message.lower() else f"unknown ({exc.message[:60]})"

    checked = {key: r for key, r in resources.items() if r.target == "vertex" and r.name}
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(checked)))) as pool:
        for done in [pool.submit(check, key, resource) for key, resource in checked.items()]:
            done.result()
    return states


def _endpoint_state(endpoint: Any) -> str:
    serving = len(endpoint.deployed_models)
    return f"serving {plural(serving, 'model')}" if serving else "no model"


def _service_state(service: Any) -> str:
    return "ready" if service.uri else "deploying"


# Marks a resource status found by its label rather than in the state file; its value is the live state
FOUND = "found_by_label"
UNRECORDED = "not in this folder's state: found by its label"


def unrecorded(config: Config, store: StateStore, state: State) -> dict[str, Resource]:
    """What carries this deployment's label in the cloud but `state` does not hold, keyed apart from its kinds.

    The same search as teardown's (endpoints, models, the UI's Cloud Run service, the accounts they run
    as), so that a new folder or a lost state file does not hide an endpoint that keeps billing. The
    three lists go out at once; an API that is not enabled holds nothing of ours.
    """
    from concurrent.futures import ThreadPoolExecutor

    from sdxlctl.gcp.errors import CloudError
    from sdxlctl.gcp.run import CloudRun
    from sdxlctl.gcp.vertex import Vertex

    c = cloud(config)
    vertex, run, label = Vertex(c), CloudRun(c), (LABEL, config.name)

    def listed(find: Callable[[tuple[str, str]], list[Any]]) -> list[Any]:
        try:
            return find(label)
        except CloudError as exc:
            if "is not enabled in project" in exc.message:
                return []
            raise

    finds = (vertex.find_endpoints, vertex.find_models, run.find, lambda label: batch_inventory.find(c, label[1]))
    with ThreadPoolExecutor(max_workers=4) as pool:
        lists = [pool.submit(listed, find) for find in finds]
        endpoints, models, services, jobs = (done.result() for done in lists)
    recorded = state.of(config.name)
    # a model is recorded with its version (name@2), listed without
    known = {r.name.split("@")[0] if r.kind == "model" else r.name for r in recorded.values() if r.target == "vertex"}
    pending = {kind for kind, r in recorded.items() if r.target == "vertex" and not r.name}  # a create under way
    found: dict[str, Resource] = {}

    def add(kind: str, name: str, live: str, created: Any = None, url: str = "", **details: Any) -> None:
        if not name or name in known or kind in pending:
            return
        known.add(name)
        key = kind if kind not in recorded and kind not in found else f"{kind} {name}"
        since = {"created_at": created} if created else {}  # an unset timestamp: "since" is unknown, not 1970
        details = {FOUND: live, "unrecorded": UNRECORDED, **{k: v for k, v in details.items() if v not in (None, "")}}
        found[key] = Resource(kind=kind, name=name, target="vertex", url=url, details=details, **since)

    for endpoint in endpoints:
        short = endpoint.name.rsplit("/", 1)[-1]
        console = f"https://console.cloud.google.com/vertex-ai/online-prediction/endpoints/{short}"
        add("endpoint", endpoint.name, _endpoint_state(endpoint), _stamp(endpoint), console, **_billing(endpoint))
    for model in models:
        add("model", model.name, "ready", _stamp(model), version=model.version_id)
    for service in services:
        add("ui-service", service.name, _service_state(service), _stamp(service), service.uri)
    for endpoint in endpoints:
        for deployed in endpoint.deployed_models:
            # since: in use since; the endpoint's id is in its own row (a long word would widen the column)
            add("server-account", deployed.service_account, "in use by the endpoint", _stamp(deployed))
    for service in services:
        add("ui-account", service.template.service_account, "in use by the UI's Cloud Run service", _stamp(service))
    for kind, name, live, created in batch_inventory.listed(jobs):
        add(kind, name, live, created)
    return found


def _stamp(resource: Any) -> datetime | None:
    """The resource's create_time, or None where Google left it unset."""
    stamp = getattr(resource, "create_time", None)
    return stamp if stamp and stamp.timestamp() > 0 else None


def _billing(endpoint: Any) -> dict[str, Any]:
    """What cost_so_far needs of a deployment it did not record: the GPU option, replicas, since when."""
    from sdxlctl.gpus import GPUS

    for deployed in endpoint.deployed_models:
        spec = deployed.dedicated_resources
        machine = spec.machine_spec
        accelerator = getattr(machine.accelerator_type, "name", str(machine.accelerator_type))
        for option in GPUS.values():
            if (option.machine_type, option.accelerator) == (machine.machine_type, accelerator):
                since = _stamp(deployed)
                return {
                    "gpu": option.key,
                    "min_replicas": spec.min_replica_count,
                    "deployed_at": since.isoformat() if since else None,
                }
    return {}


@dataclass
class Inventory:
    """What teardown will delete: found by label in the cloud, and from the state file."""

    endpoints: list[Any] = field(default_factory=list)
    models: list[Any] = field(default_factory=list)
    services: list[Any] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)  # emails: the UI's, the model server's
    cache: str = ""  # the compile cache sdxlctl chose (gs://), deleted with the deployment
    images: list[str] = field(default_factory=list)
    batch_jobs: list[dict[str, Any]] = field(default_factory=list)  # Vertex AI batch prediction jobs, as JSON

    def changes(self) -> list[Change]:
        rows = batch_inventory.changes(self.batch_jobs)
        for endpoint in self.endpoints:
            deployed = len(endpoint.deployed_models)
            detail = f"{plural(deployed, 'deployed model')}, undeployed first"
            rows.append(Change("delete", "endpoint", endpoint.name, detail))
        rows += [Change("delete", "model", m.name, f"version {m.version_id}") for m in self.models]
        rows += [Change("delete", "Cloud Run service", s.name, s.uri) for s in self.services]
        rows += [Change("delete", "service account", account) for account in self.accounts]
        if self.cache:
            rows.append(Change("delete", "compile cache", self.cache, "every object under it"))
        rows += [Change("delete", "image", image, "every tag") for image in self.images]
        return rows


def plan_teardown(config: Config, store: StateStore, *, images: bool) -> StepResult:
    kinds = {
        "endpoint": "endpoint",
        "model": "model",
        "ui-service": "Cloud Run service",
        "ui-account": "service account",
        "server-account": "service account",
    }
    if images:
        kinds.update({"server-image": "image", "ui-image": "image"})
    changes = [
        Change("delete", kinds[kind], r.name or "(being created)")
        for kind, r in store.read().of(config.name).items()
        if kind in kinds
    ]
    if own_cache(config):
        changes.append(Change("delete", "compile cache", own_cache(config), "every object under it"))
    changes += batch_inventory.plan(store.read().of(config.name))
    changes.append(
        Change("keep", "note", f"a real run also finds resources by the label {LABEL}={config.name}, not only these")
    )
    return StepResult(changes, dry_run=True)


def inventory(config: Config, store: StateStore, *, images: bool) -> Inventory:
    """Everything of this deployment: by label (so a lost state file loses nothing), plus the state's."""
    from sdxlctl.gcp.run import CloudRun
    from sdxlctl.gcp.vertex import Vertex

    c = cloud(config)
    vertex, run = Vertex(c), CloudRun(c)
    found = Inventory(
        endpoints=vertex.find_endpoints((LABEL, config.name)),
        models=vertex.find_models((LABEL, config.name)),
        services=run.find((LABEL, config.name)),
        batch_jobs=batch_inventory.find(c, config.name),
    )
    state = store.read()
    accounts = [state.get(config.name, kind) for kind in ("ui-account", "server-account")]
    found.accounts = [account.name for account in accounts if account is not None]
    found.accounts += [service.template.service_account for service in found.services]
    found.accounts += [d.service_account for endpoint in found.endpoints for d in endpoint.deployed_models]
    # Only the accounts sdxlctl names for this deployment: a tampered state, or a labelled endpoint or service
    # running as another account (the default compute one), must not make teardown delete that account.
    n = names(config)
    own = {n.email(n.account_id), n.email(n.server_account_id)}
    found.accounts = [account for account in dict.fromkeys(found.accounts) if account in own]
    found.cache = own_cache(config)
    if images:  # images carry no labels: their names derive from the deployment's
        found.images = [f"{config.name}-server", f"{config.name}-ui"]
    return found


def teardown(config: Config, store: StateStore, found: Inventory, *, progress: Progress = quiet) -> StepResult:
    """Delete what `found` lists, keep going past failures; already-gone counts as done."""
    from sdxlctl.gcp.errors import CloudError
    from sdxlctl.gcp.iam import ServiceAccounts
    from sdxlctl.gcp.run import CloudRun
    from sdxlctl.gcp.vertex import Vertex

    started = time.monotonic()
    c = cloud(config)
    vertex, run = Vertex(c), CloudRun(c)
    changes: list[Change] = []
    failed = 0

    def attempt(kind: str, name: str, action: Callable[[], str], forget: str = "") -> bool:  # forgets all at the end
        nonlocal failed
        progress(f"deleting {kind} {name}")
        try:
            outcome = action()
        except CloudError as exc:
            if "not found" in exc.message.lower():
                changes.append(Change("gone", kind, name, "already deleted"))
                return True
            failed += 1
            changes.append(Change("failed", kind, name, exc.message + (f" ({exc.hint})" if exc.hint else "")))
            return False
        changes.append(Change("delete", kind, name, outcome))
        return True

    batch_inventory.teardown(c, found.batch_jobs, attempt, progress)  # first: running jobs bill GPUs
    for endpoint in found.endpoints:

        def delete_endpoint(endpoint: Any = endpoint) -> str:
            # An interrupted teardown's undeploys may still run: wait for them rather than start a second
            running = vertex.pending_operations(endpoint.name, "UndeployModelOperationMetadata")
            for operation in running:
                vertex.wait(operation, what="undeploy (begun before)", timeout_s=OPERATION_TIMEOUT_S, progress=progress)
            if running:
                endpoint = vertex.get_endpoint(endpoint.name)
            for deployed in endpoint.deployed_models:
                try:
                    vertex.wait(
                        vertex.undeploy(endpoint=endpoint.name, deployed_model_id=deployed.id),
                        what=f"undeploy {deployed.id}",
                        timeout_s=OPERATION_TIMEOUT_S,
                        progress=progress,
                    )
                except CloudError as exc:
                    if "not found" not in exc.message.lower():
                        raise  # else undeployed already: the endpoint itself is still to delete
            vertex.wait(
                vertex.delete_endpoint(endpoint.name),
                what="delete the endpoint",
                timeout_s=OPERATION_TIMEOUT_S,
                progress=progress,
            )
            return f"{plural(len(endpoint.deployed_models), 'model')} undeployed"

        attempt("endpoint", endpoint.name, delete_endpoint)
    for model in found.models:

        def delete_model(model: Any = model) -> str:
            vertex.wait(
                vertex.delete_model(model.name),
                what="delete the model",
                timeout_s=OPERATION_TIMEOUT_S,
                progress=progress,
            )
            return "deleted"

        attempt("model", model.name, delete_model)
    for service in found.services:

        def delete_service(service_id: str = service.name.rsplit("/", 1)[-1]) -> str:
            gone = not run.delete(service_id, progress=progress, timeout_s=OPERATION_TIMEOUT_S)
            return "already gone" if gone else "deleted"

        attempt("Cloud Run service", service.name, delete_service)
    for email in found.accounts:

        def delete_account(email: str = email) -> str:
            revoke_grants(config, store, found.endpoints, email)  # first: none left dangling
            return "deleted" if ServiceAccounts(c).delete(email.split("@")[0]) else "already gone"

        attempt("service account", email, delete_account)
    changes += kept_role(config, found.accounts)
    delete_cache_and_images(config, c, found.cache, found.images, attempt, progress)
    if not failed:
        with store.transaction() as state:
            for kind in list(state.of(config.name)):
                if found.images or not kind.endswith("-image"):
                    state.remove(config.name, kind)
    return StepResult(changes, seconds=time.monotonic() - started, failed=failed)


def cost_so_far(config: Config, resource: Resource, now: datetime) -> float | None:
    """A deployed endpoint costs its machines by the hour from the deployment on (at Spot rates when it was
    deployed on Spot VMs); None where sdxlctl cannot tell."""
    from sdxlctl.pricing import machine_price

    if resource.kind != "endpoint" or "gpu" not in resource.details:
        return None
    hourly = machine_price(resource.details["gpu"], config.gcp.region, spot=resource.details.get("spot") is True)
    if hourly is None:
        return None
    replicas = int(resource.details.get("min_replicas", 1))
    if replicas == 0:
        return None  # scaled to zero: billed only while it is up, which sdxlctl does not see
    since = resource.created_at
    if resource.details.get("deployed_at"):
        since = datetime.fromisoformat(resource.details["deployed_at"])
    return hourly * replicas * max(0.0, (now - since).total_seconds()) / 3600


def delete_cache_and_images(
    config: Config, c: Cloud, cache: str, images: list[str], attempt: Callable[..., bool], progress: Progress
) -> None:
    """What both cloud targets' teardowns delete last: the compile cache sdxlctl chose, then each image package.

    `attempt(kind, name, delete, forget=...)` runs one deletion past failures, as the caller's teardown does;
    `forget` names the state record (server-image, ui-image) a deleted package may take with it.
    """
    from sdxlctl.gcp.storage import Storage

    if cache:

        def delete_cache(uri: str = cache) -> str:
            bucket, _, folder = uri.removeprefix("gs://").partition("/")
            return f"{plural(Storage(c, bucket, {}).delete_folder(folder), 'object')} deleted"

        attempt("compile cache", cache, delete_cache)
    if images:
        from sdxlctl.gcp.registry import Registry

        registry = Registry(c, config.gcp.artifact_repository)
        for package in images:

            def delete_image(package: str = package) -> str:
                return "deleted, all tags" if registry.delete_package(package, progress=progress) else "already gone"

            image = package.removeprefix(f"{config.name}-") + "-image"  # as build records it
            attempt("image", f"{registry.repository}/packages/{package}", delete_image, forget=image)
