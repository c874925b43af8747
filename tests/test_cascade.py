"""cascade.py: the demo's code path at a small size, the real-format path under torchrun, rerun and
resume, and bad input refused before any long work."""
import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import math

import numpy as np
import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import cascade as C  # noqa: E402
import data as D  # noqa: E402
import model as M  # noqa: E402
import prune as P  # noqa: E402
import train as TR  # noqa: E402

SMOKE = ["--preset", "smoke", "--eval-batches", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


def run_main(argv):
    """cascade.main in-process: returns (exit code, stderr text) for the error paths."""
    try:
        C.main(argv)
    except SystemExit as e:
        return e.code
    return 0


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, one_thread):
    """The smoke cascade, with spies on the stage functions: which checkpoint each prune starts from, and
    which model teaches each distillation stage."""
    out = tmp_path_factory.mktemp("smoke") / "run"
    calls = {"prune": [], "distill": [], "build": []}
    real_prune, real_distill, real_build = C.stage_prune, C.stage_distill, C.build

    def prune(cfg, ctx, stages, name, source_path, target, *a, **kw):
        calls["prune"].append((name, source_path))
        return real_prune(cfg, ctx, stages, name, source_path, target, *a, **kw)

    def distill(cfg, ctx, stages, name, init_path, teacher, *a, **kw):
        calls["distill"].append((name, init_path, teacher))
        return real_distill(cfg, ctx, stages, name, init_path, teacher, *a, **kw)

    def build(source, ctx, cfg, train=True):
        model = real_build(source, ctx, cfg, train=train)
        calls["build"].append((source, model))
        return model

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(C, "stage_prune", prune)
        mp.setattr(C, "stage_distill", distill)
        mp.setattr(C, "build", build)
        t0 = time.time()
        result = C.run_cascade(C.config_from_argv(SMOKE + ["--out", str(out)]))
    return out, result, time.time() - t0, calls


def test_demo_code_path_small(smoke_run):
    out, result, seconds, _ = smoke_run
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == ["parent", "14b pruned", "14b short", "14b base", "8b pruned", "8b short", "8b base",
                          "3b pruned", "3b short", "3b base"]
    for size in ("14b", "8b", "3b"):
        # distillation lowers the distillation objective (KL to the teacher) of every child
        assert rows[f"{size} short"]["kl"] < rows[f"{size} pruned"]["kl"], size
        assert rows[f"{size} pruned"]["params"] < rows["parent"]["params"]
    assert rows["parent"]["kl"] == pytest.approx(0.0, abs=1e-6)  # the parent is the teacher
    table = (out / "table.md").read_text()
    assert "| 3b base |" in table and "kept" in table and "commit" in table
    record = json.loads((out / "table.json").read_text())
    assert record["rows"] == json.loads(json.dumps(result["rows"]))
    rec = record["run"]  # the note's run sentence carries the record header's fields
    assert (f"Run: {rec['date']}, {rec['device']} ({rec['cpus']} CPUs, {rec['torch_threads']} torch threads), torch "
            f"{rec['torch']}, commit {rec['commit']}: {rec['seconds']:.0f} s wall") in table
    # tokens seen, upstream included: the parent's, plus every short stage on the chain, plus the row's own
    parent_tokens = 150 * 8 * 128
    short, long = 20 * 8 * 64, 6 * 8 * 128
    assert rows["parent"]["tokens_seen"] == rows["14b pruned"]["tokens_seen"] == parent_tokens
    assert rows["8b pruned"]["tokens_seen"] == parent_tokens + short
    assert rows["3b base"]["tokens_seen"] == parent_tokens + 3 * short + long
    assert all(r["seconds"] > 0 and r["cpu_seconds"] > 0 for r in result["rows"])  # per-stage times
    # the held-out text shares no 32-token window with the training tokens
    assert result["ctx"].heldout["overlap_after"] == 0 and result["ctx"].heldout["overlap_before"] > 0
    # once a stage's export exists, no training checkpoint of it is kept
    assert not list(out.glob("**/ckpt"))
    # every stage left a reloadable checkpoint of exactly its planned shape
    plan = C.make_plan(*C.resolved(C.config_from_argv(SMOKE)))
    for name, args in plan.sizes:
        for stage in ("init", "short", "long"):
            got, _ = M.read_checkpoint_args(str(out / name / stage / "model"))
            assert (got.n_layers, got.dim, got.hidden_dim, got.tied_embeddings) == \
                (args.n_layers, args.dim, args.hidden_dim, args.tied_embeddings)
    assert M.read_checkpoint_args(str(out / "3b" / "long" / "model"))[0].yarn_factor == 2.0  # long stage: YaRN


