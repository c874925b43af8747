"""The distillation stage of distill.py: the loss closures against the equation on full logits, a smaller
student learning a trained teacher's distribution, long-context switch, bad input, the CLI, and FSDP2 at
world size 2. CPU, tiny models, a learnable synthetic token stream (no data.py corpora)."""

import dataclasses
import json
import os
import subprocess
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import distill as DI  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from toy import HELPERS, CycleLoader  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


V = 256
TEACHER = dataclasses.replace(M.ModelArgs.preset("tiny"), vocab_size=V)
STUDENT = dataclasses.replace(TEACHER, dim=32, n_layers=1, hidden_dim=96, tied_embeddings=True)


def make(args, seed):
    m = M.Transformer(args)
    m.init_weights(seed)
    return m


def tcfg(tmp, **kw):
    base = dict(out_dir=str(tmp), steps=4, batch_size=4, micro_batch_size=4, seq_len=32, lr=1e-2, warmup_steps=2,
                dtype="fp32", log_every=0, export=False)
    return T.TrainConfig(**(base | kw))


@pytest.fixture(scope="module")
def trained_teacher(tmp_path_factory):
    """The tiny teacher after 40 steps of next-token CE on the cycle stream (about 1 s)."""
    teacher = make(TEACHER, 0)
    T.train(teacher, CycleLoader(V, 8, 32), DI.ce_loss_fn(DI.DistillConfig()),
            tcfg(tmp_path_factory.mktemp("teacher"), steps=40, batch_size=8, micro_batch_size=8, lr=2e-2),
            device="cpu")
    return teacher.eval().requires_grad_(False)


def full_kl_ce(student, teacher, x, y, n_total, T_=1.0):
    """The equation on full logits: sum over valid targets of KL(p_T || p_S) and of -log p_S(target), / n."""
    zs = student(x).flatten(0, 1).float()
    with torch.no_grad():
        zt = teacher(x).flatten(0, 1).float()
    valid = y.flatten() != -100
    log_ps, log_pt = F.log_softmax(zs / T_, -1), F.log_softmax(zt / T_, -1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)[valid].sum() / n_total
    ce = F.cross_entropy(zs, y.flatten(), ignore_index=-100, reduction="sum") / n_total
    return kl, ce


def test_kl_loss_fn_matches_the_equation_and_its_gradient(trained_teacher):
    x, y = CycleLoader(V, 2, 32, seed=5).batch(0)
    n_total = int((y != -100).sum()) + 7  # as if other micro-batches held 7 more valid tokens
    for cfg in (DI.DistillConfig(temperature=2.0), DI.DistillConfig(ce_weight=0.25)):
        s1, s2 = make(STUDENT, 1), make(STUDENT, 1)
        fused = DI.kl_loss_fn(trained_teacher, cfg)(s1, x, y, n_total)
        kl, ce = full_kl_ce(s2, trained_teacher, x, y, n_total, cfg.temperature)
        ref = (1 - cfg.ce_weight) * kl + cfg.ce_weight * ce
        torch.testing.assert_close(fused, ref.to(fused.dtype), rtol=1e-5, atol=1e-6)
        fused.backward()
        ref.backward()
        for (k, p1), (_, p2) in zip(s1.named_parameters(), s2.named_parameters()):
            torch.testing.assert_close(p1.grad, p2.grad, rtol=1e-4, atol=1e-6, msg=k)
    s1, s2 = make(STUDENT, 1), make(STUDENT, 1)
    torch.testing.assert_close(DI.ce_loss_fn(DI.DistillConfig())(s1, x, y, n_total),
                               full_kl_ce(s2, trained_teacher, x, y, n_total)[1], rtol=1e-5, atol=1e-6)


