"""Publish a finished run into a model repository: ``REPO/<name>/<version>/``.

A version holds ``model.safetensors`` (the bit-packed artifact, its metadata carrying the metrics
and provenance), ``metrics.json`` (metrics, per-epoch history, config), ``curves.png`` and
``summary.json`` (the per-layer summary). Writing is :func:`model.repository.publish`'s job:
atomic, never overwriting a version, safe with concurrent publishers.
"""

from __future__ import annotations

import json
import os
from typing import Any

from model.artifact import ARTIFACT_FILENAME, encode_artifact
from model.repository import ModelVersion, publish
from training.export import collect_provenance, to_artifact_parts
from training.loop import CURVES_FILENAME, METRICS_FILENAME, TrainResult

SUMMARY_FILENAME = "summary.json"


def artifact_bytes(result: TrainResult, name: str) -> bytes:
    """The artifact of ``result``'s model, with its metrics and provenance in the metadata."""
    spec, tensors = to_artifact_parts(
        result.model,
        name=name,
        input_spec=result.data.input_spec,
        labels=result.data.labels,
        training=result.metrics,
        provenance=provenance(result),
    )
    return encode_artifact(spec, tensors)


def provenance(result: TrainResult) -> dict[str, Any]:
    """Data set, seeds, code revision, torch and Python versions, and the full config."""
    config = result.config
    return collect_provenance(
        dataset=result.data.name,
        seed=config.seed,
        split_seed=config.split_seed,
        config=config.to_dict(),
    )


def publish_result(result: TrainResult, repo: str | os.PathLike[str], name: str) -> ModelVersion:
    """Publish ``result`` as the next version of model ``name`` in ``repo``; returns it."""
    files = {
        ARTIFACT_FILENAME: artifact_bytes(result, name),
        METRICS_FILENAME: result.metrics_json(),
        CURVES_FILENAME: result.curves_png,
        SUMMARY_FILENAME: json.dumps(result.summary.to_dict(), indent=2).encode(),
    }
    extra = {
        "architecture": result.model_config.arch,
        "dataset": result.data.name,
        "test_accuracy": result.metrics["test_accuracy"],
    }
    return publish(repo, name, files, manifest_extra=extra)
