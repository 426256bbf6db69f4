"""`python -m sdxl_server`: one uvicorn process, one pipeline."""

from __future__ import annotations

import os
import sys


def main() -> int:
    """Read settings from the environment and serve until stopped."""
    # Before any library import: never phone home from a container that may have no network.
    for var, value in (
        ("HF_HUB_DISABLE_TELEMETRY", "1"),
        ("DIFFUSERS_VERBOSITY", "error"),
        ("TRANSFORMERS_VERBOSITY", "error"),
    ):
        os.environ.setdefault(var, value)
    import uvicorn

    from sdxl_server import logs
    from sdxl_server.app import create_app
    from sdxl_server.errors import SettingsError
    from sdxl_server.loader import load_generator
    from sdxl_server.protocol import protocol_for
    from sdxl_server.settings import Settings

    logs.configure()
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        print(f"sdxl_server: {exc.message}", file=sys.stderr)
        return 2
    logs.log(
        "starting",
        port=settings.http_port,
        health=settings.health_route,
        predict=settings.predict_route,
        model=settings.model_source,
    )
    app = create_app(settings, load=load_generator)
    # One worker: a second process would load a second copy of the model onto the same GPU.
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.http_port,
        workers=1,
        http=protocol_for(settings),  # uvicorn's h11, plus a header timeout, a connection limit, JSON errors
        timeout_keep_alive=settings.keep_alive_s,
        ws="none",  # no websocket routes: an upgrade request is an ordinary request, answered in JSON
        access_log=False,
        log_level="warning",
        timeout_graceful_shutdown=5,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
