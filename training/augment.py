"""Training-time augmentation of image batches: random crops with zero padding and horizontal flips.

Both run on a whole batch at once, on the batch's device, as one gather: for image ``i`` with
offset (dyᵢ, dxᵢ) ∈ [0, 2p]² and flip bit fᵢ, output pixel (r, c) is the zero-padded input's

    padded[i, :, dyᵢ + r, dxᵢ + cᵢ(c)],   cᵢ(c) = W − 1 − c if fᵢ else c

— a random crop of the image padded by ``p`` zeros on each side (equivalently a shift by
(dyᵢ − p, dxᵢ − p), uncovered pixels 0), mirrored left-right where fᵢ = 1. Pixels are only moved
or set to 0, never interpolated, so integer inputs stay integers within their range (0 is the
background of the raw-pixel data sets). The random draws come from a CPU ``torch.Generator``, so a
seed gives the same images on every device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class Augmentation:
    """``crop_padding``: pixels of zero padding before the random crop back to the image size
    (0 = no crop); ``flip``: mirror each image left-right with probability ½."""

    crop_padding: int = 0
    flip: bool = False

    def __post_init__(self) -> None:
        if self.crop_padding < 0:
            raise ValueError(f"crop_padding must be ≥ 0, got {self.crop_padding}")

    @property
    def enabled(self) -> bool:
        return self.crop_padding > 0 or self.flip

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """``x`` (batch, C, H, W) augmented (see the module docstring); ``x`` itself when off."""
        if not self.enabled:
            return x
        return crop_and_flip(x, self.crop_padding, self.flip, generator)


def crop_and_flip(x: Tensor, padding: int, flip: bool, generator: torch.Generator) -> Tensor:
    """A random crop of each zero-padded image of ``x`` (batch, C, H, W), mirrored left-right
    with probability ½ when ``flip``; one draw of offsets and flip bits per image."""
    n, c, h, w = x.shape
    p = padding
    dy = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * p + 1, (n,), generator=generator)
    columns = torch.arange(w).expand(n, w)  # (n, w)
    if flip:
        mirrored = torch.rand(n, generator=generator) < 0.5
        columns = torch.where(mirrored[:, None], w - 1 - columns, columns)
    padded = F.pad(x, (p, p, p, p)) if p else x  # (n, c, h + 2p, w + 2p)
    device = x.device
    rows = (dy[:, None] + torch.arange(h)).to(device)[:, None, :, None]  # (n, 1, h, 1)
    cols = (dx[:, None] + columns).to(device)[:, None, None, :]  # (n, 1, 1, w)
    batch = torch.arange(n, device=device)[:, None, None, None]
    channel = torch.arange(c, device=device)[None, :, None, None]
    return padded[batch, channel, rows, cols]  # (n, c, h, w)
