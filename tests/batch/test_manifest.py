"""manifest.py and files.py: images and manifest rows from the server's answers and Vertex AI's output lines,
read back for resume; real files in tmp_path, real PNG/JPEG/WebP from Pillow, hostile inputs."""

from __future__ import annotations

import base64
import io
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sdxlctl.batch import MANIFEST, Batch, Line, Row, manifest
from sdxlctl.batch import files as batch_files
from tests.servers import gcs_emulator


def image(fmt: str, shade: int = 0) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (shade, 80, 160)).save(buffer, fmt.upper())
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prediction(fmt: str, *images: bytes) -> dict[str, Any]:
    return {"images": [b64(i) for i in images], "seeds": [1], "width": 8, "height": 8, "output_format": fmt}


def make_batch(n: int = 3, **parameters: Any) -> Batch:
    lines = tuple(Line(i, {"prompt": f"prompt {i}", "seed": 100 + i}) for i in range(1, n + 1))
    return Batch(Path("prompts.txt"), lines, {"num_inference_steps": 2, **parameters})


def test_image_names_follow_the_line_number_and_the_format() -> None:
    assert manifest.image_name(137, 0, "jpeg") == "images/000137.jpg"
    assert manifest.image_name(137, 2, "png") == "images/000137-2.png"
    assert manifest.image_name(1234567, 0, "webp") == "images/1234567.webp"
    assert manifest.trusted_image("images/1234567-1.webp", 1234567)
    with pytest.raises(ValueError, match="output_format 'gif'"):
        manifest.image_name(1, 0, "gif")


@pytest.mark.parametrize("fmt, ext", [("png", "png"), ("jpeg", "jpg"), ("webp", "webp")])
def test_an_answer_becomes_rows_and_image_files(fmt: str, ext: str, tmp_path: Path) -> None:
    batch = make_batch(2, output_format=fmt, num_images=2)
    first, second = image(fmt, 1), image(fmt, 2)
    answer = {"predictions": [prediction(fmt, first, second), prediction(fmt, second)]}
    rows, files = manifest.rows_from_answer(batch, [2, 1], answer, images_dir="images")
    assert [row.line for row in rows] == [2, 1]
    assert rows[0] == Row(2, "prompt 2", 102, batch.parameters, [f"images/000002.{ext}", f"images/000002-1.{ext}"])
    assert files == [
        (f"images/000002.{ext}", first),
        (f"images/000002-1.{ext}", second),
        (f"images/000001.{ext}", second),
    ]
    manifest.write_images(tmp_path, files)
    manifest.append(tmp_path / MANIFEST, rows)
    assert (tmp_path / f"images/000002-1.{ext}").read_bytes() == second
    assert manifest.read(tmp_path / MANIFEST) == {2: rows[0], 1: rows[1]}
    assert manifest.done_lines(manifest.read(tmp_path / MANIFEST), tmp_path) == {1, 2}


def test_a_bad_image_fails_its_line_and_not_the_others() -> None:
    batch = make_batch(6, output_format="png")
    good = prediction("png", image("png"))
    answer = {
        "predictions": [
            good,
            {"images": ["not base64!"], "output_format": "png"},
            {"images": [b64(b"<html>a proxy page</html>")], "output_format": "png"},
            {"images": [], "output_format": "png"},
            "a string",
        ]
    }
    rows, files = manifest.rows_from_answer(batch, [1, 2, 3, 4, 5], answer, images_dir="images")
    assert [f for f, _ in files] == ["images/000001.png"]
    errors = [row.error for row in rows]
    assert errors[0] is None
    assert errors[1] == "image 0 of the answer is not base64"
    assert errors[2] == "image 0 of the answer is not a png image"
    assert errors[3] == "the answer for this line carries no images"
    assert errors[4] == "the answer for this line is str, not a prediction object"
    assert all(row.images == [] for row in rows[1:])
    # One answer short (or over): which prediction is whose is a guess, so every line of the request fails.
    rows, files = manifest.rows_from_answer(batch, [1, 2, 3, 4, 5, 6], answer, images_dir="images")
    assert [row.error for row in rows] == ["the server answered 5 predictions for 6 lines"] * 6 and files == []
    rows, files = manifest.rows_from_answer(batch, [1], {"oops": 1}, images_dir="images")
    assert rows[0].error == "the server's answer carries no predictions" and files == []


