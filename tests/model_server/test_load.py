"""Load on a real `python -m sdxl_server` with the default queue: a burst, many requests, abandoned ones."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.model_server.rawhttp import connect, request
from tests.servers import Server, server_process

MIB = 1024 * 1024


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """Default settings (queue of 4, 55 s limit), the tiny model warmed up at 64x64."""
    with server_process({"SDXL_MODEL": "tiny", "SDXL_WARMUP": "64x64"}, tmp_path_factory.mktemp("load")) as started:
        started.wait_until("ready")
        yield started


def small(seed: int, steps: int = 1, size: int = 64) -> dict[str, Any]:
    return {
        "instances": [{"prompt": "a fox", "seed": seed}],
        "parameters": {"num_inference_steps": steps, "width": size, "height": size},
    }


def predict_lines(server: Server) -> list[dict[str, Any]]:
    lines = (json.loads(line) for line in server.log().splitlines() if line.startswith("{"))
    return [line for line in lines if line["message"] == "predict"]


def rss_bytes(server: Server) -> int:
    assert server.process is not None
    for line in Path(f"/proc/{server.process.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_32_concurrent_requests_get_200_or_429_with_a_retry_after_that_fits_the_work(server: Server) -> None:
    assert server.predict(small(0, steps=4)).status_code == 200  # the server has measured its speed
    started = time.monotonic()
    with ThreadPoolExecutor(32) as pool:
        responses = list(pool.map(lambda i: server.predict(small(i, steps=4), timeout=60), range(32)))
    drained_s = time.monotonic() - started
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429}, statuses
    assert statuses.count(200) >= 5  # one running and the four the queue holds
    retry_afters = [int(r.headers["retry-after"]) for r in responses if r.status_code == 429]
    assert retry_afters, "a burst of 32 against a queue of 4 must be refused in part"
    for response in responses:
        if response.status_code == 429:
            assert response.json()["error"]["code"] == 429
    # Integer seconds, at least 1, and of the order of the work queued: the whole burst drained in
    # `drained_s`, so no single estimate may be far beyond it (issue 12: 14 s for a 0.35 s queue).
    assert min(retry_afters) >= 1
    assert max(retry_afters) <= math.ceil(3 * drained_s) + 2, (retry_afters, drained_s)
    assert server.health(timeout=1).status_code == 200


BAD_BODIES: list[bytes] = [
    b"{",
    b"[" * 50_000,
    b'{"instances":[' + b",".join([b"{}"] * 50_000) + b"]}",
    json.dumps({"instances": [{"prompt": "a fox", "seed": -1}]}).encode(),
    json.dumps({"instances": [{"prompt": "x" * 3000}]}).encode(),
    json.dumps({"instances": [{"prompt": "a fox"}], "parameters": {"width": 7}}).encode(),
    b'{"instances":[{"prompt":"a","seed":' + b"9" * 5000 + b"}]}",
    b"x" * 1_600_000,
    b"\xff\xfe",
]


def one_of_each(client: httpx.Client, index: int) -> int:
    """Request number `index` of a mix: one in ten generates, the rest are refused at every stage."""
    if index % 10 == 0:
        return client.post("/predict", json=small(index)).status_code
    return client.post("/predict", content=BAD_BODIES[index % len(BAD_BODIES)]).status_code


def test_rss_stays_flat_over_400_requests(server: Server) -> None:
    with ThreadPoolExecutor(4) as pool, httpx.Client(base_url=server.url, timeout=60) as client:
        assert set(pool.map(lambda i: one_of_each(client, i), range(40))) <= {200, 400, 413}
        before = rss_bytes(server)
        statuses = list(pool.map(lambda i: one_of_each(client, i), range(400)))
    after = rss_bytes(server)
    assert statuses.count(200) == 40 and set(statuses) <= {200, 400, 413}
    assert after - before < 48 * MIB, f"RSS grew by {(after - before) / MIB:.1f} MiB over 400 requests"


def test_abandoned_requests_are_skipped_or_stopped_and_logged_as_499(server: Server) -> None:
    """Issue 12, point 4: clients that leave must not keep the GPU busy for images nobody receives."""
    # As long as a request may be (150 steps at 512x512): still running when the fourth has queued.
    body = json.dumps(small(7, steps=150, size=512)).encode()
    clients = [connect(server.url) for _ in range(4)]
    for queued, sock in enumerate(clients, start=1):
        sock.sendall(request("POST", "/predict", body))
        deadline = time.monotonic() + 30
        while server.health().json()["queue"] < queued and time.monotonic() < deadline:
            time.sleep(0.02)  # in arrival order: one running, three waiting
        assert server.health().json()["queue"] == queued, server.log()[-3000:]
    for sock in clients:
        sock.close()
    deadline = time.monotonic() + 30  # a hang guard: the running one stops at its next step
    while server.health().json()["queue"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.health().json()["queue"] == 0  # nothing abandoned is left for the next request to wait for
    before = len(predict_lines(server))
    assert server.predict(small(8)).status_code == 200
    lines = predict_lines(server)
    abandoned = [line for line in lines if line.get("steps") == 150]
    assert [line["status"] for line in abandoned] == [499] * 4
    assert all("client closed request" in line["error"] for line in abandoned)
    steps_run = sorted(line["steps_run"] for line in abandoned)
    assert steps_run[:3] == [0, 0, 0]  # the waiting ones never started
    assert steps_run[3] < 150  # the running one stopped between steps
    assert [line["status"] for line in lines[before:]] == [200]
    assert not any(line["status"] in (200, 500) for line in abandoned)
