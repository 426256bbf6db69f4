"""Target vertex: build, upload, deploy, predict, ui-deploy and teardown on Google Cloud.

Every step is idempotent: it looks at what exists (state file first, then labels in the cloud) and
changes only what differs. Operations are recorded in the state before they are waited on, so an
interrupted step resumes its operation instead of starting a second one. `plan_*` functions answer
--dry-run from the config and the state alone: they send no request.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sdxlctl.config import Config
from sdxlctl.context import BAKED_FOLDER, Bake
from sdxlctl.errors import DeployError, NotAvailable
from sdxlctl.gpus import GpuOption, gpu
from sdxlctl.pricing import machine_price
from sdxlctl.state import Resource, StateStore

if TYPE_CHECKING:
    from sdxlctl.gcp.session import Cloud

Progress = Callable[[str], None]
LABEL = "sdxlctl-deployment"
SHARED_LIMIT_BYTES = 1_500_000
DEDICATED_LIMIT_BYTES = 10_000_000
OPERATION_TIMEOUT_S = 15 * 60  # creating/deleting an endpoint, model or service
CACHE_ROLE = "roles/storage.objectUser"  # read, write, list and overwrite objects; no say over the bucket
WEIGHTS_ROLE = "roles/storage.objectViewer"
# The UI's account may call predict on its endpoint and nothing else (not undeploy, update or delete, which
# roles/aiplatform.user would allow): a project role shared by every deployment, kept by teardown.
PREDICT_ROLE_ID = "sdxlctlEndpointPredictor"
PREDICT_PERMISSIONS = ["aiplatform.endpoints.predict"]
PREDICT_FALLBACK_ROLE = "roles/aiplatform.user"


def _quiet(_: str) -> None:
    pass


@dataclass(frozen=True)
class Change:
    """One line of a plan or a report: what happens (or happened) to which resource."""

    action: str  # create, update, delete, unchanged, build, deploy, keep, gone
    kind: str
    name: str
    detail: str = ""


@dataclass(frozen=True)
class StepResult:
    """What a step did, and the address it leaves behind (image, endpoint, URL)."""

    changes: list[Change]
    result: str = ""
    seconds: float = 0.0
    dry_run: bool = False
    failed: int = 0


@dataclass(frozen=True)
class Names:
    """Every resource name derives from the deployment name."""

    deployment: str
    project: str
    region: str
    repository: str
    bucket: str

    @property
    def labels(self) -> dict[str, str]:
        return {LABEL: self.deployment, "managed-by": "sdxlctl"}

    def image(self, part: str, tag: str) -> str:
        return f"{self.region}-docker.pkg.dev/{self.project}/{self.repository}/{self.deployment}-{part}:{tag}"

    @property
    def service_id(self) -> str:
        return f"{self.deployment}-ui"

    @property
    def account_id(self) -> str:
        """The UI's service account."""
        return _account_id(self.deployment, "ui")

    @property
    def server_account_id(self) -> str:
        """The model server's service account (only when it writes a gs:// compile cache)."""
        return _account_id(self.deployment, "server")

    def email(self, account_id: str) -> str:
        return f"{account_id}@{self.project}.iam.gserviceaccount.com"


def _account_id(deployment: str, role: str) -> str:
    """6-30 characters: the deployment name is shortened, never the role (two roles must not collide)."""
    suffix = f"-{role}-sa"
    return deployment[: 30 - len(suffix)].rstrip("-") + suffix


def names(config: Config) -> Names:
    bucket = config.gcp.staging_bucket.removeprefix("gs://") or f"{config.gcp.project}-sdxlctl"
    return Names(config.name, config.gcp.project, config.gcp.region, config.gcp.artifact_repository, bucket)


def cloud(config: Config) -> Cloud:
    from sdxlctl.gcp.session import Cloud

    return Cloud.from_config(config)


def daily_cost(option: GpuOption, region: str, replicas: int) -> str:
    hourly = machine_price(option.key, region)
    if hourly is None:
        return "no price in the table for this region (`sdxlctl cost`)"
    return f"≈ {hourly * 24 * replicas:,.2f} USD/day for {replicas} replica(s)"


def _machine(option: GpuOption) -> str:
    return f"{option.machine_type} + {option.count} x {option.accelerator}"


# ---------------------------------------------------------------- build


def _bake(config: Config, part: str) -> Bake | None:
    """The weights the server image gets at build time ([model] bake), if any."""
    model = config.model
    return Bake(model.source, model.vae, model.dtype) if part == "server" and model.bake else None


def _image(config: Config, part: str) -> tuple[Any, str]:
    """The packed build context of `part` (server or ui) and the image name its digest (and weights) give."""
    from sdxlctl.context import container_folder, pack

    context = pack(container_folder("model" if part == "server" else "ui"))
    bake = _bake(config, part)
    return context, names(config).image(part, f"{context.tag}-weights-{bake.tag}" if bake else context.tag)


def _record_image(store: StateStore, config: Config, part: str, image: str, *, url: str = "", **details: Any) -> None:
    _record(store, config, Resource(kind=f"{part}-image", name=image, target="vertex", url=url, details=details))


def plan_build(config: Config, store: StateStore, part: str = "server") -> StepResult:
    context, image = _image(config, part)
    recorded = store.read().get(config.name, f"{part}-image")
    if recorded is not None and recorded.name == image:
        return StepResult(
            [Change("unchanged", f"{part} image", image, "built earlier from the same context")], image, dry_run=True
        )
    detail = (
        f"Cloud Build (E2_HIGHCPU_8, 2 h limit) from containers/{context.folder.name} "
        f"({len(context.tarball) / 1e3:.0f} kB, context {context.tag}); skipped if already built"
    )
    if bake := _bake(config, part):
        detail += "; " + _bake_detail(bake)
    return StepResult([Change("build", f"{part} image", image, detail)], image, dry_run=True)


def _bake_detail(bake: Bake) -> str:
    detail = (
        f"weights baked in: a build step fetches {bake.source} (VAE {bake.fetch_vae}) into {BAKED_FOLDER}, "
        "about 7 GB more image and minutes more build; replicas download no weights"
    )
    if bake.source.startswith("gs://"):
        detail += f"; Cloud Build's service account needs roles/storage.objectViewer on {bake.source}"
    return detail


def build(
    config: Config,
    store: StateStore,
    *,
    part: str = "server",
    progress: Progress = _quiet,
    on_log: Callable[[str], None] = _quiet,
) -> StepResult:
    """Build and push the image with Cloud Build, unless an image of the same context exists."""
    from sdxlctl.gcp.build import Builds, bake_steps, image_steps
    from sdxlctl.gcp.storage import Storage

    started = time.monotonic()
    c, n = cloud(config), names(config)
    context, image = _image(config, part)
    tag, bake = f"ctx-{context.tag}", _bake(config, part)
    baked = {"weights": bake.source, "vae": bake.fetch_vae, "weights_tag": bake.tag} if bake else {}
    recorded = store.read().get(config.name, f"{part}-image")
    if recorded is not None and recorded.name == image:
        return StepResult([Change("unchanged", f"{part} image", image)], image, time.monotonic() - started)
    builds = Builds(c)
    progress("looking for an image of this context")
    existing = builds.find_success(tag, image)
    if existing is not None:
        _record_image(store, config, part, image, build_id=existing, context=context.tag, **baked)
        return StepResult(
            [Change("unchanged", f"{part} image", image, f"built by {existing}")], image, time.monotonic() - started
        )
    storage = Storage(c, n.bucket, n.labels)
    progress(f"uploading the build context to gs://{n.bucket}")
    storage.ensure_bucket()
    source = storage.upload(f"source/{config.name}-{part}-{context.tag}.tgz", context.tarball)
    if bake:
        progress(_bake_detail(bake))
    result = builds.run(
        source=source,
        image=image,
        steps=bake_steps(n.image(part, context.tag), image, bake) if bake else image_steps(image),
        tags=["sdxlctl", f"sdxlctl-{config.name}", tag, *([f"weights-{bake.tag}"] if bake else [])],
        logs=storage,
        logs_prefix="cloudbuild-logs",
        progress=progress,
        on_log=on_log,
    )
    _record_image(
        store,
        config,
        part,
        image,
        url=result.log_url,
        build_id=result.build_id,
        digest=result.digest,
        context=context.tag,
        **baked,
    )
    return StepResult(
        [Change("build", f"{part} image", image, f"build {result.build_id}, {result.digest[:19]}")],
        image,
        time.monotonic() - started,
    )


def build_local(config: Config, store: StateStore, *, on_log: Callable[[str], None] = _quiet) -> StepResult:
    """Build the server image with a local Docker engine (the `docker` package), when one is reachable."""
    started = time.monotonic()
    context, image = _image(config, "server")
    folder = context.folder
    if not config.gcp.project:
        image = f"sdxl-server:{context.tag}"
    try:
        import docker
    except ImportError:
        raise NotAvailable("`build --local` needs the docker package", hint="pip install docker") from None
    try:
        client = docker.from_env(timeout=10)
        client.ping()
    except Exception:
        raise DeployError(
            "no Docker engine is reachable (DOCKER_HOST or /var/run/docker.sock)",
            hint="start Docker, or build with Cloud Build: `sdxlctl build` without --local",
        ) from None
    bake = _bake(config, "server")  # the Dockerfile's own bake: a RUN of the same fetch
    weights = {"SDXL_WEIGHTS": bake.source, "SDXL_WEIGHTS_VAE": bake.fetch_vae} if bake else {}
    labels = bake.labels if bake else {}
    for chunk in client.api.build(path=str(folder), tag=image, decode=True, rm=True, buildargs=weights, labels=labels):
        if "stream" in chunk:
            on_log(chunk["stream"].rstrip())
        if "error" in chunk:
            raise DeployError(f"docker build failed: {chunk['error']}")
    return StepResult([Change("build", "server image", image, "local Docker")], image, time.monotonic() - started)


# ---------------------------------------------------------------- upload


def compile_cache(config: Config) -> str:
    """SDXL_COMPILE_CACHE on Vertex AI; empty when the server keeps compiled code only on its own disk.

    By default a folder of the staging bucket shared by every replica and restart: the first replica
    to compile publishes the artifacts, and every later start downloads them instead of compiling.
    """
    model = config.model
    if model.optimize in ("none", "eager") or model.compile_cache == "none":
        return ""
    return _own_cache(config) or model.compile_cache


def server_account(config: Config) -> str:
    """The model server's own service account: only needed to write a gs:// compile cache."""
    if not compile_cache(config).startswith("gs://"):
        return ""
    n = names(config)
    return n.email(n.server_account_id)


def _bucket(uri: str) -> str:
    return uri.removeprefix("gs://").partition("/")[0]


def _container_env(config: Config) -> dict[str, str]:
    model = config.model
    dedicated = config.deploy.endpoint == "dedicated"
    env = {
        "SDXL_VAE": model.vae,
        "SDXL_DTYPE": model.dtype,
        "SDXL_QUEUE_SIZE": str(model.queue_size),
        # A shared endpoint cuts a prediction at 60 s: answer 504 before that, with a message.
        "SDXL_TIME_LIMIT": str(model.time_limit_s if dedicated else min(model.time_limit_s, 55.0)),
        "SDXL_MAX_IMAGES": str(model.max_images),
        "SDXL_MAX_REQUEST_BYTES": str(DEDICATED_LIMIT_BYTES if dedicated else SHARED_LIMIT_BYTES),
        "SDXL_MAX_RESPONSE_BYTES": str(DEDICATED_LIMIT_BYTES if dedicated else SHARED_LIMIT_BYTES),
    }
    # gs:// weights travel as the Model's artifact URI, which Vertex AI's own account may read; a server
    # running as its own account reads them where they are, with the read access `deploy` grants it.
    if not model.source.startswith("gs://") or server_account(config):
        env["SDXL_MODEL"] = model.source
    if model.bake:  # the image holds the weights and the VAE chosen at build time: load them, fetch nothing
        env["SDXL_MODEL"], env["SDXL_VAE"] = BAKED_FOLDER, "model"
    env["SDXL_OPTIMIZE"] = model.optimize
    if model.warmup:
        env["SDXL_WARMUP"] = ",".join(model.warmup)
    if cache := compile_cache(config):
        env["SDXL_COMPILE_CACHE"] = cache
    return env


def plan_upload(config: Config, store: StateStore) -> StepResult:
    state = store.read()
    image = state.get(config.name, "server-image")
    model = state.get(config.name, "model")
    what = image.name if image else "(the image `sdxlctl build` makes)"
    action = "update" if model else "create"
    detail = f"image {what}; env {_container_env(config)}"
    if _artifact(config):
        detail += f"; artifact {config.model.source}"
    return StepResult(
        [Change(action, "model", f"{config.name} (Vertex AI Model)", ("new version: " if model else "") + detail)],
        dry_run=True,
    )


