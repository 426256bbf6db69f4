"""Run sdxlctl in-process, exactly as the console script does, in a fresh folder."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from sdxlctl.cli.app import run


@dataclass
class Result:
    code: int
    out: str
    err: str


Cli = Callable[..., Result]


@pytest.fixture
def cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Cli:
    """cli('predict', 'x', env={...}) -> Result; runs in tmp_path with no SDXLCTL_* from outside."""
    monkeypatch.chdir(tmp_path)
    for var in list(os.environ):
        if var.startswith("SDXLCTL_"):
            monkeypatch.delenv(var)
    monkeypatch.setenv("COLUMNS", "200")

    def invoke(*args: str, env: dict[str, str] | None = None) -> Result:
        for var, value in (env or {}).items():
            monkeypatch.setenv(var, value)
        capsys.readouterr()
        try:
            code = run(list(args))
        finally:
            for var in env or {}:
                monkeypatch.delenv(var)
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke
