"""Target vertex: serving. The image as a Vertex AI Model (upload), on an endpoint's GPU (deploy), asked (predict).

Operations are recorded in the state before they are waited on, so an interrupted step resumes its
operation instead of starting a second one.
"""

from __future__ import annotations

import time
from typing import Any

from sdxlctl.config import Config, Deploy
from sdxlctl.errors import DeployError
from sdxlctl.gpus import GpuOption, gpu
from sdxlctl.pricing.memory import require_fit
from sdxlctl.state import Resource, StateStore, interrupts_deferred
from sdxlctl.steps import Change, Progress, StepResult, quiet
from sdxlctl.vertex.access import ensure_server_account, lora_plan, refiner_detail, server_account_plan
from sdxlctl.vertex.images import bake_of
from sdxlctl.vertex.names import (
    LABEL,
    OPERATION_TIMEOUT_S,
    Names,
    artifact,
    cloud,
    container_env,
    daily_cost,
    machine_of,
    names,
    replica_count,
    server_account,
)

# ---------------------------------------------------------------- upload


def plan_upload(config: Config, store: StateStore) -> StepResult:
    state = store.read()
    image = state.get(config.name, "server-image")
    model = state.get(config.name, "model")
    what = image.name if image else "(the image `sdxlctl build` makes)"
    action = "update" if model else "create"
    detail = f"image {what}; env {container_env(config)}"
    if artifact(config):
        detail += f"; artifact {config.model.source}"
    return StepResult(
        [Change(action, "model", f"{config.name} (Vertex AI Model)", ("new version: " if model else "") + detail)],
        dry_run=True,
    )


def upload(config: Config, store: StateStore, *, progress: Progress = quiet) -> StepResult:
    """Upload the image as a Vertex AI Model; a new version when the container spec changed."""
    from sdxlctl.gcp.vertex import ContainerSpec, Vertex

    started = time.monotonic()
    n, vertex = names(config), Vertex(cloud(config))
    image = store.read().get(config.name, "server-image")
    if image is None:
        raise DeployError("no server image is recorded for this deployment", hint="run `sdxlctl build` first")
    _check_baked(config, image)
    spec = ContainerSpec(
        image=image.name, env=container_env(config), deployment_timeout_s=config.deploy.timeout_min * 60
    )
    artifact_uri = artifact(config)
    progress("looking for the model")
    models = vertex.find_models((LABEL, config.name))
    current = models[0] if models else None
    if current is not None and _same_container(current, spec, artifact_uri):
        version = f"{current.name}@{current.version_id}"
        store.record(config.name, Resource(kind="model", name=version, target="vertex", details={"image": image.name}))
        return StepResult([Change("unchanged", "model", version)], version, time.monotonic() - started)
    progress("uploading the model")

    def uploaded_already() -> Any:  # an upload whose answer was lost: its version carries this container
        found = vertex.find_models((LABEL, config.name))
        return found[0] if found and _same_container(found[0], spec, artifact_uri) else None

    operation = vertex.upload_model(
        display_name=config.name,
        labels=n.labels,
        spec=spec,
        artifact_uri=artifact_uri,
        parent_model=current.name if current else "",
        find=uploaded_already,
        progress=progress,
    )
    if isinstance(operation, str):
        response = vertex.wait(operation, what="upload", timeout_s=OPERATION_TIMEOUT_S, progress=progress)
        version = vertex.uploaded_version(response)
    else:
        version = f"{operation.name}@{operation.version_id}"
    store.record(config.name, Resource(kind="model", name=version, target="vertex", details={"image": image.name}))
    action = "update" if current else "create"
    return StepResult([Change(action, "model", version, f"image {image.name}")], version, time.monotonic() - started)


def _check_baked(config: Config, image: Resource) -> None:
    """A Model whose SDXL_MODEL is the baked folder needs an image that has the configured weights in it."""
    bake = bake_of(config)
    if bake is None:
        return
    if image.details.get("weights_tag") != bake.tag:
        had = image.details.get("weights")
        raise DeployError(
            f"[model] bake = true, but the recorded server image {image.name} has "
            + (f"other weights baked in ({had}, VAE {image.details.get('vae')})" if had else "no weights baked in")
            + f", not {bake.source} (VAE {bake.fetch_vae}, dtype {bake.dtype})",
            hint="run `sdxlctl build` to make the image with them",
        )


