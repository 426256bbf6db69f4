"""`python -m tests.emulator --port 9090`: the Google Cloud emulator and a GCS emulator, on loopback.

Point sdxlctl at it with `[gcp] api_endpoint = "http://127.0.0.1:9090"` (or SDXLCTL_GCP_API_ENDPOINT) and
STORAGE_EMULATOR_HOST=http://127.0.0.1:9091; then build, upload, deploy, predict, ui-deploy and teardown
run against it as they would against Google Cloud. Deployed models run as local `python -m sdxl_server`.

Faults, for rehearsing failures: POST /_emulator/faults with {"path": REGEX, "method", "code", "status",
"message", "times", "operation": the operation fails instead, "answer": "error" | "drop" (no answer at all)
| "garbled" (a cut-short 200), "after": the request takes effect and only its answer is lost};
DELETE /_emulator/faults ends them. With STORAGE_EMULATOR_HOST set to this port, Cloud Storage goes
through here too (and faults reach it).
"""

from __future__ import annotations

import argparse

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
    args = parser.parse_args()
    gcs_port = args.gcs_port or args.port + 1

    from gcp_storage_emulator.server import create_server

    from tests.emulator import gcs_iam, gcs_names

    gcs_iam.install()  # the same GCS as the tests get: bucket IAM as GCS has it, any object name GCS takes
    gcs_names.install()
    gcs = create_server("127.0.0.1", gcs_port, in_memory=True)
    gcs.start()
    app = create_app(
        World(polls_to_finish=args.polls),
        servers=ModelServers(forward_to=args.model_server),
        gcs_url=f"http://127.0.0.1:{gcs_port}",
    )
    print(f"Google APIs emulator on http://127.0.0.1:{args.port}, GCS on http://127.0.0.1:{gcs_port}")
    print(f"  export SDXLCTL_GCP_API_ENDPOINT=http://127.0.0.1:{args.port}")
    print(f"  export STORAGE_EMULATOR_HOST=http://127.0.0.1:{gcs_port}")
    try:
        uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning")
    finally:
        gcs.stop()


if __name__ == "__main__":
    main()
