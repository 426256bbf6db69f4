"""`sdxlctl check` on target local: the Python packages the model server and the UI need, and free ports."""

from __future__ import annotations

import errno
import importlib.util
import socket

from sdxlctl.config import Config
from sdxlctl.state import StateStore
from sdxlctl.steps import Check

INSTALL = 'pip install -e "containers/model[gcs]" -e containers/ui'  # README "Installing": from the folders
# What `python -m sdxl_server` / `python -m sdxl_ui` import before they can answer: found, not imported
# (importing torch takes seconds and is the server's business).
SERVER_PACKAGES = ("sdxl_server", "torch", "diffusers", "transformers", "starlette", "uvicorn")
UI_PACKAGES = ("sdxl_ui", "gradio")


def check(config: Config, store: StateStore) -> list[Check]:
    """One line per prerequisite of running the server and the UI on this machine."""
    return [
        _packages("model server packages", SERVER_PACKAGES),
        _packages("UI packages", UI_PACKAGES),
        _port(config, store, "local-server", config.local.server_port, "server_port"),
        _port(config, store, "local-ui", config.local.ui_port, "ui_port"),
    ]


def _packages(name: str, modules: tuple[str, ...]) -> Check:
    missing = [module for module in modules if importlib.util.find_spec(module) is None]
    if missing:
        return Check(name, "fail", f"not installed: {', '.join(missing)}", f"from the repository's root: {INSTALL}")
    return Check(name, "ok", ", ".join(modules))


def _port(config: Config, store: StateStore, kind: str, port: int, key: str) -> Check:
    where = f"{config.local.host}:{port}"
    own = store.read().of(config.name).get(kind)
    if own is not None and own.url.rstrip("/").endswith(f":{port}"):
        return Check(f"port {port}", "ok", f"{where} is this deployment's {kind.removeprefix('local-')} ({own.url})")
    with socket.socket(socket.AF_INET6 if ":" in config.local.host else socket.AF_INET) as probe:
        try:
            probe.bind((config.local.host, port))
        except OSError as exc:
            taken = exc.errno == errno.EADDRINUSE
            reason = "in use by another program" if taken else exc.strerror or str(exc)
            fix = f"stop what listens there, or set [local] {key} to a free port" if taken else "set [local] host"
            return Check(f"port {port}", "fail", f"{where}: {reason}", fix)
    return Check(f"port {port}", "ok", f"{where} is free")
