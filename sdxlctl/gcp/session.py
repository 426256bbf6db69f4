"""How sdxlctl reaches Google Cloud: endpoint, credentials, retries, and waiting on long operations."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from sdxlctl.config import Config
from sdxlctl.gcp.errors import OperationPending, explain, translated
from sdxlctl.steps import Progress

RETRY_DEADLINE_S = 120.0
T = TypeVar("T")


@dataclass(frozen=True)
class Cloud:
    """The project, region and API endpoint of a deployment, and how patiently to talk to them."""

    project: str
    region: str
    api_endpoint: str  # "" means Google's own hosts
    poll_s: float
    retry_s: float = RETRY_DEADLINE_S  # how long one call is retried through transient failures

    @classmethod
    def from_config(cls, config: Config) -> Cloud:
        if not config.gcp.project:
            from sdxlctl.errors import ConfigError

            raise ConfigError("target vertex needs [gcp] project", hint="set it in sdxlctl.toml or SDXLCTL_GCP_PROJECT")
        gcp = config.gcp
        return cls(gcp.project, gcp.region, gcp.api_endpoint.rstrip("/"), gcp.poll_interval_s, gcp.retry_s)

    @property
    def emulated(self) -> bool:
        """An http:// endpoint is an emulator on this machine: it gets no credentials."""
        return self.api_endpoint.startswith("http://")

    @property
    def parent(self) -> str:
        return f"projects/{self.project}/locations/{self.region}"

    def credentials(self) -> Any:
        if self.emulated:
            from google.auth.credentials import AnonymousCredentials

            return AnonymousCredentials()
        import google.auth

        credentials, _ = google.auth.default(scopes=["https://www.googleapis.com/auth/cloud-platform"])
        return credentials

    def client_options(self, google_host: str) -> Any:
        from google.api_core.client_options import ClientOptions

        return ClientOptions(api_endpoint=self.api_endpoint or google_host)

    def client(self, factory: Any, google_host: str) -> Any:
        """A GAPIC client on the REST transport (the emulator speaks HTTP/JSON, as Google's front end does)."""
        return factory(
            credentials=self.credentials(), transport="rest", client_options=self.client_options(google_host)
        )

    def retry(self) -> Any:
        """Retry transient failures (429, 5xx, a dropped connection, a garbled answer) with exponential
        backoff, for at most `retry_s` (two minutes by default). For reads and deletes, which may be sent
        twice; a create goes through `create_once` instead.

        A 429 about quota is not transient: waiting two minutes would not help, so it is not retried.
        """
        from google.api_core import retry

        return retry.Retry(
            predicate=is_transient,
            initial=min(1.0, self.poll_s),
            maximum=min(30.0, self.poll_s * 10),
            multiplier=2.0,
            timeout=self.retry_s,
        )


def is_transient(exc: Exception) -> bool:
    """Worth another try: overload, unavailability, lost or garbled answers; not quota or stockout."""
    from google.api_core import exceptions as gexc

    if isinstance(exc, gexc.ServiceUnavailable | gexc.InternalServerError | gexc.GatewayTimeout | gexc.BadGateway):
        return True
    if isinstance(exc, gexc.TooManyRequests | gexc.ResourceExhausted):
        text = str(exc).lower()
        return not any(
            word in text for word in ("quota", "stockout", "resources are insufficient", "resource_pool_exhausted")
        )
    return is_lost_answer(exc)


def is_lost_answer(exc: Exception) -> bool:
    """The connection dropped (or never opened) or the answer was not the JSON asked for: the call may or
    may not have happened. A read timeout is not one: a slow predict sent again would only be slower."""
    import requests
    from google.protobuf import json_format

    lost = (
        requests.ConnectionError,  # ConnectTimeout too
        requests.exceptions.ChunkedEncodingError,
        requests.exceptions.JSONDecodeError,
        json_format.ParseError,
    )
    return isinstance(exc, lost)


def create_once(
    create: Callable[[], T],
    find: Callable[[], T | None],
    *,
    what: str,
    cloud: Cloud,
    api: str,
    progress: Progress,
) -> T:
    """Send a create that must not happen twice, and return its result (or `find`'s).

    A 5xx, a dropped connection or a garbled answer leave unknown whether the server acted: a blind
    retry could make a second endpoint, model or deployment. So after such a failure `find` looks for
    what the create would have made (by label, name or pending operation) before it is sent again;
    definite refusals (4xx) are raised at once. Gives up after `cloud.retry_s`, as `Cloud.retry` does.
    """
    from google.api_core import exceptions as gexc

    deadline = time.monotonic() + cloud.retry_s
    delay = min(1.0, cloud.poll_s)
    with translated(what, api=api, project=cloud.project, region=cloud.region):
        while True:
            try:
                return create()
            except gexc.AlreadyExists:  # named resources: an earlier attempt (or run) made it
                found = find()
                if found is None:
                    raise
                return found
            except Exception as exc:
                if not is_transient(exc) or time.monotonic() + delay > deadline:
                    raise
                progress(f"{what}: no clear answer ({type(exc).__name__}); looking whether it went through")
            time.sleep(delay)
            delay = min(delay * 2, min(30.0, cloud.poll_s * 10))
            found = find()
            if found is not None:
                return found


def wait_operation(
    get: Callable[[str], Any],
    name: str,
    *,
    what: str,
    timeout_s: float,
    poll_s: float,
    progress: Progress,
    api: str,
    cloud: Cloud,
) -> Any:
    """Poll operation `name` (with `get`) until done; return its response `Any`, or raise a CloudError.

    Each wait passes its own timeout: google-api-core's default of 900 s is shorter than a GPU deploy.
    When the operation cannot be read (polls keep failing past the retry budget) or runs past
    `timeout_s`, OperationPending says so: the operation goes on in the cloud and stays recorded.
    """
    started = time.monotonic()
    while True:
        operation = get(name)
        if operation.done:
            if operation.HasField("error") and operation.error.code:
                from google.api_core import exceptions as gexc

                error = gexc.from_grpc_status(_grpc_code(operation.error.code), operation.error.message)
                raise explain(error, f"{what} failed", api=api, project=cloud.project, region=cloud.region)
            return operation.response
        elapsed = time.monotonic() - started
        if elapsed > timeout_s:
            raise OperationPending(
                f"{what} did not finish within {timeout_s / 60:.0f} min",
                hint=f"it goes on in the cloud (operation {name}); running the step again waits for it",
            )
        progress(f"{what} ({elapsed:.0f}s)")
        time.sleep(poll_s)


def wait_for(client: Any, name: str, *, what: str, timeout_s: float, progress: Progress, api: str, cloud: Cloud) -> Any:
    """`wait_operation` through a GAPIC client's operations mixin (`client.get_operation`)."""
    from google.api_core import exceptions as gexc

    def get(operation: str) -> Any:
        with translated(f"poll {what}", api=api, project=cloud.project, region=cloud.region):
            try:
                return client.get_operation(request={"name": operation}, retry=cloud.retry())
            except gexc.RetryError as exc:  # a definite refusal (403, 404) is no such case: it is raised
                cause = exc.cause
                raise OperationPending(
                    f"{what}: its state could not be read for {cloud.retry_s:.0f} s "
                    f"({getattr(cause, 'message', None) or type(cause).__name__})",
                    hint=f"it may go on in the cloud (operation {operation}); running the step again waits for it",
                ) from None

    return wait_operation(
        get, name, what=what, timeout_s=timeout_s, poll_s=cloud.poll_s, progress=progress, api=api, cloud=cloud
    )


def _grpc_code(code: int) -> Any:
    import grpc

    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN
