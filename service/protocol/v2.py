"""Wire models of the Open Inference Protocol ("V2", KServe/Triton) REST API.

Each model mirrors one JSON object of the spec; the docstrings carry the spec's grammar. Extra
fields are allowed on requests (clients add their own) and ignored. Binary tensor data extension
parameters (``binary_data_size``, ``binary_data``, ``binary_data_output``) live in the
``parameters`` objects, as the extension specifies.

Request models are strict: a JSON string is never taken for a boolean or a number
(``"binary_data_output": "false"`` is refused, not read as true), nor a number for a boolean
(``{"ready": 0}``). A tensor's shape has at most :data:`MAX_TENSOR_RANK` dimensions, each in
``[0, MAX_TENSOR_ELEMENTS]``.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

# Bounds on a request tensor's shape, so that element counts stay exact small integers and numpy
# can represent the array: no model takes more than a handful of dimensions, and no body within
# BNN_MAX_BODY_BYTES carries 2**32 elements.
MAX_TENSOR_RANK = 8
MAX_TENSOR_ELEMENTS = 2**32
Dimension = Annotated[StrictInt, Field(ge=0, le=MAX_TENSOR_ELEMENTS)]
Shape = Annotated[list[Dimension], Field(max_length=MAX_TENSOR_RANK)]
# ``$parameter = $string : $string | $number | $boolean``
ParameterValue = StrictStr | StrictInt | StrictFloat | StrictBool
Parameters = dict[str, Any]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


class _Request(BaseModel):
    """A request object: strictly typed, unknown fields allowed and ignored."""

    model_config = ConfigDict(extra="allow", strict=True)


class _Parameters(_Request):
    """``$parameters = {$parameter, ...}``: each value a string, number or boolean. Frozen, so
    that one shared default serves every request that sends none (pydantic copies mutable
    defaults)."""

    model_config = ConfigDict(extra="allow", strict=True, frozen=True)

    __pydantic_extra__: dict[str, ParameterValue]


class RequestParameters(_Parameters):
    """An inference request's parameters; ``binary_data_output: true`` asks for every output
    as binary data."""

    binary_data_output: StrictBool = False


class InputParameters(_Parameters):
    """A request input's parameters; ``binary_data_size`` is the byte length of its binary data
    in the body."""

    binary_data_size: Annotated[StrictInt, Field(ge=0)] | None = None


class OutputParameters(_Parameters):
    """A requested output's parameters; ``binary_data`` overrides ``binary_data_output``."""

    binary_data: StrictBool | None = None


class ServerMetadataResponse(_Wire):
    """``$metadata_server_response = {"name": $string, "version": $string,
    "extensions": [$string, ...]}``"""

    name: str
    version: str
    extensions: list[str]


class MetadataTensor(_Wire):
    """``$metadata_tensor = {"name": $string, "datatype": $string, "shape": [$number, ...]}``;
    -1 marks a variable dimension (the batch)."""

    name: str
    datatype: str
    shape: list[int]


class GraphLayer(_Wire):
    """One layer of a model's graph (bnnserve extension): ``{"name": $string, "kind": $string,
    "inputs": [$string, ...], "shape": [$number, ...]}``; ``inputs`` name earlier layers or
    ``"@input"`` (the model input), ``shape`` is the layer's output with -1 for the batch."""

    name: str
    kind: str
    inputs: list[str]
    shape: list[int]


class ModelMetadataResponse(_Wire):
    """``$metadata_model_response = {"name": $string, "versions": [$string, ...] #optional,
    "platform": $string, "inputs": [$metadata_tensor, ...],
    "outputs": [$metadata_tensor, ...]}``, plus ``parameters`` and the bnnserve extension
    ``graph`` (the layers in topological order; the last one's output is the logits), which
    protocol clients ignore."""

    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: Parameters = Field(default_factory=dict)
    graph: list[GraphLayer] = Field(default_factory=list)


class ModelReadyResponse(_Wire):
    """Body of ``GET v2/models/${MODEL}[/versions/${VERSION}]/ready``; the status carries the
    answer: 200 for true, 400 for false (the protocol: "a 4xx status code indicates false")."""

    name: str
    ready: bool


class RequestInput(_Request):
    """``$request_input = {"name": $string, "shape": [$number, ...], "datatype": $string,
    "parameters": $parameters #optional, "data": $tensor_data}``

    ``data`` is row-major, nested or flat; it is absent when ``parameters.binary_data_size``
    says the tensor's bytes follow the JSON header in the body.
    """

    name: StrictStr
    shape: Shape
    datatype: StrictStr
    parameters: InputParameters = InputParameters()
    data: Any = None


class RequestOutput(_Request):
    """``$request_output = {"name": $string, "parameters": $parameters #optional}``;
    ``parameters.binary_data: true`` asks for the output as binary data."""

    name: StrictStr
    parameters: OutputParameters = OutputParameters()


class InferenceRequest(_Request):
    """``$inference_request = {"id": $string #optional, "parameters": $parameters #optional,
    "inputs": [$request_input, ...], "outputs": [$request_output, ...] #optional}``

    With no ``outputs``, or an empty list, every output is returned (an empty repeated field
    of the protocol's gRPC form cannot be told from an absent one);
    ``parameters.binary_data_output: true`` asks for all of them as binary data.
    """

    id: StrictStr | None = None
    parameters: RequestParameters = RequestParameters()
    inputs: list[RequestInput] = Field(min_length=1)
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Wire):
    """``$response_output = {"name": $string, "shape": [$number, ...], "datatype": $string,
    "parameters": $parameters #optional, "data": $tensor_data}``"""

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters = Field(default_factory=dict)
    data: list[Any] | None = None


class InferenceResponse(_Wire):
    """``$inference_response = {"model_name": $string, "model_version": $string #optional,
    "id": $string, "parameters": $parameters #optional, "outputs": [$response_output, ...]}``"""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: Parameters = Field(default_factory=dict)
    outputs: list[ResponseOutput]


class RepositoryIndexRequest(_Request):
    """``$repository_index_request = {"ready": $bool #optional}``; ready=true lists only the
    models that are ready for inference."""

    ready: StrictBool = False


class RepositoryIndexEntry(_Wire):
    """``$repository_index_response = [{"name": $string, "version": $string #optional,
    "state": $string #optional, "reason": $string #optional}, ...]``"""

    name: str
    version: str | None = None
    state: str | None = None
    reason: str | None = None


class RepositoryLoadRequest(_Request):
    """``$repository_load_request = {"parameters": $parameters #optional}``;
    ``parameters.version`` picks a version (default: the newest)."""

    parameters: dict[str, ParameterValue] = Field(default_factory=dict)
