"""Cloud Build v1: builds that run (in emulation) from a source tarball in GCS and write their log there."""

from __future__ import annotations

import base64
import hashlib
import io
import re
import tarfile
from collections.abc import Callable
from typing import Any

from google.cloud.devtools import cloudbuild_v1 as cb
from starlette.requests import Request

from tests.emulator.build_steps import Steps, Workspace
from tests.emulator.core import ApiError, Route, World, now, packed, parse, routes

PROJECT = r"/v1/projects/(?P<project>[^/]+)(?:/locations/(?P<location>[^/]+))?"
FINAL = {"SUCCESS", "FAILURE", "INTERNAL_ERROR", "TIMEOUT", "CANCELLED", "EXPIRED"}
TAG = re.compile(r"^[\w][\w.-]{0,127}$")

# Reads an object from the storage emulator (or None); writes one. Set by the app when GCS is there.
ReadObject = Callable[[str, str], bytes | None]
WriteObject = Callable[[str, str, bytes], None]


class CloudBuild:
    """Builds pass through QUEUED, WORKING and SUCCESS (or FAILURE) as they are polled."""

    def __init__(self, world: World, read_object: ReadObject, write_object: WriteObject) -> None:
        self.world, self.read_object, self.write_object = world, read_object, write_object

    def routes(self) -> list[Route]:
        table = [
            ("POST", PROJECT + r"/builds", self.create_build),
            ("GET", PROJECT + r"/builds/(?P<build>[^/:]+)", self.get_build),
            ("GET", PROJECT + r"/builds", self.list_builds),
            ("POST", PROJECT + r"/builds/(?P<build>[^/:]+):cancel", self.cancel_build),
            ("GET", r"/v1/(?P<name>operations/.+|projects/[^/]+/locations/[^/]+/operations/[^/]+)", self.get_operation),
        ]
        return routes(table)

    def create_build(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        build = parse(cb.Build, body, "Build")
        if not build.get("steps"):
            raise ApiError(400, "invalid build: build must have at least one step")
        for tag in build.get("tags", []):
            if not TAG.match(tag):
                raise ApiError(400, f"invalid build: invalid build tag {tag!r}: must match {TAG.pattern}")
        source = build.get("source", {}).get("storageSource")
        if not source or not source.get("bucket") or not source.get("object"):
            raise ApiError(400, "invalid build: source.storage_source bucket and object are required")
        build_id = hashlib.sha1(self.world.new_id().encode()).hexdigest()[:8] + "-" + self.world.new_id()[-8:]
        project = p["project"]
        log_bucket = build.get("logsBucket", f"gs://{self.world.project_number}.cloudbuild-logs.googleusercontent.com")
        build.update(
            id=build_id,
            projectId=project,
            status="QUEUED",
            createTime=now(),
            logsBucket=log_bucket,
            logUrl=f"https://console.cloud.google.com/cloud-build/builds/{build_id}?project={self.world.project_number}",
        )
        build["_log"] = self._run(build, source)
        build["_polls"] = self.world.polls_to_finish
        build["_fault"] = self.world.take_fault("POST", request.url.path, operation=True)
        self.world.table("builds")[build_id] = build
        name = f"operations/build/{project}/{base64.b64encode(build_id.encode()).decode()}"
        self.world.start_operation(
            name, packed(cb.BuildOperationMetadata, {"build": _public(build)}), lambda: {}, ready=lambda: True
        )
        # Build operations follow the build itself, not a poll count of their own.
        self.world.operations[name].finish = lambda: self._finish(build_id)
        self.world.operations[name].ready = lambda: self._advance(build_id) in FINAL
        return self.world.operations[name].json()

    def _run(self, build: dict[str, Any], source: dict[str, str]) -> list[str]:
        """What the build would do: check the context like docker would, and write the log lines."""
        data = self.read_object(source["bucket"], source["object"])
        lines = [
            f'starting build "{build["id"]}"',
            "",
            "FETCHSOURCE",
            f"Fetching storage object: gs://{source['bucket']}/{source['object']}",
        ]
        if data is None:
            build["_fails"] = f"source gs://{source['bucket']}/{source['object']} not found"
            return [*lines, f"ERROR: {build['_fails']}"]
        try:
            with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as archive:
                files = {
                    m.name.removeprefix("./"): (archive.extractfile(m) or io.BytesIO()).read()
                    for m in archive.getmembers()
                    if m.isfile()
                }
        except (tarfile.TarError, OSError) as exc:
            build["_fails"] = f"source is not a gzipped tarball: {exc}"
            return [*lines, f"ERROR: {build['_fails']}"]
        steps = Steps(build, Workspace(files), self.read_object)
        lines.append("BUILD")
        failed = steps.run()
        lines += steps.log
        if failed:
            build["_fails"] = failed
            return [*lines, f"ERROR: {failed}"]
        build["_images"] = {name: vars(image) for name, image in steps.images.items()}
        lines += ["PUSH"] + [f"Pushing {image}" for image in build.get("images", [])]
        lines += [f"{image}: digest: {steps.images[image].digest} size: 4321" for image in build.get("images", [])]
        return [*lines, "DONE"]

    def _advance(self, build_id: str) -> str:
        """One poll's worth of progress: QUEUED -> WORKING -> final; the log grows as it goes."""
        build = self.world.table("builds")[build_id]
        if build["status"] in FINAL:
            return str(build["status"])
        build["_polls"] -= 1
        lines = build["_log"]
        if build["status"] == "QUEUED":
            build.update(status="WORKING", startTime=now())
            self._write_log(build, lines[: len(lines) // 2])
        elif build["_polls"] <= 0:
            fault = build.pop("_fault", None)
            failed = build.get("_fails") or (fault.error.message if fault else None)
            build.update(status="FAILURE" if failed else "SUCCESS", finishTime=now())
            if failed:
                build["statusDetail"] = failed
            else:
                from tests.emulator.registry import push

                built = build["_images"]
                for image in build.get("images", []):
                    push(self.world, image, built[image]["digest"], built[image]["labels"])
                build["results"] = {
                    "images": [{"name": image, "digest": built[image]["digest"]} for image in build.get("images", [])]
                }
            self._write_log(build, lines)
        return str(build["status"])

    def _write_log(self, build: dict[str, Any], lines: list[str]) -> None:
        bucket = build["logsBucket"].removeprefix("gs://").split("/", 1)
        prefix = bucket[1] + "/" if len(bucket) > 1 else ""
        self.write_object(bucket[0], f"{prefix}log-{build['id']}.txt", ("\n".join(lines) + "\n").encode())

    def _finish(self, build_id: str) -> dict[str, Any]:
        build = self.world.table("builds")[build_id]
        if build["status"] != "SUCCESS":
            raise ApiError(
                400,
                f"Build failed; check build logs for details ({build.get('statusDetail', '')})",
                "UNKNOWN" if build["status"] == "FAILURE" else "INTERNAL",
            )
        return packed(cb.Build, _public(build))

    def _build(self, p: dict[str, str]) -> dict[str, Any]:
        build = self.world.get("builds", p["build"], "Build")
        if build["projectId"] != p["project"]:
            raise ApiError(404, f"Build {p['build']} not found.")
        return build

    def get_build(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        build = self._build(p)
        self._advance(build["id"])
        return _public(build)

    def list_builds(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        wanted = _build_filter(request.query_params.get("filter", ""))
        builds = [
            _public(b) for b in self.world.table("builds").values() if b["projectId"] == p["project"] and wanted(b)
        ]
        builds.sort(key=lambda b: b["createTime"], reverse=True)
        return {"builds": builds} if builds else {}

    def cancel_build(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        build = self._build(p)
        if build["status"] not in FINAL:
            build.update(status="CANCELLED", finishTime=now())
        return _public(build)

    def get_operation(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        result = self.world.poll(p["name"])
        build_id = base64.b64decode(p["name"].rsplit("/", 1)[-1]).decode() if "/build/" in p["name"] else None
        if build_id:  # metadata carries the build as it is now
            result["metadata"] = packed(
                cb.BuildOperationMetadata, {"build": _public(self.world.table("builds")[build_id])}
            )
        return result


def _public(build: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in build.items() if not k.startswith("_")}


def _build_filter(expression: str) -> Callable[[dict[str, Any]], bool]:
    """Cloud Build's list filter, the part sdxlctl uses: tags="x" and status="SUCCESS", joined by AND."""
    terms = [t.strip() for t in re.split(r"\s+AND\s+", expression) if t.strip()]
    checks = []
    for term in terms:
        match = re.fullmatch(r'(tags|status|images)\s*=\s*"([^"]*)"', term)
        if not match:
            raise ApiError(400, f"invalid filter {term!r}")
        checks.append(match.groups())

    def keep(build: dict[str, Any]) -> bool:
        for key, value in checks:
            if key == "status" and build["status"] != value:
                return False
            if key in ("tags", "images") and value not in build.get(key, []):
                return False
        return True

    return keep
