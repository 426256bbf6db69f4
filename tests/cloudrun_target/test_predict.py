"""cloudrun.predict against a loopback stand-in for Cloud Run's front end: it demands an ID token for its own
URL (from a real token endpoint, through google-auth), holds health through a cold start, and answers 429,
503, 401, 403, 504 and answers past 32 MiB as Cloud Run does."""

from __future__ import annotations

import asyncio
import base64
import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from sdxlctl.config import Config, load_config
from sdxlctl.errors import DeployError, PredictError
from sdxlctl.gcp import idtoken
from sdxlctl.state import Resource, StateStore
from tests.cloudrun_target.test_idtoken import Issuer
from tests.servers import free_port, serve_app

# The module, not the package's predict of the same name (sdxlctl.cloudrun re-exports the function).
cloudrun_predict = importlib.import_module("sdxlctl.cloudrun.predict")
ANSWER = {
    "predictions": [
        {"images": [base64.b64encode(b"png").decode()], "seeds": [7], "output_format": "png", "width": 64, "height": 64}
    ]
}
BODY = {"instances": [{"prompt": "a fox"}], "parameters": {}}
CALLER = "caller@demo-project.iam.gserviceaccount.com"


@dataclass
class Front:
    """Cloud Run's front end for one service: ID token for its URL, then invoke permission, then the instance."""

    issuer: Issuer
    url: str = ""
    invokers: set[str] = field(default_factory=lambda: {CALLER})
    health: list[Any] = field(default_factory=list)  # what the next health calls get: ("hold", s) or (status, body)
    answers: list[tuple[int, Any, dict[str, str]]] = field(default_factory=list)  # the next predict answers
    seen: list[str] = field(default_factory=list)
    revoked: int = 0  # how many of the next requests get 401 whatever their token (a token revoked)
    audience: str = ""  # what the front end takes tokens for: its own URL unless set
    uri: str | None = None  # what Cloud Run's API reports as the service's uri: its own URL unless set

    def app(self) -> object:
        from starlette.applications import Starlette
        from starlette.requests import Request
        from starlette.responses import JSONResponse, Response, StreamingResponse
        from starlette.routing import Route

        def allowed(request: Request) -> Response | None:
            token = request.headers.get("authorization", "").removeprefix("Bearer ")
            try:
                if self.revoked:
                    self.revoked -= 1
                    raise ValueError("revoked")
                email = self.issuer.verify(token, self.audience or self.url)
            except ValueError:
                return Response("<html>401 Unauthorized</html>", 401, media_type="text/html")
            if email not in self.invokers:
                return Response("<html>403 Forbidden</html>", 403, media_type="text/html")
            return None

        async def health(request: Request) -> Response:
            self.seen.append("health")
            refused = allowed(request)
            if refused is not None:
                return refused
            step: Any = self.health.pop(0) if self.health else (200, {"status": "ready"})
            if step[0] == "hold":  # Cloud Run holds the request while it starts an instance
                await asyncio.sleep(step[1])
                return JSONResponse({"status": "ready"})
            return JSONResponse(step[1], step[0])

        async def predict(request: Request) -> Response:
            self.seen.append("predict")
            refused = allowed(request)
            if refused is not None:
                return refused
            assert await request.json() == BODY
            status, body, headers = self.answers.pop(0) if self.answers else (200, ANSWER, {})
            if isinstance(body, dict):
                return JSONResponse(body, status, headers=headers)
            if not isinstance(body, str | bytes):  # a generator: sent chunked, without Content-Length
                return StreamingResponse(body, status, headers=headers, media_type="application/json")
            return Response(body, status, headers=headers, media_type="text/html")

        async def service(request: Request) -> Response:  # Cloud Run's API (v2 REST): services.get
            name = request.path_params["name"]
            if not name.endswith("/services/sdxl-server"):
                return JSONResponse({"error": {"code": 404, "message": "not found", "status": "NOT_FOUND"}}, 404)
            return JSONResponse({"name": name, "uri": self.url if self.uri is None else self.uri})

        return Starlette(
            routes=[
                Route("/health", health),
                Route("/predict", predict, methods=["POST"]),
                Route("/v2/{name:path}", service),
            ]
        )


@pytest.fixture
def issuer(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Issuer]:
    issuer = Issuer()
    monkeypatch.setenv("GCE_METADATA_IP", f"127.0.0.1:{free_port()}")
    with serve_app(issuer.app()) as server:
        issuer.url = server.url
        monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(issuer.key_file(tmp_path / "key.json", CALLER)))
        idtoken.forget()
        yield issuer
    idtoken.forget()


@pytest.fixture
def front(issuer: Issuer) -> Iterator[Front]:
    front = Front(issuer)
    with serve_app(front.app()) as server:
        front.url = server.url
        yield front


