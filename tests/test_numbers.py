"""dspt.numbers.round_half_up: halves go up, unlike Python's round (halves to even)."""
from __future__ import annotations

import numpy as np
import pytest

from dspt.data.sampling import stratified_split
from dspt.data.splits import split_by_fraction
from dspt.numbers import round_half_up


@pytest.mark.parametrize("x,expected", [(0.5, 1), (1.5, 2), (2.5, 3), (3.5, 4), (0.49, 0), (2.51, 3), (0.0, 0),
                                        (7.0, 7), (12.4999, 12)])
def test_round_half_up(x, expected):
    assert round_half_up(x) == expected and isinstance(round_half_up(x), int)


def test_round_half_up_differs_from_round_on_even_halves():
    assert [round(x) for x in (0.5, 2.5)] == [0, 2]
    assert [round_half_up(x) for x in (0.5, 2.5)] == [1, 3]


def test_the_data_splits_round_halves_up():
    labels = np.zeros(5, dtype=np.int64)
    keep, held = stratified_split(labels, 0.5, seed=0)  # 2.5 images held out -> 3
    assert len(held) == 3 and len(keep) == 2
    parts = split_by_fraction(list("abcde"), (0.5, 0.5), np.random.default_rng(0), "class 'x'")
    assert [len(p) for p in parts] == [3, 2]
