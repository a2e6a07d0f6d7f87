"""Model content and metadata are validated before a model can serve: poisoned numbers, malformed
input specs and hostile headers each raise their own named ArtifactError, never a stray one."""

import contextlib
import copy
import dataclasses
import functools
import json
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from model.artifact import MAX_JSON_DEPTH, METADATA_KEY, decode_artifact, encode_artifact
from model.errors import (
    ArtifactError,
    DimensionTooLargeError,
    HeaderTooDeepError,
    InvalidBatchNormError,
    InvalidInputShapeError,
    InvalidLabelsError,
    InvalidValueRangeError,
    NonFiniteTensorError,
    TensorDtypeError,
    UnsupportedFormatVersionError,
)
from model.spec import LAYER_KINDS, MODEL_INPUT
from tests.model.engine.reference import bireal_spec, random_tensors
from tests.model.factory import (
    join_header,
    replace_tensor,
    rewrite_metadata,
    split_header,
    tiny_spec,
    tiny_tensors,
)


@pytest.fixture
def data(spec, tensors) -> bytes:
    return encode_artifact(spec, tensors)


def poisoned(data: bytes, tensors, name: str, index: int, value: float) -> bytes:
    array = tensors[name].copy()
    array.reshape(-1)[index] = value
    return replace_tensor(data, name, array)


# --- every float tensor finite ---------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("fc.bias", np.nan),  # the output bias that answered NaN with a 200
        ("conv0.weight", np.inf),
        ("fc.weight", -np.inf),
        ("conv1.scale", np.nan),  # XNOR-Net α
        ("bn0.weight", np.nan),
        ("bn1.running_mean", np.nan),
        ("bn1.bias", np.inf),
        ("bn0.running_var", np.inf),
    ],
)
def test_non_finite_tensor_is_refused(data, tensors, name, value):
    bad = poisoned(data, tensors, name, 1, value)
    with pytest.raises(NonFiniteTensorError, match=rf"tensor '{name}': 1 of .* index \[.*1\]"):
        decode_artifact(bad)


def test_the_writer_refuses_non_finite_tensors_too(spec, tensors):
    tensors["fc.bias"] = np.array([0.0, np.nan, 1.0], np.float32)
    with pytest.raises(NonFiniteTensorError, match="fc.bias"):
        encode_artifact(spec, tensors)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("s0b0_rsign.shift", np.nan),  # RSign's threshold
        ("s1b0_rp_in.shift", np.inf),  # RPReLU's shifts
        ("s1b0_rp_out.shift", -np.inf),
        ("s0b0_rp.weight", np.nan),  # PReLU's slope
        ("s1b0_down.weight", np.inf),  # the shortcut's full-precision 1×1 conv
    ],
)
def test_non_finite_v2_tensors_are_refused(name, value):
    tensors = random_tensors(_V2_SPEC, np.random.default_rng(0))
    bad = poisoned(encode_artifact(_V2_SPEC, tensors), tensors, name, 1, value)
    with pytest.raises(NonFiniteTensorError, match=rf"tensor '{name}': 1 of \d+ values"):
        decode_artifact(bad)
    tensors[name].reshape(-1)[0] = value
    with pytest.raises(NonFiniteTensorError, match=name):
        encode_artifact(_V2_SPEC, tensors)


def test_the_engine_load_refuses_a_poisoned_artifact(tmp_path, data, tensors):
    from model.engine import load_model

    path = tmp_path / "model.safetensors"
    path.write_bytes(poisoned(data, tensors, "fc.bias", 0, np.nan))
    with pytest.raises(NonFiniteTensorError, match="fc.bias"):
        load_model(path)


# --- BatchNorm statistics --------------------------------------------------------------------
def test_negative_running_var_is_refused(data, tensors):
    bad = poisoned(data, tensors, "bn1.running_var", 7, -0.5)
    with pytest.raises(InvalidBatchNormError, match=r"bn1.*-0\.5 at channel 7.*≥ 0"):
        decode_artifact(bad)


@pytest.mark.parametrize("eps", [float("nan"), float("inf"), -1e-5, 0.0, 0])
def test_eps_must_be_finite_and_positive(data, eps):
    bad = rewrite_metadata(data, lambda doc: doc["layers"][1].update(eps=eps))
    with pytest.raises(InvalidBatchNormError, match="'bn0'.*eps.*finite number > 0"):
        decode_artifact(bad)


def test_statistics_that_fold_to_infinite_coefficients_are_refused(data, tensors):
    """Finite numbers, but weight / sqrt(var + eps) overflows float32: 3e38 / sqrt(1e-5)."""
    bad = poisoned(data, tensors, "bn1.weight", 3, 3e38)
    bad = poisoned(bad, tensors, "bn1.running_var", 3, 0.0)
    with pytest.raises(InvalidBatchNormError, match="channel 3 folds to non-finite"):
        decode_artifact(bad)