def deployment(tmp_path: Path, url: str, api: str = "") -> tuple[Config, StateStore]:
    """A cloudrun config (an http:// endpoint: emulated, so the key file's token) whose state records `url`;
    `api` answers Cloud Run's services.get (the front end's own stand-in), else nothing does."""
    path = tmp_path / "sdxlctl.toml"
    path.write_text('target = "cloudrun"\n[gcp]\nproject = "demo-project"\nregion = "europe-west4"\n')
    config = load_config(path, {"SDXLCTL_GCP_API_ENDPOINT": api or f"http://127.0.0.1:{free_port()}"})
    store = StateStore(tmp_path / ".sdxlctl")
    store.record(config.name, Resource(kind="server-service", name="sdxl-server", target="cloudrun", url=url))
    return config, store


def ask(front: Front, tmp_path: Path, url: str | None = None) -> tuple[dict[str, Any], list[str], list[float]]:
    """Predict with `url` recorded in the state (the front end's URL unless given): sent where Cloud Run says."""
    config, store = deployment(tmp_path, url or front.url, api=front.url)
    said: list[str] = []
    slept: list[float] = []
    answer, where = cloudrun_predict.predict(
        config, store, BODY, timeout_s=30, progress=said.append, sleep=slept.append
    )
    assert where == front.url
    return answer, said, slept


def test_a_warm_service_answers_without_a_cold_start_phase(front: Front, tmp_path: Path) -> None:
    answer, said, _ = ask(front, tmp_path)
    assert answer == ANSWER
    assert front.seen == ["health", "predict"]
    assert not any("cold start" in line for line in said)


def test_a_held_health_is_shown_as_a_cold_start(front: Front, tmp_path: Path) -> None:
    """Health that does not answer within the first short wait: Cloud Run is starting an instance."""
    front.health = [("hold", cloudrun_predict.FIRST_HEALTH_S + 0.5)]
    answer, said, _ = ask(front, tmp_path)
    assert answer == ANSWER
    assert said[0] == "starting an instance (cold start)"
    assert front.seen == ["health", "health", "predict"]


def test_a_loading_server_is_polled_until_ready(front: Front, tmp_path: Path) -> None:
    front.health = [(503, {"status": "loading"}), (503, {"status": "loading"})]
    answer, said, slept = ask(front, tmp_path)
    assert answer == ANSWER
    assert said[0] == "starting an instance (cold start)"
    assert all(line.startswith("starting an instance (cold start, ") for line in said[1:]) and len(said) == 3
    assert slept == [cloudrun_predict.HEALTH_PAUSE_S] * 2
    assert front.seen == ["health"] * 3 + ["predict"]


def test_a_server_that_failed_to_load_is_said_at_once(front: Front, tmp_path: Path) -> None:
    front.health = [(503, {"status": "failed", "reason": "SDXL_MODEL gs://b/m: not found"})]
    with pytest.raises(DeployError, match="failed to start: SDXL_MODEL gs://b/m: not found"):
        ask(front, tmp_path)
    assert "predict" not in front.seen


def test_429_and_503_are_retried_with_backoff_and_retry_after(front: Front, tmp_path: Path) -> None:
    front.answers = [
        (429, {"error": {"code": 429, "message": "queue full"}}, {"Retry-After": "3"}),
        (503, "<html>Service Unavailable</html>", {}),
        (503, "<html>Service Unavailable</html>", {}),
    ]
    answer, said, slept = ask(front, tmp_path)
    assert answer == ANSWER
    assert slept == [3.0, 2.0, 4.0]  # Retry-After, then the backoff doubling from where it stood
    assert said == [
        "the service answered 429 (busy): trying again in 3 s",
        "the service answered 503 (not ready): trying again in 2 s",
        "the service answered 503 (not ready): trying again in 4 s",
    ]
    assert front.seen.count("predict") == 4


def test_retries_stop_after_a_bounded_time(front: Front, tmp_path: Path) -> None:
    front.answers = [(503, "<html>Service Unavailable</html>", {})] * 40
    with pytest.raises(PredictError, match="answered 503 for over 120 s") as caught:
        ask(front, tmp_path)
    assert caught.value.hint
    assert front.seen.count("predict") < 12


def test_an_account_without_run_invoker_is_told_the_role(front: Front, tmp_path: Path) -> None:
    front.invokers = set()
    with pytest.raises(PredictError, match=r"403\): your account needs roles/run.invoker on sdxl-server"):
        ask(front, tmp_path)
    assert front.seen == ["health"]  # before any cold-start wait or prediction


def test_a_token_for_another_audience_is_a_401_said_plainly(front: Front, tmp_path: Path) -> None:
    """The token is for the URL sdxlctl calls; a front end that is not at that URL refuses it."""
    front.audience = front.url.replace("127.0.0.1", "localhost")
    with pytest.raises(PredictError, match=r"refused the ID token \(401\)") as caught:
        ask(front, tmp_path)
    assert "GOOGLE_APPLICATION_CREDENTIALS" in (caught.value.hint or "")


