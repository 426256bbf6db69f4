"""What Cloud Storage would allow a member, from a bucket's IAM policy, for the requests a real client makes.

The GCS emulator enforces no IAM, so a proxy in front of it records each request of the real
google-cloud-storage client, and `allowed` decides it as Cloud Storage does: a role that holds the
permission, bound to the member, whose condition holds for the request. Only the condition terms sdxlctl
writes are understood; any other term fails the test rather than being guessed at.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

# The object permissions of each role sdxlctl grants (roles/storage.objectUser also updates and deletes).
ROLE_PERMISSIONS = {
    "roles/storage.objectUser": {"storage.objects.list", "storage.objects.get", "storage.objects.create"},
    "roles/storage.objectViewer": {"storage.objects.list", "storage.objects.get"},
}
TERMS = [
    (re.compile(r'^resource\.name\.startsWith\("([^"]*)"\)$'), lambda a, v: a.resource.startswith(v)),
    (re.compile(r'^resource\.name == "([^"]*)"$'), lambda a, v: a.resource == v),
    (
        re.compile(r'^api\.getAttribute\("storage\.googleapis\.com/objectListPrefix", ""\)\.startsWith\("([^"]*)"\)$'),
        lambda a, v: a.list_prefix.startswith(v),
    ),
]


@dataclass(frozen=True)
class Access:
    """One request as IAM sees it: the permission it needs, on which resource, with which list prefix."""

    permission: str
    resource: str
    list_prefix: str = ""


def access(method: str, path: str, query: dict[str, str], body: bytes) -> Access | None:
    """The Access a JSON API request needs; None for requests that are not about objects."""
    match = re.search(r"/b/([^/]+)/o(?:/(.+))?$", path)
    if not match:
        return None
    bucket, name = match.group(1), unquote(match.group(2) or "")
    if method == "GET" and not name:
        return Access("storage.objects.list", f"projects/_/buckets/{bucket}", query.get("prefix", ""))
    if method == "GET":
        return Access("storage.objects.get", f"projects/_/buckets/{bucket}/objects/{name}")
    if method in ("POST", "PUT") and path.startswith("/upload/"):
        named = query.get("name") or _metadata_name(body)
        if named is None:  # the later chunks of a resumable upload: allowed when the session was
            return None
        return Access("storage.objects.create", f"projects/_/buckets/{bucket}/objects/{named}")
    raise AssertionError(f"no IAM mapping for {method} {path}")


def allowed(policy: dict[str, Any], member: str, wanted: Access) -> bool:
    """Whether any binding of `policy` lets `member` do `wanted`."""
    for binding in policy.get("bindings", []):
        if member not in binding["members"]:
            continue
        if wanted.permission not in ROLE_PERMISSIONS.get(binding["role"], set()):
            continue
        condition = binding.get("condition")
        if condition is None or holds(condition["expression"], wanted):
            return True
    return False


def holds(expression: str, wanted: Access) -> bool:
    """A condition made of `||`-joined terms that this module understands."""
    results = []
    for term in (t.strip() for t in expression.split("||")):
        for pattern, check in TERMS:
            match = pattern.match(term)
            if match:
                results.append(check(wanted, match.group(1)))
                break
        else:
            raise AssertionError(f"condition term not understood: {term!r}")
    return any(results)


def _metadata_name(body: bytes) -> str | None:
    match = re.search(rb'"name":\s*"([^"]+)"', body)
    return match.group(1).decode() if match else None


@contextlib.contextmanager
def recording_proxy(target: str) -> Iterator[tuple[str, list[Access]]]:
    """A loopback proxy to `target` (the GCS emulator) that records what each request needs."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    from tests.servers import serve_app

    seen: list[Access] = []
    here: list[str] = []

    async def forward(request: Request) -> Response:
        body = await request.body()
        needed = access(request.method, request.url.path, dict(request.query_params), body)
        if needed is not None:
            seen.append(needed)
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("content-length",)}
        async with httpx.AsyncClient() as client:
            answer = await client.request(
                request.method, target + request.url.path, params=request.url.query, content=body, headers=headers
            )
        # Links in answers (mediaLink, a resumable upload's Location) must lead back through the proxy.
        content = answer.content.replace(target.encode(), here[0].encode())
        passed = ("content-type", "location", "range")
        keep = {k: v.replace(target, here[0]) for k, v in answer.headers.items() if k.lower() in passed}
        return Response(content, status_code=answer.status_code, headers=keep)

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE"]
    app = Starlette(routes=[Route("/{path:path}", forward, methods=methods)])
    with serve_app(app) as server:
        here.append(server.url)
        yield server.url, seen
