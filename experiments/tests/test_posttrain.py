"""experiments/posttrain.py: both post-training chains on every base child of a very small cascade, wired
stage to stage, resumable like the cascade's stages, with one table at the end."""
import json
import os

import pytest

import cascade as C
import model as M
from experiments import posttrain as P

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
pytestmark = pytest.mark.usefixtures("one_thread")

# Two sizes (the largest teaches the other), a few optimizer steps per stage, 4 held-out problems; a source
# file as the pretraining text (the Python corpus takes seconds to prepare).
TINY = ["--preset", "smoke", "--size", "8b", "--parent-steps", "4", "--short-steps", "2", "--long-steps", "1",
        "--eval-batches", "1", "--calib-seqs", "8", "--post-sft-steps", "2", "--post-grpo-steps", "1",
        "--post-odpo-steps", "1", "--post-pwrm-steps", "1", "--post-eval-problems", "4"]
SIZES = ("14b", "8b")


def spy_training(monkeypatch):
    """Count the calls of the training entry points the post-training stages use."""
    calls = {"run_sft": 0, "run_grpo": 0, "run_odpo": 0}
    for mod, name in ((P.S, "run_sft"), (P.G, "run_grpo"), (P.O, "run_odpo")):
        real = getattr(mod, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(mod, name, spy)
    return calls


def run(argv):
    return P.run_posttrain(*C.parse_args(argv, P.PostConfig))


@pytest.fixture(scope="module")
def post_run(tmp_path_factory, one_thread):
    """The tiny cascade and its post-training, with spies on which checkpoint each stage starts from."""
    out = tmp_path_factory.mktemp("post") / "run"
    text = out.parent / "text.txt"
    text.write_text("".join(open(os.path.join(ROOT, f)).read() for f in ("model.py", "data.py", "train.py")))
    argv = TINY + ["--data", str(text), "--out", str(out)]
    starts = {}
    mp = pytest.MonkeyPatch()
    real = {k: getattr(P.Chain, k) for k in ("sft", "grpo", "odpo")}

    def sft(self, name, init_path, teacher_path, reasoning):
        starts[name] = (init_path, teacher_path)
        return real["sft"](self, name, init_path, teacher_path, reasoning)

    def grpo(self, name, init_path):
        starts[name] = (init_path, None)
        return real["grpo"](self, name, init_path)

    def odpo(self, name, init_path, pwrm):
        starts[name] = (init_path, None)
        return real["odpo"](self, name, init_path, pwrm)

    for k, f in (("sft", sft), ("grpo", grpo), ("odpo", odpo)):
        mp.setattr(P.Chain, k, f)
    calls = spy_training(mp)
    try:
        result = run(argv)
    finally:
        mp.undo()
    return out, result, starts, calls, argv


def test_chain_runs_and_the_table_has_every_size_and_stage(post_run):
    out, result, _, calls, _ = post_run
    assert calls == {"run_sft": 2 * len(SIZES) + 1, "run_grpo": len(SIZES), "run_odpo": 2 * len(SIZES)}  # +1: PWRM
    got = [(r["size"], r["stage"]) for r in result["post"]]
    assert got == [(n, s) for n in SIZES for s in P.POST_ROWS]
    record = json.loads((out / "results" / "posttrain.json").read_text())
    assert [(r["size"], r["stage"]) for r in record["rows"]] == got
    for r in record["rows"]:
        assert 0 <= r["accuracy"] <= 1 and 0 <= r["format_rate"] <= 1 and 0 <= r["loop_rate_greedy"] <= 1
        assert r["n"] == 4 and (r["win_rate"] is None) == (r["stage"] == "base")
        assert len(r["correct"]) == 4 and r["accuracy"] == sum(r["correct"]) / 4
    by_dir = {r["dir"]: r for r in record["rows"]}
    for r in record["rows"]:  # the flips against the starting model, counted from the two rows' per-problem marks
        if r["start"] is None:
            assert r["paired"] is None
            continue
        pairs = list(zip(by_dir[r["start"]]["correct"], r["correct"]))
        assert (r["paired"]["wrong_to_right"], r["paired"]["right_to_wrong"]) == \
            (pairs.count((False, True)), pairs.count((True, False)))
    table = (out / "results" / "posttrain.md").read_text()
    assert table.count("\n| 14b |") == 6 and table.count("\n| 8b |") == 6 and "overlap 0" in table
    assert (out / "results" / "posttrain.png").stat().st_size > 0
    assert (out / "table.md").exists()  # the cascade's own retention table, written first
    split = record["split"]
    assert split["overlap"] == 0 and split["held_out"] == P.POST["held_out"]
    for size in SIZES:
        assert M.read_checkpoint_args(str(out / size / "reasoning_odpo" / "model"))[0].n_layers >= 1


def test_heldout_problems_are_disjoint_from_training(post_run):
    out, result, *_ = post_run
    pd = P.post_data(result["cfg"], result["ctx"], P.POST)
    held = {p["question"] for p in pd.held}
    assert len(held) == P.POST["held_out"] and not held & {p["question"] for p in pd.train}
    # the rows were scored on the first post_eval_problems of that held-out set
    cached = json.loads((out / "8b" / "grpo" / "post_eval.json").read_text())
    assert cached["key"]["held"] == [p["question"] for p in pd.held[:4]]


def test_each_stage_starts_from_the_previous_one(post_run):
    """GRPO starts from the reasoning SFT, reasoning ODPO from GRPO, instruct ODPO from the instruct SFT, both
    SFTs from the base child; the largest size's SFT teaches the smaller one (choice b)."""
    out, _, starts, *_ = post_run
    model = lambda stage: str(out / stage / "model")
    for n in SIZES:
        assert starts[f"{n}/instruct_sft"][0] == model(f"{n}/long")
        assert starts[f"{n}/reasoning_sft"][0] == model(f"{n}/long")
        assert starts[f"{n}/grpo"][0] == model(f"{n}/reasoning_sft")
        assert starts[f"{n}/reasoning_odpo"][0] == model(f"{n}/grpo")
        assert starts[f"{n}/instruct_odpo"][0] == model(f"{n}/instruct_sft")
    assert starts["14b/instruct_sft"][1] is None and starts["8b/instruct_sft"][1] == model("14b/instruct_sft")
    assert starts["8b/reasoning_sft"][1] == model("14b/reasoning_sft")
    for n in SIZES:  # each stage's done.json names the checkpoint it actually trained from
        done = json.loads((out / n / "reasoning_odpo" / "done.json").read_text())
        assert done["start"] == model(f"{n}/grpo")


def test_rerun_skips_finished_post_stages(post_run, monkeypatch, capsys):
    out, result, *_, argv = post_run
    calls = spy_training(monkeypatch)
    again = run(argv)
    assert calls == {"run_sft": 0, "run_grpo": 0, "run_odpo": 0}
    assert "stage 8b/reasoning_odpo: finished earlier, skipped" in capsys.readouterr().out
    assert again["post"] == result["post"]  # read back from the cached evaluations


def test_changed_post_setting_is_refused(post_run, monkeypatch):
    *_, argv = post_run
    with pytest.raises(ValueError, match=r"stage 14b/grpo .*other settings.*--restart-from 14b/grpo"):
        run(argv + ["--post-grpo-steps", "2"])
    monkeypatch.setitem(P.POST, "grpo_lr", P.POST["grpo_lr"] / 2)  # the recipe is part of every stage's key
    with pytest.raises(ValueError, match=r"stage 14b/instruct_sft .*--restart-from 14b/instruct_sft"):
        run(argv)


def test_restart_from_accepts_post_stages(post_run):
    *_, argv = post_run
    cfg, preset = C.resolved(C.parse_args(argv + ["--restart-from", "8b/grpo"], P.PostConfig)[0])
    plan = C.make_plan(cfg, preset, later_stages=tuple(P.stage_names(["14b", "8b"])))
    assert plan.order.index("8b/grpo") > plan.order.index("post/pwrm") > plan.order.index("8b/long")


def test_posttrain_refuses_what_it_cannot_do():
    cfg, pc = C.parse_args(["--preset", "smoke"], P.PostConfig)
    cfg, preset = C.resolved(cfg)
    with pytest.raises(ValueError, match="one process"):
        P.resolve(pc, cfg, preset, world=2)
    with pytest.raises(ValueError, match="--post-eval-problems 500 is more than the 100 held-out problems"):
        P.resolve(P.PostConfig(eval_problems=500), cfg, preset, world=1)


@pytest.mark.slow
def test_posttrain_on_a_chatml_gguf_parent(tmp_path):
    """The real-parent path (--parent X.gguf --preset cpu-real) on a tiny GGUF with a ChatML tokenizer: no
    [THINK] tokens, so the reasoning trace goes in the answer's text and GRPO's format gate is off."""
    from test_gguf import tiny_parent_gguf
    parent, _ = tiny_parent_gguf(tmp_path / "p.gguf")
    out = tmp_path / "run"
    argv = ["--parent", str(parent), "--preset", "cpu-real", "--size", "8b", "--short-steps", "1", "--long-steps", "1",
            "--seq-len", "32", "--long-seq-len", "320", "--batch-size", "2", "--micro-batch-size", "2",
            "--calib-seqs", "4", "--eval-batches", "1", "--post-sft-steps", "1", "--post-grpo-steps", "1",
            "--post-odpo-steps", "1", "--post-pwrm-steps", "1", "--post-eval-problems", "3", "--out", str(out)]
    result = run(argv)
    assert [(r["size"], r["stage"]) for r in result["post"]] == [(n, s) for n in SIZES for s in P.POST_ROWS]
    record = json.loads((out / "results" / "posttrain.json").read_text())
    assert record["split"]["think_tokens"] is False and record["split"]["overlap"] == 0
    assert record["recipe"] == {**P.POST, **P.POST_REAL}  # the real presets' rates, task and prompts, as run
    assert json.loads((out / "14b" / "grpo" / "config.json").read_text())["train"]["batch_size"] == 8 * 8
    assert not (out / "post" / "tekken.json").exists()  # the GGUF's own tokenizer, not a Tekken copy
    assert json.loads((out / "14b" / "grpo" / "config.json").read_text())["grpo"]["format_gate"] is False
    assert "this tokenizer has no [THINK]" in (out / "results" / "posttrain.md").read_text()