def test_a_cached_token_the_service_refuses_is_replaced_once(front: Front, tmp_path: Path) -> None:
    idtoken.id_token(front.url, emulated=True)  # cached
    front.revoked = 1
    answer, _, _ = ask(front, tmp_path)
    assert answer == ANSWER
    assert front.issuer.asked == [front.url, front.url]  # the refused one, then a fresh one
    assert front.seen == ["health", "health", "predict"]


def test_cloud_runs_504_names_the_request_timeout(front: Front, tmp_path: Path) -> None:
    front.answers = [(504, "<html>upstream request timeout</html>", {})]
    with pytest.raises(PredictError, match=r"longer than \[cloudrun\] timeout_s \(600 s\)"):
        ask(front, tmp_path)


@pytest.mark.parametrize(
    "answer",
    [
        (200, b"x" * (32 * 2**20 + 1), {}),  # an answer Cloud Run would not pass on
        (500, "<html>Response size was too large</html>", {}),  # Cloud Run's own page for one
    ],
    ids=["over-32-MiB", "front-end-refused"],
)
def test_an_answer_past_32_mib_is_a_clear_error(front: Front, tmp_path: Path, answer: Any) -> None:
    front.answers = [answer]
    with pytest.raises(PredictError, match="32 MiB response limit") as caught:
        ask(front, tmp_path)
    assert "fewer images" in (caught.value.hint or "") and "jpeg" in (caught.value.hint or "")


def test_the_servers_own_413_gets_cloud_runs_hint_and_keeps_its_field(front: Front, tmp_path: Path) -> None:
    from sdxlctl.client import Refused

    message = "the answer (40 MB) is over SDXL_MAX_RESPONSE_BYTES"
    front.answers = [(413, {"error": {"code": 413, "message": message, "field": "parameters.num_images"}}, {})]
    with pytest.raises(Refused) as caught:
        ask(front, tmp_path)
    assert caught.value.field == "parameters.num_images" and caught.value.status == 413
    assert "dedicated endpoint" not in (caught.value.hint or "") and "fewer images" in (caught.value.hint or "")


def test_nothing_recorded_and_nothing_found_says_deploy(tmp_path: Path, emulator: Any) -> None:
    """No state and no labelled service in the project: found by label (Cloud Run's list), then told to deploy."""
    path = tmp_path / "sdxlctl.toml"
    path.write_text('target = "cloudrun"\n')
    env = emulator.env(SDXLCTL_TARGET="cloudrun")
    config = load_config(path, {k: v for k, v in env.items() if k.startswith("SDXLCTL_")})
    with pytest.raises(DeployError, match="no Cloud Run service sdxl-server") as caught:
        cloudrun_predict.predict(config, StateStore(tmp_path / ".sdxlctl"), BODY, timeout_s=5)
    assert caught.value.hint == "run `sdxlctl deploy` first"


def test_predict_through_the_emulator_after_scale_to_zero(cli: Any, emulator: Any, tmp_path: Path) -> None:
    """End to end: deployed with the CLI, then predicted on the service's own listener, which checks the
    deployer's ID token for its URL and starts an instance for the first request after idle."""
    env = emulator.env(SDXLCTL_TARGET="cloudrun")
    for step in ("build", "deploy"):
        result = cli(step, env=env)
        assert result.code == 0, (step, result.err)
    assert emulator.instances("sdxl-server") == 0  # min instances 0: nothing runs before a request
    first = cli("predict", "a red fox", "-o", "fox.png", "--seed", "3", env=env)
    assert first.code == 0, first.err
    assert (tmp_path / "fox.png").read_bytes().startswith(b"\x89PNG")
    assert emulator.instance_starts("sdxl-server") == 1
    emulator.scale_to_zero("sdxl-server")
    assert emulator.instances("sdxl-server") == 0
    again = cli("predict", "a red fox", "-o", "fox2.png", "--seed", "3", env=env)
    assert again.code == 0, again.err
    assert emulator.instance_starts("sdxl-server") == 2  # the first request after idle started one
    assert (tmp_path / "fox2.png").read_bytes() == (tmp_path / "fox.png").read_bytes()
    # Another account, without roles/run.invoker on the service: Cloud Run's 403, said as the role to grant.
    stranger = str(emulator.key_file("stranger@demo-project.iam.gserviceaccount.com"))
    refused = cli("predict", "a red fox", "-o", "fox3.png", env={**env, "GOOGLE_APPLICATION_CREDENTIALS": stranger})
    assert refused.code == 1 and "roles/run.invoker on sdxl-server" in refused.err, refused.err
    assert not (tmp_path / "fox3.png").exists()
