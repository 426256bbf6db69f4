"""Where predictions come from: a model server URL, or a Vertex AI endpoint. One request format: the contract."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Protocol

import httpx

from sdxl_ui.idtoken import IdTokens, NoIdToken

VERTEX_ENDPOINT = re.compile(r"^projects/[^/]+/locations/(?P<location>[^/]+)/endpoints/[^/]+$")
CONNECT_TIMEOUT_S = 10.0
# A private Cloud Run service holds a request through an instance's start (minutes for SDXL after scale to zero)
# and answers 504 itself past its timeout, at most an hour: the UI waits for that answer instead of its own guess.
CLOUD_RUN_TIMEOUT_S = 3600.0 + 30.0


class BackendError(Exception):
    """Something to show the person at the page, in one sentence."""


class Busy(BackendError):
    """429 or 503: worth asking again after `retry_after_s` (the answer's Retry-After)."""

    def __init__(self, message: str, *, status: int, retry_after_s: float) -> None:
        super().__init__(message)
        self.status, self.retry_after_s = status, retry_after_s


class Unauthorized(BackendError):
    """401: the caller's token was refused (missing, expired, or for another audience)."""


class Backend(Protocol):
    def predict(self, body: dict[str, Any]) -> dict[str, Any]: ...

    def describe(self) -> str: ...

    def health(self) -> dict[str, Any] | None:
        """The model server's health answer (what it has loaded), or None where the page cannot ask."""
        ...


def _explain(status: int, text: str) -> str:
    """A sentence for the page from an error answer (the model server's or Google's JSON)."""
    message, field = text[:300], None
    try:
        error = httpx.Response(status, text=text).json().get("error", {})
        message, field = str(error.get("message", message)), error.get("field")
        if message.startswith("{"):  # Vertex AI wraps the container's own error JSON in its message
            inner = httpx.Response(status, text=message).json().get("error", {})
            message, field = str(inner.get("message", message)), inner.get("field")
    except (ValueError, AttributeError):
        if message.lstrip().startswith("<"):  # Google's front end answers 401/403/429 with an HTML page
            message = ""
    # A 403 naming a field is the model server refusing part of the request (a LoRA adapter on a server that
    # allows none), not Google refusing the caller
    refused_call = "Not allowed to call the model (check the service account's role on the endpoint or service)"
    lead = {
        400: "The request was refused",
        401: "The model's service refused the UI's identity (a private Cloud Run service takes SDXL_AUTH=id-token)",
        403: "The request was refused" if field else refused_call,
        413: "The images are too large for the endpoint",
        429: "The model is busy (or scaled to zero and waking up); try again in a moment",
        503: "The model is not ready yet; try again in a moment",
        504: "The image took longer than the time limit; try fewer steps or a smaller size",
    }.get(status, f"The model server answered {status}")
    return f"{lead}: {message}" if message else lead


@dataclass
class HttpBackend:
    """A model server reached by URL: POST {url}{predict_route}; directly (the local target), or as a private Cloud
    Run service with an ID token from `tokens` (target cloudrun)."""

    url: str
    predict_route: str = "/predict"
    timeout_s: float = 120.0
    health_route: str = "/health"
    tokens: IdTokens | None = None

    def describe(self) -> str:
        return self.url

    def health(self) -> dict[str, Any] | None:
        if self.tokens is not None:
            # A service that scales to zero would start a GPU instance for every page load: the page is told
            # what the server has (SDXL_UI_REFINER, SDXL_UI_LORAS) instead, as behind Vertex AI.
            return None
        # Asked at each page load: a server still loading (503) answers too, without what it will have.
        try:
            answer = httpx.get(self.url.rstrip("/") + self.health_route, timeout=CONNECT_TIMEOUT_S).json()
        except (httpx.HTTPError, ValueError):
            return None
        return answer if isinstance(answer, dict) and answer.get("status") == "ready" else None

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        target = self.url.rstrip("/") + self.predict_route
        token, headers = "", {}
        if self.tokens is not None:
            try:
                token = self.tokens.get()
            except NoIdToken as exc:
                raise BackendError(str(exc)) from None
            headers = {"Authorization": f"Bearer {token}"}
        try:
            return _post(
                lambda: httpx.post(
                    target,
                    json=body,
                    headers=headers,
                    timeout=httpx.Timeout(self.timeout_s, connect=CONNECT_TIMEOUT_S),
                ),
                self.url,
            )
        except Unauthorized:
            if self.tokens is not None:
                self.tokens.forget(token)  # the next request fetches a new one
            raise


@dataclass
class VertexBackend:
    """A Vertex AI endpoint: POST {api}/v1/{endpoint}:predict with the service account's token."""

    endpoint: str
    api_base: str = ""  # "" means the regional host; an http:// base is an emulator and gets no token
    timeout_s: float = 120.0

    def describe(self) -> str:
        return self.endpoint

    def health(self) -> dict[str, Any] | None:
        return None  # a Vertex AI endpoint proxies only predict

    def predict(self, body: dict[str, Any]) -> dict[str, Any]:
        match = VERTEX_ENDPOINT.match(self.endpoint)
        assert match is not None
        base = self.api_base or f"https://{match['location']}-aiplatform.googleapis.com"
        url = f"{base.rstrip('/')}/v1/{self.endpoint}:predict"
        headers = {} if base.startswith("http://") else {"Authorization": f"Bearer {_token()}"}
        return _post(
            lambda: httpx.post(
                url, json=body, headers=headers, timeout=httpx.Timeout(self.timeout_s, connect=CONNECT_TIMEOUT_S)
            ),
            base,
        )


def _token() -> str:
    """An access token of the service account the UI runs as (Cloud Run's metadata server)."""
    import google.auth
    import google.auth.transport.requests

    try:
        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        credentials.refresh(google.auth.transport.requests.Request())
    except Exception as exc:
        raise BackendError(f"No credentials to call Vertex AI: {exc}") from None
    return str(credentials.token)


def _post(send: Any, where: str) -> dict[str, Any]:
    try:
        response = send()
    except httpx.ConnectError:
        raise BackendError(f"Cannot reach the model server at {where}: is it running?") from None
    except httpx.TimeoutException:
        raise BackendError(f"No answer from {where} in time; the model may be overloaded") from None
    except httpx.HTTPError as exc:
        raise BackendError(f"Network error talking to {where}: {exc}") from None
    if response.status_code in (429, 503):
        raise Busy(
            _explain(response.status_code, response.text),
            status=response.status_code,
            retry_after_s=retry_after(response.headers.get("retry-after")),
        )
    if response.status_code == 401:
        raise Unauthorized(_explain(401, response.text))
    if response.status_code != 200:
        raise BackendError(_explain(response.status_code, response.text))
    try:
        data = response.json()
    except ValueError:
        raise BackendError(f"{where} answered with something that is not JSON") from None
    if not isinstance(data, dict) or not isinstance(data.get("predictions"), list):
        raise BackendError(f"{where} answered without predictions")
    return data


def retry_after(value: str | None) -> float:
    """Retry-After in seconds or as an HTTP date (RFC 9110); 2 s when absent or unreadable; at least 1 s."""
    value = (value or "2").strip()
    try:
        seconds = float(value)
    except ValueError:
        from email.utils import parsedate_to_datetime

        try:
            seconds = parsedate_to_datetime(value).timestamp() - time.time()
        except (TypeError, ValueError, IndexError):
            seconds = 2.0
    return max(1.0, seconds) if seconds == seconds else 2.0  # NaN is not a wait


def from_environment(
    endpoint: str,
    *,
    api_base: str = "",
    predict_route: str = "/predict",
    health_route: str = "/health",
    auth: str = "",
) -> Backend:
    """SDXL_ENDPOINT: an http(s) URL of a model server, or a Vertex AI endpoint resource name; SDXL_AUTH
    ("id-token" or empty): whether the URL is a private Cloud Run service that takes an ID token."""
    if auth not in ("", "id-token"):
        raise ValueError(f"SDXL_AUTH={auth!r} is invalid: expected id-token (a private Cloud Run service) or nothing")
    if endpoint.startswith(("http://", "https://")):
        # The audience is the service's URL itself: Cloud Run refuses a token whose audience has a path
        if auth:
            tokens = IdTokens(endpoint.rstrip("/"))
            return HttpBackend(endpoint, predict_route, CLOUD_RUN_TIMEOUT_S, health_route, tokens=tokens)
        return HttpBackend(endpoint, predict_route, health_route=health_route)
    if auth:
        raise ValueError(f"SDXL_AUTH={auth} needs SDXL_ENDPOINT to be the URL of a Cloud Run service, not {endpoint!r}")
    if VERTEX_ENDPOINT.match(endpoint):
        return VertexBackend(endpoint, api_base)
    raise ValueError(
        f"SDXL_ENDPOINT={endpoint!r} is neither an http(s) URL of a model server nor a Vertex AI endpoint "
        "(projects/P/locations/L/endpoints/E)"
    )
