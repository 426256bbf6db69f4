"""What sdxlctl does, as functions that take the config and the state store and return data."""

from __future__ import annotations

import base64
import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from sdxlctl import client, local, outputs, pricing
from sdxlctl.config import Config
from sdxlctl.errors import DeployError, Interrupted, PredictError, SdxlctlError, UsageError
from sdxlctl.state import Resource, State, StateStore

Progress = Callable[[str], None]
SERVER = "local-server"
FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}


def _quiet(_: str) -> None:
    pass


# ---------------------------------------------------------------- deploy


@dataclass(frozen=True)
class DeployResult:
    """What deploy did and where the server answers."""

    action: Literal["started", "restarted", "unchanged", "resumed"]
    resource: Resource
    seconds: float
    what: str = "model server"


def deploy(config: Config, store: StateStore, *, progress: Progress = _quiet) -> DeployResult:
    """Make the model server run as the config says: start, restart on a changed config, or do nothing."""
    return _ensure_process(config, store, local.server_spec(config), progress, what="model server")


def ui_deploy(config: Config, store: StateStore, *, progress: Progress = _quiet) -> DeployResult:
    """Run the Gradio UI against the local model server (target local)."""
    server = store.read().get(config.name, SERVER)
    if server is None:
        raise DeployError("the UI needs the model server", hint="run `sdxlctl deploy` first")
    return _ensure_process(config, store, local.ui_spec(config, server.url), progress, what="UI")


def _ensure_process(
    config: Config, store: StateStore, spec: local.ProcessSpec, progress: Progress, *, what: str
) -> DeployResult:
    started = time.monotonic()
    resource: Resource | None = None
    try:
        mark = local.marker(config.home, config.name, spec.kind)
        with store.transaction() as state:
            current = state.get(config.name, spec.kind)
            if current is None:  # the state file lost it (damaged and moved aside): the process may still run
                current = _lost_processes(store, config, state).get(spec.kind)
                if current is not None:
                    progress(f"found the {what} this folder started before (pid {current.details.get('pid')})")
                    state.put(config.name, current)
            alive = (
                current is not None
                and _started_elsewhere(config, current) is None
                and local.owns(_details(current))
            )
            if current is not None and alive and current.details.get("digest") == spec.digest:
                resource = current
                action: Literal["started", "restarted", "unchanged", "resumed"] = "unchanged"
            else:
                if current is not None and alive:
                    progress(f"stopping the {what} started with the previous config")
                    local.stop(_details(current))
                state.remove(config.name, spec.kind)
                store.forget_process(config.name, spec.kind)
                progress(f"starting the {what}")
                log_path = config.home / "logs" / f"{_process_name(config, spec.kind)}.log"
                # Recorded before waiting, so that an interrupted wait leaves a process that status, deploy
                # and teardown all know about; and no Ctrl-C between start and record, or it would run unknown.
                with interrupts_deferred():
                    pid = local.start(spec, log_path, mark=mark)
                    who = local.identity_after_start(pid)  # tells it apart from a later process with its pid
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
                        local.stop(_details(resource))  # unrecorded, it would hold the port with nobody to stop it
                        store.forget_process(config.name, spec.kind)
                        raise
                action = "restarted" if current is not None else "started"
        ready_at_once = action == "unchanged" and local.health(_health_url(resource))[0] == 200
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
        f"interrupted while waiting for the {what}; it is still starting (pid {resource.details.get('pid')}, "
        "recorded)",
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
    if recorded == local.marker(config.home, config.name, resource.kind):
        return None
    return recorded.partition("::")[0]


def _process_name(config: Config, kind: str) -> str:
    """'sdxl-server' for the local-server of deployment sdxl: its resource name and its log file's."""
    return f"{config.name}-{kind.removeprefix('local-')}"


def _details(resource: Resource) -> dict[str, Any]:
    """A record's details as local.owns and local.stop read them."""
    return {"kind": resource.kind, **resource.details}


