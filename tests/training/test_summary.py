"""The Larq-style summary: per-layer counts by hand, and the artifact size formula."""

from __future__ import annotations

import struct

import pytest

from model.spec import BatchNorm, Conv2d, Dense, Flatten, InputSpec, MaxPool2d
from training.architectures import (
    CNNConfig,
    MLPConfig,
    ReActNetConfig,
    build_model,
    default_config,
)
from training.export import encode_model, to_artifact_parts
from training.layers import binary_parameters
from training.summary import summarize_layers, summarize_model, summarize_spec


def test_counts_and_macs_by_hand():
    layers = [
        Conv2d("conv", 2, 4, input_quantizer="ste_sign", kernel_quantizer="ste_sign"),
        MaxPool2d("pool"),
        BatchNorm("bn", 4),
        Flatten("flat"),
        Dense("dense", 16, 10, input_quantizer="ste_sign", kernel_quantizer=None, scale=False),
    ]
    summary = summarize_layers(layers, (2, 4, 4), name="tiny")
    conv, pool, bn, flat, dense = summary.layers
    # conv: 4·2·3·3 = 72 binary weights, 4 biases; 4·4 outputs · 4·2·9 = 1152 binary MACs
    assert (conv.binary_params, conv.float_params) == (72, 4)
    assert (conv.binary_macs, conv.float_macs, conv.input_bits) == (1152, 0, 1)
    assert conv.output_shape == (4, 4, 4)
    assert pool.output_shape == (4, 2, 2) and pool.float_params == pool.binary_macs == 0
    assert (bn.float_params, bn.input_bits) == (16, None)  # γ, β, mean, var per channel
    assert flat.output_shape == (16,)
    # dense: full-precision kernel on binary input → float MACs
    assert (dense.binary_params, dense.float_params) == (0, 170)
    assert (dense.binary_macs, dense.float_macs) == (0, 160)
    assert (summary.binary_params, summary.float_params) == (72, 190)
    assert summary.packed_bytes == 72 / 8 + 4 * 190  # 769
    assert summary.float32_bytes == 4 * 262
    assert summary.compression_ratio == pytest.approx(1048 / 769)
    assert conv.memory_bytes == 9 + 16


def test_real_valued_input_makes_float_macs_and_scale_counts_as_float():
    (dense,) = summarize_layers(
        [Dense("d", 64, 32, kernel_quantizer="ste_sign", scale=True)], (64,)
    ).layers
    assert (dense.binary_params, dense.float_params) == (2048, 64)  # bias + α
    assert (dense.binary_macs, dense.float_macs, dense.input_bits) == (0, 2048, 32)


def test_text_and_dict_forms():
    model = build_model(MLPConfig(hidden=(32,)), (1, 8, 8), 10)
    summary = summarize_model(model)
    text = summary.to_text()
    for layer in summary.layers:
        assert layer.name in text
    assert "Compression ratio vs float32: " in text and "Memory (kB)" in text
    assert f"{summary.compression_ratio:.2f}x" in text
    totals = summary.to_dict()["totals"]
    assert totals["binary_params"] == 64 * 32
    assert totals["float_params"] == 32 + 4 * 32 + 32 * 10 + 10
    assert totals["compression_ratio"] == pytest.approx(summary.compression_ratio)


def test_model_and_artifact_summaries_agree():
    model = build_model(
        CNNConfig(stem_channels=4, channels=(8, 8), pool=(True, True)), (1, 8, 8), 10
    )
    spec, _ = to_artifact_parts(
        model, name="m", input_spec=InputSpec(shape=(1, 8, 8)), labels=list("0123456789")
    )
    assert summarize_spec(spec).to_dict()["layers"] == summarize_model(model).to_dict()["layers"]


@pytest.mark.parametrize(
    "config",
    [
        default_config("mlp", "digits"),
        default_config("cnn", "digits"),
        MLPConfig(hidden=(100, 37), scale=True),  # widths off the 64-bit word boundary
    ],
    ids=["digits-mlp", "digits-cnn", "odd-widths"],
)
def test_artifact_size_is_within_ten_percent_of_the_formula(config):
    """size ≈ binary/8 + 4·float + header (the acceptance formula)."""
    model = build_model(config, (1, 8, 8), 10)
    data = encode_model(
        model, name="m", input_spec=InputSpec(shape=(1, 8, 8)), labels=list("0123456789")
    )
    header = 8 + struct.unpack("<Q", data[:8])[0]
    summary = summarize_model(model)
    expected = summary.packed_bytes + header
    assert abs(len(data) - expected) <= 0.10 * expected
    # The tensor bytes alone are never below the formula (words only pad) and are within 10%.
    assert summary.packed_bytes <= len(data) - header <= 1.10 * summary.packed_bytes
    assert summary.compression_ratio > 5  # mostly binary weights


def test_summary_of_a_residual_graph_counts_every_stored_parameter():
    model = build_model(ReActNetConfig(stem_channels=8, channels=(8, 16), blocks=1), (1, 8, 8), 10)
    summary = summarize_model(model)
    rows = {layer.name: layer for layer in summary.layers}
    assert summary.binary_params == sum(p.numel() for p in binary_parameters(model))
    _, tensors = to_artifact_parts(
        model, name="m", input_spec=InputSpec(shape=(1, 8, 8)), labels=[str(i) for i in range(10)]
    )
    stored_floats = sum(t.size for t in tensors.values() if t.dtype.kind == "f")
    assert summary.float_params == stored_floats
    assert rows["s0b0_rsign"].float_params == 8 and rows["s1b0_rp"].float_params == 16
    assert rows["s1b0_pool"].output_shape == (8, 4, 4)  # from the block input, not the conv
    assert rows["s1b0_add"].output_shape == (16, 4, 4) and rows["pool"].output_shape == (16,)
    assert rows["s1b0_conv"].binary_macs == 4 * 4 * 16 * 8 * 9
    assert rows["s1b0_down"].float_macs == 4 * 4 * 16 * 8
