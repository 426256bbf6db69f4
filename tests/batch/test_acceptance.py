"""Issue 18's acceptance list, end to end through `sdxlctl batch`: on target vertex against the emulator (Vertex AI
through google-cloud-aiplatform, Cloud Storage through google-cloud-storage and the GCS emulator; the job's
replicas forward to the session's tiny model server), and on target local. Small and fast: 64x64, 2 steps."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import threading
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

from sdxlctl.state import Resource, StateStore
from tests.cloud.test_faults import up
from tests.cloud.test_interrupts import sent
from tests.conftest import Cli
from tests.emulator.app import create_app
from tests.emulator.core import World
from tests.emulator.model_servers import ModelServers
from tests.emulator_fixtures import PROJECT, RUN_IDLE_S, RUN_PROBE_SCALE, Emulator
from tests.interrupts import interrupt_sdxlctl
from tests.servers import Server, serve_app

SMALL = ["--steps", "2", "--width", "64", "--height", "64"]
BUCKET = f"{PROJECT}-sdxlctl"  # the staging bucket `build` makes ([gcp] staging_bucket unset)


def prompts_file(folder: Path, lines: int = 200) -> Path:
    path = folder / "prompts.txt"
    path.write_text("".join(f"a lighthouse at dusk, study {n}\n" for n in range(1, lines + 1)), encoding="utf-8")
    return path


def manifest_rows(data: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()]


def pixels(data: bytes) -> Any:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


@dataclass
class Proxy:
    """A loopback front of the tiny server that counts the prompts it had generated, can hold one request
    forever (never forwarded: the request in flight at Ctrl-C) and refuse prompts as the server refuses a line."""

    url: str = ""
    generated: Counter[str] = field(default_factory=Counter)
    posts: int = 0
    hold_post: int = 0  # this POST (1-based) is held and never forwarded
    held: threading.Event = field(default_factory=threading.Event)
    refuse: Callable[[str], bool] = lambda _: False
    lock: threading.Lock = field(default_factory=threading.Lock)


@contextmanager
def proxy(target: Server) -> Iterator[Proxy]:
    state, closing = Proxy(), threading.Event()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            answer = httpx.get(target.url + self.path, timeout=30)
            self._send(answer.status_code, answer.content)

        def do_POST(self) -> None:
            raw = self.rfile.read(int(self.headers.get("content-length", 0)))
            prompts = [str(i.get("prompt", i.get("text", ""))) for i in json.loads(raw).get("instances", [])]
            with state.lock:
                state.posts += 1
                number = state.posts
            if number == state.hold_post:
                state.held.set()
                closing.wait(120)
                return
            refused = [p for p in prompts if state.refuse(p)]
            if refused:
                error = {"code": 400, "message": f"prompt: refused by the test ({refused[0]})", "field": "prompt"}
                self._send(400, json.dumps({"error": error}).encode())
                return
            headers = {"content-type": "application/json"}
            answer = httpx.post(target.url + self.path, content=raw, headers=headers, timeout=120)
            if answer.status_code == 200:
                with state.lock:
                    state.generated.update(prompts)
            self._send(answer.status_code, answer.content)

        def _send(self, status: int, body: bytes) -> None:
            self.send_response(status)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    class Quiet(ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request: Any, client_address: Any) -> None:
            pass  # a client that went away (the interrupted one) is what these tests make happen

    server = Quiet(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield state
    finally:
        closing.set()
        server.shutdown()
        server.server_close()


@contextmanager
def emulator_via(gcs: str, forward_to: str) -> Iterator[Emulator]:
    """The `emulator` fixture's emulator, its replicas forwarding to `forward_to` instead of the tiny server."""
    world = World(polls_to_finish=2, run_idle_s=RUN_IDLE_S, run_probe_scale=RUN_PROBE_SCALE)
    with serve_app(create_app(world, servers=ModelServers(forward_to=forward_to), gcs_url=gcs)) as server:
        yield Emulator(server.url, gcs, world)


def interrupt_batch(cwd: Path, env: dict[str, str], args: list[str], ready: Callable[[], bool]) -> str:
    """`sdxlctl batch ARGS` in a subprocess, SIGINT once `ready()`; it must end as interrupted (130): stderr."""
    return interrupt_sdxlctl(
        ["batch", *args], cwd=cwd, env=env, ready=ready, never="the batch never got to its wait", deadline_s=90
    )


def polled_running_job(emulator: Emulator) -> Callable[[], bool]:
    """True once a job runs and sdxlctl has polled it (a GET of the job itself): the wait has begun."""

    def ready() -> bool:
        jobs = emulator.batch_jobs()
        if not jobs or jobs[0]["state"] != "JOB_STATE_RUNNING":
            return False
        return sent(emulator, "GET", re.escape(jobs[0]["name"]) + "$") > 0

    return ready


