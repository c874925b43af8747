"""odpo.py: the soft DPO loss, the loop detector, think stripping, the PWRM, and a CPU micro-run."""
import math
import textwrap
import random

import numpy as np
import pydoc_data.topics
import pytest
import torch
import torch.nn.functional as F

import data as D
import odpo as O
from model import ModelArgs, Transformer
from train import TrainConfig

BETAS = [0.01, 0.1, 1.0, 5.0]


def _pairs(n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=g, dtype=torch.float64) * 5 for _ in range(4)]


# -- the loss ----------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", BETAS)
def test_loss_is_standard_dpo_for_hard_labels_without_rescaling(beta):
    a, b, ra, rb = _pairs()
    h = (a - ra) - (b - rb)
    assert torch.allclose(O.soft_dpo_loss(a, b, ra, rb, 1.0, beta, rescale=False), -F.logsigmoid(beta * h))
    assert torch.allclose(O.soft_dpo_loss(a, b, ra, rb, 0.0, beta, rescale=False), -F.logsigmoid(-beta * h))
    p = torch.tensor([0.0, 1.0]).repeat(8).double()  # per-pair labels
    want = torch.where(p == 1, -F.logsigmoid(beta * h), -F.logsigmoid(-beta * h))
    assert torch.allclose(O.soft_dpo_loss(a, b, ra, rb, p, beta, rescale=False), want)
    # rescaling divides by beta and nothing else
    assert torch.allclose(O.soft_dpo_loss(a, b, ra, rb, p, beta), want / beta)


@pytest.mark.parametrize("beta", BETAS)
def test_gradient_at_zero_margin_is_minus_p_minus_half(beta):
    p = torch.tensor([0.0, 0.1, 0.3, 0.5, 0.8, 1.0], dtype=torch.float64)
    ref_a, ref_b = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    a = ref_a.clone().requires_grad_(True)  # h = 0
    b = ref_b.clone().requires_grad_(True)
    O.soft_dpo_loss(a, b, ref_a, ref_b, p, beta).sum().backward()
    assert torch.allclose(a.grad, -(p - 0.5), atol=1e-12)  # dL/dh = dL/dlogp_a
    assert torch.allclose(b.grad, p - 0.5, atol=1e-12)


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
@pytest.mark.parametrize("p", [0.05, 0.3, 0.5, 0.9])
def test_minimiser_is_logit_p_over_beta(beta, p):
    def loss(h):
        z = torch.zeros(1, dtype=torch.float64)
        return float(O.soft_dpo_loss(torch.tensor([h], dtype=torch.float64), z, z, z, p, beta))
    lo, hi = -200.0, 200.0  # golden-section search, independent of the closed form
    g = (math.sqrt(5) - 1) / 2
    for _ in range(200):
        x1, x2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if loss(x1) < loss(x2):
            hi = x2
        else:
            lo = x1
    assert (lo + hi) / 2 == pytest.approx(math.log(p / (1 - p)) / beta, abs=1e-5)


def test_loss_rejects_bad_labels_and_beta():
    a, b, ra, rb = _pairs(2)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        O.soft_dpo_loss(a, b, ra, rb, torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="beta"):
        O.soft_dpo_loss(a, b, ra, rb, 0.5, beta=0.0)


# -- loop detection ----------------------------------------------------------------------------


def _text_ids(n, seed=0):
    rng = random.Random(seed)
    return [rng.randrange(1000, 4096) for _ in range(n)]


def test_loop_detector_catches_true_loops():
    prefix = _text_ids(30)
    assert O.is_looping(prefix + [7] * 64)  # one token over and over
    assert O.is_looping(prefix + [5, 6, 7] * 22)  # period 3, 66 tokens
    assert O.is_looping(prefix + _text_ids(20, 1) * 4)  # period 20, exactly 4 times (80 tokens)
    assert O.is_looping(prefix + _text_ids(20, 1) * 6 + [2], eos_id=2)  # a final EOS does not hide it
    assert O.is_looping(prefix + _text_ids(50, 2) * 4)  # long period, 200 tokens
    # length cap, no EOS, few distinct 4-grams but no exact period
    rng = random.Random(3)
    capped = [rng.choice([11, 12]) for _ in range(96)]
    assert O.is_looping(capped, max_new_tokens=96)


