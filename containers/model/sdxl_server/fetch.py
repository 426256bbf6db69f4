"""`python -m sdxl_server.fetch --model SRC DEST`: copy the SDXL files a server will load into a folder.

Used by the image build to bake weights (a Cloud Build step), and by hand to prepare a folder for a gs://
bucket (`gcloud storage cp -r DEST gs://bucket/sdxl`). Only the files the server loads are copied (the fp16
variant, the fp16-fix VAE in vae/), byte for byte as published; DEST/SOURCE.json records where they
came from (source, variant, VAE, Hub revision or gs:// generations) and each file's size and sha256.
Needs no torch: nothing is loaded, only chosen and copied.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from sdxl_server.errors import ModelLoadError
from sdxl_server.sources import FP16_FIX_VAE
from sdxl_server.weights import Located, locate

SOURCE_JSON = "SOURCE.json"


def main(argv: list[str] | None = None) -> int:
    """Choose, copy, record; one line on success, one line naming the problem on failure."""
    parser = argparse.ArgumentParser(prog="python -m sdxl_server.fetch", description=__doc__.splitlines()[0])
    parser.add_argument("dest", type=Path, help="folder to write the pipeline to")
    parser.add_argument(
        "--model",
        default="stabilityai/stable-diffusion-xl-base-1.0",
        help="Hugging Face repo id, gs://bucket/folder or local diffusers folder",
    )
    parser.add_argument(
        "--vae",
        default=FP16_FIX_VAE,
        help="VAE to put in vae/ (repo id, gs:// or folder); 'model' keeps the model's own; 'auto' is what the "
        "server's SDXL_VAE=auto loads: the fp16-fix VAE for a Hub model, the folder's own for gs:// and folders",
    )
    parser.add_argument(
        "--dtype", default="fp16", choices=("fp16", "bf16", "fp32"), help="the precision the server will run in"
    )
    args = parser.parse_args(argv)
    try:
        record = fetch(args.model, args.dest, vae=args.vae, precision=args.dtype)
    except ModelLoadError as exc:
        print(f"fetch: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"fetch: could not write {args.dest}: {exc}", file=sys.stderr)
        return 1
    total = sum(entry["size"] for entry in record["files"].values())
    print(
        f"fetch: copied {len(record['files'])} files ({total / 1e9:.2f} GB, {record['variant']} weights, "
        f"VAE {record['vae']['source']}) from {args.model} to {args.dest}"
    )
    return 0


def fetch(source: str, dest: Path, *, vae: str = FP16_FIX_VAE, precision: str = "fp16") -> dict[str, Any]:
    """Copy the files a `precision` server loads from `source` (and the VAE `vae`) into dest; the record."""
    if vae == "auto":
        vae = "model" if source.startswith("gs://") or Path(source).expanduser().is_dir() else FP16_FIX_VAE
    dest.mkdir(parents=True, exist_ok=True)
    earlier = _forget_record(dest)
    # gs:// downloads land beside dest, not in it (the image would carry them twice), and move into it
    staging = dest.parent / f".{dest.name}.download"
    try:
        without = () if vae == "model" else ("vae",)
        model = locate(source, precision, gcs_cache=staging, without=without)
        files = _copy(model, dest, moving=source.startswith("gs://"))
        record: dict[str, Any] = {
            "source": source,
            "variant": model.selection.label,
            "revision": model.revision,
            "generations": _generations(model),
            "vae": {"source": "model"},
        }
        if vae != "model":
            found = locate(vae, precision, gcs_cache=staging, single_model=True)
            files.update({f"vae/{k}": v for k, v in _copy(found, dest / "vae", moving=vae.startswith("gs://")).items()})
            record["vae"] = {
                "source": vae,
                "variant": found.selection.label,
                "revision": found.revision,
                "generations": _generations(found),
            }
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    for name in earlier - set(files):
        # a file of another variant or VAE, left in dest, would be loaded instead of the one just fetched
        if (dest / name).is_file():
            (dest / name).unlink()
    record["files"] = files
    record["fetched_at"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    (dest / SOURCE_JSON).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def _copy(located: Located, dest: Path, *, moving: bool) -> dict[str, dict[str, Any]]:
    """Each chosen file into dest (Hub cache symlinks resolved), with its size and sha256."""
    files: dict[str, dict[str, Any]] = {}
    for name in located.selection.files:
        source, target = located.folder / name, dest / name
        if not source.is_file():
            raise ModelLoadError(f"{located.source}: {name} was chosen but is not on disk")
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(target.name + ".partial")
        if moving:  # a download of our own: move it, no second copy of 7 GB
            shutil.move(source, partial)
        else:
            shutil.copyfile(source, partial)
        partial.replace(target)
        files[name] = {"size": target.stat().st_size, "sha256": _sha256(target)}
    return files


def _forget_record(dest: Path) -> set[str]:
    """The files an earlier fetch into dest recorded; its SOURCE.json goes, so an interrupted fetch leaves none."""
    record = dest / SOURCE_JSON
    try:
        names = json.loads(record.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        names = {}
    if not isinstance(names, dict):
        names = {}
    record.unlink(missing_ok=True)
    root = dest.resolve()
    # only files inside dest: a hand-edited record names nothing else to delete
    return {n for n in names if isinstance(n, str) and (dest / n).resolve().is_relative_to(root)}


def _generations(located: Located) -> dict[str, Any] | None:
    """gs:// only: each file's object generation and crc32c, from the download's manifest (gcs.py)."""
    if not located.source.startswith("gs://"):
        return None
    manifest = located.folder.parent / f"{located.folder.name}.manifest.json"
    try:
        objects = json.loads(manifest.read_text())["objects"]
    except (OSError, ValueError, KeyError):
        return None
    return {
        name: {"generation": objects[name].get("generation"), "crc32c": objects[name].get("crc32c")}
        for name in located.selection.files
        if name in objects
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(16 * 1024 * 1024):
            digest.update(chunk)
    return digest.hexdigest()


if __name__ == "__main__":
    sys.exit(main())
