"""Open Inference Protocol model endpoints: metadata, readiness, config and inference.

GET  /v2/models/{name}[/versions/{version}]
GET  /v2/models/{name}[/versions/{version}]/ready
GET  /v2/models/{name}[/versions/{version}]/config
POST /v2/models/{name}[/versions/{version}]/infer   (JSON, or JSON + binary tensors)
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from model.repository import parse_version
from service.dataplane import DataPlane
from service.dependencies import DataPlaneDep
from service.errors import error_responses
from service.openapi import path_parameters, raw_body
from service.protocol import codec
from service.protocol.v2 import (
    InferenceRequest,
    InferenceResponse,
    ModelMetadataResponse,
    ModelReadyResponse,
)
from service.routes import Reply, request_endpoint

router = APIRouter(tags=["v2 models"])
_ERRORS = error_responses(400, 401, 404, 503)
_INFER_ERRORS = error_responses(400, 401, 404, 413, 503, 504)
_INFER_DOC = raw_body(InferenceRequest, binary=True)


def _version(version: str | None) -> int | None:
    return None if version is None else parse_version(version)


# --- inference -----------------------------------------------------------------------------------
async def infer(
    dataplane: DataPlane, params: dict[str, str], body: bytes, header_length: str | None
) -> Reply:
    """V2 inference: JSON tensors, or a JSON header of ``header_length`` bytes followed by
    binary tensor data (served by service.routes.InferenceDispatch)."""
    infer_request, tensors = codec.decode_infer_request(body, header_length)
    names, binary = codec.requested_outputs(infer_request)
    result = await dataplane.infer(
        params["name"], _version(params.get("version")), tensors, names, protocol="v2"
    )
    return codec.encode_infer_response(
        model_name=result.model_name,
        model_version=result.model_version,
        request_id=infer_request.id,
        outputs=result.outputs,
        binary=binary,
    )


INFERENCE_PATHS = ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer")
INFERENCE_HANDLERS = [(path, infer) for path in INFERENCE_PATHS]

for _path, _summary, _params in (
    (INFERENCE_PATHS[0], "Inference (newest version)", ("name",)),
    (INFERENCE_PATHS[1], "Inference (one version)", ("name", "version")),
):
    router.add_api_route(
        _path,
        request_endpoint(infer),
        methods=["POST"],
        response_class=Response,
        responses={200: {"model": InferenceResponse}, **_INFER_ERRORS},
        openapi_extra={**_INFER_DOC, **path_parameters(*_params)},
        summary=_summary,
        operation_id=f"infer{'_version' if 'version' in _params else ''}",
    )


# --- metadata ------------------------------------------------------------------------------------
async def _metadata(dataplane: DataPlane, name: str, version: str | None) -> dict:
    return dataplane.model_metadata(await dataplane.model(name, _version(version)))


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
    served = await dataplane.model(name, _version(version))
    return {"name": served.name, "ready": True}


@router.get(
    "/v2/models/{name}/ready",
    response_model=ModelReadyResponse,
    responses=_ERRORS,
    summary="200 when ready, else 503",
)
async def model_ready(name: str, dataplane: DataPlaneDep) -> dict:
    return await _ready(dataplane, name, None)


@router.get(
    "/v2/models/{name}/versions/{version}/ready",
    response_model=ModelReadyResponse,
    responses=_ERRORS,
)
async def model_version_ready(name: str, version: str, dataplane: DataPlaneDep) -> dict:
    return await _ready(dataplane, name, version)


# --- config --------------------------------------------------------------------------------------
async def _config(dataplane: DataPlane, name: str, version: str | None) -> dict:
    return dataplane.model_config(await dataplane.model(name, _version(version)))


@router.get("/v2/models/{name}/config", responses=_ERRORS, summary="Model configuration")
async def model_config(name: str, dataplane: DataPlaneDep) -> dict:
    return await _config(dataplane, name, None)


@router.get("/v2/models/{name}/versions/{version}/config", responses=_ERRORS)
async def model_version_config(name: str, version: str, dataplane: DataPlaneDep):
    return await _config(dataplane, name, version)
