"""Target cloudrun: predict. The service's URL with an ID token for it, through a cold start.

A service scaled to zero has no instance: Cloud Run holds a request while it starts one (the image, the
driver, then the model's load and warm-up until the startup probe passes), which takes minutes for SDXL.
So health is asked first with a short wait; if it does not answer, the wait is shown as its own phase
("starting an instance (cold start)") and polled until an instance is ready, and only then is the prediction
sent, with the request's own time limit. 429 (no instance free) and 503 (none ready) are retried with
exponential backoff, as Google's client libraries retry them, for a bounded time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from sdxlctl.client import CONNECT_TIMEOUT_S, Refused, checked
from sdxlctl.config import Config
from sdxlctl.errors import DeployError, PredictError
from sdxlctl.inputs import CLOUD_RUN_LIMIT_BYTES
from sdxlctl.state import StateStore
from sdxlctl.steps import Progress, quiet
from sdxlctl.vertex.names import cloud, names

FIRST_HEALTH_S = 3.0  # a running instance answers health at once; longer means Cloud Run is starting one
HEALTH_HOLD_S = 30.0  # one health poll during a cold start (Cloud Run holds it until an instance serves)
HEALTH_PAUSE_S = 2.0  # between polls that were answered at once (503 loading, 429 no instance yet)
STARTUP_MARGIN_S = 60.0  # past [cloudrun] startup_timeout_s: the instance's own start before its probe runs
ANSWER_MARGIN_S = 10.0  # past [cloudrun] timeout_s, so Cloud Run's 504 arrives before this side gives up
HEALTH_BYTES = 64 * 1024
RETRY_FIRST_S, RETRY_MAX_S = 1.0, 30.0
RETRY_TOTAL_S = 120.0  # 429/503 on predict are retried for at most this long in all
LIMIT_MIB = CLOUD_RUN_LIMIT_BYTES // 2**20
TOO_LARGE_HINT = "ask for fewer images (--num-images) or a smaller format (--format jpeg or webp)"

Headers = Callable[[], dict[str, str]]


class TokenRefused(PredictError):
    """Cloud Run's 401: the ID token is missing, expired, or for another audience."""


def predict(
    config: Config,
    store: StateStore,
    body: dict[str, Any],
    *,
    timeout_s: float,
    progress: Progress = quiet,
    sleep: Callable[[float], None] = time.sleep,
) -> tuple[dict[str, Any], str]:
    """The request to the service's URL with an ID token, after waiting through a cold start; the answer and URL."""
    from sdxlctl.gcp.idtoken import forget, id_token

    url = service_url(config, store)
    emulated = cloud(config).emulated
    service = names(config).server_service_id

    def headers() -> dict[str, str]:  # per request: a cold start can outlast a cached token's margin
        return {"Authorization": f"Bearer {id_token(url, emulated=emulated)}"}

    run = config.cloudrun
    within_s = run.startup_timeout_s + STARTUP_MARGIN_S
    try:
        wait_for_instance(url, headers, within_s=within_s, service=service, progress=progress, sleep=sleep)
    except TokenRefused:  # a cached token the service no longer takes (revoked, another key): one fresh try
        forget(url)
        wait_for_instance(url, headers, within_s=within_s, service=service, progress=progress, sleep=sleep)
    limit = min(timeout_s, run.timeout_s + ANSWER_MARGIN_S)
    return _post(url, body, headers, timeout_s=limit, config=config, progress=progress, sleep=sleep), url


def service_url(config: Config, store: StateStore) -> str:
    """The model service's URL as Cloud Run reports it now: the only place the caller's ID token may go.

    Not the state file's url: a tampered state would hand the token to any host, and a gcloud login's token
    (its audience is gcloud's, not the service's) is taken by every Cloud Run service its user may invoke.
    `store` stays in the signature (the contract's); the service is named by the config, as deploy names it.
    """
    from sdxlctl.gcp.run import CloudRun

    c, service_id = cloud(config), names(config).server_service_id
    live = CloudRun(c).get(service_id)
    if live is None or not live.uri:
        raise DeployError(
            f"no Cloud Run service {service_id} for {config.name!r} in {config.gcp.region}",
            hint="run `sdxlctl deploy` first",
        )
    return trusted_url(str(live.uri), emulated=c.emulated, service=service_id)


