"""Batch augmentation: random crops of zero-padded images and flips, seeded, integers kept."""

from __future__ import annotations

import pytest
import torch

from training.augment import Augmentation, crop_and_flip


def marked_images(n: int, channels: int = 2, size: int = 5) -> torch.Tensor:
    """n images with one bright pixel per channel just right of the centre (asymmetric, so a
    flip shows): channel k holds k + 1 at (size // 2, size // 2 + 1)."""
    x = torch.zeros(n, channels, size, size)
    for k in range(channels):
        x[:, k, size // 2, size // 2 + 1] = k + 1.0
    return x


def moves(x: torch.Tensor, out: torch.Tensor) -> set[tuple[int, int]]:
    """The (row, col) displacement of each image's marked pixel; both channels move together."""
    (r0, c0), = torch.nonzero(x[0, 0]).tolist()  # fmt: skip
    seen = set()
    for image in out:
        (row, col), = torch.nonzero(image[0]).tolist()  # fmt: skip
        assert image[1, row, col] == 2.0 and image.sum() == 3.0  # the other channel moved too
        seen.add((row - r0, col - c0))
    return seen


def test_crop_with_padding_shifts_each_image_by_at_most_the_padding():
    x = marked_images(256)
    out = crop_and_flip(x, 1, False, torch.Generator().manual_seed(0))
    assert out.shape == x.shape
    assert moves(x, out) == {(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)}


def test_flip_mirrors_about_half_of_the_images_and_keeps_the_rest():
    x = marked_images(256)
    out = crop_and_flip(x, 0, True, torch.Generator().manual_seed(0))
    # The pixel at column 3 of 5 lands on column 1 when mirrored: a move of −2.
    flipped = [bool(image[0, 2, 1]) for image in out]
    assert moves(x, out) == {(0, 0), (0, -2)}
    assert 0.4 < sum(flipped) / len(flipped) < 0.6
    mirror = x.flip(-1)
    for image, was_flipped in zip(out, flipped, strict=True):
        assert torch.equal(image, mirror[0] if was_flipped else x[0])


def test_crop_and_flip_together_reach_every_offset_both_ways():
    x = marked_images(1024, size=7)
    out = crop_and_flip(x, 2, True, torch.Generator().manual_seed(1))
    shifts = {(dy, dx) for dy in range(-2, 3) for dx in range(-2, 3)}
    assert moves(x, out) == shifts | {(dy, dx - 2) for dy, dx in shifts}


def test_integer_pixels_stay_integers_in_their_range():
    x = torch.randint(0, 256, (64, 1, 28, 28), generator=torch.Generator().manual_seed(3)).float()
    out = Augmentation(crop_padding=4, flip=True)(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32 and out.shape == (64, 1, 28, 28)
    assert torch.equal(out, out.round()) and out.min() >= 0 and out.max() <= 255
    assert set(out.unique().tolist()) <= set(x.unique().tolist()) | {0.0}  # moved or 0, no blend


def test_same_seed_same_batch_other_seed_other_batch():
    x = torch.arange(32 * 3 * 8 * 8, dtype=torch.float32).reshape(32, 3, 8, 8)
    augment = Augmentation(crop_padding=2, flip=True)
    a = augment(x, torch.Generator().manual_seed(5))
    b = augment(x, torch.Generator().manual_seed(5))
    c = augment(x, torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_no_augmentation_returns_the_batch_itself():
    x = torch.ones(4, 1, 3, 3)
    assert Augmentation()(x, torch.Generator()) is x
    assert not Augmentation().enabled and Augmentation(flip=True).enabled


def test_negative_padding_is_refused():
    with pytest.raises(ValueError, match="crop_padding must be ≥ 0, got -1"):
        Augmentation(crop_padding=-1)
