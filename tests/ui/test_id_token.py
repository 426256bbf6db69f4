"""SDXL_AUTH=id-token: the UI calls a private Cloud Run service with an ID token for its URL, kept until near expiry.

The stand-ins: Google's identity (the metadata server Cloud Run gives an instance, and the OAuth token endpoint a
service account key file names) issuing tokens of the lifetimes a test asks for, and a model server that, as
Cloud Run's front end does, refuses a request without a token it issued for its own URL.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import pytest

from sdxl_ui.app import generate
from sdxl_ui.backend import from_environment
from sdxl_ui.request import Choices
from tests.servers import free_port, serve_app
from tests.ui.conftest import ui_process

EMAIL = "demo-ui-sa@demo-project.iam.gserviceaccount.com"
BODY = {"instances": [{"prompt": "a fox", "seed": 3}], "parameters": {"num_inference_steps": 2}}
CHOICES = Choices("a fox", seed=5, randomize=False, width=64, height=64, steps=2)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _jwt(payload: dict[str, Any]) -> str:
    """A token shaped as Google's (google-auth reads exp from it unverified); the stand-ins check it by identity."""
    header = _b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(payload).encode())}.{_b64(b'signature')}"


def _claims(token: str) -> dict[str, Any]:
    part = token.split(".")[1]
    return dict(json.loads(base64.urlsafe_b64decode(part + "=" * (-len(part) % 4))))


@dataclass
class Identity:
    """Issues ID tokens: each answer's lifetime is the next of `lifetimes` (the last one repeats)."""

    lifetimes: list[int]
    delay_s: float = 0.0  # how long the token endpoint takes, so that requests arriving together overlap a fetch
    issued: list[str] = field(default_factory=list)
    url: str = ""

    def issue(self, audience: str) -> str:
        lifetime = self.lifetimes.pop(0) if len(self.lifetimes) > 1 else self.lifetimes[0]
        now = int(time.time())
        token = _jwt({"aud": audience, "email": EMAIL, "iat": now, "exp": now + lifetime, "n": len(self.issued)})
        self.issued.append(token)
        return token


@dataclass
class Model:
    url: str = ""
    tokens: list[str] = field(default_factory=list)  # the token of each request it served
    revoked: set[str] = field(default_factory=set)
    health_asked: int = 0


@contextlib.contextmanager
def stand_ins(*lifetimes: int, delay_s: float = 0.0) -> Iterator[tuple[Identity, Model]]:
    from PIL import Image
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    identity, model = Identity(list(lifetimes), delay_s), Model()
    flavor = {"Metadata-Flavor": "Google"}

    async def ping(request: Request) -> Response:
        return PlainTextResponse("", headers=flavor)

    async def account(request: Request) -> Response:
        if request.headers.get("metadata-flavor") != "Google":
            return PlainTextResponse("Missing Metadata-Flavor:Google header.", 403)
        return JSONResponse({"email": EMAIL, "aliases": ["default"], "scopes": []}, headers=flavor)

    async def metadata_identity(request: Request) -> Response:
        if request.headers.get("metadata-flavor") != "Google":
            return PlainTextResponse("Missing Metadata-Flavor:Google header.", 403)
        return PlainTextResponse(identity.issue(request.query_params["audience"]), headers=flavor)

    async def token(request: Request) -> Response:
        form = parse_qs((await request.body()).decode())
        assert form["grant_type"] == ["urn:ietf:params:oauth:grant-type:jwt-bearer"]
        await asyncio.sleep(identity.delay_s)
        return JSONResponse({"id_token": identity.issue(_claims(form["assertion"][0])["target_audience"])})

    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (20, 80, 200)).save(buffer, format="JPEG")
    image = base64.b64encode(buffer.getvalue()).decode()

    async def predict(request: Request) -> Response:
        bearer = request.headers.get("authorization", "").removeprefix("Bearer ")
        if bearer not in identity.issued or bearer in model.revoked:
            return JSONResponse({"error": {"code": 401, "message": "no valid ID token"}}, 401)
        claims = _claims(bearer)
        if claims["aud"] != model.url or claims["exp"] < time.time():
            return JSONResponse({"error": {"code": 401, "message": "wrong audience or expired"}}, 401)
        model.tokens.append(bearer)
        answer = {"images": [image], "seeds": [5], "output_format": "jpeg", "width": 64, "height": 64}
        return JSONResponse({"predictions": [answer]})

    async def health(request: Request) -> Response:
        model.health_asked += 1
        return JSONResponse({"status": "ready", "refiner": True})

    metadata = "/computeMetadata/v1/instance/service-accounts/default"
    identity_app = Starlette(
        routes=[
            Route("/", ping),
            Route(f"{metadata}/", account),
            Route(f"{metadata}/identity", metadata_identity),
            Route("/token", token, methods=["POST"]),
        ]
    )
    with (
        serve_app(identity_app) as identity_server,
        serve_app(
            Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health)])
        ) as model_server,
    ):
        identity.url, model.url = identity_server.url, model_server.url
        yield identity, model


