"""`python -m sdxl_ui`: serve the page on $PORT (Cloud Run sets it)."""

from __future__ import annotations

import os
import sys


def main() -> int:
    # Before gradio is imported: no analytics, no Hub lookups, no share links, ever.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    from sdxl_ui.app import CSS, build
    from sdxl_ui.backend import from_environment
    from sdxl_ui.limits import DEFAULT_MAX_IMAGES, DEFAULT_MAX_REQUEST_BYTES, MAX_UPLOAD_BYTES

    bounded_decoding()

    endpoint = os.environ.get("SDXL_ENDPOINT", "http://127.0.0.1:8080")
    try:
        backend = from_environment(
            endpoint,
            api_base=os.environ.get("SDXL_VERTEX_API_ENDPOINT", ""),
            predict_route=os.environ.get("SDXL_PREDICT_ROUTE", "/predict"),
            health_route=os.environ.get("SDXL_HEALTH_ROUTE", "/health"),
            auth=os.environ.get("SDXL_AUTH", "").strip(),
        )
        port = _number("PORT", 7860)
        numbers = {
            name: _number(f"SDXL_UI_{name.upper()}", default)
            for name, default in (
                ("queue", 16),
                ("width", 1024),
                ("height", 1024),
                ("steps", 30),
                ("max_images", DEFAULT_MAX_IMAGES),
                ("max_request_bytes", DEFAULT_MAX_REQUEST_BYTES),
            )
        }
        refiner = _flag("SDXL_UI_REFINER")
    except ValueError as exc:
        print(f"sdxl_ui: {exc}", file=sys.stderr)
        return 2
    lora_names = _lora_names(os.environ.get("SDXL_UI_LORAS", ""))
    page = build(
        backend,
        queue_size=numbers["queue"],
        width=numbers["width"],
        height=numbers["height"],
        steps=numbers["steps"],
        max_images=numbers["max_images"],
        max_request_bytes=numbers["max_request_bytes"],
        refiner=refiner,
        lora_names=lora_names,
    )
    page.launch(
        server_name=os.environ.get("SDXL_UI_HOST", "0.0.0.0"),
        server_port=port,
        share=False,
        show_error=False,
        quiet=True,
        ssr_mode=False,
        css=CSS,
        max_file_size=MAX_UPLOAD_BYTES,  # Gradio's default is no limit
    )
    return 0


def bounded_decoding() -> None:
    """Pillow in this process refuses images over MAX_UPLOAD_PIXELS (its default only warns up to twice 89 million)."""
    import warnings

    from PIL import Image

    from sdxl_ui.limits import MAX_UPLOAD_PIXELS

    Image.MAX_IMAGE_PIXELS = MAX_UPLOAD_PIXELS
    warnings.simplefilter("error", Image.DecompressionBombWarning)


def _number(var: str, default: int) -> int:
    """A positive whole number from the environment; a ValueError that names the variable otherwise."""
    raw = os.environ.get(var, "").strip() or str(default)
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"{var}={raw!r} is invalid: expected a whole number of at least 1")
    return int(raw)


def _lora_names(raw: str) -> list[str]:
    """SDXL_UI_LORAS: the server's preloaded adapter names, for where the page cannot ask its health. An entry
    that is no name is left out of the menu with one line (the page still serves: the menu is an extra)."""
    from sdxl_ui.loras import NAME_RULE, parse_names

    names, bad = parse_names(raw)
    if bad:
        ignored = ", ".join(repr(entry) for entry in bad)
        print(f"sdxl_ui: SDXL_UI_LORAS: ignored {ignored}: a name is {NAME_RULE} (and not 'none')", file=sys.stderr)
    return names


def _flag(var: str) -> bool:
    """1/true/yes or 0/false/no (or unset: no); a ValueError that names the variable otherwise."""
    raw = os.environ.get(var, "").strip().lower() or "0"
    if raw not in ("1", "true", "yes", "0", "false", "no"):
        raise ValueError(f"{var}={raw!r} is invalid: expected 1 or 0")
    return raw in ("1", "true", "yes")


if __name__ == "__main__":
    sys.exit(main())
