"""client.predict against a real HTTP server on loopback that answers what each test scripts."""

from __future__ import annotations

import time
from collections.abc import Iterator
from email.utils import formatdate
from typing import Any

import pytest

from sdxlctl import client
from sdxlctl.errors import PredictError
from tests.cli.scripted import GOOD, PNG, Answer, Script, scripted_server
from tests.servers import free_port

BODY = {"instances": [{"prompt": "a fox"}], "parameters": {"num_images": 1}}


@pytest.fixture
def scripted() -> Iterator[Script]:
    with scripted_server() as script:
        yield script


def error(code: int, message: str) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": None}}


def predict(script: Script, *answers: Answer, waits: list[float] | None = None, timeout_s: float = 10) -> Any:
    script.answers = list(answers)
    return client.predict(script.url, BODY, timeout_s=timeout_s, sleep=(waits if waits is not None else []).append)


def test_a_good_answer_is_returned_and_the_body_sent_as_is(scripted: Script) -> None:
    assert predict(scripted, Answer()) == GOOD
    assert scripted.seen == [BODY]


@pytest.mark.parametrize(
    ("status", "message", "hint"),
    [
        (400, "width must be a multiple of 8", None),
        (413, "the response would be 2.1 MB", "jpeg or webp"),
        (504, "over the time limit of 50 s", "fewer --steps"),
        (500, "internal error (request id 1234)", None),
    ],
)
def test_an_error_answer_is_one_message_with_its_hint_and_not_retried(
    scripted: Script, status: int, message: str, hint: str | None
) -> None:
    waits: list[float] = []
    with pytest.raises(PredictError) as raised:
        predict(scripted, Answer(status, error(status, message)), waits=waits)
    assert str(raised.value) == f"the server answered {status}: {message}"
    assert (raised.value.hint is None) if hint is None else (hint in (raised.value.hint or ""))
    assert len(scripted.seen) == 1 and waits == []


@pytest.mark.parametrize("status", [429, 503])
def test_busy_and_not_ready_are_retried_after_retry_after(scripted: Script, status: int) -> None:
    waits: list[float] = []
    busy = Answer(status, error(status, "busy"), {"retry-after": "3"})
    assert predict(scripted, busy, busy, Answer(), waits=waits) == GOOD
    assert waits == [3.0, 3.0] and len(scripted.seen) == 3


def test_retries_end_with_the_last_answer_as_an_error(scripted: Script) -> None:
    waits: list[float] = []
    with pytest.raises(PredictError) as raised:
        predict(scripted, Answer(429, error(429, "queue full"), {"retry-after": "1"}), waits=waits)
    assert "429: queue full" in str(raised.value) and "queue_size" in (raised.value.hint or "")
    assert len(scripted.seen) == client.MAX_RETRIES + 1 and waits == [1.0] * client.MAX_RETRIES


@pytest.mark.parametrize(
    ("retry_after", "wait"),
    [
        (None, 2.0),  # absent: a short default
        ("0", 1.0),  # never a busy loop
        ("-5", 1.0),
        ("2.5", 2.5),
        ("3600", client.MAX_RETRY_WAIT_S),  # capped: the user is waiting
        ("soon", 2.0),
        ("nan", 2.0),
        ("inf", client.MAX_RETRY_WAIT_S),
        ("date+5", 5.0),  # an HTTP date, as RFC 9110 allows
    ],
)
def test_retry_after_in_every_form(scripted: Script, retry_after: str | None, wait: float) -> None:
    headers = {}
    if retry_after == "date+5":
        headers["retry-after"] = formatdate(time.time() + 5.5, usegmt=True)
    elif retry_after is not None:
        headers["retry-after"] = retry_after
    waits: list[float] = []
    predict(scripted, Answer(503, error(503, "loading"), headers), Answer(), waits=waits)
    assert len(waits) == 1
    assert waits[0] == pytest.approx(wait, abs=1.0 if retry_after == "date+5" else 1e-9)


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        (Answer(200, "<html>not json</html>"), "unexpected answer 200"),
        (Answer(200, b"\xff\xfe\x00garbage"), "unexpected answer 200"),
        (Answer(200, {"predictions": []}), "contract"),
        (Answer(200, {"predictions": [{"images": [PNG]}]}), "seeds"),
        (Answer(200, {"predictions": [{**GOOD["predictions"][0], "seeds": ["7"]}]}), "seeds"),
        (Answer(200, {"predictions": [{**GOOD["predictions"][0], "width": 64.5}]}), "width"),
        (Answer(200, {"predictions": [{**GOOD["predictions"][0], "images": []}]}), "images"),
        (Answer(200, {"predictions": "yes"}), "contract"),
        (Answer(200, [1, 2, 3]), "unexpected answer 200"),
        (Answer(502, "<html>\n<body>Bad Gateway</body>\n</html>"), "unexpected answer 502"),
        (Answer(429, "busy"), "unexpected answer 429"),
        (Answer(400, {"error": "not an object"}), "unexpected answer 400"),
        (Answer(200, ""), "(empty)"),
    ],
)
def test_garbage_answers_are_one_line_errors(scripted: Script, answer: Answer, says: str) -> None:
    with pytest.raises(PredictError) as raised:
        predict(scripted, answer, waits=[])
    assert says in str(raised.value) and "\n" not in str(raised.value)


def test_a_dropped_connection_is_a_clear_error(scripted: Script) -> None:
    with pytest.raises(PredictError, match=r"connection .* broke"):
        predict(scripted, Answer(drop=True))


def test_a_dead_port_says_nothing_answers() -> None:
    url = f"http://127.0.0.1:{free_port()}/predict"
    waits: list[float] = []
    with pytest.raises(PredictError) as raised:
        client.predict(url, BODY, timeout_s=5, sleep=waits.append)
    assert str(raised.value) == f"nothing answers at {url}" and "sdxlctl deploy" in (raised.value.hint or "")
    assert waits == []


def test_a_server_that_never_answers_is_given_up_on(scripted: Script) -> None:
    with pytest.raises(PredictError, match=r"no answer from .* within 0\.5 s"):
        predict(scripted, Answer(hang_s=3), timeout_s=0.5)


@pytest.mark.parametrize(
    ("answer", "says"),
    [
        ({"predictions": []}, "predictions is not a list of objects"),
        ({"predictions": [{"images": ["aGk="], "width": 64, "height": 64, "output_format": "png"}]}, "seeds"),
        ({"deployedModelId": "1"}, "predictions is not a list of objects"),
        ([], "not a JSON object"),
    ],
    ids=["no-predictions", "no-seeds", "no-predictions-key", "a-list"],
)
def test_an_off_contract_answer_from_any_target_is_one_line(answer: Any, says: str) -> None:
    """Vertex AI's answers come through its SDK, not client.predict: core checks them with the same function."""
    with pytest.raises(PredictError, match=says):
        client.checked(answer, "endpoint sdxl")
