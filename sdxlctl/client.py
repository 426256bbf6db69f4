"""Speaks the model server's contract over HTTP: the one predict path for every target."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sdxlctl.errors import PredictError

CONNECT_TIMEOUT_S = 5.0
MAX_RETRIES = 3
MAX_RETRY_WAIT_S = 15.0


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
        if response.status_code in (429, 503) and attempt < MAX_RETRIES:
            sleep(min(_retry_after(response), MAX_RETRY_WAIT_S))
            continue
        return _answer(response)
    raise AssertionError("unreachable")


def _retry_after(response: Any) -> float:
    try:
        return max(1.0, float(response.headers.get("retry-after", "2")))
    except ValueError:
        return 2.0


def _answer(response: Any) -> dict[str, Any]:
    try:
        data = response.json()
    except ValueError:
        data = None
    if response.status_code == 200 and isinstance(data, dict) and "predictions" in data:
        return data
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):
        message = str(error.get("message", "")).strip() or response.reason_phrase
        hints = {
            413: "use --format jpeg or webp, fewer images, or a dedicated endpoint",
            429: "the server is busy: try again shortly, or raise [model] queue_size",
            503: "the model is not ready: `sdxlctl status` shows why",
            504: "use fewer --steps, a smaller size, or raise [model] time_limit_s",
        }
        raise PredictError(
            f"the server answered {response.status_code}: {message}", hint=hints.get(response.status_code)
        )
    raise PredictError(f"unexpected answer {response.status_code} from {response.url}: {response.text[:200]}")
