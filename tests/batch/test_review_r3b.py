"""Review of issue 18 from the user's side (R3): what `sdxlctl batch` and `sdxlctl cost --images` say when a
flag is given that the command would otherwise ignore, a [batch] out that is no gs:// prefix, and the help
text as a terminal shows it. Through sdxlctl.cli.app.run, as a user runs it; nothing here reaches a server."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import Cli


def test_batch_help_keeps_each_paragraph_whole(cli: Cli) -> None:
    # Typer's Rich help keeps a docstring's line breaks: a paragraph wrapped in the source came out cut mid-line
    shown = cli("batch", "--help")
    assert shown.code == 0
    whole = "Every line is checked before anything starts; --dry-run prints the plan and the cost."
    assert any(whole in line for line in shown.out.splitlines()), shown.out


def test_cost_replicas_without_images_is_refused_not_priced_as_one_replica(cli: Cli) -> None:
    # `cost --replicas 3` printed one replica's day: the flag only means something with --images
    refused = cli("cost", "--replicas", "3")
    assert refused.code == 2, refused.err
    assert "--replicas" in refused.err and "--images" in refused.err
    assert "Traceback" not in refused.err and refused.out == ""


def test_cost_compare_with_images_is_refused_not_silently_dropped(cli: Cli) -> None:
    refused = cli("cost", "--images", "100", "--compare")
    assert refused.code == 2, refused.err
    assert "--compare" in refused.err and "--images" in refused.err
    assert refused.out == ""


def test_attach_with_a_prompts_file_is_refused_not_ignored(cli: Cli, tmp_path: Path) -> None:
    # --attach waits for this deployment's newest job, whatever file it ran: a file named beside it misleads
    (tmp_path / "fox.txt").write_text("a red fox\n")
    refused = cli("batch", "fox.txt", "--attach")
    assert refused.code == 2, refused.err
    assert "--attach" in refused.err and "fox.txt" in refused.err and "--job" in refused.err
    assert "Traceback" not in refused.err


def test_batch_out_that_is_not_a_gs_prefix_is_a_config_error(cli: Cli, tmp_path: Path) -> None:
    # [batch] out = "bucket/x" was taken as is: the plan showed "bucket/x/fox-.../" as the output
    (tmp_path / "fox.txt").write_text("a red fox\n")
    env = {"SDXLCTL_TARGET": "vertex", "SDXLCTL_GCP_PROJECT": "demo", "SDXLCTL_BATCH_OUT": "mybucket/x"}
    refused = cli("batch", "fox.txt", "--dry-run", env=env)
    assert refused.code == 2, refused.err
    assert "SDXLCTL_BATCH_OUT" in refused.err and "gs://" in refused.err
    assert "Traceback" not in refused.err
    (tmp_path / "sdxlctl.toml").write_text('[batch]\nout = "gs://my-bucket/batches/"\n')
    assert cli("config").code == 0


def test_a_section_rule_names_the_variable_that_broke_it_not_the_defaults(cli: Cli) -> None:
    # min_replicas above max_replicas from a variable said "built-in defaults: batch = {'min_replicas': '3'}"
    refused = cli("config", env={"SDXLCTL_BATCH_MIN_REPLICAS": "3"})
    assert refused.code == 2, refused.err
    first = refused.err.splitlines()[0]
    assert "[batch]" in first and "SDXLCTL_BATCH_MIN_REPLICAS" in first and "{" not in first, first
    assert "min_replicas 3 is above max_replicas 1" in first


def test_the_plan_says_one_line_a_request_not_one_lines(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "fox.txt").write_text("a red fox\n")
    planned = cli("batch", "fox.txt", "--dry-run", "--width", "2048", "--height", "2048", "-n", "4")
    assert planned.code == 0, planned.err
    assert "1 line a request" in planned.err and "1 lines" not in planned.err, planned.err


def test_a_batch_size_the_server_would_refuse_is_a_config_error(cli: Cli) -> None:
    # [batch] batch_size 16 with [model] max_images 4: every request of the job was refused by the server
    # ("16 instances; at most 4 images per request") after its replicas had started and billed
    refused = cli("config", env={"SDXLCTL_BATCH_BATCH_SIZE": "16"})
    assert refused.code == 2, refused.err
    first = refused.err.splitlines()[0]
    assert "batch_size 16" in first and "max_images 4" in first and "SDXLCTL_BATCH_BATCH_SIZE" in first, first
    assert cli("config", env={"SDXLCTL_BATCH_BATCH_SIZE": "8", "SDXLCTL_MODEL_MAX_IMAGES": "8"}).code == 0
