"""A counting proxy in front of the GCS emulator, for tests that must see (or spoil) what a client asks of GCS:
each object metadata GET and each download, failures on demand, bodies that differ from their metadata."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import httpx

from sdxl_server.lora.sources import Source, parse_source


@dataclass
class Proxy:
    """An ASGI app in front of the emulator: counts what the client asks, and can fail or alter downloads."""

    upstream: str
    media: list[str] = field(default_factory=list)  # object downloads (alt=media), by path
    metadata: list[str] = field(default_factory=list)  # object metadata GETs
    fail_media: list[int] = field(default_factory=list)  # statuses for the next downloads, one each
    fail_metadata: list[int] = field(default_factory=list)
    append: bytes = b""  # added to every download's body (a body bigger than its metadata says)
    flip: bool = False  # one bit wrong in every download

    def reset(self) -> None:
        for kept in (self.media, self.metadata, self.fail_media, self.fail_metadata):
            kept.clear()
        self.append, self.flip = b"", False

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response

        request = Request(scope, receive)
        query = request.url.query
        is_media = "alt=media" in query
        is_object = request.method == "GET" and "/o/" in request.url.path
        if is_media:
            self.media.append(request.url.path)
        elif is_object:
            self.metadata.append(request.url.path)
        failing = self.fail_media if is_media else self.fail_metadata if is_object else []
        if failing:
            status = failing.pop(0)
            message = "sdxl@p.iam.gserviceaccount.com does not have storage.objects.get access" if status == 403 else ""
            error = {"error": {"code": status, "message": message or "backend error", "errors": []}}
            await JSONResponse(error, status_code=status)(scope, receive, send)
            return
        answer = await forward(self.upstream, request)
        body = answer.content
        if is_media and self.flip and body:
            body = bytes([body[0] ^ 1]) + body[1:]
        if is_media:
            body += self.append
        skip = ("content-length", "content-encoding", "x-goog-hash", "x-goog-stored-content-length")
        headers = {k: v for k, v in answer.headers.items() if k.lower() not in skip}
        await Response(body, status_code=answer.status_code, headers=headers)(scope, receive, send)


async def forward(upstream: str, request: Any) -> httpx.Response:
    """`request` (a Starlette Request) sent on to `upstream` as it came: method, path, query, headers, body."""
    query = request.url.query
    async with httpx.AsyncClient() as client:
        return await client.request(
            request.method,
            f"{upstream}{request.url.path}" + (f"?{query}" if query else ""),
            headers=[(k, v) for k, v in request.headers.items() if k.lower() != "content-length"],
            content=await request.body(),
        )


@dataclass
class Bucket:
    """A new bucket in the emulator, seen through the real client and the counting proxy."""

    bucket: Any
    proxy: Proxy

    @property
    def name(self) -> str:
        return str(self.bucket.name)

    def put(self, name: str, data: bytes) -> Source:
        self.bucket.blob(name).upload_from_string(data)
        return parse_source(f"gs://{self.name}/{name}")

    def generation(self, name: str) -> str:
        return str(self.bucket.get_blob(name).generation)
