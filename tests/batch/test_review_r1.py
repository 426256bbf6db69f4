"""Review R1 of issue 18: hostile prompts files, resume after an edit, and a server answering the wrong count.

The local runner is driven against a real HTTP stand-in on loopback that answers real PNG images (made by
Pillow) and keeps every request body, so what was asked for is counted, not assumed.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdxlctl.batch import Batch, BatchOptions, Line, Submission, lines
from sdxlctl.batch.lines import BatchInputError
from sdxlctl.config import Config
from sdxlctl.errors import UsageError
from sdxlctl.local import batch as local_batch
from sdxlctl.state import Resource, StateStore
from tests.servers import serve_app

PARAMETERS = {"num_inference_steps": 2, "width": 64, "height": 64, "output_format": "png"}


def _png() -> str:
    import base64

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@contextlib.contextmanager
def stand_in(extra: int = 0) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """A predict server answering one PNG per instance (and `extra` predictions more), keeping each body."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    bodies: list[dict[str, Any]] = []
    prediction = {"images": [_png()], "seeds": [1], "width": 8, "height": 8, "output_format": "png"}

    async def predict(request: Request) -> JSONResponse:
        body = json.loads(await request.body())
        bodies.append(body)
        count = len(body["instances"]) + extra
        return JSONResponse({"predictions": [prediction] * count})

    with serve_app(Starlette(routes=[Route("/predict", predict, methods=["POST"])])) as server:
        yield server.url, bodies


def deployed(tmp_path: Path, url: str) -> tuple[Config, StateStore]:
    config = Config(path=tmp_path / "sdxlctl.toml")
    store = StateStore(config.home)
    store.record("sdxl", Resource(kind="local-server", name="sdxl-server", target="local", url=url, details={}))
    return config, store


def _run(config: Config, store: StateStore, out: Path, *instances: dict[str, Any]) -> Any:
    batch = Batch(Path("prompts.jsonl"), tuple(Line(n, i) for n, i in enumerate(instances, 1)), dict(PARAMETERS))
    return local_batch.run(config, store, Submission(batch, str(out), batch_size=4))


def test_an_edited_line_with_its_own_seed_runs_again_and_an_unchanged_one_does_not(tmp_path: Path) -> None:
    # Failed first: the resume compared only prompt, seed and parameters, so a line whose style or negative
    # prompt was edited (or a rerun with --style, which the door puts into each line) kept its old image.
    with stand_in() as (url, bodies):
        config, store = deployed(tmp_path, url)
        out = tmp_path / "out"
        fox, owl = {"prompt": "a fox", "seed": 7}, {"prompt": "an owl", "seed": 8}
        _run(config, store, out, fox, owl)
        result = _run(config, store, out, {**fox, "style": "anime"}, owl)
        assert [body["instances"] for body in bodies[1:]] == [[{**fox, "style": "anime"}]]
        assert (result.done, result.skipped) == (1, 1)
        again = _run(config, store, out, {**fox, "style": "anime"}, owl)
        assert len(bodies) == 2 and again.skipped == 2
        rows = [json.loads(text) for text in (out / "manifest.jsonl").read_text().splitlines()]
        assert rows[-1]["instance"] == {**fox, "style": "anime"}


def test_a_server_answering_more_predictions_than_lines_fails_them_not_pairs_them_by_guess(tmp_path: Path) -> None:
    # Failed first: extra predictions were dropped silently and the rest paired with the lines by position.
    with stand_in(extra=1) as (url, _):
        config, store = deployed(tmp_path, url)
        result = _run(config, store, tmp_path / "out", {"prompt": "a fox", "seed": 1}, {"prompt": "an owl", "seed": 2})
        assert result.done == 0
        assert [row.error for row in result.failed] == ["the server answered 3 predictions for 2 lines"] * 2
        assert not list((tmp_path / "out" / "images").glob("*"))


