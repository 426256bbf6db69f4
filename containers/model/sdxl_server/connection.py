"""What the predict route needs from the connection: the body, within limits of size and time, and
word when the client goes away."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import ClientDisconnect, Request

from sdxl_server.errors import ClientClosed, PayloadTooLarge, RequestTimeout

T = TypeVar("T")


def request_id(given: str | None) -> str:
    """The caller's request id when it is a sane one (it goes into every log line), else a fresh one."""
    if given and len(given) <= 128 and given.isascii() and given.isprintable():
        return given
    return uuid.uuid4().hex


async def read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The body, refused with 413 as soon as it passes `limit` bytes (before it is all read), and with
    408 when it has not all arrived within `timeout_s` (a stalled client holds nothing for longer)."""
    declared = request.headers.get("content-length")
    too_large = PayloadTooLarge(
        f"the request body is over the limit of {limit / 1e6:g} MB (SDXL_MAX_REQUEST_BYTES; "
        "a shared Vertex AI endpoint allows 1.5 MB): send fewer or shorter instances",
        field="body",
    )
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise too_large
                chunks.append(chunk)
    except TimeoutError:
        raise RequestTimeout(
            f"the request body did not arrive within {timeout_s:g} s (SDXL_BODY_TIMEOUT)", field="body"
        ) from None
    except ClientDisconnect:
        raise ClientClosed("client closed request: it disconnected before its body arrived") from None
    return b"".join(chunks)


async def unless_disconnected(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientClosed as soon as the client disconnects (the work is then cancelled:
    a queued request leaves the queue, a running one stops at its next denoising step)."""
    running = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({running, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
    if running.done():
        return running.result()
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await running  # returns once the work has stopped, so the log line counts its steps
    raise ClientClosed("client closed request: it disconnected before its images were ready")


async def _disconnected(request: Request) -> None:
    # The body has been read: the next message uvicorn delivers is the disconnect.
    while (await request.receive())["type"] != "http.disconnect":
        pass
