"""The page asks a busy (429) or loading (503) model again after its Retry-After, and says so meanwhile."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from typing import Any

import pytest

from sdxl_ui.app import KEEP, MAX_RETRIES, MAX_RETRY_WAIT_S, generate
from sdxl_ui.backend import Busy, HttpBackend, retry_after
from sdxl_ui.request import Choices
from tests.ui.conftest import flaky_server

CHOICES = Choices("a fox", seed=5, randomize=False, width=64, height=64, steps=2)


def _run(url: str) -> tuple[list[tuple[Any, str, Any]], list[float]]:
    waits: list[float] = []
    return list(generate(HttpBackend(url), CHOICES, sleep=waits.append)), waits


def test_a_busy_server_is_asked_again_after_its_retry_after() -> None:
    with flaky_server((429, "3"), (503, "1")) as (url, asked):
        steps, waits = _run(url)
    assert len(asked) == 3 and waits == [3, 1]
    assert [images for images, _, _ in steps[:2]] == [KEEP, KEEP]  # the last images stay while it waits
    assert "busy, retrying in 3 s" in steps[0][1] and "not ready yet, retrying in 1 s" in steps[1][1]
    images, info, seed = steps[-1]
    assert len(images) == 1 and images[0].size == (64, 64) and "Seed 5" in info and seed == 5


def test_a_long_retry_after_is_capped_and_the_page_gives_up_in_one_line() -> None:
    with flaky_server(*[(429, "3600")] * (MAX_RETRIES + 1)) as (url, asked):
        steps, waits = _run(url)
    assert waits == [MAX_RETRY_WAIT_S] * MAX_RETRIES and len(asked) == MAX_RETRIES + 1
    images, info, _ = steps[-1]
    assert images == [] and info.startswith("⚠️ The model is busy") and f"after {MAX_RETRIES} retries" in info


def test_other_errors_are_not_retried() -> None:
    with flaky_server((400, None)) as (url, asked):
        steps, waits = _run(url)
    assert len(asked) == 1 and waits == [] and steps[-1][1].startswith("⚠️ The request was refused")


def test_busy_without_retry_after_waits_two_seconds() -> None:
    with flaky_server((429, None)) as (url, _), pytest.raises(Busy) as raised:
        HttpBackend(url).predict({"instances": [{"prompt": "a fox"}]})
    assert raised.value.status == 429 and raised.value.retry_after_s == 2


@pytest.mark.parametrize(
    ("header", "seconds"),
    [("7", 7), ("0", 1), ("-5", 1), ("nan", 2), ("soon", 2), (None, 2), ("2.5", 2.5)],
)
def test_retry_after_is_seconds_or_a_date(header: str | None, seconds: float) -> None:
    assert retry_after(header) == seconds


def test_retry_after_as_an_http_date() -> None:
    later = format_datetime(datetime.now(UTC) + timedelta(seconds=20), usegmt=True)
    assert 10 < retry_after(later) <= 20
