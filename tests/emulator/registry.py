"""Artifact Registry v1: the Docker packages builds push, and deleting them (an operation)."""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request

from tests.emulator.core import Route, World

IMAGE = re.compile(r"^(?P<location>[a-z0-9-]+)-docker\.pkg\.dev/(?P<project>[^/]+)/(?P<repo>[^/]+)/(?P<package>[^:@]+)")
PACKAGE = r"/v1/(?P<name>projects/[^/]+/locations/[^/]+/repositories/[^/]+/packages/[^/:]+)"


def push(world: World, image: str) -> None:
    """What a successful build's push leaves in the registry."""
    match = IMAGE.match(image)
    if match:
        name = (
            f"projects/{match['project']}/locations/{match['location']}/repositories/{match['repo']}"
            f"/packages/{match['package']}"
        )
        world.table("packages").setdefault(name, {"name": name, "tags": []})["tags"].append(image.split(":")[-1])


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
        location = "/".join(p["name"].split("/")[:4])
        return self.world.start_operation(
            f"{location}/operations/{self.world.new_id()}",
            {"@type": "type.googleapis.com/google.devtools.artifactregistry.v1.OperationMetadata"},
            lambda: {"@type": "type.googleapis.com/google.protobuf.Empty"},
        )
