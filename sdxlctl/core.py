"""The one door: each command dispatches to the configured target, and returns data for the CLI to render.

A target is a module with the interface of `Target` (local, vertex); a new one is one module and one
line in TARGETS. What is the same on every target (the request, the files written, prices) is here.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from sdxlctl import cloudrun, inputs, local, lora_ops, loras, outputs, pricing, steps, vertex
from sdxlctl.config import Config
from sdxlctl.errors import Interrupted, PredictError, SdxlctlError, UsageError
from sdxlctl.live_prices import price_table as price_table
from sdxlctl.pricing import CloudRunEstimate, Compared, Comparison, Estimate
from sdxlctl.state import Resource, State, StateStore
from sdxlctl.steps import Check, Outcome, PredictResult, Progress, Removal, ResourceStatus, StepResult, TornDown, quiet

FORMATS = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".webp": "webp"}
lora_push, lora_status = lora_ops.push, lora_ops.status  # `sdxlctl lora push`; the LoRA part of `status`

__all__ = ["TARGETS", "CloudRunEstimate", "Compared", "Comparison", "Estimate", "PredictOptions", "Target"]


class Target(Protocol):
    """What each target module offers; a dry run calls nothing and returns the plan."""

    def build(
        self, config: Config, store: StateStore, *, dry_run: bool, progress: Progress = ..., on_log: Progress = ...
    ) -> Outcome: ...

    def upload(self, config: Config, store: StateStore, *, dry_run: bool, progress: Progress = ...) -> Outcome: ...

    def deploy(self, config: Config, store: StateStore, *, dry_run: bool, progress: Progress = ...) -> Outcome: ...

    def ui_deploy(
        self,
        config: Config,
        store: StateStore,
        *,
        public: bool,
        dry_run: bool,
        progress: Progress = ...,
        on_log: Progress = ...,
    ) -> Outcome: ...

    def predict(
        self, config: Config, store: StateStore, body: dict[str, Any], *, timeout_s: float, progress: Progress = ...
    ) -> tuple[dict[str, Any], str]:
        """The checked answer in the server contract, and where it came from."""
        ...

    def unrecorded(self, config: Config, store: StateStore, state: State) -> dict[str, Resource]:
        """What runs for this deployment that the state file does not hold, by kind."""
        ...

    def live_states(self, config: Config, resources: dict[str, Resource]) -> dict[str, str]:
        """What each of these (its own) resources is doing now, by kind."""
        ...

    def cost_so_far(self, config: Config, resource: Resource, now: datetime) -> float | None: ...

    def teardown_plan(
        self, config: Config, store: StateStore, *, images: bool, dry_run: bool, progress: Progress = ...
    ) -> Removal | StepResult: ...

    def logs(
        self, config: Config, store: StateStore, request: steps.LogRequest, *, warn: Progress = ...
    ) -> Iterator[steps.LogLine]:
        """The server's (or the UI's) log lines, oldest first; with `request.follow`, then new ones until closed."""
        ...

    def teardown(
        self, config: Config, store: StateStore, removal: Removal, *, progress: Progress = ...
    ) -> StepResult | TornDown: ...

    def check(self, config: Config, store: StateStore) -> list[Check]: ...


TARGETS: dict[str, Target] = {"local": local, "vertex": vertex, "cloudrun": cloudrun}


def target(name: str) -> Target:
    """The module of target `name` (the config allows only these)."""
    return TARGETS[name]


def ignored_options(config: Config, command: str, given: list[str]) -> list[str]:
    """A line for each option of `command` in `given` that the configured target does nothing with, and why."""
    # A target that uses every option of every step needs no IGNORED_OPTIONS.
    ignored: dict[str, str] = getattr(target(config.target), "IGNORED_OPTIONS", {})
    return [
        f"{option} is ignored on target {config.target}: {ignored[f'{command} {option}']}"
        for option in given
        if f"{command} {option}" in ignored
    ]


# ---------------------------------------------------------------- build, upload, deploy, ui-deploy


def build(
    config: Config,
    store: StateStore,
    *,
    docker: bool = False,
    dry_run: bool = False,
    progress: Progress = quiet,
    on_log: Progress = quiet,
) -> Outcome:
    """The model server's image for the target; with `docker`, built by a local Docker engine, whatever the target."""
    if docker:
        return vertex.build_local(config, store, on_log=on_log)
    return target(config.target).build(config, store, dry_run=dry_run, progress=progress, on_log=on_log)