def _lost_processes(store: StateStore, config: Config, state: State) -> dict[str, Resource]:
    """Local processes of this deployment that run but that `state` does not hold, by kind.

    Found by their records in run/ or, failing those, by the marker in their environment: so that a
    damaged or deleted state file does not leave a server running that nothing can stop.
    """
    found = {}
    kinds = {"local-server": "sdxl_server", "local-ui": "sdxl_ui"}
    records = store.process_records(config.name)
    for kind, module in kinds.items():
        if state.get(config.name, kind) is not None:
            continue
        record = records.get(kind)
        if record is not None and local.owns(_details(record)):
            found[kind] = record
            continue
        mark = local.marker(config.home, config.name, kind)
        for pid in local.find_marked(mark):
            who = local.identity(pid)
            if who is None:
                continue
            details = {"pid": pid, **who.details(), "marker": mark, "module": module}
            found[kind] = Resource(kind=kind, name=_process_name(config, kind), target="local", details=details)
            break
    return found


@contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Hold SIGINT until the block is done (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _health_url(resource: Resource) -> str:
    return resource.url + resource.details.get("health_route", "/health")


def _wait_until_ready(config: Config, store: StateStore, resource: Resource, progress: Progress, *, what: str) -> None:
    pid, log_path = resource.details["pid"], Path(resource.details["log"])
    command = "ui-deploy" if resource.kind == "local-ui" else "deploy"
    deadline = time.monotonic() + config.local.startup_timeout_s
    while time.monotonic() < deadline:
        status, body = local.health(_health_url(resource))
        if status == 200:
            return
        if body.get("status") == "failed" or not local.owns(_details(resource)):
            local.stop(_details(resource))
            with store.transaction() as state:
                state.remove(config.name, resource.kind)
            store.forget_process(config.name, resource.kind)
            reason = body.get("reason") or local.tail(log_path) or "it exited"
            raise DeployError(f"the {what} did not start: {reason}", hint=f"full log: {log_path}")
        model = f" (model {config.model.source!r}: {body['status']})" if "status" in body else ""
        progress(f"starting the {what}{model}")
        time.sleep(0.2)
    raise DeployError(
        f"the {what} was not ready after {config.local.startup_timeout_s:g} s",
        hint=f"it is still running (pid {pid}); `sdxlctl {command}` waits again, `sdxlctl teardown` stops it; "
        f"log: {log_path}",
    )


# ---------------------------------------------------------------- predict


@dataclass(frozen=True)
class PredictOptions:
    """What `sdxlctl predict` asks for; None means the server's default."""

    prompt: str
    output: Path
    num_images: int = 1
    negative_prompt: str | None = None
    seed: int | None = None
    steps: int | None = None
    guidance: float | None = None
    width: int | None = None
    height: int | None = None
    style: str | None = None
    output_format: str | None = None
    quality: int | None = None

    @property
    def format(self) -> str:
        """--format, else from the extension of the output file."""
        by_extension = FORMATS.get(self.output.suffix.lower())
        if self.output_format is None:
            if by_extension is None:
                raise UsageError(
                    f"-o {self.output}: cannot tell the image format from {self.output.suffix or 'no extension'!r}",
                    hint="end the file name in .png, .jpg or .webp, or pass --format",
                )
            return by_extension
        if by_extension is not None and by_extension != self.output_format:
            raise UsageError(
                f"--format {self.output_format} does not match -o {self.output}",
                hint=f"name the file *.{self.output_format.replace('jpeg', 'jpg')} or drop --format",
            )
        return self.output_format

    def body(self) -> dict[str, Any]:
        """The request in the server contract."""
        instance: dict[str, Any] = {"prompt": self.prompt}
        optional_instance = {"negative_prompt": self.negative_prompt, "seed": self.seed, "style": self.style}
        instance.update({k: v for k, v in optional_instance.items() if v is not None})
        parameters: dict[str, Any] = {"num_images": self.num_images, "output_format": self.format}
        optional = {
            "num_inference_steps": self.steps,
            "guidance_scale": self.guidance,
            "width": self.width,
            "height": self.height,
            "quality": self.quality,
        }
        parameters.update({k: v for k, v in optional.items() if v is not None})
        return {"instances": [instance], "parameters": parameters}


@dataclass(frozen=True)
class PredictResult:
    """The files written and what made them."""

    paths: list[Path]
    seeds: list[int]
    width: int
    height: int
    output_format: str
    seconds: float
    url: str


def predict(config: Config, store: StateStore, options: PredictOptions) -> PredictResult:
    """Send one prediction to the deployment and write its images (out.png, out-1.png, ...)."""
    body = options.body()  # checks the format before any request
    outputs.check(options.output, options.num_images)  # before the request: never generate for nothing
    started = time.monotonic()
    try:
        if config.target == "vertex":
            from sdxlctl import cloud

            url = config.name
            answer = client.checked(
                cloud.predict(config, store, body, timeout_s=config.model.time_limit_s + 10), f"endpoint {url}"
            )
        else:
            resource = store.read().get(config.name, SERVER)
            if resource is None:
                raise DeployError(
                    f"nothing is deployed for {config.name!r} (target local)", hint="run `sdxlctl deploy` first"
                )
            url = resource.url + resource.details.get("predict_route", "/predict")
            answer = client.predict(url, body, timeout_s=config.model.time_limit_s + 10)
    except KeyboardInterrupt:
        raise Interrupted(
            "interrupted while waiting for the images; nothing was written",
            hint="the deployment keeps running; `sdxlctl predict` asks again",
        ) from None
    seconds = time.monotonic() - started
    prediction = answer["predictions"][0]
    try:
        images = [base64.b64decode(image, validate=True) for image in prediction["images"]]
    except ValueError:
        raise PredictError(f"the answer from {url} carries an image that is not base64") from None
    # Every image the server sent is kept, also past the count asked for (those names were not checked,
    # but a failed write goes to the rescue folder): generated images are never thrown away.
    files = outputs.paths(options.output, len(images))
    paths = outputs.write(files, images, rescue=[config.home / "rescued"], seeds=prediction["seeds"])
    return PredictResult(
        paths, prediction["seeds"], prediction["width"], prediction["height"], prediction["output_format"], seconds, url
    )


# ---------------------------------------------------------------- status


@dataclass(frozen=True)
class ResourceStatus:
    """One row of `sdxlctl status`."""

    kind: str
    name: str
    target: str
    url: str
    created_at: datetime
    uptime_s: float
    state: str
    details: dict[str, Any] = field(default_factory=dict)
    cost_so_far: float | None = None  # USD since creation, for resources billed by the hour


def status(config: Config, store: StateStore) -> list[ResourceStatus]:
    """What exists now for this deployment, checked live, and since when."""
    rows = []
    now = datetime.now(UTC)
    state = store.read()
    resources = state.of(config.name)
    # Running but not in the state file (it was damaged and moved aside): shown, so that nothing runs unseen.
    lost = _lost_processes(store, config, state) if config.target == "local" else {}
    resources = {**lost, **resources}
    cloud_states: dict[str, str] = {kind: f"{_live_state(r)} (not in the state file)" for kind, r in lost.items()}
    if any(r.target == "vertex" for r in resources.values()):
        from sdxlctl import cloud

        cloud_states.update(cloud.live_states(config, resources))
    for resource in resources.values():
        rows.append(
            ResourceStatus(
                kind=resource.kind,
                name=resource.name,
                target=resource.target,
                url=resource.url,
                created_at=resource.created_at,
                uptime_s=resource.age_seconds(now),
                state=cloud_states.get(resource.kind) or _live_state(resource),
                details=resource.details,
                cost_so_far=_cost_so_far(resource, config, now),
            )
        )
    return rows


def _cost_so_far(resource: Resource, config: Config, now: datetime) -> float | None:
    """A deployed endpoint costs its machines by the hour from the deployment on; local things cost nothing."""
    if resource.target == "local":
        return 0.0
    if resource.kind != "endpoint" or "gpu" not in resource.details:
        return None
    hourly = pricing.machine_price(resource.details["gpu"], config.gcp.region)
    if hourly is None:
        return None
    replicas = int(resource.details.get("min_replicas", 1))
    if replicas == 0:
        return None  # scaled to zero: billed only while it is up, which sdxlctl does not see
    since = resource.created_at
    if resource.details.get("deployed_at"):
        since = datetime.fromisoformat(resource.details["deployed_at"])
    return hourly * replicas * max(0.0, (now - since).total_seconds()) / 3600


def _live_state(resource: Resource) -> str:
    if resource.target != "local":
        return "recorded"
    if not local.owns(_details(resource)):
        return "stopped"
    code, body = local.health(_health_url(resource))
    return str(body.get("status") or ("ready" if code == 200 else "starting"))


# ---------------------------------------------------------------- teardown


@dataclass(frozen=True)
class TeardownOutcome:
    """What happened to one resource."""

    kind: str
    name: str
    ok: bool
    message: str


def teardown_plan(config: Config, store: StateStore) -> list[Resource]:
    """What teardown would remove (target local): the recorded, and the running ones the state file lost."""
    state = store.read()
    return [*state.of(config.name).values(), *_lost_processes(store, config, state).values()]


def teardown(config: Config, store: StateStore, *, progress: Progress = _quiet) -> list[TeardownOutcome]:
    """Stop and forget everything of this deployment; keep going past a failure."""
    outcomes = []
    interrupted: Resource | None = None
    with store.transaction() as state:
        found = {**_lost_processes(store, config, state), **state.of(config.name)}
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
    return outcomes


def _stop_local(resource: Resource) -> str:
    """Stop a recorded local process if it is still the one sdxlctl started; say what happened."""
    details = _details(resource)
    pid = details.get("pid")
    if local.stop(details):
        if local.owns(details):
            raise DeployError(f"pid {pid} is still running after SIGKILL")
        return "stopped"
    if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 1:
        return f"no usable pid recorded ({pid!r}): nothing signalled, forgotten"
    if local.identity(pid) is None:
        return f"already gone (pid {pid}), forgotten"
    return f"pid {pid} is not the process sdxlctl started (pid reused or record wrong): left alone, forgotten"


# ---------------------------------------------------------------- cost

LIVE_PRICES_MAX_AGE_S = 24 * 3600


def price_table(config: Config, *, live: bool, warn: Progress = _quiet) -> pricing.PriceTable:
    """The bundled table; with `live`, today's catalog prices (cached a day beside the state), else bundled."""
    table = pricing.bundled()
    if not live:
        return table
    cache = config.home / "live-prices.json"
    try:
        cached = json.loads(cache.read_text())
        fresh = time.time() - cached["fetched_at"] < LIVE_PRICES_MAX_AGE_S
    except (OSError, ValueError, KeyError):
        cached, fresh = None, False
    if cached is not None and fresh:
        regions, fetched_at = cached["regions"], cached["fetched_at"]
    else:
        try:
            regions = _fetch_live(config, sorted({*table.regions, config.gcp.region}))
        except SdxlctlError as exc:
            warn(f"live prices unavailable ({exc.message}); using the bundled table of {table.date}")
            return table
        fetched_at = time.time()
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"fetched_at": fetched_at, "regions": regions}))
    return pricing.with_live(table, regions, time.strftime("%Y-%m-%d", time.gmtime(fetched_at)))


