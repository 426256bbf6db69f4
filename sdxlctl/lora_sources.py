"""The model server's rules for LoRA sources, names and allow-list prefixes, checked before a deploy.

A copy of containers/model/sdxl_server/lora/sources.py (sdxlctl never imports the server, which it only
talks to over HTTP): a [model] key the server would refuse at start is refused here, naming the key and
the file, instead of a server that fails its health check twenty minutes into a GPU deploy.
tests/cli/test_lora_config.py holds the two copies equal on a table of cases.
"""

from __future__ import annotations

import re

SUFFIX = ".safetensors"
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
MAX_CHARS = 1024
MAX_RANK = 1024
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
RESERVED_NAME = "none"  # the UI's "None" entry of its adapter menu: an adapter of that name could not be picked
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")
_IP = re.compile(r"\d+\.\d+\.\d+\.\d+")
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_SEGMENT = re.compile(r"[A-Za-z0-9._+=@~()-]+")
SEGMENT_CHARS = "letters, digits and . _ - + = @ ~ ( )"
EXAMPLES = "gs://BUCKET/PATH.safetensors, gs://BUCKET/FOLDER/, hf://ORG/REPO or ORG/REPO"
PREFIXES = "gs://BUCKET/, gs://BUCKET/FOLDER/, hf://ORG/ or hf://ORG/REPO"


def is_local_path(text: str) -> bool:
    """What the config reads as a file on this machine: an absolute, home or explicitly relative path."""
    return text.startswith(("/", "~", "./", "../")) or text in (".", "..")


def check_name(name: str) -> str:
    """A preloaded adapter's name, lower-cased (requests name it in any case); ValueError if malformed."""
    lowered = name.strip().lower()
    if not NAME.fullmatch(lowered):
        raise ValueError(
            f"{name!r} is not a name: 1 to 64 lower-case letters, digits, '.', '_' or '-', starting with a letter "
            "or digit"
        )
    if lowered == RESERVED_NAME:
        raise ValueError(f"{RESERVED_NAME!r} is reserved (the UI's menu entry for no adapter): pick another name")
    return lowered


def check_source(text: str, *, allow_files: bool) -> str:
    """The scheme a source is read with ("gs", "hf" or "file"); ValueError says what is wrong and what works."""
    check_text(text)
    scheme, sep, rest = text.partition("://")
    if not sep:
        if allow_files and text.startswith("/"):
            _file(text)
            return "file"
        if text.startswith(("/", "~", ".")) or ":" in text:
            raise ValueError(f"{text!r}: local paths and other schemes are not fetched; give {EXAMPLES}")
        if allow_files and text.endswith(SUFFIX):  # pixel.safetensors too: a file beside the config, without ./
            raise ValueError(f"{text!r}: a file on this machine is written ./{text} or as an absolute path")
        if "/" not in text:
            raise ValueError(f"{text!r} is not a source: give {EXAMPLES}")
        if text.split("/")[1].endswith(SUFFIX):
            raise ValueError(f"{text!r}: ORG/REPO names a Hub repo; a file in one is hf://ORG/REPO/FILE{SUFFIX}")
        scheme, rest = "hf", text  # a Hub id, as Model Garden's lora_id gives it
    scheme = scheme.lower()
    if scheme == "gs":
        bucket, _, path = rest.partition("/")
        check_bucket(bucket)
        if path.endswith("/") or not path:
            _segments(path, text)
        else:
            _file_path(path, text)
        return "gs"
    if scheme == "hf":
        _hf(rest, text)
        return "hf"
    raise ValueError(f"{text!r}: {scheme}:// sources are not fetched; give {EXAMPLES}")


def check_prefix(entry: str) -> str:
    """An allow-list prefix in the server's canonical form, ending in '/' (gs://b/loras -> gs://b/loras/)."""
    check_text(entry)
    scheme, sep, rest = entry.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in {"gs", "hf"}:
        raise ValueError(f"{entry!r} is not a prefix: {PREFIXES}")
    if rest.removesuffix("/").endswith(SUFFIX):
        raise ValueError(f"{entry!r}: a prefix is a folder, not a file (to preload one adapter, use [model] loras)")
    if "@" in rest and scheme == "hf":
        raise ValueError(f"{entry!r}: a prefix allows a repo at any revision; leave '@REVISION' out")
    head, _, path = rest.partition("/")
    folder = path if not path or path.endswith("/") else path + "/"
    if scheme == "gs":
        check_bucket(head)
        _segments(folder, entry)
        return f"gs://{head}/{folder}"
    repo, _, deeper = folder.partition("/")
    _hf(f"{head}/{repo or 'x'}/", entry)  # an org alone is checked as one part of an id
    _segments(deeper, entry)
    return f"hf://{head}/{folder}"


