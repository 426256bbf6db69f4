"""HTTP/1.1 over a plain socket, for requests httpx refuses to send (broken framing, stalls, raw bytes)."""

from __future__ import annotations

import contextlib
import json
import socket
import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawResponse:
    """What came back: a status (None if the server closed without answering), headers, body."""

    status: int | None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""

    def json(self) -> Any:
        return json.loads(self.body)


def connect(url: str, timeout: float = 10.0) -> socket.socket:
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=timeout)
    sock.settimeout(timeout)
    return sock


def read_response(sock: socket.socket, *, head: bool = False) -> RawResponse:
    """One final response (1xx skipped; framed by content-length, or by close); status None if the
    server just closed."""
    data = b""
    while True:
        while b"\r\n\r\n" not in data:
            chunk = _recv(sock)
            if not chunk:
                return RawResponse(None) if not data else _parse_head(data)
            data += chunk
        response = _parse_head(data)
        data = data.split(b"\r\n\r\n", 1)[1]
        if response.status is None or response.status >= 200:
            break
    length = None if head else response.headers.get("content-length")
    while length is not None and len(data) < int(length):
        chunk = _recv(sock)
        if not chunk:
            break
        data += chunk
    response.body = data if length is None else data[: int(length)]
    return response


def exchange(url: str, data: bytes, *, timeout: float = 10.0, head: bool = False) -> RawResponse:
    """Send `data` as is, read one response, close."""
    with connect(url, timeout) as sock:
        # The server may answer and close before a large bad request is all sent: read what it said.
        with contextlib.suppress(OSError):
            sock.sendall(data)
        return read_response(sock, head=head)


def request(method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> bytes:
    """A well-formed request with content-length, unless `headers` says otherwise."""
    lines = [f"{method} {path} HTTP/1.1", "host: 127.0.0.1"]
    all_headers = {"content-type": "application/json", "content-length": str(len(body)), **(headers or {})}
    lines += [f"{name}: {value}" for name, value in all_headers.items() if value is not None]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def closed_by_server(sock: socket.socket, within: float) -> bool:
    """Whether the server closes `sock` (reading whatever it says first) within `within` seconds."""
    deadline = time.monotonic() + within
    sock.settimeout(0.2)
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except OSError:
            return True
    return False


def _recv(sock: socket.socket) -> bytes:
    try:
        return sock.recv(65536)
    except ConnectionResetError:
        return b""


def _parse_head(data: bytes) -> RawResponse:
    head = data.split(b"\r\n\r\n", 1)[0].decode("latin-1")
    status_line, *header_lines = head.split("\r\n")
    parts = status_line.split(" ")
    status = int(parts[1]) if len(parts) > 1 and parts[1].isdigit() else None
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return RawResponse(status, headers)