def test_loop_detector_spares_near_misses():
    prefix = _text_ids(30)
    assert not O.is_looping(prefix + _text_ids(20, 1) * 3 + _text_ids(10, 1))  # 3.5 repeats of period 20
    assert not O.is_looping(prefix + [5, 6] * 31)  # period 2 over 62 tokens: < 64
    assert not O.is_looping(prefix + [7] * 80 + _text_ids(12, 4))  # the loop ended: the tail is text
    assert not O.is_looping([7] * 40)  # short repetition ("ha ha ha")
    rng = random.Random(3)
    capped = [rng.choice([11, 12]) for _ in range(95)] + [2]  # the same text but it ended with EOS
    assert not O.is_looping(capped, eos_id=2, max_new_tokens=96)
    assert not O.is_looping([])


def test_loop_detector_passes_long_non_repeating_text():
    assert not O.is_looping(_text_ids(3000, 5), max_new_tokens=3000)
    tok = D.Tokenizer.from_file(vocab_size=4096)
    text = " ".join(list(pydoc_data.topics.topics.values())[:20])  # Python's help() texts
    ids = tok.encode(text)[:2000]
    assert len(ids) == 2000 and not O.is_looping(ids, max_new_tokens=2000)


# -- think stripping and the PWRM --------------------------------------------------------------


def test_strip_think_text_and_ids():
    assert O.strip_think("[THINK]try 41, 43[/THINK]The answer is 42.") == "The answer is 42."
    assert O.strip_think("[THINK]a[/THINK]b[THINK]c[/THINK]d") == "d"  # after the LAST [/THINK]
    assert O.strip_think("[THINK]never closes 41") == ""
    assert O.strip_think("The answer is 42.") == "The answer is 42."
    assert O.strip_think([20, 5, 6, 21, 7, 8, 2], 20, 21) == [7, 8, 2]
    assert O.strip_think([20, 5, 6], 20, 21) == []
    assert O.strip_think([5, 6, 2], 20, 21) == [5, 6, 2]
    assert O.strip_think([5, 6, 2], None, None) == [5, 6, 2]


@pytest.fixture(scope="module")
def tok():
    return D.Tokenizer.from_file(vocab_size=1256)


def _tiny(vocab, seed=0, max_seq_len=512):
    m = Transformer(ModelArgs(dim=32, n_layers=2, head_dim=8, hidden_dim=64, n_heads=4, n_kv_heads=2,
                              vocab_size=vocab, rope_theta=1e4, max_seq_len=max_seq_len))
    m.init_weights(seed=seed, std=0.5)  # large weights: margins far from 0
    return m


CONV = [{"role": "user", "content": "What is 2 + 3?"}]


def test_pwrm_score_is_order_symmetric(tok, one_thread):
    pwrm = O.PairwiseRewardModel(_tiny(tok.vocab_size), tok)
    pairs = [("The answer is 5.", "It is 6, I think."), ("5", "The answer is 5."), ("x y z", "x y z w")]
    for a, b in pairs:
        pab, pba = pwrm.prob_a_beats_b(CONV, a, b), pwrm.prob_a_beats_b(CONV, b, a)
        assert pab + pba == pytest.approx(1.0, abs=1e-6)
    # one order alone is not symmetric for this model: the averaging is doing the work
    m_ab = pwrm.margins([(CONV, a, b) for a, b in pairs])
    m_ba = pwrm.margins([(CONV, b, a) for a, b in pairs])
    assert (torch.sigmoid(m_ab) + torch.sigmoid(m_ba) - 1).abs().max() > 1e-3


def test_pwrm_never_sees_the_think_trace(tok, one_thread):
    pwrm = O.PairwiseRewardModel(_tiny(tok.vocab_size), tok)
    assert (pwrm.prompt_ids(CONV, "[THINK]41? 43?[/THINK]The answer is 5.", "6")
            == pwrm.prompt_ids(CONV, "The answer is 5.", "6"))
    assert pwrm.prob_a_beats_b(CONV, "[THINK]41? 43?[/THINK]The answer is 5.", "6") == \
        pytest.approx(pwrm.prob_a_beats_b(CONV, "The answer is 5.", "6"), abs=1e-6)


