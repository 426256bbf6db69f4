"""parameters.lora and parameters.lora_id as the request schema parses them: each refusal a 400 naming its field.

The allow-list, the preloaded names and fetching need the server's settings: the service's tests cover them.
Over HTTP, the same refusals are in test_bad_requests.py (BAD, "lora-*") and test_fuzz.py.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import pytest

from sdxl_server.errors import InvalidRequest
from sdxl_server.lora.sources import DEFAULT_WEIGHT_NAME, Source
from sdxl_server.schema import LoraRef, Request, parse_request

GS = "gs://bkt/loras/pixel.safetensors"


def parse(body: dict[str, Any]) -> Request:
    return parse_request(json.dumps(body).encode(), max_images=4, default_size=(64, 64), draw_seed=lambda: 7)


def body(instance: dict[str, Any] | None = None, **parameters: Any) -> dict[str, Any]:
    return {"instances": [{"prompt": "a fox", **(instance or {})}], "parameters": parameters}


def refused(payload: dict[str, Any]) -> InvalidRequest:
    with pytest.raises(InvalidRequest) as raised:
        parse(payload)
    return raised.value


def test_a_request_without_lora_parses_as_before() -> None:
    plain = parse(body(num_inference_steps=3))
    assert plain.loras == ()
    for absent in ({"lora": None}, {"lora_id": None}, {"lora_id": ""}, {"lora": None, "lora_id": ""}):
        assert parse(body(num_inference_steps=3, **absent)) == plain  # "" is none, as Model Garden reads lora_id
    with_lora = parse(body(num_inference_steps=3, lora={"source": GS}))
    assert dataclasses.replace(with_lora, loras=()) == plain  # lora changes nothing else


def test_one_object_or_a_list_of_up_to_three() -> None:
    one = parse(body(lora={"source": GS})).loras
    assert one == (
        LoraRef(field="parameters.lora[0]", scale=1.0, source=Source("gs", "bkt", "loras/pixel.safetensors")),
    )
    three = parse(
        body(
            lora=[
                {"source": "hf://org/repo", "scale": 0.5},
                {"name": "Pixel-Art", "scale": -4},
                {"source": "gs://bkt/loras/", "weight_name": "w.safetensors", "scale": 4.0},
            ]
        )
    ).loras
    assert [ref.field for ref in three] == [f"parameters.lora[{i}]" for i in range(3)]
    assert [ref.scale for ref in three] == [0.5, -4.0, 4.0] and all(isinstance(ref.scale, float) for ref in three)
    assert three[0].source is not None and three[0].source.uri == f"hf://org/repo/{DEFAULT_WEIGHT_NAME}"
    assert (three[1].name, three[1].source) == ("pixel-art", None)  # names are case-insensitive
    assert three[2].source is not None and three[2].source.uri == "gs://bkt/loras/w.safetensors"
    assert parse(body(lora={"name": "x", "scale": 0})).loras[0].scale == 0.0


def test_lora_id_is_model_gardens_alias_for_one_source_at_scale_one() -> None:
    (ref,) = parse(body(lora_id="nerijs/pixel-art-xl")).loras
    assert ref == LoraRef(
        field="parameters.lora_id", scale=1.0, source=Source("hf", "nerijs/pixel-art-xl", DEFAULT_WEIGHT_NAME)
    )
    assert parse(body(lora_id=GS)).loras[0].source == Source("gs", "bkt", "loras/pixel.safetensors")


# (parameters, field, words in the message)
REFUSED: list[tuple[dict[str, Any], str, str]] = [
    ({"lora": [{"source": GS}] * 4}, "parameters.lora", "1 to 3"),
    ({"lora": []}, "parameters.lora", "1 to 3"),
    ({"lora": GS}, "parameters.lora", '{"source"'),
    ({"lora": 3}, "parameters.lora", '{"source"'),
    ({"lora": [GS]}, "parameters.lora[0]", "must be an object"),
    ({"lora": [{"source": GS}, None]}, "parameters.lora[1]", "must be an object"),
    ({"lora": {}}, "parameters.lora[0]", "exactly one of source and name"),
    ({"lora": {"scale": 1}}, "parameters.lora[0]", "exactly one of source and name"),
    ({"lora": {"source": GS, "name": "pixel"}}, "parameters.lora[0]", "exactly one of source and name"),
    ({"lora": {"source": GS, "alpha": 1}}, "parameters.lora[0].alpha", "unknown field"),
    ({"lora": [{"source": GS}, {"name": "p", "weight": 1}]}, "parameters.lora[1].weight", "unknown field"),
    ({"lora": {"source": GS, "scale": 4.001}}, "parameters.lora[0].scale", "from -4 to 4"),
    ({"lora": {"source": GS, "scale": -5}}, "parameters.lora[0].scale", "from -4 to 4"),
    ({"lora": {"source": GS, "scale": "0.8"}}, "parameters.lora[0].scale", "from -4 to 4"),
    ({"lora": {"source": GS, "scale": True}}, "parameters.lora[0].scale", "from -4 to 4"),
    ({"lora": {"source": GS, "scale": None}}, "parameters.lora[0].scale", "from -4 to 4"),
    ({"lora": {"source": 7}}, "parameters.lora[0].source", "string"),
    ({"lora": {"name": ["pixel"]}}, "parameters.lora[0].name", "string"),
    ({"lora": {"name": "Bad Name!"}}, "parameters.lora[0].name", "preloaded"),
    (
        {"lora": {"name": "pixel", "weight_name": "x.safetensors"}},
        "parameters.lora[0].weight_name",
        "only with a source",
    ),
    ({"lora": [{"source": GS}, {"source": "http://169.254.169.254/x"}]}, "parameters.lora[1].source", "http://"),
    ({"lora": {"source": "gs://bkt/loras/../secret.safetensors"}}, "parameters.lora[0].source", "'..'"),
    ({"lora": {"source": "file:///etc/passwd"}}, "parameters.lora[0].source", "file://"),
    ({"lora": {"source": "gs://bkt/x.ckpt"}}, "parameters.lora[0].source", "never pickle"),
    ({"lora": {"source": "gs://bkt/l/", "weight_name": "../x.safetensors"}}, "parameters.lora[0].weight_name", ".."),
    ({"lora": {"source": GS, "weight_name": "x.safetensors"}}, "parameters.lora[0].weight_name", "already names"),
    ({"lora": {"source": "gs://bkt/l/", "weight_name": 3}}, "parameters.lora[0].weight_name", "string"),
    # The same adapter twice, however spelled: 400 on the second, with the fix.
    ({"lora": [{"source": GS}, {"source": "GS://bkt/loras/pixel.safetensors"}]}, "parameters.lora[1]", "sum of the"),
    ({"lora": [{"source": "org/repo"}, {"source": "hf://org/repo/"}]}, "parameters.lora[1]", "parameters.lora[0]"),
    (
        {"lora": [{"source": "gs://bkt/l/"}, {"source": f"gs://bkt/l/{DEFAULT_WEIGHT_NAME}"}]},
        "parameters.lora[1]",
        "once",
    ),
    ({"lora": [{"name": "p"}, {"source": GS}, {"name": "P", "scale": 2}]}, "parameters.lora[2]", "once"),
    ({"lora": {"source": GS}, "lora_id": "org/repo"}, "parameters.lora_id", "not both"),
    ({"lora_id": 7}, "parameters.lora_id", "must be a string"),
    ({"lora_id": ["org/repo"]}, "parameters.lora_id", "must be a string"),
    ({"lora_id": "pixel-art"}, "parameters.lora_id", "not a source"),
    ({"lora_id": "https://huggingface.co/org/repo"}, "parameters.lora_id", "https://"),
    ({"lora_id": "gs://bkt/x.bin"}, "parameters.lora_id", "never pickle"),
]


@pytest.mark.parametrize(("parameters", "field", "words"), REFUSED)
def test_a_bad_lora_is_a_400_naming_its_field(parameters: dict[str, Any], field: str, words: str) -> None:
    error = refused(body(**parameters))
    assert error.status == 400 and error.field == field, error.message
    assert error.message.startswith(f"{field}: ") and words in error.message


def test_a_list_of_100000_adapters_is_counted_before_anything_else() -> None:
    raw = b'{"instances": [{"prompt": "a"}], "parameters": {"lora": [' + b",".join([b'{"x": 1}'] * 100_000) + b"]}}"
    with pytest.raises(InvalidRequest, match=r"\(100000 given\)") as raised:
        parse_request(raw, max_images=4, default_size=(64, 64), draw_seed=lambda: 7)
    assert raised.value.field == "parameters.lora"


def test_a_scale_json_reads_as_infinity_is_refused() -> None:
    raw = b'{"instances": [{"prompt": "a fox"}], "parameters": {"lora": {"name": "p", "scale": -1e999}}}'
    with pytest.raises(InvalidRequest, match="from -4 to 4") as raised:
        parse_request(raw, max_images=4, default_size=(64, 64), draw_seed=lambda: 7)
    assert raised.value.field == "parameters.lora[0].scale"


def test_lora_id_in_an_instance_points_to_parameters() -> None:
    error = refused(body({"lora_id": "org/repo"}))
    assert error.field == "instances[0].lora_id" and "parameters.lora_id" in error.message
    assert refused(body({"lora": {"source": GS}})).field == "instances[0].lora"  # no per-instance adapters


def test_the_same_repo_at_two_revisions_is_two_adapters() -> None:
    refs = parse(body(lora=[{"source": "hf://org/repo@v1"}, {"source": "hf://org/repo@v2"}])).loras
    assert [ref.source.revision for ref in refs if ref.source] == ["v1", "v2"]


def test_forbidden_and_fetch_failed_reach_the_client_as_403_and_502_json() -> None:
    from sdxl_server.errors import FetchFailed, Forbidden, ServerError
    from sdxl_server.responses import error_response

    for error, status in (
        (Forbidden("parameters.lora[0].source: LoRA sources are not allowed", field="parameters.lora[0].source"), 403),
        (FetchFailed("parameters.lora[0].source: GCS answered 503 twice", field="parameters.lora[0].source"), 502),
    ):
        assert isinstance(error, ServerError)
        response = error_response(error)
        assert response.status_code == status
        assert json.loads(bytes(response.body)) == {
            "error": {"code": status, "message": error.message, "field": "parameters.lora[0].source"}
        }
