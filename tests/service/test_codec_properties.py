"""Property: whatever a client sends (headers, shapes, datatypes, parameters, data, binary tails,
arbitrary bytes), decoding a request either succeeds with tensors of their declared shapes or
raises one of the named request errors — never anything that would become a 500."""

import json
import math

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from model.errors import InvalidInputError
from service.errors import BadRequestError
from service.protocol import codec
from service.protocol.rest import decode_predict_request
from service.tensors import InputExpectation

REQUEST_ERRORS = (BadRequestError, InvalidInputError)
EXPECTATIONS = st.none() | st.just(InputExpectation("input", (1, 2, 2), "FP32", max_rows=4))

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)
dimensions = st.integers(min_value=-2, max_value=6) | st.integers(
    min_value=-(2**80), max_value=2**80
)
shapes = (
    st.lists(dimensions, max_size=5) | st.lists(st.just(1), min_size=60, max_size=120) | json_values
)
datatypes = st.sampled_from([*codec.DATATYPES, "BF16", "fp32", ""]) | json_values
numbers = st.integers(min_value=-300, max_value=300) | st.floats(width=32) | st.booleans()
tensor_data = st.recursive(
    st.lists(numbers | st.text(max_size=3), max_size=8),
    lambda inner: st.lists(inner, max_size=3),
    max_leaves=20,
)
parameters = st.dictionaries(
    st.sampled_from(["binary_data_size", "binary_data", "binary_data_output", "other"]),
    st.integers(min_value=-5, max_value=64) | json_values,
    max_size=3,
)


@st.composite
def request_inputs(draw):
    item = {
        "name": draw(st.sampled_from(["input", "x"]) | json_values),
        "shape": draw(shapes),
        "datatype": draw(datatypes),
    }
    if draw(st.booleans()):
        item["parameters"] = draw(parameters)
    if draw(st.booleans()):
        item["data"] = draw(tensor_data | json_values)
    return item


@st.composite
def request_bodies(draw) -> tuple[bytes, str | None]:
    """(body, Inference-Header-Content-Length) of a request, well-formed or not."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=64)), draw(st.none() | st.text(max_size=6))
    document = {"inputs": draw(st.lists(request_inputs(), max_size=3) | json_values)}
    if draw(st.booleans()):
        document["parameters"] = draw(parameters | json_values)
    if draw(st.booleans()):
        document["outputs"] = draw(
            st.lists(st.fixed_dictionaries({"name": st.text(max_size=5)},
                                           optional={"parameters": parameters}), max_size=3)
            | json_values
        )  # fmt: skip
    if draw(st.booleans()):
        document["id"] = draw(json_values)
    header = json.dumps(document).encode()
    tail = draw(st.binary(max_size=64))
    length = draw(
        st.just(str(len(header)))
        | st.text(alphabet="0123456789²٣ -+", max_size=6)
        | st.integers(min_value=0, max_value=10**40).map(str)
    )
    return header + tail, length if tail or draw(st.booleans()) else None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(request=request_bodies(), expected=EXPECTATIONS)
def test_only_named_request_errors_escape_the_v2_codec(request, expected):
    body, header_length = request
    try:
        decoded = codec.decode_infer_request(body, header_length, expected)
    except REQUEST_ERRORS:
        return
    for tensor in decoded.inputs:
        assert tensor.array.size == math.prod(tensor.array.shape)
        assert tensor.array.dtype == codec.DATATYPES[tensor.datatype] or tensor.datatype == "BYTES"
    assert codec.EncodedInferRequest(body, header_length).json_bytes <= len(body)


@settings(max_examples=100, deadline=None)
@given(
    instances=st.lists(tensor_data | json_values, max_size=4) | json_values,
    expected=EXPECTATIONS,
)
def test_only_named_request_errors_escape_the_predict_codec(instances, expected):
    try:
        tensor = decode_predict_request(json.dumps({"instances": instances}).encode(), expected)
    except REQUEST_ERRORS:
        return
    assert tensor.array.shape[0] == len(instances)
