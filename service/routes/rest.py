"""Simple REST for people.

GET  /v1/models                                        → models, versions and their state
POST /v1/models/{name}[/versions/{version}]:predict    {"instances": [...]} → {"predictions": [...]}
"""

from __future__ import annotations

import json

from fastapi import APIRouter, Request, Response

from model.repository import parse_version
from service.dataplane import DataPlane
from service.dependencies import DataPlaneDep, dataplane_of
from service.errors import error_responses
from service.openapi import raw_body
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


async def _predict(dataplane: DataPlane, request: Request, name: str, version: int | None):
    tensor = decode_predict_request(await request.body())
    result = await dataplane.infer(name, version, [tensor], OUTPUTS, protocol="v1")
    body = encode_predictions(
        result.model_name, result.model_version, result.outputs, result.labels
    )
    return Response(json.dumps(body, separators=(",", ":")), media_type="application/json")


@router.post(
    "/models/{name}:predict",
    response_class=Response,
    responses={200: {"model": PredictResponse}, **_ERRORS},
    openapi_extra=raw_body(PredictRequest),
    summary="Predict labels and class probabilities (newest version)",
)
async def predict(name: str, request: Request) -> Response:
    return await _predict(dataplane_of(request), request, name, None)


@router.post(
    "/models/{name}/versions/{version}:predict",
    response_class=Response,
    responses={200: {"model": PredictResponse}, **_ERRORS},
    openapi_extra=raw_body(PredictRequest),
    summary="Predict labels and class probabilities (one version)",
)
async def predict_version(name: str, version: str, request: Request) -> Response:
    return await _predict(dataplane_of(request), request, name, parse_version(version))
