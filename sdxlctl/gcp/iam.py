"""IAM service accounts, over IAM's REST API with google-auth (google-cloud-iam speaks only gRPC)."""

from __future__ import annotations

from typing import Any

from sdxlctl.gcp.errors import CloudError, explain
from sdxlctl.gcp.session import Cloud

TIMEOUT_S = 30.0


class ServiceAccounts:
    """Service accounts of one project."""

    def __init__(self, cloud: Cloud) -> None:
        from google.auth.transport.requests import AuthorizedSession

        self.cloud = cloud
        self.base = (
            cloud.api_endpoint or "https://iam.googleapis.com"
        ) + f"/v1/projects/{cloud.project}/serviceAccounts"
        self.session: Any = AuthorizedSession(cloud.credentials())

    def email(self, account_id: str) -> str:
        return f"{account_id}@{self.cloud.project}.iam.gserviceaccount.com"

    def exists(self, email: str) -> bool:
        return self._send("GET", f"{self.base}/{email}", ok=(200, 404)).status_code == 200

    def ensure(self, account_id: str, display_name: str) -> str:
        """Create the account unless it exists; return its email."""
        email = self.email(account_id)
        if self.exists(email):
            return email
        self._send(
            "POST",
            self.base,
            json={"accountId": account_id, "serviceAccount": {"displayName": display_name}},
            ok=(200, 409),
        )
        return email

    def delete(self, account_id: str) -> bool:
        """Delete the account; False when it was already gone."""
        return self._send("DELETE", f"{self.base}/{self.email(account_id)}", ok=(200, 404)).status_code == 200

    def _send(self, method: str, url: str, *, ok: tuple[int, ...], json: Any = None) -> Any:
        import requests
        from google.api_core import exceptions as gexc

        try:
            response = self.session.request(method, url, json=json, timeout=TIMEOUT_S)
        except requests.RequestException as exc:
            raise CloudError(f"IAM: {exc}") from None
        if response.status_code in ok:
            return response
        error = gexc.from_http_response(response)
        raise explain(
            error, f"service account ({method} {url.rsplit('/', 1)[-1]})", api="iam", project=self.cloud.project
        )
