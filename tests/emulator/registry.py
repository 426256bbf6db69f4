"""Artifact Registry v1: the Docker packages builds push, and deleting them (an operation)."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request

from tests.emulator.core import Route, World

IMAGE = re.compile(r"^(?P<location>[a-z0-9-]+)-docker\.pkg\.dev/(?P<project>[^/]+)/(?P<repo>[^/]+)/(?P<package>[^:@]+)")
PACKAGE = r"/v1/(?P<name>projects/[^/]+/locations/[^/]+/repositories/[^/]+/packages/[^/:]+)"


def push(world: World, image: str, digest: str = "", labels: dict[str, str] | None = None) -> None:
    """What a successful build's push leaves in the registry: the package's tag, and the image by its digest
    with its config's labels (what `docker inspect` or the registry's manifest API shows)."""
    match = IMAGE.match(image)
    if match:
        repository = f"projects/{match['project']}/locations/{match['location']}/repositories/{match['repo']}"
        name = f"{repository}/packages/{match['package']}"
        tag = image.split(":")[-1]
        world.table("packages").setdefault(name, {"name": name, "tags": []})["tags"].append(tag)
        package = match["package"].replace("/", "%2F")
        docker = world.table("dockerImages").setdefault(
            f"{repository}/dockerImages/{package}@{digest}",
            {
                "name": f"{repository}/dockerImages/{package}@{digest}",
                "uri": f"{image.rsplit(':', 1)[0]}@{digest}",
                "tags": [],
                "config": {"Labels": dict(labels or {})},
            },
        )
        docker["tags"].append(tag)


class Registry:
    def __init__(self, world: World) -> None:
        self.world = world

    def routes(self) -> list[Route]:
        return [
            Route("GET", re.compile(f"^{PACKAGE}$"), self.get_package),
            Route("DELETE", re.compile(f"^{PACKAGE}$"), self.delete_package),
        ]

    def get_package(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        return self.world.get("packages", p["name"], "Package")

    def delete_package(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        self.world.get("packages", p["name"], "Package")
        del self.world.table("packages")[p["name"]]
        images = self.world.table("dockerImages")
        prefix = p["name"].replace("/packages/", "/dockerImages/") + "@"
        for gone in [name for name in images if name.startswith(prefix)]:
            del images[gone]
        location = "/".join(p["name"].split("/")[:4])
        return self.world.start_operation(
            f"{location}/operations/{self.world.new_id()}",
            {"@type": "type.googleapis.com/google.devtools.artifactregistry.v1.OperationMetadata"},
            lambda: {"@type": "type.googleapis.com/google.protobuf.Empty"},
        )
