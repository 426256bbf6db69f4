"""Target cloudrun: the Gradio UI on Cloud Run, as an account that may only invoke the model's service.

The UI is target vertex's (the same image, 1 vCPU and 1 GiB, public only when asked); what differs is whom it
calls and how: the model's private Cloud Run service, with an ID token of its own account (SDXL_AUTH=id-token),
which holds roles/run.invoker on that service and nothing else.
"""

from __future__ import annotations

import time
from typing import Any

from sdxlctl.config import Config
from sdxlctl.errors import DeployError
from sdxlctl.inputs import CLOUD_RUN_LIMIT_BYTES
from sdxlctl.state import Resource, StateStore
from sdxlctl.steps import Change, Progress, StepResult, quiet
from sdxlctl.vertex.images import build, plan_build
from sdxlctl.vertex.names import OPERATION_TIMEOUT_S, Names, cloud, names

INVOKER_ROLE = "roles/run.invoker"
# What CloudRun.deploy gives every UI service: compared on a re-run, so that nothing changes when nothing differs
UI_LIMITS = {"cpu": "1", "memory": "1Gi"}
UI_MAX_INSTANCES = 4
MAX_TIMEOUT_S = 3600  # Cloud Run's longest request


def ui_timeout_s(config: Config) -> int:
    """How long the UI's service lets a browser's request run: Cloud Run's default (300 s) would cut it while
    the model's instance starts and then generates (the UI itself waits that long with SDXL_AUTH=id-token)."""
    return min(MAX_TIMEOUT_S, config.cloudrun.timeout_s + config.cloudrun.startup_timeout_s)


def plan_ui(config: Config, store: StateStore, *, public: bool) -> StepResult:
    """What ui-deploy would do: the image, the account and its one grant, the service."""
    n = names(config)
    built = plan_build(config, store, part="ui")
    server = store.read().get(config.name, "server-service")
    model = server.url if server is not None and server.url else f"{n.server_service_id} (after `sdxlctl deploy`)"
    access = "public (no sign-in)" if public else "private (callers need roles/run.invoker)"
    changes = [
        *built.changes,
        Change(
            "create",
            "service account",
            n.email(n.account_id),
            f"may only invoke the model's service ({INVOKER_ROLE} on {_service_id(server, n)})",
        ),
        Change(
            "create",
            "Cloud Run service",
            n.service_id,
            f"{access}; 1 vCPU, 1 GiB, 0..{UI_MAX_INSTANCES} instances, {ui_timeout_s(config)} s per request; "
            f"calls {model} with its own ID token",
        ),
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
    """Build the UI image, give it an account that may invoke only the model's service, and run it on Cloud Run."""
    from sdxlctl.gcp.iam import ServiceAccounts
    from sdxlctl.gcp.run import CloudRun

    started = time.monotonic()
    c, n = cloud(config), names(config)
    server = store.read().get(config.name, "server-service")
    if server is None or not server.url:
        raise DeployError("the UI needs the model's Cloud Run service", hint="run `sdxlctl deploy` first")
    run = CloudRun(c)
    model_id = _service_id(server, n)
    model = run.get(model_id)  # before the build: a UI for a service that is gone would be an image for nothing
    if model is None:
        raise DeployError(f"the model's Cloud Run service {model_id} is gone", hint="run `sdxlctl deploy` first")
    built = build(config, store, part="ui", progress=progress, on_log=on_log)
    changes = list(built.changes)
    progress("creating the UI's service account")
    email = ServiceAccounts(c).ensure(n.account_id, f"sdxlctl UI of {config.name}")
    store.record(config.name, Resource(kind="ui-account", name=email, target="cloudrun"))
    granted = run.allow_invoker(model_id, f"serviceAccount:{email}")
    changes.append(
        Change("update" if granted else "keep", "service account", email, f"{INVOKER_ROLE} on {model_id} only")
    )
    if not model.uri:  # never the state's url: the UI sends its ID token there
        raise DeployError(f"the model's Cloud Run service {model_id} has no URL yet", hint="run `sdxlctl deploy`")
    env = ui_env(config, model.uri)
    existing = run.get(n.service_id)
    timeout = ui_timeout_s(config)
    same = existing is not None and same_service(existing, built.result, env, n.labels, email, public=public)
    if existing is not None and same and existing.template.timeout.total_seconds() == timeout:
        service, action = existing, "unchanged"
    else:
        progress("deploying the UI to Cloud Run")
        service = run.deploy(
            service_id=n.service_id,
            image=built.result,
            env=env,
            labels=n.labels,
            service_account=email,
            public=public,
            progress=progress,
            timeout_s=OPERATION_TIMEOUT_S,
            request_timeout_s=timeout,
        )
        action = "create" if existing is None else "update"
    store.record(
        config.name,
        Resource(kind="ui-service", name=service.name, target="cloudrun", url=service.uri, details={"public": public}),
    )
    changes.append(Change(action, "Cloud Run service", service.name, "public" if public else "private"))
    return StepResult(changes, service.uri, time.monotonic() - started)


def ui_env(config: Config, model_url: str) -> dict[str, str]:
    """The UI's environment: the model service's URL, called with an ID token for it, and what the page offers."""
    env = {
        "SDXL_ENDPOINT": model_url,
        "SDXL_AUTH": "id-token",
        # the slider stops where the server does ([model] max_images is its SDXL_MAX_IMAGES)
        "SDXL_UI_MAX_IMAGES": str(config.model.max_images),
        "SDXL_UI_MAX_REQUEST_BYTES": str(CLOUD_RUN_LIMIT_BYTES),
        # the page does not ask the server's health (that would start a GPU instance per page load): told instead
        "SDXL_UI_REFINER": "0" if config.model.refiner == "off" else "1",
    }
    if config.model.loras:
        env["SDXL_UI_LORAS"] = ",".join(config.model.loras)
    return env


def same_service(
    service: Any, image: str, env: dict[str, str], labels: dict[str, str], account: str, *, public: bool
) -> bool:
    """Whether the live service already runs as ui_deploy would deploy it (a re-run then changes nothing)."""
    template = service.template
    if len(template.containers) != 1:
        return False
    container = template.containers[0]
    return (
        container.image == image
        and {e.name: e.value for e in container.env} == env
        and dict(container.resources.limits) == UI_LIMITS
        and dict(service.labels) == labels
        and dict(template.labels) == labels
        and template.service_account == account
        and bool(service.invoker_iam_disabled) == public
        and template.scaling.max_instance_count == UI_MAX_INSTANCES
    )


def _service_id(server: Resource | None, n: Names) -> str:
    """The model's service id: the name `deploy` gives it, whatever the state file says (a state naming
    another service of the project must not get the UI's account invoker on it, nor the UI's requests)."""
    return n.server_service_id
