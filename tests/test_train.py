"""train.py: schedule, CLI generation, gradient accumulation, FSDP2 at world size 2, exact resume after
SIGKILL, checkpoint crash safety, incompatible resumes, divergence, MFU table. CPU, tiny models.

The loss here is a plain next-token cross-entropy written in the test, so these tests do not depend on
distill.py (or data.py): train.py owns no loss."""

import dataclasses
import json
import math
import os
import re
import signal
import subprocess
import sys
import textwrap
from typing import Optional

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model as M  # noqa: E402
import train as T  # noqa: E402

# Written into worker scripts too (subprocess tests), so it must stand alone.
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toy import HELPERS, CycleLoader, ce_loss  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


TINY = M.ModelArgs.preset("tiny")


def tiny_model(seed=0, **kw):
    m = M.Transformer(dataclasses.replace(TINY, **kw))
    m.init_weights(seed)
    return m


def cfg_for(tmp, **kw):
    base = dict(out_dir=str(tmp), steps=4, batch_size=4, micro_batch_size=2, seq_len=16, lr=1e-2, warmup_steps=1,
                dtype="fp32", log_every=0, ckpt_every=0, export=False)
    return T.TrainConfig(**(base | kw))


def run_py(script: str, *args, timeout=120):
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


# -----------------------------------------------------------------------------


