"""What each quantizer name means at inference time.

Training registers the quantizers (forward + straight-through backward) under these names and
artifacts refer to them by name. At inference only the forward matters, and every registered
quantizer is one of two binarizers:

* ``sign``: q(x) = +1 if x ≥ 0 else −1 (sign(0) = +1), values {−1, +1};
* ``step``: q(x) = 1 if x > 0 else 0, values {0, 1} (``stochastic_binary`` at inference).

Kernel (weight) quantizers must produce ±1, so that a weight is one sign bit.
"""

from __future__ import annotations

from dataclasses import dataclass

from model.errors import InvalidSpecError, UnknownQuantizerError


@dataclass(frozen=True)
class Binarizer:
    """Inference forward of a quantizer: the two output values and where it switches.

    ``fires(x)`` is ``x > 0`` when ``strict`` else ``x ≥ 0``; the output is ``high`` where it
    fires and ``low`` elsewhere.
    """

    kind: str
    low: int
    high: int
    strict: bool


SIGN = Binarizer(kind="sign", low=-1, high=1, strict=False)
STEP = Binarizer(kind="step", low=0, high=1, strict=True)

INFERENCE_BINARIZERS: dict[str, Binarizer] = {
    "ste_sign": SIGN,
    "clipped_ste": SIGN,
    "approx_sign": SIGN,
    "swish_sign": SIGN,
    "stochastic_binary": STEP,
}


def binarizer_for(name: str) -> Binarizer:
    """The inference binarizer of quantizer ``name``; UnknownQuantizerError if unregistered."""
    try:
        return INFERENCE_BINARIZERS[name]
    except KeyError:
        known = ", ".join(sorted(INFERENCE_BINARIZERS))
        raise UnknownQuantizerError(
            f"unknown quantizer {name!r}; expected one of: {known}"
        ) from None


def check_kernel_quantizer(name: str, layer: str) -> None:
    """Raise unless ``name`` binarizes weights to ±1 (one sign bit per weight)."""
    if binarizer_for(name) is not SIGN:
        raise InvalidSpecError(
            f"layer {layer!r}: kernel quantizer {name!r} produces {{0, 1}}; "
            "weights need a ±1 quantizer (ste_sign, clipped_ste, approx_sign, swish_sign)"
        )
