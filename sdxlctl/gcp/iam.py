"""IAM service accounts and custom roles, over IAM's REST API with google-auth (google-cloud-iam speaks only gRPC)."""

from __future__ import annotations

from typing import Any

from sdxlctl.gcp.errors import CloudError, explain
from sdxlctl.gcp.session import Cloud

TIMEOUT_S = 30.0


def account_email(account_id: str, project: str) -> str:
    """A service account's email, from its id and project."""
    return f"{account_id}@{project}.iam.gserviceaccount.com"


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
        return account_email(account_id, self.cloud.project)

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
        return _send(self.session, method, url, ok=ok, json=json, what="service account", project=self.cloud.project)


class RolesDenied(CloudError):
    """The caller may not create or change the project's custom roles (iam.roles.create, iam.roles.update)."""


class Roles:
    """Custom roles of one project (projects.roles)."""

    def __init__(self, cloud: Cloud) -> None:
        from google.auth.transport.requests import AuthorizedSession

        self.cloud = cloud
        self.base = (cloud.api_endpoint or "https://iam.googleapis.com") + f"/v1/projects/{cloud.project}/roles"
        self.session: Any = AuthorizedSession(cloud.credentials())

    def name(self, role_id: str) -> str:
        return f"projects/{self.cloud.project}/roles/{role_id}"

    def ensure(self, role_id: str, *, title: str, description: str, permissions: list[str]) -> str:
        """Make the role grant exactly `permissions`: created, restored or corrected as needed; what was done.

        Raises RolesDenied when the caller may not do what that takes, so that the caller can fall back.
        """
        url = f"{self.base}/{role_id}"
        found = self._send("GET", url, ok=(200, 403, 404))
        if found.status_code != 200:  # missing, or not readable by this caller: creating it says which
            body = {
                "roleId": role_id,
                "role": {"title": title, "description": description, "includedPermissions": permissions, "stage": "GA"},
            }
            created = self._send("POST", self.base, json=body, ok=(200, 403, 409))
            if created.status_code == 403:
                raise RolesDenied(f"may not create the custom role {self.name(role_id)}")
            if created.status_code == 200 or found.status_code == 403:
                return "created" if created.status_code == 200 else "unchanged"
            found = self._send("GET", url, ok=(200,))  # created meanwhile by another run
        role, done = found.json(), "unchanged"
        if role.get("deleted"):  # a deleted role keeps its id for weeks: bring it back rather than wait
            restored = self._send("POST", f"{url}:undelete", json={"etag": role.get("etag")}, ok=(200, 403))
            if restored.status_code == 403:
                raise RolesDenied(f"may not undelete the custom role {self.name(role_id)}")
            role, done = restored.json(), "restored"
        if sorted(role.get("includedPermissions", [])) != sorted(permissions):
            # The role is sdxlctl's by its name: a permission added to it would reach every UI that holds it.
            patched = self._send(
                "PATCH",
                f"{url}?updateMask=includedPermissions",
                json={"includedPermissions": permissions, "etag": role.get("etag")},
                ok=(200, 403),
            )
            if patched.status_code == 403:
                raise RolesDenied(
                    f"may not correct the custom role {self.name(role_id)}: it grants more than {permissions}"
                )
            done = "corrected" if done == "unchanged" else done
        return done

    def _send(self, method: str, url: str, *, ok: tuple[int, ...], json: Any = None) -> Any:
        return _send(self.session, method, url, ok=ok, json=json, what="custom role", project=self.cloud.project)


def _send(session: Any, method: str, url: str, *, ok: tuple[int, ...], json: Any, what: str, project: str) -> Any:
    import requests
    from google.api_core import exceptions as gexc

    try:
        response = session.request(method, url, json=json, timeout=TIMEOUT_S)
    except requests.RequestException as exc:
        raise CloudError(f"IAM: {exc}") from None
    if response.status_code in ok:
        return response
    error = gexc.from_http_response(response)
    raise explain(error, f"{what} ({method} {url.rsplit('/', 1)[-1]})", api="iam", project=project)
