"""The images cannot be built here (no Docker engine): check that what they copy and run exists, and that
what they install is pinned (base images by digest, packages by hash)."""

from __future__ import annotations

import fnmatch
import re
import tomllib
from pathlib import Path

import pytest

from tests.servers import ROOT

CONTEXT = ROOT / "containers" / "model"
DOCKERFILE = (CONTEXT / "Dockerfile").read_text()
CONTEXTS = [ROOT / "containers" / "model", ROOT / "containers" / "ui"]
FROM = re.compile(r"^FROM\s+(?P<image>[\w./-]+):(?P<tag>[\w.-]+)@sha256:(?P<digest>[0-9a-f]{64})(\s+AS\s+\w+)?$", re.I)


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


def pins(path: Path) -> dict[str, str]:
    """`name==version` lines of a requirements file (comments and options aside), names normalised."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line and not line.startswith("-"):
            name, version = line.split(";")[0].split("==")
            found[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    return found


def locked(path: Path) -> dict[str, tuple[str, list[str]]]:
    """requirements.lock as name -> (version, hashes); one entry per requirement, continuations joined."""
    entries: dict[str, tuple[str, list[str]]] = {}
    for entry in re.sub(r"\\\n", " ", path.read_text()).splitlines():
        entry = entry.strip()
        if not entry or entry.startswith("#"):
            continue
        requirement, *options = (part.strip() for part in re.split(r"\s--", entry))
        assert "==" in requirement, f"{path.name}: {entry!r} is not pinned with =="
        name, version = requirement.split(";")[0].split("==")
        hashes = [o.removeprefix("hash=") for o in options if o.startswith("hash=")]
        assert len(hashes) == len(options), f"{path.name}: {name} has options other than --hash: {options}"
        entries[re.sub(r"[-_.]+", "-", name.strip().lower())] = (version.strip(), hashes)
    return entries


@pytest.mark.parametrize("context", CONTEXTS, ids=lambda c: c.name)
def test_base_images_are_pinned_by_digest_with_the_tag_kept(context: Path) -> None:
    lines = [line.strip() for line in (context / "Dockerfile").read_text().splitlines()]
    bases = [line for line in lines if line.upper().startswith("FROM ")]
    assert bases
    for base in bases:
        assert FROM.match(base), f"{context.name}: {base!r} is not image:tag@sha256:<64 hex>"


@pytest.mark.parametrize("context", CONTEXTS, ids=lambda c: c.name)
def test_every_package_is_installed_from_the_lock_by_hash(context: Path) -> None:
    dockerfile = (context / "Dockerfile").read_text()
    assert "COPY requirements.lock /tmp/requirements.lock" in dockerfile
    assert "--require-hashes -r /tmp/requirements.lock" in dockerfile
    installs = re.findall(r"pip install ([^&\n]+)", re.sub(r"\\\n", " ", dockerfile))
    for install in installs:  # nothing else from an index but torch, whose index the lock cannot reach
        own = "--no-deps --no-build-isolation /src" in install  # build isolation would fetch setuptools
        assert "--require-hashes" in install or own or "torch==" in install, install
    assert any("--no-build-isolation /src" in install for install in installs)
    assert "setuptools" in locked(context / "requirements.lock")
    lock = locked(context / "requirements.lock")
    assert lock
    for name, (version, hashes) in lock.items():
        assert re.fullmatch(r"[\w.+!-]+", version), f"{name}=={version}"
        assert hashes and all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in hashes), f"{name}: {hashes}"


@pytest.mark.parametrize("context", CONTEXTS, ids=lambda c: c.name)
def test_the_lock_holds_what_requirements_and_constraints_pin(context: Path) -> None:
    """requirements.txt is what a person edits; a change there without relocking fails here. The image
    and the dev install (constraints.txt) run the same versions wherever both pin a package."""
    lock = {name: version for name, (version, _) in locked(context / "requirements.lock").items()}
    for name, version in pins(context / "requirements.txt").items():
        assert lock.get(name) == version, f"{name}: requirements.txt {version}, lock {lock.get(name)}: relock"
    constraints = pins(ROOT / "constraints.txt")
    both = sorted(constraints.keys() & lock.keys())
    assert both
    assert [(n, lock[n]) for n in both] == [(n, constraints[n]) for n in both]


def test_torch_comes_from_the_cuda_index_at_the_dev_version_and_nothing_cuda_from_pypi() -> None:
    """PyPI's torch is a CUDA 13 build with CUDA 13 libraries; the image's torch is PyTorch's cu128 build."""
    (torch,) = re.findall(r"--index-url https://download.pytorch.org/whl/cu128 torch==([\w.]+)", DOCKERFILE)
    assert torch == pins(ROOT / "constraints.txt")["torch"]
    lock = locked(CONTEXT / "requirements.lock")
    assert not [n for n in lock if n == "torch" or n.startswith(("nvidia-", "cuda-", "triton"))]
