"""`sdxlctl --help`, `cost` and `status` must not pay for torch, diffusers, gradio or Google's libraries."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

HEAVY = (
    "torch",
    "diffusers",
    "transformers",
    "gradio",
    "google.cloud",
    "google.api_core",
    "google.auth",
    "sdxl_server.sources",
)


@pytest.mark.parametrize("args", [["--help"], ["cost"], ["status"], ["status", "--json"], ["predict", "--help"]])
def test_light_commands_import_nothing_heavy(args: list[str], tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import sys
        before = set(sys.modules)  # google-cloud-aiplatform's .pth makes an empty google.cloud namespace at start-up
        from sdxlctl.cli.app import run
        code = run({args!r})
        heavy = sorted(m for m in set(sys.modules) - before if m.startswith({HEAVY!r}))
        print("HEAVY=" + ",".join(heavy), file=sys.stderr)
        sys.exit(code)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr  # a command that failed early would import nothing either
    assert "HEAVY=\n" in result.stderr, result.stderr
