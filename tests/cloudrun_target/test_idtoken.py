"""gcp/idtoken.py against a real OAuth token endpoint on loopback (Google's JWT-bearer grant and refresh grant),
through google-auth's own credentials: cached until 5 min before expiry, one fetch for many threads, the user
login's token, and one-line refusals (never the metadata server when emulated)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs

import pytest

from sdxlctl.errors import SdxlctlError
from sdxlctl.gcp import idtoken
from tests.servers import free_port, serve_app

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
USER_CLIENT = "764086051850-gcloud.apps.googleusercontent.com"  # what a gcloud login's ID token is for


@dataclass
class Issuer:
    """Google's token endpoint in little: ID tokens signed with its own key, for the audience asked."""

    url: str = ""
    lifetime_s: int = 3600
    refuse: bool = False
    asked: list[str] = field(default_factory=list)  # the audience of each token issued

    def __post_init__(self) -> None:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        ).decode()
        self.public_pem = (
            key.public_key()
            .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
            .decode()
        )

    def issue(self, email: str, audience: str, lifetime_s: int | None = None) -> str:
        from google.auth import crypt, jwt

        now = int(time.time())
        claims: dict[str, object] = {
            "iss": "https://accounts.google.com",
            "aud": audience,
            "sub": email,
            "email": email,
        }
        claims |= {"iat": now, "exp": now + (self.lifetime_s if lifetime_s is None else lifetime_s)}
        return jwt.encode(crypt.RSASigner.from_string(self.private_pem, "k1"), claims).decode()

    def verify(self, token: str, audience: str) -> str:
        """The email of a token this issuer signed for `audience`; ValueError otherwise (expired too)."""
        from google.auth import jwt

        return str(jwt.decode(token, certs={"k1": self.public_pem}, audience=audience)["email"])

    def app(self) -> object:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse
        from starlette.routing import Route

        async def token(request: Request) -> JSONResponse:
            from google.auth import jwt

            form = {k: v[0] for k, v in parse_qs((await request.body()).decode()).items()}
            if self.refuse:
                return JSONResponse({"error": "invalid_grant", "error_description": "key was deleted"}, 400)
            if form.get("grant_type") == JWT_BEARER:
                claims = jwt.decode(form["assertion"], verify=False)  # signed by the key file's key
                audience, email = claims["target_audience"], claims["iss"]
                self.asked.append(audience)
                return JSONResponse({"id_token": self.issue(email, audience)})
            if form.get("grant_type") == "refresh_token":
                self.asked.append(USER_CLIENT)
                answer = {"access_token": "ya29.user", "expires_in": 3599, "token_type": "Bearer"}
                return JSONResponse(answer | {"id_token": self.issue("dev@example.com", USER_CLIENT)})
            return JSONResponse({"error": "unsupported_grant_type"}, 400)

        return Starlette(routes=[Route("/token", token, methods=["POST"])])

    def key_file(self, path: Path, email: str = "caller@demo-project.iam.gserviceaccount.com") -> Path:
        info = {
            "type": "service_account",
            "project_id": "demo-project",
            "private_key_id": "k1",
            "private_key": self.private_pem,
            "client_email": email,
            "client_id": "1",
            "token_uri": f"{self.url}/token",
        }
        path.write_text(json.dumps(info))
        return path

    def user_file(self, path: Path) -> Path:
        info = {"type": "authorized_user", "client_id": USER_CLIENT, "client_secret": "s", "refresh_token": "r"}
        path.write_text(json.dumps(info | {"token_uri": f"{self.url}/token"}))
        return path


@pytest.fixture
def issuer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Issuer]:
    issuer = Issuer()
    # Nothing here may reach a real metadata server or this machine's gcloud login.
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("GCE_METADATA_HOST", f"127.0.0.1:{free_port()}")
    monkeypatch.setenv("CLOUDSDK_CONFIG", str(tmp_path / "gcloud"))
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    idtoken.forget()
    with serve_app(issuer.app()) as server:
        issuer.url = server.url
        yield issuer
    idtoken.forget()