def test_cascade_seeds_each_size_with_the_short_child_and_teaches_with_the_root(smoke_run):
    """Algorithm 1: size k is pruned from size k-1's SHORT-context child; the teacher is the original
    parent for every size."""
    out, _, _, calls = smoke_run
    sources = dict(calls["prune"])
    assert sources["14b/init"] == str(out / "parent" / "model")
    assert sources["8b/init"] == str(out / "14b" / "short" / "model")
    assert sources["3b/init"] == str(out / "8b" / "short" / "model")
    root = [m for src, m in calls["build"] if src == str(out / "parent" / "model")]
    assert len(calls["distill"]) == 6 and root
    assert all(teacher is root[0] for _, _, teacher in calls["distill"])


def test_rerun_skips_finished_stages_and_recomputes_the_rows(smoke_run, capsys):
    out, result, _, _ = smoke_run
    stamp = os.path.getmtime(out / "8b" / "short" / "done.json")
    for cached in out.glob("**/eval_*.json"):  # the rows must come from the checkpoints, not from a cache
        cached.unlink()
    again = C.run_cascade(C.config_from_argv(SMOKE + ["--out", str(out)]))
    assert again["rows"] == result["rows"] and (out / "table.md").exists()
    assert os.path.getmtime(out / "8b" / "short" / "done.json") == stamp
    printed = capsys.readouterr().out
    assert "stage 8b/short: finished earlier, skipped" in printed
    assert "[distill]" not in printed and "[parent]" not in printed  # nothing was trained again


def test_miniature_ratios_follow_the_real_family():
    parent = C.PRESETS["cpu"].parent
    for size in ("14b", "8b", "3b"):
        child = C.miniature(parent, size, 128)
        real = M.ModelArgs.preset(size)
        rl, rd, rf = M.RATIOS[size]
        assert abs(child.n_layers - parent.n_layers * rl) <= 0.5
        assert abs(child.dim - parent.dim * rd) <= 4 and abs(child.hidden_dim - parent.hidden_dim * rf) <= 4
        assert child.tied_embeddings == real.tied_embeddings
    assert M.RATIOS["3b"] == (26 / 40, 3072 / 5120, 9216 / 32768)
    for preset in [p for p, v in C.PRESETS.items() if v.parent]:  # every embedded preset plans a valid cascade
        plan = C.make_plan(*C.resolved(C.config_from_argv(["--preset", preset])))
        assert [n for n, _ in plan.sizes] == ["14b", "8b", "3b"]
        assert M.num_params(plan.parent_args) > M.num_params(plan.sizes[0][1]) > M.num_params(plan.sizes[-1][1])
    with pytest.raises(ValueError, match="give --parent"):
        C.resolved(C.config_from_argv(["--preset", "paper"]))


def test_paper_preset_short_stage_plain_rope_long_stage_the_released_config(tmp_path):
    """Algorithm 1 / PAPER.md section 5 for the real sizes: the short stage (16K) trains plain RoPE at the
    child's own rope_theta; the long stage's switch gives exactly the released 14b/8b/3b config (YaRN 16,
    L 16384, query temperature 0.1, 262144 positions), which the exported base checkpoint carries."""
    parent = tmp_path / "ms31"
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps(M.hf_config(M.ModelArgs.preset("24b"))))
    cfg, preset = C.resolved(C.config_from_argv(["--preset", "paper", "--parent", str(parent)]))
    plan = C.make_plan(cfg, preset)
    dcfg = C.DI.DistillConfig(long_yarn_factor=cfg.long_seq_len / cfg.seq_len, long_original_max_pos=cfg.seq_len)
    for name, short in plan.sizes:
        real = M.ModelArgs.preset(name)
        assert short.yarn_factor is None and short.qtemp_beta is None and short.max_seq_len == 16384, name
        assert short.rope_theta == real.rope_theta
        long = C.DI.long_context_args(short, dcfg)
        assert long == real, name
        m = M.Transformer(M.ModelArgs(**{**long.__dict__, "n_layers": 1, "dim": 64, "hidden_dim": 64,
                                          "n_heads": 2, "n_kv_heads": 1, "head_dim": 32, "vocab_size": 1280}))
        M.save_model(m, str(tmp_path / name))
        back, _ = M.read_checkpoint_args(str(tmp_path / name))
        assert (back.yarn_factor, back.yarn_original_max_pos, back.qtemp_beta, back.max_seq_len) == \
            (16.0, 16384, 0.1, 262144)


