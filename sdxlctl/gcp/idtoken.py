"""ID tokens: what a private Cloud Run service wants in `Authorization: Bearer` (an access token is refused).

Where google-auth's `fetch_id_token_credentials` finds credentials (a service-account or impersonated key file
in GOOGLE_APPLICATION_CREDENTIALS, else the metadata server), its ID token for the audience. gcloud's user
credentials (`gcloud auth application-default login`, an authorized_user file) cannot mint a token for an
audience; their refreshed `id_token` is the one `gcloud auth print-identity-token` prints, which Cloud Run
takes from its project's users. Each token is kept until 5 minutes before it expires, as the UI does.
"""

from __future__ import annotations

import functools
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

from sdxlctl.errors import SdxlctlError

EARLY_S = 300.0  # fetched again this long before it expires: a request in flight must not outlive its token
TIMEOUT_S = 30.0  # one call to the token endpoint or the metadata server
KEY_FILE = "GOOGLE_APPLICATION_CREDENTIALS"
LOGIN = "gcloud auth application-default login"
SIGNERS = ("service_account", "impersonated_service_account")  # key files that mint a token for any audience
# Where a gcloud login is refreshed. google-auth ignores a token_uri in the login's file (a file must not send
# the refresh token elsewhere), so this is the one place it is set; tests point it at their own endpoint.
USER_TOKEN_URI = "https://oauth2.googleapis.com/token"

_lock = threading.Lock()
_cache: dict[tuple[str, bool, str], tuple[str, float]] = {}  # (audience, emulated, credentials) -> (token, exp)


class NoIdToken(SdxlctlError):
    """No ID token could be had: the message says why, the hint what to set."""


def id_token(audience: str, *, emulated: bool) -> str:
    """An ID token for `audience` (a Cloud Run service's URL); cached until 5 min before it expires.

    Emulated (an http:// api_endpoint), only the key file in GOOGLE_APPLICATION_CREDENTIALS is used (its
    token_uri is the emulator's), never the metadata server: a test must not ask this machine's cloud.
    """
    key = (audience, emulated, _credentials_version())
    with _lock:  # one fetch at a time: threads asking together get the one token
        cached = _cache.get(key)
        if cached is not None and time.time() < cached[1] - EARLY_S:
            return cached[0]
        token, expires = _fetch(audience, emulated=emulated)
        _cache[key] = (token, expires)
        return token


def forget(audience: str | None = None) -> None:
    """Drop the cached tokens for `audience` (one the service refused), or every one."""
    with _lock:
        for key in [k for k in _cache if audience is None or k[0] == audience]:
            del _cache[key]


def _credentials_version() -> str:
    """Which key file, as it is now: a token of a replaced key (or another account's) is never served."""
    path = os.environ.get(KEY_FILE, "")
    try:
        return f"{path}@{os.stat(path).st_mtime_ns}" if path else ""
    except OSError:
        return path


def _fetch(audience: str, *, emulated: bool) -> tuple[str, float]:
    from google.auth import exceptions
    from google.auth.transport.requests import Request

    request = functools.partial(Request(), timeout=TIMEOUT_S)  # google-auth's own default waits 120 s
    path = os.environ.get(KEY_FILE, "")
    try:
        if emulated:
            if not path:
                raise NoIdToken(
                    "the emulator issues ID tokens only for a key file, and GOOGLE_APPLICATION_CREDENTIALS is not set",
                    hint="set GOOGLE_APPLICATION_CREDENTIALS to a service account key whose token_uri is the "
                    "emulator's /token",
                )
            return _signed(_key_file(path, emulated=True), audience, request)
        adc = Path(path) if path else _gcloud_adc()
        info = _key_file(str(adc), emulated=False) if adc is not None else None
        if info is not None and info.get("type") == "authorized_user":
            return _user_token(info, request)
        if info is not None:
            return _signed(info, audience, request)
        from google.oauth2.id_token import fetch_id_token_credentials

        credentials = fetch_id_token_credentials(audience, request=request)  # the metadata server
        credentials.refresh(request)
        return str(credentials.token), _expiry(credentials.token)
    except exceptions.DefaultCredentialsError:
        raise NoIdToken(
            "no credentials to sign an ID token with (no key file, no gcloud login, no metadata server)",
            hint=f"run `{LOGIN}`, or set {KEY_FILE} to a service account key file",
        ) from None
    except exceptions.GoogleAuthError as exc:  # RefreshError, TransportError: the token endpoint said no
        raise NoIdToken(
            f"no ID token for {audience}: {_first_line(exc)}",
            hint=f"check the account's key or login (`{LOGIN}` renews a login), then try again",
        ) from None


