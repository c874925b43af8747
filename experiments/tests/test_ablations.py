"""experiments/ablations.py at the smoke size: the variants' runs, shared stages, the table's spread."""
import json

import pytest

import cascade as C
from experiments import ablations as A

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layer_selection_ablation_smoke(tmp_path):
    out = tmp_path / "run"
    argv = ["--preset", "smoke", "--eval-batches", "2", "--short-steps", "4", "--parent-steps", "20",
            "--ablation", "layer_selection", "--ablation-seeds", "2", "--out", str(out)]
    results = A.run_ablation(*C.parse_args(argv, A.AblationConfig))
    assert list(results) == ["norm_ratio", "block_influence", "random", "last_k"]
    assert all(len(runs) == 2 for runs in results.values())
    # two rules that drop the same layers (same seed) share one distilled child and so one result
    for s in range(2):
        same = [v for v in results if results[v][s]["dropped_layers"] == results["norm_ratio"][s]["dropped_layers"]]
        stages = {results[v][s]["distilled_stage"] for v in same}
        assert len(stages) == 1 and len({results[v][s]["distilled"]["ce"] for v in same}) == 1
    # every distilled child is closer to its parent than its pruned start
    for runs in results.values():
        assert all(r["distilled"]["kl"] < r["pruned"]["kl"] for r in runs)
    table = (out / "results" / "ablation_layer_selection_smoke.md").read_text()
    assert "| norm_ratio |" in table and " ± " in table and "Command:" in table
    rec = json.loads((out / "results" / "ablation_layer_selection_smoke.json").read_text())
    assert rec["config"]["ablation"] == "layer_selection" and rec["run"]["commit"]


def test_bad_ablation_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        A.main(["--preset", "smoke", "--ablation", "nope", "--out", str(tmp_path / "o")])
    assert e.value.code == 2 and "--ablation 'nope' is unknown" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()