def test_evaluate_pair_matches_the_equation(trained_teacher):
    student, loader = make(STUDENT, 1), CycleLoader(V, 2, 32, seed=9)
    got = DI.evaluate_pair(student, trained_teacher, loader, 3)
    batches = [loader.batch(i) for i in range(3)]
    n = sum(int((y != -100).sum()) for _, y in batches)
    with torch.no_grad():
        kl = sum(full_kl_ce(student, trained_teacher, x, y, n)[0] for x, y in batches)
        ce = sum(full_kl_ce(student, trained_teacher, x, y, n)[1] for x, y in batches)
    assert got["tokens"] == n
    assert got["kl"] == pytest.approx(float(kl), rel=1e-5) and got["ce"] == pytest.approx(float(ce), rel=1e-5)
    assert student.training and not trained_teacher.training  # modes restored
    assert DI.evaluate_pair(student, None, loader, 3).keys() == {"ce", "tokens"}


def test_distilling_a_smaller_student_lowers_heldout_kl(trained_teacher, tmp_path):
    held_out = CycleLoader(V, 8, 32, seed=77)
    student = make(STUDENT, 2)
    before = DI.evaluate_pair(student, trained_teacher, held_out, 2)
    r = DI.distill(student, trained_teacher, CycleLoader(V, 8, 32, seed=1), tcfg(tmp_path, steps=40, batch_size=8,
                   micro_batch_size=8, lr=2e-2, export=True), DI.DistillConfig(), device="cpu",
                   eval_fn=lambda m: DI.evaluate_pair(m, trained_teacher, held_out, 2))
    after = r["evals"][-1]["eval"]
    assert after["kl"] < 0.5 * before["kl"], (before, after)
    assert after["ce"] < before["ce"]
    assert all(not p.requires_grad for p in trained_teacher.parameters())
    saved = json.load(open(tmp_path / "config.json"))
    assert saved["distill"]["temperature"] == 1.0 and saved["long_context"] is False
    assert M.read_checkpoint_args(r["export"])[0] == STUDENT


def test_long_context_switches_the_student_and_restores_the_teacher(trained_teacher, tmp_path):
    student = make(STUDENT, 2)
    dcfg = DI.DistillConfig(long_yarn_factor=4.0, long_original_max_pos=16, long_qtemp_beta=0.1)
    teacher_args = trained_teacher.args
    short_teacher = dataclasses.replace(teacher_args, max_seq_len=16)  # shorter than the long stage's 32
    trained_teacher.args = short_teacher
    seen = []

    def spy_eval(m):
        seen.append(trained_teacher.args)
        return {}

    try:
        r = DI.distill(student, trained_teacher, CycleLoader(V, 4, 32), tcfg(tmp_path, steps=1, export=True), dcfg,
                       device="cpu", long_context=True, eval_fn=spy_eval)
        assert seen[0].yarn_factor == 2.0 and seen[0].yarn_original_max_pos == 16 and seen[0].qtemp_beta is None
        assert trained_teacher.args is short_teacher  # restored after the stage
    finally:
        trained_teacher.args = teacher_args
        trained_teacher.reset_buffers()
    a = student.args
    assert (a.yarn_factor, a.yarn_original_max_pos, a.qtemp_beta, a.qtemp_original_max_pos, a.max_seq_len) == \
        (4.0, 16, 0.1, 16, 64)
    torch.testing.assert_close(student.inv_freq, M.rope_inv_freq(a))
    assert M.read_checkpoint_args(r["export"])[0] == a  # the export carries YaRN + query temperature
    with pytest.raises(ValueError, match="exceeds the student's max_seq_len 64"):
        DI.distill(make(STUDENT, 2), trained_teacher, CycleLoader(V, 4, 128), tcfg(tmp_path / "b", seq_len=128),
                   dcfg, device="cpu", long_context=True)


