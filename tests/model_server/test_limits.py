"""Hostile clients against a real `python -m sdxl_server`: huge and stalled bodies, stalled headers, too
many connections, unparsable HTTP. Health keeps answering, resources are given back, errors are JSON."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.model_server.rawhttp import closed_by_server, connect, exchange, read_response, request
from tests.servers import Server, server_process

HEALTH_S = 1.0  # Vertex AI's probe gives up after 10 s; the contract promises an answer within 1 s
MAX_CONNECTIONS = 16


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    env = {
        "SDXL_MODEL": "tiny",
        "SDXL_WARMUP": "64x64",
        "SDXL_HEADER_TIMEOUT": "1",
        "SDXL_BODY_TIMEOUT": "1",
        "SDXL_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
    }
    with server_process(env, Path(tmp_path_factory.mktemp("limits"))) as started:
        started.wait_until("ready")
        yield started


def empty_instances(count: int) -> bytes:
    return b'{"instances":[' + b",".join([b"{}"] * count) + b"]}"


def test_health_answers_while_large_bodies_are_read_and_parsed(server: Server) -> None:
    """Issue 12, point 1: 350,000 empty instances once held the event loop for ~10 s."""
    stalled = [connect(server.url) for _ in range(2)]
    for sock in stalled:  # being read: half a body, then nothing
        sock.sendall(request("POST", "/predict", b'{"instances": [', {"content-length": "1000"}))
    bodies = [empty_instances(350_000), b"[" * 1_400_000, b'{"a":' * 250_000]
    with ThreadPoolExecutor(len(bodies)) as pool:
        sent = [pool.submit(httpx.post, server.url + "/predict", content=body, timeout=30) for body in bodies]
        while not all(future.done() for future in sent):
            assert server.health(timeout=HEALTH_S).status_code == 200
        answers = [future.result() for future in sent]
    assert [answer.status_code for answer in answers] == [400, 400, 400]
    assert [answer.json()["error"]["field"] for answer in answers] == ["instances", "body", "body"]
    for sock in stalled:
        assert read_response(sock).status == 408
        sock.close()
    assert server.health(timeout=HEALTH_S).status_code == 200


def test_a_stalled_body_gets_a_json_408_and_the_connection_is_closed(server: Server) -> None:
    with connect(server.url) as sock:
        sock.sendall(request("POST", "/predict", b'{"instances": [{"prompt"', {"content-length": "500"}))
        response = read_response(sock)
        assert response.status == 408
        error = response.json()["error"]
        assert error["code"] == 408 and "SDXL_BODY_TIMEOUT" in error["message"] and error["field"] == "body"
        assert closed_by_server(sock, within=5)
    assert '"status": 408' in server.log()


@pytest.mark.parametrize("sent", [b"", b"POST /predict HTTP/1.1\r\nhost: 127.0.0.1\r\ncontent-"])
def test_stalled_headers_are_answered_408_and_closed(server: Server, sent: bytes) -> None:
    with connect(server.url) as sock:
        sock.sendall(sent)
        response = read_response(sock)
        assert response.status == 408 and "SDXL_HEADER_TIMEOUT" in response.json()["error"]["message"]
        assert closed_by_server(sock, within=5)


def test_a_kept_alive_connection_that_stalls_in_its_second_request_is_closed(server: Server) -> None:
    with connect(server.url) as sock:
        sock.sendall(request("GET", "/health"))
        assert read_response(sock).status == 200
        sock.sendall(b"GET /heal")
        assert closed_by_server(sock, within=5)


def test_connections_over_the_limit_get_a_json_503_and_stalled_ones_are_dropped(server: Server) -> None:
    held = [connect(server.url) for _ in range(MAX_CONNECTIONS)]
    try:
        over = exchange(server.url, request("GET", "/health"))
        assert over.status == 503 and over.headers["retry-after"] == "1"
        assert "SDXL_MAX_CONNECTIONS" in over.json()["error"]["message"]
        assert all(closed_by_server(sock, within=5) for sock in held)  # the header timeout frees them
    finally:
        for sock in held:
            sock.close()
    assert server.health(timeout=HEALTH_S).status_code == 200


@pytest.mark.parametrize(
    "raw",
    [
        b"GARBAGE\r\n\r\n",
        b"POST /predict HTTP/1.1\r\nhost: x\r\ncontent-length: -1\r\n\r\n",
        b"GET /health HTTP/1.1\r\nhost: x\r\n" + b"x-long: " + b"a" * 1_000_000 + b"\r\n\r\n",
        b"GET /health HTTP/1.1\r\n\r\n",
    ],
    ids=["not-http", "negative-length", "1MB-header", "no-host"],
)
def test_requests_uvicorn_cannot_parse_get_the_json_400(server: Server, raw: bytes) -> None:
    response = exchange(server.url, raw)
    assert response.status == 400
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == 400


def test_stalled_clients_hold_no_connection_once_the_timeouts_pass(server: Server) -> None:
    import psutil

    assert server.process is not None
    stalled = [connect(server.url) for _ in range(6)]
    partial = [b"", b"GET /h", request("POST", "/predict", b"{", {"content-length": "9"})] * 2
    for sock, sent in zip(stalled, partial, strict=True):
        sock.sendall(sent)
    assert all(closed_by_server(sock, within=5) for sock in stalled)
    for sock in stalled:
        sock.close()
    held = [c for c in psutil.Process(server.process.pid).net_connections("tcp") if c.status == "ESTABLISHED"]
    assert held == []
