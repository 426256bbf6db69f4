"""The images and manifest.jsonl of a batch: from the server's answers (local) or a Vertex AI job's output
lines (vertex); read back for resume and --retry-failed.

Every input here may be damaged or hostile (a server's answer, Vertex AI's output files, a manifest cut by a
crash or edited by hand): a bad piece becomes that line's error or is skipped and counted, never a crash, and
an image path is trusted only when it is images/<line:06d>[-<i>].<ext> inside the batch's folder.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sdxlctl.batch import IMAGES, KEY_FIELD, Batch, Line, Row
from sdxlctl.batch.files import one_line, write_atomic

EXTENSIONS = {"png": "png", "jpeg": "jpg", "jpg": "jpg", "webp": "webp"}  # output_format -> file extension
DEFAULT_FORMAT = "jpeg"  # the server's default output_format
NO_ANSWER = "no answer in the job's output"
MAX_ROW_BYTES = 1 << 20  # a manifest row is a prompt and parameters: a longer line is damage, not a row
IMAGE_NAME = re.compile(r"images/(\d{6,})(?:-([1-9]\d*))?\.(png|jpg|webp)")
GRPC_CODES = (  # google.rpc.Code by number
    "OK",
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
)
_SIGNATURES = {"png": (b"\x89PNG\r\n\x1a\n",), "jpg": (b"\xff\xd8\xff",), "webp": (b"RIFF",)}

Files = list[tuple[str, bytes]]  # (path relative to the batch's folder, bytes)
FileSink = Callable[[Files], None]


def extension(output_format: str) -> str:
    """The file extension of an output_format: jpeg -> jpg, png, webp; ValueError for anything else."""
    try:
        return EXTENSIONS[str(output_format).lower()]
    except KeyError:
        raise ValueError(f"output_format {output_format!r} is not png, jpeg or webp") from None


def image_name(line: int, index: int, ext: str, *, images_dir: str = IMAGES) -> str:
    """The relative path of image `index` (0-based) of `line`: images/000137.png, images/000137-1.png, ..."""
    suffix = f"-{index}" if index else ""
    return f"{images_dir}/{line:06d}{suffix}.{extension(ext)}"


def trusted_image(path: Any, line: int | None = None) -> bool:
    """Whether `path` (from a manifest) names an image this module writes, inside images/ (of `line`)."""
    if not isinstance(path, str):
        return False
    match = IMAGE_NAME.fullmatch(path)
    return match is not None and (line is None or int(match.group(1)) == line)


def decode(prediction: Any, line: int, default_format: str, most: int | None = None) -> tuple[Files, str | None]:
    """The image files of one prediction {"images": [base64...], "output_format", ...}, or an error; more than
    `most` images (num_images) is an error before any is decoded."""
    if not isinstance(prediction, dict):
        return [], f"the answer for this line is {type(prediction).__name__}, not a prediction object"
    images = prediction.get("images")
    if not isinstance(images, list) or not images:
        return [], "the answer for this line carries no images"
    if most is not None and len(images) > most:
        return [], f"the answer for this line carries {len(images)} images, more than num_images {most}"
    output_format = prediction.get("output_format", default_format)
    try:
        ext = extension(output_format)
    except ValueError as exc:
        return [], f"the answer for this line: {exc}"
    files: Files = []
    for index, image in enumerate(images):
        try:
            if not isinstance(image, str):
                raise TypeError
            data = base64.b64decode(image, validate=True)
        except (TypeError, ValueError, binascii.Error):
            return [], f"image {index} of the answer is not base64"
        if not data.startswith(_SIGNATURES[ext]) or (ext == "webp" and data[8:12] != b"WEBP"):
            return [], f"image {index} of the answer is not a {output_format} image"
        files.append((image_name(line, index, ext), data))
    return files, None


def _row(batch: Batch, line: Line, images: list[str], error: str | None = None) -> Row:
    return Row(line.number, line.prompt, line.seed, dict(batch.parameters), images, error)


def _answered(batch: Batch, line: Line, prediction: Any) -> tuple[Row, Files]:
    output_format = str(batch.parameters.get("output_format", DEFAULT_FORMAT))
    most = batch.parameters.get("num_images", 1)
    files, error = decode(prediction, line.number, output_format, most if isinstance(most, int) else None)
    if error:
        return _row(batch, line, [], error), []
    return _row(batch, line, [name for name, _ in files]), files


def rows_from_answer(
    batch: Batch, numbers: list[int], answer: dict[str, Any], *, images_dir: str = IMAGES
) -> tuple[list[Row], list[tuple[str, bytes]]]:
    """The manifest rows of the lines `numbers` from one server answer {"predictions": [...]} (in order), and the
    image files to write as (relative path, bytes)."""
    lines = {line.number: line for line in batch.lines}
    predictions = answer.get("predictions") if isinstance(answer, dict) else None
    if not isinstance(predictions, list):
        predictions = []
        missing = "the server's answer carries no predictions"
    else:
        missing = f"the server answered {len(predictions)} predictions for {len(numbers)} lines"
        if len(predictions) != len(numbers):  # which answer is whose is then a guess: none is taken
            predictions = []
    rows: list[Row] = []
    files: Files = []
    for position, number in enumerate(numbers):
        line = lines[number]
        if position >= len(predictions):
            rows.append(_row(batch, line, [], missing))
            continue
        row, written = _answered(batch, line, predictions[position])
        if images_dir != IMAGES:
            written = [(images_dir + name[len(IMAGES) :], data) for name, data in written]
            row = Row(row.line, row.prompt, row.seed, row.parameters, [name for name, _ in written], row.error)
        rows.append(row)
        files.extend(written)
    return rows, files


def error_text(error: Any) -> str:
    """An output line's error (google.rpc.Status {code, message} or {status, message}) as one line of text."""
    if not isinstance(error, dict):
        return one_line(f"the job reported an error: {error}")
    message = error.get("message")
    text = str(message) if message not in (None, "") else "the job reported an error without a message"
    try:  # the container's own error body passed through: its message is what the user needs
        inner = json.loads(text)
        if isinstance(inner, dict) and isinstance(inner.get("error"), dict) and inner["error"].get("message"):
            text = str(inner["error"]["message"])
    except ValueError:
        pass
    status, code = error.get("status"), error.get("code")
    if isinstance(status, str) and status:
        return one_line(f"{text} ({status})")
    if isinstance(code, int) and not isinstance(code, bool):
        name = GRPC_CODES[code] if 0 <= code < len(GRPC_CODES) else f"code {code}"
        return one_line(f"{text} ({name})")
    return one_line(text)