def test_a_refused_long_stage_leaves_the_teacher_as_it_was(trained_teacher, tmp_path):
    """The teacher is switched to YaRN for a long stage; a seq-len error after the switch must undo it."""
    args = trained_teacher.args
    freq = trained_teacher.inv_freq.clone()
    dcfg = DI.DistillConfig(long_yarn_factor=2.0, long_original_max_pos=16)  # student reaches 32, stage asks 128
    trained_teacher.args = dataclasses.replace(args, max_seq_len=64)  # 128 > 64: the teacher gets YaRN
    short = trained_teacher.args
    try:
        with pytest.raises(ValueError, match="exceeds the student's max_seq_len 32"):
            DI.distill(make(STUDENT, 2), trained_teacher, CycleLoader(V, 4, 128), tcfg(tmp_path, seq_len=128), dcfg,
                       device="cpu", long_context=True)
        assert trained_teacher.args is short and trained_teacher.args.yarn_factor is None
        torch.testing.assert_close(trained_teacher.inv_freq, freq, rtol=0, atol=0)
    finally:
        trained_teacher.args = args
        trained_teacher.reset_buffers()


def test_bf16_at_world_size_one_hands_the_fused_loss_bf16(trained_teacher, tmp_path, monkeypatch):
    """Autocast (one process, --dtype bf16) leaves the student's final hidden states and master head fp32; the
    stage must give the fused op bf16, as FSDP2's mixed precision does, not make it upcast the bf16 teacher."""
    seen = []
    real = DI._fused_loop

    def spy(hs, ws, ht, wt, *a):
        seen.append((hs.dtype, ws.dtype, None if ht is None else ht.dtype, None if wt is None else wt.dtype))
        return real(hs, ws, ht, wt, *a)

    monkeypatch.setattr(DI, "_fused_loop", spy)
    teacher = T.parallelize(make(TEACHER, 0), tcfg(tmp_path, dtype="bf16"), torch.device("cpu"), train=False)
    student = make(STUDENT, 2)
    r = DI.distill(student, teacher, CycleLoader(V, 4, 32), tcfg(tmp_path, steps=2, dtype="bf16"), DI.DistillConfig(),
                   device="cpu")
    assert seen and all(d == (torch.bfloat16,) * 4 for d in seen), seen
    assert all(p.dtype == torch.float32 and p.grad is None for p in student.parameters())  # fp32 masters
    assert r["history"][-1]["loss"] < r["history"][0]["loss"] * 1.5  # finite, trained
    seen.clear()
    T.train(student, CycleLoader(V, 4, 32), DI.ce_loss_fn(DI.DistillConfig()),
            tcfg(tmp_path / "ce", steps=1, dtype="bf16"), device="cpu")
    assert seen == [(torch.bfloat16, torch.bfloat16, None, None)]


def test_interrupted_distillation_stage_resumes_bit_identical(trained_teacher, tmp_path):
    """A long-context distillation stage stopped after its step-2 checkpoint and run again (a fresh student from
    the same init, as cascade.py rebuilds it) ends bit-identical to an uninterrupted stage."""
    class Stop(Exception):
        pass

    class Interrupt(CycleLoader):
        stop_at = -1

        def batch(self, i):
            if i == self.stop_at:
                raise Stop
            return super().batch(i)

    dcfg = DI.DistillConfig(temperature=1.5, long_yarn_factor=2.0, long_original_max_pos=16, long_qtemp_beta=0.1)

    def run(out, stop_at=-1):
        loader = Interrupt(V, 4, 32, seed=3)
        loader.stop_at = stop_at
        student = make(STUDENT, 2)
        try:
            DI.distill(student, trained_teacher, loader, tcfg(out, steps=5, ckpt_every=2, resume=True), dcfg,
                       device="cpu", long_context=True)
        except Stop:
            return None
        return student.state_dict()

    full = run(tmp_path / "full")
    assert run(tmp_path / "cut", stop_at=3) is None  # stopped in step 4, after the step-2 checkpoint
    assert T.latest_checkpoint(str(tmp_path / "cut")).endswith("step_000002")
    torch.manual_seed(99)
    resumed = run(tmp_path / "cut")
    assert full.keys() == resumed.keys() and all(torch.equal(full[k], resumed[k]) for k in full)


def test_vocabulary_mismatch_is_refused(trained_teacher, tmp_path):
    small_vocab = make(dataclasses.replace(STUDENT, vocab_size=128), 0)
    with pytest.raises(ValueError, match="student has 128 tokens, the teacher 256"):
        DI.distill(small_vocab, trained_teacher, CycleLoader(128, 4, 32), tcfg(tmp_path), DI.DistillConfig(),
                   device="cpu")
    assert not (tmp_path / "ckpt").exists()


