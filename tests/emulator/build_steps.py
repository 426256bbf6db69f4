"""What a Cloud Build's steps do, in emulation: each step in order on one /workspace, as the real one would fail.

Known steps: `docker build` (gcr.io/cloud-builders/docker), which reads its -f Dockerfile and checks every COPY
against its context as docker would (the context's .dockerignore applied, files earlier steps wrote included);
a `bash -c "mkdir -p X && chmod MODE X"` in the docker builder; and `python -m sdxl_server.fetch` in an image an
earlier step built, which writes the folder the real fetch would (its SOURCE.json included) after checking that
the image's user may write there and, for a gs:// source, that the folder has a model_index.json. Anything else
fails the build: an emulator that says yes to steps it does not know would prove nothing.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

DOCKER = "gcr.io/cloud-builders/docker"
# The components of stabilityai/stable-diffusion-xl-base-1.0, for a Hub source (no network here).
SDXL_COMPONENTS = ["text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "unet", "vae", "scheduler"]


class StepFailed(Exception):
    """A step exited non-zero; the message is its last log line."""


@dataclass
class Image:
    """An image a step built: what `docker inspect` would say of it."""

    name: str
    digest: str
    labels: dict[str, str]
    user: str = "root"
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Workspace:
    """/workspace: the unpacked source, then what each step writes. Paths are relative, '/'-separated."""

    files: dict[str, bytes]
    # Folders a non-root user may write (chmod'ed by a root step); /workspace itself belongs to root.
    writable: set[str] = field(default_factory=set)

    def under(self, folder: str) -> dict[str, bytes]:
        folder = folder.strip("/").removeprefix("./").strip("/")
        if folder in ("", "."):
            return dict(self.files)
        prefix = folder + "/"
        return {name[len(prefix) :]: data for name, data in self.files.items() if name.startswith(prefix)}


ReadObject = Callable[[str, str], bytes | None]


@dataclass
class Steps:
    """Runs a build's steps; `images` holds what they built, `log` what they printed."""

    build: dict[str, Any]
    workspace: Workspace
    read_object: ReadObject
    images: dict[str, Image] = field(default_factory=dict)
    log: list[str] = field(default_factory=list)

    def run(self) -> str | None:
        """Every step in order; the first failure ends the build. None, or the build's status detail."""
        for i, step in enumerate(self.build["steps"]):
            label = f"Step #{i}" + (f' - "{step["id"]}"' if step.get("id") else "")
            say = lambda line, label=label: self.log.append(f"{label}: {line}")  # noqa: E731
            self.log.append(f"Starting {label}")
            try:
                self._step(step, say)
            except StepFailed as exc:
                say(str(exc))
                self.log.append(f"Finished {label}")
                return (
                    f'Build step failure: build step {i} "{step["name"]}" failed: step exited with non-zero status: 1'
                )
            self.log.append(f"Finished {label}")
        missing = [image for image in self.build.get("images", []) if image not in self.images]
        if missing:
            return f"failed to find one or more images after execution of build steps: {missing}"
        return None

    def _substitute(self, text: str) -> str:
        """Cloud Build's built-in substitutions; $$ is a literal $."""
        values = {"BUILD_ID": self.build["id"], "PROJECT_ID": self.build["projectId"]}
        return re.sub(r"\$\$|\$\{?([A-Z_]+)\}?", lambda m: "$" if m[0] == "$$" else values.get(m[1], m[0]), text)

    def _step(self, step: dict[str, Any], say: Callable[[str], None]) -> None:
        name, entrypoint = step["name"], step.get("entrypoint", "")
        args = [self._substitute(a) for a in step.get("args", [])]
        if name == DOCKER and not entrypoint and args[:1] == ["build"]:
            self._docker_build(args[1:], say)
        elif name == DOCKER and entrypoint == "bash" and args[:1] == ["-c"] and len(args) == 2:
            self._bash(args[1], say)
        elif name in self.images and entrypoint == "python" and args[:2] == ["-m", "sdxl_server.fetch"]:
            self._fetch(self.images[name], args[2:], say)
        elif name in self.images or name == DOCKER:
            raise StepFailed(f"emulator: cannot run {entrypoint or '(default entrypoint)'} {args} in {name}")
        else:
            raise StepFailed(f"Error response from daemon: pull access denied for {name}, repository does not exist")

    def _bash(self, script: str, say: Callable[[str], None]) -> None:
        for command in (c.strip() for c in script.split("&&")):
            words = shlex.split(command)
            if words[:2] == ["mkdir", "-p"] and len(words) == 3:
                self.workspace.files.setdefault(words[2].strip("/") + "/", b"")
            elif words[:1] == ["chmod"] and len(words) == 3 and re.fullmatch(r"0?777|a\+rwx", words[1]):
                if words[2].strip("/") + "/" not in self.workspace.files:
                    raise StepFailed(f"chmod: cannot access '{words[2]}': No such file or directory")
                self.workspace.writable.add(words[2].strip("/"))
            else:
                raise StepFailed(f"emulator: bash cannot run {command!r}")

    def _fetch(self, image: Image, args: list[str], say: Callable[[str], None]) -> None:
        """`python -m sdxl_server.fetch --model SRC [--vae V] DEST`, as it would end."""
        options = {"--vae": "madebyollin/sdxl-vae-fp16-fix", "--dtype": "fp16"}
        positional = []
        words = iter(args)
        for word in words:
            if word in options or word == "--model":
                options[word] = next(words, "")
            else:
                positional.append(word)
        if "--model" not in options or len(positional) != 1:
            raise StepFailed("usage: python -m sdxl_server.fetch [-h] [--model MODEL] [--vae VAE] [--dtype D] dest")
        source, dest = options["--model"], positional[0].strip("/").removeprefix("workspace/")
        parent = dest.rsplit("/", 1)[0] if "/" in dest else ""
        if image.user not in ("root", "0") and parent not in self.workspace.writable:
            raise StepFailed(f"PermissionError: [Errno 13] Permission denied: '/workspace/{dest}'")
        # The shape of fetch.py's record; the variant as its `Selection.label` says it
        variant = "plain" if options["--dtype"] == "fp32" else options["--dtype"]
        vae = options["--vae"]
        record: dict[str, Any] = {"source": source, "variant": variant, "revision": None, "generations": None}
        record["vae"] = {"source": "model"} if vae == "model" else {"source": vae, "variant": variant}
        if source.startswith("gs://"):
            bucket, _, folder = source.removeprefix("gs://").partition("/")
            index = self.read_object(bucket, f"{folder.strip('/')}/model_index.json")
            if index is None:
                raise StepFailed(f"fetch: {source} has no model_index.json (is it a diffusers pipeline folder?)")
            components = [k for k, v in json.loads(index).items() if isinstance(v, list) and v[0]]
            record["generations"] = {"model_index.json": {"generation": "1", "crc32c": "AAAAAA=="}}
        else:
            index = json.dumps({"_class_name": "StableDiffusionXLPipeline"}).encode()
            components = SDXL_COMPONENTS
            record["revision"] = hashlib.sha1(source.encode()).hexdigest()  # a stand-in commit id
        files = {"model_index.json": index} | {f"{component}/config.json": b"{}" for component in components}
        record["files"] = {name: {"size": len(data)} for name, data in files.items()}
        files["SOURCE.json"] = json.dumps(record, indent=2, sort_keys=True).encode()
        for relative, data in files.items():
            self.workspace.files[f"{dest}/{relative}"] = data
        say(f"fetch: copied {len(files) - 1} files ({variant} weights, VAE {vae}) from {source} to /workspace/{dest}")

    def _docker_build(self, args: list[str], say: Callable[[str], None]) -> None:
        tags, build_args, labels, dockerfile, positional = [], {}, {}, "Dockerfile", []
        words = iter(args)
        for word in words:
            flag, eq, value = word.partition("=")
            if flag in ("-t", "-f", "--build-arg", "--label", "--network") and not eq:
                value = next(words, "")
            if flag == "-t":
                tags.append(value)
            elif flag == "-f":
                dockerfile = value
            elif flag == "--build-arg":
                key, _, val = value.partition("=")
                build_args[key] = val
            elif flag == "--label":
                key, _, val = value.partition("=")
                labels[key] = val
            elif flag != "--network":
                positional.append(word)
        if len(positional) != 1:
            raise StepFailed('"docker build" requires exactly 1 argument.')
        text = self.workspace.files.get(dockerfile.removeprefix("./"))
        if not text:
            raise StepFailed(
                "unable to prepare context: unable to evaluate symlinks in Dockerfile path: "
                f"lstat /workspace/{dockerfile}: no such file or directory"
            )
        context = self.workspace.under(positional[0])
        ignored = [
            p.strip() for p in context.get(".dockerignore", b"").decode().splitlines() if p.strip() and p[0] != "#"
        ]
        members = {name.rstrip("/") for name in context if not _ignored(name.rstrip("/"), ignored)}
        image = self._instructions(text.decode(), build_args, members, say)
        image.labels |= labels
        image.digest = (
            "sha256:" + hashlib.sha256(json.dumps([text.decode(), sorted(members), args]).encode()).hexdigest()
        )
        for tag in tags:
            self.images[tag] = Image(tag, image.digest, dict(image.labels), image.user, dict(image.env))
            say(f"Successfully tagged {tag}")

    def _instructions(
        self, text: str, build_args: dict[str, str], members: set[str], say: Callable[[str], None]
    ) -> Image:
        lines = [ln.strip() for ln in re.sub(r"\\\n", " ", text).splitlines()]
        instructions = [ln for ln in lines if ln and not ln.startswith("#")]
        values: dict[str, str] = {}
        image = Image("", "", {})

        def expand(value: str) -> str:
            def one(m: re.Match[str]) -> str:
                name, modifier, word = m["name"] or m["bare"], m["modifier"], m["word"] or ""
                found = values.get(name, "")
                if modifier == ":+":
                    return word if found else ""
                if modifier == ":-":
                    return found or word
                return found

            return re.sub(r"\$\{(?P<name>\w+)(?:(?P<modifier>:[+-])(?P<word>[^}]*))?\}|\$(?P<bare>\w+)", one, value)

        for n, instruction in enumerate(instructions, 1):
            say(f"Step {n}/{len(instructions)} : {instruction}")
            op, _, rest = instruction.partition(" ")
            op, rest = op.upper(), rest.strip()
            if op == "ARG":
                for declared in rest.split():
                    key, eq, default = declared.partition("=")
                    values[key] = build_args.get(key, default.strip('"') if eq else values.get(key, ""))
            elif op == "FROM":
                base = expand(rest.split()[0])
                if not base:
                    raise StepFailed(f"base name ({rest.split()[0]}) should not be blank")
                inherited = self.images.get(base)
                image = (
                    Image("", "", dict(inherited.labels), inherited.user, dict(inherited.env))
                    if inherited
                    else Image("", "", {})
                )
            elif op == "COPY":
                sources = [expand(word) for word in rest.split()[:-1] if not word.startswith("--")]
                for source in sources:
                    path = source.rstrip("/").removeprefix("./")
                    if not any(m == path or m.startswith(path + "/") for m in members):
                        raise StepFailed(
                            f"COPY failed: file not found in build context or excluded by .dockerignore: stat {path}: "
                            "file does not exist"
                        )
            elif op == "USER":
                image.user = expand(rest)
            elif op == "LABEL":
                image.labels |= {k: v.strip('"') for k, v in re.findall(r'(\S+?)=("[^"]*"|\S+)', expand(rest))}
            elif op == "ENV":
                env = {k: expand(v.strip('"')) for k, v in re.findall(r'(\S+?)=("[^"]*"|\S+)', rest)}
                image.env |= env
                values |= env
        return image


def _ignored(relative: str, patterns: list[str]) -> bool:
    """.dockerignore: globs against the path and its parents, **/ anywhere, ! re-includes; the last match wins."""
    parts = relative.split("/")
    candidates = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    ignored = False
    for pattern in patterns:
        glob = pattern.lstrip("!").strip("/")
        anywhere = glob.startswith("**/")
        glob = glob.removeprefix("**/")
        hit = any(fnmatch.fnmatch(c, glob) for c in candidates) or (
            anywhere and any(fnmatch.fnmatch(p, glob) for p in parts)
        )
        if hit:
            ignored = not pattern.startswith("!")
    return ignored