def upload(config: Config, store: StateStore, *, progress: Progress = _quiet) -> StepResult:
    """Upload the image as a Vertex AI Model; a new version when the container spec changed."""
    from sdxlctl.gcp.vertex import ContainerSpec, Vertex

    started = time.monotonic()
    n, vertex = names(config), Vertex(cloud(config))
    image = store.read().get(config.name, "server-image")
    if image is None:
        raise DeployError("no server image is recorded for this deployment", hint="run `sdxlctl build` first")
    _check_baked(config, image)
    spec = ContainerSpec(
        image=image.name, env=_container_env(config), deployment_timeout_s=config.deploy.timeout_min * 60
    )
    artifact = _artifact(config)
    progress("looking for the model")
    models = vertex.find_models((LABEL, config.name))
    current = models[0] if models else None
    if current is not None and _same_container(current, spec, artifact):
        version = f"{current.name}@{current.version_id}"
        _record(store, config, Resource(kind="model", name=version, target="vertex", details={"image": image.name}))
        return StepResult([Change("unchanged", "model", version)], version, time.monotonic() - started)
    progress("uploading the model")

    def uploaded_already() -> Any:  # an upload whose answer was lost: its version carries this container
        found = vertex.find_models((LABEL, config.name))
        return found[0] if found and _same_container(found[0], spec, artifact) else None

    operation = vertex.upload_model(
        display_name=config.name,
        labels=n.labels,
        spec=spec,
        artifact_uri=artifact,
        parent_model=current.name if current else "",
        find=uploaded_already,
        progress=progress,
    )
    if isinstance(operation, str):
        response = vertex.wait(operation, what="upload", timeout_s=OPERATION_TIMEOUT_S, progress=progress)
        from google.cloud import aiplatform_v1

        uploaded = aiplatform_v1.UploadModelResponse.deserialize(response.value)
        version = f"{uploaded.model}@{uploaded.model_version_id}"
    else:
        version = f"{operation.name}@{operation.version_id}"
    _record(store, config, Resource(kind="model", name=version, target="vertex", details={"image": image.name}))
    action = "update" if current else "create"
    return StepResult([Change(action, "model", version, f"image {image.name}")], version, time.monotonic() - started)


def _artifact(config: Config) -> str:
    """The Model's artifact URI: gs:// weights that are not in the image (Vertex AI gives the server their copy)."""
    source = config.model.source
    return source if source.startswith("gs://") and not config.model.bake else ""


def _check_baked(config: Config, image: Resource) -> None:
    """A Model whose SDXL_MODEL is the baked folder needs an image that has the configured weights in it."""
    bake = _bake(config, "server")
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


def _same_container(model: Any, spec: Any, artifact: str) -> bool:
    container = model.container_spec
    env = {e.name: e.value for e in container.env}
    return (
        container.image_uri == spec.image
        and env == spec.env
        and model.artifact_uri == artifact
        and container.predict_route == spec.predict_route
        and container.health_route == spec.health_route
    )


# ---------------------------------------------------------------- deploy


def plan_deploy(config: Config, store: StateStore) -> StepResult:
    option = gpu(config.deploy.gpu)
    state = store.read()
    endpoint = state.get(config.name, "endpoint")
    model = state.get(config.name, "model")
    d = config.deploy
    changes = []
    if server_account(config):
        recorded = state.get(config.name, "server-account")
        changes.append(
            Change(
                "keep" if recorded else "create",
                "service account",
                server_account(config),
                f"the model server's: {CACHE_ROLE} on its compile cache {compile_cache(config)}/ only, "
                "and bucket-wide where the bucket has no uniform bucket-level access",
            )
        )
    if endpoint is None:
        detail = f"{d.endpoint} endpoint" + (
            " (up to 1 h per request, 10 MB)" if d.endpoint == "dedicated" else " (60 s per request, 1.5 MB)"
        )
        changes.append(Change("create", "endpoint", f"{config.name} in {config.gcp.region}", detail))
    scale = "scale to zero (Preview)" if d.min_replicas == 0 else f"replicas {d.min_replicas}..{d.max_replicas}"
    machine = f"{_machine(option)}, {scale}; {daily_cost(option, config.gcp.region, max(d.min_replicas, 1))}"
    if option.note:
        machine += f"; {option.note}"
    changes.append(Change("deploy", "model", model.name if model else "(the model `sdxlctl upload` makes)", machine))
    return StepResult(changes, dry_run=True)


