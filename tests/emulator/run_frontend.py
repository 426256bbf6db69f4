"""Cloud Run's front end for one service, as run_instances.py runs it: who may call (401/403, Google's pages)
and passing a request on to an instance (streamed; 504 past the timeout)."""

from __future__ import annotations

import contextlib
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from tests.emulator.core import ApiError, World

INVOKER_ROLES = ("roles/run.invoker", "roles/run.admin")
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "upgrade", "host", "content-length"}


def page(code: int, title: str, message: str) -> Response:
    """The HTML page Google's front end answers with."""
    html = (
        '<html><head>\n<meta http-equiv="content-type" content="text/html;charset=utf-8">\n'
        f"<title>{code} {title}</title>\n</head>\n<body text=#000000 bgcolor=#ffffff>\n"
        f"<h1>Error: {title}</h1>\n<h2>{message}</h2>\n<h2></h2>\n</body></html>\n"
    )
    return Response(html, status_code=code, media_type="text/html")


def unauthorized(path: str) -> Response:
    return page(401, "Unauthorized", f"Your client does not have permission to the requested URL <code>{path}</code>.")


def forbidden(path: str) -> Response:
    return page(
        403, "Forbidden", f"Your client does not have permission to get URL <code>{path}</code> from this server."
    )


def unavailable() -> Response:
    return page(
        503, "Service Unavailable", "The service you requested is not available yet. Please try again in 30 seconds."
    )


@dataclass
class Instance:
    """One running container of a service's revision."""

    url: str
    revision: str
    process: subprocess.Popen[bytes] | None
    log_path: Path | None
    life: list[float | None]  # [started, stopped]: epoch seconds, in RunInstances.lives
    last_used: float = field(default_factory=time.monotonic)


@dataclass
class Frontend:
    """A service's listener and what runs behind it."""

    name: str
    url: str
    server: Any  # uvicorn.Server
    thread: threading.Thread
    instance: Instance | None = None
    in_flight: int = 0
    starts: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)  # one start at a time
    closed: threading.Event = field(default_factory=threading.Event)  # deleted or stopped: no instance starts again


def refusal(
    world: World, request: Request, service: dict[str, Any], policy: dict[str, Any], url: str
) -> Response | None:
    """401 or 403 as Google's front end answers a caller it does not let through; None to let it in."""
    from tests.emulator import identity

    members = {m for b in policy.get("bindings", []) if b.get("role") in INVOKER_ROLES for m in b.get("members", [])}
    if service.get("invokerIamDisabled") or "allUsers" in members:
        return None
    path = request.url.path
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return unauthorized(path)
    email = None
    for audience in (url, url + "/", *service.get("customAudiences", [])):
        with contextlib.suppress(ApiError):
            email = identity.verify(world, token.strip(), audience)
            break
    if email is None:
        return unauthorized(path)
    owners = world.owners
    allowed = (
        "allAuthenticatedUsers" in members
        or f"serviceAccount:{email}" in members
        or f"user:{email}" in members
        or email in owners
    )
    return None if allowed else forbidden(path)


async def forward(
    request: Request, content: bytes, frontend: Frontend, instance: Instance, timeout_s: float
) -> Response:
    """`request` passed on (its body, `content`, was read before the instance started); `frontend.in_flight` goes
    down by one when the answer ends, fails, or its caller goes away."""
    headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP - {"host"}}
    client = httpx.AsyncClient(timeout=httpx.Timeout(timeout_s, connect=10))
    upstream_request = client.build_request(
        request.method, instance.url + request.url.path, params=request.url.query, headers=headers, content=content
    )

    finished: list[bool] = []

    async def done() -> None:  # once, whether the answer ended, failed or its client went away
        if not finished:
            finished.append(True)
            instance.last_used = time.monotonic()
            frontend.in_flight -= 1
            await client.aclose()

    try:
        upstream = await client.send(upstream_request, stream=True)
    except httpx.TimeoutException:
        await done()
        return Response("upstream request timeout", status_code=504, media_type="text/plain")
    except httpx.HTTPError:
        await done()
        return unavailable()

    async def body() -> Any:
        try:
            async for chunk in upstream.aiter_raw():
                yield chunk
        except httpx.TimeoutException:
            return  # the client sees the answer cut short, as a Cloud Run timeout mid-stream does
        finally:
            await upstream.aclose()
            await done()

    kept = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP - {"content-length"}}
    return StreamingResponse(body(), status_code=upstream.status_code, headers=kept, background=BackgroundTask(done))


# ------------------------------------------------------------------ instances
