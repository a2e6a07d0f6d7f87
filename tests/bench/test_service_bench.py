"""The service benchmark's window arithmetic: a longer run measures more windows, not longer."""

from __future__ import annotations

import pytest

from bench import service


@pytest.mark.parametrize(("duration_s", "rounds"), [(1, 5), (5, 5), (8, 8), (20, 20), (20.4, 20)])
def test_a_longer_duration_measures_more_one_second_windows(duration_s, rounds):
    assert service.rounds_for(duration_s) == rounds
    assert duration_s / rounds <= max(service.WINDOW_S, duration_s / service.ROUNDS)
