"""Bit packing: round trips, the documented bit layout, and the XOR-popcount identity."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from model.packing import pack_signs, packed_shape, unpack_signs, words_for


def random_signs(rng, shape):
    return np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)


@pytest.mark.parametrize(
    ("length", "words"), [(0, 0), (1, 1), (63, 1), (64, 1), (65, 2), (784, 13)]
)
def test_words_for_rounds_up(length, words):
    assert words_for(length) == words


def test_bit_layout_is_little_endian_with_one_meaning_minus_one():
    values = np.ones(70, dtype=np.float32)
    values[[0, 3, 64, 69]] = -1
    words = pack_signs(values)
    assert words.dtype == np.uint64
    assert words.tolist() == [(1 << 0) | (1 << 3), (1 << 0) | (1 << 5)]


def test_zero_packs_as_plus_one_and_negative_zero_as_minus_one():
    words = pack_signs(np.array([0.0, -0.0, 2.0, -3.0], dtype=np.float32))
    assert words.tolist() == [0b1010]


def test_padding_bits_of_the_last_word_are_zero():
    words = pack_signs(-np.ones(65, dtype=np.float32))
    assert words[0] == np.uint64(2**64 - 1)
    assert words[1] == np.uint64(1)


def test_pack_along_an_inner_axis_moves_it_last():
    rng = np.random.default_rng(0)
    weights = random_signs(rng, (5, 70, 3, 3))  # (out, in, kh, kw)
    words = pack_signs(weights, axis=1)
    assert words.shape == packed_shape(weights.shape, 1) == (5, 3, 3, 2)
    np.testing.assert_array_equal(words[2, 1, 0], pack_signs(weights[2, :, 1, 0]))
    np.testing.assert_array_equal(unpack_signs(words, 70, axis=1), weights)


def test_unpack_rejects_a_word_count_that_does_not_match_the_length():
    with pytest.raises(ValueError, match="expected 2 words for 70 bits, got 1"):
        unpack_signs(np.zeros((3, 1), dtype=np.uint64), 70)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        np.float32,
        hnp.array_shapes(min_dims=1, max_dims=3, max_side=150),
        elements=st.sampled_from([-1.0, 1.0]),
    ),
    st.data(),
)
def test_pack_unpack_round_trip(values, data):
    axis = data.draw(st.integers(0, values.ndim - 1))
    words = pack_signs(values, axis=axis)
    np.testing.assert_array_equal(unpack_signs(words, values.shape[axis], axis=axis), values)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 300), st.integers(0, 2**32 - 1))
def test_dot_product_equals_length_minus_twice_popcount_of_xor(length, seed):
    rng = np.random.default_rng(seed)
    a, w = random_signs(rng, length), random_signs(rng, length)
    xor = pack_signs(a) ^ pack_signs(w)
    popcount = sum(bin(int(word)).count("1") for word in xor)
    assert int(a @ w) == length - 2 * popcount
