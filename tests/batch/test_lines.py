"""lines.read: a prompts file (.txt, .jsonl, .csv) into a checked Batch, or one error listing the bad lines
with file, line and field, before anything is uploaded or started."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from sdxlctl.batch.lines import BatchInputError, check_parameters, drawn_seed, read
from sdxlctl.errors import ExitCode, UsageError

SHARED = {"num_inference_steps": 2, "width": 64, "height": 64}


def write(tmp_path: Path, name: str, text: str | bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


def refusal(path: Path, max_lines: int = 1000) -> BatchInputError:
    with pytest.raises(BatchInputError) as raised:
        read(path, SHARED, max_lines=max_lines)
    return raised.value


def jsonl(*lines: Any) -> str:
    return "".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines)


def test_a_txt_file_is_one_prompt_a_line_numbered_as_the_file_and_seeded_the_same_every_time(tmp_path: Path) -> None:
    path = write(tmp_path, "prompts.txt", "a red fox\n\n   \n  a cat in snow  \r\nlast line without newline")
    batch = read(path, SHARED, max_lines=10)
    assert [(line.number, line.prompt) for line in batch.lines] == [
        (1, "a red fox"),
        (4, "a cat in snow"),
        (5, "last line without newline"),
    ]
    assert all(line.seed_drawn for line in batch.lines)
    canonical = '{"prompt":"a red fox"}'
    expected = int.from_bytes(hashlib.sha256(f"1\n{canonical}".encode()).digest()[:4], "big")
    assert batch.lines[0].seed == expected == drawn_seed(1, {"prompt": "a red fox"})
    assert [line.seed for line in read(path, SHARED, max_lines=10).lines] == [line.seed for line in batch.lines]
    assert batch.parameters == SHARED and batch.images == 3 and batch.source == path


def test_a_jsonl_file_keeps_given_seeds_and_takes_the_servers_instance_fields(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "p.jsonl",
        jsonl(
            {"prompt": "a fox", "seed": 42, "negative_prompt": "blurry", "style": "Cinematic"},
            "",
            {"text": "model garden's name", "seed": 7.0, "prompt_2": "two", "negative_prompt_2": None},
            {"prompt": "no seed", "style": "none"},
        ),
    )
    lines = read(path, {}, max_lines=10).lines
    assert [line.number for line in lines] == [1, 3, 4]
    assert lines[0].instance == {"prompt": "a fox", "seed": 42, "negative_prompt": "blurry", "style": "Cinematic"}
    assert (lines[1].instance, lines[1].prompt) == (
        {"text": "model garden's name", "seed": 7, "prompt_2": "two"},
        "model garden's name",
    )
    assert [line.seed_drawn for line in lines] == [False, False, True]
    assert lines[2].seed == drawn_seed(4, {"prompt": "no seed", "style": "none"})


def test_a_csv_file_has_a_header_empty_cells_are_absent_and_a_row_is_numbered_by_the_line_it_starts_on(
    tmp_path: Path,
) -> None:
    text = '\ufeffprompt,seed,style\n"a fox, in snow",12,\n\n"two\nlines",,anime\nonly a prompt\n'
    lines = read(write(tmp_path, "p.csv", text), {}, max_lines=10).lines
    assert (lines[0].number, lines[0].seed, lines[0].seed_drawn) == (2, 12, False)
    assert lines[0].instance == {"prompt": "a fox, in snow", "seed": 12}
    assert (lines[1].number, lines[1].instance["prompt"], lines[1].instance["style"]) == (4, "two\nlines", "anime")
    assert (lines[2].number, lines[2].prompt, lines[2].seed_drawn) == (6, "only a prompt", True)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (
            '{"prompt": "a fox",}',
            "p.jsonl line 2: not valid JSON: Expecting property name enclosed in double quotes (column 20)",
        ),
        ('{"prompt": "a cat"', "p.jsonl line 2: not valid JSON: Expecting ',' delimiter (column 19)"),
        ("[1, 2]", 'p.jsonl line 2: a JSON object is required ({"prompt": "...", "seed": 42}), not a list'),
        ('{"prompt": "a", "seed": NaN}', "p.jsonl line 2: not valid JSON: NaN is not a JSON number"),
        (
            {"prompt": "a", "colour": "red"},
            "p.jsonl line 2: colour: unknown field; allowed: prompt, text, negative_prompt, prompt_2, "
            "negative_prompt_2, style, seed",
        ),
        ({"prompt": ""}, "p.jsonl line 2: prompt: a non-empty prompt (or text) is required"),
        ({"prompt": " "}, "p.jsonl line 2: prompt: a non-empty prompt (or text) is required"),
        ({"prompt": "x" * 2001}, "p.jsonl line 2: prompt: too long: at most 2000 characters"),
        (
            {"prompt": "a", "negative_prompt": "x" * 2001},
            "p.jsonl line 2: negative_prompt: too long: at most 2000 characters",
        ),
        (
            {"prompt": "a", "text": "b"},
            "p.jsonl line 2: text: give either prompt or text (Model Garden's name for it), not both",
        ),
        ({"prompt": "a", "seed": "42"}, "p.jsonl line 2: seed: '42' is not an integer from 0 to 4294967295"),
        ({"prompt": "a", "seed": -1}, "p.jsonl line 2: seed: -1 is not an integer from 0 to 4294967295"),
        ({"prompt": "a", "seed": 2**32}, "p.jsonl line 2: seed: 4294967296 is not an integer from 0 to 4294967295"),
        ({"prompt": "a", "seed": True}, "p.jsonl line 2: seed: true is not an integer from 0 to 4294967295"),
        ({"prompt": "a", "seed": 1.5}, "p.jsonl line 2: seed: 1.5 is not an integer from 0 to 4294967295"),
        (
            {"prompt": "a", "style": "vaporwave"},
            "p.jsonl line 2: style: unknown style 'vaporwave'; allowed: none, 3d-model",
        ),
        (
            {"prompt": "a", "image": "iVBOR"},
            "p.jsonl line 2: image: per-line image is not supported in a batch; shared parameters come from flags",
        ),
        (
            {"prompt": "a", "mask_image": "x"},
            "p.jsonl line 2: mask_image: per-line mask_image is not supported in a batch",
        ),
        (
            {"prompt": "a", "parameters": {"width": 64}},
            "p.jsonl line 2: parameters: per-line parameters is not supported in a batch",
        ),
        (
            {"prompt": "a", "lora_id": "hf://a/b"},
            "p.jsonl line 2: lora_id: per-line lora_id is not supported in a batch",
        ),
        ({"prompt": "a", "lora": [{"name": "x"}]}, "p.jsonl line 2: lora: per-line lora is not supported in a batch"),
        ({"prompt": "a", "key": "7"}, "p.jsonl line 2: key: unknown field"),
        ({"prompt": [[[[[["deep"]]]]]]}, "p.jsonl line 2: JSON nested deeper than 6 levels"),
        ("[" * 5_000 + "]" * 5_000, "p.jsonl line 2: JSON nested deeper than 6 levels"),
        ({"prompt": "x" * 70_000}, "p.jsonl line 2: longer than 64 KiB: not a line of prompts"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_a_bad_jsonl_line_is_refused_with_file_line_and_field(tmp_path: Path, line: Any, expected: str) -> None:
    error = refusal(write(tmp_path, "p.jsonl", jsonl({"prompt": "fine"}, line, {"prompt": "fine too"})))
    assert error.message.startswith(expected), error.message
    assert "\n" not in error.message and error.count == 1
    assert isinstance(error, UsageError) and error.exit_code == ExitCode.USAGE
    assert error.hint and "nothing was uploaded or started" in error.hint


def test_the_first_ten_bad_lines_are_listed_and_the_rest_counted(tmp_path: Path) -> None:
    lines = [{"prompt": f"p{n}"} for n in range(1, 201)]
    for n in (137, *range(150, 170)):
        lines[n - 1] = {"prompt": ""}
    error = refusal(write(tmp_path, "big.jsonl", jsonl(*lines)))
    shown = error.message.splitlines()
    assert shown[0] == "big.jsonl line 137: prompt: a non-empty prompt (or text) is required"
    assert [s.split(":")[0] for s in shown[1:10]] == [f"big.jsonl line {n}" for n in range(150, 159)]
    assert shown[10] == "and 11 more bad lines"
    assert (error.count, len(error.problems)) == (21, 10)


def test_a_file_over_max_lines_is_refused_without_reading_past_the_limit(tmp_path: Path) -> None:
    # 100,000 lines and, past the limit, a byte that is not UTF-8: the limit is what is said
    path = write(tmp_path, "many.txt", b"a fox\n" * 100_000 + b"\xff\n")
    error = refusal(path, max_lines=50_000)
    assert error.message == "many.txt has more than 50000 prompts, the limit ([batch] max_lines = 50000)"
    assert "[batch] max_lines" in (error.hint or "")
    assert len(read(write(tmp_path, "exact.txt", b"a fox\n" * 3 + b"\n\n"), {}, max_lines=3).lines) == 3


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (b"a fox\na caf\xe9\n", "p.txt line 2 is not UTF-8 text (byte 0xe9 at column 6)"),
        (
            "a fox\nna\u00efve \xff".encode("utf-8").replace(b"\xc3\xbf", b"\xff"),
            "p.txt line 2 is not UTF-8 text (byte 0xff at column 7)",
        ),
        (b"", "p.txt has no prompts: it is empty, or every line is blank"),
        (b"\n  \n\r\n", "p.txt has no prompts: it is empty, or every line is blank"),
    ],
)
def test_a_file_that_is_not_utf8_or_has_no_prompts_is_refused(tmp_path: Path, data: bytes, expected: str) -> None:
    assert refusal(write(tmp_path, "p.txt", data)).message == expected


def test_a_line_that_never_ends_is_refused_without_reading_it_whole(tmp_path: Path) -> None:
    error = refusal(write(tmp_path, "p.txt", b"a fox\n" + b"x" * 5_000_000 + b"\nok\n"))
    assert error.message == "p.txt line 2: longer than 64 KiB: not a line of prompts"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("prompt,colour\na,b\n", "p.csv line 1: column 'colour': unknown field; allowed: prompt, text,"),
        ("prompt,image\na,b\n", "p.csv line 1: image: per-line image is not supported in a batch"),
        ("prompt,seed,prompt\na,1,b\n", "p.csv line 1: column 'prompt' is named twice"),
        ("prompt,seed\na,twelve\n", "p.csv line 2: seed: 'twelve' is not an integer from 0 to 4294967295"),
        ("prompt,seed\na,-3\n", "p.csv line 2: seed: -3 is not an integer from 0 to 4294967295"),
        ("prompt,seed\n,3\n", "p.csv line 2: prompt: a non-empty prompt (or text) is required"),
        ("prompt,seed\na,1,extra\n", "p.csv line 2: 3 cells, but the header names 2 columns"),
        ("prompt\n", "p.csv has no prompts"),
        ('prompt,seed\nfine,1\n"never closed,1\nmore\n', "p.csv line 3: not a CSV row (unexpected end of data)"),
        ('prompt,seed\n"a" fox,1\n', "p.csv line 2: not a CSV row (',' expected after '\"')"),
    ],
)
def test_a_bad_csv_is_refused_with_line_and_field(tmp_path: Path, text: str, expected: str) -> None:
    assert refusal(write(tmp_path, "p.csv", text)).message.startswith(expected)


def test_only_txt_jsonl_and_csv_are_read(tmp_path: Path) -> None:
    error = refusal(write(tmp_path, "prompts.json", "[]"))
    assert error.message.startswith("prompts.json: a prompts file is .txt (one prompt a line), .jsonl")
    assert ".csv" in error.message
    missing = refusal(tmp_path / "missing.txt")
    assert missing.message.endswith("missing.txt: no such file")


def test_shared_parameters_are_normalised_as_the_server_reads_them() -> None:
    given = {"num_inference_steps": 30.0, "scheduler": "DPMPP-2M-Karras", "guidance_scale": 7, "output_format": "png"}
    assert check_parameters(given) == {
        "num_inference_steps": 30,
        "scheduler": "dpmpp_2m_karras",
        "guidance_scale": 7,
        "output_format": "png",
    }
    assert check_parameters({}) == {}
    assert check_parameters({"refine": None, "width": None, "quality": 80}) == {"quality": 80}  # None: not given


@pytest.mark.parametrize(
    ("parameters", "expected"),
    [
        (
            {"num_inference_steps": 151},
            "parameters.num_inference_steps (--steps): Input should be less than or equal to 150",
        ),
        ({"width": 100}, "parameters.width (--width): must be a multiple of 8 between 64 and 2048"),
        ({"output_format": "gif"}, "parameters.output_format (--format): Input should be 'png', 'jpeg' or 'webp'"),
        ({"quality": 0}, "parameters.quality (--quality): Input should be greater than or equal to 1"),
        ({"guidance_scale": 31}, "parameters.guidance_scale (--guidance): Input should be less than or equal to 30"),
        ({"num_images": 0}, "parameters.num_images (--num-images): Input should be greater than or equal to 1"),
        ({"scheduler": "plms"}, "parameters.scheduler (--scheduler): unknown scheduler 'plms'; allowed: euler,"),
        ({"refine": "twice"}, "parameters.refine: unknown refine 'twice'; allowed: none, expert_ensemble, base_image"),
        ({"strength": 0.5}, "parameters.strength: strength applies to an input image"),
        (
            {"refine": "base_image", "num_inference_steps": 3},
            "parameters.refine_steps: base_image refines with strength 0.3",
        ),
        ({"steps": 4}, "parameters.steps: unknown field; allowed: num_inference_steps, guidance_scale,"),
    ],
    ids=lambda value: str(value)[:40],
)
def test_bad_shared_parameters_are_refused_naming_the_field_and_its_flag(
    tmp_path: Path, parameters: dict[str, Any], expected: str
) -> None:
    with pytest.raises(BatchInputError) as raised:
        check_parameters(parameters)
    assert raised.value.message.startswith(expected), raised.value.message
    path = write(tmp_path, "p.txt", "a fox\n")
    with pytest.raises(BatchInputError, match=r"^parameters"):
        read(path, parameters, max_lines=10)
