"""[model] lora_sources, loras and lora_max_rank: validated with the model server's own rules (a copy, held equal
to the server's here), errors naming the key, the file or variable, and the fix; files only for target local."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sdxlctl import lora_sources as rules
from sdxlctl.config import Config, load_config
from sdxlctl.errors import ConfigError
from tests.conftest import Cli

PIXEL = "gs://team-loras/loras/pixel-art.safetensors"


def test_lora_is_off_unless_configured_and_the_environment_sets_each_key() -> None:
    model = Config().model
    assert (model.lora_sources, model.loras, model.lora_max_rank) == ([], {}, 64)
    env = {
        "SDXLCTL_MODEL_LORA_SOURCES": "gs://team-loras/loras, hf://some-org ,gs://team-loras/loras/",
        "SDXLCTL_MODEL_LORAS": f"Pixel-Art={PIXEL},ink=some-org/ink-lora@v2",
        "SDXLCTL_MODEL_LORA_MAX_RANK": "128",
    }
    model = load_config(None, env).model
    # As the server's allow-list holds them: a trailing '/' (segment boundaries), each prefix once.
    assert model.lora_sources == ["gs://team-loras/loras/", "hf://some-org/"]
    assert model.loras == {"pixel-art": PIXEL, "ink": "some-org/ink-lora@v2"}  # names are not case-sensitive
    assert model.lora_max_rank == 128


def test_the_file_takes_a_table_of_adapters(tmp_path: Path) -> None:
    file = tmp_path / "sdxlctl.toml"
    file.write_text(
        '[model]\nlora_sources = ["hf://some-org/ink-lora", "gs://team-loras/"]\n'
        f'[model.loras]\npixel-art = "{PIXEL}"\nink = "hf://some-org/ink-lora/ink.safetensors"\n'
    )
    model = load_config(file, {}).model
    assert model.lora_sources == ["hf://some-org/ink-lora/", "gs://team-loras/"]
    assert model.loras == {"pixel-art": PIXEL, "ink": "hf://some-org/ink-lora/ink.safetensors"}


@pytest.mark.parametrize(
    ("var", "value", "says"),
    [
        ("LORA_SOURCES", "https://example.com/loras/", "is not a prefix: gs://BUCKET/, gs://BUCKET/FOLDER/, hf://ORG/"),
        ("LORA_SOURCES", "gs://team-loras/../other/", "'.' and '..' path segments are refused"),
        ("LORA_SOURCES", "gs://Team/loras/", "bucket names are lower case"),
        ("LORA_SOURCES", "gs://team-loras/x.safetensors", "a prefix is a folder, not a file"),
        ("LORA_SOURCES", "hf://org/repo@main", "leave '@REVISION' out"),
        ("LORAS", "pixel", "'pixel' is not NAME=SOURCE"),
        ("LORAS", f"-pixel={PIXEL}", "1 to 64 lower-case letters, digits"),
        ("LORAS", f"pixel={PIXEL},PIXEL={PIXEL}", "'pixel' is named twice"),
        ("LORAS", "pixel=gs://team-loras/pixel.ckpt", "never pickle: .bin, .ckpt, .pt are refused"),
        ("LORAS", "pixel=https://example.com/p.safetensors", "https:// sources are not fetched"),
        ("LORAS", "pixel=gs://team-loras/a%2f..%2fb.safetensors", "'%' (URL encoding) is refused"),
        ("LORAS", "pixel=loras/pixel.safetensors", "written ./loras/pixel.safetensors or as an absolute path"),
        ("LORAS", f"None={PIXEL}", "'none' is reserved (the UI's menu entry for no adapter): pick another name"),
        ("LORA_MAX_RANK", "0", "greater than or equal to 1"),
        ("LORA_MAX_RANK", "2048", "less than or equal to 1024"),
    ],
)
def test_a_bad_value_names_the_variable_and_what_it_takes(var: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, {f"SDXLCTL_MODEL_{var}": value})
    message = caught.value.message
    assert message.startswith(f"SDXLCTL_MODEL_{var} (environment) = {value!r}: "), message
    assert says in message, message


def test_a_bad_value_in_the_file_names_the_file_and_the_key(tmp_path: Path) -> None:
    file = tmp_path / "sdxlctl.toml"
    file.write_text('[model]\nlora_sources = ["gs://team-loras/loras/", "s3://elsewhere/"]\n')
    with pytest.raises(ConfigError) as caught:
        load_config(file, {})
    assert caught.value.message.startswith(f"{file}: model.lora_sources = ")
    assert "'s3://elsewhere/' is not a prefix" in caught.value.message


def test_a_file_on_this_machine_is_for_the_local_target_only_and_says_how_to_push_it(tmp_path: Path) -> None:
    file = tmp_path / "sdxlctl.toml"
    file.write_text('target = "vertex"\n[model.loras]\npixel = "./loras/pixel.safetensors"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(file, {})
    assert caught.value.message == (
        f"{file}: [model] loras: pixel = './loras/pixel.safetensors' is a file on this machine, which the model "
        "server on Vertex AI cannot read"
    )
    assert "sdxlctl lora push ./loras/pixel.safetensors" in (caught.value.hint or "")
    assert "gs://" in (caught.value.hint or "")


def test_a_local_file_reaches_the_local_server_as_an_absolute_path_beside_the_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir("/")  # relative to the config file's folder, not to where sdxlctl runs
    file = tmp_path / "sdxlctl.toml"
    file.write_text(
        '[model.loras]\npixel = "./loras/pixel.safetensors"\nink = "../shared/ink/"\nmine = "/srv/mine.safetensors"\n'
    )
    assert load_config(file, {}).model.loras == {
        "pixel": f"{tmp_path}/loras/pixel.safetensors",
        "ink": f"{tmp_path.parent}/shared/ink/",
        "mine": "/srv/mine.safetensors",
    }
    (tmp_path / "my loras").mkdir()
    file.write_text('[model.loras]\npixel = "./my loras/pixel.safetensors"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(file, {})
    assert "pixel = './my loras/pixel.safetensors': " in caught.value.message
    assert "whitespace is refused" in caught.value.message


def test_sdxlctl_config_shows_the_lora_keys_and_where_they_came_from(cli: Cli) -> None:
    shown = cli("config", "--json", env={"SDXLCTL_MODEL_LORAS": f"pixel={PIXEL}"})
    assert shown.code == 0, shown.err
    rows = {r["key"]: r for r in json.loads(shown.out)["settings"]}
    assert rows["model.loras"]["value"] == {"pixel": PIXEL} and rows["model.loras"]["source"] == "SDXLCTL_MODEL_LORAS"
    assert rows["model.lora_max_rank"]["value"] == 64 and rows["model.lora_max_rank"]["source"] == "default"
    bad = cli("deploy", "--dry-run", env={"SDXLCTL_MODEL_LORA_SOURCES": "file:///etc/"})
    assert bad.code == 2 and "SDXLCTL_MODEL_LORA_SOURCES" in bad.err and "Traceback" not in bad.err


def test_the_local_dry_run_names_the_lora_sources_and_adapters(cli: Cli) -> None:
    env = {"SDXLCTL_MODEL_LORA_SOURCES": "hf://some-org/", "SDXLCTL_MODEL_LORAS": f"pixel={PIXEL}"}
    plan = cli("deploy", "--dry-run", env=env)
    assert plan.code == 0, plan.err
    said = " ".join((plan.out + plan.err).split())
    assert "LoRA adapters from hf://some-org/" in said and "LoRA adapters loaded at start: pixel" in said


# ---------------------------------------------------------------- the copy of the server's rules

SOURCES = [
    PIXEL,
    "hf://team/repo@refs/pr/1/x.safetensors",  # a pull request's ref: revision 'refs' and a path, refused by both
    "team/repo@refs/convert/parquet",
    "gs://team-loras/loras/",
    "gs://team-loras/loras",  # an object without a suffix: refused by both
    "gs://team-loras/a//b.safetensors",
    "gs://team-loras/a/./b.safetensors",
    "gs://192.168.1.1/x.safetensors",
    "gs://goog-loras/x.safetensors",
    "gs://ab/x.safetensors",
    "gs://team-loras/x.bin",
    "gs://team-loras/x y.safetensors",
    "gs://team-loras/x\\y.safetensors",
    "gs://team-loras/\u0445.safetensors",  # a Cyrillic look-alike
    "gs://team-loras/x.safetensors\x00",
    "gs://team-loras/" + "a" * 1020 + ".safetensors",
    "hf://some-org/ink-lora",
    "hf://some-org/ink-lora@v1.0/sub/ink.safetensors",
    "hf://some-org/ink-lora@../x",
    "hf://some-org/ink--lora",
    "hf://some-org/ink-lora.git",
    "hf://-org/ink-lora",
    "hf://some-org/ink-lora/ink.ckpt",
    "some-org/ink-lora",
    "some-org/ink-lora.safetensors",
    "some-org/ink-lora/sub/ink.safetensors",
    "pixel-art",
    "file:///srv/x.safetensors",
    "http://169.254.169.254/computeMetadata/",
    "s3://bucket/x.safetensors",
    "/srv/loras/pixel.safetensors",
    "/srv/loras/pixel/",
    "/srv/loras/pixel.ckpt",
    "/srv/loras/pixel.SAFETENSORS",  # the server reads it as a file and refuses the case
    "/srv/loras/.safetensors",
    "/srv/loras/pixel.ckpt/",  # a folder of that name: the server reads its weight file
    "/srv/../etc/x.safetensors",
    "~/pixel.safetensors",
    "./pixel.safetensors",
    "",
]
PREFIXES = [
    "gs://team-loras",
    "gs://team-loras/loras",
    "gs://team-loras/loras/",
    "gs://team-loras/loras/x.safetensors",
    "gs://team-loras/a//b/",
    "hf://some-org",
    "hf://some-org/",
    "hf://some-org/ink-lora",
    "hf://some-org/ink-lora@main",
    "hf://some-org/ink-lora/sub",
    "https://example.com/",
    "some-org/",
    "gs://Team/",
]


def _server_source(text: str, allow_files: bool) -> bool:
    from sdxl_server.lora.sources import parse_source

    try:
        parse_source(text, allow_files=allow_files)
    except ValueError:
        return False
    return True


@pytest.mark.parametrize("text", SOURCES)
@pytest.mark.parametrize("allow_files", [False, True], ids=["request", "preloaded"])
def test_sdxlctl_accepts_exactly_the_sources_the_server_accepts(text: str, allow_files: bool) -> None:
    try:
        rules.check_source(text, allow_files=allow_files)
        ours = True
    except ValueError:
        ours = False
    assert ours == _server_source(text, allow_files)


@pytest.mark.parametrize("entry", PREFIXES)
def test_sdxlctl_writes_each_prefix_as_the_servers_allow_list_holds_it(entry: str) -> None:
    from sdxl_server.lora.sources import AllowList

    try:
        theirs: str | None = AllowList.parse(entry).prefixes[0]
    except ValueError:
        theirs = None
    try:
        ours: str | None = rules.check_prefix(entry)
    except ValueError:
        ours = None
    assert ours == theirs


@pytest.mark.parametrize(
    "name",
    ["pixel-art", "Pixel_Art.v2", "a", "-x", "x" * 64, "x" * 65, "pixel art", "pixel=x", "none", "None", "none2"],
)
def test_sdxlctl_takes_the_names_the_server_takes(name: str) -> None:
    from sdxl_server.lora.sources import parse_preloaded

    try:
        theirs: list[str] | None = list(parse_preloaded(f"{name}={PIXEL}"))
    except ValueError:
        theirs = None
    try:
        ours: list[str] | None = [rules.check_name(name)]
    except ValueError:
        ours = None
    assert ours == theirs


def test_a_local_folder_whose_path_has_a_comma_is_refused_since_sdxl_loras_is_comma_separated(tmp_path: Path) -> None:
    """The server reads SDXL_LORAS split at ',': ink=/x/proj,v2/ink/ would reach it as 'v2/ink/', a failed start."""
    home = tmp_path / "proj,v2"
    home.mkdir()
    file = home / "sdxlctl.toml"
    file.write_text('[model.loras]\nink = "./ink/"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(file, {})
    assert caught.value.message.startswith(f"{file}: [model] loras: ink = './ink/': ")
    assert "','" in caught.value.message and "SDXL_LORAS" in caught.value.message


def test_a_file_name_without_its_dot_slash_is_told_how_to_write_it(tmp_path: Path) -> None:
    file = tmp_path / "sdxlctl.toml"
    file.write_text('[model.loras]\npixel = "pixel.safetensors"\n')
    with pytest.raises(ConfigError) as caught:
        load_config(file, {})
    assert "a file on this machine is written ./pixel.safetensors or as an absolute path" in caught.value.message


def test_sdxlctl_and_the_server_agree_on_random_splices_of_hostile_pieces() -> None:
    """The table above holds the cases someone thought of; seeded splices find the others (this found that
    /x.SAFETENSORS passed the config and failed the server's start)."""
    import random

    from sdxl_server.lora.sources import AllowList

    pieces = ["gs://", "hf://", "GS://", "b", "bkt", "Bkt", "/", "//", "..", ".", "loras", "x.safetensors", "x.bin"]
    pieces += ["x.SAFETENSORS", ".safetensors", "@main", "@v1..2", "org", "--", "~", "./", "%2e", "\\", "\u2024"]
    pieces += ["\u2215", "goog", "1.2.3.4", "x.ckpt", "/abs/", "a.git", " ", ":", "?", "file://", "s3://", "-x"]
    draw = random.Random(16)
    for _ in range(4000):
        text = "".join(draw.choice(pieces) for _ in range(draw.randint(1, 6)))
        for allow_files in (False, True):
            try:
                rules.check_source(text, allow_files=allow_files)
                ours = True
            except ValueError:
                ours = False
            assert ours == _server_source(text, allow_files), (text, allow_files)
        try:
            theirs: tuple[str, ...] | None = AllowList.parse(text).prefixes
        except ValueError:
            theirs = None
        try:
            mine: tuple[str, ...] | None = (rules.check_prefix(text),) if text.strip() else ()
        except ValueError:
            mine = None
        if text == text.strip():  # the config strips each entry before checking it
            assert mine == theirs, text