def test_a_key_files_token_is_for_the_audience_and_cached(
    issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(issuer.key_file(tmp_path / "key.json")))
    url = "http://127.0.0.1:9/sdxl-server"
    token = idtoken.id_token(url, emulated=True)
    assert issuer.verify(token, url) == "caller@demo-project.iam.gserviceaccount.com"
    assert idtoken.id_token(url, emulated=True) == token
    assert issuer.asked == [url]  # the second call was served from the cache
    other = "http://127.0.0.1:9/other"
    assert issuer.verify(idtoken.id_token(other, emulated=True), other)
    assert issuer.asked == [url, other]  # one token per audience


def test_a_token_near_expiry_is_fetched_again(issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(issuer.key_file(tmp_path / "key.json")))
    issuer.lifetime_s = 200  # inside the 5 min margin: never served from the cache
    idtoken.id_token("http://a", emulated=True)
    idtoken.id_token("http://a", emulated=True)
    assert issuer.asked == ["http://a", "http://a"]


def test_threads_asking_at_once_share_one_fetch(
    issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(issuer.key_file(tmp_path / "key.json")))
    tokens: list[str] = []
    threads = [
        threading.Thread(target=lambda: tokens.append(idtoken.id_token("http://a", emulated=True))) for _ in range(8)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(tokens) == 8 and len(set(tokens)) == 1
    assert issuer.asked == ["http://a"]


def test_a_gcloud_login_gives_its_own_id_token(issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`gcloud auth application-default login` writes an authorized_user file: no audience of its own choosing,
    its refreshed id_token is what `gcloud auth print-identity-token` prints."""
    monkeypatch.setattr(idtoken, "USER_TOKEN_URI", f"{issuer.url}/token")  # google-auth's own is Google's
    (tmp_path / "gcloud").mkdir()
    issuer.user_file(tmp_path / "gcloud" / "application_default_credentials.json")  # where gcloud writes it
    token = idtoken.id_token("https://sdxl-server-abc-ew.a.run.app", emulated=False)
    assert issuer.verify(token, USER_CLIENT) == "dev@example.com"
    idtoken.id_token("https://sdxl-server-abc-ew.a.run.app", emulated=False)
    assert issuer.asked == [USER_CLIENT]


def test_emulated_needs_the_key_file_and_never_asks_the_metadata_server(
    issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(SdxlctlError) as no_file:
        idtoken.id_token("http://a", emulated=True)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in no_file.value.message + (no_file.value.hint or "")
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(issuer.user_file(tmp_path / "user.json")))
    with pytest.raises(SdxlctlError, match="authorized_user credentials"):
        idtoken.id_token("http://a", emulated=True)
    assert issuer.asked == []


def test_no_credentials_at_all_say_what_to_set(issuer: Issuer) -> None:
    """Not emulated, no key file, no gcloud login, and the metadata server (a closed port here) does not answer."""
    with pytest.raises(SdxlctlError) as caught:
        idtoken.id_token("https://sdxl-server-abc-ew.a.run.app", emulated=False)
    assert "gcloud auth application-default login" in (caught.value.hint or "")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in (caught.value.hint or "")


@pytest.mark.parametrize("content", ["not json", json.dumps({"type": "service_account"})])
def test_a_broken_key_file_is_one_line(
    issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, content: str
) -> None:
    (tmp_path / "key.json").write_text(content)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "key.json"))
    with pytest.raises(SdxlctlError) as caught:
        idtoken.id_token("http://a", emulated=True)
    assert "\n" not in caught.value.message and caught.value.hint


def test_a_refusing_token_endpoint_is_one_line(issuer: Issuer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(issuer.key_file(tmp_path / "key.json")))
    issuer.refuse = True
    with pytest.raises(SdxlctlError, match="invalid_grant") as caught:
        idtoken.id_token("http://a", emulated=True)
    assert "\n" not in caught.value.message