def recorded_job(folder: Path) -> str:
    """The name of the one batch job the state file in `folder` records (recorded before the wait)."""
    state = StateStore(folder / ".sdxlctl").read().of("sdxl")
    (job,) = [resource.name for kind, resource in state.items() if kind.startswith("batch-")]
    return job


def test_200_prompts_on_vertex_match_200_single_predictions_in_order(
    cli: Cli, emulator: Emulator, plain_server: Server, tmp_path: Path
) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload")
    source = prompts_file(tmp_path)
    prefix = f"acceptance-{uuid.uuid4().hex[:8]}/"
    out = ["--out", f"gs://{BUCKET}/{prefix}", "--download", "got"]
    ran = cli("batch", str(source), *SMALL, "--format", "png", *out, "--yes", env=env)  # png: pixels, not artefacts
    assert ran.code == 0, ran.err
    (job,) = emulator.batch_jobs()
    assert job["state"] == "JOB_STATE_SUCCEEDED", job

    rows = manifest_rows((tmp_path / "got" / "manifest.jsonl").read_bytes())
    assert [row["line"] for row in rows] == list(range(1, 201))
    assert [row["prompt"] for row in rows] == source.read_text(encoding="utf-8").splitlines()
    assert [row["error"] for row in rows] == [None] * 200
    assert len({row["seed"] for row in rows}) == 200  # a seed drawn per line, each recorded
    bucket = emulator.storage().bucket(BUCKET)
    assert manifest_rows(bucket.blob(prefix + "manifest.jsonl").download_as_bytes()) == rows  # gs:// and disk agree

    for row in rows:  # each line as one prediction of its own, with the seed the manifest records
        instance = {"prompt": row["prompt"], "seed": row["seed"]}
        answer = plain_server.predict({"instances": [instance], "parameters": row["parameters"]})
        assert answer.status_code == 200, answer.text
        (prediction,) = answer.json()["predictions"]
        single = pixels(base64.b64decode(prediction["images"][0]))
        (image,) = row["images"]
        assert image == f"images/{row['line']:06d}.png"
        downloaded = (tmp_path / "got" / image).read_bytes()
        assert bucket.blob(prefix + image).download_as_bytes() == downloaded
        batched = pixels(downloaded)
        assert batched.shape == single.shape == (64, 64, 3)
        assert int(abs(batched - single).max()) <= 2, (row["line"], int(abs(batched - single).max()))


BAD_FILES: dict[str, tuple[bytes, list[str]]] = {
    "malformed.jsonl": (b'{"prompt": "a fox"}\n{"prompt": "a cat"\n{"prompt": "a dog"}\n', ["line 2"]),
    "unknown.jsonl": (b'{"prompt": "a fox"}\n' * 3 + b'{"prompt": "a fox", "colour": "red"}\n', ["line 4", "colour"]),
    "empty.jsonl": (b'{"prompt": "a fox"}\n' * 136 + b'{"prompt": ""}\n{"prompt": "a cat"}\n', ["line 137", "prompt"]),
    "huge.txt": (b"a fox in snow\n" * 100_000, ["50000", "max_lines"]),
    "latin1.txt": ("a fox\nune forêt\n".encode("latin-1"), ["line 2", "utf-8"]),
}


def test_bad_files_are_refused_before_anything_is_uploaded_or_created(
    cli: Cli, emulator: Emulator, tmp_path: Path
) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload")
    storage = emulator.storage()

    def objects() -> set[str]:
        return {f"{b.name}/{o.name}" for b in storage.list_buckets() for o in storage.list_blobs(b.name)}

    before_objects, before_requests = objects(), len(emulator.requests())
    for name, (data, named) in BAD_FILES.items():
        (tmp_path / name).write_bytes(data)
        refused = cli("batch", name, *SMALL, "--yes", env=env)
        said = " ".join(refused.err.split()).replace(",", "")
        assert refused.code == 2, (name, refused.err)
        assert "Traceback" not in refused.err and name in said, (name, refused.err)
        for words in named:
            assert words.lower() in said.lower(), (name, words, refused.err)
    assert emulator.requests()[before_requests:] == []  # no job created, nothing asked of Vertex AI
    assert objects() == before_objects  # nothing uploaded


