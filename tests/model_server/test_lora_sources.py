"""LoRA source syntax, the allow-list and SDXL_LORAS: every refusal on the text alone, before any fetch."""

from __future__ import annotations

import re

import pytest

from sdxl_server.lora.sources import (
    DEFAULT_WEIGHT_NAME,
    MAX_SOURCE_CHARS,
    AllowList,
    Source,
    SourceError,
    parse_preloaded,
    parse_source,
)

# (source, weight_name, canonical URI): a folder or repo gets its weight file resolved in.
ACCEPTED: list[tuple[str, str | None, str]] = [
    ("gs://bkt/loras/pixel.safetensors", None, "gs://bkt/loras/pixel.safetensors"),
    ("GS://bkt/loras/pixel.safetensors", None, "gs://bkt/loras/pixel.safetensors"),
    ("gs://bkt/Loras/Pixel_v1.2+x=y@z~(1).safetensors", None, "gs://bkt/Loras/Pixel_v1.2+x=y@z~(1).safetensors"),
    ("gs://bkt/loras/", None, f"gs://bkt/loras/{DEFAULT_WEIGHT_NAME}"),
    ("gs://bkt/loras/", "pixel.safetensors", "gs://bkt/loras/pixel.safetensors"),
    ("gs://bkt/loras/", "v2/pixel.safetensors", "gs://bkt/loras/v2/pixel.safetensors"),
    ("gs://bkt/", None, f"gs://bkt/{DEFAULT_WEIGHT_NAME}"),
    ("gs://bkt", None, f"gs://bkt/{DEFAULT_WEIGHT_NAME}"),
    ("gs://my-bucket_1.example/a/b/c.safetensors", None, "gs://my-bucket_1.example/a/b/c.safetensors"),
    ("hf://org/repo", None, f"hf://org/repo/{DEFAULT_WEIGHT_NAME}"),
    ("hf://org/repo/", "sdxl_lora.safetensors", "hf://org/repo/sdxl_lora.safetensors"),
    ("hf://Org-1/Repo.v2_x/unet/lora.safetensors", None, "hf://Org-1/Repo.v2_x/unet/lora.safetensors"),
    ("hf://org/repo@main", None, f"hf://org/repo@main/{DEFAULT_WEIGHT_NAME}"),
    ("hf://org/repo@v1.0/sub/", "x.safetensors", "hf://org/repo@v1.0/sub/x.safetensors"),
    ("org/repo", None, f"hf://org/repo/{DEFAULT_WEIGHT_NAME}"),  # Model Garden's lora_id: a Hub id
    ("nerijs/pixel-art-xl", "pixel-art-xl.safetensors", "hf://nerijs/pixel-art-xl/pixel-art-xl.safetensors"),
]


@pytest.mark.parametrize(("text", "weight_name", "uri"), ACCEPTED)
def test_a_source_is_parsed_to_one_canonical_uri_naming_a_file(text: str, weight_name: str | None, uri: str) -> None:
    source = parse_source(text, weight_name=weight_name)
    assert source.uri == uri
    assert source.path.endswith(".safetensors") and source.scheme in {"gs", "hf"}
    assert parse_source(source.uri) == source  # canonical: parsing it again changes nothing


def test_source_fields_as_the_contract_names_them() -> None:
    assert parse_source("hf://org/repo@abc123/sub/x.safetensors") == Source(
        "hf", "org/repo", "sub/x.safetensors", "abc123"
    )
    assert parse_source("gs://bkt/a/", weight_name="b.safetensors") == Source("gs", "bkt", "a/b.safetensors")
    assert parse_source("hf://org/repo@v1").unversioned == f"hf://org/repo/{DEFAULT_WEIGHT_NAME}"


