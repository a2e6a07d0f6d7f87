"""Tensors of ``ModelInferRequest`` / ``ModelInferResponse``: typed ``contents`` or raw bytes.

An input's values come either from its ``contents`` field of the datatype's type (the table
:data:`CONTENTS_FIELD`) or, when the request carries ``raw_input_contents``, from the raw bytes
at the input's index, in the binary tensor extension's layout (little-endian, row-major; BYTES
elements each prefixed by a 4-byte little-endian length). Outputs go back as
``raw_output_contents`` in the same layout, as Triton answers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from model.repository import parse_version
from service.errors import BadRequestError
from service.protocol import codec
from service.protocol.grpc import grpc_service_pb2 as pb
from service.tensors import DecodedRequest, InputExpectation, Tensor

# datatype -> the InferTensorContents field carrying its values (FP16 travels only as raw bytes).
CONTENTS_FIELD: dict[str, str] = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}


def model_version(version: str) -> int | None:
    """A request's ``model_version`` as a number; the empty string means the newest."""
    return parse_version(version) if version else None


class EncodedGrpcInferRequest:
    """A ``ModelInferRequest`` as the data plane decodes it (:class:`service.tensors.
    EncodedRequest`): the declared names, datatypes and shapes are checked against the model's
    input before any tensor content is read. gRPC has already parsed the protobuf, so decoding
    always runs on the event loop (``json_bytes`` 0)."""

    json_bytes = 0

    def __init__(self, request: pb.ModelInferRequest) -> None:
        self.request = request
        self.id = request.id

    def decode(self, expected: InputExpectation | None = None) -> DecodedRequest:
        if expected is not None:
            expected.check(
                [(item.name, item.datatype, list(item.shape)) for item in self.request.inputs]
            )
        return DecodedRequest(decode_inputs(self.request), requested_outputs(self.request))


def decode_inputs(request: pb.ModelInferRequest) -> list[Tensor]:
    """The request's input tensors; BadRequestError naming the tensor and what was expected."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequestError(
            f"raw_input_contents has {len(raw)} entries but the request has "
            f"{len(request.inputs)} inputs; expected one per input"
        )
    tensors = []
    for index, item in enumerate(request.inputs):
        shape = list(item.shape)
        if any(dim < 0 for dim in shape):
            raise BadRequestError(f"tensor {item.name!r}: shape {shape} has a negative dimension")
        if raw:
            array = codec.array_from_binary(raw[index], item.datatype, shape, item.name)
        else:
            array = _from_contents(item, shape)
        tensors.append(Tensor(item.name, item.datatype, array))
    return tensors


def _from_contents(item: pb.ModelInferRequest.InferInputTensor, shape: list[int]) -> np.ndarray:
    dtype = codec.dtype_of(item.datatype, item.name)  # unknown datatypes are named first
    field = CONTENTS_FIELD.get(item.datatype)
    if field is None:
        raise BadRequestError(
            f"tensor {item.name!r}: {item.datatype} has no contents field; send it in "
            "raw_input_contents"
        )
    values = getattr(item.contents, field)
    if item.datatype == "BYTES":
        array = np.array(list(values), dtype=object)
    else:
        wide = np.asarray(values)  # int64/uint64/float64/bool: exact for every source type
        if dtype.kind in "iu" and wide.size:
            info = np.iinfo(dtype)
            low, high = int(wide.min()), int(wide.max())
            if low < info.min or high > info.max:
                raise BadRequestError(
                    f"tensor {item.name!r}: {item.datatype} values must lie in "
                    f"[{info.min}, {info.max}], got {low}..{high}"
                )
        array = wide.astype(dtype)
    count = math.prod(shape)
    if array.size != count:
        raise BadRequestError(
            f"tensor {item.name!r}: shape {shape} needs {count} elements, "
            f"contents.{field} has {array.size}"
        )
    return array.reshape(shape)


def requested_outputs(request: pb.ModelInferRequest) -> list[str] | None:
    """The outputs asked for, in order; None (every output) when none are named."""
    return [output.name for output in request.outputs] or None


def encode_response(
    model_name: str, version: str, request_id: str, outputs: Sequence[Tensor]
) -> pb.ModelInferResponse:
    """Every output's name, datatype and shape, and its bytes in ``raw_output_contents``."""
    response = pb.ModelInferResponse(model_name=model_name, model_version=version, id=request_id)
    for tensor in outputs:
        response.outputs.add(
            name=tensor.name, datatype=tensor.datatype, shape=list(tensor.array.shape)
        )
        response.raw_output_contents.append(codec.binary_data(tensor))
    return response