def test_ctrl_c_mid_wait_then_attach_collects_the_same_job(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload")
    prompts_file(tmp_path, lines=6)
    emulator.slow("batchPredictionJobs")
    said = interrupt_batch(tmp_path, env, ["prompts.txt", *SMALL, "--yes"], polled_running_job(emulator))
    assert "keeps running" in said and "sdxlctl batch --attach" in said, said
    (job,) = emulator.batch_jobs()
    assert recorded_job(tmp_path) == job["name"]  # recorded before the wait

    emulator.finish_batch_jobs()
    attached = cli("batch", "--attach", "--download", "got", env=env)
    assert attached.code == 0, attached.err
    assert [j["name"] for j in emulator.batch_jobs()] == [job["name"]]  # the same job, and no second one
    assert sent(emulator, "POST", r"/batchPredictionJobs$") == 1
    rows = manifest_rows((tmp_path / "got" / "manifest.jsonl").read_bytes())
    assert [row["line"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert all(row["error"] is None and (tmp_path / "got" / row["images"][0]).is_file() for row in rows)


def test_teardown_cancels_a_running_job(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    env = emulator.env()
    up(cli, env, "build", "upload")
    prompts_file(tmp_path, lines=4)
    emulator.slow("batchPredictionJobs")
    interrupt_batch(tmp_path, env, ["prompts.txt", *SMALL, "--yes"], polled_running_job(emulator))
    states = {r["kind"]: r["state"] for r in json.loads(cli("status", "--json", env=env).out)["resources"]}
    assert any(kind.startswith("batch-") and "RUNNING" in str(state) for kind, state in states.items()), states
    job = re.escape(recorded_job(tmp_path))
    down = cli("teardown", "--yes", env=env)
    assert down.code == 0, down.err
    assert "cancelled" in down.out + down.err, down.err
    assert sent(emulator, "POST", job + ":cancel$") == 1 and sent(emulator, "DELETE", job + "$") == 1
    assert emulator.batch_jobs() == [] and emulator.labelled() == []  # cancelled, then its record deleted
    inputs = [b.name for b in emulator.storage().list_blobs(BUCKET, prefix="batch/sdxl/")]
    assert [name for name in inputs if name.endswith("/input.jsonl")], inputs  # the files in gs:// stay


def test_a_failed_job_reports_its_error_and_the_lines_that_failed(
    cli: Cli, gcs: str, plain_server: Server, tmp_path: Path
) -> None:
    with proxy(plain_server) as server, emulator_via(gcs, server.url) as emulator:
        server.refuse = lambda _: True
        env = emulator.env()
        up(cli, env, "build", "upload")
        prompts_file(tmp_path, lines=3)
        failed = cli("batch", "prompts.txt", *SMALL, "--download", "got", "--yes", env=env)
        (job,) = emulator.batch_jobs()
    assert job["state"] == "JOB_STATE_FAILED", job
    said = " ".join(failed.err.split())
    assert failed.code == 1, failed.err
    assert "refused by the test" in said and "Traceback" not in said, said
    rows = manifest_rows((tmp_path / "got" / "manifest.jsonl").read_bytes())
    assert [row["line"] for row in rows] == [1, 2, 3]
    assert all("refused by the test" in (row["error"] or "") and not row["images"] for row in rows), rows


def test_failed_lines_are_listed_and_retry_failed_runs_only_them(
    cli: Cli, gcs: str, plain_server: Server, tmp_path: Path
) -> None:
    with proxy(plain_server) as server, emulator_via(gcs, server.url) as emulator:
        server.refuse = lambda prompt: prompt.endswith((" 2", " 4"))
        env = emulator.env(SDXLCTL_BATCH_BATCH_SIZE="1")  # a refused request fails its own line only
        up(cli, env, "build", "upload")
        prompts_file(tmp_path, lines=5)
        first = cli("batch", "prompts.txt", *SMALL, "--download", "got", "--yes", env=env)
        said = " ".join(first.err.split())
        assert "--retry-failed" in said and "refused by the test" in said, said
        rows = {row["line"]: row for row in manifest_rows((tmp_path / "got" / "manifest.jsonl").read_bytes())}
        assert sorted(n for n, row in rows.items() if row["error"]) == [2, 4]

        server.refuse = lambda _: False  # whatever made them fail is fixed
        again = cli("batch", "prompts.txt", *SMALL, "--download", "got", "--retry-failed", "--yes", env=env)
        assert again.code == 0, again.err
        jobs = emulator.batch_jobs()
        assert sorted(j["completionStats"].get("successfulCount") for j in jobs) == ["2", "3"], jobs  # retry: 2
        rows = {row["line"]: row for row in manifest_rows((tmp_path / "got" / "manifest.jsonl").read_bytes())}
        assert sorted(rows) == [1, 2, 3, 4, 5] and all(row["error"] is None for row in rows.values()), rows
        assert sorted(server.generated.values()) == [1] * 5  # lines 1, 3, 5 were not made again


def test_local_target_resumes_after_an_interrupt_and_makes_no_line_twice(
    cli: Cli, plain_server: Server, tmp_path: Path
) -> None:
    # The 200-line file's first 40 lines (the whole file twice over is a minute on a busy 2-core machine; what is
    # proven, answers kept across Ctrl-C and none asked twice, does not change with its length).
    source = prompts_file(tmp_path, lines=40)
    with proxy(plain_server) as server:
        server.hold_post = 4  # three answers (4 lines each) are written, the fourth request is in flight at Ctrl-C
        with StateStore(tmp_path / ".sdxlctl").transaction() as state:
            state.put("sdxl", Resource(kind="local-server", name="sdxl-server", target="local", url=server.url))
        env = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")}
        said = interrupt_batch(tmp_path, env, ["prompts.txt", *SMALL, "--yes"], server.held.is_set)
        assert "run the same command again" in " ".join(said.split()), said
        manifest = tmp_path / "batch-prompts" / "manifest.jsonl"
        kept = manifest_rows(manifest.read_bytes())
        assert len(kept) == sum(server.generated.values()) == 12, kept

        resumed = cli("batch", "prompts.txt", *SMALL, "--yes")
        assert resumed.code == 0, resumed.err
        again = cli("batch", str(source), *SMALL, "--yes")  # all done: nothing is sent
        assert again.code == 0, again.err
    prompts = source.read_text(encoding="utf-8").splitlines()
    assert server.generated == Counter(prompts)  # every line made exactly once, across the three runs
    rows = {row["line"]: row for row in manifest_rows(manifest.read_bytes())}
    assert sorted(rows) == list(range(1, 41)) and all(row["error"] is None for row in rows.values())
    assert all((manifest.parent / row["images"][0]).is_file() for row in rows.values())


@pytest.mark.parametrize("spot", [[], ["--spot"]], ids=["on-demand", "spot"])
def test_dry_run_and_cost_images_give_the_same_arithmetic(
    cli: Cli, emulator: Emulator, tmp_path: Path, spot: list[str]
) -> None:
    env = emulator.env()
    prompts_file(tmp_path)
    plan = cli("batch", "prompts.txt", "--dry-run", "--json", "--gpu", "l4", "--replicas", "1..2", *spot, env=env)
    assert plan.code == 0, plan.err
    cost = cli("cost", "--images", "200", "--gpu", "l4", "--replicas", "2", *spot, "--json", env=env)
    assert cost.code == 0, cost.err
    planned, costed = json.loads(plan.out)["estimate"], json.loads(cost.out)
    keys = ["gpu", "images", "replicas", "spot", "batch_size", "seconds_per_image", "replica_hours", "wall_hours"]
    keys += ["usd_per_replica_hour", "usd"]
    assert {k: planned.get(k) for k in keys} == {k: costed.get(k) for k in keys}, (planned, costed)
    assert (planned["images"], planned["replicas"], planned["spot"]) == (200, 2, bool(spot))
    assert planned["usd"] == pytest.approx(planned["replica_hours"] * planned["usd_per_replica_hour"], abs=0.011)
    usd = f"{planned['usd']:.2f} USD"  # and the text of each shows that sum
    shown_plan = cli("batch", "prompts.txt", "--dry-run", "--gpu", "l4", "--replicas", "1..2", *spot, env=env)
    shown_cost = cli("cost", "--images", "200", "--gpu", "l4", "--replicas", "2", *spot, env=env)
    assert usd in " ".join((shown_plan.out + shown_plan.err).split()), shown_plan.err
    assert f"{planned['usd']:.2f}" in shown_cost.out + shown_cost.err, shown_cost.out
    assert emulator.requests() == []  # a plan and a price: nothing asked of Google


def test_the_readme_input_examples_are_read_as_it_says(tmp_path: Path) -> None:
    from sdxlctl.batch.lines import BatchInputError, read

    section = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8").split("## Batch", 1)[1]
    blocks = re.findall(r"\n\n((?:    .*\n)+)", section.split("\n## ", 1)[0])
    for suffix, block, lines in ((".txt", blocks[1], 3), (".jsonl", blocks[2], 3), (".csv", blocks[3], 2)):
        (tmp_path / f"prompts{suffix}").write_text("".join(line[4:] + "\n" for line in block.splitlines()))
        batch = read(tmp_path / f"prompts{suffix}", {}, max_lines=10)
        assert (len(batch.lines), batch.lines[0].prompt) == (lines, "a red fox in snow"), (suffix, batch.lines)
    (tmp_path / "prompts.jsonl").write_bytes(b'{"prompt": "a fox"}\n' * 136 + b'{"prompt": ""}\n')
    with pytest.raises(BatchInputError) as refused:
        read(tmp_path / "prompts.jsonl", {}, max_lines=1000)
    assert f"`{refused.value.problems[0]}`" in " ".join(section.split())  # the README quotes the real refusal
