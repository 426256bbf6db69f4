"""Seconds and prices per image follow the image's size: SDXL's work at that size (bench/flops.py's table of
FLOPs from the shipped configs), not 1024x1024 whatever the flags say."""

from __future__ import annotations

import json
from itertools import pairwise
from pathlib import Path

import pytest

from sdxlctl.batch import BatchOptions
from sdxlctl.batch.door import cost, plan
from sdxlctl.config import Config
from sdxlctl.pricing import batch_estimate, batch_size, latency
from sdxlctl.pricing.speed import SDXL_PIXELS
from sdxlctl.state import StateStore
from tests.conftest import Cli

ROOT = Path(__file__).resolve().parents[2]
WORK = json.loads((ROOT / "sdxlctl" / "pricing" / "latency.json").read_text())["work_tflop"]
ROWS = {row["side"]: row for row in WORK["by_side"]["rows"]}


def image_work(side: int, steps: int = 30) -> float:
    return ROWS[side]["per_step"] * steps + ROWS[side]["vae_decode"]


def test_the_table_at_1024_is_the_work_the_prices_were_stated_at() -> None:
    assert ROWS[1024]["per_step"] == pytest.approx(WORK["per_step"], abs=0.05)
    assert ROWS[1024]["vae_decode"] == pytest.approx(WORK["vae_decode"], abs=0.05)
    assert ROWS[1024]["refiner_per_step"] == pytest.approx(WORK["refiner_per_step"], abs=0.01)


@pytest.mark.parametrize("gpu", ["l4", "a100", "h200"])
def test_1024_is_what_it_was_and_512_is_its_share_of_the_work(gpu: str) -> None:
    assert latency(gpu).seconds == latency(gpu, pixels=SDXL_PIXELS).seconds
    ratio = latency(gpu, pixels=512 * 512).seconds / latency(gpu).seconds
    assert ratio == pytest.approx(image_work(512) / image_work(1024), rel=1e-3)  # 1024 stated rounded
    assert 0.2 < ratio < 0.25  # a quarter of the pixels, a little less than a quarter of the work


def test_2048_is_more_than_four_times_1024_attention_grows_faster_than_the_pixels() -> None:
    ratio = latency("l4", pixels=2048 * 2048).seconds / latency("l4").seconds
    assert ratio == pytest.approx(image_work(2048) / image_work(1024), rel=1e-3)
    assert ratio > 5


def test_seconds_grow_with_the_pixels_over_every_size_the_server_takes() -> None:
    sizes = [(w, h) for w in range(64, 2049, 64) for h in (64, 1024, 2048)]
    seconds = sorted((w * h, latency("l4", pixels=w * h).seconds) for w, h in sizes)
    assert all(a[1] <= b[1] for a, b in pairwise(seconds))
    assert seconds[0][1] > 0
    between = latency("l4", pixels=768 * 1024).seconds  # not square: read at its pixel count
    assert latency("l4", pixels=768 * 768).seconds < between < latency("l4").seconds


def test_a_size_that_was_not_measured_is_not_called_measured() -> None:
    assert latency("h200").measured and not latency("h200", pixels=512 * 512).measured
    assert latency("h200", pixels=512 * 512, refiner_steps=7).seconds > latency("h200", pixels=512 * 512).seconds


def test_a_smaller_image_fits_more_lines_a_request_and_costs_less() -> None:
    def lines(pixels: int) -> int:
        return batch_size("l4", steps=30, num_images=1, time_limit_s=55.0, max_images=64, pixels=pixels)

    assert lines(512 * 512) > lines(SDXL_PIXELS) == 5  # floor(0.8 x 55 / 8.48)
    small = batch_estimate("l4", "us-central1", images=10_000, pixels=512 * 512)
    full = batch_estimate("l4", "us-central1", images=10_000)
    assert small.usd < 0.3 * full.usd and small.seconds_per_image < 0.25 * full.seconds_per_image


def config() -> Config:
    return Config.model_validate({"target": "vertex", "gcp": {"project": "demo-project"}})


def test_the_plan_prices_the_size_its_flags_ask_for_as_cost_images_does(tmp_path: Path) -> None:
    source = tmp_path / "fox.txt"
    source.write_text("".join(f"a red fox, number {n}\n" for n in range(1, 201)))
    sized = plan(config(), StateStore(tmp_path), BatchOptions(source, {"width": 512, "height": 768})).estimate
    native = plan(config(), StateStore(tmp_path), BatchOptions(source)).estimate
    same = cost(config(), images=200, gpu=None, replicas=None, spot=None, steps=30, size=(512, 768))
    assert sized.as_dict() == same.as_dict()
    assert sized.seconds_per_image < native.seconds_per_image
    assert native.as_dict() == cost(config(), images=200, gpu=None, replicas=None, spot=None, steps=30).as_dict()
    only_width = plan(config(), StateStore(tmp_path), BatchOptions(source, {"width": 512})).estimate  # 512 x 1024
    assert only_width.seconds_per_image == pytest.approx(latency("l4", pixels=512 * 1024).seconds)


def test_cost_takes_width_and_height_in_every_view(cli: Cli) -> None:
    def seconds(*args: str) -> dict[str, object]:
        shown = cli("cost", *args, "--json")
        assert shown.code == 0, shown.err
        return json.loads(shown.out)

    native, small = seconds("--gpu", "l4"), seconds("--gpu", "l4", "--width", "512", "--height", "512")
    assert small["seconds_per_image"] < native["seconds_per_image"]  # type: ignore[operator]
    compared = seconds("--compare", "--width", "512", "--height", "512")
    assert (compared["width"], compared["height"]) == (512, 512)
    l4 = next(row for row in compared["gpus"] if row["gpu"] == "l4")  # type: ignore[attr-defined]
    assert l4["seconds_per_image"] == small["seconds_per_image"]
    batch = seconds("--images", "100", "--width", "512", "--height", "512")
    assert batch["seconds_per_image"] == pytest.approx(latency("l4", pixels=512 * 512).seconds, abs=0.001)
    text = cli("cost", "--compare", "--width", "512", "--height", "768")
    assert "512x768 at 30 steps" in " ".join(text.out.split())
    refused = cli("cost", "--width", "500")
    assert refused.code == 2 and "multiple of 8" in refused.err