class _FixedMarginPWRM(O.PairwiseRewardModel):
    """Margins given directly (an overconfident judge), so calibration can be checked exactly."""

    def __init__(self, m_ab, m_ba):
        self.temperature, self._m = 1.0, {"ab": torch.tensor(m_ab), "ba": torch.tensor(m_ba)}

    def margins(self, items):
        return self._m["ab" if items[0][1] == "a" else "ba"]


def test_temperature_calibration_lowers_ece():
    rng = np.random.default_rng(0)
    true_logit = rng.normal(0, 1.5, 4000)
    y = (rng.random(4000) < 1 / (1 + np.exp(-true_logit))).astype(float)
    pwrm = _FixedMarginPWRM(4 * true_logit, -4 * true_logit)  # 4x overconfident, both orders agree
    info = pwrm.calibrate([([], "a", "b")] * 4000, y)
    assert info["temperature"] == pytest.approx(4.0, rel=0.15)
    assert info["ece_after"] < info["ece_before"] / 2 and info["nll_after"] < info["nll_before"]
    assert pwrm.temperature == info["temperature"]


def test_ece_of_a_calibrated_and_a_wrong_predictor():
    assert O.expected_calibration_error([0.25] * 4, [1, 0, 0, 0]) == pytest.approx(0.0)
    assert O.expected_calibration_error([0.9] * 10, [0] * 10) == pytest.approx(0.9)


# -- summed response log-probs -----------------------------------------------------------------


def test_response_logprobs_equal_the_plain_sum(one_thread):
    m = _tiny(300, seed=1)
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 300, (3, 12), generator=g)
    y = torch.randint(0, 300, (3, 12), generator=g)
    y[0, :5] = -100
    y[1, 9:] = -100
    y[2] = -100  # an empty response sums to 0
    got = O.response_logprobs(m, x, y)
    logp = torch.log_softmax(m(x).float(), -1)
    want = torch.stack([logp[b].gather(-1, y[b].clamp(min=0)[:, None])[:, 0][y[b] != -100].sum() for b in range(3)])
    assert torch.allclose(got, want, atol=1e-4)
    got.sum().backward()  # differentiable through the fused CE
    assert m.embed_tokens.weight.grad is not None


def test_response_logprobs_under_bf16_autocast(one_thread):
    m = _tiny(300, seed=2)
    m.init_weights(seed=2, std=0.05)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randint(0, 300, (4, 24), generator=g), torch.randint(0, 300, (4, 24), generator=g)
    y[:, :8] = -100
    want = O.response_logprobs(m, x, y)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = O.response_logprobs(m, x, y)
    assert got.dtype == torch.float32
    assert torch.allclose(got, want, rtol=2e-2), (got, want)
    a, b = got[0::2], got[1::2]
    assert torch.isfinite(O.soft_dpo_loss(a, b, want[0::2], want[1::2], torch.tensor([0.3, 0.9]))).all()


# -- the online loop on the CPU ----------------------------------------------------------------

GOOD = range(1100, 1160)  # the stub judge prefers responses with more of these tokens


class _CountingPWRM(O.PairwiseRewardModel):
    """A judge with a known preference: p = sigmoid(2 * (good tokens in a - good tokens in b))."""

    def __init__(self, model, tok):
        super().__init__(model, tok)

    def probs(self, items, temperature=None):
        count = lambda r: sum(int(t) in GOOD for t in r)
        return torch.tensor([1 / (1 + math.exp(-2 * (count(a) - count(b)))) for _, a, b in items])


def _good_mass(model, prompts):
    """Probability mass on the preferred tokens at the first response position, averaged over prompts."""
    with torch.no_grad():
        out = []
        for p in prompts:
            probs = torch.softmax(model(torch.tensor([p]))[0, -1].float(), -1)
            out.append(float(probs[list(GOOD)].sum()))
    return float(np.mean(out))


