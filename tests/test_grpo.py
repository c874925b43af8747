"""grpo.py: the loss against a per-token loop over the equation, advantages and group dropping, clipping at
both epsilons, reward parsing edge cases, the rubric judge, a CPU micro-run where the mean reward rises
(through train.py's loop), bad input (a raising reward, a prompt past the context, G = 1), and the demo's
held-out split (unseen, large) with its sign test."""

import os
import sys
from fractions import Fraction

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data as D  # noqa: E402
import grpo as GR  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


# -- the loss ------------------------------------------------------------------------------------------

def loss_by_loops(logp, old, adv, mask, G, eps_low, eps_high, agg, L=None):
    """The objective written token by token, as the equation reads (minus sign: a loss)."""
    N, T_ = logp.shape
    term = [[None] * T_ for _ in range(N)]
    for i in range(N):
        for t in range(T_):
            rho = torch.exp(logp[i, t] - old[i, t])
            term[i][t] = torch.minimum(rho * adv[i], torch.clamp(rho, 1 - eps_low, 1 + eps_high) * adv[i])
    if agg == "group_token":
        groups = []
        for g in range(N // G):
            rows = range(g * G, (g + 1) * G)
            n_tok = sum(int(mask[i, t]) for i in rows for t in range(T_))
            if n_tok:
                groups.append(sum(term[i][t] for i in rows for t in range(T_) if mask[i, t]) / n_tok)
        return -sum(groups) / len(groups)
    if agg == "seq_mean":
        seqs = [sum(term[i][t] for t in range(T_) if mask[i, t]) / int(mask[i].sum()) for i in range(N) if mask[i].any()]
        return -sum(seqs) / len(seqs)
    total = sum(term[i][t] for i in range(N) for t in range(T_) if mask[i, t])
    if agg == "token_mean":
        return -total / int(mask.sum())
    return -total / (N * L)  # "constant": the response budget L = max_new_tokens, not the padded T


@pytest.mark.parametrize("agg", ["group_token", "seq_mean", "token_mean", "constant"])
def test_loss_equals_per_token_equation(agg):
    g = torch.Generator().manual_seed(0)
    N, T_, G = 8, 6, 4
    old = -torch.rand(N, T_, generator=g) * 3
    logp = (old + torch.randn(N, T_, generator=g) * 0.3).requires_grad_()  # ratios inside and outside the clip
    adv = torch.randn(N, generator=g)
    mask = torch.rand(N, T_, generator=g) > 0.3
    mask[0] = False  # an empty sequence
    lengths_differ = mask.sum(-1)
    assert len(set(lengths_differ.tolist())) > 2  # so the aggregations really differ
    ours = GR.grpo_loss(logp, old, adv, mask, G, 0.2, 0.28, agg, max_new_tokens=4)
    ref = loss_by_loops(logp, old, adv, mask, G, 0.2, 0.28, agg, L=4)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6)
    g1, = torch.autograd.grad(ours, logp)
    g2, = torch.autograd.grad(ref, logp)
    torch.testing.assert_close(g1, g2, rtol=1e-5, atol=1e-7)


def test_group_token_weights_by_the_groups_token_count():
    """Magistral: a group's token sum is divided by that group's total generated tokens, so a long group's
    tokens weigh less each; GRPO's per-sequence mean gives the same two groups different values."""
    logp = torch.zeros(4, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]], dtype=torch.bool)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    # group 0: (4 - 1) / 5 tokens; group 1: (2 - 2) / 4; mean over the two groups = 0.3
    assert float(GR.grpo_loss(logp, logp, adv, mask, 2, agg="group_token")) == pytest.approx(-0.3)
    assert float(GR.grpo_loss(logp, logp, adv, mask, 2, agg="seq_mean")) == pytest.approx(0.0)


def test_clipping_at_both_epsilons():
    """d loss / d logp is zero exactly where the clip binds: rho > 1 + eps_high for A > 0, rho < 1 - eps_low
    for A < 0; 1.25 is inside the asymmetric clip (eps_high 0.28) but would be outside a symmetric 0.2."""
    rho = torch.tensor([0.7, 0.85, 1.25, 1.3, 0.7, 0.85, 1.25, 1.3])
    adv = torch.tensor([1.0] * 4 + [-1.0] * 4)
    logp = torch.log(rho).requires_grad_()
    loss = GR.grpo_loss(logp[:, None], torch.zeros(8, 1), adv, torch.ones(8, 1, dtype=torch.bool), 1,
                        eps_low=0.2, eps_high=0.28, agg="token_mean")
    grad, = torch.autograd.grad(loss, logp)
    moving = (grad != 0).tolist()
    #        A > 0: 0.7   0.85  1.25  1.3    | A < 0: 0.7    0.85  1.25  1.3
    assert moving == [True, True, True, False, False, True, True, True]
    loss_sym = GR.grpo_loss(logp[:, None], torch.zeros(8, 1), adv, torch.ones(8, 1, dtype=torch.bool), 1,
                            eps_low=0.2, eps_high=0.2, agg="token_mean")
    grad_sym, = torch.autograd.grad(loss_sym, logp)
    assert grad_sym[2] == 0  # the symmetric clip would stop 1.25