def test_nan_teacher_stops_the_stage_and_keeps_the_last_checkpoint(trained_teacher, tmp_path):
    student, loader = make(STUDENT, 2), CycleLoader(V, 4, 32)
    DI.distill(student, trained_teacher, loader, tcfg(tmp_path, steps=2), DI.DistillConfig(), device="cpu")
    broken = make(TEACHER, 0)
    with torch.no_grad():
        broken.norm.weight[0] = float("nan")
    with pytest.raises(T.TrainingDiverged, match="step 3"):
        DI.distill(student, broken, loader, tcfg(tmp_path, steps=4, resume=True, resume_schedule_change=True),
                   DI.DistillConfig(), device="cpu")
    assert sorted(os.listdir(tmp_path / "ckpt")) == ["latest", "step_000002"]


def _write_tokens(path, n, vocab):
    import data as D  # the shard format belongs to data.py; a stand-in tokenizer names vocab and hash
    tok = types.SimpleNamespace(vocab_size=vocab, file_hash="0" * 64)
    x, _ = CycleLoader(vocab, 1, n - 1).batch(0)
    D.write_shards(x.flatten().numpy(), path, tok)


def test_cli_missing_teacher_is_one_line_and_loses_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc = DI.main(["--student", "tiny", "--teacher", str(tmp_path / "nope"), "--data", str(tmp_path), "--out",
                  str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 1 and len(err) == 1 and "teacher checkpoint folder" in err[0] and "nope" in err[0]
    assert os.listdir(out) == ["keep.txt"]
    with pytest.raises(SystemExit):
        DI.main(["--teacher", "x", "--no-such-flag"])


def test_cli_pretrains_then_distils(tmp_path, capsys):
    _write_tokens(tmp_path / "tokens", 4000, 512)
    common = ["--data", str(tmp_path / "tokens"), "--val-data", str(tmp_path / "tokens"), "--steps", "3",
              "--batch-size", "2", "--micro-batch-size", "2", "--seq-len", "32", "--dtype", "fp32", "--log-every", "1",
              "--eval-batches", "1"]
    assert DI.main(["--student", "tiny", "--loss", "ce", "--out", str(tmp_path / "teacher"), *common]) == 0
    assert DI.main(["--student", "tiny", "--teacher", str(tmp_path / "teacher" / "model"), "--seed", "3",
                    "--out", str(tmp_path / "student"), *common]) == 0
    out = capsys.readouterr().out
    assert "[pretrain] step 3/3" in out and "[distill] step 3/3" in out
    evals = [json.loads(l) for l in open(tmp_path / "student" / "metrics.jsonl") if '"eval"' in l]
    assert set(evals[-1]["eval"]) == {"ce", "kl", "tokens"}


DIST_WORKER = HELPERS + textwrap.dedent('''
    import json, os, sys
    import torch
    from torch.distributed.tensor import DTensor
    import distill as DI, model as M, train as T
    torch.set_num_threads(1)
    teacher_path, student_path, out = sys.argv[1:4]
    rank, world, _, device = T.setup_distributed()

    def held(m):
        """Bytes of m's parameters this rank holds (its shard of a DTensor, the whole of a plain tensor)."""
        return sum((p.to_local() if isinstance(p, DTensor) else p).nbytes for p in m.parameters())

    results = {}
    for dtype in ("fp32", "bf16"):  # the default --dtype bf16: FSDP2 mixed precision, or autocast in one process
        cfg = T.TrainConfig(out_dir=os.path.join(out, dtype), steps=3, batch_size=4, micro_batch_size=4 // world,
                            seq_len=32, lr=1e-2, warmup_steps=1, dtype=dtype, log_every=0, fsdp=sys.argv[4])
        teacher = T.build_model(teacher_path, cfg, device, train=False)
        student = T.build_model(student_path, cfg, device)
        held_out = CycleLoader(teacher.args.vocab_size, 4 // world, 32, seed=77, rank=rank, world_size=world)
        r = DI.distill(student, teacher, CycleLoader(teacher.args.vocab_size, cfg.micro_batch_size, 32, rank=rank,
                       world_size=world), cfg, DI.DistillConfig(temperature=1.5), device=device,
                       eval_fn=lambda m: DI.evaluate_pair(m, teacher, held_out, 1))
        full = sum(p.numel() for p in M.Transformer(teacher.args).parameters()) * teacher.lm_head.weight.element_size()
        results[dtype] = {"steps": [[h["loss"], h["grad_norm"]] for h in r["history"]], "eval": r["evals"][-1]["eval"],
                          "teacher_dtypes": sorted({str(p.dtype) for p in teacher.parameters()}),
                          "teacher_all_dtensor": all(isinstance(p, DTensor) for p in teacher.parameters()),
                          "teacher_bytes_held": held(teacher), "teacher_bytes_full": full}
    json.dump(results, open(os.path.join(out, f"result_rank{rank}.json"), "w"))
    T.exit_process(0)  # barrier, destroy, and leave without finalization (a gloo thread can abort it)
''')


@pytest.mark.slow
def test_fsdp_two_processes_distil_like_one(trained_teacher, tmp_path):
    """fp32 and the default bf16, 2 gloo processes against 1. Teacher and student fully sharded (blocks and
    root): same KL losses, grad norms and held-out evaluation as one process; after the steps and the
    evaluation every teacher parameter is still a DTensor shard and each rank holds half the teacher's
    bytes (one process holds all of it)."""
    M.save_model(trained_teacher, str(tmp_path / "teacher"))
    M.save_model(make(STUDENT, 4), str(tmp_path / "student"))
    script = tmp_path / "worker.py"
    script.write_text(DIST_WORKER)
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    paths = [str(tmp_path / "teacher"), str(tmp_path / "student")]
    one = subprocess.run([sys.executable, str(script), *paths, str(tmp_path / "w1"), "auto"], capture_output=True,
                         text=True, env=env, cwd=ROOT, timeout=180)
    assert one.returncode == 0, one.stderr[-3000:]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), *paths, str(tmp_path / "w2"), "auto"], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=180)
    assert two.returncode == 0, two.stderr[-3000:]
    r1 = json.load(open(tmp_path / "w1" / "result_rank0.json"))
    r2 = [json.load(open(tmp_path / "w2" / f"result_rank{r}.json")) for r in range(2)]
    # bf16: one process runs autocast (fp32 residual stream), two run FSDP2 mixed precision (bf16 throughout)
    # (seen: bf16 losses and grad norms within 4e-3 of each other, the held-out KL within 3e-5)
    for dtype, rel, rel_eval in (("fp32", 1e-5, 1e-4), ("bf16", 1e-2, 1e-3)):
        a, b = r1[dtype], r2[0][dtype]
        assert sum(a["steps"], []) == pytest.approx(sum(b["steps"], []), rel=rel), dtype
        assert a["eval"]["tokens"] == b["eval"]["tokens"]
        assert a["eval"]["kl"] == pytest.approx(b["eval"]["kl"], rel=rel_eval), dtype
        assert a["teacher_dtypes"] == b["teacher_dtypes"] == [f"torch.{'float32' if dtype == 'fp32' else 'bfloat16'}"]
        assert a["teacher_bytes_held"] == a["teacher_bytes_full"]
        for rank in range(2):
            c = r2[rank][dtype]
            assert c["teacher_all_dtensor"], (dtype, rank)
            assert c["teacher_bytes_held"] <= 0.5 * c["teacher_bytes_full"] + 1024, (dtype, rank)


