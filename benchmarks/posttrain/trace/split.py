"""Trace the post-training rows' change across the redesign: run experiments/posttrain.py with the
question split it replaced (`--split old`), that split with its held-out problems in the order drawn
(`--split old-unsorted`), or the current one (`--split new`), all else equal.

Before the redesign the chain split by question with numpy (default_rng(seed).shuffle of the sorted
questions, the held-out problems sorted by question text, so the first --post-eval-problems scored were the
alphabetically first ones); data.split_by_question shuffles with random.Random(seed) and keeps the order
drawn. Run: `python benchmarks/posttrain/trace/split.py --split old --size 14b --out runs/trace-old
--results runs/trace-old/results` (every other flag as experiments/posttrain.py takes it).
"""
import argparse
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
sys.path.insert(0, ROOT)

import data as D  # noqa: E402
from experiments import posttrain  # noqa: E402


def old_split(problems: list, n_held: int, seed: int = 0, sort_held: bool = True) -> tuple:
    """The split as the chain made it before the redesign; sort_held=False keeps its held-out problems in
    the order drawn (the same training pool, the scored problems drawn at random from its held-out set)."""
    questions = sorted({p["question"] for p in problems})
    np.random.default_rng(seed).shuffle(questions)
    held_q = questions[:n_held]
    one = {p["question"]: p for p in problems}
    held = sorted((one[q] for q in held_q), key=lambda p: p["question"]) if sort_held else [one[q] for q in held_q]
    return [p for p in problems if p["question"] not in set(held_q)], held


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="experiments/posttrain.py with a chosen question split; every "
                                             "other flag goes to posttrain.py")
    ap.add_argument("--split", required=True, choices=("old", "old-unsorted", "new"))
    a, rest = ap.parse_known_args()
    if a.split != "new":
        D.split_by_question = lambda p, n, seed=0: old_split(p, n, seed, sort_held=a.split == "old")
    posttrain.main(rest)