def _fetch_live(config: Config, regions: list[str]) -> dict[str, Any]:
    from sdxlctl.gcp.billing import fetch_regions
    from sdxlctl.gcp.session import Cloud

    gcp = config.gcp  # the configured retry budget too: the catalog is retried through dropped connections
    cloud = Cloud(gcp.project or "-", gcp.region, gcp.api_endpoint.rstrip("/"), gcp.poll_interval_s, gcp.retry_s)
    try:
        return fetch_regions(cloud, regions)
    except SdxlctlError:
        raise
    except Exception as exc:  # no credentials, no network: fall back, with the reason
        raise SdxlctlError(f"{type(exc).__name__}: {exc}") from None


def cost(
    config: Config,
    *,
    days: float,
    gpu_key: str | None = None,
    region: str | None = None,
    live: bool = False,
    warn: Progress = _quiet,
) -> pricing.Estimate:
    """What the config (with overrides) costs over `days`: endpoint, UI and images, as an estimate."""
    from sdxlctl.gpus import gpu

    table = price_table(config, live=live, warn=warn)
    deploy = config.deploy
    return pricing.estimate(
        gpu(gpu_key or deploy.gpu),
        region or config.gcp.region,
        days=days,
        min_replicas=deploy.min_replicas,
        max_replicas=deploy.max_replicas,
        table=table,
        baked=config.model.bake,
    )


def cost_compare(
    config: Config, *, region: str | None = None, steps: int = 30, live: bool = False, warn: Progress = _quiet
) -> list[pricing.Comparison]:
    """Every GPU option side by side in the region, at the config's fast-path level."""
    table = price_table(config, live=live, warn=warn)
    return pricing.compare(region or config.gcp.region, steps, table, config.model.optimize)