def test_paper_preset_real_run_defaults(tmp_path):
    """Checkpoints every 1000 steps and every 30 minutes, not every quarter of a 500K-step stage; the
    demo presets keep two per stage."""
    parent = tmp_path / "ms31"
    parent.mkdir()
    (parent / "config.json").write_text(json.dumps(M.hf_config(M.ModelArgs.preset("24b"))))
    cfg, _ = C.resolved(C.config_from_argv(["--preset", "paper", "--parent", str(parent)]))
    ctx = C.Context(0, 1, torch.device("cpu"), None, None, None)
    t = C.train_config(cfg, ctx, str(tmp_path / "x"), cfg.short_steps, cfg.seq_len)
    assert t.ckpt_every == 1000 and t.ckpt_minutes == 30
    smoke, _ = C.resolved(C.config_from_argv(SMOKE))
    assert C.train_config(smoke, ctx, str(tmp_path / "x"), 20, 64).ckpt_every == 10


def test_changed_settings_are_refused_or_restart_the_stage(smoke_run, tmp_path, capsys):
    src, result, _, _ = smoke_run
    out = tmp_path / "run"
    shutil.copytree(src, out)
    assert run_main(SMOKE + ["--out", str(out), "--short-steps", "21"]) == 2
    err = capsys.readouterr().err
    assert "short_steps 20 -> 21" in err and "--restart-from 14b/short" in err
    assert run_main(SMOKE + ["--out", str(out), "--short-steps", "21", "--restart-from", "3b/long"]) == 2
    assert "would keep stage 14b/short" in capsys.readouterr().err
    assert run_main(SMOKE + ["--out", str(out), "--restart-from", "4b/short"]) == 2
    assert "is not a stage of this run" in capsys.readouterr().err
    # the flag redoes the named stage and the later ones only
    stamp = os.path.getmtime(out / "3b" / "init" / "done.json")
    again = C.run_cascade(C.config_from_argv(SMOKE + ["--out", str(out), "--long-steps", "5",
                                                      "--restart-from", "14b/long"]))
    assert os.path.getmtime(out / "3b" / "init" / "done.json") == stamp
    assert "removed stages 14b/long, 8b/long, 3b/long" in capsys.readouterr().out
    same = lambda rows: [{k: v for k, v in r.items() if k != "path"} for r in rows if "base" not in r["stage"]]
    assert same(again["rows"]) == same(result["rows"])
    assert again["rows"][3]["tokens_seen"] == result["rows"][3]["tokens_seen"] - 8 * 128


def test_kept_on_a_hand_made_example():
    # ln V = ln 1024 = 6.931; the parent gains 4 nats over a uniform guess, the child 3: it keeps 75%
    ln_v = math.log(1024)
    assert C.retention(ln_v - 3, ln_v - 4, 1024) == pytest.approx(0.75)
    assert C.retention(ln_v, ln_v - 4, 1024) == pytest.approx(0.0)
    rows = [{"stage": "parent", "params": 10, "ce": ln_v - 4, "kl": 0.0},
            {"stage": "child", "params": 5, "ce": ln_v - 3, "kl": 0.5}]
    assert "| child | 5 | 3.931 | 0.500 | 75.0% |" in C.results_table(rows, 1024)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_micro_batch_follows_the_world_size(world):
    cfg, _ = C.resolved(C.config_from_argv([]), world)  # the cpu preset: batch 16, micro-batch at most 16
    assert cfg.micro_batch_size == 16 // world
    assert TR.grad_accum_steps(TR.TrainConfig(batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size),
                               world) == 1
    assert C.resolved(C.config_from_argv(["--preset", "paper", "--parent", "x"]), world)[0].micro_batch_size == 1
    with pytest.raises(ValueError, match="cannot be split over 3 processes"):
        C.resolved(C.config_from_argv([]), 3)
    if world > 1:  # a micro-batch given explicitly is kept, and checked
        with pytest.raises(ValueError, match="not a multiple of --micro-batch-size 16"):
            C.resolved(C.config_from_argv(["--micro-batch-size", "16"]), world)


def test_help_shows_the_presets_values(capsys):
    with pytest.raises(SystemExit):
        C.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "cpu 100, smoke 150, gpu 4000" in text and "default None)" not in text.split("--parent-steps")[1].split("--lr")[0]


# -- bad input, each refused before any training -------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--layer-selection", "foo"], "--layer-selection 'foo' is unknown"),
    (["--temperature", "0"], "--temperature 0.0 must be > 0"),
    (["--ce-weight", "-1"], "--ce-weight -1.0 must be in [0, 1]"),
    (["--batch-size", "8", "--micro-batch-size", "3"], "is not a multiple of --micro-batch-size 3"),
    (["--short-steps", "0"], "--short-steps 0 must be at least 1"),
    (["--parent-steps", "-5"], "--parent-steps -5 must be at least 1"),
    (["--eval-batches", "0"], "every row would read 100% kept"),
    (["--long-seq-len", "32"], "--long-seq-len 32 is below --seq-len 64"),
    (["--dtype", "fp16"], "--dtype 'fp16' is unknown"),
])
def test_bad_values_fail_at_once(tmp_path, capsys, monkeypatch, flags, message):
    def no_data(*a):
        raise AssertionError("the data was read before the bad value was refused")

    monkeypatch.setattr(C, "load_data", no_data)
    assert run_main(SMOKE + ["--out", str(tmp_path / "o"), *flags]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "o").exists()  # nothing written


