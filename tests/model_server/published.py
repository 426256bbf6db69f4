"""Fake published repositories: the file names of the real SDXL repos, with the tiny pipeline's weights.

The listings are those of the Hugging Face repositories as published (main, 2023-2025):
stabilityai/stable-diffusion-xl-base-1.0 and madebyollin/sdxl-vae-fp16-fix. Weights that a torch
pipeline loads get real tiny weights (fp32 in the plain files, fp16 in the `.fp16.` variant files, as
published); every other file (single-file checkpoints, ONNX, OpenVINO, Flax, spare VAEs) holds bytes no
loader can read, so loading one by mistake fails loudly. The tokenizer folders hold what the tiny
pipeline's byte-level tokenizer saves (the real ones hold the CLIP BPE files).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
from pathlib import Path
from typing import Any

import numpy as np

SDXL_BASE = "stabilityai/stable-diffusion-xl-base-1.0"
FP16_FIX = "madebyollin/sdxl-vae-fp16-fix"
COMMIT = "462165984030d82259a11f4367a4eed129e94a7b"  # the fake caches' revisions
VAE_COMMIT = "207b116dae70ace3637169f1ddd2434b91b3a8cd"
SEED = 7
REQUEST = {
    "instances": [{"prompt": "a fox", "seed": SEED}],
    "parameters": {"num_inference_steps": 2, "width": 64, "height": 64, "output_format": "png"},
}

# Never loaded: junk in these tests, duplicates or other formats in the real repository.
SDXL_BASE_UNUSED = (
    ".gitattributes",
    "01.png",
    "LICENSE.md",
    "README.md",
    "comparison.png",
    "pipeline.png",
    "sd_xl_base_1.0.safetensors",
    "sd_xl_base_1.0_0.9vae.safetensors",
    "sd_xl_offset_example-lora_1.0.safetensors",
    "text_encoder/flax_model.msgpack",
    "text_encoder/model.onnx",
    "text_encoder/openvino_model.bin",
    "text_encoder/openvino_model.xml",
    "text_encoder_2/flax_model.msgpack",
    "text_encoder_2/model.onnx",
    "text_encoder_2/model.onnx_data",
    "text_encoder_2/openvino_model.bin",
    "text_encoder_2/openvino_model.xml",
    "unet/diffusion_flax_model.msgpack",
    "unet/model.onnx",
    "unet/model.onnx_data",
    "unet/openvino_model.bin",
    "unet/openvino_model.xml",
    "vae/diffusion_flax_model.msgpack",
    "vae_1_0/config.json",
    "vae_1_0/diffusion_pytorch_model.fp16.safetensors",
    "vae_1_0/diffusion_pytorch_model.safetensors",
    "vae_decoder/config.json",
    "vae_decoder/model.onnx",
    "vae_decoder/openvino_model.bin",
    "vae_decoder/openvino_model.xml",
    "vae_encoder/config.json",
    "vae_encoder/model.onnx",
    "vae_encoder/openvino_model.bin",
    "vae_encoder/openvino_model.xml",
)
SDXL_BASE_CONFIGS = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "tokenizer/merges.txt",
    "tokenizer/special_tokens_map.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/vocab.json",
    "tokenizer_2/merges.txt",
    "tokenizer_2/special_tokens_map.json",
    "tokenizer_2/tokenizer_config.json",
    "tokenizer_2/vocab.json",
    "unet/config.json",
    "vae/config.json",
)
SDXL_BASE_FP32 = (
    "text_encoder/model.safetensors",
    "text_encoder_2/model.safetensors",
    "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.safetensors",
)
SDXL_BASE_FP16 = tuple(name.replace(".safetensors", ".fp16.safetensors") for name in SDXL_BASE_FP32)
# The VAE repository has no fp16 variant: its plain files are fp32.
FP16_FIX_FILES = ("config.json", "diffusion_pytorch_model.safetensors")
FP16_FIX_UNUSED = (
    ".gitattributes",
    "README.md",
    "diffusion_pytorch_model.bin",
    "sdxl.vae.safetensors",
    "sdxl_vae.safetensors",
    "images/activation-magnitudes.jpg",
    "images/fix-fp16.png",
    "images/fix-fp32.png",
    "images/orig-fp16.png",
    "images/orig-fp32.png",
)
SDXL_BASE_LISTING = SDXL_BASE_CONFIGS + SDXL_BASE_FP32 + SDXL_BASE_FP16 + SDXL_BASE_UNUSED  # the repo as published
LAYOUTS = ("fp16+fp32", "fp16", "fp32")


def tree(folder: Path) -> dict[str, bytes]:
    """Every file under `folder`, by its relative name."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def sdxl_base(work: Path, layout: str = "fp16+fp32") -> dict[str, bytes]:
    """The files of stabilityai/stable-diffusion-xl-base-1.0 with the tiny pipeline's weights, in one of LAYOUTS."""
    import torch

    from sdxl_server.sources import build_tiny_pipeline

    plain, half = work / "plain", work / "fp16"
    if not plain.is_dir():
        build_tiny_pipeline().save_pretrained(plain)
        build_tiny_pipeline().to(torch.float16).save_pretrained(half, variant="fp16")
    files = {name: data for name, data in tree(plain).items() if not name.endswith(".safetensors")}
    assert set(SDXL_BASE_FP32) <= set(tree(plain)) and set(SDXL_BASE_FP16) <= set(tree(half))
    if layout in ("fp16+fp32", "fp32"):
        files.update({name: (plain / name).read_bytes() for name in SDXL_BASE_FP32})
    if layout in ("fp16+fp32", "fp16"):
        files.update({name: (half / name).read_bytes() for name in SDXL_BASE_FP16})
    for name in SDXL_BASE_UNUSED:
        if layout == "fp32" and ".fp16." in name:
            continue
        files[name] = f"never loaded: {name}".encode()
    return files


