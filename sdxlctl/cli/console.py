"""Where output goes: data on stdout, messages and progress on stderr."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from rich.console import Console

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


@contextmanager
def progress(title: str) -> Iterator[callable]:  # type: ignore[valid-type]
    """A spinner on stderr showing the current phase and the elapsed time; yields `update(phase)`."""
    started = time.monotonic()
    phase = [title]

    def render() -> str:
        return f"{phase[0]} [dim]{time.monotonic() - started:.0f}s[/dim]"

    with err.status(render()) as status:

        def update(text: str) -> None:
            phase[0] = text
            status.update(render())

        yield update
