"""Per-instance `parameters`: overlaid on the body's, equal across the request, so a batch line carries its
own parameters whether or not Vertex AI passes a job's modelParameters on as the body's `parameters`."""

from __future__ import annotations

import json
from typing import Any

import pytest

from sdxl_server.errors import InvalidRequest
from sdxl_server.schema import MAX_DEPTH, Request, parse_request
from tests.servers import Server

SMALL = {"num_inference_steps": 2, "width": 64, "height": 64, "output_format": "png"}


def parse(body: Any) -> Request:
    return parse_request(json.dumps(body).encode(), max_images=4, default_size=(1024, 1024), draw_seed=lambda: 7)


def refused(body: Any) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        parse(body)
    return raised.value


def test_instance_parameters_alone_are_the_requests_parameters() -> None:
    request = parse({"instances": [{"prompt": "a fox", "parameters": {**SMALL, "scheduler": "DPMPP-2M"}}] * 2})
    assert (request.steps, request.width, request.height, request.output_format) == (2, 64, 64, "png")
    assert request.scheduler == "dpmpp_2m"


def test_body_parameters_alone_still_work() -> None:
    request = parse({"instances": [{"prompt": "a fox"}, {"prompt": "a cat"}], "parameters": SMALL})
    assert (request.steps, request.width, request.output_format, len(request.jobs)) == (2, 64, "png", 2)


def test_an_instance_overlays_the_body_key_by_key() -> None:
    body = {"instances": [{"prompt": "a fox", "parameters": {"num_inference_steps": 5}}], "parameters": SMALL}
    request = parse(body)
    assert (request.steps, request.width, request.output_format) == (5, 64, "png")


def test_equal_overlays_are_accepted_however_they_are_spelled() -> None:
    # instance 0 repeats the body's value, instance 1 gives none, instance 2 gives the default in a double
    body = {
        "instances": [
            {"prompt": "a", "parameters": {"width": 64, "guidance_scale": 5}},
            {"prompt": "b"},
            {"prompt": "c", "parameters": {"num_inference_steps": 2.0, "guidance_scale": 5.0}},
        ],
        "parameters": SMALL,
    }
    assert parse(body).steps == 2


def test_differing_overlays_are_refused_naming_the_instance() -> None:
    body = {
        "instances": [{"prompt": "a", "parameters": {"num_inference_steps": 4}}, {"prompt": "b"}],
        "parameters": SMALL,
    }
    error = refused(body)
    assert error.field == "instances[1].parameters"
    assert "every instance of a request shares its parameters" in error.message
    assert "another request" in error.message


@pytest.mark.parametrize(
    ("instance", "field"),
    [
        ({"parameters": {"num_inference_steps": 151}}, "instances[0].parameters.num_inference_steps"),
        ({"parameters": {"width": 63}}, "instances[0].parameters.width"),
        ({"parameters": {"colour": 1}}, "instances[0].parameters.colour"),
        ({"parameters": {"scheduler": "nope"}}, "instances[0].parameters.scheduler"),
        ({"parameters": "steps=4"}, "instances[0].parameters"),
        ({"parameters": {"strength": 0.5}}, "parameters.strength"),  # a rule between the effective parameters
        ({"lora_id": "hf://a/b"}, "instances[0].lora_id"),  # refused before, refused still
        ({"key": "1"}, "instances[0].key"),
    ],
    ids=str,
)
def test_bad_instance_parameters_are_refused_naming_the_field(instance: dict[str, Any], field: str) -> None:
    assert refused({"instances": [{"prompt": "a fox", **instance}]}).field == field


def test_a_batch_line_with_its_parameters_and_adapters_is_within_the_depth_limit() -> None:
    """sdxlctl's request line nests the shared parameters one level down: with adapters that is 6 of 8 levels."""
    shared = {**SMALL, "lora": [{"source": "hf://org/repo", "scale": 0.5}]}
    line = {"prompt": "a fox", "seed": 1, "parameters": shared}
    request = parse({"instances": [line, {**line, "seed": 2}], "parameters": shared})
    assert [ref.scale for ref in request.loras] == [0.5]
    deeper = {**line, "parameters": {"lora": [{"source": [[["hf://org/repo"]]]}]}}
    assert refused({"instances": [deeper]}).message == f"body: JSON nested deeper than {MAX_DEPTH} levels"


def test_a_long_adapter_list_in_an_instance_is_refused_before_the_body_is_walked() -> None:
    error = refused({"instances": [{"prompt": "a", "parameters": {"lora": [{}] * 100_000}}]})
    assert error.field == "parameters.lora" and "100000 given" in error.message


def test_the_server_generates_from_instance_parameters_as_from_the_bodys(plain_server: Server) -> None:
    as_body = plain_server.predict({"instances": [{"prompt": "a fox", "seed": 3}], "parameters": SMALL})
    as_instance = plain_server.predict({"instances": [{"prompt": "a fox", "seed": 3, "parameters": SMALL}]})
    assert as_body.status_code == as_instance.status_code == 200, as_instance.text
    first, second = as_body.json()["predictions"][0], as_instance.json()["predictions"][0]
    assert (second["width"], second["output_format"]) == (64, "png")
    assert first["images"] == second["images"]
    differing = plain_server.predict(
        {"instances": [{"prompt": "a", "parameters": SMALL}, {"prompt": "b", "parameters": {**SMALL, "width": 72}}]}
    )
    assert differing.status_code == 400
    assert differing.json()["error"]["field"] == "instances[1].parameters"
