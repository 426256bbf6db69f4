"""`sdxlctl batch` on target local (sdxlctl/local/batch.py) against the real tiny model server.

A counting proxy stands between the runner and the session's plain server: it passes each request on and keeps
its body, so the tests count what was generated (which lines, how many requests) rather than trust the runner.
Images are read back by Pillow; the manifest is read as the JSONL it is.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from sdxlctl.batch import Batch, BatchResult, Counts, Line, Submission
from sdxlctl.config import Config
from sdxlctl.errors import DeployError, Interrupted, PredictError
from sdxlctl.local import batch as local_batch
from sdxlctl.state import Resource, StateStore
from tests.servers import Server, serve_app

PARAMETERS = {"num_inference_steps": 2, "width": 64, "height": 64, "output_format": "png"}


@contextlib.contextmanager
def counting_proxy(target: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A pass-through to the model server at `target` that keeps every predict body, in order."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import Response
    from starlette.routing import Route

    bodies: list[dict[str, Any]] = []

    async def predict(request: Request) -> Response:
        data = await request.body()
        bodies.append(json.loads(data))
        async with httpx.AsyncClient(timeout=120) as http:
            answer = await http.post(target + "/predict", content=data, headers={"content-type": "application/json"})
        return Response(answer.content, answer.status_code, media_type="application/json")

    with serve_app(Starlette(routes=[Route("/predict", predict, methods=["POST"])])) as server:
        yield server.url, bodies


def deployed(tmp_path: Path, url: str) -> tuple[Config, StateStore]:
    """A config in tmp_path whose state records a local server at `url`, as `sdxlctl deploy` leaves it."""
    config = Config(path=tmp_path / "sdxlctl.toml")
    store = StateStore(config.home)
    store.record("sdxl", Resource(kind="local-server", name="sdxl-server", target="local", url=url, details={}))
    return config, store


def six_lines(**extra: dict[str, Any]) -> Batch:
    lines = tuple(
        Line(n, {"prompt": f"a red fox, number {n}", "seed": 1000 + n, **extra.get(str(n), {})}) for n in range(1, 7)
    )
    return Batch(Path("prompts.txt"), lines, dict(PARAMETERS))


def submit(batch: Batch, out: Path, *, batch_size: int, retry_of: str = "") -> Submission:
    return Submission(batch, str(out), batch_size=batch_size, retry_of=retry_of)


def manifest(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def seeds_sent(bodies: list[dict[str, Any]]) -> list[int]:
    return [instance["seed"] for body in bodies for instance in body["instances"]]


def test_six_lines_make_six_images_and_a_manifest_and_a_rerun_makes_none(plain_server: Server, tmp_path: Path) -> None:
    out, seen = tmp_path / "batch-prompts", list[Counts]()
    batch = six_lines()
    with counting_proxy(plain_server.url) as (url, bodies):
        config, store = deployed(tmp_path, url)
        result = local_batch.run(config, store, submit(batch, out, batch_size=4), progress=seen.append)
        assert (result.done, result.failed, result.skipped, result.state) == (6, [], 0, "SUCCEEDED")
        assert len(bodies) == 2 and seeds_sent(bodies) == [1001, 1002, 1003, 1004, 1005, 1006]
        # The key stays out of the instance; the shared parameters travel once, at the body's level.
        assert bodies[0]["instances"][0] == {"prompt": "a red fox, number 1", "seed": 1001}
        assert all(body["parameters"] == PARAMETERS for body in bodies)
        rows = manifest(out)
        assert [row["line"] for row in rows] == [1, 2, 3, 4, 5, 6]
        for row in rows:
            assert row["error"] is None and row["seed"] == 1000 + row["line"]
            assert row["images"] == [f"images/{row['line']:06d}.png"]
            assert Image.open(io.BytesIO((out / row["images"][0]).read_bytes())).size == (64, 64)
        assert (out / "input.jsonl").read_bytes() == batch.jsonl()
        assert [(c.done, c.left) for c in seen] == [(0, 6), (4, 2), (6, 0)]
        assert all(c.state == "running" for c in seen)

        again = local_batch.run(config, store, submit(batch, out, batch_size=4), progress=seen.append)
        assert (again.done, again.skipped, len(bodies)) == (0, 6, 2)  # nothing asked for twice
        assert seen[-1].skipped == 6 and seen[-1].left == 0


def test_an_interrupt_keeps_what_was_answered_and_the_rerun_makes_only_the_rest(
    plain_server: Server, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    batch = six_lines()

    def interrupt_after_an_answer(counts: Counts) -> None:
        if counts.done:
            raise KeyboardInterrupt

    with counting_proxy(plain_server.url) as (url, bodies):
        config, store = deployed(tmp_path, url)
        with pytest.raises(Interrupted) as caught:
            local_batch.run(config, store, submit(batch, out, batch_size=2), progress=interrupt_after_an_answer)
        assert caught.value.message == "interrupted after 2 of 6 lines"
        assert caught.value.hint == "run the same command again: it skips the lines already done"
        assert [row["line"] for row in manifest(out)] == [1, 2] and len(bodies) == 1

        result = local_batch.run(config, store, submit(batch, out, batch_size=2))
    assert (result.done, result.skipped, result.failed) == (4, 2, [])
    assert seeds_sent(bodies) == [1001, 1002, 1003, 1004, 1005, 1006]  # every line generated once, in order
    assert sorted(path.name for path in (out / "images").iterdir()) == [f"{n:06d}.png" for n in range(1, 7)]


def test_a_refused_request_fails_only_its_lines_and_retry_failed_runs_only_those(
    plain_server: Server, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    batch = six_lines(**{"4": {"bogus": 1}})  # what the server refuses (the input reader would never pass it)
    with counting_proxy(plain_server.url) as (url, bodies):
        config, store = deployed(tmp_path, url)
        result = local_batch.run(config, store, submit(batch, out, batch_size=2))
        assert (result.state, result.done) == ("SUCCEEDED", 4)
        assert [row.line for row in result.failed] == [3, 4]  # the request of lines 3 and 4
        three, four = result.failed  # the server named instances[1].bogus: line 4, the one to fix
        assert four.error == "bogus: unknown field"
        assert three.error == "refused with line 4 of the same request: bogus: unknown field"
        rows = {row["line"]: row for row in manifest(out)}
        assert [n for n, row in rows.items() if row["error"]] == [3, 4] and rows[3]["images"] == []
        assert len(bodies) == 3  # the batch went on after the refusal

        # A plain rerun leaves the failed lines alone and says so; the door's --retry-failed runs only them.
        said: list[str] = []
        again = local_batch.run(config, store, submit(batch, out, batch_size=2), say=said.append)
        assert (again.done, again.skipped, [r.line for r in again.failed], len(bodies)) == (0, 4, [3, 4], 3)
        assert any("--retry-failed" in line for line in said)
        fixed = six_lines().only({3, 4})
        retried = local_batch.run(config, store, submit(fixed, out, batch_size=2, retry_of=str(out)))
        assert (retried.done, retried.failed, len(bodies)) == (2, [], 4)
        assert seeds_sent(bodies[3:]) == [1003, 1004]
    previous = local_batch.previous_rows(config, store, out)
    assert sorted(previous) == [1, 2, 3, 4, 5, 6] and not any(row.error for row in previous.values())
    assert (out / "input.jsonl").read_bytes() == batch.jsonl()  # the retry kept the whole input


def test_a_server_gone_stops_the_batch_saying_how_far_it_got_and_a_rerun_resumes(
    plain_server: Server, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    batch = six_lines()
    with contextlib.ExitStack() as proxy:
        url, bodies = proxy.enter_context(counting_proxy(plain_server.url))
        config, store = deployed(tmp_path, url)

        def stop_the_server(counts: Counts) -> None:
            if counts.done:
                proxy.close()  # the next request meets a closed port

        with pytest.raises(PredictError) as caught:
            local_batch.run(config, store, submit(batch, out, batch_size=2), progress=stop_the_server)
    assert "nothing answers at" in caught.value.message
    assert "the batch stopped after 2 of 6 lines" in caught.value.message
    assert "run the same command again" in (caught.value.hint or "")
    assert [row["line"] for row in manifest(out)] == [1, 2]
    with counting_proxy(plain_server.url) as (url, bodies):
        config, store = deployed(tmp_path, url)
        result: BatchResult = local_batch.run(config, store, submit(batch, out, batch_size=2))
    assert (result.done, result.skipped) == (4, 2) and seeds_sent(bodies) == [1003, 1004, 1005, 1006]


def test_nothing_deployed_says_deploy_first_and_writes_nothing(tmp_path: Path) -> None:
    config = Config(path=tmp_path / "sdxlctl.toml")
    with pytest.raises(DeployError) as caught:
        local_batch.run(config, StateStore(config.home), submit(six_lines(), tmp_path / "out", batch_size=2))
    assert caught.value.hint == "run `sdxlctl deploy` first"
    assert not (tmp_path / "out").exists()


def test_images_that_cannot_be_written_are_rescued_and_the_batch_stops(plain_server: Server, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "images").write_text("a file where the images folder goes")
    config, store = deployed(tmp_path, plain_server.url)
    with pytest.raises(PredictError) as caught:
        local_batch.run(config, store, submit(six_lines(), out, batch_size=2))
    rescued = config.home / "rescued"
    assert f"the images are saved in {rescued}" in caught.value.message
    assert "the batch stopped after 0 of 6 lines" in caught.value.message
    assert sorted(path.name[-10:] for path in rescued.iterdir()) == ["000001.png", "000002.png"]
    assert not (out / "manifest.jsonl").exists()  # no row points at an image that is not there
