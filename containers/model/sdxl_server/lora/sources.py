"""Where an adapter comes from: source syntax, its canonical URI, the allow-list and the preloaded names.

Every refusal happens on the text alone, before anything is fetched. A source is reduced to one canonical
URI naming one file (a folder or repo gets its weight file resolved in), and the allow-list only ever
compares canonical URIs, so no spelling (`..`, `//`, `%2f`, a backslash, a look-alike letter) can reach
outside an allowed prefix: such spellings are refused outright rather than normalised.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

MAX_ADAPTERS = 3
DEFAULT_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE
MAX_SOURCE_CHARS = 1024
SUFFIX = ".safetensors"
PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl", ".pickle")
NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
# GCS bucket naming (cloud.google.com/storage/docs/buckets#naming), the dotted 222-character form left out.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9._-]{1,61}[a-z0-9]")
_IP = re.compile(r"\d+\.\d+\.\d+\.\d+")
# A Hub id part, as huggingface_hub's validate_repo_id checks it (plus: no '--', no '..', no '.git' end).
_REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?")
_REVISION = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
# Path segments: what file names of published adapters use, nothing a URL, a shell or a file system reads
# specially ('?', '#', '%', '\\', spaces, quotes) and nothing outside ASCII (look-alike letters).
_SEGMENT = re.compile(r"[A-Za-z0-9._+=@~()-]+")
_SEGMENT_CHARS = "letters, digits and . _ - + = @ ~ ( )"
EXAMPLES = "gs://BUCKET/PATH.safetensors, gs://BUCKET/FOLDER/, hf://ORG/REPO or ORG/REPO"


class SourceError(ValueError):
    """A source or weight_name the server will not fetch; `part` says which of the two is wrong."""

    def __init__(self, message: str, *, part: str = "source") -> None:
        super().__init__(message)
        self.part = part


@dataclass(frozen=True)
class Source:
    """One adapter file. Folders and repos are resolved to their weight file when parsed, so `path` always
    names a file: gs: the object name; hf: the file's path in the repo; file: "" (location is the file)."""

    scheme: str  # "gs" | "hf" | "file" (file: only from SDXL_LORAS)
    location: str  # gs: bucket; hf: "org/repo"; file: absolute path of the .safetensors file
    path: str = ""
    revision: str | None = None  # hf only; None: the default branch

    @property
    def uri(self) -> str:
        """Canonical: gs://b/loras/x.safetensors, hf://org/repo@rev/x.safetensors, file:///abs/x.safetensors."""
        if self.scheme == "gs":
            return f"gs://{self.location}/{self.path}"
        if self.scheme == "hf":
            revision = f"@{self.revision}" if self.revision else ""
            return f"hf://{self.location}{revision}/{self.path}"
        return f"file://{self.location}"

    @property
    def unversioned(self) -> str:
        """The URI without a Hub revision: what the allow-list compares (a repo allowed is allowed at any revision)."""
        return f"hf://{self.location}/{self.path}" if self.scheme == "hf" else self.uri


def parse_source(text: str, *, weight_name: str | None = None, allow_files: bool = False) -> Source:
    """Parse a request's (or SDXL_LORAS') source; SourceError (a ValueError) says what is wrong and what works.

    weight_name: the file in a gs:// folder or a Hub repo (default pytorch_lora_weights.safetensors).
    allow_files: absolute local paths are accepted (SDXL_LORAS only: the operator chose them).
    """
    if not isinstance(text, str) or not text:
        raise SourceError(f"a source is required: {EXAMPLES}")
    _check_text(text, "source")
    if weight_name is not None:
        _check_text(weight_name, "weight_name")
    scheme, sep, rest = text.partition("://")
    if not sep:
        if allow_files and text.startswith("/"):
            return _file(text, weight_name)
        if text.startswith(("/", "~", ".")) or ":" in text:
            raise SourceError(f"{_short(text)!r}: local paths and other schemes are not fetched; give {EXAMPLES}")
        if "/" not in text:
            raise SourceError(
                f"{_short(text)!r} is not a source: give {EXAMPLES} "
                '(an adapter the server preloads is named with {"name": ...} in parameters.lora)'
            )
        if allow_files and text.endswith(SUFFIX):
            raise SourceError(f"{_short(text)!r}: a local file needs an absolute path (/...)")
        if text.split("/")[1].endswith(SUFFIX):
            raise SourceError(
                f"{_short(text)!r}: ORG/REPO names a Hub repo; a file in one is hf://ORG/REPO/FILE{SUFFIX}"
            )
        scheme, rest = "hf", text  # Model Garden's lora_id is a Hub id
    scheme = scheme.lower()
    if scheme == "gs":
        return _gs(rest, weight_name)
    if scheme == "hf":
        return _hf(rest, weight_name)
    raise SourceError(f"{text!r}: {scheme}:// sources are not fetched; give {EXAMPLES}")


