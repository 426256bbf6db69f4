"""The 17 SDXL style presets (Stability AI's style_preset names with their prompt templates)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path


@dataclass(frozen=True)
class Style:
    """A prompt template: '{prompt}' is replaced by the user's prompt; the negative is joined with ', '."""

    id: str
    name: str
    prompt: str
    negative_prompt: str

    def apply(self, prompt: str, negative_prompt: str | None) -> tuple[str, str]:
        """The styled (prompt, negative prompt) for a user's prompt and optional negative prompt."""
        negative = ", ".join(part for part in (self.negative_prompt, negative_prompt) if part)
        return self.prompt.replace("{prompt}", prompt), negative


@cache
def styles() -> dict[str, Style]:
    """Every preset by id, in the order of the data file."""
    data = json.loads((Path(__file__).parent / "styles.json").read_text(encoding="utf-8"))
    return {entry["id"]: Style(**entry) for entry in data["styles"]}
