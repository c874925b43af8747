"""experiments/stats.py: paired flips and the exact sign test."""
import math

import pytest

from experiments.stats import paired_flips, sign_test


def test_paired_flips_count_each_direction():
    start = [True, True, False, False, False, True]
    after = [True, False, True, True, False, True]
    got = paired_flips(start, after)
    assert (got["wrong_to_right"], got["right_to_wrong"]) == (2, 1)
    assert got["sign_test_p"] == pytest.approx(1.0)  # 2 vs 1: two-sided tail 2 * (1 + 3) / 8, capped at 1
    assert paired_flips([False] * 10, [True] * 10)["sign_test_p"] == pytest.approx(2 / 2 ** 10)
    with pytest.raises(ValueError):
        paired_flips([True], [True, False])  # rows scored on different problem counts


def test_sign_test_matches_the_binomial_tail():
    assert sign_test(10, 5) == pytest.approx(2 * sum(math.comb(15, i) for i in range(6)) / 2 ** 15)
    assert sign_test(5, 10) == sign_test(10, 5)
    assert sign_test(0, 0) == 1.0 and sign_test(3, 3) == 1.0
    assert sign_test(20, 0) == pytest.approx(2 / 2 ** 20)
