"""Online DPO with a pairwise reward model (PWRM), soft labels, and loop detection.

Reading guide
-------------
Concept: PAPER.md section 8, the preference stage that ends Instruct (and Reasoning) post-training.
For every prompt the CURRENT policy samples two responses at T = 0.7 (generate.py's rollout engine, in
the trainer's compute dtype); a pairwise reward model, itself an LLM of the same family trained by SFT to answer "A" or
"B", gives p = P(A beats B); p is the soft label of a DPO loss against a frozen reference model:

    h = (log pi(A) - log ref(A)) - (log pi(B) - log ref(B))          (summed token log-probs)
    L = -(p logsigmoid(beta h) + (1 - p) logsigmoid(-beta h)) / beta

A response caught in an endless loop loses (p = 0 or 1) before the PWRM is asked; a pair where both
loop is dropped. A reasoning model's `[THINK]...[/THINK]` trace is stripped before the PWRM reads it.

The file reads top-down: the loss, the loop detector, think stripping, the PWRM (both-order score,
calibration, ECE), summed response log-probs, the online loop (`RolloutLoader` feeding train.py's one
loop, `odpo_loss_fn`, `evaluate_policy`, `run_odpo`), then the command line.

Deviations and choices where the paper is silent:
 1. The division by beta ("beta-rescaling") is PAPER.md's reading: the gradient at h = 0 is -(p - 1/2)
    whatever beta is, the minimiser is h = logit(p) / beta. `rescale=False` gives the plain soft DPO
    loss, and p in {0, 1} without rescaling is standard DPO; `labels="hard"` rounds p (ablations).
 2. PWRM score: the probability of the answer token "A" against "B" at the position after the prompt,
    softmax restricted to those two tokens, margin / temperature; both orders averaged, p = (P_AB + 1 -
    P_BA) / 2, so p(a, b) + p(b, a) = 1. T minimises the NLL of p on held-out labelled pairs.
 3. Loop detector (ours, PAPER.md section 8 names the failure, not a rule): after dropping a final
    EOS, the tail repeats a period at least 4 times over at least loop_span(cap) tokens (64, or half a
    shorter cap), or the response hit the cap without EOS with under 30% distinct 4-grams. It is the
    project's one loop detector: the experiments' loop columns use it too.
 4. The per-step loss is the sum over kept pairs divided by the number of pair slots in the GLOBAL
    optimizer step (micro-batch losses add up): a dropped pair shrinks the step; `stats` counts them.
 5. train.py's loop consumes (inputs, targets) batches; the rollout loader samples, judges and computes
    the reference log-probs when the loop asks for a batch, and queues the labels for the loss (which
    checks the tokens match). Rows 2k and 2k+1 answer one prompt; prompt and padding targets are -100.
 6. The paper's preference data and its PWRM are unpublished. experiments/odpo_demo.py trains a PWRM
    on pairs labelled by honest rules on data.py's arithmetic (experiments/pwrm.py) and runs this loop.
 7. Any world size (torchrun, FSDP2 through train.py). Every rank must call each sharded model the same
    number of times, so: the rollout engine gathers the policy's weights once per optimizer step (a
    collective) and then samples locally; the reference scores every micro-batch once; the PWRM scores
    every pair, loops included (their label is then overridden), so its batches are the same on all
    ranks. Memory at 3B (3.43B parameters) in bf16: the frozen reference and a 3B PWRM take 6.9 GB each,
    divided by the world size when sharded; the engine holds one gathered 6.9 GB copy of the policy per
    rank while it samples; the policy's fp32 weights, gradients and AdamW moments take 16 bytes per
    parameter (55 GB) divided by the world size. The reference log-probs are computed once per rollout
    batch, under no_grad (weights only, no activations kept).

Run: `python odpo.py --policy CKPT --pwrm CKPT --prompts PROMPTS.jsonl --out DIR` (a folder, a .gguf file
or `smollm2` each; `--help` lists every flag); `python experiments/odpo_demo.py` builds the SFT policy
and the PWRM on the embedded cascade's child and runs it. `python -m pytest tests/test_odpo.py -q`.
Depends on: model.py, data.py (the tokenizer, prompt files), distill.py (fused_ce), generate.py (the
rollout engine), train.py (the loop).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import data as D
from distill import fused_ce
from generate import RolloutConfig, RolloutWeights, rollout
from model import CheckpointError, Transformer, load_model, resolve_model_path
from train import (TrainConfig, build_model, configs_from_args, exit_process, grad_accum_steps, setup_distributed,
                   teardown_distributed, train)

# -----------------------------------------------------------------------------
# The loss (PAPER.md section 8)


def soft_dpo_loss(logp_a: torch.Tensor, logp_b: torch.Tensor, ref_logp_a: torch.Tensor, ref_logp_b: torch.Tensor,
                  p, beta: float = 0.1, rescale: bool = True) -> torch.Tensor:
    """Per-pair loss -(p logsigmoid(beta h) + (1-p) logsigmoid(-beta h)) [/ beta], h the log-ratio margin.

    All log-probs are summed over each response's tokens, shape [pairs]; p = P(A beats B) in [0, 1]."""
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    h = (logp_a - ref_logp_a) - (logp_b - ref_logp_b)
    p = torch.as_tensor(p, dtype=h.dtype, device=h.device)
    if bool(((p < 0) | (p > 1) | torch.isnan(p)).any()):
        raise ValueError("p must lie in [0, 1] (the probability that response A beats B)")
    loss = -(p * F.logsigmoid(beta * h) + (1 - p) * F.logsigmoid(-beta * h))
    return loss / beta if rescale else loss