def _same_container(model: Any, spec: Any, artifact_uri: str) -> bool:
    container = model.container_spec
    env = {e.name: e.value for e in container.env}
    return (
        container.image_uri == spec.image
        and env == spec.env
        and model.artifact_uri == artifact_uri
        and container.predict_route == spec.predict_route
        and container.health_route == spec.health_route
    )


# ---------------------------------------------------------------- deploy


def plan_deploy(config: Config, store: StateStore) -> StepResult:
    option = gpu(config.deploy.gpu)
    memory = require_fit(option, dtype=config.model.dtype, refiner=config.model.refiner != "off")
    state = store.read()
    endpoint = state.get(config.name, "endpoint")
    model = state.get(config.name, "model")
    d = config.deploy
    changes = []
    if server_account(config):
        recorded = state.get(config.name, "server-account")
        detail = server_account_plan(config)
        changes.append(Change("keep" if recorded else "create", "service account", server_account(config), detail))
    if endpoint is None:
        detail = f"{d.endpoint} endpoint" + (
            " (up to 1 h per request, 10 MB)" if d.endpoint == "dedicated" else " (60 s per request, 1.5 MB)"
        )
        changes.append(Change("create", "endpoint", f"{config.name} in {config.gcp.region}", detail))
    scale = "scale to zero (Preview)" if d.min_replicas == 0 else replica_count(d.min_replicas, d.max_replicas)
    machine = f"{machine_of(option)}, {scale}; {_daily_cost(config, option)}"
    if option.note:
        machine += f"; {option.note}"
    if config.model.refiner != "off":
        changes.append(Change("load", "refiner", config.model.refiner, refiner_detail(config)))
    changes += lora_plan(config)
    said = memory.summary + (f"; {memory.warning}" if memory.warning else "")
    changes.append(Change("warn" if memory.warning else "check", "GPU memory", option.key, said))
    changes.append(Change("deploy", "model", model.name if model else "(the model `sdxlctl upload` makes)", machine))
    return StepResult(changes, dry_run=True)