def test_lr_schedule_warmup_then_cosine():
    cfg = T.TrainConfig(lr=1.0, min_lr_ratio=0.1, warmup_steps=10, steps=110)
    assert T.lr_at(0, cfg) == pytest.approx(0.1)
    assert T.lr_at(4, cfg) == pytest.approx(0.5)
    assert T.lr_at(9, cfg) == pytest.approx(1.0)
    assert T.lr_at(10, cfg) == pytest.approx(1.0)
    assert T.lr_at(60, cfg) == pytest.approx(0.55)  # half-way: floor + (1 - floor) / 2
    assert T.lr_at(110, cfg) == pytest.approx(0.1)
    lrs = [T.lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    assert T.lr_at(0, dataclasses.replace(cfg, warmup_steps=0)) == pytest.approx(1.0)


def test_cli_is_generated_from_the_dataclass(capsys):
    cfg = T.config_from_args(T.TrainConfig, ["--steps", "5", "--out", "x", "--resume", "--no-export", "--lr", "1e-3"])
    assert (cfg.steps, cfg.out_dir, cfg.resume, cfg.export, cfg.lr) == (5, "x", True, False, 1e-3)
    assert T.config_from_args(T.TrainConfig, []) == T.TrainConfig()

    @dataclasses.dataclass
    class Other:
        chunk: Optional[int] = 4  # Optional fields accept "none"
        name: str = "a"

    cfg, other = T.configs_from_args([T.TrainConfig, Other], ["--chunk", "none", "--name", "b", "--out-dir", "y"])
    assert other == Other(chunk=None, name="b") and cfg.out_dir == "y"
    for bad in (["--stepz", "3"], ["--ste", "3"], ["--steps", "three"]):  # unknown, abbreviated, ill-typed
        with pytest.raises(SystemExit):
            T.config_from_args(T.TrainConfig, bad)

    @dataclasses.dataclass
    class Clash:
        steps: int = 1

    with pytest.raises(ValueError, match="clashes"):
        T.configs_from_args([T.TrainConfig, Clash], [])
    T.main(["--steps", "3"])
    assert json.loads(capsys.readouterr().out)["steps"] == 3


def test_gradient_accumulation_equals_one_big_batch(tmp_path):
    """4 micro-batches of 1 with uneven valid-token counts == 1 micro-batch of 4 (token-weighted); averaging
    per-micro-batch means instead is visibly different."""
    def naive(model, x, y, n_total):  # mean per micro-batch, averaged over the 4 micro-batches
        return ce_loss(model, x, y, int((y != -100).sum())) / 4

    results = {}
    for label, mb, loss_fn in (("big", 4, ce_loss), ("accum", 1, ce_loss), ("naive", 1, naive)):
        m = tiny_model()
        T.train(m, CycleLoader(TINY.vocab_size, mb, 16), loss_fn, cfg_for(tmp_path / label, steps=2, micro_batch_size=mb),
                device="cpu")
        results[label] = m.state_dict()
    diff = lambda a: max((results[a][k] - results["big"][k]).abs().max().item() for k in results["big"])
    assert diff("accum") < 1e-5  # AdamW's normalisation turns fp32 summation-order noise into ~1e-6
    assert diff("naive") > 20 * diff("accum")


def test_batch_config_errors(tmp_path):
    with pytest.raises(ValueError, match="multiple of micro_batch_size"):
        T.train(tiny_model(), CycleLoader(TINY.vocab_size, 3, 16), ce_loss, cfg_for(tmp_path, micro_batch_size=3),
                device="cpu")
    with pytest.raises(ValueError, match="loader gives batches of shape"):
        T.train(tiny_model(), CycleLoader(TINY.vocab_size, 2, 8), ce_loss, cfg_for(tmp_path), device="cpu")
    with pytest.raises(ValueError, match="dtype"):
        T.train(tiny_model(), CycleLoader(TINY.vocab_size, 2, 16), ce_loss, cfg_for(tmp_path, dtype="fp16"), device="cpu")


FSDP_RUN = textwrap.dedent('''
    import json
    import torch
    import model as M, train as T

    def fsdp_run(ckpt, out):
        """3 steps of 4 sequences at whatever world size torchrun gave (1 without torchrun)."""
        rank, world, _, device = T.setup_distributed()
        cfg = T.TrainConfig(out_dir=out, steps=3, batch_size=4, micro_batch_size=4 // world, seq_len=16, lr=1e-2,
                            warmup_steps=1, dtype="fp32", log_every=1, activation_checkpointing=True)
        model = T.build_model(ckpt, cfg, device)
        assert T.is_sharded(model) == (world > 1)
        r = T.train(model, CycleLoader(model.args.vocab_size, cfg.micro_batch_size, 16, rank=rank, world_size=world),
                    ce_loss, cfg, device=device)
        if rank == 0:
            json.dump([[h["loss"], h["grad_norm"]] for h in r["history"]], open(out + "/losses.json", "w"))
''')
exec(FSDP_RUN)


def test_fsdp_two_gloo_processes_match_one_process(tmp_path):
    """torchrun --nproc_per_node 2 (gloo, FSDP2 per block + root, activation checkpointing, tied head) gives the
    losses and the exported weights of a single unsharded process."""
    src = tmp_path / "tied"
    M.save_model(tiny_model(seed=3, tied_embeddings=True), str(src))
    script = tmp_path / "worker.py"
    # the ranks leave through train.exit_process, skipping the interpreter finalization in which a gloo worker
    # thread can abort a finished run (1 run in 20-30 on 2 loaded cores): the atexit line must not print
    script.write_text(HELPERS + FSDP_RUN + "\nimport atexit, sys\ntorch.set_num_threads(1)\n"
                      "atexit.register(print, 'FINALIZED', flush=True)\nfsdp_run(*sys.argv[1:3])\nT.exit_process(0)\n")
    fsdp_run(str(src), str(tmp_path / "w1"))
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(src), str(tmp_path / "w2")], capture_output=True, text=True,
                         cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    assert "FINALIZED" not in two.stdout
    l1 = json.load(open(tmp_path / "w1" / "losses.json"))
    l2 = json.load(open(tmp_path / "w2" / "losses.json"))
    # the grad norm catches a gradient scaled by the world size, which AdamW would otherwise hide
    assert sum(l1, []) == pytest.approx(sum(l2, []), rel=1e-5) and l1[-1][0] < l1[0][0]
    a, b = M.load_model(str(tmp_path / "w1" / "model")), M.load_model(str(tmp_path / "w2" / "model"))
    assert b.args.tied_embeddings and b.lm_head.weight is b.embed_tokens.weight
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sb[k], sa[k], rtol=0, atol=1e-4)  # AdamW amplifies fp32 noise to ~1e-5
    ckpt = tmp_path / "w2" / "ckpt" / "step_000003"
    assert sorted(p.name for p in ckpt.iterdir() if p.name.startswith("rng")) == ["rng_rank0.pkl", "rng_rank1.pkl"]


RESUME_RUN = textwrap.dedent('''
    import os, signal
    import torch
    import model as M, train as T

    def resume_run(out, kill_at=-1, resume=False):
        """8 steps, a checkpoint every 2; SIGKILL this process when micro-batch `kill_at` is requested."""
        class Killer(CycleLoader):
            def batch(self, i):
                if i == kill_at:
                    os.kill(os.getpid(), signal.SIGKILL)
                return super().batch(i)

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # the same kernels in the subprocess and in pytest's process
        try:
            model = M.Transformer(M.ModelArgs.preset("tiny"))
            model.init_weights(0)
            cfg = T.TrainConfig(out_dir=out, steps=8, batch_size=4, micro_batch_size=2, seq_len=16, lr=1e-2,
                                warmup_steps=2, dtype="fp32", ckpt_every=2, log_every=0, resume=resume)
            T.train(model, Killer(model.args.vocab_size, 2, 16), ce_loss, cfg, device="cpu")
        finally:
            torch.set_num_threads(threads)
''')
exec(RESUME_RUN)


