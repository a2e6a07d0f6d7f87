"""Architectures: layer order and quantizer placement, configurability, spec conversion, errors."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from torch import nn

from model.errors import InvalidSpecError, UnknownQuantizerError
from model.spec import InputSpec, ModelSpec
from training.architectures import (
    ARCHITECTURES,
    BinaryNet,
    BiRealConfig,
    CNNConfig,
    MLPConfig,
    ReActNetConfig,
    build_model,
    config_from_dict,
    config_to_dict,
    default_config,
)
from training.layers import BinaryConv2d, BinaryLinear


def kinds(model: BinaryNet) -> list[str]:
    return [layer.kind for layer in model.spec_layers()]


def test_architectures_registry():
    assert list(ARCHITECTURES) == ["mlp", "cnn", "birealnet", "reactnet"]
    assert ARCHITECTURES["mlp"] is MLPConfig and ARCHITECTURES["cnn"] is CNNConfig
    assert ARCHITECTURES["birealnet"] is BiRealConfig
    assert ARCHITECTURES["reactnet"] is ReActNetConfig


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


# --- residual graphs ------------------------------------------------------------------------------
def residual(config, shape=(1, 8, 8)) -> BinaryNet:
    return build_model(config, shape, 10)


def test_birealnet_wraps_every_binary_conv_in_a_shortcut():
    model = residual(BiRealConfig(stem_channels=4, channels=(4, 8), blocks=2))
    spec = model.graph_spec()
    layers = {layer.name: layer for layer in spec.layers}
    sources = dict(zip(layers, spec.layer_inputs(), strict=True))
    binary = [n for n, layer in layers.items() if getattr(layer, "kernel_quantizer", None)]
    assert binary == ["s0b0_conv", "s0b1_conv", "s1b0_conv", "s1b1_conv"]
    for conv in binary:
        tag = conv.removesuffix("_conv")
        assert layers[conv].kernel_size == (3, 3) and layers[conv].input_quantizer == "ste_sign"
        assert sources[f"{tag}_bn"] == (conv,)
        assert sources[f"{tag}_add"][0] == f"{tag}_bn"
    # identity shortcut: the block's own input
    assert sources["s0b1_add"] == ("s0b1_bn", "s0b0_add")
    assert sources["s0b1_conv"] == ("s0b0_add",)
    # downsampling: avgpool 2×2 → full-precision conv 1×1 → BN, from the block input
    assert sources["s1b0_pool"] == ("s0b1_add",) and layers["s1b0_conv"].stride == (2, 2)
    assert layers["s1b0_pool"].kind == "avgpool2d" and layers["s1b0_pool"].kernel_size == (2, 2)
    down = layers["s1b0_down"]
    assert (down.kernel_size, down.kernel_quantizer, down.input_quantizer) == ((1, 1), None, None)
    assert sources["s1b0_add"] == ("s1b0_bn", "s1b0_down_bn")
    # full-precision stem and classifier
    assert layers["stem"].kernel_quantizer is None and layers["output"].kernel_quantizer is None
    assert [layers[n].kind for n in list(layers)[-2:]] == ["global_avgpool2d", "dense"]
    assert layers["output"].input_quantizer is None
    assert model.spec_shapes()[-2] == ((8, 4, 4), (8,))


def test_reactnet_adds_rsign_before_every_sign_and_rprelu_after_every_sum():
    model = residual(ReActNetConfig(stem_channels=4, channels=(4, 8), blocks=1))
    spec = model.graph_spec()
    layers = {layer.name: layer for layer in spec.layers}
    sources = dict(zip(layers, spec.layer_inputs(), strict=True))
    for tag in ("s0b0", "s1b0"):
        assert layers[f"{tag}_rsign"].kind == "shift"
        assert sources[f"{tag}_conv"] == (f"{tag}_rsign",)
        chain = [f"{tag}_add", f"{tag}_rp_in", f"{tag}_rp", f"{tag}_rp_out"]
        assert [layers[n].kind for n in chain] == ["add", "shift", "prelu", "shift"]
        assert [sources[n] for n in chain[1:]] == [(n,) for n in chain[:-1]]
    assert sources["s1b0_rsign"] == ("s0b0_rp_out",)
    assert sources["s1b0_pool"] == ("s0b0_rp_out",)


def test_residual_width_change_without_stride_uses_a_plain_1x1_shortcut():
    model = residual(BiRealConfig(stem_channels=4, channels=(6,), blocks=1))
    kinds_by_name = {layer.name: layer.kind for layer in model.spec_layers()}
    assert "s0b0_pool" not in kinds_by_name and kinds_by_name["s0b0_down"] == "conv2d"


@pytest.mark.parametrize("config_class", [BiRealConfig, ReActNetConfig])
def test_residual_nets_train_a_step(config_class):
    torch.manual_seed(0)
    model = residual(config_class(stem_channels=4, channels=(4, 8), blocks=1))
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 10, (6,))
    loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    assert all(g is not None and torch.isfinite(g).all() for g in grads.values())
    assert grads["layers.s0b0_conv.weight"].abs().sum() > 0  # the STE passes gradients


def test_residual_downsampling_needs_even_sizes():
    with pytest.raises(ValueError, match="stage 1 downsamples a 7x7 map; expected even"):
        residual(BiRealConfig(channels=(4, 8)), shape=(1, 7, 7))
    with pytest.raises(ValueError, match="expected an image input shape"):
        residual(BiRealConfig(), shape=(64,))


@pytest.mark.parametrize(
    ("field", "value"), [("blocks", 0), ("stem_kernel", 2), ("channels", ()), ("stem_stride", 0)]
)
def test_residual_config_rejects_bad_sizes(field, value):
    with pytest.raises(ValueError, match=field):
        ReActNetConfig(**{field: value})


def test_residual_defaults_per_dataset():
    assert default_config("birealnet", "fashion").channels == (32, 64, 128)
    assert default_config("reactnet", "digits").channels == (32, 64)
    assert default_config("reactnet", "npz") == default_config("reactnet", "mnist")
    for dataset, shape in (("digits", (1, 8, 8)), ("fashion", (1, 28, 28)), ("npz", (3, 32, 32))):
        build_model(default_config("reactnet", dataset), shape, 10)


def test_residual_config_dict_round_trip():
    config = ReActNetConfig(channels=(8, 16), blocks=3, scale=True)
    assert config_from_dict(config_to_dict(config)) == config
    assert config_to_dict(config)["arch"] == "reactnet"


def test_graph_with_a_dangling_input_is_a_named_error():
    from model.errors import DanglingInputError

    layers = [("flatten", nn.Flatten()), ("output", BinaryLinear(64, 10, kernel_quantizer=None))]
    with pytest.raises(DanglingInputError, match="'nowhere' names no layer"):
        BinaryNet(layers, architecture="x", input_shape=(1, 8, 8), num_classes=10,
                  inputs={"output": ("nowhere",)})  # fmt: skip


def test_graph_forward_releases_values_after_their_last_use():
    model = residual(BiRealConfig(stem_channels=4, channels=(4, 8), blocks=1)).eval()
    frees = {name: done for name, _, done in model._plan}
    assert frees["s0b0_add"] == ("s0b0_bn", "stem_bn")  # stem_bn's last reader
    assert frees["s1b0_down"] == ("s1b0_pool",)
    freed = [name for done in frees.values() for name in done]
    assert len(freed) == len(set(freed)) == len(frees)  # each once: "@input", all but the output


@pytest.mark.slow  # two epochs on digits: about 10 s of CPU each
@pytest.mark.parametrize("arch", ["birealnet", "reactnet"])
def test_tiny_residual_nets_train_on_digits_through_the_loop_and_export(arch, tmp_path):
    from training.config import TrainConfig
    from training.export import export_artifact, module_from_artifact
    from training.loop import train

    config = ARCHITECTURES[arch](stem_channels=4, channels=(4, 8), blocks=1)
    result = train(TrainConfig(arch=arch, model=config, epochs=2, progress=False))
    assert result.metrics["test_accuracy"] > 0.2  # 10 classes: chance is 0.1
    path = tmp_path / "model.safetensors"
    export_artifact(result.model, path, name="m", input_spec=InputSpec(shape=(1, 8, 8)),
                    labels=[str(i) for i in range(10)])  # fmt: skip
    x = torch.from_numpy(result.data.test.x[:50]).float()
    with torch.no_grad():
        assert torch.equal(module_from_artifact(path)(x), result.model.eval()(x))


def test_residual_recipes_build_their_models_at_their_data_shapes():
    from training.recipes import RECIPES

    shapes = {"digits": (1, 8, 8), "fashion": (1, 28, 28)}
    residual = {k: v for k, v in RECIPES.items() if k[0] in ("birealnet", "reactnet")}
    assert {(arch, dataset) for arch, dataset, _ in residual} == {
        (arch, dataset) for arch in ("birealnet", "reactnet") for dataset in shapes
    }
    for (arch, dataset, name), recipe in residual.items():
        assert name in ("fast", "full") and recipe.epochs > 0 and recipe.lr > 0
        config = replace(default_config(arch, dataset), **dict(recipe.model))
        model = build_model(config, shapes[dataset], 10)
        assert model.spec_shapes()[-1][1] == (10,)
