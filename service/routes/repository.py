"""Open Inference Protocol model repository extension: index, load, unload.

POST /v2/repository/index                  {"ready": bool}? → [{"name", "version", "state", "reason"}]
POST /v2/repository/models/{name}/load     {"parameters": {"version": "N"}}? → 200 once it serves
POST /v2/repository/models/{name}/unload   → 200; queued requests still finish
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ValidationError

from model.errors import ModelNotFoundError
from model.repository import parse_version
from service.dependencies import DataPlaneDep
from service.errors import BadRequestError, describe_request_errors, error_responses
from service.openapi import raw_body
from service.protocol.v2 import RepositoryIndexEntry, RepositoryIndexRequest, RepositoryLoadRequest

router = APIRouter(prefix="/v2/repository", tags=["v2 repository"])


@router.post(
    "/index",
    response_model=list[RepositoryIndexEntry],
    responses=error_responses(400, 401),
    openapi_extra=raw_body(RepositoryIndexRequest, required=False),
    summary="Every model version in the repository, with state and reason",
)
async def repository_index(request: Request, dataplane: DataPlaneDep) -> list[dict]:
    body = await request.body()
    try:
        query = RepositoryIndexRequest.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise BadRequestError(describe_request_errors(exc.errors())) from None
    return dataplane.repository_index(ready_only=query.ready)


@router.post(
    "/models/{name}/load",
    responses=error_responses(400, 401, 404),
    openapi_extra=raw_body(RepositoryLoadRequest, required=False),
    summary="Load (or retry) the newest version, or pin parameters.version; the old one "
    "serves until the switch",
)
async def load_model(name: str, request: Request, dataplane: DataPlaneDep) -> dict:
    body = await request.body()
    try:
        load = RepositoryLoadRequest.model_validate_json(body or b"{}")
    except ValidationError as exc:
        raise BadRequestError(describe_request_errors(exc.errors())) from None
    served = await dataplane.load(name, requested_version(load))
    return {"name": served.name, "version": str(served.version), "state": "READY"}


def requested_version(load: RepositoryLoadRequest) -> int | None:
    """``parameters.version`` as a version number ("3" or 3), None when absent."""
    value = load.parameters.get("version")
    if value is None:
        return None
    try:
        return parse_version(value)
    except ModelNotFoundError:
        raise BadRequestError(
            f"parameters.version: expected a positive integer (or its decimal string), "
            f"got {value!r}"
        ) from None


@router.post(
    "/models/{name}/unload",
    responses=error_responses(400, 401, 404),
    summary="Stop serving every version of a model",
)
async def unload_model(name: str, dataplane: DataPlaneDep) -> dict:
    await dataplane.unload(name)
    return {"name": name, "state": "UNAVAILABLE"}
