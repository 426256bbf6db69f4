"""Target vertex: the container images, built by Cloud Build (or a local Docker engine)."""

from __future__ import annotations

import time
from typing import Any

from sdxlctl.config import Config
from sdxlctl.context import BAKED_FOLDER, Bake
from sdxlctl.errors import DeployError, NotAvailable
from sdxlctl.state import Resource, StateStore
from sdxlctl.steps import Change, Progress, StepResult, quiet
from sdxlctl.vertex.names import cloud, names


def bake_of(config: Config, part: str = "server") -> Bake | None:
    """The weights the server image gets at build time ([model] bake), if any."""
    model = config.model
    return Bake(model.source, model.vae, model.dtype) if part == "server" and model.bake else None


def _image(config: Config, part: str) -> tuple[Any, str]:
    """The packed build context of `part` (server or ui) and the image name its digest (and weights) give."""
    from sdxlctl.context import container_folder, pack

    context = pack(container_folder("model" if part == "server" else "ui"))
    bake = bake_of(config, part)
    return context, names(config).image(part, f"{context.tag}-weights-{bake.tag}" if bake else context.tag)


def _record_image(store: StateStore, config: Config, part: str, image: str, *, url: str = "", **details: Any) -> None:
    store.record(config.name, Resource(kind=f"{part}-image", name=image, target="vertex", url=url, details=details))


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
    if bake := bake_of(config, part):
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
    progress: Progress = quiet,
    on_log: Progress = quiet,
) -> StepResult:
    """Build and push the image with Cloud Build, unless an image of the same context exists."""
    from sdxlctl.gcp.build import Builds, bake_steps, image_steps
    from sdxlctl.gcp.storage import Storage

    started = time.monotonic()
    c, n = cloud(config), names(config)
    context, image = _image(config, part)
    tag, bake = f"ctx-{context.tag}", bake_of(config, part)
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


def build_local(config: Config, store: StateStore, *, on_log: Progress = quiet) -> StepResult:
    """Build the server image with a local Docker engine (the `docker` package), when one is reachable."""
    started = time.monotonic()
    if config.gcp.project:
        context, image = _image(config, "server")
    else:  # an image for this machine only: no registry, so no project is needed to name it
        from sdxlctl.context import container_folder, pack

        context, bake = pack(container_folder("model")), bake_of(config, "server")
        image = f"sdxl-server:{context.tag}-weights-{bake.tag}" if bake else f"sdxl-server:{context.tag}"
    folder = context.folder
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
    bake = bake_of(config, "server")  # the Dockerfile's own bake: a RUN of the same fetch
    weights = {"SDXL_WEIGHTS": bake.source, "SDXL_WEIGHTS_VAE": bake.fetch_vae} if bake else {}
    labels = bake.labels if bake else {}
    for chunk in client.api.build(path=str(folder), tag=image, decode=True, rm=True, buildargs=weights, labels=labels):
        if "stream" in chunk:
            on_log(chunk["stream"].rstrip())
        if "error" in chunk:
            raise DeployError(f"docker build failed: {chunk['error']}")
    return StepResult([Change("build", "server image", image, "local Docker")], image, time.monotonic() - started)