def test_size_larger_than_parent(tmp_path, capsys):
    code = run_main(SMOKE + ["--out", str(tmp_path / "o"), "--shapes", "8:64:384"])
    assert code == 2
    err = capsys.readouterr().err
    assert "needs n_layers=8 but the parent has 4" in err and not (tmp_path / "o").exists()


def test_bad_shapes_and_size(tmp_path, capsys):
    assert run_main(SMOKE + ["--out", str(tmp_path / "o"), "--shapes", "3:0:100"]) == 2
    assert "zero or negative" in capsys.readouterr().err
    assert run_main(SMOKE + ["--out", str(tmp_path / "o"), "--size", "7b"]) == 2
    assert "is not a cascade size" in capsys.readouterr().err
    # --shapes names the sizes: the run's config records no --size, and a stray one is not checked
    cfg, preset = C.resolved(C.config_from_argv(SMOKE + ["--out", str(tmp_path / "s"), "--shapes", "3:48:128"]))
    assert cfg.size is None and [n for n, _ in C.make_plan(cfg, preset).sizes] == ["s1_3x48x128"]


def test_unreadable_parent(tmp_path, capsys):
    (tmp_path / "p").mkdir()
    assert run_main(["--parent", str(tmp_path / "p"), "--out", str(tmp_path / "o")]) == 2
    assert "neither config.json nor params.json" in capsys.readouterr().err
    (tmp_path / "p" / "config.json").write_text("{broken")
    assert run_main(["--parent", str(tmp_path / "p"), "--out", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_out_folder_of_another_run(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "run.json").write_text(json.dumps({"fingerprint": {"seed": 123}}))
    assert run_main(SMOKE + ["--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds stages run with other settings" in err and "seed 123 -> 0" in err
    (out / "run.json").unlink()
    (out / "somefile").write_text("x")
    assert run_main(SMOKE + ["--out", str(out)]) == 2
    assert "is not empty" in capsys.readouterr().err


def test_shard_folder_stays_lazy_and_its_heldout_tail_is_deduplicated(tmp_path):
    """--data FOLDER of several shards is a data.ShardedTokens (memmaps): the training part stays one, the
    held-out tail is read into memory (de-duplication, the eval cache's key hashes its bytes), and a real
    parent's Python corpus plus --data concatenates both."""
    tok = D.Tokenizer.from_file(vocab_size=2048)
    rng = np.random.default_rng(0)
    docs = [np.concatenate([[tok.bos_id], rng.integers(300, 2000, 998), [tok.eos_id]]) for _ in range(60)]
    toks = np.concatenate(docs).astype(np.uint32)
    toks[-700:-400] = toks[1000:1300]  # the held-out tail repeats 300 training tokens
    D.write_shards(toks, tmp_path / "shards", tok, shard_tokens=10000)
    cfg, preset = C.resolved(C.config_from_argv(SMOKE + ["--data", str(tmp_path / "shards"), "--out", str(tmp_path / "o")]))
    train, val, test, info = C.load_data(cfg, preset, C.make_plan(cfg, preset))[1:5]
    assert isinstance(train, D.ShardedTokens) and np.array_equal(np.asarray(train), toks[:len(train)])
    for half in (val, test):
        assert isinstance(half, np.ndarray) and len(half) > 0 and len(C.hashlib.sha1(half.tobytes()).hexdigest()) == 40
    assert info["overlap_before"] == 300 - D.DEDUP_NGRAM + 1 and info["overlap_after"] == 0
    assert D.heldout_overlap(np.asarray(train), np.concatenate([val, test]), D.DEDUP_NGRAM) == 0
    # nothing to drop (no re-cut): the halves are still arrays in memory, cut at a document end
    D.write_shards(np.concatenate(docs).astype(np.uint32), tmp_path / "clean", tok, shard_tokens=10000)
    cfg = dataclasses.replace(cfg, data=str(tmp_path / "clean"))
    val, test, info = C.load_data(cfg, preset, C.make_plan(cfg, preset))[2:5]
    assert info["overlap_before"] == 0 and isinstance(val, np.ndarray) and isinstance(test, np.ndarray)
    assert val[-1] == tok.eos_id and test[0] == tok.bos_id


@pytest.mark.slow
def test_real_parent_corpus_plus_shard_folder(tmp_path):
    """A real parent (cpu-real) distils on the Python corpus plus --data: a shard folder's ShardedTokens
    concatenates onto the corpus tokens."""
    tok = D.Tokenizer.from_file(vocab_size=2048)
    toks = D.tokenize_documents(D.python_corpus()[0][:20], tok)
    D.write_shards(toks, tmp_path / "shards", tok, shard_tokens=5000)
    cfg, preset = C.resolved(C.config_from_argv(SMOKE + ["--data", str(tmp_path / "shards"), "--out", str(tmp_path / "o")]))
    real, plan = C.PRESETS["cpu-real"], C.make_plan(cfg, preset)
    corpus = len(C.load_data(dataclasses.replace(cfg, data=None), real, plan)[1])
    assert len(C.load_data(cfg, real, plan)[1]) == corpus + len(toks)


def test_too_little_data(tmp_path, capsys):
    text = tmp_path / "small.txt"
    text.write_text("def f(x):\n    return x + 1\n" * 400)
    code = run_main(SMOKE + ["--out", str(tmp_path / "o"), "--data", str(text), "--max-epochs", "1"])
    assert code == 2
    assert "give more data, fewer steps" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_unknown_flag_is_an_error(capsys):
    with pytest.raises(SystemExit) as e:
        C.main(["--sise", "3b"])
    assert e.value.code != 0


# -- the real path: real-format parent, token shards, two gloo processes --------------------------

def write_real_parent(folder, fmt):
    args = M.ModelArgs(dim=64, n_layers=3, head_dim=16, hidden_dim=192, n_heads=4, n_kv_heads=2, vocab_size=2048,
                       rope_theta=1e4, max_seq_len=1024)
    m = M.Transformer(args)
    m.init_weights(0)
    M.save_model(m, folder, format=fmt)
    return args


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["hf", "native"])
def test_torchrun_two_processes_on_real_format_parent(tmp_path, fmt):
    parent = tmp_path / "parent"
    write_real_parent(parent, fmt)
    tok = D.Tokenizer.from_file(vocab_size=2048)
    train_docs, _ = D.python_corpus()
    D.write_shards(D.tokenize_documents(train_docs[:150], tok), tmp_path / "shards", tok)
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "cascade.py"), "--parent", str(parent), "--data", str(tmp_path / "shards"),
           "--shapes", "3:48:128,2:32:96:tied", "--out", str(out), "--short-steps", "4", "--long-steps", "2",
           "--batch-size", "4", "--seq-len", "32", "--long-seq-len", "64",  # micro-batch derived: 2 per rank
           "--lr", "1e-3", "--dtype", "fp32", "--calib-seqs", "8", "--eval-batches", "2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    table = json.loads((out / "table.json").read_text())["rows"]
    assert [row["stage"] for row in table][:4] == ["parent", "s1_3x48x128 pruned", "s1_3x48x128 short",
                                                   "s1_3x48x128 base"]
    last, _ = M.read_checkpoint_args(str(out / "s2_2x32x96" / "long" / "model"))
    assert (last.n_layers, last.dim, last.hidden_dim, last.tied_embeddings) == (2, 32, 96, True)
    # both ranks trained on disjoint data, and the world size was recorded by the loop
    cfg = json.loads((out / "s1_3x48x128" / "short" / "config.json").read_text())
    assert cfg["world_size"] == 2 and cfg["train"]["micro_batch_size"] == 2
    if fmt == "hf":  # the same config in one process: the same cuts, losses and held-out figures
        # (held-out batches and calibration count sequences per rank: 4 in one process = 2 on each of 2 ranks)
        argv = cmd[cmd.index("--parent"):] + ["--micro-batch-size", "4"]
        argv[argv.index("--out") + 1] = str(tmp_path / "one")
        one = C.run_cascade(C.config_from_argv(argv))["rows"]
        assert [r["stage"] for r in one] == [r["stage"] for r in table]
        for a, b in zip(one, table):
            assert (a["eval_tokens"], a["tokens_seen"], a["params"]) == (b["eval_tokens"], b["tokens_seen"], b["params"]), a["stage"]
            assert a["ce"] == pytest.approx(b["ce"], rel=1e-4) and a["kl"] == pytest.approx(b["kl"], rel=1e-3, abs=1e-5)
        for stage in ("s1_3x48x128/short", "s2_2x32x96/long"):  # training losses step by step
            losses = [[json.loads(l)["loss"] for l in open(d / stage / "metrics.jsonl") if '"loss"' in l]
                      for d in (tmp_path / "one", out)]
            assert losses[0] == pytest.approx(losses[1], rel=1e-4), stage


@pytest.mark.slow
def test_interrupted_stage_resumes_exactly(tmp_path):
    """Kill the cascade during the parent's training (after a checkpoint), rerun: the final table equals
    an uninterrupted run's, number for number."""
    argv = SMOKE + ["--size", "14b", "--parent-steps", "40"]
    ref = C.run_cascade(C.config_from_argv(argv + ["--out", str(tmp_path / "ref")]))
    out = tmp_path / "cut"
    cmd = [sys.executable, os.path.join(ROOT, "cascade.py"), *argv, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 300
    while time.time() < deadline and not (out / "parent" / "ckpt" / "latest").exists():
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert (out / "parent" / "ckpt" / "latest").exists() and not (out / "parent" / "done.json").exists()
    again = C.run_cascade(C.config_from_argv(argv + ["--out", str(out)]))
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("seconds", "cpu_seconds", "path")} for r in rows]
    assert strip(again["rows"]) == strip(ref["rows"])
    steps = [json.loads(line)["step"] for line in (out / "parent" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))  # the replayed steps were not logged twice


# -- a real-format GGUF parent, with a tiny file written by gguf's writer ---------------------

@pytest.mark.slow
def test_gguf_parent_cascade(tmp_path):
    """--parent FILE.gguf: the parent is dequantised into an HF checkpoint, children take the paper's
    ratios and stay tied, and distillation runs on the Python corpus with the file's own tokenizer."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    from test_gguf import tiny_parent_gguf
    parent, args = tiny_parent_gguf(tmp_path / "p.gguf")
    out = tmp_path / "run"
    argv = ["--parent", str(parent), "--preset", "cpu-real", "--size", "3b", "--short-steps", "2", "--long-steps", "1",
            "--seq-len", "32", "--long-seq-len", "64", "--batch-size", "2", "--micro-batch-size", "2",
            "--calib-seqs", "4", "--eval-batches", "1", "--out", str(out)]
    result = C.run_cascade(C.config_from_argv(argv))
    rows = {r["stage"]: r for r in result["rows"]}
    assert list(rows) == ["parent", *(f"{s} {k}" for s in ("14b", "8b", "3b") for k in ("pruned", "short", "base"))]
    got = M.read_checkpoint_args(str(out / "parent" / "model"))[0]
    assert got == M.load_model(parent).args and got.family == "llama"
    for size in ("14b", "8b", "3b"):
        a = M.read_checkpoint_args(str(out / size / "init" / "model"))[0]
        want = C.miniature(args, size, 32)
        assert (a.n_layers, a.dim, a.hidden_dim, a.tied_embeddings) == (want.n_layers, want.dim, want.hidden_dim, True)
    assert rows["parent"]["kl"] == pytest.approx(0.0, abs=1e-6)


def test_real_presets_need_a_parent():
    with pytest.raises(ValueError, match="sizes a run on a real parent: give --parent PATH .or smollm2."):
        C.resolved(C.config_from_argv(["--preset", "cpu-real"]))


def test_real_children_follow_the_paper_ratios():
    """REAL_MODEL.md's children of SmolLM2 (30 x 576 x 1536, tied): 14B, 8B, 3B ratios, all tied."""
    smol = M.ModelArgs(dim=576, n_layers=30, head_dim=64, hidden_dim=1536, n_heads=9, n_kv_heads=3,
                       vocab_size=49152, rope_theta=1e5, max_seq_len=8192, tied_embeddings=True, family="llama")
    shapes = [(a.n_layers, a.dim, a.hidden_dim, a.tied_embeddings) for a in (C.miniature(smol, s, 128) for s in C.REAL_SIZES)]
    assert shapes == [(30, 576, 768, True), (26, 464, 672, True), (20, 344, 432, True)]


def test_a_stage_made_from_other_inputs_is_refused(tmp_path):
    """A stage an experiment adds carries the key of what it was made from: the same key skips it, another
    key refuses it with the --restart-from hint (not silently reused)."""
    stages = TR.Stages(str(tmp_path))
    assert stages.done("x/y", key={"lr": 1e-3}) is None
    stages.finish("x/y", {"tokens": 5})
    assert stages.done("x/y", key={"lr": 1e-3})["tokens"] == 5
    with pytest.raises(ValueError, match="pass --restart-from x/y"):
        stages.done("x/y", key={"lr": 3e-3})


def test_restart_accepts_and_removes_an_experiments_later_stages(tmp_path):
    cfg, preset = C.resolved(C.config_from_argv(SMOKE + ["--out", str(tmp_path / "run"), "--restart-from", "extra/a"]))
    plan = C.make_plan(cfg, preset, later_stages=("extra/a", "extra/b"))
    assert plan.order[-2:] == ["extra/a", "extra/b"]
    (tmp_path / "run" / "extra" / "b").mkdir(parents=True)
    (tmp_path / "run" / "3b" / "long").mkdir(parents=True)
    (tmp_path / "run" / "run.json").write_text(json.dumps({"fingerprint": plan.fingerprint}))
    C.claim_out_dir(cfg, plan, 0)
    assert not (tmp_path / "run" / "extra" / "b").exists() and (tmp_path / "run" / "3b" / "long").exists()
    with pytest.raises(ValueError, match="is not a stage of this run"):
        C.make_plan(cfg, preset)


def test_chat_data_joins_the_training_stream_in_the_chat_format(tmp_path, capsys):
    """--chat-data: every chat of the jsonl file is encoded with the tokenizer's chat format and appended to
    the distillation tokens; a malformed line is one clear error naming it, before any training."""
    chats = [[{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": str(i + 1)}]
             for i in range(40)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    cfg, preset = C.resolved(C.config_from_argv(SMOKE + ["--out", str(tmp_path / "o"), "--chat-data", str(path)]))
    plan = C.make_plan(cfg, preset)
    tok, with_chats = C.load_data(cfg, preset, plan)[:2]
    without = C.load_data(dataclasses.replace(cfg, chat_data=None), preset, plan)[1]
    want = np.concatenate([tok.encode_chat(m)[0] for m in chats])
    assert np.array_equal(np.asarray(with_chats), np.concatenate([np.asarray(without), want]))
    assert plan.fingerprint["chat_data"] == str(path)
    for bad in ('{"prompt": "no chat"}', '{"text": ""}', '{"messages": []}'):
        path.write_text(json.dumps({"messages": chats[0]}) + "\n" + bad + "\n")
        assert run_main(SMOKE + ["--out", str(tmp_path / "o2"), "--chat-data", str(path)]) == 2
        assert f"{path}:2 has no \"messages\" list" in capsys.readouterr().err
    assert run_main(SMOKE + ["--out", str(tmp_path / "o3"), "--chat-data", str(tmp_path / "nope.jsonl")]) == 2
    assert "--chat-data" in capsys.readouterr().err and not (tmp_path / "o3").exists()


def test_chat_data_text_lines_join_as_plain_documents(tmp_path):
    """A {"text": ...} line of --chat-data is a plain document, BOS text EOS as the corpus's documents are,
    in its place among the chats: one file can mix the parent's chats with its free text."""
    chat = [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}]
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps({"messages": chat}) + "\n" + json.dumps({"kind": "free", "text": "Plain words."})
                    + "\n\n" + json.dumps({"messages": chat}) + "\n")
    assert D.read_chats(path) == [chat, "Plain words.", chat]
    cfg, preset = C.resolved(C.config_from_argv(SMOKE + ["--out", str(tmp_path / "o"), "--chat-data", str(path)]))
    tok = C.load_data(cfg, preset, C.make_plan(cfg, preset))[0]
    once = tok.encode_chat(chat)[0]
    doc = D.tokenize_documents(["Plain words."], tok)
    assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
    assert np.array_equal(D.chat_tokens(path, tok), np.concatenate([once, doc, once]))


def test_calib_corpus_prunes_alike_whatever_the_chats(tmp_path):
    """--calib-corpus: the pruning's calibration batches come from the corpus alone, so two runs that differ
    only in --chat-data calibrate on the same sequences; without it the chats move the draw. The flag keys
    the init stage."""
    def batches(extra, name):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"{name} {i}?"},
                                                         {"role": "assistant", "content": "Yes."}]}) + "\n"
                                for i in range(200)))
        cfg, preset = C.resolved(C.config_from_argv(SMOKE + ["--out", str(tmp_path / name), "--chat-data", str(path),
                                                             "--chat-share", "0.5"] + extra))
        ctx, plan = C.prepare(cfg, preset, 0, 1, torch.device("cpu"))
        return [b.numpy() for b in C.calibration(cfg, ctx)], plan
    a, plan = batches(["--calib-corpus"], "a")
    b, _ = batches(["--calib-corpus"], "b")
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert plan.fingerprint["calib_corpus"] is True and C.FIRST_STAGE_CHANGED["calib_corpus"] == "init"
    c, plan = batches([], "c")
    d, _ = batches([], "d")
    assert not all(np.array_equal(x, y) for x, y in zip(c, d, strict=True)) and plan.fingerprint["calib_corpus"] is False


