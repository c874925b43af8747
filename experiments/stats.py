"""Paired before/after comparisons on the same held-out problems: the flips and their exact sign test."""

import math


def paired_flips(before: list, after: list) -> dict:
    """The same held-out problems scored before and after training (per-problem right/wrong): how many went
    wrong -> right and right -> wrong, and the two-sided exact sign test of those flips."""
    gained = sum(b and not a for a, b in zip(before, after, strict=True))
    lost = sum(a and not b for a, b in zip(before, after, strict=True))
    return {"wrong_to_right": gained, "right_to_wrong": lost, "sign_test_p": sign_test(gained, lost)}


def sign_test(k: int, m: int) -> float:
    """Two-sided exact sign test of k successes against m failures (paired flips), p under a fair coin."""
    n = k + m
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(0, min(k, m) + 1)) / 2 ** n
    return min(1.0, 2 * tail)