def test_sigkilled_run_resumes_bit_identical(tmp_path, capsys):
    script = tmp_path / "worker.py"
    script.write_text(HELPERS + RESUME_RUN + "\nimport sys\nresume_run(sys.argv[1], int(sys.argv[2]))\n")
    killed = run_py(str(script), str(tmp_path / "part"), str(5 * 2))  # killed at the start of step 6
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert T.latest_checkpoint(str(tmp_path / "part")).endswith("step_000004")
    assert not (tmp_path / "part" / "model").exists()
    resume_run(str(tmp_path / "part"), resume=True)
    assert "resumed from" in capsys.readouterr().out
    resume_run(str(tmp_path / "full"))
    a, b = M.load_model(str(tmp_path / "full" / "model")), M.load_model(str(tmp_path / "part" / "model"))
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k
    assert sorted(os.listdir(tmp_path / "part" / "ckpt")) == ["latest", "step_000006", "step_000008"]  # keep 2


def _params(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    loader = CycleLoader(TINY.vocab_size, 2, 16)
    m = tiny_model()
    T.train(m, loader, ce_loss, cfg_for(tmp_path, steps=4, ckpt_every=2), device="cpu")
    at_4 = _params(m)
    real_save = T.dcp.save

    def crashing_save(state, checkpoint_id, **kw):
        with open(os.path.join(checkpoint_id, "__0_0.distcp"), "wb") as f:
            f.write(b"partial")
        raise OSError("disk full (injected)")

    monkeypatch.setattr(T.dcp, "save", crashing_save)
    with pytest.raises(OSError, match="injected"):
        T.train(tiny_model(), loader, ce_loss, cfg_for(tmp_path, steps=6, ckpt_every=2, resume=True,
                resume_schedule_change=True), device="cpu")
    assert T.latest_checkpoint(str(tmp_path)).endswith("step_000004")
    assert (tmp_path / "ckpt" / "step_000006.tmp").exists()
    monkeypatch.setattr(T.dcp, "save", real_save)
    m2 = tiny_model(seed=7)
    opt = T.make_optimizer(m2, cfg_for(tmp_path))
    assert T.load_checkpoint(T.latest_checkpoint(str(tmp_path)), m2, opt, cfg_for(tmp_path, ckpt_every=2)) == 4
    for k, v in at_4.items():
        assert torch.equal(m2.state_dict()[k], v), k
    T.train(tiny_model(), loader, ce_loss, cfg_for(tmp_path, steps=6, ckpt_every=2, resume=True,
                resume_schedule_change=True), device="cpu")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest", "step_000004", "step_000006"]  # .tmp cleaned


def test_resume_refuses_an_incompatible_checkpoint(tmp_path):
    loader = CycleLoader(TINY.vocab_size, 2, 16)
    T.train(tiny_model(), loader, ce_loss, cfg_for(tmp_path, steps=2), device="cpu")
    ckpt = T.latest_checkpoint(str(tmp_path))
    before = {p: os.path.getmtime(os.path.join(ckpt, p)) for p in os.listdir(ckpt)}
    with pytest.raises(ValueError, match=r"another model shape \(dim 64 vs 32"):
        T.train(tiny_model(dim=32), loader, ce_loss, cfg_for(tmp_path, steps=4, resume=True), device="cpu")
    with pytest.raises(ValueError, match="batch_size 4; this run has batch_size 8"):
        T.train(tiny_model(), loader, ce_loss, cfg_for(tmp_path, steps=4, batch_size=8, resume=True), device="cpu")
    with pytest.raises(ValueError, match="pass --resume"):  # a fresh run must not overwrite an old one
        T.train(tiny_model(), loader, ce_loss, cfg_for(tmp_path, steps=4), device="cpu")
    with pytest.raises(ValueError, match="past --steps 1"):
        T.train(tiny_model(), loader, ce_loss, cfg_for(tmp_path, steps=1, resume=True, resume_schedule_change=True),
                device="cpu")
    assert {p: os.path.getmtime(os.path.join(ckpt, p)) for p in os.listdir(ckpt)} == before


def test_resume_refuses_another_seed_or_schedule_naming_the_fields(tmp_path):
    """The seed orders the data and the schedule is a function of (steps, lr, warmup, floor): a resume that
    changes them silently would not be the run it claims to continue."""
    loader = CycleLoader(TINY.vocab_size, 2, 16)
    T.train(tiny_model(), loader, ce_loss, cfg_for(tmp_path, steps=2, ckpt_every=1), device="cpu")
    go = lambda **kw: T.train(tiny_model(), loader, ce_loss, cfg_for(tmp_path, resume=True, **kw), device="cpu")
    with pytest.raises(ValueError, match="seed 0; this run has seed 5"):
        go(steps=2, seed=5)
    with pytest.raises(ValueError, match=r"steps 2, lr 0.01; this run has steps 3, lr 0.001.*--resume-schedule-change"):
        go(steps=3, lr=1e-3)
    with pytest.raises(ValueError, match="warmup_steps 1, min_lr_ratio 0.1; this run has warmup_steps 2, min_lr_ratio 0.5"):
        go(steps=2, warmup_steps=2, min_lr_ratio=0.5)
    with pytest.raises(ValueError, match="seed"):  # the data order cannot be overridden
        go(steps=3, seed=5, resume_schedule_change=True)
    assert go(steps=3, resume_schedule_change=True)["step"] == 3  # on purpose: allowed


def test_checkpoints_are_ordered_by_step_number_not_by_name(tmp_path):
    """step_1000000 sorts before step_999999 as a string: pruning by name would delete the newest."""
    m = tiny_model()
    cfg = cfg_for(tmp_path, keep_checkpoints=1)
    opt = T.make_optimizer(m, cfg)
    for step in (999_999, 1_000_000):
        T.save_checkpoint(str(tmp_path), step, m, opt, cfg)
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest", "step_1000000"]
    T.save_checkpoint(str(tmp_path), 999_998, m, opt, dataclasses.replace(cfg, keep_checkpoints=5))
    os.remove(tmp_path / "ckpt" / "latest")  # without the pointer: the highest step, not the last name
    assert T.latest_checkpoint(str(tmp_path)).endswith("step_1000000")


def test_wall_clock_checkpoints(tmp_path, monkeypatch):
    """ckpt_minutes writes a checkpoint when that much time has passed, whatever ckpt_every says."""
    clock = iter(range(0, 10_000, 700))  # 700 s per reading of train.py's clock: one check in two is due
    monkeypatch.setattr(T, "_wall_clock", lambda: next(clock))
    T.train(tiny_model(), CycleLoader(TINY.vocab_size, 2, 16), ce_loss,
            cfg_for(tmp_path, steps=5, ckpt_every=0, ckpt_minutes=20, keep_checkpoints=10), device="cpu")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest", "step_000002", "step_000004", "step_000005"]


def test_resume_restores_the_rng(tmp_path, monkeypatch):
    """A loss that draws random numbers (dropout-like noise), interrupted and resumed, ends bit-identical to
    an uninterrupted run; with the RNG restore skipped it does not (so the test can tell)."""
    class Stop(Exception):
        pass

    class Interrupt(CycleLoader):
        def batch(self, i):
            if i == self.stop_at:
                raise Stop
            return super().batch(i)

    def noisy(model, x, y, n_total):
        return ce_loss(model, x, y, n_total) * (1 + 0.5 * torch.rand(()))

    def run(out, stop_at=-1):
        loader = Interrupt(TINY.vocab_size, 2, 16)
        loader.stop_at = stop_at
        m = tiny_model()
        try:
            T.train(m, loader, noisy, cfg_for(out, steps=6, ckpt_every=2, resume=True), device="cpu")
        except Stop:
            return None
        return m.state_dict()

    full = run(tmp_path / "full")
    assert run(tmp_path / "cut", stop_at=4 * 2) is None  # stopped in step 5, checkpoint at step 4
    torch.manual_seed(123)  # whatever the process did in between
    resumed = run(tmp_path / "cut")
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    assert run(tmp_path / "skip", stop_at=4 * 2) is None
    monkeypatch.setattr(T, "_set_rng_state", lambda s: None)
    skipped = run(tmp_path / "skip")
    assert not all(torch.equal(full[k], skipped[k]) for k in full)


def test_non_finite_loss_stops_without_checkpointing_that_step(tmp_path):
    def nan_at_step_3(model, x, y, n_total):
        loss = ce_loss(model, x, y, n_total)
        return loss * float("nan") if calls.append(1) or len(calls) > 4 else loss  # 2 micro-batches per step

    calls = []
    m = tiny_model()
    with pytest.raises(T.TrainingDiverged, match="diverged at step 3") as e:
        T.train(m, CycleLoader(TINY.vocab_size, 2, 16), nan_at_step_3, cfg_for(tmp_path, steps=6, ckpt_every=1),
                device="cpu")
    assert e.value.step == 3
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest", "step_000001", "step_000002"]
    m2 = tiny_model(seed=5)
    T.load_checkpoint(T.latest_checkpoint(str(tmp_path)), m2, T.make_optimizer(m2, cfg_for(tmp_path)),
                      cfg_for(tmp_path, steps=6))
    for k, v in m.state_dict().items():  # the diverged step changed nothing
        assert torch.equal(m2.state_dict()[k], v), k


def test_progress_lines_metrics_and_export(tmp_path, capsys):
    m = tiny_model()
    r = T.train(m, CycleLoader(TINY.vocab_size, 2, 16), ce_loss,
                cfg_for(tmp_path, steps=4, log_every=2, export=True, eval_every=2), device="cpu",
                eval_fn=lambda model: {"x": 1.0})
    lines = [l for l in capsys.readouterr().out.splitlines() if l.startswith("[train] step")]
    assert len(lines) == 2
    assert re.fullmatch(r"\[train\] step 2/4 \| loss \d+\.\d{3} \| lr \d\.\de-\d\d \| [\d,]+ tok/s \| ETA \d+s", lines[0])
    recs = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
    assert [r_["step"] for r_ in recs if "loss" in r_] == [2, 4] and [r_["step"] for r_ in recs if "eval" in r_] == [2, 4]
    assert [h["step"] for h in r["history"]] == [1, 2, 3, 4] and r["tokens"] == 4 * 4 * 16
    cfg_saved = json.load(open(tmp_path / "config.json"))
    assert cfg_saved["train"]["steps"] == 4 and cfg_saved["grad_accum"] == 2
    loaded = M.load_model(r["export"])
    for k, v in m.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_mfu_table(monkeypatch):
    assert T.mfu(1e4, 1e9, "cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert T.mfu(1e4, 1e9, "cuda:0") == pytest.approx(1e13 / 989e12)
    assert T.mfu(1e4, 1e9, "cuda:0", dtype="fp32") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 PCIe")
    assert T.peak_flops("cuda:0") == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Future GPU")
    assert T.peak_flops("cuda:0") is None


def test_bf16_autocast_on_cpu_trains(tmp_path):
    m = tiny_model()
    r = T.train(m, CycleLoader(TINY.vocab_size, 2, 16), ce_loss, cfg_for(tmp_path, steps=6, dtype="bf16"), device="cpu")
    assert all(p.dtype == torch.float32 for p in m.parameters())  # fp32 master weights
    assert math.isfinite(r["history"][-1]["loss"]) and r["history"][-1]["loss"] < r["history"][0]["loss"]


def test_evaluate_is_the_token_weighted_mean():
    m, loader = tiny_model(), CycleLoader(TINY.vocab_size, 2, 16, seed=3)
    batches = [loader.batch(i) for i in range(3)]
    with torch.no_grad():
        logits = torch.cat([m(x) for x, _ in batches]).flatten(0, 1)
        ref = F.cross_entropy(logits, torch.cat([y for _, y in batches]).flatten(), ignore_index=-100)
    assert T.evaluate(m, loader, ce_loss, 3, device="cpu") == pytest.approx(float(ref), rel=1e-5)
    assert m.training  # mode restored


def test_run_clock_tells_wall_from_cpu_time():
    import time
    clock = T.run_clock()
    time.sleep(0.3)  # wall time passes, no CPU is spent
    slept = clock()
    assert set(slept) == {"seconds", "cpu_seconds", "loadavg_start", "loadavg_end"}
    assert slept["seconds"] >= 0.3 and slept["cpu_seconds"] < slept["seconds"]
    end = time.process_time() + 0.3
    while time.process_time() < end:  # now CPU time is spent too
        pass
    busy = clock()
    assert busy["cpu_seconds"] >= slept["cpu_seconds"] + 0.2 and busy["seconds"] >= slept["seconds"] + 0.2
