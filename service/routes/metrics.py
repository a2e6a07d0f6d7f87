"""Prometheus exposition; open like health so scrapers need no key."""

from __future__ import annotations

from fastapi import APIRouter, Response

from service.dependencies import MetricsDep
from service.metrics import CONTENT_TYPE

router = APIRouter(tags=["metrics"])


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(registry: MetricsDep) -> Response:
    return Response(registry.render(), media_type=CONTENT_TYPE)
