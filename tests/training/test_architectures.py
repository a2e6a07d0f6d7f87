"""Architectures: layer order and quantizer placement, configurability, spec conversion, errors."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from model.errors import InvalidSpecError, UnknownQuantizerError
from model.spec import InputSpec, ModelSpec
from training.architectures import (
    ARCHITECTURES,
    BinaryNet,
    CNNConfig,
    MLPConfig,
    build_model,
    config_from_dict,
    config_to_dict,
    default_config,
)
from training.layers import BinaryConv2d, BinaryLinear


def kinds(model: BinaryNet) -> list[str]:
    return [layer.kind for layer in model.spec_layers()]


def test_architectures_registry():
    assert list(ARCHITECTURES) == ["mlp", "cnn"]
    assert ARCHITECTURES["mlp"] is MLPConfig and ARCHITECTURES["cnn"] is CNNConfig


def test_mlp_is_binarynet_style():
    model = build_model(
        MLPConfig(hidden=(30, 20), activation_quantizer="approx_sign"), (1, 8, 8), 10
    )
    assert kinds(model) == ["flatten", "dense", "batchnorm", "dense", "batchnorm", "dense"]
    first, hidden, output = (m for m in model.layers if isinstance(m, BinaryLinear))
    assert (first.in_features, first.input_quantizer_name, first.kernel_quantizer_name) == (
        64, None, "ste_sign",
    )  # fmt: skip
    assert (hidden.in_features, hidden.out_features) == (30, 20)
    assert (hidden.input_quantizer_name, hidden.kernel_quantizer_name) == (
        "approx_sign",
        "ste_sign",
    )
    # Full-precision output layer on binarized input.
    assert (output.input_quantizer_name, output.kernel_quantizer_name) == ("approx_sign", None)
    assert output.bias is not None and output.out_features == 10


def test_mlp_scale_applies_to_binary_weight_layers_only():
    model = build_model(MLPConfig(hidden=(8, 8), scale=True), (64,), 3)
    scaled = [m.scale for m in model.layers if isinstance(m, BinaryLinear)]
    assert scaled == [True, True, False]


def test_mlp_paper_size_builds():
    model = build_model(MLPConfig(hidden=(4096, 4096, 4096)), (1, 28, 28), 10)
    dense = [m for m in model.layers if isinstance(m, BinaryLinear)]
    assert [(m.in_features, m.out_features) for m in dense] == [
        (784, 4096), (4096, 4096), (4096, 4096), (4096, 10),
    ]  # fmt: skip


def test_cnn_order_is_conv_pool_batchnorm():
    config = CNNConfig(stem_channels=4, channels=(6, 8), pool=(True, False), hidden=(12,))
    model = build_model(config, (1, 8, 8), 10)
    assert list(model.layers._modules) == [
        "conv0", "bn0", "conv1", "pool1", "bn1", "conv2", "bn2",
        "flatten", "dense1", "bn_dense1", "output",
    ]  # fmt: skip
    assert kinds(model)[:4] == ["conv2d", "batchnorm", "conv2d", "maxpool2d"]
    assert model.spec_shapes()[-4] == ((8, 4, 4), (128,))  # flatten


def test_cnn_stem_is_full_precision_and_binary_convs_pad_with_pad_value():
    model = build_model(CNNConfig(pad_value=-1.0), (1, 8, 8), 10)
    convs = [m for m in model.layers if isinstance(m, BinaryConv2d)]
    stem, binary = convs[0], convs[1:]
    assert (stem.input_quantizer_name, stem.kernel_quantizer_name, stem.pad_value) == (
        None,
        None,
        0.0,
    )
    assert all(c.pad_value == -1.0 and c.input_quantizer_name == "ste_sign" for c in binary)
    assert all(c.kernel_quantizer_name == "ste_sign" for c in binary)
    output = model.layers.output
    assert (output.input_quantizer_name, output.kernel_quantizer_name) == ("ste_sign", None)


def test_cifar_shaped_cnn_builds_and_runs():
    config = CNNConfig(
        stem_channels=128, channels=(128, 256, 256, 256), pool=(True, False, True, True),
        hidden=(256,), scale=True,
    )  # fmt: skip
    model = build_model(config, (3, 32, 32), 10).eval()
    assert model.spec_shapes()[-1][1] == (10,)
    flatten_in = dict(zip(list(model.layers._modules), model.spec_shapes(), strict=True))["flatten"]
    assert flatten_in == ((256, 4, 4), (4096,))
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("dataset, shape", [("digits", (1, 8, 8)), ("mnist", (1, 28, 28))])
def test_default_configs_build_and_run(arch, dataset, shape):
    config = default_config(arch, dataset)
    assert isinstance(config, ARCHITECTURES[arch])
    model = build_model(config, shape, 10)
    assert model.config is config and model.architecture == arch
    assert model(torch.rand(3, *shape) * 16).shape == (3, 10)


def test_default_config_fashion_equals_mnist_and_unknown_falls_back_to_digits():
    assert default_config("cnn", "fashion") == default_config("cnn", "mnist")
    assert default_config("mlp", "npz") == default_config("mlp", "digits")


def test_spec_layers_validate_as_a_model_spec():
    model = build_model(default_config("cnn"), (1, 8, 8), 10)
    spec = ModelSpec(
        name="m",
        architecture="cnn",
        input=InputSpec(shape=(1, 8, 8)),
        labels=tuple("0123456789"),
        layers=model.spec_layers(),
    )
    spec.validate()
    assert ModelSpec.from_json(spec.to_json()).layers == spec.layers


def test_config_dict_round_trip():
    config = CNNConfig(channels=(5, 7), pool=(True, True), hidden=(9,), scale=True)
    doc = config_to_dict(config)
    assert doc["arch"] == "cnn" and doc["channels"] == [5, 7]
    assert config_from_dict(doc) == config


# --- errors --------------------------------------------------------------------------------------
def test_unknown_architecture():
    with pytest.raises(ValueError, match="unknown architecture 'rnn'.*'cnn', 'mlp'"):
        default_config("rnn")


def test_config_from_dict_rejects_unknown_fields():
    with pytest.raises(ValueError, match=r"MLPConfig: unknown fields \['depth'\]"):
        config_from_dict({"arch": "mlp", "depth": 3})


def test_pool_flags_must_match_channels():
    with pytest.raises(ValueError, match="pool has 1 entries but channels has 2"):
        CNNConfig(channels=(8, 8), pool=(True,))


@pytest.mark.parametrize("hidden", [(), (0, 4), (4.0,)])
def test_bad_mlp_widths(hidden):
    with pytest.raises(ValueError, match="hidden"):
        MLPConfig(hidden=hidden)


def test_bad_quantizers_in_config():
    with pytest.raises(UnknownQuantizerError, match="'sgn'"):
        MLPConfig(activation_quantizer="sgn")
    with pytest.raises(InvalidSpecError, match="stochastic_binary"):
        CNNConfig(kernel_quantizer="stochastic_binary")


def test_bad_pad_value_in_config():
    with pytest.raises(InvalidSpecError, match="pad_value=0.0"):
        build_model(CNNConfig(pad_value=0.0), (1, 8, 8), 10)


def test_too_much_pooling_for_the_input_names_the_layer():
    config = CNNConfig(channels=(4, 4, 4, 4), pool=(True, True, True, True))
    with pytest.raises(InvalidSpecError, match="pool4.*does not fit input 1x1"):
        build_model(config, (1, 8, 8), 10)


def test_cnn_needs_an_image_input():
    with pytest.raises(ValueError, match=r"\(C, H, W\), got \[64\]"):
        build_model(CNNConfig(), (64,), 10)


def test_binarynet_rejects_modules_without_a_spec_kind():
    with pytest.raises(TypeError, match="'act': ReLU"):
        BinaryNet(
            [("flatten", nn.Flatten()), ("act", nn.ReLU())],
            architecture="mlp",
            input_shape=(4,),
            num_classes=4,
        )