# -----------------------------------------------------------------------------
# Loop detection (deviation 3)


def loop_span(max_new_tokens: Optional[int]) -> int:
    """The shortest periodic tail that counts as a loop: 64 tokens, or half the length cap when the cap is
    shorter, so that a detector used at a 16-48 token cap can fire at all."""
    return 64 if max_new_tokens is None else max(8, min(64, max_new_tokens // 2))


def is_looping(token_ids, eos_id: Optional[int] = None, max_new_tokens: Optional[int] = None,
               min_repeats: int = 4, min_distinct: float = 0.3) -> bool:
    """True when a response repeats itself. A final eos_id is dropped first (a loop that happens to end
    still looped). Then either the tail repeats some period P at least min_repeats times over at least
    loop_span(max_new_tokens) tokens (x[t] == x[t - P] throughout), or the response hit max_new_tokens
    without EOS and fewer than min_distinct of its 4-grams are distinct."""
    ids = [int(t) for t in token_ids]
    ended = eos_id is not None and len(ids) > 0 and ids[-1] == eos_id
    if ended:
        ids = ids[:-1]
    n = len(ids)
    if max_new_tokens is not None and not ended and len(token_ids) >= max_new_tokens and n >= 4:
        grams = {tuple(ids[i:i + 4]) for i in range(n - 3)}
        if len(grams) / (n - 3) < min_distinct:
            return True
    span = loop_span(max_new_tokens)
    for P in range(1, n // min_repeats + 1):
        run = 0  # the length of the tail that equals itself shifted by P
        while run < n - P and ids[n - 1 - run] == ids[n - 1 - run - P]:
            run += 1
        if run + P >= max(min_repeats * P, span):  # the periodic tail spans run + P tokens
            return True
    return False


# -----------------------------------------------------------------------------
# Think stripping


def strip_think(response: Union[str, Sequence[int]], think_id: Optional[int] = None,
                end_think_id: Optional[int] = None):
    """The part of a response the PWRM may read: everything after the last [/THINK].

    Text: split on the literal markers. Token ids: split on the control ids (user text cannot forge
    them, data.py's encode policy). A trace that never closes leaves an empty answer."""
    if isinstance(response, str):
        if "[/THINK]" in response:
            return response.rsplit("[/THINK]", 1)[1]
        return "" if "[THINK]" in response else response
    ids = [int(t) for t in response]
    if end_think_id is not None and end_think_id in ids:
        return ids[len(ids) - ids[::-1].index(end_think_id):]
    if think_id is not None and think_id in ids:
        return []
    return ids


# -----------------------------------------------------------------------------
# The pairwise reward model (deviation 2)

PWRM_QUESTION = "Which response is better? Answer with A or B."


def render_conversation(conversation: list[dict]) -> str:
    return "\n".join(f"{m['role'].capitalize()}: {m.get('content') or ''}" for m in conversation)


def pwrm_user_text(conversation: list[dict], a: str, b: str) -> str:
    return (f"Conversation:\n{render_conversation(conversation)}\n\nResponse A:\n{a}\n\nResponse B:\n{b}\n\n"
            f"{PWRM_QUESTION}")


def expected_calibration_error(p: Sequence[float], y: Sequence[float], bins: int = 10) -> float:
    """Binary ECE: sum over equal-width bins of p of (bin share) * |mean(y) - mean(p)|."""
    p, y = np.asarray(p, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(p) == 0:
        raise ValueError("expected_calibration_error needs at least one prediction")
    idx = np.minimum((p * bins).astype(int), bins - 1)
    return float(sum(abs(y[idx == k].mean() - p[idx == k].mean()) * (idx == k).mean()
                     for k in range(bins) if (idx == k).any()))


def _nll(p: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


class PairwiseRewardModel:
    """P(A beats B) from an LLM's logits on the answer tokens "A" and "B", both orders averaged.

    `tok` must provide encode, decode and encode_chat (data.Tokenizer does); the model must share its
    vocabulary (and the policy's: check_same_vocab)."""

    def __init__(self, model: Transformer, tok, temperature: float = 1.0, max_response_tokens: int = 96,
                 batch_size: int = 16):
        if model.args.vocab_size != tok.vocab_size:
            raise ValueError(f"the PWRM has a vocabulary of {model.args.vocab_size} tokens but its tokenizer has "
                             f"{tok.vocab_size}: load the PWRM trained with this tokenizer")
        self.model, self.tok, self.temperature = model, tok, float(temperature)
        self.max_response_tokens, self.batch_size = max_response_tokens, batch_size
        a, b = tok.encode("A"), tok.encode("B")
        if len(a) != 1 or len(b) != 1:
            raise ValueError("the tokenizer must encode 'A' and 'B' as single tokens (the PWRM's answer tokens)")
        self.a_id, self.b_id = a[0], b[0]
        specials = getattr(tok, "specials", ())
        self.think_ids = tuple(specials.index(n) if n in specials else None for n in ("[THINK]", "[/THINK]"))

    def response_text(self, response: Union[str, Sequence[int]]) -> str:
        """Strip the think trace, cut to max_response_tokens, and give text."""
        if isinstance(response, str):
            response = self.tok.encode(strip_think(response))
        ids = [t for t in strip_think(response, *self.think_ids) if t != self.tok.eos_id]
        return self.tok.decode(ids[:self.max_response_tokens])

    def messages(self, conversation: list[dict], a, b, a_wins: Optional[bool] = None) -> list[dict]:
        """The PWRM's chat: one user turn holding the conversation and both responses; with a_wins given,
        the assistant's answer "A" or "B" follows (an SFT example)."""
        msgs = [{"role": "user", "content": pwrm_user_text(conversation, self.response_text(a), self.response_text(b))}]
        return msgs if a_wins is None else msgs + [{"role": "assistant", "content": "A" if a_wins else "B"}]

    def prompt_ids(self, conversation: list[dict], a, b) -> list[int]:
        return self.tok.encode_chat(self.messages(conversation, a, b))[0]

    @torch.no_grad()
    def margins(self, items: Sequence[tuple]) -> torch.Tensor:
        """z_A - z_B at the answer position for each (conversation, a, b), in the order given."""
        out = []
        device = self.model.embed_tokens.weight.device
        for s in range(0, len(items), self.batch_size):
            rows = [self.prompt_ids(*it) for it in items[s:s + self.batch_size]]
            lens = [len(r) for r in rows]
            if max(lens) > self.model.args.max_seq_len:
                raise ValueError(f"a PWRM prompt has {max(lens)} tokens, past the PWRM's context "
                                 f"{self.model.args.max_seq_len}: lower max_response_tokens")
            x = torch.full((len(rows), max(lens)), self.tok.pad_id, dtype=torch.long)
            for i, r in enumerate(rows):
                x[i, :len(r)] = torch.tensor(r)  # right padding: causal attention never sees it
            last = (torch.tensor(lens) - 1).to(device)

            def head(h_BTD, W_VD):  # inside the forward: W_VD is the whole head even when sharded
                h_BD = h_BTD[torch.arange(len(rows), device=device), last]
                return (F.linear(h_BD, W_VD[self.a_id]) - F.linear(h_BD, W_VD[self.b_id])).float()
            out.append(self.model(x.to(device), head_fn=head).cpu())
        return torch.cat(out) if out else torch.zeros(0)

    def probs(self, items: Sequence[tuple], temperature: Optional[float] = None) -> torch.Tensor:
        """Both orders averaged: (P(A beats B | A first) + 1 - P(B beats A | B first)) / 2."""
        T = self.temperature if temperature is None else temperature
        m_ab = self.margins(items)
        m_ba = self.margins([(c, b, a) for c, a, b in items])
        return 0.5 * (torch.sigmoid(m_ab / T) + 1 - torch.sigmoid(m_ba / T))

    def prob_a_beats_b(self, conversation: list[dict], a, b) -> float:
        return float(self.probs([(conversation, a, b)])[0])

    def calibrate(self, items: Sequence[tuple], labels: Sequence[float]) -> dict:
        """Set the temperature that minimises the NLL of the averaged p on held-out labelled pairs;
        returns the ECE and NLL before (T = 1) and after, and the PWRM's accuracy."""
        if len(items) == 0 or len(items) != len(labels):
            raise ValueError(f"calibrate needs labelled pairs: got {len(items)} pairs and {len(labels)} labels")
        y = np.asarray(labels, dtype=np.float64)
        m_ab, m_ba = self.margins(items).double().numpy(), self.margins([(c, b, a) for c, a, b in items]).double().numpy()
        sig = lambda z: 1 / (1 + np.exp(-z))
        p_at = lambda T: 0.5 * (sig(m_ab / T) + 1 - sig(m_ba / T))
        lo, hi = math.log(1e-2), math.log(1e3)  # golden-section search over log T (NLL is unimodal here)
        g = (math.sqrt(5) - 1) / 2
        for _ in range(80):
            a, b = hi - g * (hi - lo), lo + g * (hi - lo)
            if _nll(p_at(math.exp(a)), y) < _nll(p_at(math.exp(b)), y):
                hi = b
            else:
                lo = a
        T = math.exp((lo + hi) / 2)
        before, after = p_at(1.0), p_at(T)
        self.temperature = T
        return {"temperature": T, "pairs": len(y), "ece_before": expected_calibration_error(before, y),
                "ece_after": expected_calibration_error(after, y), "nll_before": _nll(before, y),
                "nll_after": _nll(after, y), "accuracy": float(((after > 0.5) == (y > 0.5)).mean())}


def check_same_vocab(policy: Transformer, pwrm: PairwiseRewardModel, tok) -> None:
    if policy.args.vocab_size != tok.vocab_size or pwrm.model.args.vocab_size != tok.vocab_size:
        raise ValueError(f"vocabulary mismatch: policy {policy.args.vocab_size}, PWRM {pwrm.model.args.vocab_size}, "
                         f"tokenizer {tok.vocab_size} tokens; the PWRM reads the policy's tokens, so train it from "
                         f"a model with the policy's tokenizer")


def pwrm_conversations(pwrm: PairwiseRewardModel, pairs: Sequence[dict]) -> list[list[dict]]:
    """SFT chats for the PWRM: every labelled pair in BOTH presentation orders."""
    out = []
    for q in pairs:
        out.append(pwrm.messages(q["conversation"], q["a"], q["b"], a_wins=q["label"] > 0.5))
        out.append(pwrm.messages(q["conversation"], q["b"], q["a"], a_wins=q["label"] <= 0.5))
    return out


# -----------------------------------------------------------------------------
# Summed response log-probs


def response_logprobs(model: Transformer, inputs_BT: torch.Tensor, targets_BT: torch.Tensor) -> torch.Tensor:
    """[B]: sum over each row's valid targets (not -100) of log pi(target), through distill.py's fused CE
    (no [B, T, V] logits). Differentiable when grad is on; cheap under no_grad."""
    def head(h_BTD, W_VD):
        rows = []
        for b in range(h_BTD.shape[0]):
            n = int((targets_BT[b] != -100).sum())
            if n == 0:
                rows.append(h_BTD.new_zeros((), dtype=torch.float32))
                continue
            # fused_ce divides by n_total >= the row's count: ask for n, multiply back
            rows.append(-fused_ce(h_BTD[b], W_VD, targets_BT[b], n_total=n).float() * n)
        return torch.stack(rows)
    return model(inputs_BT, head_fn=head)


# -----------------------------------------------------------------------------
# The online loop


@dataclass
class ODPOConfig:
    beta: float = 0.1  # beta of the DPO loss (section 8)
    rescale: bool = True  # divide the loss by beta ("beta-rescaling", section 8); --no-rescale for ablation
    labels: str = "soft"  # "soft": p from the PWRM; "hard": p rounded to 0/1 (ties dropped), for ablation
    sample_temperature: float = 0.7  # T of the two samples per prompt (section 8)
    top_p: float = 1.0  # nucleus of the samples
    max_new_tokens: int = 48  # length cap of a rollout (also the loop detector's cap)
    max_prompt_tokens: int = 64  # prompts longer than this are an error; sets seq_len with max_new_tokens
    pwrm_temperature: Optional[float] = None  # override the PWRM's calibrated temperature
    eval_prompts: int = 64  # held-out prompts for win rate, accuracy, loop rate, length
    eval_every_steps: int = 0  # evaluate every N steps during ODPO (0: before and after only)


def judge_pairs(pwrm: PairwiseRewardModel, tok, cfg: "ODPOConfig", conversations, a_list, b_list
                ) -> tuple[list[float], list[bool]]:
    """(p, keep) per pair: the PWRM's p on the think-stripped text, then the loop rule overrides it
    (deviation 3): a looping response loses, a pair where both loop is dropped. Every pair is scored so
    that the PWRM's batches do not depend on the samples (deviation 7)."""
    cap, eos = cfg.max_new_tokens, tok.eos_id
    items = [(c, a, b) for c, a, b in zip(conversations, a_list, b_list)]
    p = pwrm.probs(items, cfg.pwrm_temperature).tolist() if items else []
    keep = [True] * len(items)
    for k, (_, a, b) in enumerate(items):
        la = is_looping(a, eos_id=eos, max_new_tokens=cap)
        lb = is_looping(b, eos_id=eos, max_new_tokens=cap)
        if la and lb:
            p[k], keep[k] = 0.5, False
        elif la or lb:
            p[k] = 0.0 if la else 1.0
    return p, keep


def sample_pairs(weights: RolloutWeights, prompts: list[list[int]], cfg: "ODPOConfig", tok, seed: int,
                 n: int = 2, temperature: Optional[float] = None) -> list[list[int]]:
    """n responses per prompt through the rollout engine (rows k*n .. k*n+n-1 answer prompt k), each cut
    after its EOS."""
    T = cfg.sample_temperature if temperature is None else temperature
    rc = RolloutConfig(max_new_tokens=cfg.max_new_tokens, group_size=n, temperature=T, top_p=cfg.top_p,
                       eos_id=tok.eos_id, pad_id=tok.pad_id, seed=seed)
    r = rollout(weights, prompts, rc)
    return [row[:k] for row, k in zip(r.tokens.tolist(), r.lengths.tolist())]


class RolloutLoader:
    """train.py's loader contract, batch(i) -> (inputs [B, T], targets [B, T]), filled online.

    Micro-batch i on rank r of w holds B/2 prompts (global micro-batch i * w + r, so ranks see different
    prompts), each with two samples of the current policy. The loss's labels (p, keep) and the reference
    log-probs are queued for `odpo_loss_fn` (deviation 5)."""

    def __init__(self, policy: Transformer, reference: Transformer, pwrm: PairwiseRewardModel, tok,
                 prompts: Sequence[list[dict]], cfg: ODPOConfig, micro_batch_size: int, seed: int = 0,
                 grad_accum: int = 1, dtype: Optional[torch.dtype] = None):
        if micro_batch_size % 2:
            raise ValueError(f"micro_batch_size {micro_batch_size} must be even: two responses per prompt")
        if not prompts:
            raise ValueError("online DPO needs at least one prompt")
        if cfg.labels not in ("soft", "hard"):
            raise ValueError(f"labels must be 'soft' or 'hard', got {cfg.labels!r}")
        if cfg.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1 (empty generations cannot be judged), got {cfg.max_new_tokens}")
        check_same_vocab(policy, pwrm, tok)
        self.prompt_ids = [tok.encode_chat(c)[0] for c in prompts]
        longest = max(len(p) for p in self.prompt_ids)
        ctx = min(policy.args.max_seq_len, reference.args.max_seq_len)
        if longest > cfg.max_prompt_tokens:
            raise ValueError(f"a prompt has {longest} tokens, more than max_prompt_tokens {cfg.max_prompt_tokens}: "
                             f"shorten the prompts or raise --max-prompt-tokens")
        if cfg.max_prompt_tokens + cfg.max_new_tokens > ctx:
            raise ValueError(f"max_prompt_tokens + max_new_tokens = {cfg.max_prompt_tokens} + {cfg.max_new_tokens} is "
                             f"longer than the context {ctx}: lower --max-prompt-tokens or --max-new-tokens")
        self.policy, self.reference, self.pwrm, self.tok = policy, reference, pwrm, tok
        self.prompts, self.cfg, self.B, self.seed = list(prompts), cfg, micro_batch_size, seed
        self.seq_len = cfg.max_prompt_tokens + cfg.max_new_tokens - 1
        self.queue: deque = deque()
        self.stats: list[dict] = []
        self.rank, self.world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
        self.accum, self.dtype = grad_accum, dtype  # dtype: the trainer's compute dtype, which the engine samples in
        self.weights: Optional[RolloutWeights] = None

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n, g = self.B // 2, i * self.world + self.rank  # g: the global micro-batch
        idx = [(g * n + j) % len(self.prompts) for j in range(n)]
        prompts = [self.prompt_ids[k] for k in idx for _ in range(2)]
        t0, c0 = time.perf_counter(), time.process_time()
        if self.weights is None:
            self.weights = RolloutWeights(self.policy, dtype=self.dtype)
        elif i % self.accum == 0:  # the policy changed at the last optimizer step (collective under FSDP2)
            self.weights.refresh(self.policy)
        samples = sample_pairs(self.weights, prompts[0::2], self.cfg, self.tok, seed=self.seed * 1_000_003 + g)
        t_gen, c_gen = time.perf_counter() - t0, time.process_time() - c0
        if any(len(s) == 0 for s in samples):
            raise ValueError("the policy produced an empty generation: max_new_tokens must be >= 1")
        convs = [self.prompts[k] for k in idx]
        p, keep = judge_pairs(self.pwrm, self.tok, self.cfg, convs, samples[0::2], samples[1::2])
        if self.cfg.labels == "hard":
            keep = [kp and q != 0.5 for q, kp in zip(p, keep)]
            p = [float(q > 0.5) for q in p]
        T = self.seq_len
        inputs = torch.full((self.B, T), self.tok.pad_id, dtype=torch.long)
        targets = torch.full((self.B, T), -100, dtype=torch.long)
        for r, (pr, s) in enumerate(zip(prompts, samples)):
            row = torch.tensor(pr + s)
            inputs[r, :len(row) - 1] = row[:-1]
            targets[r, len(pr) - 1:len(row) - 1] = row[len(pr):]  # only the response's tokens are scored
        device = self.reference.embed_tokens.weight.device
        with torch.no_grad():
            ref = response_logprobs(self.reference, inputs.to(device), targets.to(device)).float().cpu()
        looping = [is_looping(s, eos_id=self.tok.eos_id, max_new_tokens=self.cfg.max_new_tokens) for s in samples]
        self.queue.append({"inputs": inputs, "p": torch.tensor(p), "keep": torch.tensor(keep, dtype=torch.float32),
                           "ref": ref})
        self.stats.append({"micro_batch": i, "rollout_s": t_gen, "rollout_cpu_s": c_gen, "cpu_clock": c0,
                           "new_tokens": sum(len(s) for s in samples),
                           "rollout_tok_s": sum(len(s) for s in samples) / max(t_gen, 1e-9),
                           "mean_length": float(np.mean([len(s) for s in samples])),
                           "loop_rate": float(np.mean(looping)), "dropped": int(sum(not k for k in keep)),
                           "mean_p": float(np.mean(p))})
        return inputs, targets


def odpo_loss_fn(loader: RolloutLoader, cfg: ODPOConfig, pairs_per_step: int):
    """loss_fn for train(): soft DPO over the micro-batch's pairs / the pair slots of the global step."""
    def loss_fn(model, inputs_BT, targets_BT, n_total):
        rec = loader.queue.popleft()
        if not torch.equal(rec["inputs"], inputs_BT.cpu()):
            raise RuntimeError("odpo: the loss got a batch the rollout loader did not queue (out of order)")
        logp = response_logprobs(model, inputs_BT, targets_BT)
        dev = logp.device
        ref, p, keep = rec["ref"].to(dev), rec["p"].to(dev), rec["keep"].to(dev)
        loss = soft_dpo_loss(logp[0::2], logp[1::2], ref[0::2], ref[1::2], p, cfg.beta, cfg.rescale)
        with torch.no_grad():  # the implicit reward margin of the preferred response (DPO's rewards/margins)
            h = (logp[0::2] - ref[0::2]) - (logp[1::2] - ref[1::2])
            sign = torch.sign(p - 0.5)
            kept = keep * (sign != 0)
            loader.stats[-1]["reward_margin"] = float((cfg.beta * h * sign * kept).sum() / kept.sum().clamp(min=1))
        return (loss * keep).sum() / pairs_per_step
    return loss_fn


@torch.no_grad()
def evaluate_policy(policy: Transformer, start_samples: Optional[list], problems: Sequence[dict],
                    pwrm: PairwiseRewardModel, tok, cfg: ODPOConfig, seed: int = 1234,
                    check: Optional[Callable[[str, str], bool]] = None, dtype: Optional[torch.dtype] = None) -> dict:
    """Loop rate and mean length (greedy and sampled at T, through the rollout engine in `dtype`), the PWRM-judged win rate of the policy's
    samples against `start_samples` (the starting policy's, same prompts and seeds), and with `check`
    (text, problem["answer"]) -> bool the exact-answer accuracy."""
    prompts = [tok.encode_chat([{"role": "user", "content": q["question"]}])[0] for q in problems]
    W = RolloutWeights(policy, dtype=dtype)
    greedy = sample_pairs(W, prompts, cfg, tok, seed=seed, n=1, temperature=0.0)
    sampled = sample_pairs(W, prompts, cfg, tok, seed=seed, n=1)
    del W
    loops = lambda rs: float(np.mean([is_looping(r, eos_id=tok.eos_id, max_new_tokens=cfg.max_new_tokens) for r in rs]))
    out = {"loop_rate_greedy": loops(greedy),
           "loop_rate_sampled": loops(sampled), "mean_length_greedy": float(np.mean([len(r) for r in greedy])),
           "mean_length_sampled": float(np.mean([len(r) for r in sampled])),
           "empty_rate_greedy": float(np.mean([not [t for t in r if t != tok.eos_id] for r in greedy])),
           "greedy_examples": [{"question": q["question"], "answer": q["answer"], "output": tok.decode(r)}
                               for q, r in zip(problems[:4], greedy[:4])],
           "samples": sampled}
    if check is not None:
        acc = lambda rs: float(np.mean([check(tok.decode(r), q["answer"]) for r, q in zip(rs, problems)]))
        out = {"accuracy_greedy": acc(greedy), "accuracy_sampled": acc(sampled), **out}
    if start_samples is not None:
        convs = [[{"role": "user", "content": q["question"]}] for q in problems]
        p, keep = judge_pairs(pwrm, tok, cfg, convs, sampled, start_samples)
        kept = [q for q, k in zip(p, keep) if k]
        out["win_rate_vs_start"] = float(np.mean(kept)) if kept else 0.5
        out["win_rate_pairs"] = len(kept)
        out["win_rate_hard"] = float(np.mean([q > 0.5 for q in kept]) if kept else 0.5)
    return out


def run_odpo(policy: Transformer, reference: Transformer, pwrm: PairwiseRewardModel, tok, prompts: Sequence[list[dict]],
             cfg: ODPOConfig, train_cfg: TrainConfig, *, device, eval_problems: Sequence[dict] = (),
             check: Optional[Callable[[str, str], bool]] = None, name: str = "odpo") -> dict:
    """Online DPO through train.py's loop: `train_cfg.batch_size` responses (= batch_size / 2 prompts)
    per optimizer step. Evaluates on `eval_problems` before and after (and every eval_every_steps)."""
    reference.requires_grad_(False)
    reference.eval()
    world = dist.get_world_size() if dist.is_initialized() else 1
    dtype = torch.bfloat16 if train_cfg.dtype == "bf16" else torch.float32  # sample in the trainer's compute dtype
    loader = RolloutLoader(policy, reference, pwrm, tok, prompts, cfg, train_cfg.micro_batch_size, seed=train_cfg.seed,
                           grad_accum=grad_accum_steps(train_cfg, world), dtype=dtype)
    train_cfg = dataclasses.replace(train_cfg, seq_len=loader.seq_len,
                                    eval_every=cfg.eval_every_steps if eval_problems else 0)
    pairs_per_step = train_cfg.batch_size // 2
    start = evaluate_policy(reference, None, eval_problems, pwrm, tok, cfg, check=check,
                            dtype=dtype) if eval_problems else None
    start_samples = start.pop("samples") if start else None
    if start:
        start["win_rate_vs_start"] = 0.5  # the starting policy against itself, by definition

    def eval_fn(model):
        r = evaluate_policy(model, start_samples, eval_problems, pwrm, tok, cfg, check=check, dtype=dtype)
        r.pop("samples")
        return r

    result = train(policy, loader, odpo_loss_fn(loader, cfg, pairs_per_step), train_cfg, device=device,
                   eval_fn=eval_fn if eval_problems else None, name=name,
                   run_info={"odpo": dataclasses.asdict(cfg), "pwrm_temperature": pwrm.temperature})
    steps = []
    accum = len(loader.stats) // max(1, len(result["history"]))
    for k, h in enumerate(result["history"]):
        ss = loader.stats[k * accum:(k + 1) * accum]
        steps.append({**h, "step_s": train_cfg.batch_size * train_cfg.seq_len / h["tokens_per_s"], **{key: float(np.mean([s[key] for s in ss if key in s])) for key in
                              ("rollout_tok_s", "mean_length", "loop_rate", "mean_p", "reward_margin")},
                      "dropped": sum(s["dropped"] for s in ss), "rollout_s": sum(s["rollout_s"] for s in ss)})
    if not dist.is_initialized() or dist.get_rank() == 0:
        with open(os.path.join(train_cfg.out_dir, "odpo_steps.jsonl"), "w") as f:
            for s in steps:
                f.write(json.dumps(s) + "\n")
    return {"start": start, "evals": result["evals"], "steps": steps, "export": result["export"],
            "rollout_stats": loader.stats}


# -----------------------------------------------------------------------------
# Command line: online DPO of a policy judged by a trained PWRM


@dataclass
class ODPOTrainConfig(TrainConfig):
    """train.py's TrainConfig with online-DPO defaults."""
    out_dir: str = dataclasses.field(default="runs/odpo", metadata={"flags": ("--out",)})
    steps: int = 60  # optimizer steps
    batch_size: int = 16  # responses per step (two per prompt)
    micro_batch_size: int = 16  # responses per forward (even)
    seq_len: int = 0  # set from max_prompt_tokens + max_new_tokens
    lr: float = 1e-4  # peak learning rate
    warmup_steps: int = 5  # linear warmup
    weight_decay: float = 0.0  # none: the reference anchors the policy
    dtype: str = "fp32"  # bf16 on a GPU
    log_every: int = 5  # progress line every N steps


@dataclass
class ODPORun:
    policy: str = ""  # the SFT-ed policy: a checkpoint folder, a .gguf file or a fetched name; also the reference
    pwrm: str = ""  # the pairwise reward model (same tokenizer); PWRM/calibration.json, when present, sets T
    prompts: str = ""  # jsonl, one {"messages": [...]} per line, each ending in a user turn
    tokenizer: Optional[str] = None  # tekken.json or .gguf; None = the policy's own


def load_policy(path: str, cfg: TrainConfig, device, train: bool = True) -> Transformer:
    """A checkpoint folder through train.build_model, or a .gguf file / fetched name ("smollm2") through
    model.load_model (world size 1)."""
    if os.path.isdir(path):
        return build_model(path, cfg, device, train=train)
    if dist.is_initialized() and dist.get_world_size() > 1:
        raise ValueError(f"{path!r} is not a checkpoint folder: under torchrun every model is sharded from a folder "
                         f"(save it once with model.save_model, or run in one process)")
    model = load_model(path, device=device)
    if not train:
        model.requires_grad_(False).eval()
    return model


def main(argv=None) -> int:
    tcfg, ocfg, run = configs_from_args([ODPOTrainConfig, ODPOConfig, ODPORun], argv,
                                        description="Online DPO with a pairwise reward model (PAPER.md section 8).")
    rank = 0
    try:
        if not (run.policy and run.pwrm and run.prompts):
            raise ValueError("pass --policy CKPT --pwrm CKPT --prompts PROMPTS.jsonl (experiments/odpo_demo.py "
                             "builds all three on the embedded cascade's child)")
        for flag, path in (("--policy", run.policy), ("--pwrm", run.pwrm)):
            if not os.path.exists(resolve_model_path(path)):
                raise FileNotFoundError(f"{flag} {path!r} is neither a checkpoint folder nor a .gguf file: pass the "
                                        f"folder a training stage exported (OUT/model) or a fetched model's name")
        prompts = D.read_chats(run.prompts)
        if any(c[-1]["role"] != "user" for c in prompts):
            raise ValueError(f"{run.prompts}: every prompt must end in a user turn (the policy answers it)")
        rank, _, _, device = setup_distributed()
        policy = load_policy(run.policy, tcfg, device)
        reference = load_policy(run.policy, tcfg, device, train=False)
        tok = D.checkpoint_tokenizer(resolve_model_path(run.policy), policy.args.vocab_size, run.tokenizer)
        pwrm = PairwiseRewardModel(load_policy(run.pwrm, tcfg, device, train=False), tok)
        calib = os.path.join(resolve_model_path(run.pwrm), "calibration.json")
        if os.path.isfile(calib):
            with open(calib) as f:
                pwrm.temperature = json.load(f)["temperature"]
        if rank == 0:
            print(json.dumps({"train": dataclasses.asdict(tcfg), "odpo": dataclasses.asdict(ocfg),
                              "run": dataclasses.asdict(run), "pwrm_temperature": pwrm.temperature}), flush=True)
        run_odpo(policy, reference, pwrm, tok, prompts, ocfg, tcfg, device=device)
    except (ValueError, FileNotFoundError, CheckpointError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        teardown_distributed()
    return 0


if __name__ == "__main__":
    exit_process(main())  # under torchrun: leave without interpreter finalization (train.exit_process)
