"""Simple REST for people.

GET  /v1/models                                        → models, versions and their state
POST /v1/models/{name}[/versions/{version}]:predict    {"instances": [...]} → {"predictions": [...]}
"""

from __future__ import annotations

from fastapi import APIRouter

from service.dataplane import DataPlane, InferenceResult
from service.dependencies import DataPlaneDep
from service.errors import error_responses
from service.openapi import raw_body
from service.protocol import codec
from service.protocol.rest import (
    EncodedPredictRequest,
    PredictRequest,
    PredictResponse,
    encode_predictions,
)
from service.routes import InferenceEndpoint, Reply, optional_version

router = APIRouter(prefix="/v1", tags=["simple REST"])


@router.get("/models", summary="Models, their versions and states", responses=error_responses(401))
async def list_models(dataplane: DataPlaneDep) -> dict:
    return {"models": dataplane.list_models()}


async def predict(
    dataplane: DataPlane, params: dict[str, str], body: bytes, header_length: str | None
) -> Reply:
    """``{"instances": [...]}`` → ``{"predictions": [...]}`` (``header_length``,
    a V2 header, is unused here)."""
    result = await dataplane.infer(
        params["name"],
        optional_version(params.get("version")),
        EncodedPredictRequest(body),
        protocol="v1",
    )
    return dataplane.tracing.run("encode", _encode, result)


def _encode(result: InferenceResult) -> Reply:
    predictions = encode_predictions(
        result.model_name, result.model_version, result.outputs, result.labels
    )
    return codec.to_json(predictions), {}, codec.JSON_MEDIA_TYPE


PREDICT_PATHS = ("/v1/models/{name}:predict", "/v1/models/{name}/versions/{version}:predict")

INFERENCE = InferenceEndpoint(
    handler=predict,
    summaries=[
        (PREDICT_PATHS[0], "Predict labels and class probabilities (newest version)"),
        (PREDICT_PATHS[1], "Predict labels and class probabilities (one version)"),
    ],
    response_model=PredictResponse,
    body=raw_body(PredictRequest),
    operation="predict",
    tag="simple REST",
)
