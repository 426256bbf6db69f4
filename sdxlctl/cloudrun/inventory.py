"""Target cloudrun: what exists (status) and deleting it all (teardown), found by label and from the state file.

The model's service bills per instance-second while an instance is up: status asks Cloud Monitoring how
many run now (0 when scaled to zero) and how long they were billed since the deploy.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TypedDict

from sdxlctl.config import Config
from sdxlctl.errors import SdxlctlError
from sdxlctl.state import Resource, State, StateStore
from sdxlctl.steps import Change, Progress, Removal, StepResult, plural, quiet
from sdxlctl.vertex.access import revoke_grants
from sdxlctl.vertex.inventory import FOUND, UNRECORDED, delete_cache_and_images
from sdxlctl.vertex.names import LABEL, OPERATION_TIMEOUT_S, cloud, names, own_cache

if TYPE_CHECKING:
    from sdxlctl.gcp.session import Cloud

TARGET = "cloudrun"
SERVICES = ("server-service", "ui-service")
ACCOUNTS = ("server-account", "ui-account")
INVOKER = "roles/run.invoker"


# ---------------------------------------------------------------- status


def live_states(config: Config, resources: dict[str, Resource]) -> dict[str, str]:
    """What Google says of each recorded resource now (one GET each, at once); "gone" for what is not there."""
    from concurrent.futures import ThreadPoolExecutor

    from sdxlctl.gcp.errors import CloudError
    from sdxlctl.gcp.iam import ServiceAccounts
    from sdxlctl.gcp.run import CloudRun

    c = cloud(config)
    states: dict[str, str] = {}

    def check(key: str, resource: Resource) -> None:
        if FOUND in resource.details:  # listed a moment ago: what the listing said is as live as a GET
            states[key] = resource.details[FOUND]
            return
        try:
            if resource.kind in SERVICES:
                service = CloudRun(c).get(resource.name.rsplit("/", 1)[-1])
                states[key] = "gone" if service is None else service_state(c, service, resource.kind)
            elif resource.kind in ACCOUNTS:
                states[key] = "ready" if ServiceAccounts(c).exists(resource.name) else "gone"
        except CloudError as exc:
            states[key] = "gone" if "not found" in exc.message.lower() else f"unknown ({exc.message[:60]})"

    checked = {key: r for key, r in resources.items() if r.target == TARGET and r.name}
    with ThreadPoolExecutor(max_workers=max(1, min(8, len(checked)))) as pool:
        for done in [pool.submit(check, key, resource) for key, resource in checked.items()]:
            done.result()
    return states


def service_state(c: Cloud, service: Any, kind: str) -> str:
    """Deploying until it serves; the model's: "ready, N instances" (Cloud Monitoring's newest sample)."""
    condition = service.terminal_condition
    if not service.uri or service.reconciling:
        return "deploying"
    if condition.type_ and condition.state.name == "CONDITION_FAILED":  # its last change failed
        return f"failed ({condition.message[:80]})"
    if kind != "server-service":
        return "ready"
    from sdxlctl.gcp.monitoring import instance_count

    count = instance_count(c, service.name.rsplit("/", 1)[-1])
    if count is None:
        return "ready, instances unknown (Cloud Monitoring could not be read)"
    return f"ready, {plural(count, 'instance')}" + (" (scaled to zero)" if count == 0 else "")


def unrecorded(config: Config, store: StateStore, state: State) -> dict[str, Resource]:
    """What carries this deployment's label but `state` does not hold: the model's service, the UI's, the
    accounts they run as (as teardown finds them), so that a lost state file hides nothing that bills."""
    from sdxlctl.gcp.errors import CloudError
    from sdxlctl.gcp.run import CloudRun

    c = cloud(config)
    try:
        services = CloudRun(c).find((LABEL, config.name))
    except CloudError as exc:
        if "is not enabled in project" in exc.message:
            return {}
        raise
    recorded = state.of(config.name)
    known = {r.name for r in recorded.values() if r.name}
    pending = {kind for kind, r in recorded.items() if not r.name}  # a create under way
    found: dict[str, Resource] = {}

    def add(kind: str, name: str, live: str, created: Any = None, url: str = "", **details: Any) -> None:
        if not name or name in known or kind in pending:
            return
        known.add(name)
        key = kind if kind not in recorded and kind not in found else f"{kind} {name}"
        since = {"created_at": created} if created else {}
        details = {FOUND: live, "unrecorded": UNRECORDED, **{k: v for k, v in details.items() if v not in (None, "")}}
        found[key] = Resource(kind=kind, name=name, target=TARGET, url=url, details=details, **since)

    for service in services:
        kind = _kind(config, service)
        details = server_details(service) if kind == "server-service" else {}
        add(kind, service.name, service_state(c, service, kind), _stamp(service), service.uri, **details)
    for service in services:
        kind = "server-account" if _kind(config, service) == "server-service" else "ui-account"
        add(kind, service.template.service_account, f"in use by {service.name.rsplit('/', 1)[-1]}", _stamp(service))
    return found


def _kind(config: Config, service: Any) -> str:
    """The model's service by its name, or by its GPU (one renamed by hand still bills as one)."""
    service_id = service.name.rsplit("/", 1)[-1]
    gpu = bool(service.template.node_selector.accelerator)
    return "server-service" if service_id == names(config).server_service_id or gpu else "ui-service"


