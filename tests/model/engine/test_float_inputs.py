"""The exactness policy for real-valued (non-integer) inputs.

Integer inputs are exact (``test_equivalence``). A real input meets full-precision arithmetic in
the first layer, which the engine sums in float32 in its own fixed order and eager torch in
float32 in BLAS's order, so the two raw sums can differ in their last bits. The policy:

* a **tie** is a first-layer decision (after its BatchNorm and binarizer) that differs between
  the engine and eager: the threshold lies between two float32 roundings of the same sum. Every
  layer after the first is exact, so a row is either tied or not, and the tie rate is the
  fraction of rows with any tie;
* a row without a tie has the same class as eager float32 and logits within 1e-5 of eager's,
  relative to the row's largest logit;
* ties are rare: at most :data:`MAX_TIED_ROWS` of the rows here (measured rates for the
  benchmark models are in docs/benchmarks.md).
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from bench.float_inputs import first_decisions  # noqa: E402
from model import InputSpec  # noqa: E402
from tests.model.engine.test_equivalence import CNNS, DIGITS, MLPS, config_id  # noqa: E402

# A model published for real-valued input (no bit-planes: the first layer is a FloatDense).
REAL = InputSpec(shape=(1, 8, 8), value_range=(-4.0, 4.0), integer_valued=False)
LOGIT_TOLERANCE = 1e-5
MAX_TIED_ROWS = 0.02
CONFIGS = [MLPS[0], MLPS[1], MLPS[4], CNNS[0], CNNS[1], CNNS[4]]


def check_policy(model, eager, x: np.ndarray) -> float:
    """Assert the policy on rows ``x``; returns the fraction of tied rows."""
    with torch.no_grad():
        want = eager(torch.from_numpy(np.ascontiguousarray(x, np.float32))).numpy()
    got = model.predict(x)
    engine, reference = first_decisions(model, eager, x)
    tied = (engine != reference).any(axis=1)
    clean = ~tied
    np.testing.assert_array_equal(got[clean].argmax(1), want[clean].argmax(1))
    error = np.abs(got[clean] - want[clean]) / np.abs(want[clean]).max(axis=1, keepdims=True)
    assert error.max() <= LOGIT_TOLERANCE, f"relative logit error {error.max():.3g} on untied rows"
    assert tied.mean() <= MAX_TIED_ROWS, f"{tied.sum()} of {len(x)} rows tied"
    return float(tied.mean())


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_standard_normal_inputs(compiled, config):
    model, eager = compiled(config, REAL)
    x = np.random.default_rng(5).standard_normal((500, *REAL.shape)).astype(np.float32)
    check_policy(model, eager, x)


@pytest.mark.parametrize("config", CONFIGS, ids=config_id)
def test_digits_fed_as_floats(compiled, digits_test, config):
    """A model published for integer pixels, given normalized pixels: the float32 path of its
    bit-plane layer (or its stem), not the bit-planes."""
    model, eager = compiled(config, DIGITS)
    check_policy(model, eager, (digits_test.x / np.float32(16.0)).astype(np.float32))


def test_ties_happen_only_at_a_threshold(compiled):
    """The tie count is not vacuous: rows scaled so that the exact raw sum of the first layer's
    channel 0 equals that channel's cut tie on channel 0 (float32 roundings fall on either
    side), and on no other channel."""
    model, eager = compiled(MLPS[0], REAL)
    first = next(op for op in model._executor.program.ops if hasattr(op, "weight"))
    rng = np.random.default_rng(11)
    x = rng.standard_normal((400, 64))
    bits = np.unpackbits(first.weight[0].view(np.uint8), bitorder="little")[:64]
    raw = x @ np.where(bits == 1, -1.0, 1.0)
    x *= (first.epilogue.cut[0] / raw)[:, None]
    engine, reference = first_decisions(model, eager, x.astype(np.float32).reshape(400, 1, 8, 8))
    differ = engine != reference
    assert differ[:, 0].sum() > 0
    assert not differ[:, 1:].any()