def upload(config: Config, store: StateStore, *, dry_run: bool = False, progress: Progress = quiet) -> Outcome:
    """Register the image where the target keeps models."""
    return target(config.target).upload(config, store, dry_run=dry_run, progress=progress)


def deploy(config: Config, store: StateStore, *, dry_run: bool = False, progress: Progress = quiet) -> Outcome:
    """Make the model server run as the config says; change only what differs."""
    return target(config.target).deploy(config, store, dry_run=dry_run, progress=progress)


def deploy_cost(config: Config) -> Estimate | CloudRunEstimate | None:
    """What a day of the deployment costs where it is billed (the plan's cost); None on this machine."""
    return None if config.target == "local" else cost(config, days=1)


def ui_deploy(
    config: Config,
    store: StateStore,
    *,
    public: bool = False,
    dry_run: bool = False,
    progress: Progress = quiet,
    on_log: Progress = quiet,
) -> Outcome:
    """Run the Gradio UI against the deployment; public when asked or when [ui] public says so."""
    return target(config.target).ui_deploy(
        config, store, public=public or config.ui.public, dry_run=dry_run, progress=progress, on_log=on_log
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
    modes: inputs.ModeInputs = field(default_factory=inputs.ModeInputs)  # input image, mask, sampler, refiner
    adapters: tuple[loras.Flag, ...] = ()  # --lora, checked

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
        parameters.update({k: v for k, v in optional.items() if v is not None} | self.modes.parameters())
        parameters.update(loras.parameters(self.adapters))
        return {"instances": [instance], "parameters": parameters}


def predict(config: Config, store: StateStore, options: PredictOptions, *, progress: Progress = quiet) -> PredictResult:
    """Send one prediction to the deployment and write its images (out.png, out-1.png, ...)."""
    body = options.body()  # checks the format before any request
    sent = inputs.attach(body, options.modes, request_limit(config))  # reads the input images, fits them
    outputs.check(options.output, options.num_images)  # before the request: never generate for nothing
    started = time.monotonic()
    try:
        answer, url = target(config.target).predict(
            config, store, sent.body, timeout_s=config.model.time_limit_s + 10, progress=progress
        )
    except SdxlctlError as exc:  # a refused --lora is named as its flag (from Vertex AI too, as a CloudError)
        raise loras.explained(inputs.explained(exc), options.adapters) from None
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
    size = prediction["width"], prediction["height"]
    return PredictResult(paths, prediction["seeds"], *size, prediction["output_format"], seconds, url, sent.notes)


def request_limit(config: Config) -> inputs.Limit:
    """What one request to the deployment may carry (the local server takes what a shared endpoint takes)."""
    return inputs.limit_of(config.target, config.deploy.endpoint)


# ---------------------------------------------------------------- status


def status(config: Config, store: StateStore) -> list[ResourceStatus]:
    """What exists now for this deployment, checked live by the target of each, and since when."""
    now = datetime.now(UTC)
    state = store.read()
    # Running but not in the state file (it was damaged and moved aside): shown, so that nothing runs unseen.
    unknown = target(config.target).unrecorded(config, store, state)
    resources = {**unknown, **state.of(config.name)}
    states: dict[str, str] = {}
    for name in dict.fromkeys(r.target for r in resources.values()):
        if name in TARGETS:
            own = {kind: r for kind, r in resources.items() if r.target == name}
            states.update(TARGETS[name].live_states(config, own))
    for kind, resource in unknown.items():
        # The target says how it found what the state file lacks (vertex: by label; local: by process marker)
        states[kind] = f"{states.get(kind, 'recorded')} ({resource.details.get('unrecorded', 'not in the state file')})"
    rows = []
    for kind, resource in resources.items():
        seen = states.get(kind) or "recorded"
        # Deleted behind sdxlctl's back at a time it cannot know: neither its uptime nor its cost runs on.
        live = seen != "gone" and resource.target in TARGETS
        rows.append(
            ResourceStatus(
                kind=resource.kind,
                name=resource.name,
                target=resource.target,
                url=resource.url,
                created_at=resource.created_at,
                uptime_s=resource.age_seconds(now) if seen != "gone" else None,
                state=seen,
                details=resource.details,
                cost_so_far=TARGETS[resource.target].cost_so_far(config, resource, now) if live else None,
                recorded=kind not in unknown,
            )
        )
    return rows


# ---------------------------------------------------------------- logs


def logs(
    config: Config, store: StateStore, request: steps.LogRequest, *, warn: Progress = quiet
) -> Iterator[steps.LogLine]:
    """The model server's log (or the UI's) as `request` asks: the last lines since a time, then followed."""
    return target(config.target).logs(config, store, request, warn=warn)


# ---------------------------------------------------------------- teardown


def teardown_plan(
    config: Config, store: StateStore, *, images: bool = False, dry_run: bool = False, progress: Progress = quiet
) -> Removal | StepResult:
    """What teardown will remove, to show and confirm; a dry run's plan where the target makes one apart."""
    return target(config.target).teardown_plan(config, store, images=images, dry_run=dry_run, progress=progress)


def teardown(
    config: Config, store: StateStore, removal: Removal, *, progress: Progress = quiet
) -> StepResult | TornDown:
    """Remove what `removal` lists (and what the target finds it missed); keep going past a failure."""
    return target(removal.target).teardown(config, store, removal, progress=progress)


def check(config: Config, store: StateStore) -> list[Check]:
    """Whether the target's prerequisites hold (credentials, APIs, quota; or packages and ports), and the fixes."""
    return target(config.target).check(config, store)


# ---------------------------------------------------------------- cost
# Prices are Cloud Run's on target cloudrun, else Vertex AI's: what the config would cost in the cloud.
# `pixels`: the images' width x height, for the speed and the price per image (1024x1024 unless given).


def cost(
    config: Config,
    *,
    days: float,
    gpu_key: str | None = None,
    region: str | None = None,
    live: bool = False,
    warn: Progress = quiet,
    steps: int = 30,
    pixels: int = pricing.SDXL_PIXELS,
) -> Estimate | CloudRunEstimate:
    """What the config (with overrides) costs over `days`: endpoint, UI and images, as an estimate."""
    table = price_table(config, live=live, warn=warn)
    if config.target == "cloudrun":
        return pricing.cloud_run_estimate(
            config, table, days=days, gpu_key=gpu_key, region=region, steps=steps, pixels=pixels
        )
    return pricing.estimate(
        pricing.gpu(gpu_key or config.deploy.gpu),
        region or config.gcp.region,
        days=days,
        min_replicas=config.deploy.min_replicas,
        max_replicas=config.deploy.max_replicas,
        table=table,
        baked=config.model.bake,
        steps=steps,
        level=config.model.optimize,
        refiner=config.model.refiner != "off",
        dtype=config.model.dtype,
        spot=config.deploy.spot,  # [deploy] spot: the replicas at Spot rates
        pixels=pixels,
    )


def cost_compare(
    config: Config,
    *,
    region: str | None = None,
    steps: int = 30,
    live: bool = False,
    warn: Progress = quiet,
    pixels: int = pricing.SDXL_PIXELS,
) -> Compared:
    """Every GPU option side by side in the region, at the config's fast-path level, and Cloud Run's L4."""
    table = price_table(config, live=live, warn=warn)
    region = region or config.gcp.region
    return pricing.compare_all(config.cloudrun, region, steps, table, config.model.optimize, pixels)
