"""Simple REST for people.

GET  /v1/models                                        → models, versions and their state
POST /v1/models/{name}[/versions/{version}]:predict    {"instances": [...]} → {"predictions": [...]}
"""

from __future__ import annotations

from fastapi import APIRouter, Response

from model.repository import parse_version
from service.dataplane import DataPlane
from service.dependencies import DataPlaneDep
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
from service.routes import Reply, request_endpoint

router = APIRouter(prefix="/v1", tags=["simple REST"])
_ERRORS = error_responses(400, 401, 404, 413, 503, 504)


@router.get("/models", summary="Models, their versions and states", responses=error_responses(401))
async def list_models(dataplane: DataPlaneDep) -> dict:
    return {"models": dataplane.list_models()}


async def predict(
    dataplane: DataPlane, params: dict[str, str], body: bytes, header_length: str | None
) -> Reply:
    """``{"instances": [...]}`` → ``{"predictions": [...]}`` (served by
    service.routes.InferenceDispatch; ``header_length`` is a V2 header, unused here)."""
    version = params.get("version")
    tensor = decode_predict_request(body)
    result = await dataplane.infer(
        params["name"],
        None if version is None else parse_version(version),
        [tensor],
        OUTPUTS,
        protocol="v1",
    )
    predictions = encode_predictions(
        result.model_name, result.model_version, result.outputs, result.labels
    )
    return codec.to_json(predictions), {}, codec.JSON_MEDIA_TYPE


PREDICT_PATHS = ("/v1/models/{name}:predict", "/v1/models/{name}/versions/{version}:predict")
INFERENCE_HANDLERS = [(path, predict) for path in PREDICT_PATHS]

for _path, _summary, _params in (
    (PREDICT_PATHS[0], "Predict labels and class probabilities (newest version)", ("name",)),
    (PREDICT_PATHS[1], "Predict labels and class probabilities (one version)", ("name", "version")),
):
    router.add_api_route(
        _path.removeprefix("/v1"),
        request_endpoint(predict),
        methods=["POST"],
        response_class=Response,
        responses={200: {"model": PredictResponse}, **_ERRORS},
        openapi_extra={**raw_body(PredictRequest), **path_parameters(*_params)},
        summary=_summary,
        operation_id=f"predict{'_version' if 'version' in _params else ''}",
    )
