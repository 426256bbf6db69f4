"""The documented install works from a clone and never asks an index for our own parts (dependency confusion)."""

from __future__ import annotations

import re
import shlex
import tomllib

from tests.servers import ROOT

PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def own_packages() -> dict[str, str]:
    """Our packages by distribution name: sdxlctl and each container's, with the folder each lives in."""
    found = {"sdxlctl": "."}
    for folder in ("containers/model", "containers/ui"):
        found[tomllib.loads((ROOT / folder / "pyproject.toml").read_text())["project"]["name"]] = folder
    return found


def requirement_name(requirement: str) -> str:
    return re.split(r"[\s\[<>=!~;@]", requirement, maxsplit=1)[0].lower().replace("_", "-")


def test_no_dependency_or_extra_names_our_own_parts_except_sdxlctls_own_extras() -> None:
    ours = set(own_packages())
    project = PYPROJECT["project"]
    requirements = list(project["dependencies"])
    for extra, listed in project["optional-dependencies"].items():
        for requirement in listed:
            if requirement_name(requirement) == "sdxlctl":  # its own extras: resolved from this checkout
                assert set(re.findall(r"\w+", requirement.split("[")[1])) <= set(project["optional-dependencies"])
                continue
            requirements.append(requirement)
            assert requirement_name(requirement) not in ours, f"[{extra}] names {requirement}: an index would serve it"
    assert not {requirement_name(r) for r in requirements} & ours


def pip_installs(text: str) -> list[list[str]]:
    """The arguments of every `pip install` command in a text (README code blocks, Makefile recipes)."""
    found = []
    for line in text.replace("\\\n", " ").splitlines():
        if "pip install" in line:
            words = shlex.split(line.split(" #")[0].replace("`", " "))
            found.append(words[words.index("install") + 1 :])
    return found


def test_the_readme_and_the_makefile_install_our_parts_from_their_folders() -> None:
    folders = set(own_packages().values())
    extras = set(PYPROJECT["project"]["optional-dependencies"])
    for source in ("README.md", "Makefile"):
        installs = pip_installs((ROOT / source).read_text(encoding="utf-8"))
        named: set[str] = set()
        for arguments in installs:
            for argument in arguments:
                if argument.startswith("-") or "$(" in argument or "://" in argument:
                    continue
                path, _, wanted = argument.partition("[")
                if (ROOT / path).is_dir():  # a folder of this checkout: one of ours, with extras it has
                    assert path in folders, (source, argument)
                    if path == "." and wanted:
                        assert set(re.findall(r"[\w-]+", wanted)) <= extras, f"{source}: {argument}: no such extra"
                    named.add(path)
                else:  # a name, resolved on an index: never one of ours
                    assert requirement_name(path) not in own_packages(), (source, argument)
        assert {"containers/model", "containers/ui", "."} <= named, (source, named)


def test_every_data_file_the_cli_reads_ships_in_a_built_wheel() -> None:
    """A wheel (not an editable install) carries only .py files unless package-data names the rest."""
    import fnmatch
    import subprocess

    tracked = subprocess.run(
        ["git", "ls-files", "sdxlctl"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    data = [path.removeprefix("sdxlctl/") for path in tracked if not path.endswith(".py")]
    globs = PYPROJECT["tool"]["setuptools"].get("package-data", {}).get("sdxlctl", [])
    assert data, "no data files found: the test lost its subject"
    assert [path for path in data if not any(fnmatch.fnmatch(path, glob) for glob in globs)] == []
