"""Identity: ID tokens as Google's OAuth token endpoint and Cloud Run's metadata server give them.

- `POST /token`: the OAuth 2.0 JWT-bearer grant google-auth sends for a service-account key file. The
  assertion must be signed by a key that `write_key_file` made (as Google knows each key it issued; any other
  is 400 invalid_grant). With a `target_audience` claim the answer is `{"id_token"}`; with `scope`, an
  access token (google.auth.default() on the key file refreshes through here too).
- `GET /_metadata/<service>/computeMetadata/v1/...`: the metadata server of an instance of Cloud Run service
  `<service>` (its full name, or its id), for GCE_METADATA_HOST / GCE_METADATA_IP = `metadata_host(...)`:
  the ping root, `instance/service-accounts/default/{identity,email,token}` and the account's info, as the
  service's template.serviceAccount, or the project's default compute account when it has none.
- `GET /oauth2/v1/certs`: the certificates ID tokens are signed with, as www.googleapis.com serves them.

One signing key per process, like Google's (tokens are not per project); each account's key file holds one
key per process too (RSA keys are slow to make; the emulator fixture writes a file per emulator).
"""

from __future__ import annotations

import base64
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from tests.emulator.core import DEPLOYER, ApiError, Route, World, routes

__all__ = ["DEPLOYER", "Identity", "certificates", "issue", "metadata_host", "verify", "write_key_file"]

ISSUER = "https://accounts.google.com"
JWT_GRANT = "urn:ietf:params:oauth:grant-type:jwt-bearer"
TOKEN_PATH = "/token"
GOOGLE_TOKEN_URI = "https://oauth2.googleapis.com/token"
METADATA_PREFIX = "/_metadata/"
SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
FLAVOR = {"Metadata-Flavor": "Google"}


@dataclass(frozen=True)
class _Key:
    kid: str
    private_pem: str
    public_pem: str
    certificate_pem: str


_lock = threading.Lock()
_signing: list[_Key] = []  # the emulator's one signing key, made on first use
_account_keys: dict[str, _Key] = {}  # email -> the key its key files hold
_known: dict[str, str] = {}  # key id -> email: the keys the token endpoint accepts


def _new_key(common_name: str) -> _Key:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from cryptography.x509.oid import NameOID

    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    start = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + datetime.timedelta(days=30))
        .sign(private, hashes.SHA256())
    )
    return _Key(
        kid=uuid.uuid4().hex,
        private_pem=private.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode(),
        public_pem=private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode(),
        certificate_pem=certificate.public_bytes(serialization.Encoding.PEM).decode(),
    )


def _signing_key() -> _Key:
    with _lock:
        if not _signing:
            _signing.append(_new_key("emulated accounts.google.com"))
        return _signing[0]


def certificates() -> dict[str, str]:
    """Key id -> PEM certificate of the emulator's ID-token signing key (what /oauth2/v1/certs serves)."""
    key = _signing_key()
    return {key.kid: key.certificate_pem}


def issue(world: World, email: str, audience: str, lifetime_s: int = 3600) -> str:
    """An ID token for `email` with audience `audience`, signed by the emulator."""
    from google.auth import crypt, jwt

    key = _signing_key()
    issued = int(time.time())
    expires = issued + lifetime_s
    account = world.table("accounts").get(email, {})
    subject = account.get("uniqueId") or _number(email)
    claims = {
        "iss": ISSUER,
        "aud": audience,
        "azp": subject,
        "sub": subject,
        "email": email,
        "email_verified": True,
        "iat": min(issued, expires - 1),  # an already expired token was issued before it expired
        "exp": expires,
    }
    return str(jwt.encode(crypt.RSASigner.from_string(key.private_pem, key.kid), claims).decode())


def verify(world: World, token: str, audience: str) -> str:
    """The email of a valid, unexpired ID token for `audience`; ApiError(401) otherwise.

    As Cloud Run checks: signed by Google (the emulator), issued by accounts.google.com, for this audience
    (a trailing '/' aside), not expired, naming an email.
    """
    from google.auth import exceptions, jwt

    try:
        claims = jwt.decode(token, certs=certificates(), verify=True)
    except (ValueError, exceptions.GoogleAuthError) as exc:
        raise ApiError(401, f"The ID token is not valid: {exc}") from None
    if claims.get("iss") != ISSUER:
        raise ApiError(401, f"The token was not issued by {ISSUER}: is it an ID token?")
    if str(claims.get("aud", "")).rstrip("/") != audience.rstrip("/"):
        raise ApiError(401, f"The ID token's audience is {claims.get('aud')!r}, not this service's URL {audience!r}")
    email = claims.get("email")
    if not email:
        raise ApiError(401, "The ID token names no email.")
    return str(email)


def _account_key(email: str) -> _Key:
    with _lock:
        key = _account_keys.get(email)
        if key is None:
            key = _account_keys[email] = _new_key(email)
            _known[key.kid] = email
        return key


def write_key_file(path: Path, email: str, token_uri: str) -> Path:
    """A service account key file google-auth accepts, whose ID tokens come from `token_uri`."""
    key = _account_key(email)
    project = email.split("@", 1)[1].split(".", 1)[0] if "@" in email else "unknown"
    info = {
        "type": "service_account",
        "project_id": project,
        "private_key_id": key.kid,
        "private_key": key.private_pem,
        "client_email": email,
        "client_id": _number(email),
        "auth_uri": "https://accounts.google.com/o/oauth2/auth",
        "token_uri": token_uri,
        "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
        "client_x509_cert_url": f"https://www.googleapis.com/robot/v1/metadata/x509/{email}",
        "universe_domain": "googleapis.com",
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(info, indent=2))
    path.chmod(0o600)
    return path


def metadata_host(emulator_url: str, service_name: str) -> str:
    """GCE_METADATA_HOST (and GCE_METADATA_IP) for a process the emulator runs as Cloud Run service `service_name`.

    google-auth puts it after http:// (`http://HOST/computeMetadata/v1/...`, and pings `http://IP`), so a
    path prefix rides along: `127.0.0.1:PORT/_metadata/<service name>`.
    """
    host = emulator_url.split("://", 1)[-1].rstrip("/")
    return f"{host}{METADATA_PREFIX}{service_name.strip('/')}"


def _number(email: str) -> str:
    """A stable 21-digit id for an account the world does not hold (Google's uniqueId has 21 digits)."""
    import hashlib

    return str(int(hashlib.sha256(email.encode()).hexdigest(), 16) % 10**21).rjust(21, "1")


def _oauth_error(error: str, description: str) -> Response:
    return JSONResponse({"error": error, "error_description": description}, status_code=400)


def _segment(part: str) -> dict[str, Any]:
    try:
        return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))
    except (ValueError, TypeError):
        return {}


