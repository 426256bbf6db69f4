"""The door of `sdxlctl batch` (sdxlctl/batch/door.py): what it chooses for a prompts file before any target
runs it, what it refuses, and that it confirms above the budget. Real files, a real config and state folder;
nothing here reaches a target (the end to end runs are tests/batch/test_acceptance.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sdxlctl.batch import BatchOptions, Row, manifest
from sdxlctl.batch.door import BatchPlan, Declined, cost, plan, run
from sdxlctl.config import Config
from sdxlctl.errors import UsageError
from sdxlctl.state import StateStore
from sdxlctl.steps import Notice


def config(target: str = "vertex", **sections: dict[str, Any]) -> Config:
    return Config.model_validate({"target": target, "gcp": {"project": "demo-project"}, **sections})


def prompts(tmp_path: Path, count: int = 3, name: str = "fox.txt") -> Path:
    path = tmp_path / name
    path.write_text("".join(f"a red fox, number {n}\n" for n in range(1, count + 1)))
    return path


def test_vertex_plan_takes_its_gpu_replicas_spot_and_out_from_flags_then_batch_then_deploy(tmp_path: Path) -> None:
    store, source = StateStore(tmp_path), prompts(tmp_path)
    chosen = plan(config(deploy={"gpu": "t4"}), store, BatchOptions(source))
    sub = chosen.submission
    assert (sub.gpu, sub.replicas, sub.spot) == ("t4", (1, 1), False)
    assert sub.out.startswith("gs://demo-project-sdxlctl/batch/sdxl/fox-") and sub.out.endswith("/")
    assert len(sub.batch.lines) == 3 and chosen.target == "vertex"

    configured = config(deploy={"gpu": "t4"}, batch={"gpu": "a100", "min_replicas": 2, "max_replicas": 3, "spot": True})
    sub = plan(configured, store, BatchOptions(source)).submission
    assert (sub.gpu, sub.replicas, sub.spot) == ("a100", (2, 3), True)

    flags = BatchOptions(source, gpu="l4", replicas=(1, 4), spot=False, out="gs://mine/run1")
    sub = plan(configured, store, flags).submission
    assert (sub.gpu, sub.replicas, sub.spot, sub.out) == ("l4", (1, 4), False, "gs://mine/run1/")


def test_a_configured_out_is_a_prefix_each_job_gets_its_own_folder_under(tmp_path: Path) -> None:
    sub = plan(config(batch={"out": "gs://shared/batches/"}), StateStore(tmp_path), BatchOptions(prompts(tmp_path)))
    assert sub.submission.out.startswith("gs://shared/batches/fox-") and sub.submission.out.endswith("/")


def test_the_plan_prices_what_cost_images_prices_for_the_same_images(tmp_path: Path) -> None:
    """`--dry-run` and `sdxlctl cost --images N` are one arithmetic: lines x num_images images."""
    source = prompts(tmp_path, count=5)
    chosen = plan(config(), StateStore(tmp_path), BatchOptions(source, {"num_images": 2}, spot=True, replicas=(1, 2)))
    same = cost(config(), images=10, gpu=None, replicas=2, spot=True, steps=30)
    assert chosen.submission.batch.images == 10
    assert (chosen.estimate.usd, chosen.estimate.replica_hours) == (same.usd, same.replica_hours)
    assert chosen.submission.usd_per_replica_hour == same.usd_per_replica_hour > 0
    assert any("preempted" in note for note in chosen.notes)  # what Spot means, in the plan


def test_the_shared_parameters_reach_the_batch_and_style_goes_to_lines_without_one(tmp_path: Path) -> None:
    source = tmp_path / "mixed.jsonl"
    source.write_text('{"prompt": "a fox"}\n{"prompt": "a cat", "style": "anime"}\n')
    options = BatchOptions(source, {"num_inference_steps": 4, "width": 64, "height": 64, "style": "cinematic"})
    batch = plan(config("local"), StateStore(tmp_path), options).submission.batch
    assert batch.parameters == {"num_inference_steps": 4, "width": 64, "height": 64}
    assert [line.instance.get("style") for line in batch.lines] == ["cinematic", "anime"]


def test_local_plan_writes_beside_the_file_costs_nothing_and_sends_what_the_server_allows(tmp_path: Path) -> None:
    store, source = StateStore(tmp_path), prompts(tmp_path)
    chosen = plan(config("local"), store, BatchOptions(source))
    assert (chosen.submission.out, chosen.submission.batch_size, chosen.estimate.usd) == ("batch-fox", 4, 0.0)
    many = plan(config("local", model={"max_images": 4}), store, BatchOptions(source, {"num_images": 3}))
    assert many.submission.batch_size == 1  # 2 lines x 3 images would be over the server's max_images


def test_over_the_budget_asks_and_no_starts_nothing(tmp_path: Path) -> None:
    asked: list[BatchPlan] = []

    def no(chosen: BatchPlan) -> bool:
        asked.append(chosen)
        return False

    cheap = config(batch={"budget_usd": 0})  # every cloud batch costs more than nothing
    store = StateStore(tmp_path)
    with pytest.raises(Declined, match="nothing was started"):
        run(cheap, store, BatchOptions(prompts(tmp_path)), confirm=no)
    assert len(asked) == 1 and asked[0].estimate.usd > 0
    assert store.read().of("sdxl") == {}  # no job recorded


def test_a_dry_run_asks_nothing_and_returns_the_plan(tmp_path: Path) -> None:
    def never(_: BatchPlan) -> bool:
        raise AssertionError("a dry run asks nothing")

    options = BatchOptions(prompts(tmp_path), dry_run=True)
    assert isinstance(run(config(batch={"budget_usd": 0}), StateStore(tmp_path), options, confirm=never), BatchPlan)


@pytest.mark.parametrize(
    ("target", "options", "message"),
    [
        ("cloudrun", {}, "batch runs on target vertex"),
        ("local", {"attach": True}, "--attach waits for a Vertex AI job"),
        ("local", {"out": "gs://b/p/"}, "not gs://"),
        ("local", {"download": Path("d")}, "--download is for target vertex"),
        ("vertex", {"out": "somewhere"}, "gs:// prefix"),
    ],
)
def test_what_a_target_cannot_do_is_refused_before_the_file_is_read(
    tmp_path: Path, target: str, options: dict[str, Any], message: str
) -> None:
    extra = {"deploy": {"gpu": "l4"}, "gcp": {"project": "p", "region": "us-central1"}} if target == "cloudrun" else {}
    with pytest.raises(UsageError, match=message) as refused:
        run(config(target, **extra), StateStore(tmp_path), BatchOptions(tmp_path / "absent.txt", **options))
    assert "\n" not in refused.value.message


def test_a_missing_file_is_one_line_naming_it(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"absent\.txt: the prompts file does not exist"):
        plan(config("local"), StateStore(tmp_path), BatchOptions(tmp_path / "absent.txt"))


def row(line: int, error: str | None = None) -> Row:
    return Row(line, f"a red fox, number {line}", line, {}, [] if error else [f"images/{line:06d}.jpeg"], error)


def test_retry_failed_on_local_takes_only_the_failed_lines_into_the_same_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    source = prompts(tmp_path, count=4)
    manifest.append(
        tmp_path / "batch-fox" / "manifest.jsonl", [row(1), row(2, "guidance too high"), row(3), row(4, "x")]
    )
    chosen = plan(config("local"), StateStore(tmp_path), BatchOptions(source, retry_failed=True))
    assert [line.number for line in chosen.submission.batch.lines] == [2, 4]
    assert chosen.submission.out == chosen.submission.retry_of == "batch-fox"


def test_retry_failed_with_nothing_failed_says_so_and_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    source = prompts(tmp_path, count=2)
    manifest.append(tmp_path / "batch-fox" / "manifest.jsonl", [row(1), row(2)])
    result = run(config("local"), StateStore(tmp_path), BatchOptions(source, retry_failed=True))
    assert isinstance(result, Notice) and "no failed lines" in result.message


def test_min_replicas_are_charged_their_start_even_with_little_work(tmp_path: Path) -> None:
    # One line on 3..5 replicas: Vertex AI starts the 3 (startingReplicaCount) whether or not they get a request,
    # so the plan charges 3 starts, and `cost --images 1 --replicas 3` (3..3) the same.
    store, source = StateStore(tmp_path), prompts(tmp_path, count=1)
    planned = plan(config(batch={"min_replicas": 3, "max_replicas": 5}), store, BatchOptions(source)).estimate
    one = plan(config(), store, BatchOptions(source)).estimate
    assert planned.replica_hours == pytest.approx(one.replica_hours + 2 * one.replica_start_h)
    priced = cost(config(), images=1, gpu=None, replicas=3, spot=None, steps=30)
    assert priced.replica_hours == pytest.approx(planned.replica_hours)
