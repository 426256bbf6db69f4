"""Start the model server (tiny model) on loopback, generate one image, stop the server."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def main() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {
        **os.environ,
        "SDXL_MODEL": "tiny",
        "SDXL_HOST": "127.0.0.1",
        "AIP_HTTP_PORT": str(port),
        "HF_HUB_OFFLINE": "1",
    }
    server = subprocess.Popen([sys.executable, "-m", "sdxl_server"], env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        body = {"instances": [{"prompt": "a red fox in snow", "seed": 42}], "parameters": {"output_format": "png"}}
        response = httpx.post(f"{url}/predict", json=body, timeout=120)
        response.raise_for_status()
        out = Path("out.png")
        out.write_bytes(base64.b64decode(response.json()["predictions"][0]["images"][0]))
        print(f"wrote {out.resolve()} (tiny random model: the image is noise by design)")
    finally:
        server.terminate()
        server.wait(timeout=15)
    return 0


if __name__ == "__main__":
    sys.exit(main())
