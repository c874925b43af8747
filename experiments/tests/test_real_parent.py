"""experiments/real_parent.py on a tiny ChatML GGUF parent: the cascade's rows plus task scores through the
chat template, cached per stage."""
import os

import pytest

import cascade as C
from experiments import real_parent as R
from test_gguf import tiny_parent_gguf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_real_parent_rows_get_task_scores_and_samples(tmp_path):
    parent, _ = tiny_parent_gguf(tmp_path / "p.gguf")
    out = tmp_path / "run"
    argv = ["--parent", str(parent), "--preset", "cpu-real", "--size", "8b", "--short-steps", "2", "--long-steps", "1",
            "--seq-len", "32", "--long-seq-len", "64", "--batch-size", "2", "--micro-batch-size", "2",
            "--calib-seqs", "4", "--eval-batches", "1", "--math-problems", "3", "--math-new-tokens", "3",
            "--out", str(out)]
    result = R.run_real_parent(*C.parse_args(argv, R.TaskConfig))
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == ["parent", *(f"{s} {k}" for s in ("14b", "8b") for k in ("pruned", "short", "base"))]
    for name, r in rows.items():
        scored = not name.endswith("short")
        assert ("math_total" in r) == scored and (len(r.get("samples", [])) == 3) == scored, name
    table = (out / "results" / "table.md").read_text()
    assert "math exact" in table and "## Sample answers" in table and "What is the capital of France?" in table
    stamp = os.path.getmtime(out / "8b" / "long" / "tasks.json")
    R.run_real_parent(*C.parse_args(argv, R.TaskConfig))  # a rerun reads the cached scores
    assert os.path.getmtime(out / "8b" / "long" / "tasks.json") == stamp
    R.run_real_parent(*C.parse_args(argv[:-4] + ["--math-new-tokens", "2", "--out", str(out)], R.TaskConfig))
    assert os.path.getmtime(out / "8b" / "long" / "tasks.json") > stamp  # another setting recomputes them