# (source, weight_name, words the message must contain, which part is wrong)
REFUSED: list[tuple[str, str | None, str, str]] = [
    ("gs://bkt/loras/../secret.safetensors", None, "'..' path segments", "source"),
    ("gs://bkt/loras/./x.safetensors", None, "'.'", "source"),
    ("gs://bkt/loras%2f..%2fsecret.safetensors", None, "'%'", "source"),
    ("gs://bkt/loras%2F..", None, "'%'", "source"),
    ("gs://bkt/loras//x.safetensors", None, "'//'", "source"),
    ("gs://bkt//x.safetensors", None, "'//'", "source"),
    ("hf://org/../x", None, "not a Hub repo id", "source"),
    ("hf://org/repo/../../other/repo/x.safetensors", None, "'..'", "source"),
    ("hf://org/repo@../x.safetensors", None, "revision", "source"),
    ("hf://org/repo@", None, "revision", "source"),
    # refs/pr/N reads as revision 'refs' and file 'pr/N': the message must be about the revision, not the suffix
    ("hf://org/repo@refs/pr/1", None, "a Hub revision is a branch, tag or commit without '/'", "source"),
    ("hf://org/repo@refs/pr/1/x.safetensors", None, "refs/pr/N is not supported", "source"),
    ("org/repo@refs/convert/parquet", None, "without '/'", "source"),
    ("hf://org", None, "not a Hub repo id", "source"),
    ("hf://org--x/repo", None, "not a Hub repo id", "source"),
    ("hf://org/repo.git", None, "not a Hub repo id", "source"),
    ("hf://-org/repo", None, "not a Hub repo id", "source"),
    ("hf://" + "o" * 97 + "/repo", None, "at most 96", "source"),
    ("http://169.254.169.254/computeMetadata/v1/", None, "http:// sources are not fetched", "source"),
    ("https://huggingface.co/org/repo/x.safetensors", None, "https:// sources are not fetched", "source"),
    ("s3://bkt/x.safetensors", None, "s3:// sources are not fetched", "source"),
    ("file:///etc/passwd", None, "file:// sources are not fetched", "source"),
    ("/etc/passwd", None, "local paths", "source"),
    ("/data/loras/x.safetensors", None, "local paths", "source"),
    ("./x.safetensors", None, "local paths", "source"),
    ("~/x.safetensors", None, "local paths", "source"),
    ("gs:/bkt/x.safetensors", None, "local paths and other schemes", "source"),
    ("C:/loras/x.safetensors", None, "local paths and other schemes", "source"),
    ("gs://bkt\\loras\\x.safetensors", None, "backslashes", "source"),
    ("gs://bkt/loras/..\\x.safetensors", None, "backslashes", "source"),
    ("gs://bkt/loras/x.safetensors\x00.png", None, "control characters", "source"),
    ("gs://bkt/loras/x.safetensors\n", None, "control characters", "source"),
    ("gs://bkt/my lora.safetensors", None, "whitespace", "source"),
    ("gs://bkt/my\u3000lora\ud800.safetensors", None, "'gs://bkt/my\\u3000lora", "source"),  # ideographic space
    ("gs://bkt/lor\u0430s/x.safetensors", None, "only ASCII", "source"),  # Cyrillic a
    ("gs://bkt/loras\u2215..\u2215x.safetensors", None, "only ASCII", "source"),  # division slash
    ("gs://bkt/loras\uff0f..\uff0fx.safetensors", None, "only ASCII", "source"),  # fullwidth solidus
    ("gs://bkt/\ud800.safetensors", None, "'gs://bkt/\\ud800.safetensors'", "source"),  # a lone surrogate
    ("gs://bkt/loras/x.safetensors?alt=media", None, "only letters", "source"),
    ("gs://bkt/loras/x.safetensors#y", None, "only letters", "source"),
    ("gs://bkt/" + "a" * 2000 + ".safetensors", None, f"at most {MAX_SOURCE_CHARS}", "source"),
    ("gs://BKT/x.safetensors", None, "lower case", "source"),
    ("gs://b/x.safetensors", None, "not a bucket name", "source"),
    ("gs://" + "b" * 64 + "/x.safetensors", None, "not a bucket name", "source"),
    ("gs://-bkt/x.safetensors", None, "not a bucket name", "source"),
    ("gs://bkt@evil.example/x.safetensors", None, "not a bucket name", "source"),
    ("gs://bkt:443/x.safetensors", None, "not a bucket name", "source"),
    ("gs://192.168.0.1/x.safetensors", None, "not a bucket name", "source"),
    ("gs://google-bucket/x.safetensors", None, "not a bucket name", "source"),
    ("gs:///x.safetensors", None, "needs a bucket", "source"),
    ("gs://bkt/loras/x.bin", None, "never pickle", "source"),
    ("gs://bkt/loras/x.ckpt", None, "never pickle", "source"),
    ("hf://org/repo/x.pt", None, "never pickle", "source"),
    ("gs://bkt/loras/x.safetensors.bin", None, "only .safetensors", "source"),
    ("gs://bkt/loras/.safetensors", None, "only .safetensors", "source"),
    ("gs://bkt/loras/x.SAFETENSORS", None, "only .safetensors", "source"),
    ("org/x.safetensors", None, "hf://ORG/REPO/FILE", "source"),
    ("pixel-art", None, '{"name": ...}', "source"),
    ("", None, "required", "source"),
    ("gs://bkt/loras/", "../secret.safetensors", "'..'", "weight_name"),
    ("gs://bkt/loras/", "/etc/x.safetensors", "not an absolute path", "weight_name"),
    ("gs://bkt/loras/", "x.bin", "never pickle", "weight_name"),
    ("gs://bkt/loras/", "a\\b.safetensors", "backslashes", "weight_name"),
    ("gs://bkt/loras/", "a%2fb.safetensors", "'%'", "weight_name"),
    ("hf://org/repo", "sub//x.safetensors", "'//'", "weight_name"),
    ("gs://bkt/loras/x.safetensors", "y.safetensors", "already names a file", "weight_name"),
    ("hf://org/repo/x.safetensors", "y.safetensors", "already names a file", "weight_name"),
]


