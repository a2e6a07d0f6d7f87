"""The layer graph schema: shape inference, expected tensors and field validation."""

import pytest

from model.errors import InvalidSpecError, UnknownQuantizerError
from model.quantizers import INFERENCE_BINARIZERS, SIGN, STEP, binarizer_for
from model.spec import ModelSpec, layer_from_json
from tests.model.factory import tiny_spec


def test_shapes_flow_through_the_graph():
    shapes = [out for _, out in tiny_spec().layer_shapes()]
    assert shapes == [(5, 6, 6), (5, 6, 6), (70, 6, 6), (70, 3, 3), (70, 3, 3), (630,), (3,)]


def test_expected_tensors_pack_binary_weights_only():
    expected = tiny_spec().expected_tensors()
    assert expected["conv0.weight"].dtype == "F32"
    assert expected["conv0.weight"].shape == (5, 1, 3, 3)
    assert expected["conv1.weight"].dtype == "U64"
    assert expected["conv1.weight"].shape == (70, 3, 3, 1)
    assert expected["conv1.weight"].logical_shape == (70, 5, 3, 3)
    assert "conv1.bias" not in expected and "conv1.scale" in expected
    assert expected["fc.weight"].shape == (3, 630)


def test_json_round_trip():
    spec = tiny_spec()
    assert ModelSpec.from_json(spec.to_json()) == spec


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("out_features", 0, "'out_features' has invalid value 0"),
        ("out_features", True, "'out_features' has invalid value True"),
        ("bias", "yes", "'bias' has invalid value 'yes'"),
        ("colour", "red", r"unknown fields \['colour'\]"),
    ],
)
def test_bad_layer_fields_are_named(field, value, message):
    doc = {"kind": "dense", "name": "fc", "in_features": 4, "out_features": 2, field: value}
    with pytest.raises(InvalidSpecError, match=message):
        layer_from_json(doc)


def test_a_layer_must_be_an_object_with_a_kind():
    with pytest.raises(InvalidSpecError, match="must be an object with a 'kind'"):
        layer_from_json(["dense"])


def test_labels_must_match_the_output_width():
    doc = tiny_spec().to_json()
    doc["labels"] = ["only", "two"]
    with pytest.raises(InvalidSpecError, match=r"gives shape \[3\] but there are 2 labels"):
        ModelSpec.from_json(doc)


def test_duplicate_layer_names_are_refused():
    doc = tiny_spec().to_json()
    doc["layers"][1]["name"] = "conv0"
    with pytest.raises(InvalidSpecError, match="names must be unique"):
        ModelSpec.from_json(doc)


def test_missing_top_level_fields_are_named():
    doc = tiny_spec().to_json()
    del doc["labels"]
    with pytest.raises(InvalidSpecError, match="missing the field 'labels'"):
        ModelSpec.from_json(doc)


def test_quantizer_semantics():
    assert binarizer_for("ste_sign") is SIGN and binarizer_for("stochastic_binary") is STEP
    assert (SIGN.low, SIGN.high, SIGN.strict) == (-1, 1, False)
    assert (STEP.low, STEP.high, STEP.strict) == (0, 1, True)
    assert set(INFERENCE_BINARIZERS) == {
        "ste_sign",
        "clipped_ste",
        "approx_sign",
        "swish_sign",
        "stochastic_binary",
    }
    with pytest.raises(UnknownQuantizerError, match="expected one of: approx_sign"):
        binarizer_for("nope")