def deploy(config: Config, store: StateStore, *, progress: Progress = _quiet) -> StepResult:
    """Make the endpoint serve the uploaded model on the configured GPU; resume interrupted operations."""
    from sdxlctl.gcp.vertex import Vertex

    started = time.monotonic()
    n, option, d = names(config), gpu(config.deploy.gpu), config.deploy
    vertex = Vertex(cloud(config))
    recorded_model = store.read().get(config.name, "model")
    if recorded_model is None:
        raise DeployError("no model is recorded for this deployment", hint="run `sdxlctl upload` first")
    model = vertex.get_model(recorded_model.name)
    vertex.check_dedicated(model)
    changes: list[Change] = []
    account = _ensure_server_account(config, store, progress, changes)
    endpoint = _ensure_endpoint(config, store, vertex, n, progress, changes)
    timeout_s = d.timeout_min * 60
    match = _matching_deployment(endpoint, recorded_model.name, option, d.min_replicas, d.max_replicas, account)
    if match is None:
        pending = store.read().get(config.name, "endpoint")
        operation = pending.details.get("deploy_operation") if pending else None
        resumed = " (resumed the deployment an earlier run started)" if operation else ""
        if operation:
            progress("resuming the deployment started earlier")
        else:
            progress(f"deploying on {_machine(option)}")
            from sdxlctl.core import interrupts_deferred

            def deployed_already(endpoint: Any = endpoint) -> Any:
                """A deployModel whose answer was lost: its operation runs on the endpoint, or it is done."""
                running = vertex.pending_operations(endpoint.name, "DeployModelOperationMetadata")
                if running:
                    return running[0]
                now = vertex.get_endpoint(endpoint.name)
                return _matching_deployment(now, recorded_model.name, option, d.min_replicas, d.max_replicas, account)

            with interrupts_deferred():
                operation = vertex.deploy(
                    endpoint=endpoint.name,
                    model=recorded_model.name,
                    display_name=config.name,
                    gpu=option,
                    min_replicas=d.min_replicas,
                    max_replicas=d.max_replicas,
                    service_account=account,
                    find=deployed_already,
                    progress=progress,
                )
                if isinstance(operation, str):
                    _update_details(store, config, "endpoint", deploy_operation=operation)
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
                _update_details(store, config, "endpoint", deploy_operation=None)
                raise
            _update_details(store, config, "endpoint", deploy_operation=None)
        endpoint = vertex.get_endpoint(endpoint.name)
        match = _matching_deployment(endpoint, recorded_model.name, option, d.min_replicas, d.max_replicas, account)
        if match is None:
            raise DeployError(f"the deployment finished but {endpoint.name} does not serve {recorded_model.name}")
        changes.append(
            Change(
                "deploy",
                "model",
                recorded_model.name,
                f"{_machine(option)}; {daily_cost(option, config.gcp.region, max(d.min_replicas, 1))}{resumed}",
            )
        )
    else:
        changes.append(Change("unchanged", "deployment", match.id, f"{recorded_model.name} on {_machine(option)}"))
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
    _update_details(
        store,
        config,
        "endpoint",
        deployed_model_id=match.id,
        gpu=option.key,
        machine=option.machine_type,
        min_replicas=d.min_replicas,
        deployed_at=deployed_at,
    )
    return StepResult(changes, endpoint.name, time.monotonic() - started)


def _ensure_server_account(config: Config, store: StateStore, progress: Progress, changes: list[Change]) -> str:
    """The account the model server runs as, when it needs one: it may write the compile cache (and read
    gs:// weights), nothing else. Empty: Vertex AI's own account, which may only read the artifacts."""
    email = server_account(config)
    if not email:
        return ""
    from sdxlctl.gcp.iam import ServiceAccounts
    from sdxlctl.gcp.storage import Storage

    c, n = cloud(config), names(config)
    progress("giving the model server an account that may write its compile cache")
    ServiceAccounts(c).ensure(n.server_account_id, f"sdxlctl model server of {config.name}")
    _record(store, config, Resource(kind="server-account", name=email, target="vertex"))
    Storage(c, _bucket(compile_cache(config)), n.labels).ensure_bucket()
    granted, details = _grant_folder(c, CACHE_ROLE, email, compile_cache(config), changes)
    if config.model.source.startswith("gs://") and not config.model.bake:  # baked: the image has them
        weights_granted, weights = _grant_folder(c, WEIGHTS_ROLE, email, config.model.source, changes)
        granted, details = granted or weights_granted, f"{details}, {weights}"
    changes.append(Change("update" if granted else "keep", "service account", email, details))
    return email


