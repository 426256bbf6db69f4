"""`sdxlctl init`: the commented example config with the given values, asked for only on a terminal, never over
an existing file without --force."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
import tomllib
from pathlib import Path

from sdxlctl.config import load_config
from tests.conftest import Cli

EXAMPLE = Path(__file__).resolve().parents[2] / "sdxlctl.toml"


def _changed(written: str) -> list[tuple[str, str]]:
    """(example line, written line) for each line that differs; the line count must be the same."""
    example = EXAMPLE.read_text().splitlines()
    lines = written.splitlines()
    assert len(lines) == len(example)
    return [(a, b) for a, b in zip(example, lines, strict=True) if a != b]


def test_flags_set_their_keys_and_every_comment_stays(cli: Cli, tmp_path: Path) -> None:
    result = cli("init", "--target", "vertex", "--project", "my-proj-42", "--region", "europe-west4", "--gpu", "a100")
    assert result.code == 0, result.err
    written = (tmp_path / "sdxlctl.toml").read_text()
    config = load_config(tmp_path / "sdxlctl.toml", environ={})
    assert (config.target, config.gcp.project, config.gcp.region, config.deploy.gpu) == (
        "vertex",
        "my-proj-42",
        "europe-west4",
        "a100",
    )
    changed = _changed(written)
    assert [new.split("=")[0].strip() for _, new in changed] == ["target", "project", "region", "gpu"]
    for old, new in changed:  # each comment kept, in its column
        if "#" in old:
            assert new.index("#") == old.index("#") and new.split("#", 1)[1] == old.split("#", 1)[1]
    assert result.out.strip() == "sdxlctl.toml" and "sdxlctl check" in result.err


def test_without_a_terminal_it_asks_nothing_and_writes_the_local_defaults(cli: Cli, tmp_path: Path) -> None:
    result = cli("init")  # stdin is not a terminal here: no prompt may wait for an answer
    assert result.code == 0, result.err
    assert (tmp_path / "sdxlctl.toml").read_text() == EXAMPLE.read_text()  # target local, every key commented
    assert load_config(tmp_path / "sdxlctl.toml", environ={}).target == "local"


def test_an_existing_file_is_kept_unless_forced(cli: Cli, tmp_path: Path) -> None:
    mine = tmp_path / "sdxlctl.toml"
    mine.write_text('name = "mine"\n')
    refused = cli("init", "--yes")
    assert refused.code == 2
    assert "sdxlctl.toml exists" in refused.err and "--force" in refused.err
    assert mine.read_text() == 'name = "mine"\n'
    forced = cli("init", "--yes", "--force", "--gpu", "h100")
    assert forced.code == 0, forced.err
    assert tomllib.loads(mine.read_text())["deploy"]["gpu"] == "h100"


def test_bad_values_are_refused_before_anything_is_written(cli: Cli, tmp_path: Path) -> None:
    bad = cli("init", "--project", "My_Project")
    assert bad.code == 2 and "--project 'My_Project' is not a Google Cloud project id" in bad.err
    region = cli("init", "--region", "mars")
    assert region.code == 2 and "--region 'mars'" in region.err
    target = cli("init", "--target", "cloud")
    assert target.code == 2 and "'cloud' is not one of 'local', 'vertex'" in target.err
    assert not (tmp_path / "sdxlctl.toml").exists()
    assert not list(tmp_path.glob(".sdxlctl.toml*"))  # no half-written file left behind


def test_the_global_config_option_names_the_file(cli: Cli, tmp_path: Path) -> None:
    result = cli("--config", str(tmp_path / "conf" / "prod.toml"), "init", "--yes", "--project", "prod-project-1")
    assert result.code == 0, result.err
    assert load_config(tmp_path / "conf" / "prod.toml", environ={}).gcp.project == "prod-project-1"


def test_on_a_terminal_it_asks_with_gclouds_project_as_the_default(tmp_path: Path) -> None:
    gcloud = tmp_path / "gcloud"
    (gcloud / "configurations").mkdir(parents=True)
    (gcloud / "configurations" / "config_default").write_text("[core]\nproject = gcloud-default-1\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SDXLCTL_", "CLOUDSDK_"))}
    env |= {"CLOUDSDK_CONFIG": str(gcloud), "COLUMNS": "80"}
    main, terminal = pty.openpty()
    try:
        # Answers: target, project (empty: gcloud's), region, GPU.
        os.write(main, b"vertex\n\neurope-west4\nl4\n")
        shown = subprocess.run(
            [sys.executable, "-m", "sdxlctl", "init"],
            cwd=tmp_path,
            env=env,
            stdin=terminal,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        os.close(main)
        os.close(terminal)
    assert shown.returncode == 0, shown.stderr
    assert "[gcloud-default-1]" in shown.stderr  # offered, and taken only because the answer was empty
    config = load_config(tmp_path / "sdxlctl.toml", environ={})
    assert (config.target, config.gcp.project, config.gcp.region, config.deploy.gpu) == (
        "vertex",
        "gcloud-default-1",
        "europe-west4",
        "l4",
    )
