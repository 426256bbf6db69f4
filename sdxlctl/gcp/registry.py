"""Artifact Registry: deleting the images sdxlctl pushed (REST through google-auth, as for IAM)."""

from __future__ import annotations

import time
from typing import Any

from sdxlctl.gcp.errors import CloudError, explain
from sdxlctl.gcp.session import Cloud, Progress

TIMEOUT_S = 30.0
DELETE_TIMEOUT_S = 600.0


class Registry:
    """Docker packages of one Artifact Registry repository."""

    def __init__(self, cloud: Cloud, repository: str) -> None:
        from google.auth.transport.requests import AuthorizedSession

        self.cloud = cloud
        self.base = cloud.api_endpoint or "https://artifactregistry.googleapis.com"
        self.repository = f"projects/{cloud.project}/locations/{cloud.region}/repositories/{repository}"
        self.session: Any = AuthorizedSession(cloud.credentials())

    def delete_package(self, package: str, *, progress: Progress) -> bool:
        """Delete an image with all its tags; False when it was already gone."""
        response = self._send("DELETE", f"/v1/{self.repository}/packages/{package}", ok=(200, 404))
        if response.status_code == 404:
            return False
        operation = response.json()
        started = time.monotonic()
        while not operation.get("done"):
            if time.monotonic() - started > DELETE_TIMEOUT_S:
                raise CloudError(f"deleting image {package} did not finish in {DELETE_TIMEOUT_S / 60:.0f} min")
            progress(f"deleting image {package} ({time.monotonic() - started:.0f}s)")
            time.sleep(self.cloud.poll_s)
            operation = self._send("GET", f"/v1/{operation['name']}", ok=(200,)).json()
        if "error" in operation:
            raise CloudError(f"deleting image {package} failed: {operation['error'].get('message', '')}")
        return True

    def _send(self, method: str, path: str, *, ok: tuple[int, ...]) -> Any:
        import requests
        from google.api_core import exceptions as gexc

        try:
            response = self.session.request(method, self.base + path, timeout=TIMEOUT_S)
        except requests.RequestException as exc:
            raise CloudError(f"Artifact Registry: {exc}") from None
        if response.status_code in ok:
            return response
        raise explain(
            gexc.from_http_response(response),
            f"image ({method} {path.rsplit('/', 1)[-1]})",
            api="artifactregistry",
            project=self.cloud.project,
        )
