"""`sdxlctl styles`: the style presets of `predict --style` and the UI, each with its prompt template."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer

from sdxlctl.cli.console import err, out
from sdxlctl.cli.root import app


def presets() -> list[dict[str, Any]] | None:
    """The model server's presets (id, name, prompt, negative_prompt), read from its data file.

    None where the server package is not installed (a cloud-only install): the deployed server then checks
    a style name. No server code is imported, only its styles.json.
    """
    from importlib.resources import files

    try:
        data = json.loads(files("sdxl_server").joinpath("styles.json").read_text(encoding="utf-8"))
    except ModuleNotFoundError:
        return None
    return list(data["styles"])


@app.command()
def styles(
    as_json: Annotated[bool, typer.Option("--json", help="print the presets as JSON on stdout")] = False,
) -> None:
    """The style presets for `predict --style NAME`, each with the prompt template it wraps your prompt in."""
    from sdxlctl.errors import NotAvailable

    found = presets()
    if found is None:
        raise NotAvailable(
            "the style presets ship with the model server (package sdxl_server), which this install lacks; "
            "the deployed server still checks `predict --style NAME`"
        )
    if as_json:
        out.print_json(json.dumps(found))
        return
    err.print(
        f"{len(found)} presets (or none): {{prompt}} is your prompt, and a preset's negative is added to yours",
        markup=False,
        soft_wrap=True,
    )
    for preset in found:
        out.print(f"{preset['id']}  ({preset['name']})", markup=False)
        out.print(f"  prompt:   {preset['prompt']}", markup=False)
        out.print(f"  negative: {preset['negative_prompt']}", markup=False)