def output_lines(batch: Batch, png: bytes) -> list[str]:
    """Both shapes Vertex AI may write, in no particular order, with the damage a real job's files may hold."""
    line3 = {**batch.lines[2].instance, "seed": 103.0, "parameters": batch.parameters}  # Struct made it a double
    return [
        json.dumps({"instance": line3, "prediction": prediction("png", png)}),
        json.dumps({"key": "1", "prediction": prediction("png", png, png)}),
        json.dumps({"key": "2", "error": {"code": 3, "message": "steps: must be at most 100"}}),
        json.dumps({"key": "4", "error": {"status": "INVALID_ARGUMENT", "message": "prompt:\n  too\tlong"}}),
        '{"key": "5", "prediction": {"images": ["cut',  # a garbled line
        json.dumps({"key": "999", "prediction": prediction("png", png)}),  # not a line of the batch
        json.dumps({"key": "1", "prediction": prediction("png", b"\x89PNG\r\n\x1a\nother")}),  # a duplicate
        json.dumps({"key": "6", "error": {"code": 13, "message": '{"error": {"code": 500, "message": "CUDA OOM"}}'}}),
        json.dumps({"key": "6", "prediction": prediction("png", png)}),  # retried: the image wins over the error
        json.dumps({"key": "6", "error": {"code": 14, "message": "late"}}),
        json.dumps(["a", "list"]),
        json.dumps({"key": {"nested": 1}, "prediction": {}}),
        json.dumps({"instance": {"prompt": "unknown", "seed": 1}, "prediction": prediction("png", png)}),
        "",
    ]


def test_output_lines_of_both_shapes_find_their_lines(tmp_path: Path) -> None:
    batch = make_batch(7, output_format="png", num_images=2)
    png = image("png")
    out = manifest.collect_output(batch, output_lines(batch, png))
    rows = {row.line: row for row in out.rows}
    assert [row.line for row in out.rows] == [1, 2, 3, 4, 5, 6, 7]  # the file's order, whatever the output's
    assert rows[1].images == ["images/000001.png", "images/000001-1.png"] and rows[1].error is None
    assert rows[3].images == ["images/000003.png"] and rows[3].seed == 103
    assert rows[2].error == "steps: must be at most 100 (INVALID_ARGUMENT)"
    assert rows[4].error == "prompt: too long (INVALID_ARGUMENT)"
    assert rows[5].error == rows[7].error == "no answer in the job's output"
    assert rows[6].error is None and rows[6].images == ["images/000006.png"]
    assert all(data == png for _, data in out.files)  # the duplicate's other bytes were not taken
    assert [name for name, _ in out.files] == [
        "images/000003.png",
        "images/000001.png",
        "images/000001-1.png",
        "images/000006.png",
    ]
    assert out.skipped == [
        "output line 5: not JSON",
        "output line 6: key 999 is not a line of this batch",
        "output line 7: line 1 was answered already",
        "output line 10: line 6 was answered already",
        "output line 11: not a JSON object",
        "output line 12: key {'nested': 1} is not a line number",
        "output line 13: its instance matches no line of this batch",
    ]
    assert manifest.rows_from_output(batch, output_lines(batch, png)) == (out.rows, out.files)