def trusted_url(url: str, *, emulated: bool, service: str) -> str:
    """`url` rebuilt from its parts when it is a Cloud Run service's (https://*.run.app; http://127.0.0.1:PORT
    only against the emulator), with no user, path, query or fragment; anything else refused, token unsent."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url.strip())
        host, port = parts.hostname or "", parts.port
    except ValueError:
        host, port, parts = "", None, urlsplit("")
    plain = not (parts.username or parts.password or parts.query or parts.fragment) and parts.path in ("", "/")
    if plain and parts.scheme == "https" and host.endswith(".run.app") and port is None:
        return f"https://{host}"
    if plain and emulated and parts.scheme == "http" and host == "127.0.0.1" and port is not None:
        return f"http://127.0.0.1:{port}"
    raise DeployError(
        f"the URL of {service} is not a Cloud Run service's ({url[:100]!r}): no ID token is sent there",
        hint="`sdxlctl status` shows the service; `sdxlctl deploy` makes it again",
    )


def wait_for_instance(
    url: str,
    headers: Headers,
    *,
    within_s: float,
    service: str,
    progress: Progress = quiet,
    sleep: Callable[[float], None] = time.sleep,
) -> None:
    """Return once the service's health answers 200; show the cold start while Cloud Run starts an instance."""
    started = time.monotonic()
    status, body = _health(url, headers, timeout_s=FIRST_HEALTH_S, service=service)
    if status == 200:
        return
    progress("starting an instance (cold start)")
    while True:
        if body.get("status") == "failed":  # the server says it cannot load: waiting would not help
            raise DeployError(
                f"the model server of {service} failed to start: {body.get('reason', 'no reason given')}",
                hint="`sdxlctl logs` shows its log; fix the config and run `sdxlctl deploy`",
            )
        elapsed = time.monotonic() - started
        if elapsed >= within_s:
            raise DeployError(
                f"no instance of {service} became ready within {within_s:.0f} s",
                hint="`sdxlctl logs` shows what the server did; raise [cloudrun] startup_timeout_s if it loads slowly",
            )
        if status is not None:  # answered at once (loading, no instance yet): no need to ask again right away
            sleep(HEALTH_PAUSE_S)
            elapsed = time.monotonic() - started
        progress(f"starting an instance (cold start, {elapsed:.0f}s)")
        status, body = _health(
            url, headers, timeout_s=min(HEALTH_HOLD_S, max(1.0, within_s - elapsed)), service=service
        )
        if status == 200:
            return


def _health(url: str, headers: Headers, *, timeout_s: float, service: str) -> tuple[int | None, dict[str, Any]]:
    """Health's status and JSON body; (None, {}) when it did not answer in time (an instance is starting)."""
    import json

    import httpx

    content = b""
    try:
        with httpx.stream(
            "GET", f"{url}/health", headers=headers(), timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S)
        ) as response:
            for chunk in response.iter_bytes():  # health is a line of JSON: no more than HEALTH_BYTES is read
                content += chunk
                if len(content) > HEALTH_BYTES:
                    break
    except httpx.TimeoutException:
        return None, {}
    except httpx.HTTPError as exc:
        raise PredictError(
            f"nothing answers at {url} ({type(exc).__name__})",
            hint="is the service there? `sdxlctl status` shows it, `sdxlctl deploy` makes it",
        ) from None
    _refuse_access(response, url, service)
    if response.status_code == 404:
        raise PredictError(
            f"{url}/health: 404: the service is gone or does not run sdxlctl's model server",
            hint="`sdxlctl status` shows what is deployed; `sdxlctl deploy` makes it",
        )
    try:
        body = json.loads(content)
    except ValueError:
        body = {}
    return response.status_code, body if isinstance(body, dict) else {}


def _refuse_access(response: Any, url: str, service: str) -> None:
    """Cloud Run's own 401 and 403 (the model server answers neither) as one line each."""
    if response.status_code == 401:
        raise TokenRefused(
            f"{url} refused the ID token (401): it is missing, expired, or for another audience",
            hint="check the credentials: `gcloud auth application-default login`, or GOOGLE_APPLICATION_CREDENTIALS",
        )
    if response.status_code == 403:
        raise PredictError(
            f"{url} refused this account (403): your account needs roles/run.invoker on {service}",
            hint=f"gcloud run services add-iam-policy-binding {service} --member=user:YOU "
            "--role=roles/run.invoker (or serviceAccount:...)",
        )