def deploy(config: Config, store: StateStore, *, progress: Progress = quiet) -> StepResult:
    """Make the endpoint serve the uploaded model on the configured GPU; resume interrupted operations."""
    from sdxlctl.gcp.vertex import Vertex

    started = time.monotonic()
    n, option, d = names(config), gpu(config.deploy.gpu), config.deploy
    require_fit(option, dtype=config.model.dtype, refiner=config.model.refiner != "off")  # before any call
    vertex = Vertex(cloud(config))
    recorded_model = store.read().get(config.name, "model")
    if recorded_model is None:
        raise DeployError("no model is recorded for this deployment", hint="run `sdxlctl upload` first")
    model = vertex.get_model(recorded_model.name)
    vertex.check_dedicated(model)
    changes: list[Change] = []
    account = ensure_server_account(config, store, progress, changes)
    endpoint = _ensure_endpoint(config, store, vertex, n, progress, changes)
    timeout_s = d.timeout_min * 60
    match = _matching_deployment(endpoint, recorded_model.name, option, d, account)
    if match is None:
        pending = store.read().get(config.name, "endpoint")
        operation = pending.details.get("deploy_operation") if pending else None
        resumed = " (resumed the deployment an earlier run started)" if operation else ""
        if operation:
            progress("resuming the deployment started earlier")
        else:
            progress(f"deploying on {machine_of(option)}")

            def deployed_already(endpoint: Any = endpoint) -> Any:
                """A deployModel whose answer was lost: its operation runs on the endpoint, or it is done."""
                running = vertex.pending_operations(endpoint.name, "DeployModelOperationMetadata")
                if running:
                    return running[0]
                now = vertex.get_endpoint(endpoint.name)
                return _matching_deployment(now, recorded_model.name, option, d, account)

            with interrupts_deferred():
                operation = vertex.deploy(
                    endpoint=endpoint.name,
                    model=recorded_model.name,
                    display_name=config.name,
                    gpu=option,
                    min_replicas=d.min_replicas,
                    max_replicas=d.max_replicas,
                    spot=d.spot,
                    service_account=account,
                    find=deployed_already,
                    progress=progress,
                )
                if isinstance(operation, str):
                    store.update_details(config.name, "endpoint", deploy_operation=operation)
        if isinstance(operation, str):
            from sdxlctl.gcp.errors import CloudError, OperationPending

            try:
                vertex.wait(
                    operation,
                    what=f"deploy on {option.machine_type} (GPU deploys take 20-45 min)",
                    timeout_s=timeout_s,
                    progress=progress,
                )
            except OperationPending:
                raise  # it may still finish: the next run waits for it instead of deploying again
            except CloudError:
                store.update_details(config.name, "endpoint", deploy_operation=None)
                raise
            store.update_details(config.name, "endpoint", deploy_operation=None)
        endpoint = vertex.get_endpoint(endpoint.name)
        match = _matching_deployment(endpoint, recorded_model.name, option, d, account)
        if match is None:
            raise DeployError(f"the deployment finished but {endpoint.name} does not serve {recorded_model.name}")
        changes.append(
            Change(
                "deploy",
                "model",
                recorded_model.name,
                f"{machine_of(option)}; {_daily_cost(config, option)}{resumed}",
            )
        )
    else:
        changes.append(Change("unchanged", "deployment", match.id, f"{recorded_model.name} on {machine_of(option)}"))
    for other in list(endpoint.deployed_models):
        if other.id != match.id:  # an earlier version or machine: replaced, now retire it
            progress(f"retiring deployed model {other.id}")
            vertex.wait(
                vertex.undeploy(endpoint=endpoint.name, deployed_model_id=other.id),
                what=f"undeploy {other.id}",
                timeout_s=OPERATION_TIMEOUT_S,
                progress=progress,
            )
            changes.append(Change("delete", "deployment", other.id, "replaced"))
    deployed_at = match.create_time.isoformat() if match.create_time else ""
    store.update_details(
        config.name,
        "endpoint",
        deployed_model_id=match.id,
        gpu=option.key,
        machine=option.machine_type,
        min_replicas=d.min_replicas,
        spot=d.spot,
        deployed_at=deployed_at,
    )
    return StepResult(changes, endpoint.name, time.monotonic() - started)


def _daily_cost(config: Config, option: GpuOption) -> str:
    return daily_cost(option, config.gcp.region, max(config.deploy.min_replicas, 1), spot=config.deploy.spot)


def _ensure_endpoint(
    config: Config, store: StateStore, vertex: Any, n: Names, progress: Progress, changes: list[Change]
) -> Any:
    from sdxlctl.gcp.errors import CloudError, OperationPending

    recorded = store.read().get(config.name, "endpoint")
    if recorded is not None and recorded.name:
        endpoint = vertex.get_endpoint(recorded.name, missing_ok=True)
        if endpoint is not None:
            return endpoint
    operation = recorded.details.get("create_operation") if recorded else None
    if operation:  # an earlier run started it: wait for that one, adopt no half-made endpoint
        progress("waiting for the endpoint an earlier run started creating")
    else:
        found = vertex.find_endpoints((LABEL, config.name))
        if found:
            endpoint = found[0]
            store.record(config.name, _endpoint_resource(endpoint, recorded))
            return endpoint
        progress("creating the endpoint")
        d = config.deploy

        def created_already() -> Any:  # a create whose answer was lost: its endpoint carries the label
            return next(iter(vertex.find_endpoints((LABEL, config.name))), None)

        with interrupts_deferred():
            operation = vertex.create_endpoint(
                display_name=config.name,
                labels=n.labels,
                dedicated=d.endpoint == "dedicated",
                inference_timeout_s=int(min(config.model.time_limit_s + 5, 3600)),
                find=created_already,
                progress=progress,
            )
            if not isinstance(operation, str):
                store.record(config.name, _endpoint_resource(operation, recorded))
                changes.append(Change("create", "endpoint", operation.name, "its answer was lost; found by label"))
                return operation
            store.record(
                config.name,
                Resource(kind="endpoint", name="", target="vertex", details={"create_operation": operation}),
            )
    try:
        response = vertex.wait(operation, what="create the endpoint", timeout_s=OPERATION_TIMEOUT_S, progress=progress)
    except OperationPending:
        raise  # it may still finish: the next run waits for it instead of creating a second endpoint
    except CloudError:
        store.forget(config.name, "endpoint")
        raise
    endpoint = vertex.created_endpoint(response)
    store.record(config.name, _endpoint_resource(endpoint, None))
    changes.append(
        Change("create", "endpoint", endpoint.name, "dedicated" if endpoint.dedicated_endpoint_enabled else "shared")
    )
    return endpoint


