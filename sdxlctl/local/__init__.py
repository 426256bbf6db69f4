"""Target local: the model server and the UI as processes on this machine, started, found and stopped."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from sdxlctl import client
from sdxlctl.config import Config
from sdxlctl.errors import DeployError, Interrupted
from sdxlctl.local import processes
from sdxlctl.local.checks import check as check  # `sdxlctl check`: what running here needs
from sdxlctl.state import Resource, State, StateStore, interrupts_deferred
from sdxlctl.steps import DeployResult, LogLine, LogRequest, Notice, Progress, Removal, TeardownOutcome, TornDown, quiet

SERVER = "local-server"
MODULES = {"local-server": "sdxl_server", "local-ui": "sdxl_ui"}

# Options that mean something on target vertex only: the command line says they are ignored here, and why,
# rather than taking them in silence (core.ignored_options).
IGNORED_OPTIONS = {
    "deploy --gpu": "the model server runs on this machine's own GPU (or CPU); --gpu picks target vertex's GPU",
    "ui-deploy --public": "the UI answers only on [local] host; --public opens target vertex's Cloud Run UI to all",
    "teardown --images": "it builds no images (one made by `sdxlctl build --local` stays in Docker: `docker rmi` it)",
    "batch --gpu": "the lines run on this machine's server; --gpu picks the GPU of target vertex's batch job",
    "batch --replicas": "one local server answers every line; --replicas sizes target vertex's batch job",
    "batch --spot": "nothing is billed on this machine; --spot asks target vertex for Spot VMs",
}

# ---------------------------------------------------------------- build, upload: nothing to do here


def build(
    config: Config, store: StateStore, *, dry_run: bool, progress: Progress = quiet, on_log: Progress = quiet
) -> Notice:
    """Nothing: this target runs the server from this checkout."""
    return Notice(
        "target local runs the server from this checkout: there is no image to build "
        "(`sdxlctl build --local` builds one with Docker)"
    )


def upload(config: Config, store: StateStore, *, dry_run: bool, progress: Progress = quiet) -> Notice:
    """Nothing: there is no model registry on this machine."""
    return Notice("target local has no model registry: nothing to upload")


# ---------------------------------------------------------------- deploy, ui-deploy


def deploy(config: Config, store: StateStore, *, dry_run: bool, progress: Progress = quiet) -> DeployResult | Notice:
    """Make the model server run as the config says: start, restart on a changed config, or do nothing."""
    if dry_run:
        model = config.model
        refiner = f" and refiner {model.refiner!r}" if model.refiner != "off" else ""
        loras = f"; LoRA adapters from {', '.join(model.lora_sources)}" if model.lora_sources else ""
        loras += f"; LoRA adapters loaded at start: {', '.join(model.loras)}" if model.loras else ""
        return Notice(
            f"would start `python -m sdxl_server` with model {model.source!r}{refiner} "
            f"on {config.local.host}:{config.local.server_port}{loras}"
        )
    return _ensure_process(config, store, processes.server_spec(config), progress, what="model server")


def ui_deploy(
    config: Config,
    store: StateStore,
    *,
    public: bool,
    dry_run: bool,
    progress: Progress = quiet,
    on_log: Progress = quiet,
) -> DeployResult | Notice:
    """Run the Gradio UI against the local model server."""
    if dry_run:
        return Notice(f"would start `python -m sdxl_ui` on {config.local.host}:{config.local.ui_port}")
    server = store.read().get(config.name, SERVER)
    if server is None:
        raise DeployError("the UI needs the model server", hint="run `sdxlctl deploy` first")
    return _ensure_process(config, store, processes.ui_spec(config, server.url), progress, what="UI")


def _ensure_process(
    config: Config, store: StateStore, spec: processes.ProcessSpec, progress: Progress, *, what: str
) -> DeployResult:
    started = time.monotonic()
    resource: Resource | None = None
    try:
        mark = processes.marker(config.home, config.name, spec.kind)
        with store.transaction() as state:
            current = state.get(config.name, spec.kind)
            if current is None:  # the state file lost it (damaged and moved aside): the process may still run
                current = unrecorded(config, store, state).get(spec.kind)
                if current is not None:
                    progress(f"found the {what} this folder started before (pid {current.details.get('pid')})")
                    state.put(config.name, current)
            alive = (
                current is not None
                and _started_elsewhere(config, current) is None
                and processes.owns(_details(current))
            )
            if current is not None and alive and current.details.get("digest") == spec.digest:
                resource = current
                action: Literal["started", "restarted", "unchanged", "resumed"] = "unchanged"
            else:
                if current is not None and alive:
                    progress(f"stopping the {what} started with the previous config")
                    processes.stop(_details(current))
                state.remove(config.name, spec.kind)
                store.forget_process(config.name, spec.kind)
                progress(f"starting the {what}")
                log_path = config.home / "logs" / f"{_process_name(config, spec.kind)}.log"
                # Recorded before waiting, so that an interrupted wait leaves a process that status, deploy
                # and teardown all know about; and no Ctrl-C between start and record, or it would run unknown.
                with interrupts_deferred():
                    pid = processes.start(spec, log_path, mark=mark)
                    who = processes.identity_after_start(pid)  # tells it apart from a later process with its pid
                    resource = Resource(
                        kind=spec.kind,
                        name=_process_name(config, spec.kind),
                        target="local",
                        url=f"http://{config.local.host}:{spec.port}",
                        details={
                            "pid": pid,
                            **(who.details() if who else {}),
                            "marker": mark,
                            "port": spec.port,
                            "digest": spec.digest,
                            "log": str(log_path),
                            "module": spec.module,
                            "model": config.model.source,
                            "health_route": spec.health_route,
                            "predict_route": "/predict",
                        },
                    )
                    try:
                        store.record_process(config.name, resource)
                        state.put(config.name, resource)
                        store.write(state)
                    except BaseException:
                        processes.stop(_details(resource))  # unrecorded, it would hold the port with nobody to stop it
                        store.forget_process(config.name, spec.kind)
                        raise
                action = "restarted" if current is not None else "started"
        ready_at_once = action == "unchanged" and processes.health(_health_url(resource))[0] == 200
        if not ready_at_once:
            _wait_until_ready(config, store, resource, progress, what=what)
            if action == "unchanged":
                action = "resumed"
    except KeyboardInterrupt:
        raise _interrupted(resource, what) from None
    return DeployResult(action, resource, time.monotonic() - started, what)


def _interrupted(resource: Resource | None, what: str) -> Interrupted:
    """What a Ctrl-C during deploy or ui-deploy left: a recorded process still starting, or nothing new."""
    command = "ui-deploy" if what == "UI" else "deploy"
    if resource is None:
        return Interrupted(
            f"interrupted before the {what} was started; nothing new runs",
            hint=f"`sdxlctl {command}` starts it; `sdxlctl status` shows what is recorded",
        )
    return Interrupted(
        f"interrupted while waiting for the {what}; it is still starting (pid {resource.details.get('pid')}, recorded)",
        hint=f"`sdxlctl {command}` waits again, `sdxlctl teardown` stops it; log: {resource.details.get('log')}",
    )


def _started_elsewhere(config: Config, resource: Resource) -> str | None:
    """The folder whose sdxlctl started this recorded process, when it is not this one; else None.

    A state folder copied from another (cp -r) records that folder's processes: they are not this
    deployment's to stop, even though the process still matches its record.
    """
    recorded = resource.details.get("marker")
    if resource.target != "local" or not isinstance(recorded, str) or not recorded:
        return None
    if recorded == processes.marker(config.home, config.name, resource.kind):
        return None
    return recorded.partition("::")[0]


def _process_name(config: Config, kind: str) -> str:
    """'sdxl-server' for the local-server of deployment sdxl: its resource name and its log file's."""
    return f"{config.name}-{kind.removeprefix('local-')}"