class Identity:
    def __init__(self, world: World) -> None:
        self.world = world

    def routes(self) -> list[Route]:
        return routes(
            [
                ("POST", TOKEN_PATH, self.token),
                ("GET", r"/oauth2/v1/certs", self.certs),
                ("GET", METADATA_PREFIX + r"(?P<rest>.*)", self.metadata),
            ]
        )

    def certs(self, request: Request, p: dict[str, str], body: Any) -> dict[str, Any]:
        return certificates()

    # ---------------------------------------------------------------- the token endpoint

    def token(self, request: Request, p: dict[str, str], body: Any) -> Any:
        from google.auth import exceptions, jwt

        form = body if isinstance(body, dict) else {}
        if form.get("grant_type") != JWT_GRANT:
            return _oauth_error("unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type', '')}")
        assertion = str(form.get("assertion", ""))
        if assertion.count(".") != 2:
            return _oauth_error("invalid_request", "Invalid JWT: the assertion is not a JWT.")
        kid = str(_segment(assertion.split(".", 1)[0]).get("kid", ""))
        with _lock:
            email = _known.get(kid)
            key = _account_keys.get(email or "")
        if email is None or key is None:
            return _oauth_error("invalid_grant", "Invalid JWT Signature.")  # a key Google never issued
        try:
            claims = jwt.decode(assertion, certs={kid: key.public_pem}, verify=True)
        except (ValueError, exceptions.GoogleAuthError) as exc:
            return _oauth_error("invalid_grant", f"Invalid JWT: {exc}")
        if claims.get("iss") != email:
            return _oauth_error("invalid_grant", f"Invalid JWT: iss {claims.get('iss')!r} is not the key's {email}.")
        # google-auth writes Google's endpoint as the audience whatever the key file's token_uri says
        if claims.get("aud") not in (GOOGLE_TOKEN_URI, f"{request.url.scheme}://{request.url.netloc}{TOKEN_PATH}"):
            return _oauth_error("invalid_grant", f"Invalid JWT: aud must be {GOOGLE_TOKEN_URI}.")
        if int(claims.get("exp", 0)) - int(claims.get("iat", 0)) > 3600:
            return _oauth_error("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes).")
        if claims.get("target_audience"):
            return {"id_token": issue(self.world, email, str(claims["target_audience"]))}
        if claims.get("scope"):
            return _access_token()
        return _oauth_error("invalid_scope", "Invalid OAuth scope or ID token audience provided.")

    # ---------------------------------------------------------------- the metadata server

    def metadata(self, request: Request, p: dict[str, str], body: Any) -> Response:
        service, found, path = p["rest"].partition("/computeMetadata/v1")
        if request.headers.get("metadata-flavor") != "Google":
            # as the real one: without the header a request could be a forwarded one (SSRF)
            return _text("Missing required header: Metadata-Flavor: Google\n", 403)
        record = self._service(service.strip("/"))
        if record is None:
            return _text(f"No Cloud Run service {service.strip('/')!r} runs here\n", 404)
        if not found:
            return _text("computeMetadata/\n")  # the ping
        return self._answer(request, record, path.lstrip("/"))

    def _service(self, name: str) -> dict[str, Any] | None:
        services = self.world.table("services")
        if "/" in name:
            return services.get(name)
        return next((s for n, s in services.items() if n.rsplit("/", 1)[-1] == name), None)

    def _answer(self, request: Request, record: dict[str, Any], path: str) -> Response:
        parts = record["name"].split("/")  # projects/P/locations/R/services/S
        email = record.get("template", {}).get("serviceAccount") or (
            f"{self.world.project_number}-compute@developer.gserviceaccount.com"
        )
        plain = {
            "": "instance/\nproject/\n",
            "project/project-id": parts[1],
            "project/numeric-project-id": self.world.project_number,
            "instance/region": f"projects/{self.world.project_number}/regions/{parts[3]}",
            "instance/id": record.get("uid", "0").replace("-", ""),
            "instance/service-accounts/": f"default/\n{email}/\n",
        }
        if path in plain:
            return _text(plain[path])
        prefix, _, rest = path.partition("instance/service-accounts/")
        account, _, item = rest.partition("/")
        if prefix or account not in ("default", email):
            return _text("Not Found\n", 404)
        query = request.query_params
        if item == "" and query.get("recursive") == "true":
            return _json({"aliases": ["default"], "email": email, "scopes": SCOPES})
        if item == "":
            return _text("aliases\nemail\nidentity\nscopes\ntoken\n")
        if item == "email":
            return _text(email)
        if item == "scopes":
            return _text("\n".join(SCOPES) + "\n")
        if item == "token":
            return _json(_access_token())
        if item == "identity":
            audience = query.get("audience", "")
            if not audience:
                return _text("non-empty audience parameter required\n", 400)
            return _text(issue(self.world, email, audience))
        return _text("Not Found\n", 404)


def _access_token() -> dict[str, Any]:
    """An opaque access token: the emulated APIs take any (and none)."""
    return {"access_token": f"ya29.emulated-{uuid.uuid4().hex}", "expires_in": 3599, "token_type": "Bearer"}


def _text(content: str, status: int = 200) -> Response:
    return PlainTextResponse(content, status_code=status, headers=FLAVOR, media_type="application/text")


def _json(body: dict[str, Any]) -> Response:
    return JSONResponse(body, headers=FLAVOR)
