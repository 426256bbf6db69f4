"""The emulator's identity, through google-auth itself: ID tokens from a service-account key file (the OAuth
token endpoint) and from Cloud Run's metadata server (GCE_METADATA_HOST with a path prefix, read by google-auth
at import, hence a subprocess), verified as Cloud Run's front end verifies them."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.emulator import identity
from tests.emulator.app import create_app
from tests.emulator.core import DEPLOYER, ApiError, World
from tests.servers import Server, serve_app

PROJECT, REGION = "demo-project", "europe-west4"
AUDIENCE = "http://127.0.0.1:9/"  # a service URL: nothing listens, the token only names it


@pytest.fixture
def emulated() -> Iterator[tuple[Server, World]]:
    world = World(polls_to_finish=1)
    with serve_app(create_app(world)) as server:
        yield server, world


def _fetch(key_file: Path, audience: str) -> str:
    """google.oauth2.id_token.fetch_id_token with GOOGLE_APPLICATION_CREDENTIALS = key_file."""
    import google.auth.transport.requests
    import google.oauth2.id_token

    saved = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
    os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = str(key_file)
    try:
        return str(google.oauth2.id_token.fetch_id_token(google.auth.transport.requests.Request(), audience))
    finally:
        if saved is None:
            del os.environ["GOOGLE_APPLICATION_CREDENTIALS"]
        else:
            os.environ["GOOGLE_APPLICATION_CREDENTIALS"] = saved


def test_a_key_files_token_verifies_for_its_audience_only(emulated: tuple[Server, World], tmp_path: Path) -> None:
    import google.auth.transport.requests
    import google.oauth2.id_token

    server, world = emulated
    key_file = identity.write_key_file(tmp_path / "deployer.json", DEPLOYER, server.url + identity.TOKEN_PATH)
    token = _fetch(key_file, AUDIENCE)

    assert identity.verify(world, token, AUDIENCE) == DEPLOYER
    assert identity.verify(world, token, AUDIENCE.rstrip("/")) == DEPLOYER  # Cloud Run takes the URL either way
    with pytest.raises(ApiError) as refused:
        identity.verify(world, token, "http://127.0.0.1:10")
    assert refused.value.code == 401
    assert "audience" in refused.value.message

    # google-auth's own verification against the certificates the emulator serves, as a client would check
    claims = google.oauth2.id_token.verify_token(
        token, google.auth.transport.requests.Request(), AUDIENCE, certs_url=server.url + "/oauth2/v1/certs"
    )
    assert claims["iss"] == "https://accounts.google.com"
    assert (claims["email"], claims["email_verified"]) == (DEPLOYER, True)
    assert claims["exp"] - claims["iat"] == 3600


def test_expired_tampered_and_access_tokens_are_refused(emulated: tuple[Server, World]) -> None:
    _, world = emulated
    expired = identity.issue(world, DEPLOYER, AUDIENCE, lifetime_s=-60)
    with pytest.raises(ApiError, match="expired") as refused:
        identity.verify(world, expired, AUDIENCE)
    assert refused.value.code == 401

    head, body, signature = identity.issue(world, DEPLOYER, AUDIENCE).split(".")
    forged = identity._segment(body)
    forged["email"] = "someone@else.example"
    body = base64.urlsafe_b64encode(json.dumps(forged).encode()).rstrip(b"=").decode()
    for token in (f"{head}.{body}.{signature}", "ya29.an-access-token", ""):
        with pytest.raises(ApiError) as refused:
            identity.verify(world, token, AUDIENCE)
        assert refused.value.code == 401


def test_the_token_endpoint_refuses_a_key_google_never_issued(emulated: tuple[Server, World], tmp_path: Path) -> None:
    from google.auth import exceptions

    server, _ = emulated
    known = identity.write_key_file(tmp_path / "known.json", DEPLOYER, server.url + identity.TOKEN_PATH)
    info = json.loads(known.read_text())
    stranger = identity._new_key("stranger")  # a key of the right shape that write_key_file never registered
    info.update(private_key_id=stranger.kid, private_key=stranger.private_pem)
    (tmp_path / "stranger.json").write_text(json.dumps(info))
    with pytest.raises(exceptions.RefreshError, match="invalid_grant"):
        _fetch(tmp_path / "stranger.json", AUDIENCE)

    info["private_key_id"] = json.loads(known.read_text())["private_key_id"]  # a known id, the wrong key
    (tmp_path / "forged.json").write_text(json.dumps(info))
    with pytest.raises(exceptions.RefreshError, match="invalid_grant"):
        _fetch(tmp_path / "forged.json", AUDIENCE)

    answer = httpx.post(server.url + "/token", data={"grant_type": "password", "assertion": "x"})
    assert (answer.status_code, answer.json()["error"]) == (400, "unsupported_grant_type")


def _deploy(server: Server, service_id: str, account: str | None) -> str:
    """A plain service through google-cloud-run (as the UI's is), running as `account`; its full name."""
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import run_v2

    if account:
        answer = httpx.post(
            f"{server.url}/v1/projects/{PROJECT}/serviceAccounts", json={"accountId": account.split("@")[0]}
        )
        answer.raise_for_status()
    client = run_v2.ServicesClient(
        credentials=AnonymousCredentials(), transport="rest", client_options={"api_endpoint": server.url}
    )
    template = run_v2.RevisionTemplate(
        service_account=account or "", containers=[run_v2.Container(image="europe-west4-docker.pkg.dev/p/r/ui:1")]
    )
    made = client.create_service(
        parent=f"projects/{PROJECT}/locations/{REGION}",
        service=run_v2.Service(template=template),
        service_id=service_id,
    ).result(timeout=30)
    return str(made.name)


# What a process on a Cloud Run instance does: google-auth finds the metadata server (ping) and asks it.
ON_THE_INSTANCE = """
import json, google.auth, google.auth.transport.requests as r, google.oauth2.id_token as t
token = t.fetch_id_token(r.Request(), {audience!r})
credentials, project = google.auth.default()
credentials.refresh(r.Request())
print(json.dumps({{"token": token, "project": project, "email": credentials.service_account_email}}))
"""


def _on_instance(server: Server, service: str) -> dict[str, Any]:
    host = identity.metadata_host(server.url, service)
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_APPLICATION_CREDENTIALS"}
    env.update(GCE_METADATA_HOST=host, GCE_METADATA_IP=host)
    done = subprocess.run(
        [sys.executable, "-c", ON_THE_INSTANCE.format(audience=AUDIENCE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return dict(json.loads(done.stdout))


def test_the_metadata_server_gives_the_services_account_through_google_auth(emulated: tuple[Server, World]) -> None:
    server, world = emulated
    account = f"sdxl-ui@{PROJECT}.iam.gserviceaccount.com"
    own = _on_instance(server, _deploy(server, "sdxl-ui", account))
    assert identity.verify(world, own["token"], AUDIENCE) == account
    assert (own["email"], own["project"]) == (account, PROJECT)

    _deploy(server, "plain", None)
    default = _on_instance(server, "plain")  # by its id too; no account of its own: the default compute one
    assert (
        identity.verify(world, default["token"], AUDIENCE)
        == f"{world.project_number}-compute@developer.gserviceaccount.com"
    )


def test_the_metadata_server_wants_its_header(emulated: tuple[Server, World]) -> None:
    server, _ = emulated
    name = _deploy(server, "sdxl-ui", None)
    root = f"{server.url}/_metadata/{name}"
    identity_url = f"{root}/computeMetadata/v1/instance/service-accounts/default/identity"
    assert httpx.get(root).status_code == 403
    assert httpx.get(identity_url, params={"audience": AUDIENCE}).status_code == 403
    flavour = {"Metadata-Flavor": "Google"}
    assert httpx.get(root, headers=flavour).headers["metadata-flavor"] == "Google"
    assert httpx.get(identity_url, headers=flavour).status_code == 400  # no audience
    assert httpx.get(f"{server.url}/_metadata/nothing-here", headers=flavour).status_code == 404