def test_micro_run_moves_the_policy_toward_preferred_responses(tok, tmp_path, one_thread):
    torch.manual_seed(0)
    policy, reference = _tiny(tok.vocab_size, seed=3, max_seq_len=128), _tiny(tok.vocab_size, seed=3, max_seq_len=128)
    for m in (policy, reference):
        m.init_weights(seed=3, std=0.1)
    pwrm = _CountingPWRM(_tiny(tok.vocab_size, seed=9), tok)
    prompts = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in [(2, 3), (7, 1), (4, 4), (9, 5)]]
    ids = [tok.encode_chat(c)[0] for c in prompts]
    before = _good_mass(policy, ids)
    cfg = O.ODPOConfig(max_new_tokens=8, max_prompt_tokens=48, beta=0.1)
    tcfg = TrainConfig(out_dir=str(tmp_path / "odpo"), steps=25, batch_size=8, micro_batch_size=8, lr=2e-2,
                       warmup_steps=1, dtype="fp32", log_every=0, export=False, weight_decay=0.0)
    out = O.run_odpo(policy, reference, pwrm, tok, prompts, cfg, tcfg, device="cpu")
    after = _good_mass(policy, ids)
    assert _good_mass(reference, ids) == pytest.approx(before)  # the reference stays frozen
    assert after > 1.5 * before, (before, after)  # measured: 0.043 -> 0.093
    assert len(out["steps"]) == 25 and all(math.isfinite(s["loss"]) for s in out["steps"])
    assert np.mean([s["reward_margin"] for s in out["steps"][-10:]]) > 0  # the policy's implicit reward agrees


# -- bad input ---------------------------------------------------------------------------------


def test_bad_input(tok, one_thread):
    policy = _tiny(tok.vocab_size, max_seq_len=64)
    pwrm = O.PairwiseRewardModel(_tiny(tok.vocab_size), tok)
    long_prompt = [[{"role": "user", "content": "word " * 200}]]
    with pytest.raises(ValueError, match="shorten the prompts"):
        O.RolloutLoader(policy, policy, pwrm, tok, long_prompt, O.ODPOConfig(), 2)
    with pytest.raises(ValueError, match="context"):  # fits max_prompt_tokens, not the model's context
        O.RolloutLoader(policy, policy, pwrm, tok, [CONV], O.ODPOConfig(max_new_tokens=48, max_prompt_tokens=32), 2)
    with pytest.raises(ValueError, match="empty generations"):
        O.RolloutLoader(policy, policy, pwrm, tok, [CONV], O.ODPOConfig(max_new_tokens=0), 2)
    with pytest.raises(ValueError, match="vocabulary"):  # a PWRM with another vocabulary
        O.PairwiseRewardModel(_tiny(tok.vocab_size + 8), tok)
    other = _tiny(tok.vocab_size + 8, max_seq_len=256)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        O.RolloutLoader(other, other, pwrm, tok, [CONV], O.ODPOConfig(max_new_tokens=8, max_prompt_tokens=32), 2)
    with pytest.raises(ValueError, match="two responses per prompt"):
        O.RolloutLoader(policy, policy, pwrm, tok, [CONV], O.ODPOConfig(max_new_tokens=8, max_prompt_tokens=32), 3)


