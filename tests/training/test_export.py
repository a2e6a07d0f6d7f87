"""Export to an artifact and reconstruction: the rebuilt module equals the trained one in eval
mode (binary activations exactly, logits within 1e−5) for every quantizer, α on and off, pad ±1
and widths that are not multiples of 64."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from torch import nn

from model.artifact import decode_artifact, read_artifact
from model.errors import InvalidSpecError
from model.packing import pack_signs
from model.spec import InputSpec
from training.architectures import (
    BinaryNet,
    BiRealConfig,
    CNNConfig,
    MLPConfig,
    ReActNetConfig,
    build_model,
)
from training.export import (
    code_revision,
    collect_provenance,
    encode_model,
    export_artifact,
    module_from_artifact,
    to_artifact_parts,
)
from training.quantizers import Quantizer

SHAPE = (1, 8, 8)
LABELS = tuple(str(c) for c in range(10))
ACTIVATIONS = ("ste_sign", "clipped_ste", "approx_sign", "swish_sign", "stochastic_binary")
KERNELS = ("ste_sign", "clipped_ste", "approx_sign", "swish_sign")


def parts(**overrides):
    return {
        "name": "test-model",
        "input_spec": InputSpec(shape=SHAPE, value_range=(0.0, 16.0), integer_valued=True),
        "labels": LABELS,
        "training": {"epochs": 1},
        "provenance": {"dataset": "synthetic", "seed": 0},
    } | overrides


def trained_like(model: BinaryNet) -> BinaryNet:
    """Give weights and BatchNorm statistics values training could leave (negative BN scales
    included), and put some latent weights exactly at 0 (sign(0) = +1)."""
    torch.manual_seed(1)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm1d | nn.BatchNorm2d):
                module.running_mean.normal_(0.0, 3.0)
                module.running_var.uniform_(0.5, 20.0)
        for p in model.parameters():
            p.normal_(0.0, 0.5)
            if p.dim() > 1:
                p.view(-1)[::7] = 0.0
    return model.eval()


def binary_activations(model: BinaryNet, x: torch.Tensor) -> list[torch.Tensor]:
    """Outputs of every quantizer (±1 or {0, 1} activations and weights) in order, then logits."""
    captured: list[torch.Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
        for m in model.modules()
        if isinstance(m, Quantizer)
    ]
    try:
        logits = model(x)
    finally:
        for h in hooks:
            h.remove()
    return [*captured, logits.detach()]


def pad_values(activation: str) -> tuple[float, float]:
    """The two padding values a binary conv may use with ``activation``."""
    return (1.0, 0.0) if activation == "stochastic_binary" else (1.0, -1.0)


def mlp_case(i: int, activation: str, scale: bool) -> MLPConfig:
    return MLPConfig(
        hidden=(70, 33), activation_quantizer=activation, kernel_quantizer=KERNELS[i % 4],
        scale=scale,
    )  # fmt: skip


def cnn_case(i: int, activation: str, scale: bool) -> CNNConfig:
    return CNNConfig(
        stem_channels=5, channels=(7, 65), pool=(True, False), hidden=(13,),
        activation_quantizer=activation, kernel_quantizer=KERNELS[i % 4], scale=scale,
        pad_value=pad_values(activation)[(i + scale) % 2],
    )  # fmt: skip


CASES = [
    pytest.param(make(i, activation, scale), id=f"{arch}-{activation}-{KERNELS[i % 4]}-{scale=}")
    for arch, make in (("mlp", mlp_case), ("cnn", cnn_case))
    for i, activation in enumerate(ACTIVATIONS)
    for scale in (False, True)
]


@pytest.mark.parametrize("config", CASES)
def test_rebuilt_module_equals_trained_model(config, tmp_path):
    model = trained_like(build_model(config, SHAPE, 10))
    path = tmp_path / "model.safetensors"
    size = export_artifact(model, path, **parts())
    assert size == path.stat().st_size
    rebuilt = module_from_artifact(path)
    assert not rebuilt.training
    x = torch.randint(0, 17, (32, *SHAPE)).float()
    with torch.no_grad():
        expected, got = binary_activations(model, x), binary_activations(rebuilt, x)
    assert len(got) == len(expected) >= 3
    for e, g in zip(expected[:-1], got[:-1], strict=True):
        assert torch.equal(e, g)  # binary activations: exactly
    assert torch.allclose(expected[-1], got[-1], atol=1e-5, rtol=0)
    # Distinct logits: equality is not vacuous.
    assert expected[-1].std() > 0.1


def test_rebuilt_binary_layers_hold_plus_minus_one_and_frozen_scale(tmp_path):
    model = trained_like(build_model(MLPConfig(hidden=(10,), scale=True), SHAPE, 10))
    export_artifact(model, tmp_path / "m.safetensors", **parts())
    rebuilt = module_from_artifact(read_artifact(tmp_path / "m.safetensors"))
    dense = rebuilt.layers.dense1
    assert set(dense.weight.unique().tolist()) == {-1.0, 1.0}
    # Recomputed from ±1 weights α would be 1; it must stay the trained mean|W|.
    assert torch.equal(dense.channel_scale(), model.layers.dense1.channel_scale().detach())
    assert not torch.allclose(dense.channel_scale(), torch.ones(10))


def test_tensors_follow_the_spec():
    model = trained_like(build_model(CNNConfig(stem_channels=3, channels=(70,), pool=(True,),
                                               scale=True), SHAPE, 10))  # fmt: skip
    spec, tensors = to_artifact_parts(model, **parts())
    conv = model.layers.conv1
    signs = torch.where(conv.weight >= 0, 1.0, -1.0).detach().numpy()
    assert np.array_equal(tensors["conv1.weight"], pack_signs(signs, axis=1))
    assert tensors["conv1.weight"].shape == (70, 3, 3, 1)
    assert np.array_equal(tensors["conv1.scale"], conv.channel_scale().detach().numpy())
    assert tensors["conv0.weight"].dtype == np.float32 and tensors["conv0.weight"].shape == (
        3,
        1,
        3,
        3,
    )
    bn = model.layers.bn1
    assert np.array_equal(tensors["bn1.running_var"], bn.running_var.numpy())
    assert {layer.name: layer for layer in spec.layers}["bn1"].eps == bn.eps
    assert set(tensors) == set(spec.expected_tensors())
    assert spec.architecture == "cnn" and spec.labels == LABELS


def test_artifact_size_is_about_one_bit_per_binary_weight():
    model = build_model(MLPConfig(hidden=(256, 256)), SHAPE, 10)
    data = encode_model(model, **parts())
    binary = 64 * 256 + 256 * 256
    full = 256 * 10 + 10 + 2 * 256 + 4 * 2 * 256  # output layer, biases, batchnorm
    header = int.from_bytes(data[:8], "little") + 8
    assert abs((len(data) - header) - (binary / 8 + 4 * full)) <= 0.1 * (binary / 8 + 4 * full)


def test_metadata_round_trips():
    model = build_model(MLPConfig(hidden=(12,)), SHAPE, 10)
    artifact = decode_artifact(encode_model(model, **parts()))
    assert artifact.spec.training == {"epochs": 1}
    assert artifact.spec.provenance == {"dataset": "synthetic", "seed": 0}
    assert artifact.spec.input.integer_valued is True


def test_export_is_deterministic():
    model = build_model(MLPConfig(hidden=(12,)), SHAPE, 10)
    assert encode_model(model, **parts()) == encode_model(model, **parts())


def test_reconstruction_does_not_use_torch_load(tmp_path, monkeypatch):
    model = build_model(MLPConfig(hidden=(12,)), SHAPE, 10)
    export_artifact(model, tmp_path / "m.safetensors", **parts())

    def forbidden(*args, **kwargs):
        raise AssertionError("torch.load must not be used")

    monkeypatch.setattr(torch, "load", forbidden)
    assert isinstance(module_from_artifact(tmp_path / "m.safetensors"), BinaryNet)


def test_input_shape_mismatch_is_a_clear_error():
    model = build_model(MLPConfig(hidden=(12,)), SHAPE, 10)
    with pytest.raises(ValueError, match=r"input_spec.shape \[64\].*\[1, 8, 8\]"):
        to_artifact_parts(model, **parts(input_spec=InputSpec(shape=(64,))))


def test_label_count_mismatch_is_a_clear_error():
    model = build_model(MLPConfig(hidden=(12,)), SHAPE, 10)
    with pytest.raises(InvalidSpecError, match="9 labels"):
        to_artifact_parts(model, **parts(labels=LABELS[:9]))


def test_provenance():
    provenance = collect_provenance(dataset="digits", seed=3)
    assert provenance["torch_version"] == torch.__version__
    assert provenance["dataset"] == "digits" and provenance["seed"] == 3
    revision = code_revision()
    assert revision is None or re.fullmatch(r"[0-9a-f]{40}", revision)


def test_code_revision_outside_git_is_none(tmp_path):
    assert code_revision(tmp_path) is None


# --- v2 graphs: Bi-Real Net and ReActNet -----------------------------------------------------------
RESIDUAL_CASES = [
    pytest.param(BiRealConfig(stem_channels=5, channels=(7, 65), blocks=2), id="birealnet"),
    pytest.param(
        ReActNetConfig(stem_channels=8, channels=(8, 16), blocks=1, scale=True, pad_value=-1.0),
        id="reactnet-scale-pad-1",
    ),
    pytest.param(
        ReActNetConfig(
            stem_channels=6,
            channels=(6, 12),
            blocks=2,
            activation_quantizer="approx_sign",
            kernel_quantizer="swish_sign",
        ),
        id="reactnet-approx-swish",
    ),
]


def residual_inputs() -> torch.Tensor:
    """Random pixels, both integer (digits-like) and real-valued ones."""
    generator = torch.Generator().manual_seed(3)
    integers = torch.randint(0, 17, (16, *SHAPE), generator=generator).float()
    return torch.cat([integers, 4 * torch.randn(16, *SHAPE, generator=generator)])


@pytest.mark.parametrize("config", RESIDUAL_CASES)
def test_residual_graph_round_trips_with_identical_logits(config, tmp_path):
    model = trained_like(build_model(config, SHAPE, 10))
    path = tmp_path / "model.safetensors"
    export_artifact(model, path, **parts())
    artifact = read_artifact(path)
    assert artifact.spec.format_version == 2
    assert {layer.kind for layer in artifact.spec.layers} >= {"add", "avgpool2d"}
    rebuilt = module_from_artifact(artifact)
    assert rebuilt.inputs == model.inputs and rebuilt.graph_spec() == model.graph_spec()
    x = residual_inputs()
    with torch.no_grad():
        expected, got = binary_activations(model, x), binary_activations(rebuilt, x)
    assert len(got) == len(expected) >= 5
    for e, g in zip(expected, got, strict=True):
        assert torch.equal(e, g)  # ±1 activations and the logits: bit for bit
    assert expected[-1].std() > 0.1


@pytest.mark.parametrize("config", RESIDUAL_CASES)
def test_residual_graph_matches_the_eager_reference_interpreter(config):
    """The trained module computes, op for op, the float32 semantics every engine must match."""
    from tests.model.engine.reference import eager_logits

    model = trained_like(build_model(config, SHAPE, 10))
    spec, tensors = to_artifact_parts(model, **parts())
    x = residual_inputs()
    with torch.no_grad():
        logits = model(x).numpy()
    np.testing.assert_array_equal(eager_logits(spec, tensors, x.numpy()), logits)


def test_reactnet_spec_has_rsign_and_rprelu_tensors():
    model = trained_like(build_model(ReActNetConfig(channels=(8, 16), blocks=1), SHAPE, 10))
    spec, tensors = to_artifact_parts(model, **parts())
    layers = {layer.name: layer for layer in spec.layers}
    assert layers["s1b0_rsign"].kind == "shift" and layers["s1b0_conv"].inputs == ()
    np.testing.assert_array_equal(
        tensors["s1b0_rsign.shift"], model.layers.s1b0_rsign.shift.detach().numpy()
    )
    np.testing.assert_array_equal(
        tensors["s1b0_rp.weight"], model.layers.s1b0_rp.weight.detach().numpy()
    )
    assert tensors["s1b0_rp.weight"].dtype == np.float32


def test_plain_chains_still_export_as_format_v1():
    spec, _ = to_artifact_parts(build_model(CNNConfig(channels=(4,), pool=(True,)), SHAPE, 10),
                                **parts())  # fmt: skip
    assert spec.required_format_version() == 1
    assert all(layer.inputs == () for layer in spec.layers)
