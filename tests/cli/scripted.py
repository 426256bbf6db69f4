"""A real HTTP server on loopback that answers predict requests as a test scripts them."""

from __future__ import annotations

import base64
import json
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

PNG = base64.b64encode(b"\x89PNG\r\n\x1a\n").decode()
GOOD = {"predictions": [{"images": [PNG], "seeds": [7], "width": 64, "height": 64, "output_format": "png"}]}


@dataclass
class Answer:
    status: int = 200
    body: Any = field(default_factory=lambda: GOOD)  # a dict/list is sent as JSON, str/bytes as they are
    headers: dict[str, str] = field(default_factory=dict)
    drop: bool = False  # close the connection without answering
    hang_s: float = 0.0


@dataclass
class Script:
    url: str
    answers: list[Answer]
    seen: list[dict[str, Any]] = field(default_factory=list)


@contextmanager
def scripted_server(on_request: Callable[[], None] | None = None) -> Iterator[Script]:
    """A ThreadingHTTPServer on 127.0.0.1 answering POSTs as `script.answers` say (the last one repeats)."""
    script = Script("", [])
    closing = threading.Event()  # ends every scripted hang when the test is done

    class Quiet(ThreadingHTTPServer):
        daemon_threads = False
        block_on_close = True  # server_close() waits for the handlers: none writes into a later test

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that gave up (timeout, dropped) is what these tests make happen

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_POST(self) -> None:
            length = int(self.headers.get("content-length", 0))
            script.seen.append(json.loads(self.rfile.read(length)))
            if on_request is not None:
                on_request()
            answer = script.answers.pop(0) if len(script.answers) > 1 else script.answers[0]
            if answer.hang_s and closing.wait(answer.hang_s):
                return
            if answer.drop:
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            data = answer.body
            raw = data if isinstance(data, bytes) else (data if isinstance(data, str) else json.dumps(data)).encode()
            self.send_response(answer.status)
            is_json = not isinstance(data, (str, bytes))
            self.send_header("content-type", "application/json" if is_json else "text/html")
            for key, value in answer.headers.items():
                self.send_header(key, value)
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)

    server = Quiet(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{server.server_address[1]}/predict"
    try:
        yield script
    finally:
        closing.set()
        server.shutdown()
        server.server_close()
