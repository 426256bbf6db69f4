"""A request body's JSON, read so that no input can fail it other than as a 400 naming the body."""

from __future__ import annotations

import json
from typing import Any

from sdxl_server.errors import InvalidRequest


def load_json(body: bytes, *, max_depth: int) -> Any:
    """json.loads, with every way it can fail (bad UTF-8, bad syntax, NaN, a 5,000-digit integer,
    nesting deeper than the interpreter's recursion limit) turned into a 400 on the body."""
    try:
        return json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise InvalidRequest(f"body: JSON nested deeper than {max_depth} levels", field="body") from None
    except (UnicodeDecodeError, ValueError) as exc:  # JSONDecodeError and int's digit limit are ValueErrors
        raise InvalidRequest(f"the body is not valid JSON: {_short(str(exc))}", field="body") from None


def depth_over(data: Any, limit: int) -> bool:
    """Whether containers nest more than `limit` deep; iterative, so no depth can overflow the stack."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return False


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _short(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