def test_empty_mask_gives_a_zero_that_backpropagates():
    logp = torch.randn(4, 3, requires_grad=True)
    loss = GR.grpo_loss(logp, logp.detach(), torch.zeros(4), torch.zeros(4, 3, dtype=torch.bool), 2)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert logp.grad is not None and not logp.grad.any()


# -- advantages -----------------------------------------------------------------------------------------

def test_group_advantages_centre_normalise_and_drop():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0,    # group 0: mean 0.25
                      0.1, 0.1, 0.1, 0.1,    # group 1: all equal -> dropped
                      1.0, 1.0, 0.0, 0.0])   # group 2: mean 0.5
    adv, kept = GR.group_advantages(r, 4, norm="none")
    assert kept.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    torch.testing.assert_close(adv, torch.tensor([0.75, -0.25, -0.25, -0.25, 0, 0, 0, 0, 0.5, 0.5, -0.5, -0.5]))
    adv_mb, _ = GR.group_advantages(r, 4, norm="minibatch")
    a = torch.tensor([0.75, -0.25, -0.25, -0.25, 0.5, 0.5, -0.5, -0.5])
    want = (a - a.mean()) / a.std(correction=0)
    torch.testing.assert_close(adv_mb[kept], want)
    assert (adv_mb[~kept] == 0).all()
    assert float(adv_mb[kept].std(correction=0)) == pytest.approx(1.0, abs=1e-5)
    adv_g, _ = GR.group_advantages(r, 4, norm="group")
    torch.testing.assert_close(adv_g[:4], torch.tensor([0.75, -0.25, -0.25, -0.25]) / torch.tensor(0.1875).sqrt(),
                               rtol=1e-5, atol=1e-5)


def test_group_dropping_uses_std_epsilon_for_continuous_rewards():
    r = torch.tensor([0.5, 0.5 + 1e-6, 0.2, 0.9], dtype=torch.float64)
    for norm in ("group", "minibatch", "none"):
        adv, kept = GR.group_advantages(r, 2, norm=norm, eps=1e-5)
        assert kept.tolist() == [False, False, True, True]
        assert (adv[:2] == 0).all()  # a dropped group carries no advantage at all


def test_g1_and_ragged_groups_are_refused():
    with pytest.raises(ValueError, match="G >= 2"):
        GR.group_advantages(torch.ones(4), 1)
    with pytest.raises(ValueError, match="multiple of group_size"):
        GR.group_advantages(torch.ones(5), 2)
    with pytest.raises(ValueError, match="G >= 2"):
        GR.check_config(GR.GRPOConfig(group_size=1))


# -- rewards --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("text,ok", [
    ("[THINK]2 + 2 = 4.[/THINK]4", True),
    ("  [THINK]a[/THINK] 4  ", True),
    ("[THINK]2 + 2 = 4.[/THINK]", False),           # no final answer
    ("[THINK][/THINK]4", False),                     # empty trace
    ("2 + 2 = 4 [THINK]x[/THINK]4", False),          # does not start with the trace
    ("[THINK]x[/THINK]4[/THINK]5", False),           # two closing tags
    ("[THINK]x[THINK]y[/THINK]4", False),            # nested opening tag
    ("[THINK]x 4", False),                           # never closed
    ("[/THINK]x[THINK]4", False),                    # reversed
    ("4", False),
])
def test_format_gate(text, ok):
    assert (GR.split_think(text) is not None) == ok


@pytest.mark.parametrize("answer,gold,ok", [
    ("4", "4", True),
    ("The answer is 12.", "12", True),
    ("\u22123", "-3", True),                        # unicode minus
    ("\u2212 3", "-3", True),
    ("\uff0d7", "-7", True),                          # fullwidth hyphen-minus
    ("-3", "3", False),
    ("3/4", "0.75", True),                            # rationals compare exactly
    ("\\frac{6}{8}", "3/4", True),
    ("\\boxed{\\frac{-1}{2}}", "-0.5", True),
    ("0.333", "1/3", False),
    ("1,234", "1234", True),
    ("42.0", "42", True),
    ("It is 3 or maybe 4", "4", True),                 # several plain answers: the last counts
    ("It is 3 or maybe 4", "3", False),
    ("\\boxed{3} no wait \\boxed{4}", "4", False),     # disagreeing boxed answers: hedging scores 0
    ("\\boxed{3} no wait \\boxed{4}", "3", False),
    ("\\boxed{4} so \\boxed{4.0}", "4", True),
    ("first 7 then \\boxed{5} and 9", "5", True),      # boxed wins over plain text
    ("no number here", "4", False),
    ("x2 = 5", "5", True),
])
def test_math_answer_parsing(answer, gold, ok):
    assert GR.math_correct(answer, gold) == ok