FAIL_WORKER = textwrap.dedent('''
    import sys
    import torch
    import distill as DI, train as T
    torch.set_num_threads(1)
    fail_rank = int(sys.argv[1])
    real_rng_state = T._rng_state

    def failing_rng_state():  # called by every rank while it writes its checkpoint files
        if T.rank_world()[0] == fail_rank:
            raise ValueError(f"injected failure on rank {fail_rank}")
        return real_rng_state()

    T._rng_state = failing_rng_state
    sys.exit(DI.main(sys.argv[2:]))
''')


@pytest.mark.slow
@pytest.mark.parametrize("fail_rank", [1, 0])
def test_an_error_on_one_rank_stops_every_rank(tmp_path, fail_rank):
    """Two processes launched without torchrun's agent (as a cluster scheduler would: RANK, WORLD_SIZE,
    MASTER_ADDR/PORT), one fails while writing a checkpoint: both exit non-zero within 60 s on their own,
    the error is printed once (whichever rank raised it), and the peer adds one line, no traceback."""
    import socket
    import time
    _write_tokens(tmp_path / "tokens", 3000, 512)
    script = tmp_path / "worker.py"
    script.write_text(FAIL_WORKER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(fail_rank), "--student", "tiny", "--loss", "ce", "--data", str(tmp_path / "tokens"), "--out",
            str(tmp_path / "run"), "--steps", "2", "--batch-size", "4", "--micro-batch-size", "2", "--seq-len", "32",
            "--dtype", "fp32", "--log-every", "0", "--ckpt-every", "1"]
    procs, t0 = [], time.time()
    for rank in range(2):
        env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1", RANK=str(rank), LOCAL_RANK=str(rank),
                   WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(script), *argv], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=max(1.0, 60 - (time.time() - t0))))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    assert time.time() - t0 < 60
    text = "".join(o + e for o, e in outs)
    assert all(p.returncode != 0 for p in procs), text[-3000:]
    assert text.count(f"injected failure on rank {fail_rank}") == 1, text[-3000:]
    assert f"[rank {fail_rank}/2] error: injected failure on rank {fail_rank}" in outs[fail_rank][1]
    assert "Traceback" not in text, text[-3000:]


