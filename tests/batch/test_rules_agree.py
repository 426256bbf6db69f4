"""sdxlctl's copy of the server's rules (sdxlctl/batch/rules.py) and the server's own (sdxl_server.schema)
agree: a corpus of lines and of shared parameters gets the same verdict from both, naming the same field.

The test may import sdxl_server; sdxlctl itself never does. Not copied, so not compared: a LoRA adapter's
details (the server checks them, and a batch has no --lora), expert_ensemble's split of the steps and the
refiner's presence (they need the server), and num_images x instances against its max_images.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from sdxl_server import images, steps
from sdxl_server.errors import InvalidRequest
from sdxl_server.schema import (
    MAX_DEPTH,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    REFINE_MODES,
    SCHEDULER_NAMES,
    Instance,
    Parameters,
    Request,
    parse_request,
)
from sdxl_server.styles import styles
from sdxlctl.batch import KEY_FIELD, rules
from sdxlctl.batch.lines import BATCH_ONLY, _json_line, read
from sdxlctl.inputs import REFINE, SCHEDULERS

LONG = "x" * (MAX_PROMPT_CHARS + 1)
INSTANCES: list[dict[str, Any]] = [
    # accepted
    {"prompt": "a fox"},
    {"text": "a fox"},
    {"prompt": "a", "seed": 0},
    {"prompt": "a", "seed": MAX_SEED},
    {"prompt": "a", "seed": 42.0},
    {"prompt": "a", "seed": None, "style": None, "negative_prompt": None},
    {"prompt": "a", "style": "Anime"},
    {"prompt": "a", "style": "NONE"},
    {"prompt": "x" * MAX_PROMPT_CHARS, "negative_prompt": "", "prompt_2": "b", "negative_prompt_2": "c"},
    {"prompt": "a", "prompt_2": "[[1]]"},
    # refused
    {},
    {"prompt": ""},
    {"prompt": " \n"},
    {"text": ""},
    {"prompt": None},
    {"prompt": "a", "text": "b"},
    {"prompt": LONG},
    {"text": LONG},
    {"prompt": "a", "negative_prompt": LONG},
    {"prompt": "a", "prompt_2": LONG},
    {"prompt": "a", "negative_prompt_2": LONG},
    {"prompt": 5},
    {"prompt": ["a"]},
    {"prompt": [["a"]]},
    {"prompt": "a", "seed": "1"},
    {"prompt": "a", "seed": -1},
    {"prompt": "a", "seed": MAX_SEED + 1},
    {"prompt": "a", "seed": True},
    {"prompt": "a", "seed": 1.5},
    {"prompt": "a", "seed": [1]},
    {"prompt": "a", "style": "vaporwave"},
    {"prompt": "a", "style": 3},
    {"prompt": "a", "colour": "red"},
    {"prompt": "a", "Prompt": "b"},
    {"prompt": "", "colour": "red"},
    {"prompt": "a", "seed": "x", "colour": 1},
    {"colour": 1, "seed": -1, "prompt": LONG},
    {"prompt": "a", "text": "b", "style": "nope"},
    {"prompt": [[[[[["deep"]]]]]]},
    {"prompt": "a", "negative_prompt": [[[[[[[["deeper"]]]]]]]]},
]
PARAMETERS: list[dict[str, Any]] = [
    # accepted
    {},
    {"num_inference_steps": 1},
    {"num_inference_steps": 150.0},
    {"guidance_scale": 0},
    {"guidance_scale": 30.0},
    {"guidance_scale": 7.5},
    {"width": 64, "height": 2048},
    {"width": 1024.0},
    {"num_images": 4},
    {"output_format": "png", "quality": 1},
    {"output_format": "webp", "quality": 100},
    {"negative_prompt": "blurry"},
    {"scheduler": "DPMPP-2M-Karras"},
    {"scheduler": " euler_a "},
    {"refine": "none", "high_noise_frac": 0.5},
    {"refine": "Base-Image", "refine_steps": 10},
    {"refine": "base_image", "num_inference_steps": 4},
    {"lora": {"source": "hf://org/repo", "scale": 0.5}},
    # refused
    {"num_inference_steps": 0},
    {"num_inference_steps": 151},
    {"num_inference_steps": 1.5},
    {"num_inference_steps": "30"},
    {"num_inference_steps": True},
    {"guidance_scale": -1},
    {"guidance_scale": 31},
    {"guidance_scale": "5"},
    {"width": 63},
    {"width": 100},
    {"height": 2056},
    {"height": "64"},
    {"num_images": 0},
    {"output_format": "gif"},
    {"output_format": "PNG"},
    {"quality": 0},
    {"quality": 101},
    {"negative_prompt": LONG},
    {"scheduler": "plms"},
    {"scheduler": 3},
    {"refine": "twice"},
    {"strength": 0.5},
    {"strength": 0},
    {"high_noise_frac": 1},
    {"refine_steps": 0},
    {"refine": "base_image", "num_inference_steps": 3},
    {"refine": "base_image", "refine_steps": 3},
    {"steps": 4},
    {"width": 63, "steps": 4},
    {"scheduler": "plms", "quality": 0},
    {"strength": 0.5, "scheduler": "plms"},
]


def server_field(body: dict[str, Any], prefix: str) -> str | None:
    """The field the server refuses `body` for (relative to `prefix`; "" for the body as a whole), or None."""
    try:
        parse_request(
            json.dumps(body).encode(), max_images=4, default_size=(1024, 1024), draw_seed=lambda: 1, refiner=True
        )
    except InvalidRequest as exc:
        field = exc.field or ""
        return "" if field == "body" else field.removeprefix(prefix)
    return None


def sdxlctl_line_field(instance: dict[str, Any]) -> str | None:
    """The field lines.read refuses a JSONL line for, or None (the path read takes: JSON, then the rules)."""
    data = _json_line(json.dumps(instance))
    if isinstance(data, rules.Problem):
        return data.field
    problem = rules.check_instance(data)[1]
    return problem.field if problem else None


@pytest.mark.parametrize("instance", INSTANCES, ids=lambda value: json.dumps(value)[:48])
def test_a_line_gets_the_servers_verdict_naming_the_same_field(instance: dict[str, Any]) -> None:
    expected = server_field({"instances": [instance]}, "instances[0].")
    assert sdxlctl_line_field(instance) == expected


@pytest.mark.parametrize("parameters", PARAMETERS, ids=lambda value: json.dumps(value)[:48])
def test_shared_parameters_get_the_servers_verdict_naming_the_same_field(parameters: dict[str, Any]) -> None:
    expected = server_field({"instances": [{"prompt": "a"}], "parameters": parameters}, "parameters.")
    checked, problem = rules.check_parameters(parameters)
    assert (problem.field if problem else None) == expected
    if problem is None:  # normalised as the server reads them, and read back the same
        assert server_field({"instances": [{"prompt": "a"}], "parameters": checked}, "parameters.") is None
        assert Parameters.model_validate(checked) == Parameters.model_validate(parameters)


def test_the_copied_constants_and_names_are_the_servers() -> None:
    assert tuple(styles()) == rules.STYLES  # the ids of styles.json, in its order
    assert (rules.MAX_PROMPT_CHARS, rules.MAX_SEED, rules.MAX_DEPTH) == (MAX_PROMPT_CHARS, MAX_SEED, MAX_DEPTH)
    assert (rules.MAX_STEPS, rules.BASE_IMAGE_STRENGTH) == (steps.MAX_STEPS, steps.BASE_IMAGE_STRENGTH)
    assert (rules.MIN_SIDE, rules.MAX_SIDE, rules.SIDE_STEP) == (images.MIN_SIDE, images.MAX_SIDE, images.SIDE_STEP)
    assert (SCHEDULERS, REFINE) == (SCHEDULER_NAMES, REFINE_MODES)
    assert tuple(Parameters.model_fields) == rules.PARAMETER_FIELDS
    # every instance field the server takes is either a line's or one a batch refuses by name
    assert set(Instance.model_fields) == set(rules.LINE_FIELDS) | (set(BATCH_ONLY) - {"lora"})


def test_every_line_sdxlctl_uploads_is_one_the_server_takes_with_or_without_the_bodys_parameters(
    tmp_path: Path,
) -> None:
    shared = {"num_inference_steps": 2, "width": 64, "height": 64, "scheduler": "DPMPP-2M", "output_format": "png"}
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a fox", "seed": 5, "style": "anime"}\n{"text": "a cat"}\n{"prompt": "a owl"}\n')
    batch = read(path, shared, max_lines=10)
    # Vertex AI removes instanceConfig.keyField from each instance before calling the container
    instances = [{k: v for k, v in json.loads(line).items() if k != KEY_FIELD} for line in batch.jsonl().splitlines()]

    def parse(body: dict[str, Any]) -> Request:
        return parse_request(json.dumps(body).encode(), max_images=4, default_size=(1024, 1024), draw_seed=lambda: 0)

    with_body = parse({"instances": instances, "parameters": batch.parameters})
    alone = parse({"instances": instances})
    assert with_body == alone
    assert (alone.steps, alone.width, alone.scheduler, alone.output_format) == (2, 64, "dpmpp_2m", "png")
    assert [job.seeds[0] for job in alone.jobs] == [line.seed for line in batch.lines]
