"""`python -m tests.emulator --port 9090`: the Google Cloud emulator and a GCS emulator, on loopback.

Point sdxlctl at it with `[gcp] api_endpoint = "http://127.0.0.1:9090"` (or SDXLCTL_GCP_API_ENDPOINT) and
STORAGE_EMULATOR_HOST=http://127.0.0.1:9091; then build, upload, deploy, predict, batch, ui-deploy and teardown
run against it as they would against Google Cloud. Deployed models, and each batch prediction job's replica,
run as local `python -m sdxl_server`.
Target cloudrun's services are private: sdxlctl calls them with an ID token from a service account key file,
so the emulator writes the deployer's (a project owner, whose token_uri is this emulator) and prints the
GOOGLE_APPLICATION_CREDENTIALS to export. Its key lives as long as this process: restart, export again.

Faults, for rehearsing failures: POST /_emulator/faults with {"path": REGEX, "method", "code", "status",
"message", "times", "operation": the operation fails instead, "answer": "error" | "drop" (no answer at all)
| "garbled" (a cut-short 200), "after": the request takes effect and only its answer is lost};
DELETE /_emulator/faults ends them. With STORAGE_EMULATOR_HOST set to this port, Cloud Storage goes
through here too (and faults reach it).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import uvicorn

from tests.emulator.app import create_app
from tests.emulator.core import World
from tests.emulator.model_servers import ModelServers


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.emulator", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=9090, help="port of the Google APIs (default 9090)")
    parser.add_argument("--gcs-port", type=int, default=None, help="port of the GCS emulator (default: port + 1)")
    parser.add_argument("--polls", type=int, default=2, help="polls before a long-running operation is done")
    parser.add_argument(
        "--model-server",
        default=None,
        help="forward predictions to this running model server instead of starting one per deployed model",
    )
    parser.add_argument(
        "--key-file",
        type=Path,
        default=None,
        help="where to write the deployer's key file (default: sdxl-emulator-PORT/deployer.json in the temp folder)",
    )
    parser.add_argument(
        "--run-idle-s",
        type=float,
        default=900.0,
        help="seconds an idle Cloud Run instance stays up before it scales to zero (default 900, Cloud Run's)",
    )
    args = parser.parse_args()
    gcs_port = args.gcs_port or args.port + 1
    url = f"http://127.0.0.1:{args.port}"

    from gcp_storage_emulator.server import create_server

    from tests.emulator import gcs_iam, gcs_names
    from tests.emulator.core import DEPLOYER
    from tests.emulator.identity import TOKEN_PATH, write_key_file

    gcs_iam.install()  # the same GCS as the tests get: bucket IAM as GCS has it, any object name GCS takes
    gcs_names.install()
    gcs = create_server("127.0.0.1", gcs_port, in_memory=True)
    gcs.start()
    key_file = args.key_file or Path(tempfile.gettempdir()) / f"sdxl-emulator-{args.port}" / "deployer.json"
    write_key_file(key_file.resolve(), DEPLOYER, url + TOKEN_PATH)
    app = create_app(
        World(polls_to_finish=args.polls, run_idle_s=args.run_idle_s),
        servers=ModelServers(forward_to=args.model_server),
        gcs_url=f"http://127.0.0.1:{gcs_port}",
    )
    print(f"Google APIs emulator on {url}, GCS on http://127.0.0.1:{gcs_port}")
    print(f"  export SDXLCTL_GCP_API_ENDPOINT={url}")
    print(f"  export STORAGE_EMULATOR_HOST=http://127.0.0.1:{gcs_port}")
    print(f"  export GOOGLE_APPLICATION_CREDENTIALS={key_file.resolve()}", flush=True)
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        gcs.stop()


if __name__ == "__main__":
    main()
