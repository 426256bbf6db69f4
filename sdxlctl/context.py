"""A container build context as a deterministic tarball: same files, same bytes, same digest."""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import tarfile
from dataclasses import dataclass
from pathlib import Path

from sdxlctl.errors import SdxlctlError

CONTAINERS = Path(__file__).resolve().parent.parent / "containers"


@dataclass(frozen=True)
class Context:
    """The packed folder and the digest that tags its image."""

    folder: Path
    tarball: bytes
    digest: str  # sha256 of the files (names, modes, contents), not of the gzip stream

    @property
    def tag(self) -> str:
        return self.digest[:12]


def container_folder(name: str) -> Path:
    """containers/<name> of this checkout; the build steps need the sources, not only the installed CLI."""
    folder = CONTAINERS / name
    if not (folder / "Dockerfile").is_file():
        raise SdxlctlError(f"no {folder}/Dockerfile", hint="build from a checkout of sdxlctl (git clone ...)")
    return folder


def ignored_patterns(folder: Path) -> list[str]:
    path = folder / ".dockerignore"
    if not path.is_file():
        return []
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def _ignored(relative: str, patterns: list[str]) -> bool:
    """Docker's rules, the common part: globs matched against the path and each of its parents; ! re-includes."""
    ignored = False
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        negate = pattern.startswith("!")
        glob = pattern.lstrip("!").strip("/")
        if glob.startswith("**/"):
            hit = any(fnmatch.fnmatch(part, glob[3:]) for part in parts) or any(
                fnmatch.fnmatch(c, glob[3:]) for c in candidates
            )
        else:
            hit = any(fnmatch.fnmatch(c, glob) for c in candidates)
        if hit:
            ignored = not negate
    return ignored


def pack(folder: Path) -> Context:
    """Tar and gzip `folder` without what .dockerignore excludes; timestamps and owners are zeroed."""
    patterns = ignored_patterns(folder)
    files = sorted(
        p for p in folder.rglob("*") if p.is_file() and not _ignored(p.relative_to(folder).as_posix(), patterns)
    )
    raw, digest = io.BytesIO(), hashlib.sha256()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as archive:
        for path in files:
            relative = path.relative_to(folder).as_posix()
            data = path.read_bytes()
            info = tarfile.TarInfo(relative)
            info.size, info.mode, info.mtime = len(data), 0o755 if path.stat().st_mode & 0o111 else 0o644, 0
            archive.addfile(info, io.BytesIO(data))
            digest.update(f"{relative}\0{info.mode}\0{len(data)}\0".encode())
            digest.update(data)
    compressed = io.BytesIO()
    with gzip.GzipFile(fileobj=compressed, mode="wb", mtime=0) as gz:
        gz.write(raw.getvalue())
    return Context(folder, compressed.getvalue(), digest.hexdigest())


BAKED_FOLDER = "/models/sdxl"  # where Dockerfile.bake puts the weights; SDXL_MODEL of a baked image
# The server's VAE for Hub models when SDXL_VAE=auto (sdxl_server.sources.FP16_FIX_VAE; the CLI does not import
# the server): the build names it, so the build record and the image labels say which VAE was baked.
FP16_FIX_VAE = "madebyollin/sdxl-vae-fp16-fix"


@dataclass(frozen=True)
class Bake:
    """Weights to fetch into the server image at build time: a Hub repo id or a gs:// folder, and its VAE."""

    source: str
    vae: str = "auto"  # as [model] vae: auto, model (the source's own), or a VAE source
    dtype: str = "auto"  # as [model] dtype: the variant files fetched are the ones a server of that dtype loads

    @property
    def fetch_vae(self) -> str:
        """The --vae of `python -m sdxl_server.fetch`: what the baked folder's vae/ will hold. `auto` as the server
        reads it: the fp16-fix VAE for a Hub model (its own overflows in fp16), a folder's own VAE for a folder."""
        if self.vae == "auto":
            return "model" if self.source.startswith("gs://") else FP16_FIX_VAE
        return self.vae

    @property
    def tag(self) -> str:
        """Part of the image tag: another source or VAE is another image."""
        return hashlib.sha256(f"{self.source}\0{self.vae}\0{self.dtype}".encode()).hexdigest()[:8]

    @property
    def fetch_args(self) -> list[str]:
        """`python -m sdxl_server.fetch` options; auto is fp16, what a server on a GPU runs (fetch's default)."""
        dtype = [] if self.dtype == "auto" else ["--dtype", self.dtype]
        return ["--model", self.source, "--vae", self.fetch_vae, *dtype]

    @property
    def labels(self) -> dict[str, str]:
        """What the image says about its weights (`docker inspect`); the fetch step's SOURCE.json says more."""
        return {
            "sdxlctl.weights.source": self.source,
            "sdxlctl.weights.vae": self.fetch_vae,
            "sdxlctl.weights.folder": BAKED_FOLDER,
            "sdxlctl.weights.record": f"{BAKED_FOLDER}/SOURCE.json",
        }
