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

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from model.errors import InvalidInputError

# Datatypes whose values convert to the engine's float32 input exactly enough to accept.
ACCEPTED_INPUT_DATATYPES = (
    "FP32", "FP16", "FP64", "INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64",
)  # fmt: skip


@dataclass(slots=True)  # plain, not frozen: made per request, and cheaper to build
class Tensor:
    """An array with its Open Inference Protocol datatype (``FP32``, ``INT64``, ``BYTES``...);
    a name of None stands for "the model's only input" (the simple REST protocol names none)."""

    name: str | None
    datatype: str
    array: np.ndarray


@dataclass(frozen=True)
class InputExpectation:
    """What a model's one input takes: checked against a request's declared inputs (names,
    datatypes, shapes) before any tensor data is decoded, so that a body of the wrong shape or
    type costs no decoding. Picklable: it travels to the decoding worker process."""

    name: str
    shape: tuple[int, ...]  # per instance
    datatype: str
    max_rows: int  # BNN_MAX_REQUEST_BATCH

    def check(self, declared: Sequence[tuple[str | None, str, Sequence[int]]]) -> None:
        """InvalidInputError naming what is wrong with the (name, datatype, shape) of the
        inputs: their number, the name, the datatype, the shape (per instance, or flattened:
        ``[batch, prod(shape)]``), an empty batch, or more than ``max_rows`` instances."""
        if len(declared) != 1:
            names = [name for name, _, _ in declared]
            raise InvalidInputError(f"expected exactly one input {self.name!r}, got {names}")
        name, datatype, shape = declared[0]
        if name is not None and name != self.name:
            raise InvalidInputError(f"unknown input {name!r}; this model's input is {self.name!r}")
        if datatype not in ACCEPTED_INPUT_DATATYPES:
            raise InvalidInputError(
                f"input {self.name!r}: expected datatype {self.datatype} (or another numeric "
                f"type: {', '.join(ACCEPTED_INPUT_DATATYPES)}), got {datatype}"
            )
        per_instance = math.prod(self.shape)
        if len(shape) < 2 or (
            tuple(shape[1:]) != tuple(self.shape) and math.prod(shape[1:]) != per_instance
        ):
            raise InvalidInputError(
                f"input {self.name!r}: expected shape {[-1, *self.shape]} (or [-1, "
                f"{per_instance}]), got {list(shape)}"
            )
        if shape[0] == 0:
            raise InvalidInputError(
                f"input {self.name!r}: the batch is empty (shape {list(shape)})"
            )
        if shape[0] > self.max_rows:
            raise InvalidInputError(
                f"input {self.name!r}: batch of {shape[0]} instances exceeds the limit of "
                f"{self.max_rows} (BNN_MAX_REQUEST_BATCH)"
            )


@dataclass(slots=True)  # plain, not frozen: made per request
class DecodedRequest:
    """A request's input tensors and the outputs it asks for (None: all of them);
    ``checked_against``: the expectation the tensors' names, datatypes and shapes were checked
    against while decoding, if they were (the data plane then need not check them again)."""

    inputs: list[Tensor]
    outputs: Sequence[str] | None
    checked_against: InputExpectation | None = None


class EncodedRequest(Protocol):
    """A request body as received; the data plane decodes it once it knows the model's input,
    on the event loop or (``json_bytes`` large) in a worker process. Implementations are
    picklable, and so is what ``decode`` returns."""

    @property
    def json_bytes(self) -> int:
        """How many bytes of JSON decoding takes: what it costs."""
        ...

    def decode(self, expected: InputExpectation) -> DecodedRequest:
        """The tensors; BnnError subclasses name what is malformed or unexpected."""
        ...


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
