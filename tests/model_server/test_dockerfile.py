"""The image cannot be built here (no Docker engine): check that what it copies and runs exists."""

from __future__ import annotations

import fnmatch
import re
import tomllib

from tests.servers import ROOT

CONTEXT = ROOT / "containers" / "model"
DOCKERFILE = (CONTEXT / "Dockerfile").read_text()


def instructions() -> list[tuple[str, str]]:
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    return [
        (line.split()[0].upper(), line.split(maxsplit=1)[1])
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def test_every_copied_path_exists_and_is_not_docker_ignored() -> None:
    ignored = [
        p.strip() for p in (CONTEXT / ".dockerignore").read_text().splitlines() if p.strip() and not p.startswith("#")
    ]
    copies = [args.split()[:-1] for op, args in instructions() if op == "COPY"]
    assert copies
    for sources in copies:
        for source in sources:
            assert (CONTEXT / source).exists(), source
            assert not any(fnmatch.fnmatch(source, pattern) for pattern in ignored), source


def test_it_runs_the_server_as_a_non_root_user_on_the_vertex_port() -> None:
    ops = instructions()
    assert ops[0][0] == "FROM" and "cuda" in ops[0][1]
    assert ("CMD", '["python", "-m", "sdxl_server"]') in ops
    assert ("EXPOSE", "8080") in ops
    users = [args for op, args in ops if op == "USER"]
    assert users and users[-1] != "root"
    assert (CONTEXT / "sdxl_server" / "__main__.py").is_file()
    assert (CONTEXT / "sdxl_server" / "fetch.py").is_file()  # the bake step's module
    assert "ARG SDXL_WEIGHTS" in DOCKERFILE


def test_every_dependency_is_pinned_in_the_image() -> None:
    pins = {
        line.split("==")[0].lower(): line.split("==")[1]
        for line in (CONTEXT / "requirements.txt").read_text().splitlines()
        if line and not line.startswith("#")
    }
    assert all(pins.values())
    project = tomllib.loads((CONTEXT / "pyproject.toml").read_text())["project"]
    wanted = [re.split(r"[<>=\[ ]", dep)[0].lower() for dep in project["dependencies"]]
    wanted += [re.split(r"[<>=\[ ]", dep)[0].lower() for dep in project["optional-dependencies"]["gcs"]]
    for name in wanted:
        assert name == "torch" or name in pins, f"{name} is not pinned in requirements.txt"
    assert re.search(r"torch==\d+\.\d+\.\d+", DOCKERFILE)


def test_package_data_ships_the_configs_and_styles() -> None:
    package = CONTEXT / "sdxl_server"
    assert (package / "styles.json").is_file()
    for component in ("unet", "vae", "text_encoder", "text_encoder_2", "scheduler"):
        assert (package / "configs" / "sdxl-base-1.0" / component).is_dir()
    data = tomllib.loads((CONTEXT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "styles.json" in data["sdxl_server"] and any("configs" in p for p in data["sdxl_server"])