def _key_file(tmp_path: Path, token_uri: str) -> Path:
    """A service account key file whose tokens come from `token_uri` (as a key file Google hands out, but local)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    info = {
        "type": "service_account",
        "project_id": "demo-project",
        "private_key_id": "k1",
        "private_key": pem.decode(),
        "client_email": EMAIL,
        "client_id": "1",
        "token_uri": token_uri,
    }
    path = tmp_path / "key.json"
    path.write_text(json.dumps(info))
    return path


def test_the_page_fetches_one_token_from_the_metadata_server_and_refetches_near_expiry(tmp_path: Path) -> None:
    from gradio_client import Client

    # the first token ends within the 5 minutes' margin: used once, then replaced; the second lasts the hour
    with stand_ins(240, 3600) as (identity, model):
        host = identity.url.removeprefix("http://")
        env = {"SDXL_AUTH": "id-token", "GCE_METADATA_HOST": host, "GCE_METADATA_IP": host}
        with ui_process(model.url, tmp_path, GOOGLE_APPLICATION_CREDENTIALS="", **env) as url:
            client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
            for seed in (1, 2, 3, 4):
                _, info, _ = client.predict(
                    *("a lighthouse", "", "pixel-art", seed, False, 64, 64, 2, 5.0, 1, "dpmpp_2m", "none", 0.8),
                    *(None, 0.8, None, 1.0),
                    api_name="/generate",
                )
                assert info.startswith("**Seed"), info
    first, second = identity.issued
    assert model.tokens == [first, second, second, second]
    assert _claims(first)["aud"] == _claims(second)["aud"] == model.url  # the service's URL, no path


def test_requests_arriving_together_wait_for_one_token(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with stand_ins(3600, delay_s=0.5) as (identity, model):
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(_key_file(tmp_path, identity.url + "/token")))
        backend = from_environment(model.url, auth="id-token")
        together = threading.Barrier(4)

        def call(_: int) -> dict[str, Any]:
            together.wait()
            return backend.predict(BODY)

        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(call, range(4)))
    assert all(answer["predictions"][0]["seeds"] == [5] for answer in answers)
    assert len(identity.issued) == 1 and model.tokens == identity.issued * 4


def test_a_refused_token_is_replaced_on_the_next_request(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with stand_ins(3600) as (identity, model):
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(_key_file(tmp_path, identity.url + "/token")))
        backend = from_environment(model.url, auth="id-token")
        backend.predict(BODY)
        model.revoked.add(identity.issued[0])
        steps = list(generate(backend, CHOICES, sleep=lambda _: None))
        assert steps[-1][1].startswith("⚠️ The model's service refused the UI's identity")
        assert steps[-1][1].endswith("takes SDXL_AUTH=id-token): no valid ID token")
        backend.predict(BODY)
    assert len(identity.issued) == 2 and model.tokens == identity.issued


def test_without_any_identity_the_page_says_where_a_token_comes_from(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("GOOGLE_APPLICATION_CREDENTIALS", raising=False)
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{free_port()}")  # no metadata server answers there
    with stand_ins(3600) as (identity, model):
        steps = list(generate(from_environment(model.url, auth="id-token"), CHOICES, sleep=lambda _: None))
    images, info, _ = steps[-1]
    assert images == [] and info.startswith(f"⚠️ No ID token to call the model at {model.url}")
    assert "GOOGLE_APPLICATION_CREDENTIALS" in info and identity.issued == [] and model.tokens == []


def test_sdxl_auth_is_id_token_for_a_url_or_nothing() -> None:
    with pytest.raises(ValueError, match="SDXL_AUTH='access-token' is invalid"):
        from_environment("https://m.run.app", auth="access-token")
    with pytest.raises(ValueError, match="SDXL_AUTH=id-token needs SDXL_ENDPOINT to be the URL"):
        from_environment("projects/p/locations/us-central1/endpoints/1", auth="id-token")


def test_with_id_tokens_the_page_never_asks_health() -> None:
    # each page load asking would start a GPU instance of a service scaled to zero: the page is told instead
    with stand_ins(3600) as (_, model):
        assert from_environment(model.url).health() == {"status": "ready", "refiner": True}
        assert from_environment(model.url, auth="id-token").health() is None
    assert model.health_asked == 1