def test_an_eps_below_float32_resolution_with_zero_variance_is_refused(data, tensors):
    """eps = 1e-50 is > 0 but rounds to 0 in float32, so 1/sqrt(0 + 0) = inf."""
    bad = poisoned(data, tensors, "bn0.running_var", 2, 0.0)
    bad = rewrite_metadata(bad, lambda doc: doc["layers"][1].update(eps=1e-50))
    with pytest.raises(InvalidBatchNormError, match="channel 2 folds to non-finite"):
        decode_artifact(bad)


# --- input, labels and sizes -----------------------------------------------------------------
@pytest.mark.parametrize(
    "value_range",
    [
        [1.0],
        [0, 1, 2],
        ["0", 16],
        [16, 0],
        [float("nan"), 1],
        [0, float("inf")],
        "0..16",
        {"low": 0},
        [True, 16],
        [[0], [16]],
        [0, 1e39],  # beyond float32, the engine's input type
        [-(2**200), 0],
    ],
)
def test_malformed_value_range_is_refused(data, value_range):
    bad = rewrite_metadata(data, lambda doc: doc["input"].update(value_range=value_range))
    with pytest.raises(InvalidValueRangeError, match="value_range"):
        decode_artifact(bad)


@pytest.mark.parametrize(
    "shape", [[], [0, 6, 6], [1, -6, 6], [1.0, 6, 6], [1, 6, float("inf")], [True, 6, 6], "1x6x6"]
)
def test_malformed_input_shape_is_refused(data, shape):
    bad = rewrite_metadata(data, lambda doc: doc["input"].update(shape=shape))
    error = InvalidInputShapeError if isinstance(shape, list) else ArtifactError
    with pytest.raises(error, match="shape"):
        decode_artifact(bad)


@pytest.mark.parametrize("labels", [[0, 1, 2], ["a", "a", "b"], ["a", "", "c"], ["a", None, "c"]])
def test_malformed_labels_are_refused(data, labels):
    bad = rewrite_metadata(data, lambda doc: doc.update(labels=labels))
    with pytest.raises(InvalidLabelsError, match="labels"):
        decode_artifact(bad)


@pytest.mark.parametrize(
    "edit",
    [
        lambda doc: doc["input"].update(shape=[1, 2**70, 6]),
        lambda doc: doc["layers"][0].update(padding=[2**70, 1]),
        lambda doc: doc["layers"][6].update(out_features=2**40),
    ],
    ids=["input-dim", "padding", "out-features"],
)
def test_sizes_beyond_the_engine_are_refused(data, edit):
    with pytest.raises(DimensionTooLargeError, match=f"at most|above {2**31 - 1}"):
        decode_artifact(rewrite_metadata(data, edit))


def test_a_huge_tensor_shape_in_the_header_is_a_named_error(data):
    header, body = split_header(data)
    header["fc.bias"]["shape"] = [2**70]
    with pytest.raises(ArtifactError, match="fc.bias"):
        decode_artifact(join_header(header, body))


def test_a_non_string_dtype_is_a_named_error(data):
    header, body = split_header(data)
    header["fc.bias"]["dtype"] = ["F32"]
    with pytest.raises(TensorDtypeError, match="fc.bias"):
        decode_artifact(join_header(header, body))


@pytest.mark.parametrize("version", [[1], {"v": 1}, True, "1"])
def test_a_malformed_format_version_is_a_named_error(data, version):
    bad = rewrite_metadata(data, lambda doc: doc.update(format_version=version))
    with pytest.raises(UnsupportedFormatVersionError, match="format_version"):
        decode_artifact(bad)


# --- nesting ---------------------------------------------------------------------------------
def test_a_deeply_nested_header_is_refused_without_recursion_error(data):
    header, body = split_header(data)
    raw = json.dumps(header).encode()
    nested = b'{"deep":' + b"[" * 100_000 + b"]" * 100_000 + b"," + raw[1:]
    with pytest.raises(HeaderTooDeepError, match=f"deeper than {MAX_JSON_DEPTH}"):
        decode_artifact(struct.pack("<Q", len(nested)) + nested + body)


def test_a_deeply_nested_metadata_document_is_refused(data):
    deep: list = []
    for _ in range(MAX_JSON_DEPTH + 5):
        deep = [deep]
    bad = rewrite_metadata(data, lambda doc: doc["training"].update(history=deep))
    with pytest.raises(HeaderTooDeepError, match="metadata 'bnnserve'"):
        decode_artifact(bad)


# --- property: only ArtifactError subclasses escape ------------------------------------------
def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _paths(value, (*prefix, index))


@dataclasses.dataclass(frozen=True)
class _Base:
    """A valid artifact taken apart for mutation: its metadata document, tensor entries, data
    section, and the paths of every value in the first two."""

    doc: dict
    tensor_header: dict
    body: bytes

    @classmethod
    def of(cls, data: bytes) -> "_Base":
        header, body = split_header(data)
        doc = json.loads(header["__metadata__"][METADATA_KEY])
        return cls(doc, {k: v for k, v in header.items() if k != "__metadata__"}, body)

    @functools.cached_property
    def doc_paths(self) -> list:
        return [path for path in _paths(self.doc) if path]

    @functools.cached_property
    def header_paths(self) -> list:
        return [path for path in _paths(self.tensor_header) if path]


