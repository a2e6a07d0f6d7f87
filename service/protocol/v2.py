"""Wire models of the Open Inference Protocol ("V2", KServe/Triton) REST API.

Each model mirrors one JSON object of the spec; the docstrings carry the spec's grammar. Extra
fields are allowed on requests (clients add their own) and ignored. Binary tensor data extension
parameters (``binary_data_size``, ``binary_data``, ``binary_data_output``) live in the
``parameters`` objects, as the extension specifies.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

Parameters = dict[str, Any]


class _Wire(BaseModel):
    model_config = ConfigDict(extra="allow")


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


class ModelMetadataResponse(_Wire):
    """``$metadata_model_response = {"name": $string, "versions": [$string, ...] #optional,
    "platform": $string, "inputs": [$metadata_tensor, ...],
    "outputs": [$metadata_tensor, ...]}``"""

    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[MetadataTensor]
    outputs: list[MetadataTensor]
    parameters: Parameters = Field(default_factory=dict)


class ModelReadyResponse(_Wire):
    """Body of ``GET v2/models/${MODEL}[/versions/${VERSION}]/ready``; the status (200 or 503)
    carries the answer."""

    name: str
    ready: bool


class RequestInput(_Wire):
    """``$request_input = {"name": $string, "shape": [$number, ...], "datatype": $string,
    "parameters": $parameters #optional, "data": $tensor_data}``

    ``data`` is row-major, nested or flat; it is absent when ``parameters.binary_data_size``
    says the tensor's bytes follow the JSON header in the body.
    """

    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters = Field(default_factory=dict)
    data: Any = None


class RequestOutput(_Wire):
    """``$request_output = {"name": $string, "parameters": $parameters #optional}``;
    ``parameters.binary_data: true`` asks for the output as binary data."""

    name: str
    parameters: Parameters = Field(default_factory=dict)


class InferenceRequest(_Wire):
    """``$inference_request = {"id": $string #optional, "parameters": $parameters #optional,
    "inputs": [$request_input, ...], "outputs": [$request_output, ...] #optional}``

    With no ``outputs`` every output is returned; ``parameters.binary_data_output: true`` asks
    for all of them as binary data.
    """

    id: str | None = None
    parameters: Parameters = Field(default_factory=dict)
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


class RepositoryIndexRequest(_Wire):
    """``$repository_index_request = {"ready": $bool #optional}``; ready=true lists only the
    models that are ready for inference."""

    ready: bool = False


class RepositoryIndexEntry(_Wire):
    """``$repository_index_response = [{"name": $string, "version": $string #optional,
    "state": $string #optional, "reason": $string #optional}, ...]``"""

    name: str
    version: str | None = None
    state: str | None = None
    reason: str | None = None


class RepositoryLoadRequest(_Wire):
    """``$repository_load_request = {"parameters": $parameters #optional}``;
    ``parameters.version`` picks a version (default: the newest)."""

    parameters: Parameters = Field(default_factory=dict)
