"""`sdxlctl batch` on the command line (sdxlctl/cli/batch_cmd.py, batch_render.py): its flags, the plan of a
dry run (nothing called: the emulator's request log stays empty), the budget's question, --json, the errors
as one line each, the progress without a terminal, and the end (where the images are, what failed, the exit
status). Through sdxlctl.cli.app.run, as a user runs it."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

from sdxlctl.batch import BatchResult, Counts, Row
from sdxlctl.cli import batch_render
from sdxlctl.config import Config
from sdxlctl.state import Resource, StateStore
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator
from tests.servers import Server

FLAGS = "--steps --guidance --width --height --num-images --format --quality --negative-prompt --style --scheduler"
FLAGS += " --gpu --replicas --spot --no-spot --out --download --dry-run --attach --job --retry-failed --yes --json"


def prompts(folder: Path, count: int = 3) -> Path:
    path = folder / "fox.txt"
    path.write_text("".join(f"a red fox, number {n}\n" for n in range(1, count + 1)))
    return path


def test_help_lists_every_flag(cli: Cli) -> None:
    shown = cli("batch", "--help")
    assert shown.code == 0
    for flag in FLAGS.split():
        assert flag in shown.out, flag


def test_a_vertex_dry_run_prints_the_plan_and_calls_nothing(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    prompts(tmp_path)
    stored = _objects(emulator)  # the GCS emulator lives for the session: other tests' buckets stay
    planned = cli("batch", "fox.txt", "--dry-run", "--spot", "--replicas", "1..3", "-n", "2", env=emulator.env())
    assert planned.code == 0, planned.err
    text = " ".join(planned.err.split())
    for fact in ("fox.txt (3 lines, 6 images)", "vertex: Vertex AI batch prediction in europe-west4", "NVIDIA L4"):
        assert fact in text
    for fact in ("1..3 replicas", "lines a request", "seconds/image", "replica hours", "wall hours", "USD"):
        assert fact in text
    assert "unverified" in text and "may be preempted" in text  # Spot: its price and what it means
    assert "gs://demo-project-sdxlctl/batch/sdxl/fox-" in text and "manifest.jsonl" in text
    assert emulator.requests() == [] and emulator.batch_jobs() == []
    assert _objects(emulator) == stored


def _objects(emulator: Emulator) -> set[str]:
    client = emulator.storage()
    return {f"{bucket.name}/{blob.name}" for bucket in client.list_buckets() for blob in bucket.list_blobs()}


def test_a_dry_run_as_json_is_the_plan_with_its_estimate(cli: Cli, tmp_path: Path) -> None:
    prompts(tmp_path, count=4)
    env = {"SDXLCTL_TARGET": "vertex", "SDXLCTL_GCP_PROJECT": "demo", "SDXLCTL_BATCH_GPU": "a100"}
    planned = cli("batch", "fox.txt", "--dry-run", "--json", "--steps", "20", "--format", "webp", env=env)
    assert planned.code == 0, planned.err
    data = json.loads(planned.out)
    assert (data["lines"], data["images"], data["gpu"], data["replicas"], data["spot"]) == (4, 4, "a100", [1, 1], False)
    assert data["parameters"] == {"num_inference_steps": 20, "output_format": "webp"}  # only what was given
    assert data["estimate"]["usd"] > 0 and data["estimate"]["images"] == 4 and data["out"].startswith("gs://demo-")


def as_terminal(monkeypatch: pytest.MonkeyPatch, answer: str) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr("sys.stdin", Terminal(answer))


def test_over_the_budget_it_asks_and_no_starts_nothing(
    cli: Cli, emulator: Emulator, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prompts(tmp_path)
    as_terminal(monkeypatch, "n\n")
    asked = cli("batch", "fox.txt", env=emulator.env(SDXLCTL_BATCH_BUDGET_USD="0"))
    assert asked.code == 1
    assert "over [batch] budget_usd = 0 USD" in asked.err and "Start it?" in asked.err
    assert "aborted: nothing was started" in asked.err
    assert emulator.requests() == [] and emulator.batch_jobs() == []


def test_over_the_budget_without_a_terminal_it_needs_yes(cli: Cli, emulator: Emulator, tmp_path: Path) -> None:
    prompts(tmp_path)
    refused = cli("batch", "fox.txt", env=emulator.env(SDXLCTL_BATCH_BUDGET_USD="0"))
    assert refused.code == 2
    assert "error: the batch is estimated at" in refused.err and "hint: pass --yes" in refused.err
    assert emulator.requests() == [] and emulator.batch_jobs() == []


def test_target_cloudrun_is_refused_naming_the_targets_that_run_batch(cli: Cli, tmp_path: Path) -> None:
    prompts(tmp_path)
    refused = cli("batch", "fox.txt", env={"SDXLCTL_TARGET": "cloudrun", "SDXLCTL_GCP_PROJECT": "demo"})
    assert refused.code == 2
    first, *rest = refused.err.splitlines()
    assert first.startswith("error: batch runs on target vertex") and "or local, not on target cloudrun" in first
    assert [line for line in rest if not line.startswith("hint:")] == []


def test_a_bad_file_names_each_bad_line_and_nothing_is_written(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"prompt": "x"}\n{"prompt": ""}\nnot json\n')
    refused = cli("batch", "bad.jsonl")
    assert refused.code == 2 and "Traceback" not in refused.err
    lines = refused.err.splitlines()
    assert lines[0].startswith("error: bad.jsonl line 2: prompt")
    assert lines[1].startswith("bad.jsonl line 3") and lines[-1].startswith("hint:")
    assert not (tmp_path / "batch-bad").exists()


def test_a_missing_file_and_a_bad_replicas_are_one_line_each(cli: Cli) -> None:
    missing = cli("batch", "absent.txt")
    assert missing.code == 2 and missing.err.splitlines()[0] == "error: absent.txt: the prompts file does not exist"
    bad = cli("batch", "absent.txt", "--replicas", "4..2")
    assert bad.code == 2 and "Invalid value for '--replicas'" in bad.err


def test_without_a_terminal_progress_is_a_few_plain_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with batch_render.Display(num_images=2) as display:
        display.say("uploading the input")
        display.say("uploading the input")
        for done in range(1001):
            state = "PENDING" if done == 0 else "RUNNING"
            display.counts(Counts(done, 0, 1000, state, elapsed_s=1 + done, replica_hours=0.5, usd_so_far=0.4))
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) <= 13, lines  # the phase once, PENDING, then each tenth: not a line a poll
    assert lines[0].startswith("uploading the input")
    last = lines[-1]
    assert "RUNNING: 1000/1000 lines, 1000 done, 0 failed, 0 left" in last
    assert "images/min" in last and "0.50 replica h" in last and "0.40 USD so far" in last


def ended(failed: int, state: str = "SUCCEEDED", error: str = "") -> BatchResult:
    rows = [Row(n, f"prompt {n}", n, {}, [], f"guidance_scale: {n} is over 30") for n in range(10, 10 + failed)]
    return BatchResult("projects/p/locations/r/batchPredictionJobs/1", "gs://b/out/", state, 20 - failed, rows,
                       download=Path("here"), error=error, replica_hours=0.25, usd=0.3)  # fmt: skip


def test_the_end_says_where_what_failed_and_how_to_retry_and_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    assert batch_render.shown(ended(7), as_json=False) == 1
    shown = capsys.readouterr()
    assert shown.out.strip() == str(Path("here") / "manifest.jsonl")
    assert "gs://b/out/images/" in shown.err and "gs://b/out/manifest.jsonl" in shown.err
    assert "13 done, 7 failed" in shown.err and "line 10: guidance_scale: 10 is over 30" in shown.err
    assert "line 14:" in shown.err and "line 15:" not in shown.err and "and 2 more" in shown.err
    assert "--retry-failed" in shown.err

    assert batch_render.shown(ended(0), as_json=False) == 0
    assert "--retry-failed" not in capsys.readouterr().err
    assert batch_render.shown(ended(20, "FAILED", "every instance failed"), as_json=False) == 1
    assert "job error: every instance failed" in capsys.readouterr().err

    assert batch_render.shown(ended(2), as_json=True) == 1
    data = json.loads(capsys.readouterr().out)
    assert data["manifest"] == "gs://b/out/manifest.jsonl" and [row["line"] for row in data["failed"]] == [10, 11]


def test_a_local_batch_through_the_command_line(cli: Cli, plain_server: Server, tmp_path: Path) -> None:
    """The wiring end to end on the local server: the end's text, the manifest on stdout, the images on disk."""
    (tmp_path / "sdxlctl.toml").write_text('target = "local"\n')
    store = StateStore(Config(path=tmp_path / "sdxlctl.toml").home)
    store.record("sdxl", Resource(kind="local-server", name="sdxl-server", target="local", url=plain_server.url))
    prompts(tmp_path, count=2)
    done = cli("batch", "fox.txt", "--steps", "2", "--width", "64", "--height", "64", "--format", "png")
    assert done.code == 0, done.err
    assert "SUCCEEDED: 2 done, 0 failed" in done.err
    assert done.out.strip() == str(Path("batch-fox") / "manifest.jsonl")
    assert sorted(p.name for p in (tmp_path / "batch-fox" / "images").iterdir()) == ["000001.png", "000002.png"]


def test_flags_local_ignores_are_said_and_flags_that_clash_are_refused(cli: Cli, tmp_path: Path) -> None:
    prompts(tmp_path)
    planned = cli("batch", "fox.txt", "--dry-run", "--gpu", "a100", "--replicas", "2", "--no-spot")
    assert planned.code == 0, planned.err
    for flag in ("--gpu", "--replicas", "--spot"):
        assert f"note: {flag} is ignored on target local" in planned.err
    clash = cli("batch", "--attach", "--dry-run")
    assert clash.code == 2 and clash.err.startswith("error: --attach waits for a job already started")
    stray = cli("batch", "fox.txt", "--job", "7")
    assert stray.code == 2 and "hint: sdxlctl batch --attach --job JOB" in stray.err