_V1 = _Base.of(encode_artifact(tiny_spec(), tiny_tensors()))
_V2_SPEC = bireal_spec(widths=(4, 8), reactnet=True, concat=True)
_V2 = _Base.of(encode_artifact(_V2_SPEC, random_tensors(_V2_SPEC, np.random.default_rng(0))))
# (module-level names the load test below keeps using)
_DOC, _TENSOR_HEADER, _BODY, _DOC_PATHS = _V1.doc, _V1.tensor_header, _V1.body, _V1.doc_paths
_JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**80), max_value=2**80)
    | st.sampled_from([0, 1, -1, 2**31, 2**63, 2**64, 2**70])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=6),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)
# For the graph: names that exist (so that ``inputs`` edits make cycles, repeats, dead
# branches and shape mismatches rather than only dangling names), the new kinds, and format
# versions.
_V2_NAMES = st.sampled_from([MODEL_INPUT, *(layer.name for layer in _V2_SPEC.layers)])
_GRAPH_VALUES = (
    _JSON_VALUES
    | _V2_NAMES
    | st.lists(_V2_NAMES, max_size=4)
    | st.sampled_from([1, 2, 3, *LAYER_KINDS])
)


def _set(tree, path, value) -> None:
    node = tree
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value


def _decode_mutated(base: _Base, edits) -> None:
    """Apply ``(in_doc, which, value)`` edits and decode: success or an ArtifactError."""
    doc, tensor_header = copy.deepcopy(base.doc), copy.deepcopy(base.tensor_header)
    for in_doc, which, value in edits:
        tree, paths = (doc, base.doc_paths) if in_doc else (tensor_header, base.header_paths)
        # (an earlier edit may have replaced a parent of this path)
        with contextlib.suppress(KeyError, IndexError, TypeError):
            _set(tree, paths[which % len(paths)], value)
    header = tensor_header | {"__metadata__": {METADATA_KEY: json.dumps(doc)}}
    with contextlib.suppress(ArtifactError):
        decode_artifact(join_header(header, base.body))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.booleans(), st.integers(min_value=0), _JSON_VALUES), min_size=1, max_size=3
    )
)
def test_header_mutations_raise_only_artifact_errors(edits):
    """Replace any values of the metadata document or the tensor entries by arbitrary JSON:
    decoding succeeds or raises an ArtifactError subclass, never a RecursionError,
    OverflowError, IndexError, KeyError, TypeError or ValueError."""
    _decode_mutated(_V1, edits)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(
        st.tuples(st.booleans(), st.integers(min_value=0), _GRAPH_VALUES), min_size=1, max_size=3
    )
)
def test_v2_graph_header_mutations_raise_only_artifact_errors(edits):
    """The same on a format v2 document (a ReActNet-shaped graph with a concat): edits of
    ``inputs``, kinds, names and ``format_version`` give only named errors."""
    _decode_mutated(_V2, edits)


# Fields a mutation can change while the tensors still fit the graph, and values to try there.
_LOADABLE_FIELDS = ("value_range", "integer_valued", "pad_value", "eps", "input_quantizer")
_LOADABLE_PATHS = [
    path
    for path in _DOC_PATHS
    if path[0] in ("layers", "input")
    and (path[-1] in _LOADABLE_FIELDS or (len(path) > 2 and path[-2] == "value_range"))
]
_LOADABLE_VALUES = st.sampled_from(
    [None, True, False, 0, -1, 1, 2, 0.5, -0.0, 1e-45, 1e38, -3.4e38, 3.4e38, 1e308,
     "ste_sign", "stochastic_binary", [0, 0], [-3.4e38, 3.4e38], [-1e308, 1e308], [5, 5]]
)  # fmt: skip


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    edits=st.lists(st.tuples(st.integers(min_value=0), _LOADABLE_VALUES), min_size=1, max_size=2)
)
@example(edits=[(_LOADABLE_PATHS.index(("input", "value_range")), [-3.4e38, 3.4e38])])
@example(edits=[(_LOADABLE_PATHS.index(("input", "value_range")), [0.0, -0.0])])
def test_load_and_warm_up_raise_only_artifact_errors(tmp_path_factory, edits):
    """What decodes also loads and warms up, or is refused with an ArtifactError: no
    ValueError from drawing warm-up integers in a range of ±3.4e38 or from the range
    [0.0, -0.0] (a width of -0.0), no InvalidInputError."""
    from model.engine import MemoryLimit, load_model

    doc = copy.deepcopy(_DOC)
    for which, value in edits:
        with contextlib.suppress(KeyError, IndexError, TypeError):
            _set(doc, _LOADABLE_PATHS[which % len(_LOADABLE_PATHS)], copy.deepcopy(value))
    header = _TENSOR_HEADER | {"__metadata__": {METADATA_KEY: json.dumps(doc)}}
    path = tmp_path_factory.mktemp("fuzz") / "model.safetensors"
    path.write_bytes(join_header(header, _BODY))
    with contextlib.suppress(ArtifactError), np.errstate(all="ignore"):
        load_model(path, memory_limit=MemoryLimit(max_batch=64)).warmup(batch_sizes=(1, 3))
