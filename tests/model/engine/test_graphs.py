"""Layer graphs beyond what training builds today, against the eager interpreter of the spec in
``reference.py``: every way a dense/conv output can reach the next layer (folded thresholds,
bit pools in both orders, real-valued paths), quantized model inputs, strides and kernel sizes."""

from __future__ import annotations

import numpy as np
import pytest

from model import InputSpec, ModelSpec, load_model, read_artifact
from model.engine.ops import BinaryConv, FloatDense, PlanesDense, Quantize, RealBatchNorm
from model.spec import BatchNorm, Conv2d, Dense, Flatten, MaxPool2d
from tests.model.engine.reference import cnn_spec, eager_logits, mlp_spec, write_model
from tests.model.factory import tiny_spec

pytest.importorskip("torch")

DIGITS = InputSpec(shape=(1, 8, 8), value_range=(0.0, 16.0), integer_valued=True)


def spec_of(layers, input_spec=DIGITS, classes=10) -> ModelSpec:
    return ModelSpec(
        name="graph",
        architecture="custom",
        input=input_spec,
        labels=tuple(f"c{i}" for i in range(classes)),
        layers=tuple(layers),
    )


def binary(name, n_in, n_out, **kw):
    return Dense(name, n_in, n_out, input_quantizer="ste_sign", kernel_quantizer="ste_sign", **kw)


def bconv(name, c_in, c_out, **kw):
    kw.setdefault("input_quantizer", "ste_sign")
    return Conv2d(name, c_in, c_out, kernel_quantizer="ste_sign", **kw)


GRAPHS = {
    "tiny-factory": tiny_spec(),
    "bn-before-pool-alpha-pad-1": cnn_spec(bn_before_pool=True, scale=True, pad_value=-1.0),
    "step-pad1": cnn_spec(input_quantizer="stochastic_binary", pad_value=1.0, hidden=None),
    "step-pad0-bn-before-pool": cnn_spec(
        input_quantizer="stochastic_binary", pad_value=0.0, bn_before_pool=True
    ),
    "strides-and-kernels": spec_of(
        [
            Conv2d("c0", 1, 9, kernel_size=(3, 3), padding=(1, 1), pad_value=0.0),
            BatchNorm("b0", 9),
            bconv("c1", 9, 67, kernel_size=(5, 5), padding=(2, 2), stride=(2, 2), pad_value=-1.0),
            BatchNorm("b1", 67),
            bconv("c2", 67, 30, kernel_size=(1, 1), padding=(0, 0), bias=False, scale=True),
            MaxPool2d("p2", kernel_size=(3, 3), stride=(1, 1)),
            BatchNorm("b2", 30),
            Flatten("f"),
            Dense("out", 30 * 2 * 2, 10, input_quantizer="clipped_ste"),
        ]
    ),
    "real-valued-middle": spec_of(
        [
            Flatten("f"),
            Dense("d0", 64, 90, kernel_quantizer="ste_sign"),
            BatchNorm("b0", 90),
            Dense("d1", 90, 80, kernel_quantizer="ste_sign", scale=True),  # binary W, real input
            BatchNorm("b1", 80),
            Dense("out", 80, 10, input_quantizer="ste_sign"),
            BatchNorm("b_out", 10),  # a real BatchNorm at the end
        ]
    ),
    "quantized-model-input": spec_of(
        [
            Flatten("f"),
            binary("d0", 64, 70),  # sign(x) of the raw input: every pixel ≥ 0 gives +1
            BatchNorm("b0", 70),
            Dense("out", 70, 10, input_quantizer="ste_sign"),
        ],
        InputSpec(shape=(1, 8, 8), value_range=(-8.0, 8.0), integer_valued=True),
    ),
    "quantized-model-input-step": spec_of(
        [
            Flatten("f"),
            Dense("d0", 64, 70, "stochastic_binary", "ste_sign", scale=True),  # x > 0 → 1
            BatchNorm("b0", 70),
            Dense("out", 70, 10, input_quantizer="stochastic_binary"),
        ],
        InputSpec(shape=(1, 8, 8), value_range=(-3.0, 3.0), integer_valued=True),
    ),
    "quantized-input-real-weight-conv": spec_of(
        [
            Conv2d("c0", 1, 7, input_quantizer="ste_sign", pad_value=-1.0),  # sign(x), real W
            BatchNorm("b0", 7),
            Flatten("f"),
            Dense("out", 7 * 8 * 8, 10, input_quantizer="ste_sign"),
        ],
        InputSpec(shape=(1, 8, 8), value_range=(-8.0, 8.0), integer_valued=True),
    ),
    "batchnorm-after-flatten": spec_of(
        [
            Conv2d("c0", 1, 5, pad_value=0.0),
            BatchNorm("b0", 5),
            bconv("c1", 5, 6),
            MaxPool2d("p1"),
            Flatten("f"),
            BatchNorm("b1", 6 * 4 * 4),  # per feature, not per channel: not folded
            binary("d", 96, 20),
            BatchNorm("b2", 20),
            Dense("out", 20, 10, input_quantizer="ste_sign"),
        ]
    ),
}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("graphs")
    cache = {}

    def get(name):
        if name not in cache:
            path = write_model(root / f"{name}.safetensors", GRAPHS[name], np.random.default_rng(5))
            cache[name] = (load_model(path), read_artifact(path))
        return cache[name]

    return get


def pixels(spec: InputSpec, batch: int, seed: int = 0) -> np.ndarray:
    low, high = spec.value_range
    rng = np.random.default_rng(seed)
    return rng.integers(int(low), int(high) + 1, size=(batch, *spec.shape)).astype(np.float32)


@pytest.mark.parametrize("name", sorted(GRAPHS))
def test_graph_matches_eager(built, name):
    model, artifact = built(name)
    x = pixels(model.input_spec, 200)
    want = eager_logits(artifact.spec, artifact.tensors, x)
    got = model.predict(x)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))
    scale = np.abs(want).max(axis=1, keepdims=True)
    assert (np.abs(got - want) / scale).max() <= 1e-4


def test_programs_take_the_intended_paths(built):
    ops = {name: [type(op) for op in built(name)[0].program.ops] for name in GRAPHS}
    assert PlanesDense in ops["real-valued-middle"] and FloatDense in ops["real-valued-middle"]
    # the BatchNorm right after a layer whose output stays real runs in that layer's epilogue
    middle = built("real-valued-middle")[0].program.ops
    assert any(getattr(getattr(op, "epilogue", None), "batchnorm", None) for op in middle)
    assert Quantize in ops["quantized-model-input"]
    assert Quantize in ops["quantized-model-input-step"]
    assert RealBatchNorm in ops["batchnorm-after-flatten"]
    assert ops["tiny-factory"].count(BinaryConv) == 1
    pools = [
        op.epilogue.pools
        for op in built("tiny-factory")[0].program.ops
        if isinstance(op, BinaryConv)
    ]
    assert len(pools[0]) == 1  # the max-pool runs on packed decisions


def test_values_outside_the_bit_plane_range_take_the_float_path(tmp_path):
    spec = mlp_spec(features=64, value_range=(0.0, 16.0))
    path = write_model(tmp_path / "m.safetensors", spec, np.random.default_rng(1))
    model, artifact = load_model(path), read_artifact(path)
    x = pixels(spec.input, 50) * 5000 - 30000  # integers, negative and > 2**16: exact in float64
    want = eager_logits(artifact.spec, artifact.tensors, x)
    np.testing.assert_array_equal(model.predict(x).argmax(1), want.argmax(1))