@pytest.mark.parametrize(("text", "weight_name", "words", "part"), REFUSED)
def test_a_hostile_or_malformed_source_is_refused_saying_what_is_wrong(
    text: str, weight_name: str | None, words: str, part: str
) -> None:
    with pytest.raises(SourceError) as raised:
        parse_source(text, weight_name=weight_name)
    assert issubclass(SourceError, ValueError)  # the contract's error type
    assert words in str(raised.value) and raised.value.part == part
    message = str(raised.value)
    assert "\n" not in message and "\x00" not in message and len(message) < 400  # one line, shown safely
    assert message.encode("utf-8")  # a lone surrogate echoed back could not be sent as JSON: a 500


def test_every_refusal_says_what_would_work() -> None:
    for text in ("http://169.254.169.254/x", "/etc/passwd", "file:///etc/passwd", "pixel-art"):
        with pytest.raises(ValueError, match=re.escape("gs://BUCKET/PATH.safetensors")):
            parse_source(text)


def test_local_files_are_only_for_the_operator() -> None:
    assert parse_source("/data/loras/x.safetensors", allow_files=True) == Source("file", "/data/loras/x.safetensors")
    folder = parse_source("/data/loras/", allow_files=True)
    assert folder == Source("file", f"/data/loras/{DEFAULT_WEIGHT_NAME}") and folder.uri.startswith("file:///data/")
    for text in ("/data/../etc/x.safetensors", "/data/./x.safetensors", "//data/x.safetensors", "/", "/data/x.bin"):
        with pytest.raises(ValueError):
            parse_source(text, allow_files=True)
    assert parse_source("gs://bkt/x.safetensors", allow_files=True).scheme == "gs"  # the others still work


PREFIXES: list[tuple[str, tuple[str, ...]]] = [
    ("", ()),
    (" , ,", ()),
    ("gs://bkt/loras", ("gs://bkt/loras/",)),  # the trailing '/' is added: segment boundaries
    ("gs://bkt/loras/", ("gs://bkt/loras/",)),
    ("gs://bkt", ("gs://bkt/",)),
    ("hf://org", ("hf://org/",)),
    ("hf://org/repo", ("hf://org/repo/",)),
    (" gs://bkt/a/b , hf://org/ ,gs://bkt/a/b/", ("gs://bkt/a/b/", "hf://org/")),  # duplicates once
]


