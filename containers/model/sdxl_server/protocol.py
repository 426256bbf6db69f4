"""uvicorn's h11 protocol with the server's limits, and its own errors in the server's JSON shape.

uvicorn answers a request it cannot parse with a plain-text 400 before any app sees it, has no timeout
for request headers (a client that sends half a request line holds its connection forever), and its
`limit_concurrency` answers in plain text as well. This subclass changes those three things and nothing
else; everything the app sees is uvicorn's.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn.protocols.http.h11_impl import H11Protocol

from sdxl_server import logs
from sdxl_server.settings import Settings

_PHRASES = {400: "Bad Request", 408: "Request Timeout", 503: "Service Unavailable"}


def error_bytes(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 response in the server's error shape, closing the connection."""
    body = json.dumps({"error": {"code": status, "message": message}}).encode()
    retry = "retry-after: 1\r\n" if status == 503 else ""  # connections free up as soon as one closes
    head = (
        f"HTTP/1.1 {status} {_PHRASES[status]}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\n{retry}connection: close\r\n\r\n"
    )
    return head.encode() + body


def protocol_for(settings: Settings) -> type[H11Protocol]:
    """The protocol class to pass as uvicorn's `http`, with `settings`' timeouts and connection limit."""

    class Protocol(LimitedH11Protocol):
        header_timeout_s = settings.header_timeout_s
        max_connections = settings.max_connections

    return Protocol


class LimitedH11Protocol(H11Protocol):
    """H11Protocol plus a header timeout, a connection limit and JSON for its own errors."""

    header_timeout_s: float = 10.0
    max_connections: int = 256

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            logs.log("connection refused: too many connections", connections=len(self.connections))
            self._answer_and_close(503, f"over {self.max_connections} connections (SDXL_MAX_CONNECTIONS); retry")
            return
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self._between_requests():
            if self._header_timer is None and not self.transport.is_closing():
                self._arm_header_timer()  # the start of another request on a kept-alive connection
        else:
            self._disarm_header_timer()  # headers complete: the app's body timeout takes over

    def send_400_response(self, msg: str) -> None:
        self._disarm_header_timer()
        self._answer_and_close(400, "malformed HTTP request: " + msg.rstrip("."))

    def _between_requests(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    def _arm_header_timer(self) -> None:
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _headers_too_slow(self) -> None:
        self._header_timer = None
        if self._between_requests() and not self.transport.is_closing():
            self._answer_and_close(
                408, f"the request headers did not arrive within {self.header_timeout_s:g} s (SDXL_HEADER_TIMEOUT)"
            )

    def _answer_and_close(self, status: int, message: str) -> None:
        # Written past h11: it would refuse to answer a request it has not seen (or seen broken).
        self.transport.write(error_bytes(status, message))
        self.transport.close()
