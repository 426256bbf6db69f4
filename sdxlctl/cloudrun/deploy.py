"""Target cloudrun: upload (nothing to do: Cloud Run runs the image) and deploy (the model's service on an L4).

A deploy makes the server's own account and its grants (target vertex's), then creates the service, updates
the fields that differ, or leaves it alone: a re-run with the same config sends no update at all.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

from sdxlctl import pricing
from sdxlctl.cloudrun import spec
from sdxlctl.config import Config
from sdxlctl.errors import DeployError
from sdxlctl.gpus import CLOUD_RUN_GPU, gpu
from sdxlctl.pricing.memory import GpuMemory, require_fit
from sdxlctl.state import Resource, StateStore
from sdxlctl.steps import Change, Notice, Outcome, Progress, StepResult, quiet
from sdxlctl.vertex.access import ensure_server_account, lora_plan, refiner_detail, server_account_plan, server_email
from sdxlctl.vertex.names import OPERATION_TIMEOUT_S, cloud, names, replica_count
from sdxlctl.vertex.serve import _check_baked

KIND = "server-service"
SERVICE = "Cloud Run service"
PUBLIC = ("allUsers", "allAuthenticatedUsers")  # members that would make roles/run.invoker anyone's


# ---------------------------------------------------------------- upload


def upload(config: Config, store: StateStore, *, dry_run: bool) -> Outcome:
    """Nothing to register: Cloud Run runs the built image itself (Vertex AI needs a Model, Cloud Run does not)."""
    image = store.read().get(config.name, "server-image")
    what = image.name if image else "the image `sdxlctl build` makes"
    said = f"target cloudrun has no model registry: nothing to upload, Cloud Run runs {what} itself"
    if dry_run:
        return StepResult([Change("unchanged", "model", "(none on Cloud Run)", said)], dry_run=True)
    if image is None:
        raise DeployError("no server image is recorded for this deployment", hint="run `sdxlctl build` first")
    _check_baked(config, image)
    return Notice(f"{said}; next: `sdxlctl deploy`")


# ---------------------------------------------------------------- the plan


def hourly(config: Config) -> float | None:
    """USD per instance-hour while an instance is up (the L4, the vCPUs, the memory); None: no price there."""
    from sdxlctl.errors import UsageError

    run = config.cloudrun
    try:
        return pricing.cloud_run_hourly(
            cpu=run.cpu, memory_gib=run.memory_gib, zonal_redundancy=run.zonal_redundancy, region=config.gcp.region
        )
    except UsageError:  # a region the table has no Cloud Run prices for: the plan still shows
        return None


def price(config: Config) -> str:
    """The plan's price: per instance-hour while up, and what idle costs (nothing at min 0)."""
    run, per_hour = config.cloudrun, hourly(config)
    if per_hour is None:
        return f"no Cloud Run price in the table for {config.gcp.region} (`sdxlctl cost`)"
    said = f"≈ {per_hour:,.2f} USD per instance-hour while up (billed per second)"
    if run.min_instances == 0:
        return said + ", 0 USD while idle (scales to zero)"
    return said + f", ≈ {per_hour * 24 * run.min_instances:,.2f} USD/day idle ({run.min_instances} kept up)"


def shape(config: Config) -> str:
    run = config.cloudrun
    redundancy = "with" if run.zonal_redundancy else "without"
    return (
        f"1 x NVIDIA L4 ({redundancy} zonal redundancy), {run.cpu} vCPU, {run.memory_gib} GiB, "
        f"{replica_count(run.min_instances, run.max_instances).replace('replica', 'instance')}, "
        f"{spec.concurrency(config)} requests each, {run.timeout_s} s per request, private"
    )


def memory_of(config: Config) -> GpuMemory:
    return require_fit(gpu(CLOUD_RUN_GPU.key), dtype=config.model.dtype, refiner=config.model.refiner != "off")


