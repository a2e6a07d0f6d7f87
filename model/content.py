"""Checks on an artifact's numbers: a file can be well-formed and still poison the model.

A NaN or infinite weight, bias, scale, ``shift`` (RSign's threshold, RPReLU's shifts) or
PReLU slope makes every answer through it NaN or wrong (every float tensor is checked); a negative
BatchNorm ``running_var`` or an ``eps`` ≤ 0 makes ``1/sqrt(running_var + eps)`` NaN or
infinite. The engine folds each BatchNorm into per-channel coefficients, exactly as torch's
eval BatchNorm does in float32 (:func:`model.engine.floatmath.batchnorm_coefficients`)::

    invstd = fl(1 / fl(sqrt(fl(var + eps))))
    alpha  = fl(invstd · weight)
    beta   = fma(−mean, alpha, bias)

and folds ``alpha``, ``beta`` and the layer's ``scale``/``bias`` into integer thresholds. Finite
statistics can still overflow there (``var = 0`` with ``eps`` below float32's smallest
subnormal, or ``weight / sqrt(var + eps)`` above 3.4e38), so the coefficients themselves are
checked: every threshold folded from finite coefficients is finite, by construction of the
search in :mod:`model.engine.folding`. The reader and the writer both run these checks, so a
refused model is neither written nor served.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from model.errors import InvalidBatchNormError, NonFiniteTensorError
from model.spec import BatchNorm, ModelSpec


def check_model_content(spec: ModelSpec, tensors: Mapping[str, np.ndarray]) -> None:
    """Raise a named :class:`~model.errors.ModelContentError` for the first poisonous number."""
    for name in sorted(tensors):
        check_finite(name, tensors[name])
    for layer in spec.layers:
        if isinstance(layer, BatchNorm):
            check_batchnorm(layer, tensors)


def check_finite(name: str, array: np.ndarray) -> None:
    """Every value of a float tensor is finite (packed ±1 and integer tensors always are)."""
    if array.dtype.kind != "f":
        return
    bad = ~np.isfinite(array)
    if bad.any():
        where = np.argwhere(bad)[0].tolist()
        raise NonFiniteTensorError(
            f"tensor {name!r}: {int(bad.sum())} of {array.size} values are NaN or infinite "
            f"(first {array[tuple(where)]} at index {where}); expected finite numbers"
        )


def check_batchnorm(layer: BatchNorm, tensors: Mapping[str, np.ndarray]) -> None:
    """``running_var`` ≥ 0 and finite folded (alpha, beta); ``eps`` > 0 is a spec check
    (:class:`model.spec.BatchNorm`)."""
    # (imported here: model.engine imports model.artifact, which imports this module)
    from model.engine.floatmath import batchnorm_coefficients

    where = f"layer {layer.name!r} (batchnorm)"
    stats = {s: tensors[f"{layer.name}.{s}"] for s in ("weight", "bias", "running_mean")}
    var = tensors[f"{layer.name}.running_var"]
    negative = np.flatnonzero(var < 0)
    if negative.size:
        raise InvalidBatchNormError(
            f"{where}: running_var is {var[negative[0]]} at channel {negative[0]} "
            f"({negative.size} channels negative); a variance must be ≥ 0"
        )
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        alpha, beta = batchnorm_coefficients(
            stats["weight"], stats["bias"], stats["running_mean"], var, layer.eps
        )
    broken = np.flatnonzero(~(np.isfinite(alpha) & np.isfinite(beta)))
    if broken.size:
        c = broken[0]
        raise InvalidBatchNormError(
            f"{where}: channel {c} folds to non-finite coefficients (alpha={alpha[c]}, "
            f"beta={beta[c]}) from weight={stats['weight'][c]}, running_var={var[c]}, "
            f"eps={layer.eps}; expected weight/sqrt(running_var + eps) within float32 range"
        )