@dataclass
class Output:
    """What a job's output lines gave: rows in file order, the files to write, and the lines skipped (why)."""

    rows: list[Row]
    files: Files = field(default_factory=list)  # empty when a sink took them
    skipped: list[str] = field(default_factory=list)  # "output line 3: ..." for each line not used


def _content(instance: dict[str, Any]) -> str:
    return json.dumps({k: v for k, v in instance.items() if k not in (KEY_FIELD, "parameters")}, sort_keys=True)


def _prompt_seed(instance: dict[str, Any]) -> tuple[str, Any]:
    return str(instance.get("prompt", instance.get("text", ""))), instance.get("seed")


def collect_output(batch: Batch, lines: Iterable[str], *, sink: FileSink | None = None) -> Output:
    """Rows and images from a Vertex AI job's output JSONL lines (results and errors files alike, any order).
    An answer finds its line by "key", or by its echoed "instance" (its content, then prompt and seed). A key
    not in the batch, a duplicate, a garbled line: skipped and counted. A line answered twice keeps its first
    images (an image beats an error). Lines without an answer fail with NO_ANSWER. With `sink`, each line's
    files go there as they are decoded (a 10,000-image job is not held in memory) instead of into .files."""
    by_number = {line.number: line for line in batch.lines}
    by_content: dict[str, list[int]] = {}
    by_prompt_seed: dict[tuple[str, Any], list[int]] = {}
    for line in batch.lines:
        by_content.setdefault(_content(line.instance), []).append(line.number)
        by_prompt_seed.setdefault(_prompt_seed(line.instance), []).append(line.number)
    answered: dict[int, Row] = {}
    files: Files = []
    skipped: list[str] = []

    def find(record: dict[str, Any]) -> tuple[int | None, str]:
        key = record.get(KEY_FIELD)
        instance = record.get("instance")
        if key is None and isinstance(instance, dict):
            key = instance.get(KEY_FIELD)
        if isinstance(key, float) and key.is_integer():
            key = int(key)  # a number passed through protobuf's Struct comes back a double
        if key is not None:
            text = str(key).strip() if isinstance(key, (str, int)) and not isinstance(key, bool) else ""
            # ASCII digits, and few: '²' is isdigit() but no int, and int() refuses thousands of digits
            if not (text.isascii() and text.isdigit() and len(text) <= 18):
                return None, f"key {one_line(repr(key), 60)} is not a line number"
            number = int(text)
            return (number, "") if number in by_number else (None, f"key {number} is not a line of this batch")
        if not isinstance(instance, dict):
            return None, "neither a key nor an instance"
        # Same content, then same prompt and seed: the first of them not answered yet (equal lines, equal images).
        for candidates in (by_content.get(_content(instance)), by_prompt_seed.get(_prompt_seed(instance))):
            for number in candidates or ():
                if number not in answered or answered[number].error:
                    return number, ""
            if candidates:
                return candidates[0], ""
        return None, "its instance matches no line of this batch"

    for position, text in enumerate(lines, start=1):
        where = f"output line {position}"
        if not text.strip():
            continue
        try:
            record = json.loads(text)
        except ValueError:
            skipped.append(f"{where}: not JSON")
            continue
        if not isinstance(record, dict):
            skipped.append(f"{where}: not a JSON object")
            continue
        number, why = find(record)
        if number is None:
            skipped.append(f"{where}: {why}")
            continue
        earlier = answered.get(number)
        if earlier is not None and not earlier.error:
            skipped.append(f"{where}: line {number} was answered already")
            continue
        line = by_number[number]
        if "prediction" in record and record["prediction"] is not None:
            row, decoded = _answered(batch, line, record["prediction"])
        elif "error" in record:
            row, decoded = _row(batch, line, [], error_text(record["error"])), []
        else:
            skipped.append(f"{where}: neither a prediction nor an error")
            continue
        if earlier is not None and row.error:
            skipped.append(f"{where}: line {number} was answered already")
            continue
        answered[number] = row
        if decoded:
            if sink is not None:
                sink(decoded)
            else:
                files.extend(decoded)
    rows = [answered.get(line.number) or _row(batch, line, [], NO_ANSWER) for line in batch.lines]
    return Output(rows, files, skipped)