def server_details(service: Any) -> dict[str, Any]:
    """What cost_so_far needs of a model service it did not record, as deploy records it."""
    template = service.template
    limits = dict(template.containers[0].resources.limits) if template.containers else {}
    ready = service.terminal_condition.last_transition_time
    since = ready if ready and ready.timestamp() > 0 else _stamp(service)
    return {
        "revision": service.latest_ready_revision.rsplit("/", 1)[-1],
        "gpu": "l4" if template.node_selector.accelerator == "nvidia-l4" else template.node_selector.accelerator,
        "cpu": _float(limits.get("cpu")),
        "memory_gib": _float(str(limits.get("memory", "")).removesuffix("Gi")),
        "min_instances": template.scaling.min_instance_count,
        "max_instances": template.scaling.max_instance_count,
        "zonal_redundancy": not template.gpu_zonal_redundancy_disabled,
        "account": template.service_account,
        "deployed_at": since.isoformat() if since else None,
    }


def _float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def _stamp(resource: Any) -> datetime | None:
    stamp = getattr(resource, "create_time", None)
    return stamp if stamp and stamp.timestamp() > 0 else None


def cost_so_far(config: Config, resource: Resource, now: datetime) -> float | None:
    """The model's service since its revision became ready: the instance-seconds Cloud Monitoring says were
    billed, at Cloud Run's prices; without Monitoring, what its standing instances cost at least (None at
    min 0: sdxlctl cannot tell)."""
    if resource.kind != "server-service":
        return None
    from sdxlctl.gcp.monitoring import billable_seconds
    from sdxlctl.pricing import cloud_run_hourly, cloud_run_usd

    details = resource.details  # the state file's: what it says is checked, as anything a person may edit
    since = min(_when(details.get("deployed_at")) or _when(resource.created_at) or now, now)
    seconds = billable_seconds(cloud(config), resource.name.rsplit("/", 1)[-1], since, now)
    standing = _number(details.get("min_instances"), float(config.cloudrun.min_instances))
    try:  # a region the price table lacks: no cost, rather than no status
        if seconds is not None:
            return cloud_run_usd(seconds, **_shape(config, resource))
        if not standing:
            return None
        hourly = cloud_run_hourly(**_shape(config, resource))
    except SdxlctlError:
        return None
    return hourly * int(standing) * (now - since).total_seconds() / 3600


def _when(value: Any) -> datetime | None:
    """An ISO time from the state (UTC when it names no zone); None for anything else."""
    if isinstance(value, str):
        try:
            value = datetime.fromisoformat(value)
        except ValueError:
            return None
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _number(value: Any, default: float) -> float:
    """A count or size from the state: `default` for one that is missing, not a number, NaN, infinite or < 0."""
    import math

    number = _float(value) if not isinstance(value, bool) else None
    return number if number is not None and math.isfinite(number) and number >= 0 else default