def test_ffn_score_reaches_the_pruning_and_keys_the_init_stage(tmp_path, capsys, monkeypatch):
    seen = []
    real = P.prune
    monkeypatch.setattr(P, "prune", lambda *a, **k: seen.append(a[3].ffn_score) or real(*a, **k))
    cfg, preset = C.resolved(C.config_from_argv(SMOKE + ["--out", str(tmp_path / "o"), "--ffn-score", "contribution"]))
    ctx, plan = C.prepare(cfg, preset, 0, 1, torch.device("cpu"))
    stages = TR.Stages(cfg.out)
    C.stage_prune(cfg, ctx, stages, "14b/init", C.stage_parent(cfg, ctx, stages, plan), plan.sizes[0][1])
    assert seen == ["contribution"] and plan.fingerprint["ffn_score"] == "contribution"
    assert C.FIRST_STAGE_CHANGED["ffn_score"] == "init"
    assert run_main(SMOKE + ["--out", str(tmp_path / "o2"), "--ffn-score", "norm"]) == 2
    assert "--ffn-score 'norm' is unknown" in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_a_run_written_before_a_setting_existed_resumes_at_its_default(tmp_path, capsys):
    """A run.json without a setting that was added later compares as that setting's default: the run goes
    on with the default, and a non-default value is refused as any changed setting is."""
    out = tmp_path / "o"
    cfg, preset = C.resolved(C.config_from_argv(SMOKE + ["--out", str(out)]))
    plan = C.make_plan(cfg, preset)
    C.claim_out_dir(cfg, plan, 0)
    stored = json.loads((out / "run.json").read_text())
    for k in ("calib_corpus", "calib_data"):
        del stored["fingerprint"][k]
    (out / "run.json").write_text(json.dumps(stored))
    C.claim_out_dir(cfg, plan, 0, write=False)  # defaults: accepted
    cfg2, _ = C.resolved(C.config_from_argv(SMOKE + ["--out", str(out), "--calib-corpus"]))
    with pytest.raises(ValueError, match=r"calib_corpus False -> True.*--restart-from 14b/init"):
        C.claim_out_dir(cfg2, C.make_plan(cfg2, preset), 0, write=False)