def test_a_server_error_in_the_message_is_unwrapped_and_codes_are_named() -> None:
    body = '{"error": {"code": 500, "message": "CUDA out of memory"}}'
    assert manifest.error_text({"code": 13, "message": body}) == "CUDA out of memory (INTERNAL)"
    assert manifest.error_text({"code": 99, "message": "odd"}) == "odd (code 99)"
    assert manifest.error_text({}) == "the job reported an error without a message"
    assert manifest.error_text("boom") == "the job reported an error: boom"
    assert len(manifest.error_text({"message": "x" * 10_000})) == 500


def test_equal_instances_without_keys_each_get_an_answer_and_a_sink_takes_the_files() -> None:
    same = {"prompt": "a cat", "seed": 7}
    batch = Batch(Path("p.jsonl"), (Line(1, same), Line(2, dict(same)), Line(3, {**same, "style": "x"})), {})
    jpeg = image("jpeg")
    lines = [json.dumps({"instance": {**same, "style": "x"}, "prediction": prediction("jpeg", jpeg)})]
    lines += [json.dumps({"instance": same, "prediction": prediction("jpeg", jpeg)})] * 2
    taken: list[list[tuple[str, bytes]]] = []
    out = manifest.collect_output(batch, lines, sink=taken.append)
    assert [row.images for row in out.rows] == [["images/000001.jpg"], ["images/000002.jpg"], ["images/000003.jpg"]]
    assert out.files == [] and [name for chunk in taken for name, _ in chunk] == [
        "images/000003.jpg",
        "images/000001.jpg",
        "images/000002.jpg",
    ]
    assert out.skipped == []


def good_row(n: int, **changes: Any) -> dict[str, Any]:
    row = Row(n, f"prompt {n}", 100 + n, {"num_inference_steps": 2}, [f"images/{n:06d}.png"])
    return {**row.as_dict(), **changes}


def test_a_hostile_or_damaged_manifest_is_read_without_trusting_it(tmp_path: Path) -> None:
    lines = [
        json.dumps(good_row(1, error="first try failed")),
        json.dumps(good_row(1)),  # a rerun appended: the last row wins
        json.dumps(good_row(2, images=["../../etc/passwd"])),
        json.dumps(good_row(3, images=["/etc/passwd"])),
        json.dumps(good_row(4, images=["images/../manifest.jsonl"])),
        json.dumps(good_row(5, images=["images/000006.png"])),  # another line's image
        json.dumps(good_row(7, line="7")),
        json.dumps(good_row(8, seed=True)),
        json.dumps(good_row(9, parameters=[])),
        json.dumps(good_row(10, error={"code": 3})),
        json.dumps(good_row(11, images="images/000011.png")),
        json.dumps(good_row(12, error="")),
        json.dumps(good_row(13, line=-1)),
        "[1, 2]",
        '{"line": 14, "prompt": "' + "x" * (manifest.MAX_ROW_BYTES + 10) + '", "seed": 1}',
        json.dumps(good_row(15)),
    ]
    path = tmp_path / MANIFEST
    path.write_bytes(
        ("\n".join(lines) + "\n").encode() + b"\xff\xfe garbage\n" + json.dumps(good_row(16)).encode()[:40]
    )
    rows = manifest.read(path)
    assert sorted(rows) == [1, 12, 15]
    assert rows[1].error is None
    assert rows[12].error == "the line failed (the manifest keeps no message)"
    assert [row.line for row in manifest.failed(rows)] == [12]
    assert manifest.read(tmp_path / "none.jsonl") == {}


def test_append_ends_a_row_a_crash_cut_so_the_next_one_is_read(tmp_path: Path) -> None:
    path = tmp_path / "out" / MANIFEST
    manifest.append(path, [Row(**good_row(1))])
    with path.open("ab") as file:
        file.write(json.dumps(good_row(2)).encode()[:30])  # the crash
    manifest.append(path, [Row(**good_row(3)), Row(**good_row(4))])
    assert sorted(manifest.read(path)) == [1, 3, 4]