class _Shape(TypedDict):
    cpu: float
    memory_gib: float
    zonal_redundancy: bool
    region: str


def _shape(config: Config, resource: Resource) -> _Shape:
    """The instance as deployed (recorded, or read from the live service), else as the config says."""
    details, run = resource.details, config.cloudrun
    return {
        "cpu": _number(details.get("cpu"), 0.0) or float(run.cpu),
        "memory_gib": _number(details.get("memory_gib"), 0.0) or float(run.memory_gib),
        "zonal_redundancy": bool(details.get("zonal_redundancy", run.zonal_redundancy)),
        "region": config.gcp.region,
    }


# ---------------------------------------------------------------- teardown


@dataclass
class Inventory:
    """What teardown will delete: found by label in the cloud, and from the state file."""

    services: list[Any] = field(default_factory=list)  # live services: the UI's first, then the model's
    accounts: list[str] = field(default_factory=list)  # emails: the UI's, the model server's
    cache: str = ""  # the compile cache sdxlctl chose (gs://), deleted with the deployment
    images: list[str] = field(default_factory=list)

    def changes(self) -> list[Change]:
        rows = [Change("delete", "Cloud Run service", s.name, s.uri) for s in self.services]
        rows += [Change("delete", "service account", account, "its grants first") for account in self.accounts]
        if self.cache:
            rows.append(Change("delete", "compile cache", self.cache, "every object under it"))
        rows += [Change("delete", "image", image, "every tag") for image in self.images]
        return rows


KINDS = {
    "ui-service": "Cloud Run service",
    "server-service": "Cloud Run service",
    "ui-account": "service account",
    "server-account": "service account",
}


def teardown_plan(
    config: Config, store: StateStore, *, images: bool, dry_run: bool, progress: Progress = quiet
) -> Removal | StepResult:
    """Everything of this deployment, found by label and from the state; a dry run only from the state."""
    if dry_run:
        return plan_teardown(config, store, images=images)
    progress(f"finding resources labelled {LABEL}={config.name}")
    found = inventory(config, store, images=images)
    return Removal(TARGET, changes=found.changes(), found=found)


def plan_teardown(config: Config, store: StateStore, *, images: bool) -> StepResult:
    """The plan from the state file alone: it calls nothing."""
    recorded = store.read().of(config.name)
    changes = [
        Change("delete", KINDS[kind], r.name or "(being created)", _saving(config, r))
        for kind in KINDS
        if (r := recorded.get(kind)) is not None
    ]
    if own_cache(config):
        changes.append(Change("delete", "compile cache", own_cache(config), "every object under it"))
    where = f"projects/{config.gcp.project}/locations/{config.gcp.region}/repositories/{config.gcp.artifact_repository}"
    # both packages, recorded or not, as the real run deletes them
    changes += [Change("delete", "image", f"{where}/packages/{p}", "every tag") for p in _packages(config, images)]
    changes.append(
        Change("keep", "note", f"a real run also finds resources by the label {LABEL}={config.name}, not only these")
    )
    return StepResult(changes, dry_run=True)


def _saving(config: Config, resource: Resource) -> str:
    # what the model's service bills while it stands: its minimum instances, by the hour
    if resource.kind != "server-service":
        return ""
    standing = int(_number(resource.details.get("min_instances"), float(config.cloudrun.min_instances)))
    if not standing:
        return "min 0 instances: it bills only while it serves"
    from sdxlctl.pricing import cloud_run_hourly

    try:
        hourly = cloud_run_hourly(**_shape(config, resource))
    except SdxlctlError as exc:
        return f"{plural(standing, 'instance')} always up ({exc.message})"
    return f"saves ≈ {hourly * 24 * standing:,.2f} USD/day: {plural(standing, 'instance')} always up"