def test_calib_data_draws_every_calibration_window_from_its_files(tmp_path, capsys):
    """--calib-data a.jsonl,b.jsonl: each calibration sequence is a window of those files' tokens (chats and
    text lines), not of the training stream; a missing file, or the flag beside --calib-corpus, is one error."""
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps({"text": f"Alpha beta gamma {i} delta."}) + "\n" for i in range(120)))
    b.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Q{i}?"},
                                                  {"role": "assistant", "content": "Sure."}]}) + "\n" for i in range(60)))
    argv = SMOKE + ["--out", str(tmp_path / "o"), "--calib-data", f"{a},{b}"]
    cfg, preset = C.resolved(C.config_from_argv(argv))
    ctx, plan = C.prepare(cfg, preset, 0, 1, torch.device("cpu"))
    stream = np.concatenate([D.chat_tokens(a, ctx.tok), D.chat_tokens(b, ctx.tok)])
    text = stream.tobytes()
    rows = [r for batch in C.calibration(cfg, ctx) for r in batch.numpy().astype(np.uint32)]
    assert rows and all(r.tobytes() in text for r in rows)
    corpus = ctx.train_tokens.tobytes()
    assert not any(r.tobytes() in corpus for r in rows)
    assert plan.fingerprint["calib_data"] == f"{a},{b}"
    for bad, said in ((["--calib-data", str(tmp_path / "nope.jsonl")], "is not a file"),
                      (["--calib-data", str(a), "--calib-corpus"], "give one")):
        assert run_main(SMOKE + ["--out", str(tmp_path / "o2")] + bad) == 2
        assert said in capsys.readouterr().err and not (tmp_path / "o2").exists()