def _details(resource: Resource) -> dict[str, Any]:
    """A record's details as processes.owns and processes.stop read them."""
    return {"kind": resource.kind, **resource.details}


def unrecorded(config: Config, store: StateStore, state: State) -> dict[str, Resource]:
    """Local processes of this deployment that run but that `state` does not hold, by kind.

    Found by their records in run/ or, failing those, by the marker in their environment: so that a
    damaged or deleted state file does not leave a server running that nothing can stop.
    """
    found = {}
    records = store.process_records(config.name)
    for kind, module in MODULES.items():
        if state.get(config.name, kind) is not None:
            continue
        record = records.get(kind)
        if record is not None and processes.owns(_details(record)):
            found[kind] = record
            continue
        mark = processes.marker(config.home, config.name, kind)
        for pid in processes.find_marked(mark):
            who = processes.identity(pid)
            if who is None:
                continue
            details = {"pid": pid, **who.details(), "marker": mark, "module": module}
            found[kind] = Resource(kind=kind, name=_process_name(config, kind), target="local", details=details)
            break
    return found


def _health_url(resource: Resource) -> str:
    return resource.url + resource.details.get("health_route", "/health")


def _wait_until_ready(config: Config, store: StateStore, resource: Resource, progress: Progress, *, what: str) -> None:
    pid, log_path = resource.details["pid"], Path(resource.details["log"])
    command = "ui-deploy" if resource.kind == "local-ui" else "deploy"
    deadline = time.monotonic() + config.local.startup_timeout_s
    while time.monotonic() < deadline:
        status, body = processes.health(_health_url(resource))
        if status == 200:
            return
        if body.get("status") == "failed" or not processes.owns(_details(resource)):
            processes.stop(_details(resource))
            with store.transaction() as state:
                state.remove(config.name, resource.kind)
            store.forget_process(config.name, resource.kind)
            reason = body.get("reason") or processes.tail(log_path) or "it exited"
            raise DeployError(f"the {what} did not start: {reason}", hint=f"full log: {log_path}")
        model = f" (model {config.model.source!r}: {body['status']})" if "status" in body else ""
        progress(f"starting the {what}{model}")
        time.sleep(0.2)
    raise DeployError(
        f"the {what} was not ready after {config.local.startup_timeout_s:g} s",
        hint=f"it is still running (pid {pid}); `sdxlctl {command}` waits again, `sdxlctl teardown` stops it; "
        f"log: {log_path}",
    )