def test_parse_number():
    assert GR.parse_number("\u221212") == -12 and GR.parse_number("7 / 2") == Fraction(7, 2)
    assert GR.parse_number("1/0") is None and GR.parse_number("abc") is None


def test_reward_values_and_length_penalty():
    cfg = GR.GRPOConfig(max_new_tokens=40, l_cache=10)
    reward = GR.make_reward(cfg)
    s = lambda text, n=10, trunc=False: {"text": text, "n_tokens": n, "truncated": trunc, "problem": {"answer": "4"}}
    assert reward(s("[THINK]2 + 2[/THINK]4")) == pytest.approx(1.0)
    assert reward(s("[THINK]2 + 2[/THINK]5")) == pytest.approx(0.1)
    assert reward(s("4")) == 0.0
    assert reward(s("[THINK]2 + 2[/THINK]4", n=40, trunc=True)) == 0.0  # cut at the cap: no final answer yet
    assert reward(s("[THINK]2 + 2[/THINK]4", n=35)) == pytest.approx(1.0 - 0.05)
    assert reward(s("[THINK]2 + 2[/THINK]4", n=40)) == pytest.approx(0.9)
    assert reward(s("[THINK]2 + 2[/THINK]4", n=30)) == pytest.approx(1.0)


def test_no_format_gate_reads_the_whole_response():
    cfg = GR.GRPOConfig(format_gate=False, max_new_tokens=40, l_cache=10)
    s = {"text": "7 - 2 is 5.", "n_tokens": 8, "truncated": False, "problem": {"answer": "5"}}
    assert GR.make_reward(cfg)(s) == pytest.approx(1.0)
    assert GR.make_reward(GR.GRPOConfig(max_new_tokens=40, l_cache=10))(s) == 0.0  # the gate wants [THINK]
    assert GR.make_reward(cfg)({**s, "truncated": True}) == 0.0


def test_rubric_reward_with_the_rule_judge():
    cfg = GR.GRPOConfig(reward="rubric", max_new_tokens=100, l_cache=10)
    reward = GR.make_reward(cfg, GR.RuleJudge())
    prob = {"question": "Name a colour and count to 3.",
            "rubric": ["contains:blue", "answer:3", "max_words:6", "not_contains:red"]}
    s = {"text": "[THINK]blue, then count[/THINK]Blue: 1 2 3", "n_tokens": 20, "truncated": False, "problem": prob}
    assert reward(s) == pytest.approx(0.1 + 0.9 * 1.0)
    s["text"] = "[THINK]t[/THINK]red and blue, then one two three four five"
    assert reward(s) == pytest.approx(0.1 + 0.9 * 0.25)  # only contains:blue holds
    with pytest.raises(ValueError, match="unknown kind"):
        GR.RuleJudge().holds("q", "r", "vibes:good")


def test_model_judge_asks_the_model_and_compares_yes_with_no():
    tok = D.Tokenizer.from_file(vocab_size=1300)
    blue = tok.encode(" blue")

    class Fake(torch.nn.Module):
        """Says yes (logit of 'yes' above 'no') when the prompt it is shown contains ' blue'."""
        args = M.ModelArgs.preset("tiny")
        embed_tokens = torch.nn.Embedding(1, 1)

        def forward(self, ids):
            seen = ids[0].tolist()
            says_yes = any(seen[i:i + len(blue)] == blue for i in range(len(seen)))
            logits = torch.zeros(1, len(seen), 1300)
            logits[0, -1, judge.yes] = 1.0 if says_yes else -1.0
            return logits

    judge = GR.ModelJudge(Fake(), tok)
    assert judge.yes != judge.no
    assert judge.holds("Name a colour", "It is blue", "names a colour") is True
    assert judge.holds("Name a colour", "It is red", "names a colour") is False
    cfg = GR.GRPOConfig(reward="rubric", max_new_tokens=50, l_cache=5)
    s = {"text": "[THINK]t[/THINK]the sky is blue", "n_tokens": 10, "truncated": False,
         "problem": {"question": "q", "rubric": ["a", "b"]}}
    assert GR.make_reward(cfg, judge)(s) == pytest.approx(1.0)


