"""Protocol-agnostic tensors, and the outputs the service derives from a model's logits.

A model computes logits; every other output is a pure function of them:

==================  ========  ===========  ==============================================
output              datatype  shape        value
==================  ========  ===========  ==============================================
``<logits name>``   FP32      (batch, C)   the model's logits (``spec.output_name``)
``probabilities``   FP32      (batch, C)   softmax(logits) over the class axis
``predicted_class`` INT64     (batch,)     argmax(logits) — index into the labels
``label``           BYTES     (batch,)     labels[argmax(logits)], UTF-8
==================  ========  ===========  ==============================================
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from model.errors import InvalidInputError


@dataclass(frozen=True)
class Tensor:
    """An array with its Open Inference Protocol datatype (``FP32``, ``INT64``, ``BYTES``...);
    a name of None stands for "the model's only input" (the simple REST protocol names none)."""

    name: str | None
    datatype: str
    array: np.ndarray


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax, shifted by the row maximum so exp never overflows; (batch, C) float32."""
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return (shifted / shifted.sum(axis=1, keepdims=True)).astype(np.float32)


def _predicted_class(logits: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    return logits.argmax(axis=1).astype(np.int64)


def _label(logits: np.ndarray, labels: Sequence[str]) -> np.ndarray:
    return np.array([labels[i].encode() for i in logits.argmax(axis=1)], dtype=object)


# name -> (datatype, has a class axis, derive(logits, labels)); the logits output is added per model.
DERIVED_OUTPUTS: dict[str, tuple[str, bool, Callable[[np.ndarray, Sequence[str]], np.ndarray]]] = {
    "probabilities": ("FP32", True, lambda logits, labels: softmax(logits)),
    "predicted_class": ("INT64", False, _predicted_class),
    "label": ("BYTES", False, _label),
}


def output_signatures(logits_name: str, classes: int) -> list[tuple[str, str, list[int]]]:
    """(name, datatype, shape with -1 for the batch) of every output, logits first."""
    signatures = [(logits_name, "FP32", [-1, classes])]
    for name, (datatype, per_class, _) in DERIVED_OUTPUTS.items():
        signatures.append((name, datatype, [-1, classes] if per_class else [-1]))
    return signatures


def derive_outputs(
    names: Sequence[str], logits: np.ndarray, labels: Sequence[str], logits_name: str
) -> list[Tensor]:
    """The outputs ``names`` (as :func:`check_output_names` returned them), in that order."""
    tensors = []
    for name in names:
        if name == logits_name:
            tensors.append(Tensor(name, "FP32", logits))
        else:
            datatype, _, derive = DERIVED_OUTPUTS[name]
            tensors.append(Tensor(name, datatype, derive(logits, labels)))
    return tensors


def check_output_names(names: Sequence[str] | None, logits_name: str) -> Sequence[str]:
    """``names`` (every output when None); InvalidInputError for a name the model lacks."""
    known = [logits_name, *DERIVED_OUTPUTS]
    if names is None:
        return known
    for name in names:
        if name not in known:
            raise InvalidInputError(f"unknown output {name!r}; this model has: {', '.join(known)}")
    return names