def test_chat_share_repeats_the_chats_to_the_share_asked(tmp_path, capsys):
    """--chat-share s: the chat stream is whole copies of the file, as many as bring it closest to share s of
    the training tokens; the share reached is recorded; a share without --chat-data, or outside (0, 1), is
    one clear error before any training."""
    chats = [[{"role": "user", "content": f"Name a colour, {i}."}, {"role": "assistant", "content": "Blue."}]
             for i in range(30)]
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in chats))
    argv = SMOKE + ["--out", str(tmp_path / "o"), "--chat-data", str(path)]
    cfg, preset = C.resolved(C.config_from_argv(argv + ["--chat-share", "0.5"]))
    plan = C.make_plan(cfg, preset)
    tok, train, *_, info = C.load_data(cfg, preset, plan)
    corpus = len(C.load_data(dataclasses.replace(cfg, chat_data=None, chat_share=None), preset, plan)[1])
    once = np.concatenate([tok.encode_chat(m)[0] for m in chats])
    copies, rest = divmod(len(train) - corpus, len(once))
    assert rest == 0 and copies > 1 and np.array_equal(np.asarray(train[corpus:]), np.tile(once, copies))
    assert abs(copies * len(once) / len(train) - 0.5) < len(once) / len(train)  # the nearest whole number of copies
    assert info["chat_tokens"] == copies * len(once) and info["chat_share"] == round(copies * len(once) / len(train), 4)
    assert plan.fingerprint["chat_share"] == 0.5
    for bad in (argv + ["--chat-share", "1"], SMOKE + ["--out", str(tmp_path / "o4"), "--chat-share", "0.3"]):
        assert run_main(bad) == 2
        assert "--chat-share" in capsys.readouterr().err
