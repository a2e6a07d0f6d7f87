"""Annotated dependencies, so that route signatures stay short."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from service.dataplane import DataPlane
from service.metrics import ServiceMetrics


def get_dataplane(request: Request) -> DataPlane:
    return request.app.state.dataplane


def get_metrics(request: Request) -> ServiceMetrics:
    return request.app.state.metrics


DataPlaneDep = Annotated[DataPlane, Depends(get_dataplane)]
MetricsDep = Annotated[ServiceMetrics, Depends(get_metrics)]
