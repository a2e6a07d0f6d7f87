"""Server metadata, liveness and readiness (Open Inference Protocol); never behind the API key."""

from __future__ import annotations

from fastapi import APIRouter

from service.dependencies import DataPlaneDep
from service.errors import ReadinessFalse
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
    summary="Readiness: 200 once every configured model is loaded and warmed, else 400",
    responses={400: {"description": "Not ready (the protocol's 'false'); the body says why"}},
)
async def ready(dataplane: DataPlaneDep) -> dict:
    """The Open Inference Protocol's "server ready": 200 for true, a 4xx (400, as Triton)
    for false."""
    if dataplane.draining:
        raise ReadinessFalse("the server is shutting down")
    if not dataplane.is_ready():
        raise ReadinessFalse("the server is not ready: models are loading or unavailable")
    return {"ready": True}