def _read_in_child(path: Path) -> subprocess.CompletedProcess[str]:
    """lines.read in a child process, so a reader that blocks on a FIFO or reads /dev/zero for ever is a
    failed test (the timeout) rather than a hung suite."""
    code = (
        "import sys; from pathlib import Path; from sdxlctl.batch import lines\n"
        "try:\n    lines.read(Path(sys.argv[1]), {}, max_lines=10)\n"
        "except lines.BatchInputError as exc:\n    print(exc.message)\n"
    )
    return subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=15, check=True
    )


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not Path("/dev/zero").exists(), reason="needs a FIFO and /dev/zero")
def test_a_fifo_or_a_link_to_dev_zero_is_refused_in_one_line_not_read_for_ever(tmp_path: Path) -> None:
    # Failed first: the FIFO blocked the open for ever and /dev/zero was read for ever, one 64 KiB piece at a time.
    os.mkfifo(tmp_path / "fifo.txt")
    (tmp_path / "zero.txt").symlink_to("/dev/zero")
    for name in ("fifo.txt", "zero.txt"):
        said = _read_in_child(tmp_path / name).stdout.strip()
        assert said == f"{tmp_path / name} is not a regular file: a prompts file is a .txt, .jsonl or .csv file"
    config = Config(path=tmp_path / "sdxlctl.toml")
    with pytest.raises(UsageError, match="not a regular file"):  # the door said 'does not exist' of a FIFO
        from sdxlctl.batch import door

        door.plan(config, StateStore(config.home), BatchOptions(source=tmp_path / "fifo.txt"))


def test_a_json_line_naming_a_field_twice_is_refused_naming_it(tmp_path: Path) -> None:
    # Failed first: json kept the last of the two silently, so the image was not of the prompt the user read first.
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "a fox", "seed": 1, "prompt": "an owl"}\n{"prompt": "a cat"}\n')
    with pytest.raises(BatchInputError) as raised:
        lines.read(path, {}, max_lines=10)
    assert raised.value.problems == ("prompts.jsonl line 1: prompt: named twice in the line's JSON object",)


def test_an_out_folder_holding_another_files_batch_is_refused_and_its_images_kept(tmp_path: Path) -> None:
    # Failed first: a second prompts.txt (another folder, same stem: the same default ./batch-prompts/) ran into
    # the first one's folder, overwrote its images line by line and left the rest of its rows in the manifest.
    with stand_in() as (url, bodies):
        config, store = deployed(tmp_path, url)
        out = tmp_path / "batch-prompts"

        def batch_of(source: Path, prompt: str) -> Submission:
            batch = Batch(source, (Line(1, {"prompt": prompt, "seed": 1}),), dict(PARAMETERS))
            return Submission(batch, str(out), batch_size=4)

        local_batch.run(config, store, batch_of(tmp_path / "a" / "prompts.txt", "a fox"))
        before = (out / "images" / "000001.png").read_bytes(), (out / "manifest.jsonl").read_bytes()
        with pytest.raises(UsageError) as raised:
            local_batch.run(config, store, batch_of(tmp_path / "b" / "prompts.txt", "an owl"))
        assert raised.value.message == (
            f"{out} holds the batch of {tmp_path / 'a' / 'prompts.txt'}, not of {tmp_path / 'b' / 'prompts.txt'}"
        )
        assert "--out" in (raised.value.hint or "")
        assert len(bodies) == 1
        assert ((out / "images" / "000001.png").read_bytes(), (out / "manifest.jsonl").read_bytes()) == before
        edited = local_batch.run(config, store, batch_of(tmp_path / "a" / "prompts.txt", "a red fox"))
        assert edited.done == 1 and len(bodies) == 2  # the same file, edited: its own folder, resumed


def _b64_png() -> str:
    return _png()


def test_hostile_output_keys_are_skipped_not_a_crash() -> None:
    # Failed first: '²' is str.isdigit() but not int(), and int() refuses 5,000 digits: collect_output raised
    # ValueError on a Vertex AI output line (a job's output is not ours to trust).
    from sdxlctl.batch import manifest

    batch = Batch(Path("p.txt"), (Line(1, {"prompt": "a fox", "seed": 1}),), {"output_format": "png"})
    prediction = {"images": [_b64_png()], "output_format": "png"}
    hostile = [json.dumps({"key": key, "prediction": prediction}) for key in ("²", "9" * 5000, "-1", " 1e3")]
    output = manifest.collect_output(batch, [*hostile, json.dumps({"key": "1", "prediction": prediction})])
    assert [row.error for row in output.rows] == [None]
    assert len(output.skipped) == 4 and all("is not a line" in why for why in output.skipped)


