"""experiments/real_parent.py on a tiny ChatML GGUF parent: the cascade's rows plus task scores through the
chat template, cached per stage."""
import os
import re
import shlex

import pytest

import cascade as C
from experiments import real_parent as R
from test_gguf import ROOT, real_path, tiny_parent_gguf

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.slow
def test_real_parent_rows_get_task_scores_and_samples(tmp_path):
    parent, _ = tiny_parent_gguf(tmp_path / "p.gguf")
    out = tmp_path / "run"
    argv = ["--parent", str(parent), "--preset", "cpu-real", "--size", "8b", "--short-steps", "2", "--long-steps", "1",
            "--seq-len", "32", "--long-seq-len", "128", "--batch-size", "2", "--micro-batch-size", "2",
            "--calib-seqs", "4", "--eval-batches", "1", "--math-problems", "3", "--math-new-tokens", "3",
            "--out", str(out)]
    result = R.run_real_parent(*C.parse_args(argv, R.TaskConfig))
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == ["parent", *(f"{s} {k}" for s in ("14b", "8b") for k in ("pruned", "short", "base"))]
    for name, r in rows.items():
        scored = not name.endswith("short")
        assert ("families" in r) == scored and (len(r.get("samples", [])) == 3) == scored, name
        if scored:
            assert {f: v["total"] for f, v in r["families"].items()} == {"sums": 3, "word sums": 81, "capitals": 42}
    table = (out / "results" / "table.md").read_text()
    assert "| sums | word sums | capitals |" in table and "## Sample answers" in table
    assert "What is the capital of France?" in table and "the Python corpus alone" in table
    cell = R.family_cell("capitals", rows["parent"])
    child = rows["8b base"] | {"families": {"capitals": {"correct": 3, "total": 42}}}
    parent = rows["parent"] | {"families": {"capitals": {"correct": 6, "total": 42}}}
    assert R.family_cell("capitals", parent)(child) == "3/42 (50% of parent)" and R.family_cell("capitals", parent)(parent) == "6/42"
    assert cell(rows["8b short"]) == ""
    stamp = os.path.getmtime(out / "8b" / "long" / "tasks.json")
    R.run_real_parent(*C.parse_args(argv, R.TaskConfig))  # a rerun reads the cached scores
    assert os.path.getmtime(out / "8b" / "long" / "tasks.json") == stamp
    R.run_real_parent(*C.parse_args(argv[:-4] + ["--math-new-tokens", "2", "--out", str(out)], R.TaskConfig))
    assert os.path.getmtime(out / "8b" / "long" / "tasks.json") > stamp  # another setting recomputes them


@pytest.mark.slow
def test_real_file_gpu_real_runs_pass_the_data_checks():
    """The gpu-real preset, alone and as benchmarks/gpu_check.sh's cascade step runs it (its arguments read
    from the script), has the training and held-out tokens it asks for on the corpus and on the chat mix:
    a GPU's minutes must not go to a data error."""
    path = real_path()
    with open(os.path.join(ROOT, "benchmarks", "gpu_check.sh")) as f:
        script = f.read()
    step = re.search(r"experiments/real_parent\.py (.*?)\n(?!\s)", script.split("else\n", 1)[1], re.S).group(1)
    step = shlex.split(step.replace("\\\n", " ").replace('"$OUT_DIR', '"/tmp/unused'))
    gpu_check = [path if a == "smollm2" else a for a in step]
    mix = ["--chat-data", os.path.join(ROOT, "benchmarks/smollm2/mix/chat_mix.jsonl"), "--chat-share", "0.5"]
    for argv in (gpu_check, ["--parent", path, "--preset", "gpu-real"], ["--parent", path, "--preset", "gpu-real", *mix]):
        cfg, preset = C.resolved(C.parse_args(argv, R.TaskConfig)[0])
        plan = C.make_plan(cfg, preset)
        tok, train, val, test, _ = C.load_data(cfg, preset, plan)
        C.check_data(cfg, len(train), len(val), len(test), world=1)
