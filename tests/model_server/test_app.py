"""The app with injected loaders (cog-style fakes), served by uvicorn on loopback."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from sdxl_server import logs
from sdxl_server.app import create_app
from sdxl_server.errors import ModelLoadError
from sdxl_server.generator import Generator
from sdxl_server.settings import Settings
from tests.model_server.rawhttp import connect, request
from tests.servers import Server, serve_app, server_process

SMALL = {
    "instances": [{"prompt": "a fox", "seed": 1}],
    "parameters": {"num_inference_steps": 2, "width": 64, "height": 64},
}


def settings(**overrides: object) -> Settings:
    return Settings(warmup=((64, 64),), **overrides)  # type: ignore[arg-type]


def test_a_failed_load_reports_failed_with_the_reason() -> None:
    def broken(_: Settings) -> Generator:
        raise ModelLoadError("could not download gs://b/m: Forbidden")

    with serve_app(create_app(settings(), load=broken)) as server:
        health = server.wait_until("failed", timeout=10)
        assert health.status_code == 503
        assert "Forbidden" in health.json()["reason"]
        predict = server.predict(SMALL)
        assert predict.status_code == 503 and "Forbidden" in predict.json()["error"]["message"]


def test_health_answers_at_once_while_the_model_loads(tiny_pipeline) -> None:
    release = threading.Event()

    def slow(_: Settings) -> Generator:
        release.wait(30)
        return Generator(tiny_pipeline)

    with serve_app(create_app(settings(), load=slow)) as server:
        assert server.health(timeout=1).json() == {"status": "loading"}  # Vertex AI's probe waits 10 s at most
        predict = server.predict(SMALL)
        assert predict.status_code == 503 and predict.headers["retry-after"] == "10"
        release.set()
        assert server.wait_until("ready", timeout=30).json()["model"] == "tiny"


def test_a_response_over_the_byte_limit_is_413_naming_the_fix(tiny_pipeline) -> None:
    app = create_app(settings(max_response_bytes=20_000), load=lambda _: Generator(tiny_pipeline))
    with serve_app(app) as server:
        server.wait_until("ready")
        body = {
            "instances": [{"prompt": "a fox", "seed": 1}],
            "parameters": {"num_inference_steps": 2, "width": 256, "height": 256, "output_format": "png"},
        }
        response = server.predict(body)
        assert response.status_code == 413
        message = response.json()["error"]["message"]
        assert "jpeg or webp" in message and "dedicated endpoint" in message
        body["parameters"].update(width=64, height=64, output_format="jpeg")  # type: ignore[attr-defined]
        assert server.predict(body).status_code == 200


def test_an_unexpected_error_is_500_with_a_request_id_and_no_internals(
    tiny_pipeline,
    capsys: pytest.CaptureFixture[str],
) -> None:
    class Exploding(Generator):
        calls = 0

        def generate(self, request, should_stop=lambda: False, adapters=()):
            if request.jobs[0].prompt != "warm-up":  # warm-up passes (a request per mode), then
                Exploding.calls += 1
            if Exploding.calls == 1:  # the first request breaks, the next one works
                raise KeyError("/secret/internal/path")
            return super().generate(request, should_stop)

    logs.configure()
    with serve_app(create_app(settings(), load=lambda _: Exploding(tiny_pipeline))) as server:
        server.wait_until("ready")
        response = server.predict(SMALL)
        assert response.status_code == 500
        error = response.json()["error"]
        assert response.headers["x-request-id"] in error["message"]
        assert "secret" not in response.text and "KeyError" not in response.text
        assert server.predict(SMALL).status_code == 200
    assert "/secret/internal/path" in capsys.readouterr().out  # the log keeps what the client may not see


def test_one_json_log_line_per_request_without_the_prompt(tiny_pipeline, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure()
    with serve_app(create_app(settings(), load=lambda _: Generator(tiny_pipeline))) as server:
        server.wait_until("ready")
        assert server.predict({**SMALL, "instances": [{"prompt": "my secret prompt", "seed": 1}]}).status_code == 200
        assert server.predict({"instances": []}).status_code == 400
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    predicts = [line for line in lines if line["message"] == "predict"]
    assert [line["status"] for line in predicts] == [200, 400]
    ok = predicts[0]
    assert {"request_id", "latency_ms", "steps", "images", "bytes", "prompt_chars", "prompt_sha256"} <= ok.keys()
    assert ok["severity"] == "INFO" and ok["steps"] == 2
    assert "my secret prompt" not in json.dumps(lines)


def test_sdxl_log_prompts_puts_the_prompt_in_the_log(tiny_pipeline, capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure()
    with serve_app(create_app(settings(log_prompts=True), load=lambda _: Generator(tiny_pipeline))) as server:
        server.wait_until("ready")
        server.predict({**SMALL, "instances": [{"prompt": "an open prompt", "seed": 1}]})
    assert "an open prompt" in capsys.readouterr().out


def test_the_process_reports_a_source_that_cannot_load(tmp_path: Path) -> None:
    with server_process({"SDXL_MODEL": "nobody/no-such-model"}, tmp_path) as server:
        health = server.wait_until("failed", timeout=60)
        assert "Hugging Face Hub" in health.json()["reason"]
        assert health.status_code == 503


def test_the_process_refuses_a_bad_setting_in_one_line(tmp_path: Path) -> None:
    with server_process({"SDXL_TIME_LIMIT": "soon"}, tmp_path) as server:
        assert server.process is not None and server.process.wait(timeout=30) == 2
        assert "SDXL_TIME_LIMIT='soon' is invalid" in server.log()
        assert "Traceback" not in server.log()


def test_server_fixture_type() -> None:
    assert Server(url="http://127.0.0.1:1").predict_route == "/predict"


def test_an_error_outside_predict_is_a_json_500_without_internals(tiny_pipeline) -> None:
    class BrokenHealth(Generator):
        warmed = False

        def warm_up(self, sizes):
            super().warm_up(sizes)
            self.warmed = True

        @property
        def optimize_level(self):  # health reads it once the model is ready
            if self.warmed:
                raise KeyError("/secret/internal/path")
            return "none"

        @optimize_level.setter
        def optimize_level(self, value) -> None:
            pass

    with serve_app(create_app(settings(), load=lambda _: BrokenHealth(tiny_pipeline))) as server:
        deadline = time.monotonic() + 60
        while (response := server.health()).status_code == 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert response.status_code == 500
        assert response.headers["content-type"] == "application/json"
        assert response.json()["error"]["code"] == 500 and "request id" in response.json()["error"]["message"]
        assert "secret" not in response.text


def test_a_client_that_leaves_mid_generation_is_logged_499_with_the_steps_it_ran(
    tiny_pipeline, capsys: pytest.CaptureFixture[str]
) -> None:
    started = threading.Event()

    class Slow(Generator):
        def generate(self, request, should_stop=lambda: False, adapters=()):
            def tell() -> bool:
                started.set()
                return should_stop()

            return super().generate(request, tell)

    logs.configure()
    with serve_app(create_app(settings(), load=lambda _: Slow(tiny_pipeline))) as server:
        server.wait_until("ready")
        started.clear()  # set by the warm-up
        body = {**SMALL, "parameters": {"num_inference_steps": 150, "width": 256, "height": 256}}
        with connect(server.url) as sock:
            sock.sendall(request("POST", "/predict", json.dumps(body).encode()))
            assert started.wait(60)  # it is running: now the client goes away
        deadline = time.monotonic() + 60
        while server.health().json()["queue"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.predict(SMALL).status_code == 200
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    predicts = [line for line in lines if line["message"] == "predict"]
    assert [line["status"] for line in predicts] == [499, 200]
    assert "client closed request" in predicts[0]["error"]
    assert 1 <= predicts[0]["steps_run"] < 150
    assert predicts[1]["steps_run"] == 2
