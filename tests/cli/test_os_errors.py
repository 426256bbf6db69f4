"""Ordinary OS errors are one line with a hint and exit 1, never "internal error ... report it"; predict
checks its output path before asking for images and never throws away images it was given."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from sdxlctl.local import processes as local
from sdxlctl.state import Resource, StateStore
from tests.cli.scripted import GOOD, PNG, Answer, Script, scripted_server
from tests.conftest import Cli, Result
from tests.servers import free_port


def freeze(path: Path) -> None:
    """Make a folder refuse new files, for root too (chattr +i); chmod for anyone else."""
    if os.geteuid() == 0:
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("running as root where chattr +i does not work: cannot make a folder unwritable")
    else:
        path.chmod(0o555)


def thaw(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)
    else:
        path.chmod(0o755)


@contextmanager
def frozen(path: Path) -> Iterator[None]:
    freeze(path)
    try:
        yield
    finally:
        thaw(path)


def one_line_error(result: Result, *says: str) -> None:
    assert result.code == 1, result
    lines = result.err.splitlines()
    assert lines[0].startswith("error: ") and len(lines) == 2 and lines[1].startswith("hint: "), result.err
    assert "internal error" not in result.err and "Traceback" not in result.err
    for words in says:
        assert words in result.err, result.err


@pytest.mark.parametrize("args", [["status"], ["deploy"], ["teardown", "--yes"], ["ui-deploy"]])
def test_a_file_named_sdxlctl_is_one_line(cli: Cli, tmp_path: Path, args: list[str]) -> None:
    (tmp_path / ".sdxlctl").write_text("not a folder")
    port = free_port()
    one_line_error(cli(*args, env={"SDXLCTL_LOCAL_SERVER_PORT": str(port)}), "is a file", "move")
    assert local.port_is_free(port)  # nothing was started
    assert (tmp_path / ".sdxlctl").read_text() == "not a folder"


def test_an_unwritable_state_folder_is_one_line_and_starts_nothing(cli: Cli, tmp_path: Path) -> None:
    home = tmp_path / ".sdxlctl"
    home.mkdir()
    port = free_port()
    with frozen(home):
        result = cli("deploy", env={"SDXLCTL_LOCAL_SERVER_PORT": str(port)})
    one_line_error(result, str(home), "writable")
    assert local.port_is_free(port) and not local.find_marked(local.marker(home, "sdxl", "local-server"))
    assert list(home.iterdir()) == []


def _deployed(folder: Path, script: Script) -> None:
    """Record a local server that is in fact the scripted loopback server."""
    url = script.url.removesuffix("/predict")
    with StateStore(folder / ".sdxlctl").transaction() as state:
        state.put("sdxl", Resource(kind="local-server", name="sdxl-server", target="local", url=url, details={}))


@pytest.mark.parametrize(
    ("output", "setup"),
    [
        ("file/x.png", lambda folder: (folder / "file").write_text("a file")),
        ("a/file/x.png", lambda folder: (folder / "a").mkdir() or (folder / "a" / "file").write_text("")),
        ("taken.png", lambda folder: (folder / "taken.png").mkdir()),
        ("many.png", lambda folder: (folder / "many-2.png").mkdir()),  # the third image's name
    ],
)
def test_an_output_path_that_cannot_be_written_is_refused_before_the_request(
    cli: Cli, tmp_path: Path, output: str, setup: object
) -> None:
    setup(tmp_path)  # type: ignore[operator]
    with scripted_server() as script:
        script.answers = [Answer()]
        _deployed(tmp_path, script)
        result = cli("predict", "a fox", "-o", output, "-n", "3")
    one_line_error(result, f"cannot write -o {output}")
    assert script.seen == []  # no image was generated to be thrown away


def test_an_unwritable_output_folder_is_refused_before_the_request(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    with scripted_server() as script, frozen(folder):
        script.answers = [Answer()]
        _deployed(tmp_path, script)
        result = cli("predict", "a fox", "-o", "out/fox.png")
    one_line_error(result, "cannot write -o out/fox.png")
    assert script.seen == []


def test_images_that_cannot_be_written_after_generation_are_kept_and_said_where(cli: Cli, tmp_path: Path) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    two = {"predictions": [{**GOOD["predictions"][0], "images": [PNG, PNG], "seeds": [7, 8]}]}
    try:
        # The folder takes files when predict checks it, and stops while the images are generated.
        with scripted_server(on_request=lambda: freeze(folder)) as script:
            script.answers = [Answer(body=two)]
            _deployed(tmp_path, script)
            result = cli("predict", "a fox", "-o", "out/fox.png", "-n", "2")
    finally:
        thaw(folder)
    rescued = tmp_path / ".sdxlctl" / "rescued"
    one_line_error(result, "could not write", f"saved in {rescued}", "seeds 7, 8")
    saved = sorted(rescued.iterdir())
    assert [p.name.split("-", 2)[-1] for p in saved] == ["fox-1.png", "fox.png"]
    assert all(p.read_bytes() == b"\x89PNG\r\n\x1a\n" for p in saved)
    assert list(folder.iterdir()) == []


def test_a_full_disk_while_writing_the_state_leaves_the_old_state_and_says_so(tmp_path: Path) -> None:
    """RLIMIT_FSIZE makes every write past a few bytes fail (EFBIG), as a full disk would."""
    store = StateStore(tmp_path / ".sdxlctl")
    with store.transaction() as state:
        state.put("sdxl", Resource(kind="local-server", name="sdxl-server", target="local", details={"pid": 0}))
    before = store.path.read_bytes()
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (16, 16))\n"
        "from sdxlctl.cli.app import run\n"
        "sys.exit(run(['teardown', '--yes']))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")}
    down = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert down.returncode == 1, down.stderr
    assert "cannot write the state file" in down.stderr and "File too large" in down.stderr, down.stderr
    assert "internal error" not in down.stderr and "Traceback" not in down.stderr
    assert store.path.read_bytes() == before and store.read().get("sdxl", "local-server") is not None
    assert [p.name for p in store.home.iterdir() if p.name.startswith(".state-")] == []


def test_more_images_than_asked_for_are_all_kept_not_an_internal_error(cli: Cli, tmp_path: Path) -> None:
    """An answer off the contract (two images for -n 1) still ends in files, not in a zip() traceback."""
    two = {"predictions": [{**GOOD["predictions"][0], "images": [PNG, PNG], "seeds": [7, 8]}]}
    with scripted_server() as script:
        script.answers = [Answer(body=two)]
        _deployed(tmp_path, script)
        result = cli("predict", "a fox", "-o", "fox.png")
    assert result.code == 0, result
    assert "internal error" not in result.err
    assert (tmp_path / "fox.png").read_bytes() == (tmp_path / "fox-1.png").read_bytes() == b"\x89PNG\r\n\x1a\n"
