"""The experiments' one plotting style: matplotlib's object-oriented API (Agg, no display, no global
backend), figures written to a temporary name and renamed; and the reader of a stage's training curve."""

import json
import os

from matplotlib.figure import Figure


def figure(cols: int, width: float = 13, height: float = 5.2):
    """(fig, axes): one row of `cols` panels, laid out by matplotlib's constrained layout."""
    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, cols)
    return fig, (axes if cols > 1 else [axes])


def save(fig, path: str, dpi: int = 110):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=dpi)
    os.replace(tmp, path)


def read_metrics(stage_dir: str, key: str = "loss") -> list:
    """[(step, value)] of a stage's metrics.jsonl. A resumed stage replays the steps after its last
    checkpoint; the last record of each step wins, so a curve never doubles back."""
    path = os.path.join(stage_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if key in r:
                    by_step[r["step"]] = r[key]
    return sorted(by_step.items())
