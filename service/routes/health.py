"""Server metadata, liveness and readiness (Open Inference Protocol); never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter

from service.dependencies import DataPlaneDep
from service.errors import ModelNotReadyError, error_responses
from service.protocol.v2 import ServerMetadataResponse

router = APIRouter(tags=["health"])


@router.get("/v2", response_model=ServerMetadataResponse, summary="Server metadata")
async def server_metadata(dataplane: DataPlaneDep) -> dict:
    return dataplane.server_metadata()


@router.get("/v2/health/live", summary="Liveness: the process serves HTTP")
async def live() -> dict:
    return {"live": True}


@router.get(
    "/v2/health/ready",
    summary="Readiness: every configured model is loaded and warmed",
    responses=error_responses(503),
)
async def ready(dataplane: DataPlaneDep) -> dict:
    if dataplane.draining:
        raise ModelNotReadyError("the server is shutting down")
    if not dataplane.is_ready():
        raise ModelNotReadyError("the server is not ready: models are loading or unavailable")
    return {"ready": True}