def plan_deploy(config: Config, store: StateStore) -> StepResult:
    """What deploy would do, from the config and the state alone: nothing is called."""
    spec.check(config)
    memory = memory_of(config)
    state = store.read()
    changes = []
    account = server_email(config)
    recorded_account = state.get(config.name, "server-account")
    action = "keep" if recorded_account and recorded_account.name == account else "create"
    changes.append(Change(action, "service account", account, server_account_plan(config)))
    if config.model.refiner != "off":
        changes.append(Change("load", "refiner", config.model.refiner, refiner_detail(config)))
    changes += lora_plan(config)
    said = memory.summary + (f"; {memory.warning}" if memory.warning else "")
    changes.append(Change("warn" if memory.warning else "check", "GPU memory", CLOUD_RUN_GPU.key, said))
    image = state.get(config.name, "server-image")
    service = names(config).server_service_id
    detail = f"{shape(config)}; {price(config)}"
    recorded = state.get(config.name, KIND)
    if recorded is None or image is None:
        changes.append(Change("create", SERVICE, f"{service} in {config.gcp.region}", detail))
    else:
        wanted = spec.server_service(config, image=image.name, account=account)
        if recorded.details.get("spec") == digest(wanted):
            changes.append(Change("unchanged", SERVICE, recorded.name, detail))
        else:
            changed = _recorded_differences(recorded, config, image.name, account) or [
                "settings the state does not record: the server environment, concurrency or probe"
            ]
            changes.append(Change("update", SERVICE, recorded.name, f"{', '.join(changed)}; {detail}"))
    return StepResult(changes, dry_run=True)


def digest(service: Any) -> str:
    """A short fingerprint of the fields sdxlctl sets, kept in the state so that a dry run can say 'unchanged'."""
    from sdxlctl.gcp.run import service_dict

    return hashlib.sha256(json.dumps(service_dict(service), sort_keys=True).encode()).hexdigest()[:16]


def _details(config: Config, image: str, account: str) -> dict[str, Any]:
    run = config.cloudrun
    return {
        "gpu": CLOUD_RUN_GPU.key,
        "cpu": run.cpu,
        "memory_gib": run.memory_gib,
        "min_instances": run.min_instances,
        "max_instances": run.max_instances,
        "zonal_redundancy": run.zonal_redundancy,
        "timeout_s": run.timeout_s,
        "account": account,
        "image": image,
    }


def _recorded_differences(recorded: Resource, config: Config, image: str, account: str) -> list[str]:
    """The fields the state records that the config changes, as `differences` names them (the dry run's view)."""
    said = {"cpu": "cpu", "memory_gib": "memory", "min_instances": "min instances", "max_instances": "max instances"}
    said |= {"zonal_redundancy": "zonal redundancy", "timeout_s": "timeout", "account": "service account"}
    changed = []
    for key, value in _details(config, image, account).items():
        before = recorded.details.get(key)
        if key == "image" and before != value:
            changed.append("image")
        elif key in said and before != value:
            changed.append(f"{said[key]} {before} -> {value}")
    return changed


# ---------------------------------------------------------------- deploy


def deploy(config: Config, store: StateStore, *, progress: Progress = quiet) -> StepResult:
    """The image as the model's Cloud Run service on an L4: created, updated where it differs, or left alone."""
    from sdxlctl.gcp.run import CloudRun

    started = time.monotonic()
    spec.check(config)  # before any request
    memory_of(config)
    image = store.read().get(config.name, "server-image")
    if image is None:
        raise DeployError("no server image is recorded for this deployment", hint="run `sdxlctl build` first")
    _check_baked(config, image)
    changes: list[Change] = []
    account = ensure_server_account(config, store, progress, changes, always=True, target="cloudrun")
    wanted = spec.server_service(config, image=image.name, account=account)
    fingerprint = digest(wanted)  # of the config's service, before a retry names its revision
    runner, service_id = CloudRun(cloud(config)), names(config).server_service_id
    resumed = _resume(config, store, runner, service_id, progress)
    progress(f"looking for the service {service_id}")
    live = runner.get(service_id)
    changed = spec.differences(live, wanted) if live is not None else ["new"]
    if live is not None and not changed and (why := _failed(live)):
        # The same template again would be no change to Cloud Run: a revision named anew makes it try again.
        wanted.template.revision = f"{service_id}-r{int(time.time()) % 10**8:08d}"
        changed = [f"its last rollout failed ({why}): tried again"]
    previous = store.read().get(config.name, KIND)
    if changed:
        # Recorded before the wait, so that teardown and status find a service whose deploy was cut short.
        details = dict(previous.details) if previous else {}
        details |= _details(config, image.name, account) | {"spec": ""}
        url = live.uri if live is not None else (previous.url if previous else "")
        name = runner.name(service_id)
        store.record(config.name, Resource(kind=KIND, name=name, target="cloudrun", url=url, details=details))
        progress(("creating" if live is None else "updating") + f" the service {service_id} ({shape(config)})")

        def pending(operation: str) -> None:  # the rerun of a run cut short waits for it, sending nothing again
            store.update_details(config.name, KIND, operation=operation)

        live = _waited(
            config,
            store,
            lambda: runner.apply(
                service_id, wanted, progress=progress, timeout_s=OPERATION_TIMEOUT_S, on_operation=pending
            ),
        )
    service: Any = live if changed else _settled(runner, service_id, live, progress)  # found, created or updated
    _require_ready(service)
    store.record(config.name, _resource(service, config, image.name, account, fingerprint))
    for member in PUBLIC:  # made public by hand (console, gcloud): the model's service is private, always
        if runner.revoke_invoker(service_id, member):
            changes.append(Change("update", "invoker policy", service_id, f"removed {member}: the service is private"))
    if not changed and resumed:
        changes.append(Change("update", SERVICE, service.name, "resumed the rollout an earlier run started"))
    elif not changed:
        changes.append(Change("unchanged", SERVICE, service.name, shape(config)))
    elif changed == ["new"]:
        changes.append(Change("create", SERVICE, service.name, f"{shape(config)}; {price(config)}"))
    else:
        changes.append(Change("update", SERVICE, service.name, ", ".join(changed)))
    return StepResult(changes, service.uri, time.monotonic() - started)


