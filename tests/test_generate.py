"""generate.py: the rollout engine against the no-cache reference (greedy tokens exactly, log-probs to
tolerance), the eager decode step against the general forward (fp32, bf16, prepacked wide projections),
prefill sharing, compaction of finished rows, log-probs at the sampling temperature, the prepacked CPU
matmuls, the CUDA graph (gpu), FSDP2-sharded weights (slow), bad input."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import generate as GEN  # noqa: E402
import model as M  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40, 41, 42]]


def with_eager_eos(m, eos=2, scale=1.0, seed=0):
    """Give EOS's output row a large random direction: a state emits EOS when it points that way, so rows end
    at different steps (about half of them early) and the eager path compacts its batch."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.lm_head.weight[eos] = torch.randn(m.args.dim, generator=g) * scale
    return m


def tiny_model(seed=0, **kw):
    m = M.Transformer(dataclasses.replace(M.ModelArgs.preset("tiny"), **kw))
    m.init_weights(seed, std=0.2)  # peaked logits: greedy ties cannot flip on rounding
    return m.eval()


@pytest.mark.parametrize("prepack", [True, False])
@pytest.mark.parametrize("kw", [{}, {"tied_embeddings": True, "qtemp_beta": 0.1, "qtemp_original_max_pos": 4}])
def test_greedy_equals_reference(prepack, kw):
    m = tiny_model(**kw)
    cfg = GEN.RolloutConfig(max_new_tokens=10, group_size=2, temperature=0.0, eos_id=None)
    ours = GEN.rollout(GEN.RolloutWeights(m, prepack=prepack), PROMPTS, cfg)
    ref = GEN.generate_reference(m, PROMPTS, cfg)
    assert torch.equal(ours.tokens, ref.tokens)
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=1e-4, rtol=0)
    assert ours.truncated.all() and (ours.lengths == 10).all()
    assert ours.prompt_index.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def _decode_via_forward(self, tok_B, pos_B, bias_BKS, slot):
    """The decode step through the general forward (T = 1, SDPA, the same cache): what decode() replaces."""
    return self.forward(tok_B[:, None], pos_B[:, None], bias_BKS[:, 0, None, :slot + 1], slot, slot + 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_step_equals_the_general_forward(monkeypatch, dtype):
    """decode() (bmm attention, addmm residuals, 3-op RMSNorm) against forward() at T = 1 on the same cache, at
    every step of a rollout with ragged prompts, G = 2 and the query temperature; fp32 and bf16 (decode's
    non-fp32 branch). Step by step, because in bf16 a rounding difference may flip a near-tied greedy token."""
    m = tiny_model(seed=5, qtemp_beta=0.1, qtemp_original_max_pos=4)
    decode, steps = GEN._Engine.decode, []

    def both(self, tok_B, pos_B, bias_BKS, slot):
        k0, v0 = self.k.clone(), self.v.clone()
        want = _decode_via_forward(self, tok_B, pos_B, bias_BKS, slot)
        k1, v1 = self.k.clone(), self.v.clone()
        self.k.copy_(k0), self.v.copy_(v0)
        got = decode(self, tok_B, pos_B, bias_BKS, slot)
        rel = lambda x, y: float((x.float() - y.float()).abs().max() / y.float().abs().max())
        steps.append(max(rel(got, want), rel(self.k, k1), rel(self.v, v1)))  # logits, and keys/values in place
        return got

    monkeypatch.setattr(GEN._Engine, "decode", both)
    cfg = GEN.RolloutConfig(max_new_tokens=9, group_size=2, temperature=0.0, eos_id=None)
    GEN.rollout(GEN.RolloutWeights(m, dtype=dtype), PROMPTS, cfg)
    assert len(steps) == 8
    assert max(steps) < (1e-5 if dtype == torch.float32 else 5e-2), steps  # bf16: a few ulps of the largest


def test_decode_with_prepacked_projections_equals_reference():
    """A model wide enough (o and down projections with >= 1024 columns) that decode() uses oneDNN's prepacked
    weights in the residual matmuls too."""
    m = tiny_model(seed=6, dim=1024, hidden_dim=1536, n_heads=16, n_kv_heads=8, head_dim=64)
    cfg = GEN.RolloutConfig(max_new_tokens=3, temperature=0.0, eos_id=None)
    W = GEN.RolloutWeights(m)
    ours = GEN.rollout(W, PROMPTS[:2], cfg)
    ref = GEN.generate_reference(m, PROMPTS[:2], cfg)
    assert torch.equal(ours.tokens, ref.tokens)
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=1e-4, rtol=0)


def test_eos_and_compaction_equal_reference(monkeypatch):
    m = with_eager_eos(tiny_model(seed=3))
    prompts = [[i, i + 1, i + 2] for i in range(5, 29, 3)]  # 8 prompts
    eos = 2
    calls = []
    keep = GEN._Engine.keep_rows
    monkeypatch.setattr(GEN._Engine, "keep_rows", lambda self, idx: (calls.append(idx.numel()), keep(self, idx)))
    cfg = GEN.RolloutConfig(max_new_tokens=8, temperature=0.0, eos_id=eos, pad_id=0)
    ours = GEN.rollout(GEN.RolloutWeights(m), prompts, cfg)
    ref = GEN.generate_reference(m, prompts, cfg)
    assert calls, "the test needs rows that end early enough to compact the batch"
    assert torch.equal(ours.tokens, ref.tokens) and torch.equal(ours.lengths, ref.lengths)
    assert torch.equal(ours.truncated, ref.truncated) and not ours.truncated.all()
    torch.testing.assert_close(ours.logprobs, ref.logprobs, atol=1e-4, rtol=0)
    for row, n in zip(ours.tokens, ours.lengths):
        assert (n == 8 or row[n - 1] == eos) and (row[n:] == 0).all()