def fp16_fix(work: Path) -> dict[str, bytes]:
    """The files of madebyollin/sdxl-vae-fp16-fix: another tiny VAE's weights (fp32, no variant, as published)."""
    from sdxl_server.sources import build_tiny_pipeline

    folder = work / "fp16-fix"
    if not folder.is_dir():
        build_tiny_pipeline(seed=1).vae.save_pretrained(folder)
    files = {name: data for name, data in tree(folder).items() if name in FP16_FIX_FILES}
    assert set(files) == set(FP16_FIX_FILES)
    files.update({name: f"never loaded: {name}".encode() for name in FP16_FIX_UNUSED})
    return files


def hub_cache(cache: Path, repo_id: str, files: dict[str, bytes], commit: str) -> Path:
    """Lay `files` out as huggingface_hub's cache does (refs/main, snapshots/<commit>, blobs); the snapshot."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for name, data in files.items():
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot


def write(folder: Path, files: dict[str, bytes]) -> Path:
    """`files` as a plain folder."""
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def upload(bucket: Any, prefix: str, files: dict[str, bytes]) -> None:
    """`files` as objects under gs://bucket/prefix/ (through the real client)."""
    for name, data in files.items():
        bucket.blob(f"{prefix}/{name}").upload_from_string(data)


def hub_app(repos: dict[str, tuple[str, dict[str, bytes]]], downloads: list[str]) -> Any:
    """A Hugging Face Hub on loopback (the routes huggingface_hub calls): repo id -> (commit, files).

    Every file body it sends is appended to `downloads` as "repo_id/name", so a test sees what was fetched.
    """
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    def repo(request: Request) -> tuple[str, str, dict[str, bytes]]:
        repo_id = f"{request.path_params['owner']}/{request.path_params['name']}"
        commit, files = repos[repo_id]
        return repo_id, commit, files

    async def info(request: Request) -> Response:
        repo_id, commit, files = repo(request)
        siblings = [{"rfilename": name} for name in sorted(files)]
        return JSONResponse({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False, "siblings": siblings})

    async def tree(request: Request) -> Response:
        _, _, files = repo(request)
        entries = []
        for name, data in sorted(files.items()):
            entry: dict[str, Any] = {"type": "file", "path": name, "size": len(data), "oid": _git_oid(data)}
            if name.endswith((".safetensors", ".bin", ".onnx", ".onnx_data", ".msgpack")):  # stored in LFS
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
            entries.append(entry)
        return JSONResponse(entries)

    async def resolve(request: Request) -> Response:
        repo_id, commit, files = repo(request)
        name = request.path_params["path"]
        if name not in files:
            return JSONResponse(
                {"error": "Entry not found"}, status_code=404, headers={"X-Error-Code": "EntryNotFound"}
            )
        data = files[name]
        headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
        if request.method == "HEAD":
            return Response(headers={**headers, "Content-Length": str(len(data))})
        downloads.append(f"{repo_id}/{name}")
        return Response(data, headers=headers, media_type="application/octet-stream")

    return Starlette(
        routes=[
            Route("/api/models/{owner}/{name}", info),
            Route("/api/models/{owner}/{name}/revision/{revision}", info),
            Route("/api/models/{owner}/{name}/tree/{revision}", tree),
            Route("/api/models/{owner}/{name}/tree/{revision}/{path:path}", tree),
            Route("/{owner}/{name}/resolve/{revision}/{path:path}", resolve, methods=["GET", "HEAD"]),
        ]
    )


def _git_oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def snapshot(cache: Path, repo_id: str) -> Path:
    """Where a fake Hub cache holds repo_id's files."""
    commit = COMMIT if repo_id == SDXL_BASE else VAE_COMMIT
    return cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / commit


def reference(folder: Path, variant: str | None, dtype: Any, vae: Path | None) -> np.ndarray:
    """Plain diffusers: from_pretrained of the same files, the same call the server makes, as uint8 pixels."""
    import torch
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    extra = {"vae": AutoencoderKL.from_pretrained(vae, dtype=dtype)} if vae else {}
    pipe = StableDiffusionXLPipeline.from_pretrained(
        folder, dtype=dtype, variant=variant, add_watermarker=False, **extra
    )
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        "a fox",
        num_inference_steps=2,
        guidance_scale=5.0,
        width=64,
        height=64,
        generator=[torch.Generator("cpu").manual_seed(SEED)],
        output_type="np",
    ).images
    return np.asarray(images[0] * 255).round().astype(np.int16)


def served(pipe: Any) -> np.ndarray:
    """The image the server's app answers with for REQUEST, as uint8 pixels."""
    from sdxl_server.app import create_app
    from sdxl_server.generator import Generator
    from sdxl_server.settings import Settings
    from tests.servers import serve_app

    with serve_app(create_app(Settings(warmup=((64, 64),)), load=lambda _: Generator(pipe))) as server:
        server.wait_until("ready")
        response = server.predict(REQUEST)
    assert response.status_code == 200, response.text
    return pixels(response.json())


def pixels(answer: dict[str, Any]) -> np.ndarray:
    """The first image of a predict answer, as uint8 pixels."""
    from PIL import Image

    png = base64.b64decode(answer["predictions"][0]["images"][0])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def assert_close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 2, f"max difference {np.abs(got - want).max()}/255"
