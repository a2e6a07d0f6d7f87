"""Format v2's layer graph: named inputs, the new kinds, and the graph errors."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from model.artifact import decode_artifact, encode_artifact, read_artifact
from model.errors import (
    DanglingInputError,
    FormatVersionError,
    GraphCycleError,
    GraphTooLargeError,
    InvalidSpecError,
    ShapeMismatchError,
    UnusedLayerError,
)
from model.spec import (
    MAX_LAYER_INPUTS,
    MAX_LAYERS,
    MODEL_INPUT,
    Add,
    Concat,
    Dense,
    InputSpec,
    ModelSpec,
    Shift,
    layer_from_json,
)
from tests.model.engine.reference import bireal_spec, cnn_spec, random_tensors

DEFAULT_MODEL = Path(__file__).parents[2] / "deploy/models/digits-mlp/1/model.safetensors"


def with_layers(spec: ModelSpec, layers) -> ModelSpec:
    return dataclasses.replace(spec, layers=tuple(layers))


def replace_layer(spec: ModelSpec, name: str, **changes) -> ModelSpec:
    return with_layers(
        spec,
        [dataclasses.replace(x, **changes) if x.name == name else x for x in spec.layers],
    )


def test_a_plain_chain_is_written_as_format_v1():
    spec = cnn_spec()
    assert spec.required_format_version() == 1
    assert spec.to_json()["format_version"] == 1
    assert all("inputs" not in layer for layer in spec.to_json()["layers"])
    assert spec.is_sequential()


def test_the_committed_default_model_loads_and_re_encodes_byte_for_byte():
    data = DEFAULT_MODEL.read_bytes()
    artifact = read_artifact(DEFAULT_MODEL)
    assert artifact.spec.effective_format_version == 1
    assert encode_artifact(artifact.spec, dict(artifact.tensors)) == data


@pytest.mark.parametrize("options", [{}, {"reactnet": True}, {"reactnet": True, "concat": True}])
def test_residual_graphs_round_trip_as_format_v2(options):
    rng = np.random.default_rng(0)
    spec = bireal_spec(**options)
    spec.validate()
    assert spec.required_format_version() == 2 and not spec.is_sequential()
    artifact = decode_artifact(encode_artifact(spec, random_tensors(spec, rng)))
    assert artifact.spec == spec
    assert artifact.spec.to_json()["format_version"] == 2


def test_graph_shapes_follow_named_inputs():
    spec = bireal_spec(input_shape=(1, 8, 8), widths=(8, 16), concat=True)
    shapes = {
        layer.name: out for layer, (_, out) in zip(spec.layers, spec.graph_shapes(), strict=True)
    }
    assert shapes["s1b0_pool"] == (8, 4, 4)
    assert shapes["s1b0_add"] == (16, 4, 4)
    assert shapes["join"] == (32, 4, 4)
    assert shapes["gap"] == (32,)


def test_the_first_layer_may_name_the_model_input():
    spec = cnn_spec()
    named = replace_layer(spec, "conv0", inputs=(MODEL_INPUT,))
    named.validate()
    assert named.required_format_version() == 2


def test_an_input_that_names_no_layer_is_dangling():
    spec = replace_layer(bireal_spec(), "s0b0_add", inputs=("s0b0_bn", "nowhere"))
    with pytest.raises(DanglingInputError, match="input 'nowhere' names no layer"):
        spec.validate()


@pytest.mark.parametrize(("source", "word"), [("s0b0_add", "itself"), ("fc", "a later layer")])
def test_an_input_from_itself_or_a_later_layer_is_a_cycle(source, word):
    spec = replace_layer(bireal_spec(), "s0b0_add", inputs=("s0b0_bn", source))
    with pytest.raises(GraphCycleError, match=word):
        spec.validate()


def test_a_layer_that_feeds_nothing_is_refused():
    spec = replace_layer(bireal_spec(), "fc", inputs=("s1b0_add",))
    with pytest.raises(UnusedLayerError, match=r"\['gap'\] feed nothing"):
        spec.validate()


def test_add_inputs_of_different_shapes_are_a_mismatch():
    spec = replace_layer(bireal_spec(), "s1b0_add", inputs=("s1b0_bn", "s1b0_pool"))
    spec = with_layers(
        spec, [x for x in spec.layers if x.name not in ("s1b0_down", "s1b0_down_bn")]
    )
    with pytest.raises(ShapeMismatchError, match=r"add.*\[\[16, 4, 4\], \[8, 4, 4\]\]"):
        spec.validate()


def test_concat_inputs_of_different_sizes_are_a_mismatch():
    spec = replace_layer(bireal_spec(concat=True), "join", inputs=("s1b0_add", "s0b0_add"))
    with pytest.raises(ShapeMismatchError, match="apart from axis 0"):
        spec.validate()


@pytest.mark.parametrize(
    ("layer", "inputs", "message"),
    [
        (Add(name="a"), ("fc",), "takes two or more inputs"),
        (Concat(name="a"), ("fc", "fc"), "repeat a name"),
    ],
)
def test_arity_is_checked(layer, inputs, message):
    spec = bireal_spec()
    last = dataclasses.replace(layer, inputs=inputs)
    with pytest.raises(InvalidSpecError, match=message):
        with_layers(spec, [*spec.layers, last]).layer_inputs()


def test_a_single_input_layer_with_two_inputs_is_refused():
    spec = replace_layer(bireal_spec(), "s0b0_conv", inputs=("stem_bn", "stem"))
    with pytest.raises(InvalidSpecError, match="takes one input"):
        spec.validate()


def test_a_v1_document_cannot_use_v2_features():
    doc = bireal_spec().to_json() | {"format_version": 1}
    with pytest.raises(FormatVersionError, match="expected format_version 2"):
        ModelSpec.from_json(doc)


@pytest.mark.parametrize("inputs", [["ok", 3], "stem", [""], [["nested"]]])
def test_malformed_inputs_fields_are_named(inputs):
    doc = {"kind": "add", "name": "a", "inputs": inputs}
    with pytest.raises(InvalidSpecError, match="'inputs'"):
        layer_from_json(doc)


def test_per_channel_layers_check_their_width():
    spec = replace_layer(bireal_spec(reactnet=True), "s0b0_rp", num_features=9)
    with pytest.raises(InvalidSpecError, match="num_features=9"):
        spec.validate()


# --- hostile graphs: size caps, fan-in, names -------------------------------------------------
def shift_chain(length: int) -> ModelSpec:
    """``length`` layers: a chain of shifts ending in a dense layer (the deepest cheap graph)."""
    layers = [Shift(name=f"s{i}", num_features=4) for i in range(length - 1)]
    return ModelSpec(
        name="deep",
        architecture="hostile",
        input=InputSpec(shape=(4,)),
        labels=("a", "b"),
        layers=(*layers, Dense(name="fc", in_features=4, out_features=2)),
    )


def test_a_20k_layer_chain_is_refused_before_any_layer_is_built():
    doc = shift_chain(4).to_json()
    shifts = [{"kind": "shift", "name": f"s{i}", "num_features": 4} for i in range(20_000)]
    doc["layers"] = [*shifts, doc["layers"][-1]]
    with pytest.raises(GraphTooLargeError, match=f"20001 layers; expected at most {MAX_LAYERS}"):
        ModelSpec.from_json(doc)
    with pytest.raises(GraphTooLargeError, match="20001 layers"):
        shift_chain(20_001).validate()  # the writer's check, for specs built in code


def test_a_chain_at_the_layer_cap_round_trips():
    """Validation is linear (loops, no recursion): a MAX_LAYERS-deep chain reads back."""
    spec = shift_chain(MAX_LAYERS)
    tensors = random_tensors(spec, np.random.default_rng(0))
    assert decode_artifact(encode_artifact(spec, tensors)).spec == spec


@pytest.mark.parametrize("kind", ["add", "concat"])
def test_a_huge_fan_in_is_refused(kind):
    doc = {"kind": kind, "name": "join", "inputs": [f"s{i}" for i in range(100_000)]}
    with pytest.raises(GraphTooLargeError, match="100000 inputs; expected at most 256"):
        layer_from_json(doc)


def test_a_fan_in_at_the_cap_is_accepted():
    spec = shift_chain(MAX_LAYER_INPUTS + 1)
    branches = spec.layers[:-1]
    widened = [dataclasses.replace(s, inputs=(MODEL_INPUT,)) for s in branches]
    join = Add(name="join", inputs=tuple(s.name for s in branches))
    with_layers(spec, [*widened, join, spec.layers[-1]]).validate()


@pytest.mark.parametrize("name", [MODEL_INPUT, "input", "@x"])
def test_no_layer_can_take_the_model_inputs_name(name):
    """``@input`` is outside the layer-name alphabet, so a layer can never shadow it (a layer
    called plain ``input`` is just a layer)."""
    spec = bireal_spec()
    renamed = [dataclasses.replace(spec.layers[0], name=name)]
    renamed.append(dataclasses.replace(spec.layers[1], inputs=(name,)))
    spec = with_layers(spec, [*renamed, *spec.layers[2:]])
    if name == "input":
        spec.validate()
        assert spec.layer_inputs()[1] == ("input",)
    else:
        with pytest.raises(InvalidSpecError, match=r"name must match \[A-Za-z0-9_\]\+"):
            spec.validate()


def test_the_model_input_cannot_be_added_to_itself():
    doc = bireal_spec().to_json()
    doc["layers"].insert(0, {"kind": "add", "name": "twice", "inputs": [MODEL_INPUT, MODEL_INPUT]})
    with pytest.raises(InvalidSpecError, match="repeat a name"):
        ModelSpec.from_json(doc)


@pytest.mark.parametrize(
    ("edit", "error"),
    [
        (lambda doc: doc["layers"][0].update(name="n" * 1_000_000), "name must match"),
        (lambda doc: doc["layers"][4].update(inputs=["n" * 1_000_000, "stem_bn"]), "'inputs'"),
        (lambda doc: doc["layers"][4].update(kind="k" * 1_000_000), "unknown layer kind"),
        (lambda doc: doc["layers"][4].update({"x" * 1_000_000: 1}), "unknown fields"),
    ],
    ids=["layer name", "input name", "kind", "field name"],
)
def test_a_megabyte_name_is_refused_with_a_short_message(edit, error):
    """A refusal's message reaches the repository index and the logs: names in it are cut."""
    doc = bireal_spec().to_json()
    edit(doc)
    with pytest.raises(InvalidSpecError, match=error) as refused:
        ModelSpec.from_json(doc)
    assert len(str(refused.value)) < 1000


def test_a_name_of_128_characters_is_accepted():
    spec = bireal_spec()
    long = "n" * 128
    renamed = [dataclasses.replace(spec.layers[0], name=long)]
    renamed.append(dataclasses.replace(spec.layers[1], inputs=(long,)))
    with_layers(spec, [*renamed, *spec.layers[2:]]).validate()
    with pytest.raises(InvalidSpecError, match="at most 128 characters"):
        with_layers(
            spec, [*spec.layers[:-1], dataclasses.replace(spec.layers[-1], name="n" * 129)]
        ).validate()
