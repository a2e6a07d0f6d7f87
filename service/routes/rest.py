"""Simple REST for people.

GET  /v1/models                                        → models, versions and their state
POST /v1/models/{name}[/versions/{version}]:predict    {"instances": [...]} → {"predictions": [...]}
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from model.repository import parse_version
from service.dependencies import DataPlaneDep, dataplane_of
from service.errors import error_responses
from service.openapi import path_parameters, raw_body
from service.protocol import codec
from service.protocol.rest import (
    OUTPUTS,
    PredictRequest,
    PredictResponse,
    decode_predict_request,
    encode_predictions,
)

router = APIRouter(prefix="/v1", tags=["simple REST"])
_ERRORS = error_responses(400, 401, 404, 413, 503, 504)


@router.get("/models", summary="Models, their versions and states", responses=error_responses(401))
async def list_models(dataplane: DataPlaneDep) -> dict:
    return {"models": dataplane.list_models()}


async def predict_endpoint(request: Request) -> Response:
    """``{"instances": [...]}`` → ``{"predictions": [...]}``; reads its path parameters itself
    (served by a plain Starlette route, see service.routes)."""
    params = request.path_params
    version = params.get("version")
    tensor = decode_predict_request(await request.body())
    result = await dataplane_of(request).infer(
        params["name"],
        None if version is None else parse_version(version),
        [tensor],
        OUTPUTS,
        protocol="v1",
    )
    body = encode_predictions(
        result.model_name, result.model_version, result.outputs, result.labels
    )
    return Response(codec.to_json(body), media_type="application/json")


PREDICT_PATHS = ("/v1/models/{name}:predict", "/v1/models/{name}/versions/{version}:predict")
INFERENCE_ENDPOINTS = [(path, predict_endpoint) for path in PREDICT_PATHS]

for _path, _summary, _params in (
    (PREDICT_PATHS[0], "Predict labels and class probabilities (newest version)", ("name",)),
    (PREDICT_PATHS[1], "Predict labels and class probabilities (one version)", ("name", "version")),
):
    router.add_api_route(
        _path.removeprefix("/v1"),
        predict_endpoint,
        methods=["POST"],
        response_class=Response,
        responses={200: {"model": PredictResponse}, **_ERRORS},
        openapi_extra={**raw_body(PredictRequest), **path_parameters(*_params)},
        summary=_summary,
        operation_id=f"predict{'_version' if 'version' in _params else ''}",
    )