def _endpoint_resource(endpoint: Any, previous: Resource | None) -> Resource:
    details = dict(previous.details) if previous else {}
    details.pop("create_operation", None)
    details.update(dedicated=bool(endpoint.dedicated_endpoint_enabled), dns=endpoint.dedicated_endpoint_dns)
    return Resource(
        kind="endpoint",
        name=endpoint.name,
        target="vertex",
        url=f"https://console.cloud.google.com/vertex-ai/online-prediction/endpoints/"
        f"{endpoint.name.rsplit('/', 1)[-1]}",
        details=details,
    )


def _matching_deployment(endpoint: Any, model_version: str, option: GpuOption, d: Deploy, account: str) -> Any:
    """The deployment that serves `model_version` as [deploy] says: machine, replicas, Spot, account."""
    model, _, version = model_version.partition("@")
    for deployed in endpoint.deployed_models:
        spec = deployed.dedicated_resources
        machine = spec.machine_spec
        if (
            deployed.model.split("@")[0] == model
            and (not version or deployed.model_version_id == version)
            and machine.machine_type == option.machine_type
            and machine.accelerator_count == option.count
            and spec.min_replica_count == d.min_replicas
            and spec.max_replica_count == d.max_replicas
            and spec.spot == d.spot  # a change of [deploy] spot deploys anew, then retires the other
            and deployed.service_account == account
        ):
            return deployed
    return None


# ---------------------------------------------------------------- predict


def predict(config: Config, store: StateStore, body: dict[str, Any], *, timeout_s: float) -> tuple[dict[str, Any], str]:
    """The same request as the local target, through the endpoint's predict; the checked answer and who gave it."""
    from sdxlctl.client import checked
    from sdxlctl.gcp.vertex import Vertex

    vertex = Vertex(cloud(config))
    recorded = store.read().get(config.name, "endpoint")
    if recorded is not None and recorded.name:
        endpoint = vertex.get_endpoint(recorded.name)
    else:
        found = vertex.find_endpoints((LABEL, config.name))
        if not found:
            raise DeployError(
                f"no endpoint for {config.name!r} in {config.gcp.region}", hint="run `sdxlctl deploy` first"
            )
        endpoint = found[0]
    if not endpoint.deployed_models:
        raise DeployError(f"endpoint {endpoint.name} serves no model", hint="run `sdxlctl deploy`")
    answer = vertex.predict(endpoint, body, timeout_s=timeout_s)
    # Vertex AI carries predictions as protobuf Values, whose numbers are doubles: 42 comes back as 42.0.
    # The contract's integers are made integers again. Seeds travel as JSON numbers both ways: the server's
    # are below 2**32, and every integer below 2**53 is exact in a double, so none is ever rounded.
    for prediction in answer.get("predictions", []):
        if isinstance(prediction, dict):
            for key in INTEGER_FIELDS & prediction.keys():
                prediction[key] = _integral(prediction[key])
    return checked(answer, f"endpoint {config.name}"), config.name


INTEGER_FIELDS = {"seeds", "width", "height"}


def _integral(value: Any) -> Any:
    """42.0 -> 42, in lists too; anything else as it is (the caller checks the contract)."""
    if isinstance(value, list):
        return [_integral(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value
