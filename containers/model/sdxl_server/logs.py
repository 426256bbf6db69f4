"""JSON log lines on stdout, in the shape Cloud Logging reads (severity, message, fields)."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

logger = logging.getLogger("sdxl_server")


class JsonFormatter(logging.Formatter):
    """One JSON object per line; extra fields come from the record's `fields` attribute."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {"severity": record.levelname, "message": record.getMessage()}
        entry.update(getattr(record, "fields", {}))
        # Cloud Logging takes "time" as the entry's time; `sdxlctl logs --since` reads it from the local file
        entry.setdefault("time", datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def configure() -> None:
    """Send this package's logs to stdout as JSON; quiet the libraries' own chatter."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter())
    logger.handlers[:] = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for noisy in ("transformers", "diffusers"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def log(message: str, *, level: int = logging.INFO, **fields: Any) -> None:
    """Log `message` with structured `fields`."""
    logger.log(level, message, extra={"fields": fields})


def prompt_fields(prompts: list[str], *, include_text: bool) -> dict[str, Any]:
    """What a log line says of the prompts: their length and a hash, the text only if asked."""
    joined = "\n".join(prompts)
    fields: dict[str, Any] = {
        "prompt_chars": len(joined),
        "prompt_sha256": hashlib.sha256(joined.encode()).hexdigest()[:16],
    }
    if include_text:
        fields["prompts"] = prompts
    return fields
