"""cascade.py --posttrain (issue 15, item 5): both post-training chains on every base child of a very small
cascade, wired stage to stage, resumable like the pretraining stages, with one table at the end."""
import json
import os
import shutil
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cascade as C  # noqa: E402
import model as M  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

# Two sizes (the largest teaches the other), a few optimizer steps per stage, 4 held-out problems; a source
# file as the pretraining text (the Python corpus takes seconds to prepare).
TINY = ["--preset", "smoke", "--size", "8b", "--parent-steps", "4", "--short-steps", "2", "--long-steps", "1",
        "--no-baseline", "--eval-batches", "1", "--calib-seqs", "8", "--posttrain", "--post-sft-steps", "2",
        "--post-grpo-steps", "1", "--post-odpo-steps", "1", "--post-pwrm-steps", "1", "--post-eval-problems", "4"]
SIZES = ("14b", "8b")


def spy_training(monkeypatch):
    """Count the calls of the training entry points the post-training stages use."""
    calls = {"run_sft": 0, "run_grpo": 0, "run_odpo": 0}
    for mod, name in ((C.S, "run_sft"), (C.G, "run_grpo"), (C.O, "run_odpo")):
        real = getattr(mod, name)

        def spy(*a, _real=real, _name=name, **kw):
            calls[_name] += 1
            return _real(*a, **kw)
        monkeypatch.setattr(mod, name, spy)
    return calls


@pytest.fixture(scope="module")
def post_run(tmp_path_factory, one_thread):
    """The tiny cascade and its post-training, with spies on which checkpoint each stage starts from."""
    out = tmp_path_factory.mktemp("post") / "run"
    text = out.parent / "text.txt"
    text.write_text("".join(open(os.path.join(ROOT, f)).read() for f in ("model.py", "data.py", "train.py")))
    argv = TINY + ["--data", str(text), "--out", str(out)]
    starts = {}
    mp = pytest.MonkeyPatch()
    real_sft, real_grpo, real_odpo = C.stage_post_sft, C.stage_grpo, C.stage_odpo

    def sft(cfg, ctx, stages, pd, name, init_path, teacher_path, reasoning):
        starts[name] = (init_path, teacher_path)
        return real_sft(cfg, ctx, stages, pd, name, init_path, teacher_path, reasoning)

    def grpo(cfg, ctx, stages, pd, name, init_path):
        starts[name] = (init_path, None)
        return real_grpo(cfg, ctx, stages, pd, name, init_path)

    def odpo(cfg, ctx, stages, pd, name, init_path, pwrm):
        starts[name] = (init_path, None)
        return real_odpo(cfg, ctx, stages, pd, name, init_path, pwrm)

    mp.setattr(C, "stage_post_sft", sft)
    mp.setattr(C, "stage_grpo", grpo)
    mp.setattr(C, "stage_odpo", odpo)
    calls = spy_training(mp)
    try:
        result = C.run_cascade(C.config_from_argv(argv))
    finally:
        mp.undo()
    return out, result, starts, calls, argv


def test_chain_runs_and_the_table_has_every_size_and_stage(post_run):
    out, result, _, calls, _ = post_run
    assert calls == {"run_sft": 2 * len(SIZES) + 1, "run_grpo": len(SIZES), "run_odpo": 2 * len(SIZES)}  # +1: PWRM
    got = [(r["size"], r["stage"]) for r in result["post"]]
    assert got == [(n, s) for n in SIZES for s in C.POST_ROWS]
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
    # held-out questions are not among the training questions, counted independently of post_data's own count
    split = record["split"]
    assert split["overlap"] == 0 and split["held_out"] == C.POST["held_out"]
    for size in SIZES:
        assert M.read_checkpoint_args(str(out / size / "reasoning_odpo" / "model"))[0].n_layers >= 1


def test_heldout_problems_are_disjoint_from_training(post_run):
    out, result, *_, argv = post_run
    cfg = C.resolved(C.config_from_argv(argv))
    ctx = C.Context(0, 1, None, None, None, None, tok=C.D.Tokenizer.from_file(None, vocab_size=2048))
    pd = C.post_data(cfg, ctx)
    held = {p["question"] for p in pd.held}
    assert len(held) == C.POST["held_out"] and not held & {p["question"] for p in pd.train}
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
    # each stage's done.json names the checkpoint it actually trained from
    for n in SIZES:
        done = json.loads((out / n / "reasoning_odpo" / "done.json").read_text())
        assert done["start"] == model(f"{n}/grpo")