def rows_from_output(batch: Batch, lines: Iterable[str]) -> tuple[list[Row], list[tuple[str, bytes]]]:
    """The rows and image files from a Vertex AI job's output JSONL lines (results and errors files alike):
    {"key": "137", "prediction": {...}} or {"key": ..., "error": {"code"|"status", "message"}}; `instance`
    instead of `key` is matched by its content. Lines of the batch with no output line are failed rows.
    (collect_output also says which output lines it skipped, and can hand the files on as it goes.)"""
    output = collect_output(batch, lines)
    return output.rows, output.files


def _parse_row(text: bytes) -> Row | None:
    try:
        data = json.loads(text.decode("utf-8"))
    except ValueError:  # UnicodeDecodeError is one
        return None
    if not isinstance(data, dict):
        return None
    line, prompt, seed = data.get("line"), data.get("prompt"), data.get("seed")
    parameters, images, error = data.get("parameters", {}), data.get("images", []), data.get("error")
    if isinstance(line, bool) or not isinstance(line, int) or line < 1:
        return None
    if not isinstance(prompt, str) or isinstance(seed, bool) or not isinstance(seed, int):
        return None
    if not isinstance(parameters, dict) or not isinstance(images, list):
        return None
    if not all(trusted_image(image, line) for image in images):
        return None  # a path that escapes images/ or names another line's image: not ours
    if error is not None and not isinstance(error, str):
        return None
    if error is not None:  # an empty one still says the line failed: --retry-failed runs it, resume does not
        error = one_line(error) or "the line failed (the manifest keeps no message)"
    instance = data.get("instance")  # anything but an object: as if absent (the resume then runs the line again)
    return Row(line, prompt, seed, parameters, list(images), error, instance if isinstance(instance, dict) else None)


def read(path: Path) -> dict[int, Row]:
    """The manifest at `path`, the last row of each line winning (a rerun appends); {} when there is none.
    A damaged line is skipped with nothing lost (its line runs again)."""
    rows: dict[int, Row] = {}
    try:
        file = path.open("rb")
    except FileNotFoundError:
        return {}
    with file:
        while True:
            text = file.readline(MAX_ROW_BYTES + 1)
            if not text:
                break
            if len(text) > MAX_ROW_BYTES:  # a huge line: skip the rest of it without holding it
                while text and not text.endswith(b"\n"):
                    text = file.readline(MAX_ROW_BYTES)
                continue
            if not text.endswith(b"\n"):
                continue  # the last row was cut by a crash: its line runs again
            row = _parse_row(text)
            if row is not None:
                rows[row.line] = row
    return rows


def append(path: Path, rows: Iterable[Row]) -> None:
    """Append rows to the manifest (created with its folder), each line flushed whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as file:
        if file.tell() > 0:
            with path.open("rb") as before:
                before.seek(-1, os.SEEK_END)
                if before.read(1) != b"\n":
                    file.write(b"\n")  # end a row cut by a crash, so the next one is not glued to it
        for row in rows:
            file.write((json.dumps(row.as_dict(), ensure_ascii=False) + "\n").encode())
            file.flush()
        os.fsync(file.fileno())


def write_images(folder: Path, files: Iterable[tuple[str, bytes]]) -> list[Path]:
    """Write image files (paths relative to `folder`, as the rows name them) atomically: an interrupted run
    leaves whole images or none. A path outside images/ is refused (ValueError), never written."""
    written = []
    for name, data in files:
        if not trusted_image(name):
            raise ValueError(f"image path {name!r} is not images/<line>.<ext>: refused")
        written.append(write_atomic(folder / name, data))
    return written


def done_lines(rows: Mapping[int, Row], folder: Path) -> set[int]:
    """The lines whose last row has no error and all of whose images are in `folder` (not empty): a resume
    skips them."""
    done = set()
    for number, row in rows.items():
        trusted = row.error is None and row.images and all(trusted_image(name, number) for name in row.images)
        if trusted and all(_nonempty(folder / name) for name in row.images):
            done.add(number)
    return done


def failed(rows: Mapping[int, Row] | Iterable[Row]) -> list[Row]:
    """The rows with an error, in line order (what --retry-failed runs again)."""
    values = rows.values() if isinstance(rows, Mapping) else rows
    return sorted((row for row in values if row.error), key=lambda row: row.line)


def _nonempty(path: Path) -> bool:
    try:
        return path.is_file() and path.stat().st_size > 0
    except OSError:
        return False
