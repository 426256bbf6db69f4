"""The UI as an API (gradio_client), its backends against real servers, and its image."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from sdxl_ui.backend import BackendError, HttpBackend, VertexBackend, from_environment
from sdxl_ui.styles import STYLES
from tests.conftest import Cli
from tests.emulator_fixtures import Emulator
from tests.servers import ROOT, Server
from tests.ui.conftest import ui_process

BODY = {
    "instances": [{"prompt": "a fox", "seed": 3}],
    "parameters": {"num_inference_steps": 2, "width": 64, "height": 64},
}


def test_gradio_client_calls_generate(plain_server: Server, tmp_path: Path) -> None:
    from gradio_client import Client

    from sdxl_server import schema

    with ui_process(plain_server.url, tmp_path, SDXL_UI_MAX_IMAGES="3") as url:
        client = Client(url, verbose=False, download_files=str(tmp_path / "downloads"))
        gallery, info, seed = client.predict(
            *("a lighthouse", "", "pixel-art", 7, False, 64, 64, 2, 5.0, 2, "dpmpp_2m", "none", 0.8),
            *(None, 0.8, None, 1.0),  # image to image and inpainting: unused in text to image
            api_name="/generate",
        )
        sliders = {
            c["props"]["label"]: c["props"]["maximum"]
            for c in httpx.get(f"{url}/config", timeout=10).json()["components"]
            if c.get("type") == "slider"
        }
    # the sliders stop where the server does; the image count at what sdxlctl passed ([model] max_images)
    assert sliders == {
        "Width": schema.MAX_SIDE,
        "Height": schema.MAX_SIDE,
        "Steps": schema.MAX_STEPS,
        "Guidance": schema.MAX_GUIDANCE,
        "Images": 3,
        "Strength": 1.0,  # image to image's and inpainting's: the server takes 0 < strength <= 1
        "High noise fraction": 0.95,
        "LoRA scale": 2.0,  # the server takes -4..4; the page offers -2..2
    }
    assert len(gallery) == 2
    assert all(Path(item["image"]).is_file() for item in gallery)
    assert "Seed 7, 8" in info and seed == 7


def test_the_http_backend_speaks_the_contract(plain_server: Server) -> None:
    answer = HttpBackend(plain_server.url).predict(BODY)
    assert answer["predictions"][0]["seeds"] == [3]
    with pytest.raises(BackendError, match=r"refused: parameters\.num_inference_steps"):
        HttpBackend(plain_server.url).predict({**BODY, "parameters": {"num_inference_steps": 0}})


def test_the_vertex_backend_calls_the_endpoint(cli: Cli, emulator: Emulator) -> None:
    env = emulator.env()
    for step in ("build", "upload", "deploy"):
        assert cli(step, env=env).code == 0
    endpoint = emulator.resources()["endpoints"][0]["name"]
    backend = from_environment(endpoint, api_base=emulator.url)
    assert isinstance(backend, VertexBackend)
    assert backend.predict(BODY)["predictions"][0]["seeds"] == [3]
    emulator.fault(path=r":predict$", code=429, status="RESOURCE_EXHAUSTED", message="queue full")
    with pytest.raises(BackendError, match="busy"):
        backend.predict(BODY)


def test_sdxl_endpoint_must_be_a_url_or_an_endpoint_name() -> None:
    with pytest.raises(ValueError, match="SDXL_ENDPOINT"):
        from_environment("my-endpoint")


def test_the_styles_are_the_servers() -> None:
    server = json.loads((ROOT / "containers/model/sdxl_server/styles.json").read_text())["styles"]
    assert [key for key, _ in STYLES] == ["none", *(s["id"] for s in server)]
    assert [name for _, name in STYLES][1:] == [s["name"] for s in server]


def test_local_ui_deploy_status_and_teardown(cli: Cli, tmp_path: Path) -> None:
    from sdxlctl.local import processes as local
    from sdxlctl.state import StateStore
    from tests.servers import free_port

    env = {"SDXLCTL_LOCAL_SERVER_PORT": str(free_port()), "SDXLCTL_LOCAL_UI_PORT": str(free_port())}
    assert cli("ui-deploy", env=env).code == 1  # the UI needs the model server first
    assert cli("deploy", env=env).code == 0
    try:
        ui = cli("ui-deploy", env=env)
        assert ui.code == 0, ui.err
        assert "UI started at" in ui.err and "model server" not in ui.err  # not the server's message (#14 B.3)
        assert ui.out.strip() == f"http://127.0.0.1:{env['SDXLCTL_LOCAL_UI_PORT']}"
        rows = {row["kind"]: row for row in json.loads(cli("status", "--json", env=env).out)["resources"]}
        assert rows["local-ui"]["state"] == "ready" and rows["local-server"]["state"] == "ready"
        pids = [r.details["pid"] for r in StateStore(tmp_path / ".sdxlctl").read().of("sdxl").values()]
    finally:
        assert cli("teardown", "--yes", env=env).code == 0
    assert all(not local.is_running(pid, "sdxl_") or local.is_zombie(pid) for pid in pids)


def test_the_ui_image_copies_what_exists_and_runs_as_a_user_on_port() -> None:
    context = ROOT / "containers" / "ui"
    dockerfile = (context / "Dockerfile").read_text()
    for sources in re.findall(r"^COPY\s+(.+)\s+\S+$", dockerfile, flags=re.M):
        for source in sources.split():
            assert (context / source).exists(), source
    assert 'CMD ["python", "-m", "sdxl_ui"]' in dockerfile
    assert "USER app" in dockerfile and "GRADIO_ANALYTICS_ENABLED=False" in dockerfile
    assert "SDXL_UI_HOST=0.0.0.0" in dockerfile and "PORT=8080" in dockerfile
    pins = [line for line in (context / "requirements.txt").read_text().splitlines() if line and line[0] != "#"]
    assert pins and all("==" in line for line in pins)
    source = (context / "sdxl_ui" / "__main__.py").read_text()
    assert "share=False" in source