def test_sampled_logprobs_are_at_the_sampling_temperature():
    """What GRPO's ratio uses: log softmax(logits / T) of each sampled token, recomputed by a full forward."""
    m = tiny_model(seed=1)
    T = 0.7
    cfg = GEN.RolloutConfig(max_new_tokens=12, group_size=4, temperature=T, eos_id=None, seed=5)
    r = GEN.rollout(GEN.RolloutWeights(m), PROMPTS[:2], cfg)
    for row in range(r.tokens.shape[0]):
        prompt = PROMPTS[int(r.prompt_index[row])]
        seq = torch.tensor([prompt + r.tokens[row].tolist()])
        logits = m(seq)[0, len(prompt) - 1:-1].float()
        want = torch.log_softmax(logits / T, -1).gather(-1, r.tokens[row][:, None])[:, 0]
        torch.testing.assert_close(r.logprobs[row], want, atol=1e-4, rtol=0)
        wrong = torch.log_softmax(logits, -1).gather(-1, r.tokens[row][:, None])[:, 0]
        assert (r.logprobs[row] - wrong).abs().max() > 1e-2  # T matters, so the check above is not vacuous
    groups = r.tokens.view(2, 4, -1)
    assert any(not torch.equal(g[0], g[j]) for g in groups for j in range(1, 4))  # G samples differ


def test_prepacked_matmul_agrees_with_plain():
    if not torch.backends.mkldnn.is_available():
        pytest.skip("this torch build has no oneDNN")
    w = torch.randn(96, 40)
    for rows in (1, 3, 17):
        x = torch.randn(rows, 96)
        torch.testing.assert_close(x @ GEN._Prepacked(w), x @ w, atol=1e-4, rtol=1e-4)


def test_refresh_follows_weight_updates():
    m = tiny_model(seed=2)
    W = GEN.RolloutWeights(m, prepack=False)
    cfg = GEN.RolloutConfig(max_new_tokens=6, temperature=0.0, eos_id=None)
    with torch.no_grad():
        for p in m.parameters():
            p.mul_(-1.3)
    W.refresh(m)
    assert torch.equal(GEN.rollout(W, PROMPTS, cfg).tokens, GEN.generate_reference(m, PROMPTS, cfg).tokens)


def test_bad_input():
    m = tiny_model()
    W = GEN.RolloutWeights(m)
    with pytest.raises(ValueError, match="exceeds the model's context"):
        GEN.rollout(W, [[1] * 4000], GEN.RolloutConfig(max_new_tokens=200))
    with pytest.raises(ValueError, match="non-empty"):
        GEN.rollout(W, [[1], []], GEN.RolloutConfig(max_new_tokens=2))


def test_mbu_table_says_unknown_rather_than_guessing(monkeypatch):
    assert GEN.peak_bandwidth("cpu") is None
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA H100 80GB HBM3")
    assert GEN.mbu(3.35e9, 1e-3, "cuda:0") == pytest.approx(1.0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "Some Future GPU")
    assert GEN.mbu(1e9, 1e-3, "cuda:0") is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_equals_reference():
    m = with_eager_eos(tiny_model(seed=4)).cuda()
    prompts = [[i, i + 1, i + 2] for i in range(5, 29, 3)]
    eos = 2
    for eos_id in (None, eos):
        cfg = GEN.RolloutConfig(max_new_tokens=8, group_size=2, temperature=0.0, eos_id=eos_id, cuda_graph=True,
                                sync_every=3)
        ours = GEN.rollout(GEN.RolloutWeights(m), prompts, cfg)
        ref = GEN.generate_reference(m, prompts, cfg)
        assert torch.equal(ours.tokens.cpu(), ref.tokens) and torch.equal(ours.lengths.cpu(), ref.lengths)
        torch.testing.assert_close(ours.logprobs.cpu(), ref.logprobs, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_fsdp2_sharded_weights_gather_once(tmp_path):
    """Two gloo ranks shard the model with train.parallelize; RolloutWeights gathers it and the rollout equals
    the unsharded model's on both ranks."""
    script = tmp_path / "w.py"
    script.write_text(textwrap.dedent(f"""
        import sys; sys.path.insert(0, {ROOT!r})
        import dataclasses, torch
        import generate as GEN, model as M, train as T
        torch.set_num_threads(1)
        rank, world, _, dev = T.setup_distributed()
        args = M.ModelArgs.preset("tiny")
        plain = M.Transformer(args); plain.init_weights(0, std=0.2); plain.eval()
        cfg = T.TrainConfig(dtype="fp32", fsdp="auto")
        sharded = T.build_model(args, cfg, dev, init_seed=0)
        for p, q in zip(sharded.parameters(), plain.parameters()):
            M._copy_into(p, q)  # each rank keeps its shard of the same weights
        assert T.is_sharded(sharded)
        rc = GEN.RolloutConfig(max_new_tokens=6, group_size=2, temperature=0.0, eos_id=None)
        a = GEN.rollout(GEN.RolloutWeights(sharded), {PROMPTS!r}, rc)
        b = GEN.rollout(GEN.RolloutWeights(plain), {PROMPTS!r}, rc)
        assert torch.equal(a.tokens, b.tokens), (a.tokens, b.tokens)
        print(f"OK{{rank}}", flush=True)
        T.exit_process(0)  # barrier, destroy, and leave without finalization (a gloo thread can abort it)
    """))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script)],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "OK0" in out.stdout and "OK1" in out.stdout
