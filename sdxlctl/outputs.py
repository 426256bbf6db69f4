"""Where predict puts images: checked before the request, and kept somewhere when they cannot be written."""

from __future__ import annotations

import errno
import tempfile
import time
from pathlib import Path

from sdxlctl.errors import PredictError


def paths(output: Path, count: int) -> list[Path]:
    """out.png, out-1.png, out-2.png, ...: the first keeps the name asked for."""
    return [output if i == 0 else output.with_name(f"{output.stem}-{i}{output.suffix}") for i in range(count)]


def check(output: Path, count: int) -> list[Path]:
    """The files predict will write, checked before the request: their folder exists (or is made) and takes files."""
    names = paths(output, count)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        for path in names:
            if path.is_dir():
                raise IsADirectoryError(errno.EISDIR, "is a folder", str(path))
        # The one reliable test of "may I write here" (permissions, read-only mounts, ACLs) is to write.
        with tempfile.NamedTemporaryFile(dir=output.parent, prefix=".sdxlctl-probe-"):
            pass
    except OSError as exc:
        raise PredictError(
            f"cannot write -o {output}: {exc.filename or output.parent}: {exc.strerror or exc}",
            hint="choose a file in a folder you may write (-o images/fox.png makes the folder)",
        ) from None
    return names


def write(files: list[Path], images: list[bytes], *, rescue: list[Path], seeds: list[int]) -> list[Path]:
    """Write each image to its file; if that fails, keep them all in the first rescue folder that takes them."""
    try:
        for path, data in zip(files, images, strict=True):
            path.write_bytes(data)
        return files
    except OSError as exc:
        failed = exc
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for folder in [*rescue, Path(tempfile.gettempdir()) / "sdxlctl-rescued"]:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            saved = [folder / f"{stamp}-{path.name}" for path in files]
            for path, data in zip(saved, images, strict=True):
                path.write_bytes(data)
        except OSError:
            continue
        raise PredictError(
            f"could not write {failed.filename}: {failed.strerror}; the images are saved in "
            f"{folder} (seeds {', '.join(map(str, seeds))})",
            hint="copy them from there; fix the -o folder (space, permissions) for the next ones",
        )
    raise PredictError(
        f"could not write {failed.filename}: {failed.strerror}, nor save the images anywhere else "
        f"(seeds {', '.join(map(str, seeds))})",
        hint="free disk space; the same seeds and parameters make the same images again",
    )