def test_done_lines_need_every_image_on_disk_and_no_error(tmp_path: Path) -> None:
    rows = {n: Row(**good_row(n)) for n in range(1, 5)}
    rows[5] = Row(**good_row(5, error="refused"))
    manifest.write_images(tmp_path, [("images/000001.png", image("png")), ("images/000002.png", image("png"))])
    (tmp_path / "images/000003.png").write_bytes(b"")  # an empty file is no image
    rows[2] = Row(**good_row(2, images=["images/000002.png", "images/000002-1.png"]))  # its second is gone
    rows[6] = Row(**good_row(6, images=[]))
    assert manifest.done_lines(rows, tmp_path) == {1}


def test_image_writes_are_atomic_and_stay_inside_images(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ValueError, match=r"'\.\./escape\.png' is not images/<line>\.<ext>"):
        manifest.write_images(tmp_path, [("../escape.png", b"x")])
    assert not (tmp_path.parent / "escape.png").exists()
    manifest.write_images(tmp_path, [("images/000001.png", b"old")])

    def cut(fd: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C with the new bytes written but not yet renamed into place

    monkeypatch.setattr(os, "fsync", cut)
    with pytest.raises(KeyboardInterrupt):
        manifest.write_images(tmp_path, [("images/000001.png", b"new, half written"), ("images/000002.png", b"y")])
    assert (tmp_path / "images/000001.png").read_bytes() == b"old"
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["000001.png"]  # no .part left either


@pytest.fixture(scope="module")
def bucket() -> Iterator[Any]:
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with gcs_emulator() as url, pytest.MonkeyPatch.context() as env:
        env.setenv("STORAGE_EMULATOR_HOST", url)
        client = storage.Client(project="test", credentials=AnonymousCredentials())
        yield client.create_bucket("out")


def test_download_copies_a_prefix_in_parallel_and_resumes(bucket: Any, tmp_path: Path) -> None:
    prefix = "batch/run-1/"
    contents = {f"images/{n:06d}.png": image("png", n) for n in range(1, 13)}
    contents[MANIFEST] = b'{"line": 1}\n'
    contents["../../outside.txt"] = b"x"  # GCS takes any name; it must not land outside the folder
    for name, data in contents.items():
        bucket.blob(prefix + name).upload_from_string(data)
    reads: list[str] = []
    broken = {"images/000005.png"}  # the first read of it fails

    def list_objects() -> list[tuple[str, int]]:
        return [(blob.name[len(prefix) :], blob.size) for blob in bucket.list_blobs(prefix=prefix)]

    def read(name: str) -> bytes:
        reads.append(name)
        if name in broken:
            broken.discard(name)
            raise ConnectionError("reset by peer\nmid-download")
        return bytes(bucket.blob(prefix + name).download_as_bytes())

    dest = tmp_path / "dl"
    seen: list[tuple[int, int]] = []
    first = batch_files.download(list_objects, read, dest, workers=4, progress=lambda d, t: seen.append((d, t)))
    assert (first.written, first.present, first.refused) == (12, 0, ["../../outside.txt"])
    assert first.failed == {"images/000005.png": "ConnectionError: reset by peer mid-download"} and not first.ok
    assert seen[0] == (0, 13) and seen[-1] == (13, 13) and len(seen) == 14
    assert not (tmp_path / "outside.txt").exists() and not (dest / "images/000005.png").exists()
    assert (dest / "images/000012.png").read_bytes() == contents["images/000012.png"]

    (dest / MANIFEST).write_bytes(b"{")  # a different size: copied again
    reads.clear()
    second = batch_files.download(list_objects, read, dest)
    assert sorted(reads) == ["images/000005.png", MANIFEST]
    assert (second.written, second.present, second.failed) == (2, 11, {})
    assert all((dest / name).read_bytes() == data for name, data in contents.items() if ".." not in name)
    assert not list(dest.rglob("*" + batch_files.PART))