def test_an_answer_with_more_images_than_num_images_fails_its_line_before_decoding_them() -> None:
    # Failed first: a line's answer of a million images was decoded and written, one file each.
    from sdxlctl.batch import manifest

    batch = Batch(Path("p.txt"), (Line(1, {"prompt": "a fox", "seed": 1}),), {"output_format": "png", "num_images": 2})
    answer = {"predictions": [{"images": [_b64_png()] * 3, "output_format": "png"}]}
    rows, files = manifest.rows_from_answer(batch, [1], answer)
    assert rows[0].error == "the answer for this line carries 3 images, more than num_images 2" and files == []
    output = manifest.collect_output(batch, [json.dumps({"key": "1", "prediction": answer["predictions"][0]})])
    assert output.rows[0].error == "the answer for this line carries 3 images, more than num_images 2"


def test_a_csv_seed_is_ascii_digits_as_json_would_have_it(tmp_path: Path) -> None:
    # Failed first: int() took '٣' (an Arabic-Indic three) as 3 and '1_000' as 1000, seeds the file does not show.
    path = tmp_path / "prompts.csv"
    path.write_text("prompt,seed\na fox,\u0663\nan owl,1_000\na cat, 42 \nan ant,+-5\n", encoding="utf-8")
    with pytest.raises(BatchInputError) as raised:
        lines.read(path, {}, max_lines=10)
    assert raised.value.problems == (
        "prompts.csv line 2: seed: '\u0663' is not an integer from 0 to 4294967295",
        "prompts.csv line 3: seed: '1_000' is not an integer from 0 to 4294967295",
        "prompts.csv line 5: seed: '+-5' is not an integer from 0 to 4294967295",
    )


def test_retry_failed_whose_failed_lines_are_no_longer_in_the_file_runs_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Failed first: the file lost its lines 4 and 5 (the failed ones) since; --retry-failed planned a batch of
    # no lines (on vertex a job of an empty input, a replica started for nothing) instead of saying so.
    from sdxlctl.batch import Row as ManifestRow
    from sdxlctl.batch import door, manifest
    from sdxlctl.steps import Notice

    monkeypatch.chdir(tmp_path)
    source = tmp_path / "fox.txt"
    source.write_text("a fox\nan owl\na cat\n")
    rows = [ManifestRow(n, "p", n, {}, [], "refused") for n in (4, 5)]
    manifest.append(tmp_path / "batch-fox" / "manifest.jsonl", rows)
    config = Config.model_validate({"target": "local", "gcp": {"project": "demo-project"}})
    result = door.run(config, StateStore(tmp_path), BatchOptions(source, retry_failed=True))
    assert isinstance(result, Notice) and "no failed lines" in result.message


def test_an_out_that_is_a_file_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    # Failed first: NotADirectoryError out of the manifest's reader.
    with stand_in() as (url, bodies):
        config, store = deployed(tmp_path, url)
        (tmp_path / "taken").write_text("a file of the user's\n")
        with pytest.raises(UsageError) as raised:
            _run(config, store, tmp_path / "taken", {"prompt": "a fox", "seed": 1})
        assert raised.value.message == f"--out {tmp_path / 'taken'} is a file; the images need a folder"
        assert bodies == [] and (tmp_path / "taken").read_text() == "a file of the user's\n"


def test_drawn_seeds_are_pinned_values_not_whatever_this_interpreter_computes() -> None:
    # The same file must give the same images next year on another Python: pinned numbers (sha256 of the line
    # number and the canonical, ASCII-escaped, key-sorted JSON), not a recomputation of the same formula.
    from sdxlctl.batch.lines import drawn_seed

    assert drawn_seed(1, {"prompt": "a red fox"}) == 1132859288
    assert drawn_seed(137, {"style": "anime", "prompt": "un renard roux, café"}) == 310799354