def _grant_folder(c: Cloud, role: str, email: str, uri: str, changes: list[Change]) -> tuple[bool, str]:
    """`role` on the objects of the gs:// folder `uri` only, when its bucket lets IAM conditions say so;
    else on the whole bucket, with a warning. Whether the policy changed, and what was granted."""
    from sdxlctl.gcp.storage import Storage

    bucket, _, folder = uri.removeprefix("gs://").partition("/")
    folder = folder.strip("/")
    storage = Storage(c, bucket, {})
    if folder and not storage.uniform_access():
        changes.append(
            Change(
                "warn",
                "bucket",
                f"gs://{bucket}",
                f"without uniform bucket-level access IAM conditions are refused: {role} covers every object, "
                f"not only {folder}/ (gcloud storage buckets update gs://{bucket} --uniform-bucket-level-access)",
            )
        )
        folder = ""
    granted = storage.grant(role, f"serviceAccount:{email}", prefix=folder)
    return granted, f"{role} on " + (f"gs://{bucket}/{folder}/ only" if folder else f"all of gs://{bucket}")


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
            _record(store, config, _endpoint_resource(endpoint, recorded))
            return endpoint
        from sdxlctl.core import interrupts_deferred

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
                _record(store, config, _endpoint_resource(operation, recorded))
                changes.append(Change("create", "endpoint", operation.name, "its answer was lost; found by label"))
                return operation
            _record(
                store,
                config,
                Resource(kind="endpoint", name="", target="vertex", details={"create_operation": operation}),
            )
    try:
        response = vertex.wait(operation, what="create the endpoint", timeout_s=OPERATION_TIMEOUT_S, progress=progress)
    except OperationPending:
        raise  # it may still finish: the next run waits for it instead of creating a second endpoint
    except CloudError:
        _forget(store, config, "endpoint")
        raise
    from google.cloud import aiplatform_v1

    endpoint = aiplatform_v1.Endpoint.deserialize(response.value)
    _record(store, config, _endpoint_resource(endpoint, None))
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


def _matching_deployment(
    endpoint: Any, model_version: str, option: GpuOption, low: int, high: int, account: str
) -> Any:
    model, _, version = model_version.partition("@")
    for deployed in endpoint.deployed_models:
        spec = deployed.dedicated_resources
        machine = spec.machine_spec
        if (
            deployed.model.split("@")[0] == model
            and (not version or deployed.model_version_id == version)
            and machine.machine_type == option.machine_type
            and machine.accelerator_count == option.count
            and spec.min_replica_count == low
            and spec.max_replica_count == high
            and deployed.service_account == account
        ):
            return deployed
    return None


# ---------------------------------------------------------------- predict


def predict(config: Config, store: StateStore, body: dict[str, Any], *, timeout_s: float) -> dict[str, Any]:
    """The same request as the local target, through the endpoint's predict."""
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
    return answer


INTEGER_FIELDS = {"seeds", "width", "height"}