def _waited(config: Config, store: StateStore, wait: Any) -> Any:
    """`wait()`'s service; the recorded operation is forgotten once it ended, kept while it may go on."""
    from sdxlctl.gcp.errors import CloudError, OperationPending

    try:
        service = wait()
    except OperationPending:
        raise  # it may still finish: the next run waits for it instead of sending the change again
    except CloudError:
        if store.read().get(config.name, KIND):
            store.update_details(config.name, KIND, operation=None)
        raise
    store.update_details(config.name, KIND, operation=None)
    return service


def _resume(config: Config, store: StateStore, runner: Any, service_id: str, progress: Progress) -> bool:
    """Wait for the rollout an earlier run started and did not see end; whether there was one. One that
    failed is said and forgotten: this run sends the config again."""
    from sdxlctl.gcp.errors import CloudError, OperationPending

    recorded = store.read().get(config.name, KIND)
    operation = recorded.details.get("operation") if recorded else None
    if not operation:
        return False
    progress("waiting for the rollout an earlier run started")
    try:
        _waited(
            config,
            store,
            lambda: runner.settle(service_id, operation, progress=progress, timeout_s=OPERATION_TIMEOUT_S),
        )
    except OperationPending:
        raise
    except CloudError as exc:
        progress(f"the rollout an earlier run started failed ({exc.message}); deploying again")
        return False
    return True


def _settled(runner: Any, service_id: str, service: Any, progress: Progress) -> Any:
    """A service an earlier, interrupted run left rolling out: waited for, not updated a second time."""
    started = time.monotonic()
    while service.reconciling and time.monotonic() - started < OPERATION_TIMEOUT_S:
        progress(f"waiting for the rollout an earlier run started ({time.monotonic() - started:.0f}s)")
        time.sleep(runner.cloud.poll_s)
        service = runner.get(service_id) or service
    return service


def _failed(service: Any) -> str:
    """Why Cloud Run ended the service's last rollout in failure ("" when it did not, or still rolls it out)."""
    condition = service.terminal_condition
    if service.reconciling or getattr(condition.state, "name", "") != "CONDITION_FAILED":
        return ""
    return str(condition.message or "no reason given")


def _require_ready(service: Any) -> None:
    """The service's latest revision serves, or the reason Cloud Run gives why not."""
    condition = service.terminal_condition
    state = getattr(condition.state, "name", str(condition.state))
    if state not in ("CONDITION_SUCCEEDED", "STATE_UNSPECIFIED") or not service.latest_ready_revision:
        raise DeployError(
            f"service {service.name} is not ready ({state}): {condition.message or 'no reason given'}",
            hint="`sdxlctl logs` shows why the server did not start; fix it and run `sdxlctl deploy` again",
        )


def _resource(service: Any, config: Config, image: str, account: str, fingerprint: str) -> Resource:
    ready = service.terminal_condition.last_transition_time or service.update_time
    details = _details(config, image, account) | {
        "revision": str(service.latest_ready_revision).rsplit("/", 1)[-1],
        "deployed_at": ready.isoformat() if ready else "",
        "spec": fingerprint,
    }
    return Resource(kind=KIND, name=service.name, target="cloudrun", url=service.uri, details=details)