def _check_text(text: str, part: str) -> None:
    """The refusals that hold wherever in the text the character is."""
    if len(text) > MAX_SOURCE_CHARS:
        raise SourceError(f"too long: {len(text)} characters; at most {MAX_SOURCE_CHARS}", part=part)
    # Echoed escaped unless plain ASCII: a lone surrogate cannot be encoded into the JSON answer (a 500), and
    # look-alike letters and odd spaces become visible.
    shown = _short(text if text.isascii() else ascii(text))
    if any(ord(char) < 32 or ord(char) == 127 for char in text):
        raise SourceError(f"{_short(ascii(text))}: control characters (NUL, newline...) are refused", part=part)
    if any(char.isspace() for char in text):
        raise SourceError(f"{shown}: whitespace is refused; rename the file without spaces", part=part)
    if "\\" in text:
        raise SourceError(f"{shown}: backslashes are refused; paths use '/'", part=part)
    if "%" in text:
        raise SourceError(f"{shown}: '%' (URL encoding) is refused; write the name as it is", part=part)
    if not text.isascii():
        raise SourceError(f"{shown}: only ASCII characters ({_SEGMENT_CHARS})", part=part)


def _gs(rest: str, weight_name: str | None) -> Source:
    bucket, _, path = rest.partition("/")
    _check_bucket(bucket)
    if path and not path.endswith("/"):
        if weight_name is not None:
            raise _named_file(f"gs://{rest}")
        return Source("gs", bucket, _file_path(path, f"gs://{rest}"))
    folder = _segments(path, f"gs://{rest}") if path else ""
    return Source("gs", bucket, folder + _weight(weight_name))


def _hf(rest: str, weight_name: str | None) -> Source:
    org, _, after = rest.partition("/")
    repo_and_revision, _, path = after.partition("/")
    repo, at, revision = repo_and_revision.partition("@")
    shown = _short(f"hf://{rest}")
    for part in (org, repo):
        if not (_REPO_PART.fullmatch(part) and "--" not in part and ".." not in part and not part.endswith(".git")):
            raise SourceError(
                f"{shown}: not a Hub repo id (ORG/REPO, each part letters, digits, '.', '_' or '-', "
                "starting and ending with a letter or digit, at most 96 characters)"
            )
    if at and revision == "refs":
        # refs/pr/N (a pull request) or refs/convert/...: the '/' splits it into revision 'refs' and a file path,
        # which would be refused as no .safetensors file or, worse, fetched as one at a revision no one meant.
        raise SourceError(
            f"{shown}: a Hub revision is a branch, tag or commit without '/': refs/pr/N is not supported "
            "(give the pull request's commit after '@')"
        )
    if at and not (_REVISION.fullmatch(revision) and ".." not in revision):
        raise SourceError(f"{shown}: the revision after '@' must be a branch, tag or commit (letters, digits, . _ -)")
    if path and not path.endswith("/"):
        if weight_name is not None:
            raise _named_file(shown)
        return Source("hf", f"{org}/{repo}", _file_path(path, shown), revision or None)
    folder = _segments(path, shown) if path else ""
    return Source("hf", f"{org}/{repo}", folder + _weight(weight_name), revision or None)


def _file(text: str, weight_name: str | None) -> Source:
    path = text.removesuffix("/")
    if any(part in {"", ".", ".."} for part in path.split("/")[1:]) or not path:
        raise SourceError(f"{_short(text)}: an absolute path without '.', '..' or empty ('//') parts")
    if not text.endswith("/") and path.lower().endswith((SUFFIX, *PICKLE_SUFFIXES)):
        if weight_name is not None:
            raise _named_file(text)
        return Source("file", "/" + _file_path(path[1:], text))
    return Source("file", f"{path}/{_weight(weight_name)}")


def _check_bucket(bucket: str) -> None:
    if not bucket:
        raise SourceError(f"gs:// needs a bucket: {EXAMPLES}")
    if bucket.lower() != bucket:
        raise SourceError(f"gs://{bucket}: bucket names are lower case")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IP.fullmatch(bucket) or bucket.startswith("goog"):
        raise SourceError(
            f"gs://{_short(bucket)}: not a bucket name (3 to 63 lower-case letters, digits, '-', '_' or '.', "
            "starting and ending with a letter or digit)"
        )


def _segments(path: str, shown: str) -> str:
    """A folder ("a/b/") checked segment by segment; returned as it was (it is already canonical)."""
    for segment in path.removesuffix("/").split("/"):
        if segment in {"", ".", ".."}:
            raise SourceError(f"{_short(shown)}: empty, '.' and '..' path segments are refused (no '//' either)")
        if not _SEGMENT.fullmatch(segment):
            raise SourceError(f"{_short(shown)}: {segment!r}: only {_SEGMENT_CHARS} in names")
    return path


def _file_path(path: str, shown: str, part: str = "source") -> str:
    """A path ending in a file name: every segment checked, the name must end in .safetensors."""
    try:
        _segments(path + "/", shown)
    except SourceError as exc:
        raise SourceError(str(exc), part=part) from None
    name = path.rsplit("/", 1)[-1]
    if not name.endswith(SUFFIX) or name == SUFFIX:
        kind = "pickle " if name.lower().endswith(PICKLE_SUFFIXES) else ""
        raise SourceError(
            f"{_short(shown)}: not a {SUFFIX} file ({kind}{name!r}): only {SUFFIX} "
            "(never pickle: .bin, .ckpt, .pt are refused)",
            part=part,
        )
    return path


def _weight(weight_name: str | None) -> str:
    if weight_name is None:
        return DEFAULT_WEIGHT_NAME
    if weight_name.startswith("/"):
        raise SourceError(
            f"{weight_name!r}: a file name inside the folder or repo, not an absolute path", part="weight_name"
        )
    return _file_path(weight_name, weight_name, part="weight_name")


def _named_file(shown: str) -> SourceError:
    return SourceError(
        f"{_short(shown)} already names a file: weight_name is for a folder (ending in '/') or a repo",
        part="weight_name",
    )


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass(frozen=True)
class AllowList:
    """SDXL_LORA_SOURCES: the prefixes a request's source may be under, each ending in '/' (segment boundaries)."""

    prefixes: tuple[str, ...] = ()

    @classmethod
    def parse(cls, raw: str) -> AllowList:
        """'gs://b/loras,hf://org/' -> ('gs://b/loras/', 'hf://org/'); ValueError names a malformed prefix."""
        prefixes: list[str] = []
        for entry in (part.strip() for part in raw.split(",")):
            if entry:
                prefix = _prefix(entry)
                if prefix not in prefixes:
                    prefixes.append(prefix)
        return cls(tuple(prefixes))

    def allows(self, source: Source) -> bool:
        """Whether the source's canonical URI is under a prefix; a local file never is."""
        return source.scheme != "file" and any(source.unversioned.startswith(prefix) for prefix in self.prefixes)


def _prefix(entry: str) -> str:
    shown = _short(entry)
    try:
        _check_text(entry, "source")
    except SourceError as exc:
        raise ValueError(f"prefix {exc}") from None
    scheme, sep, rest = entry.partition("://")
    scheme = scheme.lower()
    if not sep or scheme not in {"gs", "hf"}:
        raise ValueError(f"{shown!r} is not a prefix: gs://BUCKET/, gs://BUCKET/FOLDER/, hf://ORG/ or hf://ORG/REPO")
    if rest.removesuffix("/").endswith(SUFFIX):
        raise ValueError(f"{shown!r}: a prefix is a folder, not a file (to preload one adapter, use SDXL_LORAS)")
    if "@" in rest and scheme == "hf":
        raise ValueError(f"{shown!r}: a prefix allows a repo at any revision; leave '@REVISION' out")
    head, _, path = rest.partition("/")
    folder = path if not path or path.endswith("/") else path + "/"
    try:
        if scheme == "gs":
            _check_bucket(head)
            if folder:
                _segments(folder, entry)
            return f"gs://{head}/{folder}"
        repo, _, rest_path = folder.partition("/")
        # An org alone is checked as an id part; with a repo, as a whole id (and deeper folders by segment).
        _hf(f"{head}/{repo or 'x'}/", None)
        if rest_path:
            _segments(rest_path, entry)
        return f"hf://{head}/{folder}"
    except SourceError as exc:
        raise ValueError(f"prefix {exc}") from None


def parse_preloaded(raw: str) -> dict[str, Source]:
    """SDXL_LORAS 'name=source,...' -> {name: Source}; names lower-cased; ValueError names the bad entry."""
    loras: dict[str, Source] = {}
    for entry in (part.strip() for part in raw.split(",")):
        if not entry:
            continue
        name, sep, text = entry.partition("=")
        name = name.strip().lower()
        if not sep or not text.strip():
            raise ValueError(
                f"{_short(entry)!r} is not NAME=SOURCE (e.g. pixel-art=gs://bucket/loras/pixel.safetensors)"
            )
        if not NAME.fullmatch(name):
            raise ValueError(
                f"{_short(entry)!r}: the name must be 1 to 64 lower-case letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if name == "none":  # {"name": "none"} and the UI's no-adapter entry would name two things
            raise ValueError(f"{_short(entry)!r}: the name 'none' is reserved (it means no adapter); choose another")
        if name in loras:
            raise ValueError(f"{name!r} is named twice; each name once")
        try:
            loras[name] = parse_source(text.strip(), allow_files=True)
        except SourceError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return loras