def predict(
    config: Config, store: StateStore, body: dict[str, Any], *, timeout_s: float, progress: Progress = quiet
) -> tuple[dict[str, Any], str]:
    """The request to the local model server; its checked answer and its URL."""
    resource = store.read().get(config.name, SERVER)
    if resource is None:
        raise DeployError(f"nothing is deployed for {config.name!r} (target local)", hint="run `sdxlctl deploy` first")
    url = resource.url + resource.details.get("predict_route", "/predict")
    return client.predict(url, body, timeout_s=timeout_s), url


def live_states(config: Config, resources: dict[str, Resource]) -> dict[str, str]:
    """Whether each process still runs, and what its health route says."""
    return {kind: _live_state(resource) for kind, resource in resources.items()}


def cost_so_far(config: Config, resource: Resource, now: datetime) -> float | None:
    """Processes on this machine cost nothing."""
    return 0.0


def _live_state(resource: Resource) -> str:
    if not processes.owns(_details(resource)):
        return "stopped"
    code, body = processes.health(_health_url(resource))
    return str(body.get("status") or ("ready" if code == 200 else "starting"))


def teardown_plan(
    config: Config, store: StateStore, *, images: bool, dry_run: bool, progress: Progress = quiet
) -> Removal:
    """What teardown would remove: the recorded processes, and the running ones the state file lost."""
    state = store.read()
    return Removal("local", resources=[*state.of(config.name).values(), *unrecorded(config, store, state).values()])


def teardown(config: Config, store: StateStore, removal: Removal, *, progress: Progress = quiet) -> TornDown:
    """Stop and forget everything of this deployment (also what started since the plan); keep going past a failure."""
    if removal.empty:
        return TornDown([])  # and the state folder stays as it is: nothing was ever recorded
    outcomes = []
    interrupted: Resource | None = None
    with store.transaction() as state:
        found = {**unrecorded(config, store, state), **state.of(config.name)}
        for kind, resource in found.items():
            progress(f"stopping {resource.name}")
            try:
                elsewhere = _started_elsewhere(config, resource)
                if elsewhere is not None:
                    message = f"started from {elsewhere}, not this folder: left alone, forgotten"
                else:
                    message = _stop_local(resource) if resource.target == "local" else "forgotten"
            except KeyboardInterrupt:  # what is stopped so far is written; the rest stays recorded
                interrupted = resource
                break
            except Exception as exc:  # reported per resource; the others still go
                outcomes.append(TeardownOutcome(kind, resource.name, False, str(exc)))
                continue
            state.remove(config.name, kind)
            store.forget_process(config.name, kind)
            outcomes.append(TeardownOutcome(kind, resource.name, True, message))
    if interrupted is not None:
        removed = sum(outcome.ok for outcome in outcomes)  # a failed stop stays recorded too
        left = len(found) - removed
        raise Interrupted(
            f"interrupted while stopping {interrupted.name}; {removed} removed, {left} still recorded "
            f"(pid {interrupted.details.get('pid')} may still run)",
            hint="`sdxlctl teardown` finishes it",
        )
    return TornDown(outcomes)


def _stop_local(resource: Resource) -> str:
    """Stop a recorded local process if it is still the one sdxlctl started; say what happened."""
    details = _details(resource)
    pid = details.get("pid")
    if processes.stop(details):
        if processes.owns(details):
            raise DeployError(f"pid {pid} is still running after SIGKILL")
        return "stopped"
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return f"no usable pid recorded ({pid!r}): nothing signalled, forgotten"
    if processes.identity(pid) is None:
        return f"already gone (pid {pid}), forgotten"
    return f"pid {pid} is not the process sdxlctl started (pid reused or record wrong): left alone, forgotten"


def logs(config: Config, store: StateStore, request: LogRequest, *, warn: Progress = quiet) -> Iterator[LogLine]:
    """The log file the model server (or the UI) writes: the state's record of it, else where start puts it.

    A stopped process's log is still shown: why it stopped is what one looks for.
    """
    from sdxlctl.local import logfile

    ui = request.ui
    kind = "local-ui" if ui else SERVER
    recorded = store.read().get(config.name, kind) or store.process_records(config.name).get(kind)
    log = recorded.details.get("log") if recorded is not None else None
    path = Path(log) if isinstance(log, str) else config.home / "logs" / f"{_process_name(config, kind)}.log"
    if not path.is_file():
        what, command = ("UI", "ui-deploy") if ui else ("model server", "deploy")
        raise DeployError(
            f"no log of the {what} of {config.name!r} (target local): it was never started from {config.home.parent}",
            hint=f"`sdxlctl {command}` starts it; its log is then {path}",
        )
    return logfile.read(path, lines=request.lines, since=request.since, follow=request.follow, warn=warn)
