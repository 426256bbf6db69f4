"""ID tokens for calling a private Cloud Run service (SDXL_AUTH=id-token).

Cloud Run's front end takes an ID token whose audience is the service's URL, never an access token. google-auth
finds where one comes from as Google's samples do (fetch_id_token_credentials): a service account key file in
GOOGLE_APPLICATION_CREDENTIALS, else the metadata server of the Cloud Run instance the page runs on (its service
account's identity).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from typing import Any

# An ID token lives an hour; one is fetched again this long before it ends, so that no request carries a token that
# expires while it waits in Cloud Run's queue or through a cold start.
REFRESH_MARGIN = timedelta(minutes=5)


class NoIdToken(Exception):
    """No ID token could be had: the sentence says from where one was looked for."""


class IdTokens:
    """ID tokens for one audience, each kept until REFRESH_MARGIN before it expires; thread-safe, and requests
    arriving together while none is valid wait for one fetch instead of each making its own."""

    def __init__(self, audience: str) -> None:
        self.audience = audience
        self._lock = threading.Lock()
        self._token = ""
        self._expiry: datetime | None = None

    def get(self) -> str:
        """A token valid for at least REFRESH_MARGIN more (fetched now when the kept one is not)."""
        with self._lock:
            if not self._token or self._expiry is None or datetime.now(UTC) >= self._expiry - REFRESH_MARGIN:
                self._token, self._expiry = self._fetch()
            return self._token

    def forget(self, token: str) -> None:
        """Drop `token` if it is still the kept one (the service refused it: revoked, or a clock ahead of ours)."""
        with self._lock:
            if self._token == token:
                self._token, self._expiry = "", None

    def _fetch(self) -> tuple[str, datetime | None]:
        import google.auth.exceptions
        import google.auth.transport.requests
        import google.oauth2.id_token

        request = google.auth.transport.requests.Request()
        try:
            credentials: Any = google.oauth2.id_token.fetch_id_token_credentials(self.audience, request=request)
            credentials.refresh(request)
        except (google.auth.exceptions.GoogleAuthError, ValueError) as exc:
            raise NoIdToken(
                f"No ID token to call the model at {self.audience} ({exc}): on Cloud Run the UI's service account "
                "gives one; elsewhere set GOOGLE_APPLICATION_CREDENTIALS to a service account key file"
            ) from None
        expiry = credentials.expiry  # google-auth keeps naive UTC
        if isinstance(expiry, datetime) and expiry.tzinfo is None:
            expiry = expiry.replace(tzinfo=UTC)
        return str(credentials.token), expiry
