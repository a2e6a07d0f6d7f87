"""The simple REST protocol for people: ``{"instances": [...]}`` in, ``{"predictions": [...]}`` out.

Each instance is one input: nested in the model's per-instance shape (e.g. 8×8) or flat.
Each prediction is ``{"label", "class_index", "probabilities": {label: p, ...}}``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import BadRequestError, describe_request_errors
from service.protocol.codec import array_from_json
from service.tensors import DecodedRequest, InputExpectation, Tensor

OUTPUTS = ("label", "predicted_class", "probabilities")


class PredictRequest(BaseModel):
    """``{"instances": [instance, ...]}``, each instance a nested or flat list of numbers."""

    model_config = ConfigDict(strict=True)

    instances: list[Any] = Field(min_length=1)


class Prediction(BaseModel):
    label: str
    class_index: int
    probabilities: dict[str, float]


class PredictResponse(BaseModel):
    model_name: str
    model_version: str
    predictions: list[Prediction]


@dataclass(slots=True)
class EncodedPredictRequest:
    """A predict body, decoded by the data plane once the model's input is known."""

    body: bytes

    @property
    def json_bytes(self) -> int:
        return len(self.body)

    def decode(self, expected: InputExpectation | None = None) -> DecodedRequest:
        return DecodedRequest([decode_predict_request(self.body, expected)], OUTPUTS)


def decode_predict_request(body: bytes, expected: InputExpectation | None = None) -> Tensor:
    """The instances as one FP64 tensor (batch, ...); the model's input takes it by position.
    The shape the nesting implies (along its first elements) is checked against ``expected``
    before numpy converts the numbers."""
    try:
        request = PredictRequest.model_validate_json(body)
    except ValidationError as exc:
        raise BadRequestError(
            f"malformed predict request: {describe_request_errors(exc.errors())}"
        ) from None
    if expected is not None:
        expected.check([(None, "FP64", _leading_shape(request.instances))])
    return Tensor(None, "FP64", array_from_json(request.instances, "FP64", "instances"))


def _leading_shape(instances: list[Any]) -> list[int]:
    """The shape of nested lists, read along their first elements (numpy then checks that
    the rest are regular)."""
    shape, level = [len(instances)], instances
    while level and isinstance(level[0], list) and len(shape) < 64:
        level = level[0]
        shape.append(len(level))
    return shape


def encode_predictions(
    model_name: str, model_version: str, outputs: list[Tensor], labels: tuple[str, ...]
) -> dict[str, Any]:
    by_name = {tensor.name: tensor.array for tensor in outputs}
    probabilities: np.ndarray = by_name["probabilities"]
    predictions = [
        {
            "label": label.decode(),
            "class_index": int(index),
            "probabilities": dict(zip(labels, row.tolist(), strict=True)),
        }
        for label, index, row in zip(
            by_name["label"], by_name["predicted_class"], probabilities, strict=True
        )
    ]
    return {"model_name": model_name, "model_version": model_version, "predictions": predictions}
