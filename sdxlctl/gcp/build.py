"""Cloud Build: docker build + push of a context tarball from GCS, with its log tailed as it runs."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdxlctl.context import BAKED_FOLDER, Bake
from sdxlctl.gcp.errors import CloudError, translated
from sdxlctl.gcp.session import Cloud, Progress, create_once
from sdxlctl.gcp.storage import Storage

BUILD_TIMEOUT_S = 2 * 3600  # an image with CUDA torch (and baked weights) can take long on a cold cache
FINAL = {"SUCCESS", "FAILURE", "INTERNAL_ERROR", "TIMEOUT", "CANCELLED", "EXPIRED"}
DOCKER = "gcr.io/cloud-builders/docker"
WEIGHTS = "weights"  # under /workspace: the fetch step writes WEIGHTS/sdxl, the bake build's context is WEIGHTS


@dataclass(frozen=True)
class Step:
    """One Cloud Build step: a container `name` run with `args` in /workspace (the unpacked source)."""

    id: str
    name: str
    args: list[str]
    entrypoint: str = ""


def image_steps(image: str) -> list[Step]:
    """The server (or UI) image from the Dockerfile of the source; --network cloudbuild lets RUN reach ADC."""
    return [Step("image", DOCKER, ["build", "--network", "cloudbuild", "-t", image, "."])]


def bake_steps(base: str, image: str, bake: Bake) -> list[Step]:
    """Build `base` as usual, fetch the weights with it, and build `image` FROM it with the weights in.

    The fetch runs in the image just built, so it downloads exactly as the server would load (its fp16 variant
    and VAE choice), with the server's pinned libraries. That image runs as a non-root user and /workspace
    belongs to root, so a root step first makes a folder it may write. Its own subfolder (not the 0777 one)
    is what the image gets: root-owned, world-readable, not writable by the server.
    """
    labels = [f"--label={key}={value}" for key, value in bake.labels.items()]
    return [
        *image_steps(base),
        Step("weights-folder", DOCKER, ["-c", f"mkdir -p {WEIGHTS} && chmod 0777 {WEIGHTS}"], entrypoint="bash"),
        Step(
            "fetch-weights",
            base,
            ["-m", "sdxl_server.fetch", *bake.fetch_args, f"{WEIGHTS}/sdxl"],
            entrypoint="python",
        ),
        # Its own context (the weights only): the source's .dockerignore leaves weights/ out, on purpose.
        Step(
            "bake",
            DOCKER,
            [
                "build",
                "-f",
                "Dockerfile.bake",
                f"--build-arg=BASE={base}",
                f"--build-arg=FOLDER={BAKED_FOLDER}",
                *labels,
                "--label=sdxlctl.weights.build=$BUILD_ID",
                "-t",
                image,
                WEIGHTS,
            ],
        ),
    ]


@dataclass(frozen=True)
class BuildResult:
    build_id: str
    image: str
    digest: str
    log_url: str


class Builds:
    """Cloud Build for one project."""

    def __init__(self, cloud: Cloud) -> None:
        from google.cloud.devtools import cloudbuild_v1

        self.cloud = cloud
        self.types = cloudbuild_v1
        self.client: Any = cloud.client(cloudbuild_v1.CloudBuildClient, "cloudbuild.googleapis.com")

    def find_success(self, tag: str, image: str) -> str | None:
        """The id of a successful build that already pushed `image` for this context tag, if any."""
        with translated("list builds", api="cloudbuild", project=self.cloud.project):
            builds = self.client.list_builds(
                project_id=self.cloud.project, filter=f'tags="{tag}" AND status="SUCCESS"', retry=self.cloud.retry()
            )
            for build in builds:
                if image in build.images:
                    return str(build.id)
        return None

    def run(
        self,
        *,
        source: str,
        image: str,
        steps: list[Step],
        tags: list[str],
        logs: Storage,
        logs_prefix: str,
        progress: Progress,
        on_log: Callable[[str], None],
    ) -> BuildResult:
        """Run `steps` on gs:// `source` and push every image they tag, `image` last; tail the log; raise
        CloudError unless it succeeds."""
        bucket, _, obj = source.removeprefix("gs://").partition("/")
        images = [a for s in steps if s.name == DOCKER and s.args[:1] == ["build"] for a in _tagged(s.args)]
        build = self.types.Build(
            source=self.types.Source(storage_source=self.types.StorageSource(bucket=bucket, object_=obj)),
            steps=[self.types.BuildStep(id=s.id, name=s.name, args=s.args, entrypoint=s.entrypoint) for s in steps],
            images=images,
            tags=tags,
            timeout={"seconds": BUILD_TIMEOUT_S},
            options=self.types.BuildOptions(machine_type=self.types.BuildOptions.MachineType.E2_HIGHCPU_8),
            logs_bucket=f"gs://{logs.bucket_name}/{logs_prefix}",
        )

        def start() -> str:
            operation = self.client.create_build(project_id=self.cloud.project, build=build, retry=None)
            return str(operation.metadata.build.id)

        def started_already() -> str | None:
            """A build whose answer was lost: queued, running or done under the same tags."""
            with translated("list builds", api="cloudbuild", project=self.cloud.project):
                builds = self.client.list_builds(
                    project_id=self.cloud.project,
                    filter=" AND ".join(f'tags="{tag}"' for tag in tags),
                    retry=self.cloud.retry(),
                )
                for found in builds:  # the same tags, and the same image: a baked build also pushes its base
                    if image in found.images and self.types.Build.Status(found.status).name in (
                        "QUEUED",
                        "WORKING",
                        "SUCCESS",
                    ):
                        return str(found.id)
            return None

        build_id = create_once(
            start, started_already, what="start the build", cloud=self.cloud, api="cloudbuild", progress=progress
        )
        started, offset, current = time.monotonic(), 0, None
        log_name = f"{logs_prefix}/log-{build_id}.txt"
        while True:
            with translated("follow the build", api="cloudbuild", project=self.cloud.project):
                current = self.client.get_build(project_id=self.cloud.project, id=build_id, retry=self.cloud.retry())
            chunk = logs.read_from(log_name, offset)
            offset += len(chunk)
            for line in chunk.decode(errors="replace").splitlines():
                on_log(line)
            status = self.types.Build.Status(current.status).name
            if status in FINAL:
                break
            if time.monotonic() - started > BUILD_TIMEOUT_S + 600:
                raise CloudError(
                    f"build {build_id} still {status} after {BUILD_TIMEOUT_S / 3600:.0f} h",
                    hint=f"see {current.log_url}",
                )
            progress(f"building {image.rsplit('/', 1)[-1]}: {status.lower()} ({time.monotonic() - started:.0f}s)")
            time.sleep(self.cloud.poll_s)
        if status != "SUCCESS":
            raise CloudError(
                f"build {build_id} ended {status}: {current.status_detail or 'see its log'}",
                hint=f"log: {current.log_url}",
            )
        digest = next((i.digest for i in current.results.images if i.name == image), "")
        return BuildResult(build_id, image, digest, current.log_url)


def _tagged(args: list[str]) -> list[str]:
    """The images a `docker build` names with -t."""
    return [args[i + 1] for i, arg in enumerate(args[:-1]) if arg == "-t"]