def test_teacher_cache_reuses_repeated_batches_and_changes_nothing(trained_teacher, tmp_path):
    """The cascade distils every size on the same batches: with distill.TeacherCache the second student's
    stage runs no teacher forward at all, and every student ends bit-identical to one trained without it.
    A teacher whose args change (the long stage's RoPE switch) is not served the old hidden states."""
    def student_after(tag):
        s = make(STUDENT, 3)
        DI.distill(s, trained_teacher, CycleLoader(V, 4, 32, seed=3), tcfg(tmp_path / tag), DI.DistillConfig(),
                   device="cpu")
        return s.state_dict()

    forwards = []
    real_forward = trained_teacher.forward
    trained_teacher.forward = lambda *a, **k: forwards.append(1) or real_forward(*a, **k)
    try:
        plain = student_after("plain")
        assert len(forwards) == 4
        cache = DI.attach_teacher_cache(trained_teacher, 16)
        first, n_first = student_after("first"), len(forwards)
        second = student_after("second")
        assert (n_first - 4, len(forwards) - n_first) == (4, 0)  # the repeat ran no teacher forward
        assert (cache.misses, cache.hits) == (4, 4)
        for state in (first, second):
            for k in plain:
                assert torch.equal(state[k], plain[k]), k
        x = CycleLoader(V, 4, 32, seed=3).batch(0)[0]
        old = DI.teacher_hidden(trained_teacher, x)
        args = trained_teacher.args
        trained_teacher.args = dataclasses.replace(args, rope_theta=args.rope_theta * 7)
        trained_teacher.reset_buffers()
        new = DI.teacher_hidden(trained_teacher, x)
        with torch.no_grad():
            assert torch.equal(new, trained_teacher(x, return_hidden=True)) and not torch.equal(new, old)
        small = DI.attach_teacher_cache(trained_teacher, 0)
        assert small is None and trained_teacher.hidden_cache is None
    finally:
        del trained_teacher.forward
        if "args" in locals():
            trained_teacher.args = args
            trained_teacher.reset_buffers()
        DI.attach_teacher_cache(trained_teacher, 0)
