"""Open Inference Protocol model endpoints: metadata, readiness, config and inference.

GET  /v2/models/{name}[/versions/{version}]
GET  /v2/models/{name}[/versions/{version}]/ready
GET  /v2/models/{name}[/versions/{version}]/config
POST /v2/models/{name}[/versions/{version}]/infer   (JSON, or JSON + binary tensors)
"""

from __future__ import annotations

from fastapi import APIRouter

from service.dataplane import DataPlane
from service.dependencies import DataPlaneDep
from service.errors import BnnError, ReadinessFalse, error_responses, status_for
from service.openapi import raw_body
from service.protocol import codec
from service.protocol.v2 import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
)
from service.routes import InferenceEndpoint, Reply, optional_version

router = APIRouter(tags=["v2 models"])
_ERRORS = error_responses(400, 401, 404, 503)
_READY_ERRORS = {
    **error_responses(401, 404),
    400: {"description": "Not ready (the protocol's 'false'); the body says why"},
}


# --- inference -----------------------------------------------------------------------------------
async def infer(
    dataplane: DataPlane, params: dict[str, str], body: bytes, header_length: str | None
) -> Reply:
    """V2 inference: JSON tensors, or a JSON header of ``header_length`` bytes followed by
    binary tensor data; the data plane decodes it against the model's input."""
    result = await dataplane.infer(
        params["name"],
        optional_version(params.get("version")),
        codec.EncodedInferRequest(body, header_length),
        protocol="v2",
    )
    request: codec.DecodedInferRequest = result.request  # type: ignore[assignment]
    return dataplane.tracing.run(
        "encode",
        codec.encode_infer_response,
        model_name=result.model_name,
        model_version=result.model_version,
        request_id=request.id,
        outputs=result.outputs,
        binary=request.binary_outputs,
    )


INFERENCE_PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
INFERENCE = InferenceEndpoint(
    handler=infer,
    summaries=list(
        zip(INFERENCE_PATHS, ("Inference (newest version)", "Inference (one version)"), strict=True)
    ),
    response_model=InferenceResponse,
    body=raw_body(InferenceRequest, binary=True),
    operation="infer",
    tag="v2 models",
)


# --- metadata ------------------------------------------------------------------------------------
async def _metadata(dataplane: DataPlane, name: str, version: str | None) -> dict:
    return dataplane.model_metadata(await dataplane.model(name, optional_version(version)))


@router.get("/v2/models/{name}", response_model=ModelMetadataResponse, responses=_ERRORS)
async def model_metadata(name: str, dataplane: DataPlaneDep) -> dict:
    return await _metadata(dataplane, name, None)


@router.get(
    "/v2/models/{name}/versions/{version}", response_model=ModelMetadataResponse, responses=_ERRORS
)
async def model_version_metadata(name: str, version: str, dataplane: DataPlaneDep):
    return await _metadata(dataplane, name, version)


# --- readiness -----------------------------------------------------------------------------------
async def _ready(dataplane: DataPlane, name: str, version: str | None) -> dict:
    """200 when the model (version) serves; "false" is a 4xx, as the protocol says: 404 for a
    model or version that does not exist, 400 for one that is not loaded, loading or refused.
    Asking never loads anything."""
    try:
        served = dataplane.registry.get(name, optional_version(version))
    except BnnError as exc:
        if status_for(exc) == 503:
            raise ReadinessFalse(str(exc)) from None
        raise
    return {"name": served.name, "ready": True}


@router.get(
    "/v2/models/{name}/ready",
    response_model=ModelReadyResponse,
    responses=_READY_ERRORS,
    summary="200 when ready, else 400 (404 for an unknown model)",
)
async def model_ready(name: str, dataplane: DataPlaneDep) -> dict:
    return await _ready(dataplane, name, None)


@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    response_model=ModelReadyResponse,
    responses=_READY_ERRORS,
)
async def model_version_ready(name: str, version: str, dataplane: DataPlaneDep) -> dict:
    return await _ready(dataplane, name, version)


# --- config --------------------------------------------------------------------------------------
async def _config(dataplane: DataPlane, name: str, version: str | None) -> dict:
    return dataplane.model_config(await dataplane.model(name, optional_version(version)))


@router.get("/v2/models/{name}/config", responses=_ERRORS, summary="Model configuration")
async def model_config(name: str, dataplane: DataPlaneDep) -> dict:
    return await _config(dataplane, name, None)


@router.get("/v2/models/{name}/versions/{version}/config", responses=_ERRORS)
async def model_version_config(name: str, version: str, dataplane: DataPlaneDep):
    return await _config(dataplane, name, version)
