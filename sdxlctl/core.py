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

from sdxlctl import client, local, pricing
from sdxlctl.config import Config
from sdxlctl.errors import DeployError, SdxlctlError, UsageError
from sdxlctl.state import Resource, StateStore

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
    with store.transaction() as state:
        current = state.get(config.name, spec.kind)
        alive = current is not None and local.is_running(current.details.get("pid", -1), spec.module)
        if current is not None and alive and current.details.get("digest") == spec.digest:
            resource = current
            action: Literal["started", "restarted", "unchanged", "resumed"] = "unchanged"
        else:
            if current is not None and alive:
                progress(f"stopping the {what} started with the previous config")
                local.stop(current.details["pid"], spec.module)
            state.remove(config.name, spec.kind)
            progress(f"starting the {what}")
            log_path = config.home / "logs" / f"{config.name}-{spec.kind.removeprefix('local-')}.log"
            # Recorded before waiting, so that an interrupted wait leaves a process that status, deploy
            # and teardown all know about; and no Ctrl-C between start and record, or it would run unknown.
            with interrupts_deferred():
                pid = local.start(spec, log_path)
                resource = Resource(
                    kind=spec.kind,
                    name=f"{config.name}-{spec.kind.removeprefix('local-')}",
                    target="local",
                    url=f"http://{config.local.host}:{spec.port}",
                    details={
                        "pid": pid,
                        "port": spec.port,
                        "digest": spec.digest,
                        "log": str(log_path),
                        "module": spec.module,
                        "model": config.model.source,
                        "health_route": spec.health_route,
                        "predict_route": "/predict",
                    },
                )
                state.put(config.name, resource)
                store.write(state)
            action = "restarted" if current is not None else "started"
    ready_at_once = action == "unchanged" and local.health(_health_url(resource))[0] == 200
    if not ready_at_once:
        _wait_until_ready(config, store, resource, progress, what=what)
        if action == "unchanged":
            action = "resumed"
    return DeployResult(action, resource, time.monotonic() - started, what)


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
    pid, log_path, module = resource.details["pid"], Path(resource.details["log"]), resource.details["module"]
    deadline = time.monotonic() + config.local.startup_timeout_s
    while time.monotonic() < deadline:
        status, body = local.health(_health_url(resource))
        if status == 200:
            return
        if body.get("status") == "failed" or not local.is_running(pid, module) or local.is_zombie(pid):
            local.stop(pid, module)
            with store.transaction() as state:
                state.remove(config.name, resource.kind)
            reason = body.get("reason") or local.tail(log_path) or "it exited"
            raise DeployError(f"the {what} did not start: {reason}", hint=f"full log: {log_path}")
        progress(
            f"starting the {what}" + (f" (model {config.model.source!r}: {body['status']})" if "status" in body else "")
        )
        time.sleep(0.2)
    raise DeployError(
        f"the {what} was not ready after {config.local.startup_timeout_s:g} s",
        hint=f"it is still running (pid {pid}); `sdxlctl deploy` waits again, `sdxlctl teardown` stops it; "
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
    started = time.monotonic()
    if config.target == "vertex":
        from sdxlctl import cloud

        answer = cloud.predict(config, store, body, timeout_s=config.model.time_limit_s + 10)
        url = config.name
    else:
        resource = store.read().get(config.name, SERVER)
        if resource is None:
            raise DeployError(
                f"nothing is deployed for {config.name!r} (target local)", hint="run `sdxlctl deploy` first"
            )
        url = resource.url + resource.details.get("predict_route", "/predict")
        answer = client.predict(url, body, timeout_s=config.model.time_limit_s + 10)
    seconds = time.monotonic() - started
    prediction = answer["predictions"][0]
    paths = write_images(options.output, [base64.b64decode(image) for image in prediction["images"]])
    return PredictResult(
        paths, prediction["seeds"], prediction["width"], prediction["height"], prediction["output_format"], seconds, url
    )


def write_images(output: Path, images: list[bytes]) -> list[Path]:
    """out.png, out-1.png, out-2.png, ...: the first keeps the name asked for."""
    output.parent.mkdir(parents=True, exist_ok=True)
    paths = [output if i == 0 else output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(len(images))]
    for path, data in zip(paths, images, strict=True):
        path.write_bytes(data)
    return paths


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
    resources = store.read().of(config.name)
    cloud_states: dict[str, str] = {}
    if any(r.target == "vertex" for r in resources.values()):
        from sdxlctl import cloud

        cloud_states = cloud.live_states(config, resources)
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
    module = resource.details.get("module", "sdxl_")
    if not local.is_running(resource.details.get("pid", -1), module) or local.is_zombie(resource.details["pid"]):
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
    """What teardown would remove (target local)."""
    return list(store.read().of(config.name).values())


def teardown(config: Config, store: StateStore, *, progress: Progress = _quiet) -> list[TeardownOutcome]:
    """Stop and forget everything of this deployment; keep going past a failure."""
    outcomes = []
    with store.transaction() as state:
        for kind, resource in list(state.of(config.name).items()):
            progress(f"stopping {resource.name}")
            try:
                if resource.target == "local":
                    pid = resource.details.get("pid", -1)
                    module = resource.details.get("module", "sdxl_")
                    local.stop(pid, module)
                    if local.is_running(pid, module) and not local.is_zombie(pid):
                        raise DeployError(f"pid {pid} is still running")
            except Exception as exc:  # reported per resource; the others still go
                outcomes.append(TeardownOutcome(kind, resource.name, False, str(exc)))
                continue
            state.remove(config.name, kind)
            outcomes.append(TeardownOutcome(kind, resource.name, True, "stopped"))
    return outcomes


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

    cloud = Cloud(
        config.gcp.project or "-", config.gcp.region, config.gcp.api_endpoint.rstrip("/"), config.gcp.poll_interval_s
    )
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
    )


def cost_compare(
    config: Config, *, region: str | None = None, steps: int = 30, live: bool = False, warn: Progress = _quiet
) -> list[pricing.Comparison]:
    """Every GPU option side by side in the region, at the config's fast-path level."""
    table = price_table(config, live=live, warn=warn)
    return pricing.compare(region or config.gcp.region, steps, table, config.model.optimize)