def _post(
    url: str,
    body: dict[str, Any],
    headers: Headers,
    *,
    timeout_s: float,
    config: Config,
    progress: Progress,
    sleep: Callable[[float], None],
) -> dict[str, Any]:
    import httpx

    service = names(config).server_service_id
    waited, delay = 0.0, RETRY_FIRST_S
    while True:
        try:
            with httpx.stream(
                "POST",
                f"{url}/predict",
                json=body,
                headers=headers(),
                timeout=httpx.Timeout(timeout_s, connect=CONNECT_TIMEOUT_S),
            ) as response:
                content = _bounded(response)
        except httpx.TimeoutException:
            raise PredictError(
                f"no answer from {url} within {timeout_s:.0f} s",
                hint="use fewer --steps or a smaller size, or raise [cloudrun] timeout_s (up to 3600)",
            ) from None
        except httpx.HTTPError as exc:
            raise PredictError(
                f"the connection to {url} broke before an answer ({type(exc).__name__})",
                hint="the instance may have restarted: `sdxlctl logs` shows it; then try again",
            ) from None
        status = response.status_code
        if status in (429, 503):
            wait = min(max(_retry_after(response), delay), RETRY_MAX_S)
            if waited + wait <= RETRY_TOTAL_S:
                why = "busy" if status == 429 else "not ready"
                progress(f"the service answered {status} ({why}): trying again in {wait:.0f} s")
                sleep(wait)
                waited, delay = waited + wait, min(delay * 2, RETRY_MAX_S)
                continue
        return _answer(response, content, url, service, config)


def _retry_after(response: Any) -> float:
    """Retry-After in seconds (0 when absent or a date: the backoff's own wait is used)."""
    try:
        return max(0.0, float(response.headers.get("retry-after", "0")))
    except ValueError:
        return 0.0


def _bounded(response: Any) -> bytes:
    """The body, read no further than Cloud Run's limit: a body without (or lying in) Content-Length included."""
    try:
        size = int(response.headers.get("content-length") or 0)
    except ValueError:
        size = 0
    if size > CLOUD_RUN_LIMIT_BYTES:
        raise _too_large(f"the answer is {size / 2**20:.1f} MiB")
    chunks, total = [], 0
    for chunk in response.iter_bytes():
        total += len(chunk)
        if total > CLOUD_RUN_LIMIT_BYTES:
            raise _too_large(f"the answer is over {LIMIT_MIB} MiB")
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(what: str) -> PredictError:
    return PredictError(f"{what}: over Cloud Run's {LIMIT_MIB} MiB response limit", hint=TOO_LARGE_HINT)


def _answer(response: Any, content: bytes, url: str, service: str, config: Config) -> dict[str, Any]:
    """The checked answer; else the server's JSON error (as client.Refused, naming its field), else Cloud Run's."""
    import json

    try:
        data = json.loads(content)
    except ValueError:  # UnicodeDecodeError included
        data = None
    status = response.status_code
    if status == 200:
        return checked(data, url)
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict):  # the model server's own refusal
        message = str(error.get("message", "")).strip() or response.reason_phrase
        field = error.get("field")
        hints = {
            413: TOO_LARGE_HINT,
            429: "the service is busy: try again shortly, or raise [cloudrun] max_instances",
            503: "the model is not ready: `sdxlctl logs` shows why",
            504: "use fewer --steps, a smaller size, or raise [model] time_limit_s and [cloudrun] timeout_s",
        }
        raise Refused(
            f"the server answered {status}: {message}",
            status=status,
            field=field if isinstance(field, str) else None,
            server_message=message,
            hint=hints.get(status),
        )
    _refuse_access(response, url, service)
    text = " ".join(content[:200].decode("utf-8", "replace").split())
    if status == 504:
        raise PredictError(
            f"the request took longer than [cloudrun] timeout_s ({config.cloudrun.timeout_s} s): Cloud Run cut it",
            hint="use fewer --steps or a smaller size, or raise [cloudrun] timeout_s (up to 3600)",
        )
    if status in (429, 503):
        raise PredictError(
            f"the service answered {status} for over {RETRY_TOTAL_S:.0f} s: {text or 'no instance could take it'}",
            hint="try again later; `sdxlctl status` shows its instances, [cloudrun] max_instances caps them",
        )
    if status == 500 and "size" in text.lower():  # Cloud Run's page for an answer past its limit
        raise _too_large(f"Cloud Run refused the answer ({text})")
    raise PredictError(f"unexpected answer {status} from {url}: {text or '(empty)'}")
