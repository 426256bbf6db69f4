"""Speaks the model server's contract over HTTP: the one predict path for every target."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sdxlctl.errors import PredictError

CONNECT_TIMEOUT_S = 5.0
MAX_RETRIES = 3
MAX_RETRY_WAIT_S = 15.0
HEALTH_TIMEOUT_S = 5.0


class Refused(PredictError):
    """The server's JSON error: its status, the field it names (e.g. parameters.lora[1]) and its own message."""

    def __init__(self, message: str, *, status: int, field: str | None, server_message: str, hint: str | None) -> None:
        super().__init__(message, hint=hint)
        self.status, self.field, self.server_message = status, field, server_message


def predict(
    url: str,
    body: dict[str, Any],
    *,
    timeout_s: float,
    headers: dict[str, str] | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> dict[str, Any]:
    """POST `body`, return the JSON answer; 429 and 503 are retried after their Retry-After."""
    import httpx

    timeout = httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
    for attempt in range(MAX_RETRIES + 1):
        try:
            response = httpx.post(url, json=body, timeout=timeout, headers=headers)
        except httpx.ConnectError:
            raise PredictError(
                f"nothing answers at {url}",
                hint="is it deployed and running? `sdxlctl status` shows it, `sdxlctl deploy` starts it",
            ) from None
        except httpx.TimeoutException:
            raise PredictError(f"no answer from {url} within {timeout_s:g} s") from None
        except httpx.HTTPError as exc:  # the connection broke, or the answer was not HTTP
            raise PredictError(
                f"the connection to {url} broke before an answer ({type(exc).__name__}: {exc})",
                hint="the server may have restarted or crashed: `sdxlctl status` shows it; then try again",
            ) from None
        if response.status_code in (429, 503) and attempt < MAX_RETRIES:
            sleep(min(_retry_after(response), MAX_RETRY_WAIT_S))
            continue
        return _answer(response)
    raise AssertionError("unreachable")


def _retry_after(response: Any) -> float:
    """Retry-After in seconds or as an HTTP date (RFC 9110); 2 s when absent or unreadable; at least 1 s."""
    value = response.headers.get("retry-after", "2").strip()
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            seconds = 2.0
    return max(1.0, seconds) if seconds == seconds else 2.0  # NaN is not a wait


def _answer(response: Any) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code == 200 and isinstance(data, dict) and "predictions" in data:
        return checked(data, str(response.url))
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message", "")).strip() or response.reason_phrase
        hints = {
            413: "use --format jpeg or webp, fewer images, or a dedicated endpoint",
            429: "the server is busy: try again shortly, or raise [model] queue_size",
            503: "the model is not ready: `sdxlctl status` shows why",
            504: "use fewer --steps, a smaller size, or raise [model] time_limit_s",
        }
        field = error.get("field")
        raise Refused(
            f"the server answered {response.status_code}: {message}",
            status=response.status_code,
            field=field if isinstance(field, str) else None,
            server_message=message,
            hint=hints.get(response.status_code),
        )
    text = " ".join(response.text[:200].split())  # one line, whatever a proxy's error page looks like
    raise PredictError(f"unexpected answer {response.status_code} from {response.url}: {text or '(empty)'}")


def health(url: str) -> dict[str, Any]:
    """The JSON body of the server's health route, whatever its status; {} when nothing usable answers."""
    import httpx

    try:
        body = httpx.get(url, timeout=HEALTH_TIMEOUT_S).json()
    except (httpx.HTTPError, ValueError):
        return {}
    return body if isinstance(body, dict) else {}


def checked(data: Any, source: str) -> dict[str, Any]:
    """`data` if it is a predict answer in the model server's contract, else a PredictError naming what is off.

    Every target's answer passes here (Vertex AI's too), so a proxy's or another model's answer is one line,
    never a KeyError.
    """
    problem = _contract_problem(data) if isinstance(data, dict) else "the answer is not a JSON object"
    if problem:
        raise PredictError(
            f"the answer from {source} does not follow the model server's contract: {problem}",
            hint="is the endpoint serving sdxlctl's model server? `sdxlctl status` shows what is deployed",
        )
    return data


def _contract_problem(data: dict[str, Any]) -> str:
    """What is wrong with a 200 answer's first prediction, or "" when it has what predict reads."""
    predictions = data.get("predictions")
    if not isinstance(predictions, list) or not predictions or not isinstance(predictions[0], dict):
        return "predictions is not a list of objects"
    first = predictions[0]
    images, seeds = first.get("images"), first.get("seeds")
    if not isinstance(images, list) or not images or not all(isinstance(i, str) for i in images):
        return "predictions[0].images is not a list of base64 strings"
    if not isinstance(seeds, list) or len(seeds) != len(images) or not all(_is_int(s) for s in seeds):
        return "predictions[0].seeds is not one integer per image"
    for key in ("width", "height"):
        if not _is_int(first.get(key)):
            return f"predictions[0].{key} is not an integer"
    if not isinstance(first.get("output_format"), str):
        return "predictions[0].output_format is missing"
    return ""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