def _integral(value: Any) -> Any:
    """42.0 -> 42, in lists too; anything else as it is (the caller checks the contract)."""
    if isinstance(value, list):
        return [_integral(item) for item in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


# ---------------------------------------------------------------- ui-deploy


def plan_ui(config: Config, store: StateStore, *, public: bool) -> StepResult:
    n = names(config)
    built = plan_build(config, store, part="ui")
    access = "public (no sign-in)" if public else "private (callers need roles/run.invoker)"
    changes = [
        *built.changes,
        Change(
            "create",
            "service account",
            f"{n.account_id}@{config.gcp.project}.iam.gserviceaccount.com",
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
    progress: Progress = _quiet,
    on_log: Callable[[str], None] = _quiet,
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
    _record(store, config, Resource(kind="ui-account", name=email, target="vertex"))
    role = _predict_role(c, changes)
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
    _record(
        store,
        config,
        Resource(kind="ui-service", name=service.name, target="vertex", url=service.uri, details={"public": public}),
    )
    changes.append(Change("deploy", "Cloud Run service", service.name, "public" if public else "private"))
    return StepResult(changes, service.uri, time.monotonic() - started)


def _predict_role(c: Cloud, changes: list[Change]) -> str:
    """The project's predict-only role, made when missing; roles/aiplatform.user, with a warning that says
    how to make it, when the caller may not manage roles."""
    from sdxlctl.gcp.iam import Roles, RolesDenied

    roles = Roles(c)
    name = roles.name(PREDICT_ROLE_ID)
    try:
        done = roles.ensure(
            PREDICT_ROLE_ID,
            title="sdxlctl endpoint predictor",
            description="Call predict on a Vertex AI endpoint, nothing else (sdxlctl's UI accounts)",
            permissions=PREDICT_PERMISSIONS,
        )
    except RolesDenied as denied:
        changes.append(
            Change(
                "warn",
                "custom role",
                name,
                f"{denied.message}: the UI gets {PREDICT_FALLBACK_ROLE}, which may also undeploy, update and "
                f"delete the endpoint. Have a role administrator run `gcloud iam roles create {PREDICT_ROLE_ID} "
                f"--project={c.project} --title='sdxlctl endpoint predictor' "
                f"--permissions={','.join(PREDICT_PERMISSIONS)} --stage=GA`, then run ui-deploy again",
            )
        )
        return PREDICT_FALLBACK_ROLE
    action = {"created": "create", "restored": "update", "corrected": "update"}.get(done, "keep")
    changes.append(Change(action, "custom role", name, f"{', '.join(PREDICT_PERMISSIONS)} only ({done})"))
    return name


def _ui_env(endpoint: Resource, config: Config) -> dict[str, str]:
    # max_images: the limit the model server was given as SDXL_MAX_IMAGES, so the slider stops where it does
    env = {"SDXL_ENDPOINT": endpoint.name, "SDXL_UI_MAX_IMAGES": str(config.model.max_images)}
    if endpoint.details.get("dedicated") and endpoint.details.get("dns"):
        env["SDXL_VERTEX_API_ENDPOINT"] = f"https://{endpoint.details['dns']}"  # dedicated: its own host only
    return env


# ---------------------------------------------------------------- status


def live_states(config: Config, resources: dict[str, Resource]) -> dict[str, str]:
    """What Google says of each recorded resource now: serving, ready, gone, ... (one GET each)."""
    from sdxlctl.gcp.errors import CloudError
    from sdxlctl.gcp.run import CloudRun
    from sdxlctl.gcp.vertex import Vertex

    c = cloud(config)
    vertex = Vertex(c) if any(kind in ("endpoint", "model") for kind in resources) else None
    states: dict[str, str] = {}
    for kind, resource in resources.items():
        if resource.target != "vertex" or not resource.name:
            continue
        try:
            if kind == "endpoint" and vertex is not None:
                endpoint = vertex.get_endpoint(resource.name, missing_ok=True)
                serving = len(endpoint.deployed_models) if endpoint is not None else 0
                states[kind] = "gone" if endpoint is None else f"serving {serving} model(s)" if serving else "no model"
            elif kind == "model" and vertex is not None:
                vertex.get_model(resource.name)
                states[kind] = "ready"
            elif kind == "ui-service":
                service = CloudRun(c).get(resource.name.rsplit("/", 1)[-1])
                states[kind] = "gone" if service is None else "ready" if service.uri else "deploying"
            elif kind.endswith("-image"):
                states[kind] = "built"
            elif kind.endswith("-account"):
                from sdxlctl.gcp.iam import ServiceAccounts

                states[kind] = "ready" if ServiceAccounts(c).exists(resource.name) else "gone"
        except CloudError as exc:
            states[kind] = "gone" if "not found" in exc.message.lower() else f"unknown ({exc.message[:60]})"
    return states


# ---------------------------------------------------------------- teardown


@dataclass
class Inventory:
    """What teardown will delete: found by label in the cloud, and from the state file."""

    endpoints: list[Any] = field(default_factory=list)
    models: list[Any] = field(default_factory=list)
    services: list[Any] = field(default_factory=list)
    accounts: list[str] = field(default_factory=list)  # emails: the UI's, the model server's
    cache: str = ""  # the compile cache sdxlctl chose (gs://), deleted with the deployment
    images: list[str] = field(default_factory=list)

    def changes(self) -> list[Change]:
        rows = []
        for endpoint in self.endpoints:
            deployed = len(endpoint.deployed_models)
            rows.append(Change("delete", "endpoint", endpoint.name, f"{deployed} deployed model(s), undeployed first"))
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
    if _own_cache(config):
        changes.append(Change("delete", "compile cache", _own_cache(config), "every object under it"))
    changes.append(
        Change("keep", "note", f"a real run also finds resources by the label {LABEL}={config.name}, not only these")
    )
    return StepResult(changes, dry_run=True)


def _revoke_grants(config: Config, store: StateStore, found: Inventory, email: str) -> None:
    """What sdxlctl granted the account: the server's roles on buckets; the UI's role on an endpoint that
    teardown could not delete (a deleted endpoint took its policy with it)."""
    from sdxlctl.gcp.storage import Storage
    from sdxlctl.gcp.vertex import Vertex

    c, n, account_id = cloud(config), names(config), email.split("@")[0]
    if account_id == n.server_account_id:
        for bucket in sorted(_server_buckets(config)):
            Storage(c, bucket, {}).revoke(f"serviceAccount:{email}")
    if account_id == n.account_id:
        recorded = store.read().get(config.name, "endpoint")
        endpoints = [e.name for e in found.endpoints] + ([recorded.name] if recorded and recorded.name else [])
        for endpoint in dict.fromkeys(endpoints):
            Vertex(c).revoke(endpoint, f"serviceAccount:{email}")


def _kept_role(config: Config, found: Inventory) -> list[Change]:
    """The predict-only role stays: every sdxlctl UI in the project holds it, and a deleted role's id is
    taken for weeks. Said once the UI's account is gone, with how to delete it."""
    if not any(email.split("@")[0] == names(config).account_id for email in found.accounts):
        return []
    project = config.gcp.project
    return [
        Change(
            "keep",
            "custom role",
            f"projects/{project}/roles/{PREDICT_ROLE_ID}",
            f"shared by every sdxlctl UI in the project; once none is left: "
            f"gcloud iam roles delete {PREDICT_ROLE_ID} --project={project}",
        )
    ]


def _own_cache(config: Config) -> str:
    """The compile cache sdxlctl chooses for this deployment, whether in use now or not (a folder the
    user named is theirs to keep)."""
    return f"gs://{names(config).bucket}/compile-cache/{config.name}" if config.model.compile_cache == "auto" else ""


def _server_buckets(config: Config) -> set[str]:
    """Every bucket the model server's account may have been given a role on."""
    uris = (_own_cache(config), config.model.compile_cache, config.model.source)
    return {_bucket(uri) for uri in uris if uri.startswith("gs://")}


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
    )
    state = store.read()
    accounts = [state.get(config.name, kind) for kind in ("ui-account", "server-account")]
    found.accounts = [account.name for account in accounts if account is not None]
    found.accounts += [service.template.service_account for service in found.services]
    found.accounts += [d.service_account for endpoint in found.endpoints for d in endpoint.deployed_models]
    found.accounts = [account for account in dict.fromkeys(found.accounts) if account]
    found.cache = _own_cache(config)
    if images:  # images carry no labels: their names derive from the deployment's
        found.images = [f"{config.name}-server", f"{config.name}-ui"]
    return found


def teardown(config: Config, store: StateStore, found: Inventory, *, progress: Progress = _quiet) -> StepResult:
    """Delete what `found` lists, keep going past failures; already-gone counts as done."""
    from sdxlctl.gcp.errors import CloudError
    from sdxlctl.gcp.iam import ServiceAccounts
    from sdxlctl.gcp.run import CloudRun
    from sdxlctl.gcp.storage import Storage
    from sdxlctl.gcp.vertex import Vertex

    started = time.monotonic()
    c = cloud(config)
    vertex, run = Vertex(c), CloudRun(c)
    changes: list[Change] = []
    failed = 0

    def attempt(kind: str, name: str, action: Callable[[], str]) -> bool:
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
            return f"{len(endpoint.deployed_models)} model(s) undeployed"

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
            _revoke_grants(config, store, found, email)  # first: none left dangling
            return "deleted" if ServiceAccounts(c).delete(email.split("@")[0]) else "already gone"

        attempt("service account", email, delete_account)
    changes += _kept_role(config, found)
    if found.cache:

        def delete_cache(uri: str = found.cache) -> str:
            bucket, _, folder = uri.removeprefix("gs://").partition("/")
            return f"{Storage(c, bucket, {}).delete_folder(folder)} object(s) deleted"

        attempt("compile cache", found.cache, delete_cache)
    if found.images:
        from sdxlctl.gcp.registry import Registry

        registry = Registry(c, config.gcp.artifact_repository)
        for package in found.images:

            def delete_image(package: str = package) -> str:
                return "deleted, all tags" if registry.delete_package(package, progress=progress) else "already gone"

            attempt("image", f"{registry.repository}/packages/{package}", delete_image)
    if not failed:
        with store.transaction() as state:
            for kind in list(state.of(config.name)):
                if found.images or not kind.endswith("-image"):
                    state.remove(config.name, kind)
    return StepResult(changes, seconds=time.monotonic() - started, failed=failed)


# ---------------------------------------------------------------- state helpers


def _record(store: StateStore, config: Config, resource: Resource) -> None:
    with store.transaction() as state:
        previous = state.get(config.name, resource.kind)
        if previous is not None and previous.name == resource.name:
            resource = resource.model_copy(
                update={"created_at": previous.created_at, "details": {**previous.details, **resource.details}}
            )
        state.put(config.name, resource)


def _update_details(store: StateStore, config: Config, kind: str, **details: Any) -> None:
    with store.transaction() as state:
        resource = state.get(config.name, kind)
        if resource is not None:
            for key, value in details.items():
                if value is None:
                    resource.details.pop(key, None)
                else:
                    resource.details[key] = value


def _forget(store: StateStore, config: Config, kind: str) -> None:
    with store.transaction() as state:
        state.remove(config.name, kind)
