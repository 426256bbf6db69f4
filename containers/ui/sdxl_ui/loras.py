"""The LoRA adapters the page offers: the model server's preloaded ones, by name (SDXL_LORAS on the server).

The server's health lists them where the page can ask it (the local target); a Vertex AI endpoint proxies
only predict, so there sdxlctl passes the names from `[model] loras` as SDXL_UI_LORAS. The page offers
names only, never sources: a visitor does not choose what the server fetches."""

from __future__ import annotations

import re
from typing import Any

# The server's rule for a preloaded name (sdxl_server.lora.sources), case-insensitive
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
NAME_RULE = "a letter or digit, then up to 63 of a-z, 0-9, '.', '_', '-'"
NONE = "none"  # the menu's first entry: no adapter, and a request exactly as without LoRA
# The server takes -4..4; the page offers the range a person uses (diffusers' and cog-sdxl's examples stay in 0..1,
# negative scales push away from the adapter's style)
MIN_SCALE, MAX_SCALE, SCALE_STEP, DEFAULT_SCALE = -2.0, 2.0, 0.05, 1.0


def parse_names(raw: str) -> tuple[list[str], list[str]]:
    """SDXL_UI_LORAS (comma-separated names) as (the names, lowercased, each once, in order; the entries
    that are not names, to be ignored)."""
    return _names(raw.split(","))


def _names(entries: list[Any]) -> tuple[list[str], list[str]]:
    names: list[str] = []
    bad: list[str] = []
    for entry in entries:
        text = str(entry).strip()
        name = text.lower()
        if not name:
            continue
        if not NAME.fullmatch(name) or name == NONE:
            bad.append(text)
        elif name not in names:
            names.append(name)
    return names, bad


def offered(health: dict[str, Any] | None, configured: list[str]) -> list[str]:
    """The adapter names to offer: the server's health answer says (`lora.preloaded`; none when its LoRA is
    off) where the page can ask it; where it cannot (None: Vertex AI, or still loading), `configured`."""
    if health is None:
        return list(configured)
    lora: Any = health.get("lora")
    preloaded = lora.get("preloaded") if isinstance(lora, dict) else None
    if not isinstance(preloaded, list):
        return []
    names, _ = _names(preloaded)  # the server checked them; this keeps a garbled answer out of the menu
    return names


def menu(names: list[str]) -> list[tuple[str, str]]:
    """The menu's (label, value) entries: none first."""
    return [("None", NONE), *((name, name) for name in names)]  # "None" as the Style and Refiner menus say it
