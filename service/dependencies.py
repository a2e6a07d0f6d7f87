"""Annotated dependencies, so that route signatures stay short."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.dataplane import DataPlane
from service.metrics import ServiceMetrics


def dataplane_of(request: Request) -> DataPlane:
    """The app's data plane. The inference routes call this directly instead of declaring a
    dependency: solving one costs FastAPI tens of microseconds per request, a fair share of a
    small model's whole request."""
    return request.app.state.dataplane


# async: FastAPI would run a plain ``def`` dependency in its thread pool, a hop per request.
async def get_dataplane(request: Request) -> DataPlane:
    return dataplane_of(request)


async def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


DataPlaneDep = Annotated[DataPlane, Depends(get_dataplane)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