def _gcloud_adc() -> Path | None:
    """gcloud's application default credentials file, where `gcloud auth application-default login` wrote it."""
    from google.auth import _cloud_sdk

    found = Path(_cloud_sdk.get_application_default_credentials_path())
    return found if found.is_file() else None


def _key_file(path: str, *, emulated: bool) -> dict[str, Any]:
    """The JSON of a credentials file, refused in one line when it is not one sdxlctl can mint tokens with."""
    try:
        info = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as exc:
        raise NoIdToken(f"{KEY_FILE} {path}: {exc.strerror or exc}", hint=f"point {KEY_FILE} at a key file") from None
    except ValueError:
        raise NoIdToken(
            f"{path} is not a JSON credentials file", hint=f"download the key again, or `{LOGIN}`"
        ) from None
    kind = info.get("type") if isinstance(info, dict) else None
    allowed = ("service_account",) if emulated else (*SIGNERS, "authorized_user")
    if kind not in allowed:
        what = "a service account key" if emulated else "a service account key or a gcloud login"
        raise NoIdToken(
            f"{path} holds {kind or 'unknown'} credentials, which cannot sign an ID token here: it needs {what}",
            hint=f"set {KEY_FILE} to a service account key file" + ("" if emulated else f", or run `{LOGIN}`"),
        )
    return dict(info)


def _signed(info: dict[str, Any], audience: str, request: Any) -> tuple[str, float]:
    """A key file's token for `audience`, as `fetch_id_token_credentials` makes it from a key file."""
    credentials: Any
    try:
        if info["type"] == "service_account":
            from google.oauth2 import service_account

            credentials = service_account.IDTokenCredentials.from_service_account_info(info, target_audience=audience)
        else:
            from google.auth import impersonated_credentials

            target = impersonated_credentials.Credentials.from_impersonated_service_account_info(info)
            credentials = impersonated_credentials.IDTokenCredentials(
                target_credentials=target, target_audience=audience, include_email=True
            )
    except (KeyError, ValueError) as exc:
        raise NoIdToken(
            f"the {info['type']} key file is incomplete or damaged ({_first_line(exc)})",
            hint="download a new key, or point GOOGLE_APPLICATION_CREDENTIALS at another one",
        ) from None
    credentials.refresh(request)
    return str(credentials.token), _expiry(credentials.token)


def _user_token(info: dict[str, Any], request: Any) -> tuple[str, float]:
    """A gcloud login's own ID token (its audience is gcloud's client, not the service: Cloud Run accepts it)."""
    from google.oauth2 import credentials as user_credentials

    try:
        credentials = user_credentials.Credentials.from_authorized_user_info(info).with_token_uri(USER_TOKEN_URI)
    except ValueError as exc:
        raise NoIdToken(f"the gcloud login file is incomplete ({_first_line(exc)})", hint=f"run `{LOGIN}`") from None
    credentials.refresh(request)
    token = credentials.id_token
    if not token:
        raise NoIdToken(
            "the gcloud login gave no ID token (it was made without the openid scope)", hint=f"run `{LOGIN}`"
        )
    return str(token), _expiry(token)


def _expiry(token: Any) -> float:
    """The token's `exp` (seconds since the epoch), read without checking the signature: only for the cache."""
    from google.auth import jwt

    try:
        return float(jwt.decode(token, verify=False)["exp"])
    except (KeyError, TypeError, ValueError):
        return 0.0  # unreadable: used once, never cached past this call


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:300]