def check_text(text: str) -> None:
    """The refusals that hold wherever in the text the character is."""
    if not text:
        raise ValueError(f"a source is required: {EXAMPLES}")
    if len(text) > MAX_CHARS:
        raise ValueError(f"too long: {len(text)} characters; at most {MAX_CHARS}")
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise ValueError(f"{text!r}: control characters (NUL, newline...) are refused")
    if any(char.isspace() for char in text):
        raise ValueError(f"{text!r}: whitespace is refused; rename the file without spaces")
    if "\\" in text:
        raise ValueError(f"{text!r}: backslashes are refused; paths use '/'")
    if "%" in text:
        raise ValueError(f"{text!r}: '%' (URL encoding) is refused; write the name as it is")
    if not text.isascii():
        raise ValueError(f"{text!r}: only ASCII characters ({SEGMENT_CHARS})")


def check_bucket(bucket: str) -> None:
    if not bucket:
        raise ValueError(f"gs:// needs a bucket: {EXAMPLES}")
    if bucket.lower() != bucket:
        raise ValueError(f"gs://{bucket}: bucket names are lower case")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IP.fullmatch(bucket) or bucket.startswith("goog"):
        raise ValueError(
            f"gs://{bucket}: not a bucket name (3 to 63 lower-case letters, digits, '-', '_' or '.', starting and "
            "ending with a letter or digit)"
        )


def _hf(rest: str, shown: str) -> None:
    org, _, after = rest.partition("/")
    repo_and_revision, _, path = after.partition("/")
    repo, at, revision = repo_and_revision.partition("@")
    for part in (org, repo):
        if not (_REPO_PART.fullmatch(part) and "--" not in part and ".." not in part and not part.endswith(".git")):
            raise ValueError(
                f"{shown!r}: not a Hub repo id (ORG/REPO, each part letters, digits, '.', '_' or '-', starting and "
                "ending with a letter or digit, at most 96 characters)"
            )
    if at and not (_REVISION.fullmatch(revision) and ".." not in revision):
        raise ValueError(f"{shown!r}: the revision after '@' must be a branch, tag or commit (letters, digits, . _ -)")
    if at and revision == "refs":  # refs/pr/N would be read as revision 'refs' and a path: the server refuses it
        raise ValueError(
            f"{shown!r}: a Hub revision is a branch, tag or commit without '/': refs/pr/N is not supported "
            "(give the pull request's commit after '@')"
        )
    if path and not path.endswith("/"):
        _file_path(path, shown)
    else:
        _segments(path, shown)


def _file(text: str) -> None:
    path = text.removesuffix("/")
    if not path or any(part in {"", ".", ".."} for part in path.split("/")[1:]):
        raise ValueError(f"{text!r}: an absolute path without '.', '..' or empty ('//') parts")
    # As the server reads it: a name ending in .safetensors or a pickle suffix (any case) is a file, which then
    # must end in .safetensors exactly; with a trailing '/', a folder of any name holding the weight file.
    if not text.endswith("/") and path.lower().endswith((SUFFIX, *PICKLE_SUFFIXES)):
        _file_path(path[1:], text)


def _segments(folder: str, shown: str) -> None:
    """A folder ("a/b/" or "") checked segment by segment."""
    if not folder:
        return
    for segment in folder.removesuffix("/").split("/"):
        if segment in {"", ".", ".."}:
            raise ValueError(f"{shown!r}: empty, '.' and '..' path segments are refused (no '//' either)")
        if not _SEGMENT.fullmatch(segment):
            raise ValueError(f"{shown!r}: {segment!r}: only {SEGMENT_CHARS} in names")


def _file_path(path: str, shown: str) -> None:
    _segments(path + "/", shown)
    name = path.rsplit("/", 1)[-1]
    if not name.endswith(SUFFIX) or name == SUFFIX:
        kind = "pickle " if name.lower().endswith(PICKLE_SUFFIXES) else ""
        raise ValueError(
            f"{shown!r}: not a {SUFFIX} file ({kind}{name!r}): only {SUFFIX} (never pickle: .bin, .ckpt, .pt are "
            "refused)"
        )


def gs_folder(source: str) -> tuple[str, str]:
    """The bucket and folder ("" for the bucket's top) a gs:// source is read from: an object's folder, or the
    folder itself."""
    bucket, _, path = source.removeprefix("gs://").partition("/")
    folder = path if path.endswith("/") or not path else path.rpartition("/")[0]
    return bucket, folder.strip("/")
