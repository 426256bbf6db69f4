"""How sdxlctl reaches Google Cloud: endpoint, credentials, retries, and waiting on long operations."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sdxlctl.config import Config
from sdxlctl.gcp.errors import CloudError, explain

Progress = Callable[[str], None]
RETRY_DEADLINE_S = 120.0


@dataclass(frozen=True)
class Cloud:
    """The project, region and API endpoint of a deployment, and how patiently to talk to them."""

    project: str
    region: str
    api_endpoint: str  # "" means Google's own hosts
    poll_s: float

    @classmethod
    def from_config(cls, config: Config) -> Cloud:
        if not config.gcp.project:
            from sdxlctl.errors import ConfigError

            raise ConfigError("target vertex needs [gcp] project", hint="set it in sdxlctl.toml or SDXLCTL_GCP_PROJECT")
        return cls(
            config.gcp.project, config.gcp.region, config.gcp.api_endpoint.rstrip("/"), config.gcp.poll_interval_s
        )

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
        """Retry transient answers (429, 500, 503) with exponential backoff, for at most two minutes.

        A 429 about quota is not transient: waiting two minutes would not help, so it is not retried.
        """
        from google.api_core import retry

        return retry.Retry(
            predicate=is_transient,
            initial=min(1.0, self.poll_s),
            maximum=min(30.0, self.poll_s * 10),
            multiplier=2.0,
            timeout=RETRY_DEADLINE_S,
        )


def is_transient(exc: Exception) -> bool:
    """Worth another try: overload and unavailability, but not quota or stockout."""
    from google.api_core import exceptions as gexc

    if isinstance(exc, gexc.ServiceUnavailable | gexc.InternalServerError):
        return True
    if isinstance(exc, gexc.TooManyRequests | gexc.ResourceExhausted):
        text = str(exc).lower()
        return not any(
            word in text for word in ("quota", "stockout", "resources are insufficient", "resource_pool_exhausted")
        )
    return False


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
            raise CloudError(
                f"{what} did not finish within {timeout_s / 60:.0f} min",
                hint=f"it goes on in the cloud (operation {name}); running the step again waits for it",
            )
        progress(f"{what} ({elapsed:.0f}s)")
        time.sleep(poll_s)


def wait_for(client: Any, name: str, *, what: str, timeout_s: float, progress: Progress, api: str, cloud: Cloud) -> Any:
    """`wait_operation` through a GAPIC client's operations mixin (`client.get_operation`)."""
    from sdxlctl.gcp.errors import translated

    def get(operation: str) -> Any:
        with translated(f"poll {what}", api=api, project=cloud.project, region=cloud.region):
            return client.get_operation(request={"name": operation}, retry=cloud.retry())

    return wait_operation(
        get, name, what=what, timeout_s=timeout_s, poll_s=cloud.poll_s, progress=progress, api=api, cloud=cloud
    )


def _grpc_code(code: int) -> Any:
    import grpc

    for status in grpc.StatusCode:
        if status.value[0] == code:
            return status
    return grpc.StatusCode.UNKNOWN