@pytest.mark.parametrize(("raw", "prefixes"), PREFIXES)
def test_allow_list_prefixes_are_canonical_and_end_in_a_slash(raw: str, prefixes: tuple[str, ...]) -> None:
    assert AllowList.parse(raw).prefixes == prefixes


BAD_PREFIXES = [
    "http://169.254.169.254/",
    "file:///data/",
    "/data/loras",
    "org/",
    "gs://b/",
    "gs://BKT/",
    "gs://bkt/../x/",
    "gs://bkt//x/",
    "gs://bkt/a%2f/",
    "gs://bkt/lor\u0430s/",
    "gs://bkt/loras/x.safetensors",
    "hf://org/repo@main",
    "hf://../x",
    "hf://",
    "gs://bkt/loras,https://evil.example/",
]


@pytest.mark.parametrize("raw", BAD_PREFIXES)
def test_a_malformed_prefix_is_refused(raw: str) -> None:
    with pytest.raises(ValueError, match=r"prefix|not a"):
        AllowList.parse(raw)


ALLOW = AllowList.parse("gs://bkt/loras,hf://org/,hf://team/repo")
ALLOWS: list[tuple[str, bool]] = [
    ("gs://bkt/loras/x.safetensors", True),
    ("gs://bkt/loras/deep/er/x.safetensors", True),
    ("gs://bkt/loras/", True),
    ("gs://bkt/loras-evil/x.safetensors", False),  # a string prefix, not a folder: never
    ("gs://bkt/lorasx.safetensors", False),
    ("gs://bkt/x.safetensors", False),
    ("gs://bkt2/loras/x.safetensors", False),
    ("gs://other/loras/x.safetensors", False),
    ("hf://org/anything", True),
    ("org/anything", True),
    ("hf://org/repo@v2/x.safetensors", True),
    ("hf://orgx/repo", False),
    ("hf://or/repo", False),
    ("hf://ORG/repo", False),  # canonical URIs compare exactly
    ("hf://team/repo", True),
    ("hf://team/repo@abc/sub/x.safetensors", True),
    ("hf://team/repo-evil", False),
    ("hf://team/repo2/x.safetensors", False),
    ("hf://team/other", False),
]


@pytest.mark.parametrize(("text", "allowed"), ALLOWS)
def test_allow_list_matches_canonical_uris_on_segment_boundaries(text: str, allowed: bool) -> None:
    assert ALLOW.allows(parse_source(text)) is allowed


def test_an_empty_allow_list_allows_nothing_and_files_are_never_allowed() -> None:
    assert not AllowList.parse("").allows(parse_source("gs://bkt/loras/x.safetensors"))
    everything = AllowList.parse("gs://bkt/,hf://org/")
    assert not everything.allows(parse_source("/bkt/x.safetensors", allow_files=True))


