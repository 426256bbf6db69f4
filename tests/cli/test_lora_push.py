"""sdxlctl lora push: the local checks before any upload (real files), and the content-addressed name.

The upload itself is tested against the GCS emulator: tests/cloud/test_lora_push.py.
"""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import pytest

from sdxlctl import loras
from sdxlctl.errors import UsageError
from tests.conftest import Cli

CONFIG = '[model]\nlora_sources = ["hf://org/", "gs://bucket-of-loras/loras"]\n'


def lora_file(path: Path, *, keys: tuple[str, ...] = ("unet.a.lora_A.weight", "unet.a.lora_B.weight")) -> Path:
    """A real safetensors file (written by the safetensors library), its keys named as a LoRA's."""
    import numpy as np
    from safetensors.numpy import save_file

    save_file({key: np.full((4, 8), i, dtype=np.float32) for i, key in enumerate(keys)}, str(path))
    return path


def raw_file(path: Path, header: object, data: bytes = b"") -> Path:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    return path


def test_a_good_file_is_named_by_its_content(tmp_path: Path) -> None:
    path = lora_file(tmp_path / "my style (v2).safetensors")
    checked = loras.check_file(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert checked.sha256 == digest and checked.size == path.stat().st_size
    # Only characters every gs:// source rule takes: no space, parenthesis, % or backslash
    assert checked.object_name == f"my-style-v2-{digest[:12]}.safetensors"


def test_the_first_gs_prefix_is_used_with_a_trailing_slash() -> None:
    assert loras.first_gs_prefix(["hf://org/", "gs://b/loras", "gs://c/"]) == "gs://b/loras/"
    with pytest.raises(UsageError, match=r"\[model\] lora_sources"):
        loras.first_gs_prefix(["hf://org/"])


def written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def bad_files(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each file the local check refuses, and what the refusal says."""
    f32 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
    return {
        "pickle": (written(folder / "x.bin", b"\x80\x04"), "only .safetensors"),
        "missing": (folder / "gone.safetensors", "no such file"),
        "short": (written(folder / "s.safetensors", b"abc"), "8-byte"),
        "not json": (written(folder / "j.safetensors", struct.pack("<Q", 4) + b"\xff\xfe{]"), "not JSON"),
        "header past the end": (
            written(folder / "h.safetensors", struct.pack("<Q", 10**6) + b"{}"),
            "a header of 1000000 bytes",
        ),
        "int64": (
            raw_file(folder / "i.safetensors", {"a.lora_A.weight": {**f32, "dtype": "I64"}}, b"\0" * 8),
            "dtype I64",
        ),
        "truncated": (raw_file(folder / "t.safetensors", {"a.lora_A.weight": f32}, b"\0" * 4), "cover 8 bytes of 4"),
        "not a lora": (lora_file(folder / "full.safetensors", keys=("unet.conv_in.weight",)), "no LoRA weights"),
        # The bytes cover the data, but not as the shape says: the safetensors library refuses it, so the server does
        "shape against offsets": (
            raw_file(folder / "o.safetensors", {"a.lora_A.weight": {**f32, "data_offsets": [0, 4]}}, b"\0" * 4),
            "shape [2] of F32 is 8 bytes, its offsets hold 4",
        ),
        "negative offset": (
            raw_file(folder / "n.safetensors", {"a.lora_A.weight": {**f32, "data_offsets": [-4, 4]}}, b"\0" * 4),
            "data_offsets",
        ),
    }


@pytest.mark.parametrize(
    "case",
    [
        "pickle",
        "missing",
        "short",
        "not json",
        "header past the end",
        "int64",
        "truncated",
        "not a lora",
        "shape against offsets",
        "negative offset",
    ],
)
def test_a_bad_file_is_one_line_before_any_upload(cli: Cli, tmp_path: Path, case: str) -> None:
    (tmp_path / "sdxlctl.toml").write_text(CONFIG)
    path, said = bad_files(tmp_path)[case]
    result = cli("lora", "push", str(path), "--yes")
    assert result.code == 2, result.err
    lines = result.err.splitlines()
    assert lines[0].startswith(f"error: lora push {path}") and said in lines[0], result.err
    assert lines[1].startswith("hint: ") and len(lines) == 2 and result.out == ""


def test_a_file_over_1_gb_is_refused_without_reading_it(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "sdxlctl.toml").write_text(CONFIG)
    path = tmp_path / "huge.safetensors"
    with path.open("wb") as file:
        file.truncate(1_000_000_001)  # sparse: no disk used
    result = cli("lora", "push", str(path), "--yes")
    assert result.code == 2 and "over the server's 1 GB limit" in result.err and "SDXL_LORA_MAX_BYTES" in result.err


def test_without_a_gs_prefix_the_error_names_the_config_key(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "sdxlctl.toml").write_text('[model]\nlora_sources = ["hf://org/"]\n')
    result = cli("lora", "push", str(lora_file(tmp_path / "a.safetensors")), "--yes")
    assert result.code == 2
    assert result.err.splitlines()[0] == (
        "error: lora push uploads under the first gs:// prefix of [model] lora_sources, and there is none"
    )
    assert 'lora_sources = ["gs://BUCKET/loras/"]' in result.err
    (tmp_path / "other.toml").write_text('[model]\nlora_sources = ["hf://org/"]\n')
    other = cli("lora", "push", str(tmp_path / "a.safetensors"), "--yes", "--config", "other.toml")
    said = " ".join(other.err.split())  # the hint may wrap
    assert f"hint: add one to {(tmp_path / 'other.toml').resolve()}: " in said, other.err  # the file read


@pytest.mark.parametrize(
    "args",
    [
        ["lora", "push", "x.safetensors", "--config", "other.toml"],
        ["lora", "--config", "other.toml", "push", "x.safetensors"],
        ["lora", "--config=other.toml", "push", "x.safetensors", "--debug"],
    ],
)
def test_global_options_anywhere_after_lora(cli: Cli, tmp_path: Path, args: list[str]) -> None:
    """sdxlctl.toml here has no gs:// prefix, other.toml has one: the file is then what is missing."""
    (tmp_path / "sdxlctl.toml").write_text('[model]\nlora_sources = ["hf://org/"]\n')
    (tmp_path / "other.toml").write_text(CONFIG)
    result = cli(*args)
    assert result.code == 2 and "error: lora push x.safetensors: no such file" in result.err, result.err
