"""What a visitor can upload to the UI process: bounded in bytes and in pixels before anything decodes it.

The UI sits on Cloud Run, maybe public (`ui-deploy --public`): Gradio takes uploads of any size unless told,
and Pillow decodes images up to ~179 million pixels with only a warning past 89 million.
"""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import httpx

from sdxl_ui.limits import MAX_UPLOAD_BYTES
from tests.ui.conftest import ui_process


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that says width x height and holds one row of data: a bomb by its header, a few bytes on disk."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\0" * 100)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", rows) + chunk(b"IEND", b"")


def test_an_upload_over_the_limit_is_refused_and_the_page_keeps_serving(tmp_path: Path) -> None:
    with ui_process("http://127.0.0.1:9", tmp_path) as url:
        big = io.BytesIO(b"\0" * (MAX_UPLOAD_BYTES + 1))
        refused = httpx.post(f"{url}/gradio_api/upload", files={"files": ("big.png", big, "image/png")}, timeout=60)
        assert refused.status_code == 413, refused.text
        small = httpx.post(
            f"{url}/gradio_api/upload", files={"files": ("ok.png", io.BytesIO(b"x" * 1000), "image/png")}, timeout=60
        )
        assert small.status_code == 200, small.text
        assert httpx.get(url, timeout=10).status_code == 200


def test_the_ui_process_refuses_to_decode_a_bomb() -> None:
    import subprocess
    import sys

    # The limits __main__ sets for its own process, then the decode Gradio would do of an uploaded file.
    code = (
        "import io, sys; from sdxl_ui.__main__ import bounded_decoding; bounded_decoding(); "
        "from PIL import Image; data = sys.stdin.buffer.read()\n"
        "try:\n    Image.open(io.BytesIO(data)).load()\nexcept Exception as exc:\n    print(type(exc).__name__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], input=_png_header_only(12000, 12000), capture_output=True, timeout=60
    )
    assert result.stdout.decode().strip() == "DecompressionBombError", result.stderr.decode()[-2000:]