def test_preloaded_names_and_sources() -> None:
    loras = parse_preloaded(
        " Pixel-Art=gs://bkt/loras/pixel.safetensors, water.v2=hf://org/repo@v2 ,"
        "local=/srv/loras/,f=/srv/x.safetensors,"
    )
    assert list(loras) == ["pixel-art", "water.v2", "local", "f"]  # case-insensitive: lower-cased
    assert loras["pixel-art"].uri == "gs://bkt/loras/pixel.safetensors"
    assert loras["water.v2"].uri == f"hf://org/repo@v2/{DEFAULT_WEIGHT_NAME}"
    assert loras["local"] == Source("file", f"/srv/loras/{DEFAULT_WEIGHT_NAME}")
    assert loras["f"] == Source("file", "/srv/x.safetensors")
    assert parse_preloaded("") == {} and parse_preloaded(" , ") == {}


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        ("pixel=gs://bkt/a.safetensors,Pixel=gs://bkt/b.safetensors", "named twice"),
        ("pixel art=gs://bkt/a.safetensors", "the name must be"),
        ("-pixel=gs://bkt/a.safetensors", "the name must be"),
        ("../x=gs://bkt/a.safetensors", "the name must be"),
        ("p" * 65 + "=gs://bkt/a.safetensors", "the name must be"),
        ("gs://bkt/a.safetensors", "NAME=SOURCE"),
        ("pixel=", "NAME=SOURCE"),
        ("pixel=loras/x.safetensors", "absolute path"),
        ("pixel=/srv/x.ckpt", "never pickle"),
        ("pixel=/srv/../etc/x.safetensors", "pixel: "),
        ("pixel=http://169.254.169.254/x", "pixel: "),
        ("pixel=gs://bkt/x.bin", "never pickle"),
        ("none=gs://bkt/a.safetensors", "'none' is reserved"),
        ("NONE=/srv/x.safetensors", "'none' is reserved"),
    ],
)
def test_a_bad_preloaded_entry_is_named(raw: str, words: str) -> None:
    with pytest.raises(ValueError) as raised:
        parse_preloaded(raw)
    assert words in str(raised.value)


def test_an_adapter_preloaded_as_none_stops_the_start_naming_sdxl_loras() -> None:
    """'none' is the UI's no-adapter entry; {"name": "none"} naming a real adapter would read as no adapter."""
    from sdxl_server.errors import SettingsError
    from sdxl_server.settings import Settings

    with pytest.raises(SettingsError) as raised:
        Settings.from_env({"SDXL_LORAS": "pixel=/srv/p.safetensors,None=gs://bkt/n.safetensors"})
    assert raised.value.field == "SDXL_LORAS"
    assert "SDXL_LORAS" in raised.value.message and "'none' is reserved" in raised.value.message


PIECES = [
    "gs://", "hf://", "GS://", "http://", "file://", "bkt", "BKT", "bkt2", "loras", "loras-evil", "org", "orgx",
    "repo", "/", "/", "//", ".", "..", "%2f", "%2e", "\\", "@", "@main", ":", "?", "#", "~", "x.safetensors",
    ".safetensors", ".bin", "\x00", "\n", " ", "\u0430", "\u2215", "\uff0f", "\ud800", "-", "_", "+", "=",
]  # fmt: skip


def test_no_spelling_of_a_source_escapes_its_prefix() -> None:
    """20,000 random splices of the pieces hostile sources are made of: each is refused with a SourceError or
    parsed to a canonical URI that parses back to itself, and the allow-list allows it only inside a prefix."""
    import random

    rng = random.Random(16)
    allow = AllowList.parse("gs://bkt/loras,hf://org/repo")
    accepted = allowed = 0
    for _ in range(20_000):
        # Mostly shaped like a source (a scheme, pieces, a file name), so the accepting paths are reached too.
        head = rng.choice(["gs://bkt/loras", "hf://org/repo", "gs://bkt/", "hf://org/", "", rng.choice(PIECES)])
        tail = rng.choice(["x.safetensors", "/x.safetensors", "/", "", rng.choice(PIECES)])
        text = head + "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 6))) + tail
        weight = "".join(rng.choice(PIECES) for _ in range(rng.randint(1, 3))) if rng.random() < 0.2 else None
        try:
            source = parse_source(text, weight_name=weight)
        except SourceError as exc:
            assert str(exc).encode("utf-8") and "\n" not in str(exc)
            continue
        accepted += 1
        uri = source.uri
        assert uri.isascii() and not any(char in uri for char in "%\\?# \x00")
        scheme, rest = uri.split("://")
        assert scheme in {"gs", "hf"} and all(part not in {"", ".", ".."} for part in rest.split("/"))
        assert uri.endswith(".safetensors") and parse_source(uri) == source
        if allow.allows(source):
            allowed += 1
            parts = source.unversioned.split("/")
            assert parts[2:4] in (["bkt", "loras"], ["org", "repo"]) and len(parts) > 4, uri
    assert accepted > 1000 and allowed > 300  # the splices reach the accepting paths, not only the first refusal
