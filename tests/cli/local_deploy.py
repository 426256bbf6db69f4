"""A real `sdxlctl deploy` on the local target, for the tests that predict against a running tiny server."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def local_deployment(folder: Path, env: Mapping[str, str], *, server_env: Mapping[str, str] = {}) -> Iterator[None]:
    """`sdxlctl deploy` in `folder` (its sdxlctl.toml, if any) with `env` over this process's environment less
    its SDXLCTL_ variables (the developer's own must not leak in), offline from the Hub; `server_env` is passed
    to the deploy alone (the server inherits it; the tests' own cli calls need not). Torn down after, whatever
    the test did."""
    kept = {k: v for k, v in os.environ.items() if not k.startswith("SDXLCTL_")}
    full = {**kept, **env, "HF_HUB_OFFLINE": "1", **server_env}
    sdxlctl = [sys.executable, "-m", "sdxlctl"]
    started = subprocess.run([*sdxlctl, "deploy"], cwd=folder, env=full, capture_output=True, text=True, timeout=240)
    try:
        assert started.returncode == 0, started.stderr
        yield
    finally:
        subprocess.run([*sdxlctl, "teardown", "--yes"], cwd=folder, env=full, capture_output=True, timeout=60)
