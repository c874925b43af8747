"""grpo.py's rollout loader against hand-written references: the zero-variance filter (rows of constant groups
leave the loss), several optimizer steps per rollout batch (pi_old fixed, the clip removes exactly the tokens
past the band on the advantage's side), the per-step diagnostics in rollouts.jsonl, weighted reward lists,
the "constant" normaliser over max_new_tokens and the sampler's dtype."""

import json
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data as D  # noqa: E402
import grpo as GR  # noqa: E402
from test_grpo import tiny_policy  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOK = D.Tokenizer.from_file(vocab_size=1300)
PROBLEMS = [{"question": f"Say something {i}.", "answer": "0"} for i in range(4)]


def keyed_reward(s):
    """Constant (0.5) for the first prompt's group, varying with the first sampled token elsewhere."""
    if s["problem"]["question"] == PROBLEMS[0]["question"]:
        return 0.5
    return s["tokens"][0] % 7 / 6


def loader_for(cfg, reward=keyed_reward, accum=1, micro=16, **kw):
    model = tiny_policy()
    return model, GR.RolloutLoader(model, TOK, PROBLEMS, cfg, reward, micro_batch_size=micro, grad_accum=accum,
                                   seed=3, **kw)


@pytest.mark.parametrize("agg", ["group_token", "seq_mean", "token_mean", "constant"])
def test_constant_groups_leave_the_loss(agg):
    cfg = GR.GRPOConfig(group_size=4, max_new_tokens=6, l_cache=2, agg=agg)
    model, loader = loader_for(cfg)
    x, y = loader.batch(0)
    rec = loader.rollout_recs[0]
    const = [r for r in range(16) if loader._prompts_for(0)[r // 4] == 0]  # the first prompt's group
    assert len(const) == 4 and loader.stats[-1]["zero_variance_groups"] == 0.25  # exactly one constant group
    assert not rec["mask"][const].any() and (y[const] != -100).any()  # those rows have tokens, all masked
    rest = [r for r in range(16) if r not in const]
    GR.grpo_loss_fn(loader, cfg)(model, x, y, None).backward()
    ours = torch.cat([p.grad.flatten() for p in model.parameters()])
    model.zero_grad()
    # the reference: the loss on the other three groups alone (their advantages, their tokens)
    logp = GR.token_logprobs(model, x[rest], y[rest], cfg.temperature)
    ref = GR.grpo_loss(logp, logp.detach(), rec["adv"][rest], y[rest] != -100, 4, agg=agg, max_new_tokens=6)
    if agg == "constant":
        ref = ref * len(rest) / 16  # a constant normaliser: N x L_max over the whole batch
    ref.backward()
    want = torch.cat([p.grad.flatten() for p in model.parameters()])
    assert want.abs().max() > 0
    torch.testing.assert_close(ours, want, rtol=1e-4, atol=1e-8)


def test_constant_normaliser_is_the_response_budget():
    logp = torch.zeros(2, 5, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 0]], dtype=torch.bool)
    loss = GR.grpo_loss(logp, logp.detach(), torch.tensor([1.0, -1.0]), mask, 2, agg="constant", max_new_tokens=3)
    assert loss.item() == pytest.approx(-(2 * 1 + 1 * -1) / (2 * 3))  # rho = 1: sum of A over tokens / (N L_max)


def reference_grad(logp, old, adv, mask, G, eps_low, eps_high):
    """d(loss)/d(logp) for agg group_token, by hand: -A rho / (groups x group tokens), 0 where the clip binds."""
    ratio, A = torch.exp(logp - old), adv[:, None].expand_as(logp)
    clipped = ((A > 0) & (ratio > 1 + eps_high)) | ((A < 0) & (ratio < 1 - eps_low))
    tok_G = mask.reshape(-1, G * logp.shape[1]).sum(-1).float()
    n_groups = int((tok_G > 0).sum())
    w = (1 / (tok_G.clamp(min=1) * n_groups)).repeat_interleave(G)[:, None]
    return torch.where(mask & ~clipped, -A * ratio * w, torch.zeros_like(logp)), clipped


def test_ppo_steps_reuse_the_batch_and_clip_on_the_advantage_side(tmp_path):
    cfg = GR.GRPOConfig(group_size=4, max_new_tokens=6, l_cache=2, ppo_steps=3)
    log = tmp_path / "rollouts.jsonl"
    model, loader = loader_for(cfg, log_path=str(log))
    loss_fn, opt = GR.grpo_loss_fn(loader, cfg), torch.optim.SGD(model.parameters(), lr=3.0)
    seen = []
    for step in range(4):
        x, y = loader.batch(step)
        seen.append(x)
        loss_fn(model, x, y, None).backward()
        opt.step()
        opt.zero_grad()
    assert torch.equal(seen[0], seen[1]) and torch.equal(seen[0], seen[2])  # replayed, pi_old of step 1
    assert not torch.equal(seen[0], seen[3])  # the fourth step rolls a new batch
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and [r["ppo_step"] for r in rows] == [0, 1, 2, 0]
    for r in rows:
        assert {"ratio_max_dev", "sampler_ratio_max_dev", "clip_frac_low", "clip_frac_high"} <= r.keys()
    assert rows[0]["ratio_max_dev"] == 0.0 and rows[3]["ratio_max_dev"] == 0.0  # pi_old is the trainer's forward
    assert rows[1]["ratio_max_dev"] > 0.05  # the second step on a reused batch moved the ratios
    # the clip on the step-3 batch, against the hand-written gradient
    rec = loader.rollout_recs[0]
    with torch.no_grad():
        logp = GR.token_logprobs(model, seen[0], rec["targets"], cfg.temperature)
    rec_old = rec["old_logp"]
    lp = logp.clone().requires_grad_()
    loss = GR.grpo_loss(lp, rec_old, rec["adv"], rec["mask"], 4, cfg.eps_low, cfg.eps_high)
    g, = torch.autograd.grad(loss, lp)
    want, clipped = reference_grad(logp, rec_old, rec["adv"], rec["mask"], 4, cfg.eps_low, cfg.eps_high)
    A = rec["adv"][:, None].expand_as(logp)
    assert (clipped & rec["mask"] & (A > 0)).any() and (clipped & rec["mask"] & (A < 0)).any()  # both sides bind
    torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-9)
    assert torch.equal((g == 0) & rec["mask"], clipped & rec["mask"])  # exactly the clipped tokens drop out


def test_weighted_rewards_sum_and_are_logged(tmp_path):
    cfg = GR.GRPOConfig(group_size=4, max_new_tokens=6, l_cache=2)
    _, one = loader_for(cfg)
    one.batch(0)
    log = tmp_path / "r.jsonl"
    model, two = loader_for(cfg, reward=[("keyed", 1.0, keyed_reward), ("len", 0.0, lambda s: s["n_tokens"])],
                            log_path=str(log))
    x, y = two.batch(0)
    torch.testing.assert_close(two.rollout_recs[0]["adv"], one.rollout_recs[0]["adv"])
    GR.grpo_loss_fn(two, cfg)(model, x, y, None)
    row = json.loads(log.read_text())
    assert row["reward/keyed"] == pytest.approx(row["mean_reward"]) and row["reward/len"] > 1


def test_sampler_runs_in_the_trainer_dtype_and_bad_ppo_steps_is_refused():
    cfg = GR.GRPOConfig(group_size=4, max_new_tokens=6, l_cache=2)
    _, loader = loader_for(cfg, dtype=torch.bfloat16)
    loader.batch(0)
    assert loader.weights.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="ppo_steps"):
        GR.check_config(GR.GRPOConfig(ppo_steps=0))


def test_run_grpo_samples_in_the_train_dtype(tmp_path, monkeypatch):
    import train as T
    seen = []
    real = GR.RolloutWeights
    monkeypatch.setattr(GR, "RolloutWeights", lambda m, dtype=None: seen.append(dtype) or real(m, dtype=dtype))
    tcfg = T.TrainConfig(out_dir=str(tmp_path), steps=1, batch_size=8, micro_batch_size=8, lr=1e-3, warmup_steps=0,
                         min_lr_ratio=1.0, weight_decay=0.0, dtype="bf16", log_every=0, export=False)
    GR.run_grpo(tiny_policy(), TOK, PROBLEMS, GR.GRPOConfig(group_size=4, max_new_tokens=4, l_cache=1), tcfg,
                device="cpu", reward_fn=keyed_reward)
    assert seen[0] == torch.bfloat16
