"""experiments/demo.py at the smoke size: the cascade's rows plus the from-scratch baseline, whose learning
rate the validation half chose; the record's files; resumed stages and curves that never double back."""
import json
import os

import pytest

import cascade as C
import train as TR
from experiments import demo, plots

SMOKE = ["--preset", "smoke", "--eval-batches", "2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, one_thread):
    out = tmp_path_factory.mktemp("demo") / "run"
    cfg, dcfg = C.parse_args(SMOKE + ["--out", str(out)], demo.DemoConfig)
    return out, demo.run_demo(cfg, dcfg)


def test_the_baseline_row_and_its_sweep(demo_run):
    out, result = demo_run
    rows = {r["stage"]: r for r in result["rows"]}
    chosen = result["baseline"]["lr"]
    assert list(rows)[-1] == f"3b from scratch (lr {chosen:g})" and len(rows) == 11
    # the baseline's lr was chosen on the validation half, as the lowest CE of the sweep
    sweep = json.loads((out / "results" / "lr_sweep.json").read_text())["sweep"]
    assert len(sweep) == 3 and chosen == min(sweep, key=lambda r: r["val_ce"])["lr"]
    assert [r["lr"] for r in sweep] == [1e-3, 3e-3, 1e-2]
    # as many tokens as the 3b child's own short and long stages, its time the whole sweep's
    base = rows[f"3b from scratch (lr {chosen:g})"]
    assert base["tokens_seen"] == 20 * 8 * 64 + 6 * 8 * 128
    assert base["cpu_seconds"] == pytest.approx(sum(r["cpu_seconds"] for r in sweep))
    for f in ("table.md", "table.json", "curves.png"):
        assert os.path.getsize(out / "results" / f) > 0
    table = (out / "results" / "table.md").read_text()
    assert "| 3b from scratch (lr" in table and "chose it (lr 0.001:" in table and "commit" in table


def test_a_changed_sweep_reuses_the_cascade_and_trains_only_the_new_rate(demo_run, capsys):
    out, result = demo_run
    stamp = os.path.getmtime(out / "3b" / "long" / "done.json")
    cfg, dcfg = C.parse_args(SMOKE + ["--out", str(out), "--baseline-lrs", "1e-3,2e-3"], demo.DemoConfig)
    again = demo.run_demo(cfg, dcfg)
    assert os.path.getmtime(out / "3b" / "long" / "done.json") == stamp
    assert [r["lr"] for r in again["baseline"]["sweep"]] == [1e-3, 2e-3]
    printed = capsys.readouterr().out
    assert "stage baseline/lr_0.001: finished earlier, skipped" in printed and "lr_0.002" in printed
    strip = lambda rows: [{k: v for k, v in r.items() if k != "path"} for r in rows[:-1]]
    assert strip(again["rows"]) == strip(result["rows"])


def test_bad_sweep_fails_before_any_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        demo.main(SMOKE + ["--out", str(tmp_path / "o"), "--baseline-lrs", "1e-3,x"])
    assert e.value.code == 2 and "--baseline-lrs '1e-3,x' is not" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_metrics_of_a_resumed_stage_do_not_double_back(tmp_path):
    stage = tmp_path / "parent"
    stage.mkdir()
    steps = [1, 2, 3, 4, 3, 4, 5]  # crashed after step 4, resumed from the checkpoint at step 2
    (stage / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": float(10 * s + i)}) + "\n"
                                                 for i, s in enumerate(steps)))
    pts = plots.read_metrics(str(stage))
    assert [x for x, _ in pts] == [1, 2, 3, 4, 5]
    assert [y for _, y in pts][2:4] == [34.0, 45.0]  # the replayed steps' values
    TR.truncate_metrics(str(stage / "metrics.jsonl"), 2)  # what train() does on a resume at step 2
    assert [json.loads(line)["step"] for line in (stage / "metrics.jsonl").read_text().splitlines()] == [1, 2]
