"""IAM custom roles (iam.googleapis.com projects.roles), and the check that a policy names only roles that exist.

As IAM does: a deleted role stays (with `deleted: true`) and keeps its id, so creating it again is a 409
until it is undeleted; a binding of a custom role that does not exist, or is deleted, is a 400.
"""

from __future__ import annotations

import re
from typing import Any

from starlette.requests import Request

from tests.emulator.core import ApiError, Route, World, routes

ROLES = r"/v1/projects/(?P<project>[^/]+)/roles"
ROLE_ID = re.compile(r"^[a-zA-Z0-9_.]{3,64}$")
PERMISSION = re.compile(r"^[a-z][a-zA-Z0-9]*(\.[a-zA-Z0-9]+){2,}$")
ROLE_FIELDS = {"name", "title", "description", "includedPermissions", "stage", "etag", "deleted"}
STAGES = {"ALPHA", "BETA", "GA", "DEPRECATED", "DISABLED", "EAP"}
CUSTOM_ROLE = re.compile(r"^(?:projects|organizations)/[^/]+/roles/[^/]+$")


class IamRoles:
    """Project custom roles, kept in the world's `roles` table by full name."""

    def __init__(self, world: World) -> None:
        self.world = world

    def routes(self) -> list[Route]:
        table = [
            ("POST", ROLES, self.create),
            ("GET", ROLES + r"/(?P<role>[^/:]+)", self.get),
            ("PATCH", ROLES + r"/(?P<role>[^/:]+)", self.patch),
            ("DELETE", ROLES + r"/(?P<role>[^/:]+)", self.delete),
            ("POST", ROLES + r"/(?P<role>[^/:]+):undelete", self.undelete),
        ]
        return routes(table)

    def create(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        body = body or {}
        _known(body, {"roleId", "role"}, "CreateRoleRequest")
        role_id, role = body.get("roleId", ""), body.get("role") or {}
        if not ROLE_ID.match(role_id):
            raise ApiError(400, f"The role id {role_id!r} is invalid: 3-64 letters, digits, '_' or '.'.")
        _check_role(role)
        name = f"projects/{p['project']}/roles/{role_id}"
        if name in self.world.table("roles"):
            raise ApiError(409, f"A role named {role_id} in projects/{p['project']} already exists or was deleted.")
        stored = {
            "name": name,
            "title": role.get("title", ""),
            "description": role.get("description", ""),
            "includedPermissions": list(role.get("includedPermissions", [])),
            "stage": role.get("stage", "ALPHA"),
            "etag": "BwY" + self.world.new_id(),
        }
        self.world.table("roles")[name] = stored
        return stored

    def get(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        return self.world.get("roles", self._name(p), "Role")

    def patch(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        stored = self.world.get("roles", self._name(p), "Role")
        body = body or {}
        _check_role(body)
        if body.get("etag") and body["etag"] != stored["etag"]:
            raise ApiError(409, "There were concurrent policy changes: read the role again and retry.", "ABORTED")
        mask = request.query_params.get("updateMask", "")
        fields = [f.strip() for f in mask.split(",") if f.strip()] or ["title", "description", "includedPermissions"]
        for field in fields:
            if field not in {"title", "description", "includedPermissions", "stage"}:
                raise ApiError(400, f"updateMask: {field!r} cannot be updated.")
            stored[field] = body.get(field, [] if field == "includedPermissions" else "")
        stored["etag"] = "BwY" + self.world.new_id()
        return stored

    def delete(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        stored = self.world.get("roles", self._name(p), "Role")
        stored["deleted"] = True
        stored["etag"] = "BwY" + self.world.new_id()
        return stored

    def undelete(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        stored = self.world.get("roles", self._name(p), "Role")
        if not stored.get("deleted"):
            raise ApiError(400, f"Role {stored['name']} is not deleted.", "FAILED_PRECONDITION")
        stored.pop("deleted")
        stored["etag"] = "BwY" + self.world.new_id()
        return stored

    def _name(self, p: dict[str, str]) -> str:
        return f"projects/{p['project']}/roles/{p['role']}"


def check_bound_roles(world: World, body: Any) -> None:
    """Refuse a SetIamPolicy whose bindings name a custom role that does not exist or is deleted."""
    bindings = ((body or {}).get("policy") or {}).get("bindings") or []
    for binding in bindings:
        role = binding.get("role", "")
        if CUSTOM_ROLE.match(role):
            stored = world.table("roles").get(role)
            if stored is None or stored.get("deleted"):
                raise ApiError(400, f"Role ({role}) does not exist in the resource's hierarchy.")


def _check_role(role: dict[str, Any]) -> None:
    _known(role, ROLE_FIELDS, "Role")
    for permission in role.get("includedPermissions", []):
        if not isinstance(permission, str) or not PERMISSION.match(permission):
            raise ApiError(400, f"Permission {permission!r} is not valid.")
    if "stage" in role and role["stage"] not in STAGES:
        raise ApiError(400, f"Invalid value at 'role.stage': {role['stage']!r}")
    if len(role.get("title", "")) > 100:
        raise ApiError(400, "The role title is longer than 100 characters.")


def _known(body: dict[str, Any], fields: set[str], message: str) -> None:
    unknown = set(body) - fields
    if unknown:
        raise ApiError(400, f"Invalid JSON payload received. Unknown name {sorted(unknown)[0]!r} at {message}.")