def test_rerun_skips_finished_post_stages(post_run, monkeypatch, capsys):
    out, result, *_, argv = post_run
    calls = spy_training(monkeypatch)
    again = C.run_cascade(C.config_from_argv(argv))
    assert calls == {"run_sft": 0, "run_grpo": 0, "run_odpo": 0}
    assert "stage 8b/reasoning_odpo: finished earlier, skipped" in capsys.readouterr().out
    assert again["post"] == result["post"]  # read back from the cached evaluations


def test_changed_post_setting_is_refused(post_run):
    *_, argv = post_run
    with pytest.raises(ValueError, match=r"post_grpo_steps 1 -> 2.*--restart-from 14b/grpo"):
        C.run_cascade(C.config_from_argv(argv + ["--post-grpo-steps", "2"]))
    with pytest.raises(ValueError, match="would keep stage 14b/grpo"):
        C.run_cascade(C.config_from_argv(argv + ["--post-grpo-steps", "2", "--restart-from", "8b/grpo"]))


def test_changed_post_recipe_is_refused_only_where_post_stages_exist(post_run, tmp_path, monkeypatch):
    """The recipe (task, rates, GRPO prompts) is part of the run's fingerprint; a cascade with no post-training
    stage yet takes any post-training settings."""
    out, *_, argv = post_run
    claim = lambda extra: C.claim_out_dir(cfg := C.resolved(C.config_from_argv(argv + extra)), C.make_plan(cfg), 0,
                                          write=False)
    claim([])  # unchanged: accepted
    monkeypatch.setitem(C.POST, "grpo_lr", C.POST["grpo_lr"] / 2)
    with pytest.raises(ValueError, match=r"\(post_recipe\).*--restart-from 14b/instruct_sft"):
        claim([])
    bare = tmp_path / "bare"  # the same run without its post-training stages
    shutil.copytree(out, bare, ignore=shutil.ignore_patterns(*C.POST_KINDS, "post"))
    i = argv.index("--out")
    argv = argv[:i + 1] + [str(bare)] + argv[i + 2:]
    claim(["--post-grpo-steps", "2"])


def test_posttrain_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="--posttrain .*one process"):
        C.resolved(C.config_from_argv(["--preset", "smoke", "--posttrain"]), world=2)
    with pytest.raises(ValueError, match="--post-eval-problems 500 is more than the 100 held-out problems"):
        C.resolved(C.config_from_argv(["--preset", "smoke", "--post-eval-problems", "500"]))


@pytest.mark.slow
def test_posttrain_on_a_chatml_gguf_parent(tmp_path):
    """The real-parent path (--parent X.gguf --preset cpu-real) on a tiny GGUF with a ChatML tokenizer: no
    [THINK] tokens, so the reasoning trace goes in the answer's text and GRPO's format gate is off."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_gguf import tiny_parent_gguf
    parent, _ = tiny_parent_gguf(tmp_path / "p.gguf")
    out = tmp_path / "run"
    argv = ["--parent", str(parent), "--preset", "cpu-real", "--size", "8b", "--short-steps", "1", "--long-steps", "1",
            "--seq-len", "32", "--long-seq-len", "320", "--batch-size", "2", "--micro-batch-size", "2",
            "--calib-seqs", "4", "--eval-batches", "1", "--math-problems", "2", "--math-new-tokens", "2",
            "--posttrain", "--post-sft-steps", "1", "--post-grpo-steps", "1", "--post-odpo-steps", "1",
            "--post-pwrm-steps", "1", "--post-eval-problems", "3", "--out", str(out)]
    result = C.run_cascade(C.config_from_argv(argv))
    assert [(r["size"], r["stage"]) for r in result["post"]] == [(n, s) for n in SIZES for s in C.POST_ROWS]
    record = json.loads((out / "results" / "posttrain.json").read_text())
    assert record["split"]["think_tokens"] is False and record["split"]["overlap"] == 0
    assert record["recipe"] == {**C.POST, **C.POST_REAL}  # the real presets' rates, task and prompts, as run
    assert json.loads((out / "14b" / "grpo" / "config.json").read_text())["train"]["batch_size"] == 8 * 8
    assert not (out / "post" / "tekken.json").exists()  # the GGUF's own tokenizer, not a Tekken copy
    assert json.loads((out / "14b" / "grpo" / "config.json").read_text())["grpo"]["format_gate"] is False
    table = (out / "results" / "posttrain.md").read_text()
    assert "this tokenizer has no [THINK]" in table
