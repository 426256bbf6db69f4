"""Target vertex: the Gradio UI on Cloud Run, as an account that may only call this deployment's endpoint."""

from __future__ import annotations

import time

from sdxlctl.config import Config
from sdxlctl.errors import DeployError
from sdxlctl.state import Resource, StateStore
from sdxlctl.steps import Change, Progress, StepResult, quiet
from sdxlctl.vertex.access import PREDICT_ROLE_ID, predict_role
from sdxlctl.vertex.images import build, plan_build
from sdxlctl.vertex.names import DEDICATED_LIMIT_BYTES, OPERATION_TIMEOUT_S, SHARED_LIMIT_BYTES, cloud, names


def plan_ui(config: Config, store: StateStore, *, public: bool) -> StepResult:
    n = names(config)
    built = plan_build(config, store, part="ui")
    access = "public (no sign-in)" if public else "private (callers need roles/run.invoker)"
    changes = [
        *built.changes,
        Change(
            "create",
            "service account",
            n.email(n.account_id),
            f"may only call predict on this deployment's endpoint (custom role {PREDICT_ROLE_ID} on it)",
        ),
        Change("create", "Cloud Run service", n.service_id, f"{access}; 1 vCPU, 1 GiB, 0..4 instances"),
    ]
    return StepResult(changes, dry_run=True)


def ui_deploy(
    config: Config,
    store: StateStore,
    *,
    public: bool,
    progress: Progress = quiet,
    on_log: Progress = quiet,
) -> StepResult:
    """Build the UI image, give it an account that may call only the endpoint, and run it on Cloud Run."""
    from sdxlctl.gcp.iam import ServiceAccounts
    from sdxlctl.gcp.run import CloudRun
    from sdxlctl.gcp.vertex import Vertex

    started = time.monotonic()
    c, n = cloud(config), names(config)
    endpoint = store.read().get(config.name, "endpoint")
    if endpoint is None or not endpoint.name:
        raise DeployError("the UI needs the endpoint", hint="run `sdxlctl deploy` first")
    built = build(config, store, part="ui", progress=progress, on_log=on_log)
    changes = list(built.changes)
    progress("creating the UI's service account")
    accounts = ServiceAccounts(c)
    email = accounts.ensure(n.account_id, f"sdxlctl UI of {config.name}")
    store.record(config.name, Resource(kind="ui-account", name=email, target="vertex"))
    role = predict_role(c, changes)
    granted = Vertex(c).allow_predict(endpoint.name, f"serviceAccount:{email}", role)
    changes.append(Change("update" if granted else "keep", "service account", email, f"{role} on the endpoint only"))
    progress("deploying the UI to Cloud Run")
    service = CloudRun(c).deploy(
        service_id=n.service_id,
        image=built.result,
        env=_ui_env(endpoint, config),
        labels=n.labels,
        service_account=email,
        public=public,
        progress=progress,
        timeout_s=OPERATION_TIMEOUT_S,
    )
    store.record(
        config.name,
        Resource(kind="ui-service", name=service.name, target="vertex", url=service.uri, details={"public": public}),
    )
    changes.append(Change("deploy", "Cloud Run service", service.name, "public" if public else "private"))
    return StepResult(changes, service.uri, time.monotonic() - started)


def _ui_env(endpoint: Resource, config: Config) -> dict[str, str]:
    # max_images: the limit the model server was given as SDXL_MAX_IMAGES, so the slider stops where it does
    env = {"SDXL_ENDPOINT": endpoint.name, "SDXL_UI_MAX_IMAGES": str(config.model.max_images)}
    # the endpoint proxies only predict, so the page cannot ask the server: told what deploy gave it
    dedicated = bool(endpoint.details.get("dedicated"))
    env["SDXL_UI_MAX_REQUEST_BYTES"] = str(DEDICATED_LIMIT_BYTES if dedicated else SHARED_LIMIT_BYTES)
    env["SDXL_UI_REFINER"] = "0" if config.model.refiner == "off" else "1"
    if config.model.loras:  # the page cannot read the server's health through the endpoint: told the names
        env["SDXL_UI_LORAS"] = ",".join(config.model.loras)
    if endpoint.details.get("dedicated") and endpoint.details.get("dns"):
        env["SDXL_VERTEX_API_ENDPOINT"] = f"https://{endpoint.details['dns']}"  # dedicated: its own host only
    return env