def inventory(config: Config, store: StateStore, *, images: bool) -> Inventory:
    """Everything of this deployment: by label (so a lost state file loses nothing), plus the state's."""
    from sdxlctl.gcp.run import CloudRun

    run, n, state = CloudRun(cloud(config)), names(config), store.read()
    services = run.find((LABEL, config.name))
    listed = {service.name for service in services}
    # Recorded but not labelled (a label taken off by hand): still ours, but only under the names sdxlctl
    # gives; a state file naming another service or account (the default compute one) must not delete it.
    for kind, service_id in (("server-service", n.server_service_id), ("ui-service", n.service_id)):
        recorded = state.get(config.name, kind)
        if recorded is not None and recorded.name == run.name(service_id) and recorded.name not in listed:
            services += [found for found in [run.get(service_id)] if found is not None]
    found = Inventory(services=sorted(services, key=lambda s: _kind(config, s) == "server-service"))
    own = {n.email(n.server_account_id), n.email(n.account_id)}
    accounts = [state.get(config.name, kind) for kind in ACCOUNTS]
    found.accounts = [account.name for account in accounts if account is not None]
    found.accounts += [service.template.service_account for service in found.services]
    found.accounts = [account for account in dict.fromkeys(found.accounts) if account in own]
    found.cache = own_cache(config)
    found.images = _packages(config, images)
    return found


def _packages(config: Config, images: bool) -> list[str]:  # images carry no labels: named by the deployment
    return [f"{config.name}-server", f"{config.name}-ui"] if images else []


def teardown(config: Config, store: StateStore, removal: Removal, *, progress: Progress = quiet) -> StepResult:
    """Delete what the plan found (the UI first), past failures; what is gone is forgotten, a rerun does the rest."""
    from sdxlctl.gcp.errors import CloudError
    from sdxlctl.gcp.iam import ServiceAccounts
    from sdxlctl.gcp.run import CloudRun

    found: Inventory = removal.found
    started = time.monotonic()
    c = cloud(config)
    run, n = CloudRun(c), names(config)
    changes: list[Change] = []
    failed = 0
    done: set[str] = set()  # the state's kinds that are gone

    def attempt(kind: str, name: str, action: Callable[[], str], forget: str = "") -> bool:
        nonlocal failed
        progress(f"deleting {kind} {name}")
        try:
            outcome = action()
        except CloudError as exc:
            if "not found" not in exc.message.lower():
                failed += 1
                changes.append(Change("failed", kind, name, exc.message + (f" ({exc.hint})" if exc.hint else "")))
                return False
            outcome = "already deleted"
        changes.append(Change("gone" if outcome.startswith("already") else "delete", kind, name, outcome))
        if forget:
            done.add(forget)
        return True

    survivors: list[str] = []  # model services that could not be deleted: their invoker grants go instead
    for service in found.services:
        service_id = service.name.rsplit("/", 1)[-1]

        def delete_service(service_id: str = service_id) -> str:
            gone = not run.delete(service_id, progress=progress, timeout_s=OPERATION_TIMEOUT_S)
            return "already gone" if gone else "deleted"

        kind = _kind(config, service)
        if not attempt("Cloud Run service", service.name, delete_service, forget=kind) and kind == "server-service":
            survivors.append(service_id)
    for email in found.accounts:
        account_id = email.split("@")[0]

        def delete_account(email: str = email, account_id: str = account_id) -> str:
            for service_id in survivors:  # a deleted service took its policy with it; one still there keeps it
                run.revoke_invoker(service_id, f"serviceAccount:{email}")
            revoke_grants(config, store, [], email)  # the server's bucket grants: none left dangling
            return "deleted" if ServiceAccounts(c).delete(account_id) else "already gone"

        kind = "server-account" if account_id == n.server_account_id else "ui-account"
        attempt("service account", email, delete_account, forget=kind)
    delete_cache_and_images(config, c, found.cache, found.images, attempt, progress)
    with store.transaction() as state:
        for kind, resource in list(state.of(config.name).items()):
            # Images are recorded by vertex's build, whatever the target: forgotten only once deleted
            ours = resource.target == TARGET and not kind.endswith("-image")
            if kind in done or (ours and not failed):
                state.remove(config.name, kind)
    return StepResult(changes, seconds=time.monotonic() - started, failed=failed)