def test_cli_bad_path_is_one_clear_error_line(tmp_path, capsys):
    rc = O.main(["--out", str(tmp_path / "o"), "--policy", str(tmp_path / "missing"), "--pwrm", str(tmp_path / "p"),
                 "--prompts", str(tmp_path / "prompts.jsonl")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --policy") and "checkpoint folder" in err[0]
    assert not (tmp_path / "o").exists()  # nothing written


# -- the loop detector at the caps post-training uses --------------------------------------------


def test_loop_detector_fires_at_a_48_token_cap():
    eos = 2
    assert O.loop_span(48) == 24 and O.loop_span(None) == 64 and O.loop_span(10) == 8
    loop47 = ([5, 6, 7] * 16)[:47] + [eos]  # 47 looping tokens, then the model happened to stop
    assert O.is_looping(loop47, eos_id=eos, max_new_tokens=48)
    text_then_loop = _text_ids(20, 7) + _text_ids(7, 8) * 4  # 20 tokens of text, then 4 x a 7-token period
    assert len(text_then_loop) == 48 and O.is_looping(text_then_loop, eos_id=eos, max_new_tokens=48)
    # ... and the same lengths without a loop stay clean
    assert not O.is_looping(_text_ids(47, 9) + [eos], eos_id=eos, max_new_tokens=48)
    three = _text_ids(27, 7) + _text_ids(7, 8) * 3  # only 3 repeats of the period
    assert not O.is_looping(three, eos_id=eos, max_new_tokens=48)
    assert not O.is_looping([9, 10, 11] * 7 + [eos], eos_id=eos, max_new_tokens=48)  # 21 tokens < the 24 span


# -- preference directions ---------------------------------------------------------------------


class _ReadingLM(torch.nn.Module):
    """A fake PWRM language model that reads its prompt: at every position, z_A - z_B = +4 when the text
    of Response A contains '= 5' and Response B's does not, -4 in the reverse case, 0 otherwise."""

    def __init__(self, tok):
        super().__init__()
        self.tok, self.args = tok, ModelArgs(dim=2, n_layers=1, head_dim=2, hidden_dim=2, n_heads=1, n_kv_heads=1,
                                              vocab_size=tok.vocab_size, max_seq_len=4096)
        self.embed_tokens = torch.nn.Embedding(tok.vocab_size, 1)
        self.lm_head = torch.nn.Linear(1, tok.vocab_size, bias=False)
        with torch.no_grad():
            self.lm_head.weight.zero_()
            self.lm_head.weight[tok.encode("A")[0]] = 1.0
            self.lm_head.weight[tok.encode("B")[0]] = -1.0

    def forward(self, x, head_fn):
        out = torch.zeros(x.shape[0], x.shape[1], 1)
        for r, row in enumerate(x.tolist()):
            text = self.tok.decode([t for t in row if t != self.tok.pad_id])
            a, b = text.split("Response A:")[1].split("Response B:")
            out[r] = 2.0 * (("= 5" in a) - ("= 5" in b))
        return head_fn(out, self.lm_head.weight)


GOOD_ANSWER, BAD_ANSWER = "2 + 3 = 5", "2 + 3 = 6"


def test_pwrm_prefers_the_better_response_in_either_order(tok):
    pwrm = O.PairwiseRewardModel(_ReadingLM(tok), tok)
    assert pwrm.prob_a_beats_b(CONV, GOOD_ANSWER, BAD_ANSWER) > 0.95
    assert pwrm.prob_a_beats_b(CONV, BAD_ANSWER, GOOD_ANSWER) < 0.05
    p = pwrm.probs([(CONV, GOOD_ANSWER, BAD_ANSWER), (CONV, BAD_ANSWER, GOOD_ANSWER), (CONV, GOOD_ANSWER, GOOD_ANSWER)])
    assert p[0] > 0.95 and p[1] < 0.05 and p[2] == pytest.approx(0.5)


def test_judge_pairs_a_loop_loses_whatever_the_pwrm_says(tok):
    pwrm = O.PairwiseRewardModel(_ReadingLM(tok), tok)
    cfg = O.ODPOConfig(max_new_tokens=48)
    clean_bad = tok.encode(BAD_ANSWER) + [tok.eos_id]  # a clean but wrong answer
    looping_good = tok.encode(GOOD_ANSWER) + tok.encode(" = 5") * 12  # right, then loops to the cap
    looping_good = looping_good[:48]
    assert O.is_looping(looping_good, eos_id=tok.eos_id, max_new_tokens=48)
    assert not O.is_looping(clean_bad, eos_id=tok.eos_id, max_new_tokens=48)
    assert pwrm.prob_a_beats_b(CONV, looping_good, clean_bad) > 0.95  # the PWRM alone would pick the loop
    p, keep = O.judge_pairs(pwrm, tok, cfg, [CONV] * 4, [looping_good, clean_bad, looping_good, clean_bad],
                            [clean_bad, looping_good, looping_good, clean_bad])
    assert p[:2] == [0.0, 1.0] and keep == [True, True, False, True]
    assert p[3] == pytest.approx(0.5)  # two equal clean answers: the PWRM's tie


def test_rollouts_sample_in_the_trainers_compute_dtype(tok, one_thread):
    policy = _tiny(tok.vocab_size, seed=3, max_seq_len=128)
    pwrm = O.PairwiseRewardModel(_tiny(tok.vocab_size, seed=9), tok)
    cfg = O.ODPOConfig(max_new_tokens=6, max_prompt_tokens=48)
    loader = O.RolloutLoader(policy, policy, pwrm, tok, [CONV], cfg, 2, dtype=torch.bfloat16)
    inputs, targets = loader.batch(0)
    assert loader.weights.dtype == torch.bfloat16 and policy.embed_tokens.weight.dtype == torch.float32
    assert (targets != -100).sum() > 0 and inputs.shape == targets.shape


# -- two processes -----------------------------------------------------------------------------

ODPO_RUN = textwrap.dedent('''
    import json, sys
    import torch
    import data as D, odpo as O, train as T

    def odpo_run(ckpt, pwrm_ckpt, out):
        """3 ODPO steps of 2 prompts x 2 samples at whatever world size torchrun gave (1 without torchrun):
        2 micro-batches of one prompt each, accumulated in one process or one per rank in two."""
        rank, world, _, device = T.setup_distributed()
        tok = D.Tokenizer.from_file(vocab_size=1256)
        cfg = T.TrainConfig(out_dir=out, steps=3, batch_size=4, micro_batch_size=2, seq_len=0, lr=2e-2,
                            warmup_steps=1, dtype="fp32", log_every=0, export=False, weight_decay=0.0)
        policy = T.build_model(ckpt, cfg, device)
        reference = T.build_model(ckpt, cfg, device, train=False)
        pwrm = O.PairwiseRewardModel(T.build_model(pwrm_ckpt, cfg, device, train=False), tok)
        assert T.is_sharded(policy) == T.is_sharded(pwrm.model) == (world > 1)
        prompts = [[{"role": "user", "content": f"What is {a} + {b}?"}] for a, b in [(2, 3), (7, 1)]]
        r = O.run_odpo(policy, reference, pwrm, tok, prompts, O.ODPOConfig(max_new_tokens=8, max_prompt_tokens=48),
                       cfg, device=device)
        if rank == 0:
            json.dump([[s["loss"], s["grad_norm"]] for s in r["steps"]], open(out + "/losses.json", "w"))
''')
exec(ODPO_RUN)


def test_odpo_two_gloo_processes_match_one_process(tok, tmp_path):
    """torchrun --nproc_per_node 2 (gloo; policy, reference and PWRM sharded by FSDP2; rollouts through the
    engine) gives the losses and gradient norms of one process accumulating the same two micro-batches."""
    import os, subprocess, sys, json
    from model import save_model
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for name, seed in (("policy", 3), ("pwrm", 9)):
        m = _tiny(tok.vocab_size, seed=seed, max_seq_len=128)
        m.init_weights(seed=seed, std=0.3 if name == "pwrm" else 0.1)
        save_model(m, str(tmp_path / name))
    script = tmp_path / "worker.py"
    script.write_text(ODPO_RUN + "\ntorch.set_num_threads(1)\nodpo_run(*sys.argv[1:4])\nT.exit_process(0)\n")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        odpo_run(str(tmp_path / "policy"), str(tmp_path / "pwrm"), str(tmp_path / "w1"))
    finally:
        torch.set_num_threads(threads)
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          str(script), str(tmp_path / "policy"), str(tmp_path / "pwrm"), str(tmp_path / "w2")],
                         capture_output=True, text=True, cwd=root,
                         env=dict(os.environ, PYTHONPATH=root, OMP_NUM_THREADS="1"), timeout=240)
    assert two.returncode == 0, two.stderr[-3000:]
    l1 = json.load(open(tmp_path / "w1" / "losses.json"))
    l2 = json.load(open(tmp_path / "w2" / "losses.json"))
    assert len(l1) == 3 and all(abs(x) > 1e-6 for x, _ in l1)  # the PWRM gave non-trivial labels
    assert sum(l1, []) == pytest.approx(sum(l2, []), rel=1e-4)
