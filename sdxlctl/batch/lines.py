"""Reading a prompts file (.txt, .jsonl, .csv) into a checked Batch: every line against the server's rules
(rules.py), every seed fixed, before anything is uploaded or started.

The file is read as bytes, a line at a time (at most MAX_LINE_BYTES of one), so a 10 GB file or a file that
is one endless line is refused for its size without being held in memory.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from sdxlctl.batch import Batch, Line
from sdxlctl.batch.rules import (
    LINE_DEPTH,
    LINE_FIELDS,
    PARAMETER_FIELDS,
    Problem,
    check_instance,
    depth_over,
    seed_problem,
)
from sdxlctl.batch.rules import check_parameters as _check_parameters
from sdxlctl.errors import UsageError

FORMATS = (".txt", ".jsonl", ".csv")
MAX_LINE_BYTES = 64 * 1024  # no prompt line is near this (five fields of 2000 characters); longer is not prompts
SHOWN = 10  # bad lines listed in the error; the rest are counted
# Per-line fields a batch refuses although the server takes them: a batch shares one set of parameters and
# one mode (text-to-image), given as flags.
BATCH_ONLY = ("image", "mask_image", "parameters", "lora", "lora_id")
# The flags the CLI sets the shared parameters from, named in refusals beside the server's name.
FLAGS = {
    "num_inference_steps": "--steps",
    "guidance_scale": "--guidance",
    "width": "--width",
    "height": "--height",
    "num_images": "--num-images",
    "output_format": "--format",
    "quality": "--quality",
    "negative_prompt": "--negative-prompt",
    "scheduler": "--scheduler",
}
NOT_REGULAR = "is not a regular file: a prompts file is a .txt, .jsonl or .csv file"
FIX = "fix the file and run the command again: nothing was uploaded or started"


class BatchInputError(UsageError):
    """A prompts file (or the shared parameters) the server would refuse: each problem names the file, the
    line and the field. `problems` holds the first SHOWN of them, `count` how many lines were bad."""

    def __init__(self, message: str, *, hint: str | None = FIX, problems: tuple[str, ...] = (), count: int = 0):
        super().__init__(message, hint=hint)
        self.problems = problems or (message,)
        self.count = count or 1


def read(path: Path, parameters: dict[str, Any], *, max_lines: int) -> Batch:
    """The batch of `path` with the shared `parameters`; a BatchInputError (a UsageError) naming the file, the
    line and the field of each bad line (the first 10, and how many more), before anything else happens."""
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise BatchInputError(
            f"{path.name}: a prompts file is .txt (one prompt a line), .jsonl (one JSON object a line) or .csv "
            "(a header row naming the fields)",
            hint="rename it with the extension of its format",
        )
    shared = check_parameters(parameters)
    found = _Found(path.name)
    lines: list[Line] = []
    seen = 0
    with _open(path) as file:
        raw = _raw_lines(file, found)
        records = _txt(raw) if suffix == ".txt" else _jsonl(raw) if suffix == ".jsonl" else _csv(raw, found)
        for number, record in records:
            seen += 1
            if seen > max_lines:
                raise BatchInputError(
                    f"{path.name} has more than {max_lines} prompts, the limit ([batch] max_lines = {max_lines})",
                    hint="split the file, or raise [batch] max_lines in sdxlctl.toml",
                )
            if isinstance(record, Problem):
                found.add(number, record)
                continue
            instance, problem = check_instance(record)
            if problem is not None:
                found.add(number, _allowed(problem))
            elif not found.count:  # once a line is bad, the lines are only checked
                lines.append(_seeded(number, instance))
    found.raise_any()
    if not lines:
        raise BatchInputError(f"{path.name} has no prompts: it is empty, or every line is blank", hint=None)
    return Batch(source=path, lines=tuple(lines), parameters=shared)


def check_parameters(parameters: dict[str, Any]) -> dict[str, Any]:
    """The shared parameters as the server reads them, checked (a UsageError naming the flag's field); a None
    value is a flag not given, left out (the server takes no null for most of them)."""
    checked, problem = _check_parameters({key: value for key, value in parameters.items() if value is not None})
    if problem is None:
        return checked
    field = problem.field.split(".")[0].split("[")[0]
    flag = f" ({FLAGS[field]})" if field in FLAGS else ""
    message = problem.message
    if message == "unknown field":
        message += f"; allowed: {', '.join(PARAMETER_FIELDS)}"
    raise BatchInputError(f"parameters.{problem.field}{flag}: {message}", hint=None)


def drawn_seed(number: int, instance: dict[str, Any]) -> int:
    """The seed of a line that gave none: from its number and its instance, so a rerun of the file draws the same."""
    canonical = json.dumps({k: v for k, v in instance.items() if k != "seed"}, sort_keys=True, separators=(",", ":"))
    return int.from_bytes(hashlib.sha256(f"{number}\n{canonical}".encode()).digest()[:4], "big")


def _seeded(number: int, instance: dict[str, Any]) -> Line:
    if "seed" in instance:
        return Line(number=number, instance=instance)
    return Line(number=number, instance={**instance, "seed": drawn_seed(number, instance)}, seed_drawn=True)


class _Found:
    """The bad lines: the first SHOWN worded in full, the rest counted."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.shown: list[str] = []
        self.count = 0

    def add(self, number: int, problem: Problem) -> None:
        self.count += 1
        if len(self.shown) < SHOWN:
            where = f"{problem.field}: " if problem.field else ""
            self.shown.append(f"{self.name} line {number}: {where}{problem.message}")

    def raise_any(self) -> None:
        if not self.count:
            return
        more = [f"and {self.count - len(self.shown)} more bad lines"] if self.count > len(self.shown) else []
        raise BatchInputError("\n".join([*self.shown, *more]), problems=tuple(self.shown), count=self.count)


def _open(path: Path) -> IO[bytes]:
    import stat

    try:
        # Before the open: opening a FIFO blocks until something writes to it, and /dev/zero never ends.
        if not stat.S_ISDIR(mode := path.stat().st_mode) and not stat.S_ISREG(mode):
            raise BatchInputError(f"{path} {NOT_REGULAR}", hint="name the prompts file itself")
        return path.open("rb")
    except FileNotFoundError:
        raise BatchInputError(f"{path}: no such file", hint="check the path") from None
    except IsADirectoryError:
        raise BatchInputError(f"{path} is a folder", hint="name a .txt, .jsonl or .csv file") from None
    except OSError as exc:
        raise BatchInputError(f"{path}: cannot read it ({exc.strerror or exc})", hint="check its permissions") from None


def _raw_lines(file: IO[bytes], found: _Found) -> Iterator[tuple[int, str]]:
    """(line number, text with its line ending) of each line; a line over MAX_LINE_BYTES is skipped (a bad
    line) without reading it whole; a byte that is not UTF-8 stops the reading."""
    number = 0
    while raw := file.readline(MAX_LINE_BYTES + 1):
        number += 1
        if len(raw) > MAX_LINE_BYTES and not raw.endswith(b"\n"):
            while raw and not raw.endswith(b"\n"):
                raw = file.readline(MAX_LINE_BYTES)
            found.add(number, Problem("", f"longer than {MAX_LINE_BYTES // 1024} KiB: not a line of prompts"))
            yield number, "\n"
            continue
        if number == 1 and raw.startswith(codecs.BOM_UTF8):  # what Excel and Notepad write before UTF-8
            raw = raw[len(codecs.BOM_UTF8) :]
        try:
            yield number, raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise BatchInputError(
                f"{found.name} line {number} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at column "
                f"{len(raw[: exc.start].decode('utf-8', 'replace')) + 1})",
                hint="save the file as UTF-8 (an editor's 'Save with encoding', or iconv -t UTF-8)",
            ) from None


Record = tuple[int, "dict[str, Any] | Problem"]


def _txt(raw: Iterator[tuple[int, str]]) -> Iterator[Record]:
    for number, text in raw:
        if text.strip():
            yield number, {"prompt": text.strip()}


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


class _Twice(ValueError):
    def __init__(self, field: str) -> None:
        super().__init__(field)
        self.field = field


def _once(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose keys are all different: json keeps the last of two silently, and the user may have
    read the first."""
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise _Twice(key)
        data[key] = value
    return data


def _jsonl(raw: Iterator[tuple[int, str]]) -> Iterator[Record]:
    for number, text in raw:
        if text.strip():
            yield number, _json_line(text.rstrip("\r\n"))


def _json_line(text: str) -> dict[str, Any] | Problem:
    try:
        data = json.loads(text, parse_constant=_refuse_constant, object_pairs_hook=_once)
    except _Twice as twice:
        return Problem(twice.field, "named twice in the line's JSON object")
    except json.JSONDecodeError as exc:
        return Problem("", f"not valid JSON: {exc.msg} (column {exc.pos + 1})")
    except RecursionError:
        return Problem("", f"JSON nested deeper than {LINE_DEPTH} levels")
    except ValueError as exc:  # NaN, Infinity, an integer of thousands of digits
        return Problem("", f"not valid JSON: {str(exc)[:200]}")
    if not isinstance(data, dict):
        return Problem("", f'a JSON object is required ({{"prompt": "...", "seed": 42}}), not {_kind(data)}')
    if depth_over(data, LINE_DEPTH):
        return Problem("", f"JSON nested deeper than {LINE_DEPTH} levels")
    return _batch_fields(data)


def _batch_fields(data: dict[str, Any]) -> dict[str, Any] | Problem:
    """`data`, or the first field the server would take but a batch does not."""
    for key in data:
        if key in BATCH_ONLY or key.startswith("lora"):
            return Problem(key, f"per-line {key} is not supported in a batch; shared parameters come from flags")
    return data


def _kind(data: Any) -> str:
    names = {list: "a list", str: "a string", bool: "true or false", type(None): "null"}
    return names.get(type(data), "a number")


def _allowed(problem: Problem) -> Problem:
    if problem.message == "unknown field":
        return Problem(problem.field, f"unknown field; allowed: {', '.join(LINE_FIELDS)}")
    return problem


def _csv(raw: Iterator[tuple[int, str]], found: _Found) -> Iterator[Record]:
    """Rows of a CSV file with a header row naming the fields; a row's number is the file line it starts on."""
    import csv

    # Every file line goes to the reader (a too-long one as a blank), so its line_num is the file's.
    # strict: a quote never closed is refused, not read as one prompt holding the rest of the file
    reader = csv.reader((text for _, text in raw), strict=True)
    header: list[str] | None = None
    last = 0
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            raise BatchInputError(
                f"{found.name} line {last + 1}: not a CSV row ({exc})",
                hint='a cell with a comma, a quote or a line break is quoted ("a fox, in snow"), '
                'and a quote inside it doubled ("")',
            ) from None
        start, last = last + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if header is None:
            header = _header(row, start, found.name)
            continue
        if len(row) > len(header):
            yield start, Problem("", f"{len(row)} cells, but the header names {len(header)} columns")
            continue
        yield start, _cells(dict(zip(header, row, strict=False)))


def _header(row: list[str], number: int, name: str) -> list[str]:
    names = [cell.strip() for cell in row]
    for column in names:
        problem = _batch_fields({column: None})
        if isinstance(problem, Problem):
            raise BatchInputError(f"{name} line {number}: {problem.field}: {problem.message}")
        if column not in LINE_FIELDS:
            raise BatchInputError(
                f"{name} line {number}: column {column!r}: unknown field; allowed: {', '.join(LINE_FIELDS)}",
                hint="the first row of a .csv names its columns",
            )
    repeated = next((column for column in names if names.count(column) > 1), None)
    if repeated is not None:
        raise BatchInputError(f"{name} line {number}: column {repeated!r} is named twice")
    return names


def _cells(cells: dict[str, str]) -> dict[str, Any] | Problem:
    """A row as an instance: empty cells absent, the seed an integer."""
    instance: dict[str, Any] = {key: value for key, value in cells.items() if value != ""}
    if "seed" in instance:
        text = instance["seed"].strip()
        # what a JSON number's digits are: int() would also take '1_000' and other scripts' digits
        if not re.fullmatch(r"[+-]?[0-9]{1,40}", text):
            return Problem("seed", seed_problem(text))
        instance["seed"] = int(text)
    return instance
