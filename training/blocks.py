"""Full-precision graph modules of format v2: per-channel shift, sum, concatenation, global pool.

Each computes, in float32, exactly the eager semantics :mod:`model.spec` gives its layer kind
(the same torch op as the engine tests' reference interpreter), so an exported graph is what
was trained:

=========================  =====================  =============================================
module                     spec layer             forward
=========================  =====================  =============================================
:class:`Shift`             ``shift``              y = x + shift[c]
``nn.PReLU(C)``            ``prelu``              y = x if x ≥ 0 else weight[c]·x (``F.prelu``)
``nn.AvgPool2d(k, s)``     ``avgpool2d``          ``F.avg_pool2d(x, k, s)``, no padding
:class:`GlobalAvgPool2d`   ``global_avgpool2d``   y[c] = mean_{h,w} x[c, h, w]
:class:`Add`               ``add``                y = ((x₁ + x₂) + x₃) + …, in input order
:class:`Concat`            ``concat``             ``torch.cat((x₁, x₂, …), dim=1)``
=========================  =====================  =============================================

ReActNet (Liu et al. 2020) builds its RSign from a :class:`Shift` before a sign — the binary
layer's input quantizer — so sign(x + β_c) learns a per-channel threshold, and its RPReLU as
shift(γ) → PReLU(β) → shift(ζ).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class Shift(nn.Module):
    """y = x + shift[c] on (batch, C) or (batch, C, H, W); ``shift`` starts at 0 (identity)."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features
        self.shift = nn.Parameter(torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.shift.view(1, -1, *([1] * (x.dim() - 2)))

    def extra_repr(self) -> str:
        return str(self.num_features)


class GlobalAvgPool2d(nn.Module):
    """(batch, C, H, W) → (batch, C): the mean over H·W per channel, ``x.mean((2, 3))``."""

    def forward(self, x: Tensor) -> Tensor:
        return x.mean((2, 3))


class Add(nn.Module):
    """The elementwise sum of two or more tensors of one shape, left to right (a residual
    shortcut); float addition is not associative, so the order is the spec's."""

    def forward(self, *xs: Tensor) -> Tensor:
        total = xs[0]
        for x in xs[1:]:
            total = total + x
        return total


class Concat(nn.Module):
    """Two or more tensors joined along the channel axis (BinaryDenseNet's dense join)."""

    def forward(self, *xs: Tensor) -> Tensor:
        return torch.cat(xs, dim=1)