def test_a_raising_reward_scores_zero_and_is_logged(capsys):
    calls = []

    def flaky(s):
        calls.append(1)
        if len(calls) % 3 == 0:
            raise KeyError("boom")
        return 1.0 if len(calls) % 2 else float("nan")

    log = {}
    r = GR.safe_rewards(flaky, [{}] * 6, log)
    assert r == [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    assert log["count"] == 4 and len(log["kinds"]) == 2
    assert capsys.readouterr().err.count("reward function failed") == 2  # once per kind


# -- the loop -------------------------------------------------------------------------------------------

def even_token_reward(s):
    """A task a random tiny model can learn in a few steps: the share of even token ids it emits. Every
    fifth call raises (bad input: the run must go on)."""
    even_token_reward.calls = getattr(even_token_reward, "calls", 0) + 1
    if even_token_reward.calls % 5 == 0:
        raise RuntimeError("a buggy reward")
    toks = s["tokens"]
    return sum(t % 2 == 0 for t in toks) / max(len(toks), 1)


def tiny_policy(vocab=1300):
    args = M.ModelArgs.preset("tiny")
    m = M.Transformer(M.ModelArgs(**{**args.__dict__, "vocab_size": vocab, "max_seq_len": 64}))
    m.init_weights(0)
    return m


def test_micro_run_mean_reward_rises(tmp_path, capsys):
    tok = D.Tokenizer.from_file(vocab_size=1300)
    problems = [{"question": f"Say something {i}.", "answer": "0"} for i in range(16)]
    gcfg = GR.GRPOConfig(group_size=4, max_new_tokens=8, l_cache=2)
    tcfg = T.TrainConfig(out_dir=str(tmp_path), steps=16, batch_size=16, micro_batch_size=8, lr=3e-2, warmup_steps=0,
                         min_lr_ratio=1.0, weight_decay=0.0, dtype="fp32", log_every=0, export=False)
    model = tiny_policy()
    out = GR.run_grpo(model, tok, problems, gcfg, tcfg, device="cpu", reward_fn=even_token_reward)
    rewards = [s["mean_reward"] for s in out["rollouts"]]
    assert len(rewards) == 16
    assert sum(rewards[-4:]) / 4 > sum(rewards[:4]) / 4 + 0.15, rewards
    assert out["reward_errors"]["count"] >= 10  # every fifth sample raised, the run went on
    assert "reward function failed" in capsys.readouterr().err
    # pi_old is the trainer's own forward: with one step per batch every ratio is exactly 1, and the
    # engine's fp32 log-probs reproduce the trainer's
    assert max(s["ratio_max_dev"] for s in out["rollouts"]) == 0.0
    assert max(s["sampler_ratio_max_dev"] for s in out["rollouts"]) < 1e-3


def test_prompt_longer_than_the_context_is_refused(tmp_path):
    tok = D.Tokenizer.from_file(vocab_size=1300)
    problems = [{"question": "word " * 80, "answer": "1"}]
    with pytest.raises(ValueError, match="exceeds the context 64"):
        GR.RolloutLoader(tiny_policy(), tok, problems, GR.GRPOConfig(group_size=2, max_new_tokens=8, l_cache=2),
                         GR.make_reward(GR.GRPOConfig()), micro_batch_size=2, grad_accum=1)


def test_cli_bad_variant_is_one_error_line(capsys):
    assert GR.main(["--agg", "vibes", "--out", "/nonexistent/x"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "agg" in err[0] and "group_token" in err[0]


@pytest.mark.parametrize("agg", ["group_token", "token_mean"])
def test_micro_batches_add_up_to_the_whole_batch(agg):
    """Deviation 2: the same rollouts split into 2 micro-batches give the gradient of the one whole batch."""
    tok = D.Tokenizer.from_file(vocab_size=1300)
    problems = [{"question": f"Say something {i}.", "answer": "0"} for i in range(8)]
    cfg = GR.GRPOConfig(group_size=4, max_new_tokens=6, l_cache=2, agg=agg)
    grads = []
    for micro, accum in ((16, 1), (8, 2)):
        model = tiny_policy()
        loader = GR.RolloutLoader(model, tok, problems, cfg, lambda s: s["tokens"][0] % 3 / 2, micro_batch_size=micro,
                                  grad_accum=accum, seed=1)
        loss_fn = GR.grpo_loss_fn(loader, cfg)
        batches = [loader.batch(m) for m in range(accum)]
        for x, y in batches:
            loss_fn(model, x, y, None).backward()
        assert loader.stats[-1]["zero_variance_groups"] < 1  # some signal, or the test is vacuous
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-7)
