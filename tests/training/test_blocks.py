"""The float graph modules against their formulas, and their spec round trip."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from model.spec import Add, AvgPool2d, Concat, GlobalAvgPool2d, PReLU, Shift
from training import blocks
from training.architectures import module_for_spec, spec_layer


def test_shift_adds_a_per_channel_constant():
    shift = blocks.Shift(3)
    with torch.no_grad():
        shift.shift.copy_(torch.tensor([1.0, -2.0, 0.5]))
    x = torch.randn(2, 3, 4, 5)
    expected = x + torch.tensor([1.0, -2.0, 0.5]).view(1, 3, 1, 1)
    assert torch.equal(shift(x), expected)
    flat = torch.randn(2, 3)
    assert torch.equal(shift(flat), flat + torch.tensor([1.0, -2.0, 0.5]))


def test_shift_starts_as_the_identity_and_learns():
    shift = blocks.Shift(4)
    x = torch.randn(2, 4, 3, 3)
    assert torch.equal(shift(x), x)
    shift(x).sum().backward()
    assert torch.equal(shift.shift.grad, torch.full((4,), 18.0))  # batch·H·W per channel


def test_add_sums_left_to_right():
    """((a + b) + c) differs from a + (b + c) in float32 for these values; Add is the former."""
    a, b, c = torch.tensor([1e8]), torch.tensor([-1e8]), torch.tensor([1.0])
    assert blocks.Add()(a, b, c).item() == 1.0
    assert (a + (b + c)).item() == 0.0


def test_concat_joins_channels_and_global_pool_means_space():
    x, y = torch.randn(2, 3, 4, 4), torch.randn(2, 5, 4, 4)
    assert torch.equal(blocks.Concat()(x, y), torch.cat([x, y], dim=1))
    assert torch.equal(blocks.GlobalAvgPool2d()(x), x.mean((2, 3)))
    assert blocks.GlobalAvgPool2d()(x).shape == (2, 3)


@pytest.mark.parametrize(
    "layer",
    [
        Shift(name="s", num_features=3),
        PReLU(name="p", num_features=3),
        AvgPool2d(name="a", kernel_size=(2, 2), stride=(2, 2)),
        GlobalAvgPool2d(name="g"),
        Add(name="add"),
        Concat(name="cat"),
    ],
    ids=lambda layer: layer.kind,
)
def test_spec_round_trip_of_graph_modules(layer):
    module = module_for_spec(layer, (3, 4, 4))
    assert spec_layer(layer.name, module) == layer


def test_prelu_module_is_torch_prelu_per_channel():
    module = module_for_spec(PReLU(name="p", num_features=2), (2, 3, 3))
    assert isinstance(module, nn.PReLU) and module.weight.shape == (2,)
    x = torch.randn(4, 2, 3, 3)
    assert torch.equal(module(x), F.prelu(x, module.weight))


def test_avgpool_with_padding_has_no_spec_kind():
    with pytest.raises(ValueError, match="only AvgPool2d without padding"):
        spec_layer("p", nn.AvgPool2d(2, 2, padding=1))
    with pytest.raises(ValueError, match="only AvgPool2d without padding"):
        spec_layer("p", nn.AvgPool2d(2, 2, ceil_mode=True))
