"""GRPO as Magistral defines it: group advantages, the token-summed clipped objective, verifiable and
rubric rewards, trained through train.py's one loop on rollouts from generate.py.

Reading guide
-------------
Concept: PAPER.md section 8 (the reasoning RL stage; Ministral 3 follows Magistral, arXiv 2506.10910).
For each prompt the current policy samples G responses; each gets a reward r_i; the advantage is
`A_i = r_i - mean_group(r)`, then normalised over the minibatch; the per-token ratio is
`rho = pi / pi_old` and the objective, maximised, is

    J = mean over groups of  sum_i sum_t min(rho_it A_i, clip(rho_it, 1 - eps_low, 1 + eps_high) A_i) / sum_i |o_i|

(divided by the group's total generated tokens), eps_low 0.2, eps_high 0.28, no KL term, no reference
model; constant-reward groups are dropped; `ppo_steps` optimizer steps per rollout batch. Rewards: a format gate (`[THINK]...[/THINK]` then a final answer; wrong format =
0, else +0.1), correctness +0.9 (stage 1: a math checker; stage 2: the fraction of rubric items a
judge says hold), and a soft length penalty down to -0.1 over the last l_cache tokens before the cap.

The file reads top-down: config, `group_advantages`, `grpo_loss` (+ `loss_units`), rewards (format,
numbers, math, judges and rubric, length penalty, the never-raising wrapper), the rollout loader and
the loss_fn that train.py's loop calls, evaluation, `run_grpo`, the command line.

Deviations and choices where the paper is silent:
 1. Variant switches for comparison: `adv_norm` "minibatch" (Magistral), "group" (GRPO's per-group
    std), "none" (Dr. GRPO); `agg` "group_token" (Magistral), "seq_mean" (GRPO: per-sequence token
    mean, then mean), "token_mean" (DAPO: all tokens of the batch), "constant" (Dr. GRPO: sum / (N L_max),
    L_max = max_new_tokens); `mask_truncated` drops responses cut at the cap from the loss (DAPO's
    overlong filtering). Standard deviations are population ones (divide by n).
 2. "Minibatch" is one rank's rollouts of one optimizer step. Dropped groups leave the objective: the
    mean is over the groups (or sequences, tokens) that are kept, counted over all micro-batches and
    ranks of the step, so micro-batch losses add up to exactly that mean (train.py's contract).
 3. pi_old is the trainer's own forward (same autocast) at the batch's first of ppo_steps optimizer
    steps, so rho is exactly 1 there; the engine samples in the trainer's compute dtype and its log-probs
    only feed `sampler_ratio_max_dev`. rollouts.jsonl: one line per optimizer step, after its last micro-
    batch's loss, with ratio_max_dev and the shares of tokens clipped low (A < 0) and high (A > 0).
 4. Format gate: the stripped response starts with `[THINK]`, holds one `[THINK]` and one `[/THINK]`, a
    non-empty trace and answer, and ended with EOS. The length penalty applies to well-formatted
    responses only. `--no-format-gate` (a model that never learned [THINK]) reads the whole answer.
 5. Answers: only the text after `[/THINK]` counts; a `\\boxed{}` wins, disagreeing boxed answers are
    wrong, else the last number; signs, separators, decimals and fractions compare exactly.
 6. Stage 2's judge is an interface (`Judge.holds(question, response, item) -> bool`). `ModelJudge`
    asks a local checkpoint "yes or no" and compares the two tokens' logits; `RuleJudge` checks
    machine-readable items ("contains:", "max_words:", "answer:", ...) and serves the tests.
 7. A reward function that raises scores that sample 0; the error is printed once per kind and
    counted in the rollout log; the run goes on. `reward_fn` may be a list of (name, weight, fn): the
    reward is the weighted sum and each one's mean is logged as "reward/<name>".

Run: `python grpo.py --policy CKPT --problems PROBLEMS.jsonl [--held-out HELD.jsonl] --out DIR` (a folder, a
.gguf file or `smollm2`; `--help` lists every flag); `python experiments/grpo_demo.py` SFTs the embedded cascade's smallest child on easy arithmetic
and runs GRPO on it, scored on held-out questions. `python -m pytest tests/test_grpo*.py -q`.
Depends on: model.py, generate.py (rollouts), train.py (the loop), data.py (the tokenizer).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from collections import deque
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Optional, Protocol

import torch
import torch.distributed as dist
import torch.nn.functional as F

import data as D
from generate import RolloutConfig, RolloutWeights, rollout
from model import Transformer, load_model, resolve_model_path
from train import TrainConfig, configs_from_args, rank_world, train, write_json_atomic

# -----------------------------------------------------------------------------
# Config


@dataclass
class GRPOConfig:
    group_size: int = 8  # G samples per prompt (Magistral: 16)
    max_new_tokens: int = 48  # generation cap L_max (Magistral: 32K -> 80K)
    temperature: float = 1.0  # sampling temperature; training log-probs use the same
    eps_low: float = 0.2  # lower clip epsilon
    eps_high: float = 0.28  # upper clip epsilon (clip-higher)
    adv_norm: str = "minibatch"  # "minibatch" (Magistral), "group" (GRPO), "none" (Dr. GRPO)
    agg: str = "group_token"  # "group_token" (Magistral), "seq_mean" (GRPO), "token_mean" (DAPO), "constant" (Dr. GRPO)
    mask_truncated: bool = False  # drop responses cut at the cap from the loss (DAPO overlong filtering)
    std_eps: float = 1e-6  # a group with reward std below this is dropped
    l_cache: int = 8  # soft length penalty window before the cap (tokens)
    reward: str = "math"  # "math" (stage 1, verifiable) or "rubric" (stage 2, judge)
    format_gate: bool = True  # require [THINK]...[/THINK] + answer; off: the whole response is the answer
    eval_every_steps: int = 30  # held-out evaluation every N steps (and at the end)
    ppo_steps: int = 1  # optimizer steps per rollout batch; pi_old stays the trainer's before the first


VARIANTS = {"adv_norm": ("minibatch", "group", "none"), "agg": ("group_token", "seq_mean", "token_mean", "constant")}


def check_config(cfg: GRPOConfig):
    for name, allowed in VARIANTS.items():
        if getattr(cfg, name) not in allowed:
            raise ValueError(f"GRPOConfig.{name} is {getattr(cfg, name)!r}: choose one of {', '.join(allowed)}")
    if cfg.group_size < 2:
        raise ValueError(f"group_size {cfg.group_size}: GRPO needs G >= 2 (with G = 1, r - mean(r) = 0 for every "
                         f"sample and nothing is learned); pass --group-size 2 or more")
    if cfg.temperature <= 0:
        raise ValueError(f"temperature {cfg.temperature}: GRPO samples, so it must be > 0 (1.0 in Magistral)")
    if not 0 <= cfg.l_cache < cfg.max_new_tokens:
        raise ValueError(f"l_cache {cfg.l_cache} must lie in [0, max_new_tokens {cfg.max_new_tokens})")
    if cfg.ppo_steps < 1:
        raise ValueError(f"ppo_steps {cfg.ppo_steps}: each rollout batch needs at least one optimizer step; pass 1 or more")
    if cfg.reward not in ("math", "rubric"):
        raise ValueError(f"reward {cfg.reward!r}: choose 'math' or 'rubric'")


# -----------------------------------------------------------------------------
# Advantages and the loss (PAPER.md section 8)


def group_advantages(rewards: torch.Tensor, group_size: int, norm: str = "minibatch",
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages [N], kept [N] bool) for rewards [N], groups of group_size contiguous samples.

    A_i = r_i - mean_group(r); groups whose reward std is below eps are dropped (A = 0, kept False).
    norm "minibatch": then (A - mean(A)) / std(A) over the kept samples (Magistral); "group": divided by
    the group's std instead (GRPO); "none": left as is (Dr. GRPO)."""
    if group_size < 2:
        raise ValueError(f"group_size {group_size}: with G = 1 every advantage is 0; use G >= 2")
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"rewards must be 1-D with a multiple of group_size {group_size} entries, got "
                         f"{tuple(rewards.shape)}")
    r_GS = rewards.float().view(-1, group_size)
    std_G = r_GS.std(-1, correction=0)
    kept_G = std_G >= eps
    adv_GS = r_GS - r_GS.mean(-1, keepdim=True)
    if norm == "group":
        adv_GS = adv_GS / (std_G[:, None] + eps)
    elif norm == "minibatch":
        a = adv_GS[kept_G]
        if a.numel():
            adv_GS = (adv_GS - a.mean()) / (a.std(correction=0) + eps)
    elif norm != "none":
        raise ValueError(f"norm {norm!r}: choose minibatch, group or none")
    kept = kept_G[:, None].expand_as(adv_GS)
    return (adv_GS * kept).flatten(), kept.flatten()


def grpo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              group_size: int, eps_low: float = 0.2, eps_high: float = 0.28, agg: str = "group_token",
              max_new_tokens: Optional[int] = None) -> torch.Tensor:
    """Minus the clipped objective. logp, old_logp, mask [N, T] (mask 1 = a generated token that counts),
    advantages [N]; samples of a group contiguous. agg: reading guide, deviation 1; "constant" divides by
    N x max_new_tokens (the response budget, not T, which also spans the prompt). A batch with no
    counted token gives a zero that still depends on logp (so backward runs everywhere)."""
    N, T = logp.shape
    if N % group_size:
        raise ValueError(f"{N} samples are not whole groups of {group_size}")
    m = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    A = advantages.to(logp.dtype)[:, None]
    obj_NT = torch.minimum(ratio * A, ratio.clamp(1 - eps_low, 1 + eps_high) * A) * m
    if agg == "group_token":
        num_G = obj_NT.reshape(-1, group_size * T).sum(-1)
        tok_G = m.reshape(-1, group_size * T).sum(-1)
        has = tok_G > 0
        J = (num_G[has] / tok_G[has]).sum() / has.sum().clamp(min=1)
    elif agg == "seq_mean":
        tok_N = m.sum(-1)
        has = tok_N > 0
        J = (obj_NT.sum(-1)[has] / tok_N[has]).sum() / has.sum().clamp(min=1)
    elif agg == "token_mean":
        J = obj_NT.sum() / m.sum().clamp(min=1)
    elif agg == "constant":
        if max_new_tokens is None:
            raise ValueError('agg "constant" needs max_new_tokens (the response length budget)')
        J = obj_NT.sum() / (N * max_new_tokens)
    else:
        raise ValueError(f"agg {agg!r}: choose group_token, seq_mean, token_mean or constant")
    return -J + 0.0 * logp.sum()


def loss_units(mask: torch.Tensor, group_size: int, agg: str) -> int:
    """How many units grpo_loss averages over: groups / sequences / tokens with a counted token, or samples."""
    m = mask.bool()
    if agg == "group_token":
        return int(m.reshape(-1, group_size * m.shape[1]).any(-1).sum())
    if agg == "seq_mean":
        return int(m.any(-1).sum())
    if agg == "token_mean":
        return int(m.sum())
    return m.shape[0]


# -----------------------------------------------------------------------------
# Rewards


THINK, END_THINK = "[THINK]", "[/THINK]"


def split_think(text: str) -> Optional[tuple[str, str]]:
    """(trace, answer) when the response passes the format gate (deviation 4, EOS aside), else None."""
    t = text.strip()
    if not t.startswith(THINK) or t.count(THINK) != 1 or t.count(END_THINK) != 1:
        return None
    trace, answer = t[len(THINK):].split(END_THINK)
    if not trace.strip() or not answer.strip():
        return None
    return trace.strip(), answer.strip()


_MINUS = str.maketrans({"\u2212": "-", "\ufe63": "-", "\uff0d": "-"})
_FRAC = re.compile(r"\\[dt]?frac\{\s*(-?\d+)\s*\}\{\s*(-?\d+)\s*\}")
_NUM = re.compile(r"(?<![\w.])-?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*-?\d+(?!\.\d))?")
_BOX = re.compile(r"\\boxed\{((?:[^{}]|\{[^{}]*\})*)\}")


def parse_number(s: str) -> Optional[Fraction]:
    """One number written as an integer, decimal, fraction a/b or \\frac{a}{b}; None when it is not one."""
    s = _FRAC.sub(r"\1/\2", s.translate(_MINUS)).strip().rstrip(".")
    m = _NUM.fullmatch(s)
    if m is None:
        return None
    try:
        return Fraction(re.sub(r"[\s,]", "", m.group(0)))
    except (ValueError, ZeroDivisionError):
        return None


def extract_answer(answer: str) -> Optional[Fraction]:
    """The final answer of the text after [/THINK] (deviation 5)."""
    answer = _FRAC.sub(r"\1/\2", answer.translate(_MINUS))
    boxed = _BOX.findall(answer)
    if boxed:
        values = {parse_number(b) for b in boxed}
        return values.pop() if len(values) == 1 else None  # disagreeing boxed answers (or unparsable) score 0
    nums = _NUM.findall(answer)
    return parse_number(nums[-1]) if nums else None


def math_correct(answer: str, gold: str) -> bool:
    got, want = extract_answer(answer), parse_number(str(gold))
    if want is None:
        raise ValueError(f"the reference answer {gold!r} is not a number")
    return got is not None and got == want


class Judge(Protocol):
    def holds(self, question: str, response: str, item: str) -> bool: ...


class RuleJudge:
    """Machine-readable rubric items: 'contains:X', 'not_contains:X', 'max_words:N', 'min_words:N',
    'regex:PATTERN', 'answer:NUMBER' (the math checker). Unknown kinds raise (a rubric typo is a bug)."""

    def holds(self, question: str, response: str, item: str) -> bool:
        kind, _, arg = item.partition(":")
        if kind == "contains":
            return arg.lower() in response.lower()
        if kind == "not_contains":
            return arg.lower() not in response.lower()
        if kind == "max_words":
            return len(response.split()) <= int(arg)
        if kind == "min_words":
            return len(response.split()) >= int(arg)
        if kind == "regex":
            return re.search(arg, response) is not None
        if kind == "answer":
            return math_correct(response, arg)
        raise ValueError(f"rubric item {item!r}: unknown kind {kind!r}")


class ModelJudge:
    """A local chat model asked whether one rubric item holds; 'yes' when its logit beats 'no'."""

    def __init__(self, model: Transformer, tok):
        self.model, self.tok = model.eval(), tok
        self.yes, self.no = tok.encode("yes")[0], tok.encode("no")[0]

    @torch.no_grad()
    def holds(self, question: str, response: str, item: str) -> bool:
        ask = (f"Question: {question}\nResponse: {response}\nDoes the response satisfy this requirement: {item}\n"
               f"Answer yes or no.")
        ids = self.tok.encode_chat([{"role": "user", "content": ask}])[0][-self.model.args.max_seq_len:]
        logits = self.model(torch.tensor([ids], device=self.model.embed_tokens.weight.device))[0, -1]
        return bool(logits[self.yes] > logits[self.no])


def rubric_score(judge: Judge, question: str, answer: str, items: list[str]) -> float:
    """Stage 2: the fraction of rubric items the judge says hold."""
    if not items:
        raise ValueError(f"no rubric items for {question!r}")
    return sum(bool(judge.holds(question, answer, it)) for it in items) / len(items)


def length_penalty(n_tokens: int, max_new_tokens: int, l_cache: int) -> float:
    """0 up to max_new_tokens - l_cache tokens, then linear down to -0.1 at the cap."""
    start = max_new_tokens - l_cache
    if l_cache <= 0 or n_tokens <= start:
        return 0.0
    return -0.1 * min(1.0, (n_tokens - start) / l_cache)


def final_part(text: str, truncated: bool, format_gate: bool = True) -> Optional[str]:
    """The answer a response gives, None when it fails the format gate. format_gate False (a model that never
    learned [THINK], such as SmolLM2): the whole response, when it ended and is not empty."""
    if truncated:
        return None
    if not format_gate:
        return text.strip() or None
    parts = split_think(text)
    return None if parts is None else parts[1]


def make_reward(cfg: GRPOConfig, judge: Optional[Judge] = None) -> Callable[[dict], float]:
    """reward(sample) for sample = {text, tokens, n_tokens, truncated, problem: {question, answer | rubric}}."""
    def reward(s: dict) -> float:
        answer = final_part(s["text"], s["truncated"], cfg.format_gate)
        if answer is None:
            return 0.0
        if cfg.reward == "math":
            score = float(math_correct(answer, s["problem"]["answer"]))
        else:
            score = rubric_score(judge or RuleJudge(), s["problem"]["question"], answer, s["problem"]["rubric"])
        return 0.1 + 0.9 * score + length_penalty(s["n_tokens"], cfg.max_new_tokens, cfg.l_cache)
    return reward


def safe_rewards(reward_fn: Callable[[dict], float], samples: list[dict], log: dict) -> list[float]:
    """Deviation 7: an exception (or a non-finite value) scores 0, is counted in log, printed once per kind."""
    out = []
    for s in samples:
        try:
            r = float(reward_fn(s))
            if not math.isfinite(r):
                raise ValueError(f"reward is {r}")
        except Exception as e:  # noqa: BLE001: any bug in a user reward must not stop the run
            kind = f"{type(e).__name__}: {e}"[:200]
            if kind not in log.setdefault("kinds", {}):
                print(f"[grpo] reward function failed ({kind}); that sample scores 0, the run goes on",
                      file=sys.stderr, flush=True)
            log["kinds"][kind] = log["kinds"].get(kind, 0) + 1
            log["count"] = log.get("count", 0) + 1
            r = 0.0
        out.append(r)
    return out


# -----------------------------------------------------------------------------
# Rollouts feeding train.py's loop


def prompt_ids(tok, question: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": question}])[0]


class RolloutLoader:
    """train.py's loader contract, batch(i) -> (inputs [B, T], targets [B, T]), filled online.

    At the first micro-batch of an optimizer step it samples G responses to each of the step's prompts
    on this rank (all micro-batches at once: the advantages are normalised over them), scores them and
    queues, per micro-batch, old log-probs, advantages, the loss mask and the share of the step's loss
    units (deviation 2); `grpo_loss_fn` pops them in order and checks the tokens match."""

    def __init__(self, model: Transformer, tok, problems: list[dict], cfg: GRPOConfig, reward_fn, *,
                 micro_batch_size: int, grad_accum: int, seed: int = 0, log_path: Optional[str] = None,
                 dtype: Optional[torch.dtype] = None):
        check_config(cfg)
        if micro_batch_size % cfg.group_size:
            raise ValueError(f"micro_batch_size {micro_batch_size} must be a multiple of group_size {cfg.group_size} "
                             f"(a group's samples share one micro-batch)")
        if not problems:
            raise ValueError("GRPO needs at least one problem")
        self.model, self.tok, self.cfg, self.reward_fn = model, tok, cfg, reward_fn
        self.problems = problems
        self.ids = [prompt_ids(tok, p["question"]) for p in problems]
        ctx = model.args.max_seq_len
        for p, ids in zip(problems, self.ids):
            if len(ids) + cfg.max_new_tokens > ctx:
                raise ValueError(f"the prompt {p['question'][:60]!r} has {len(ids)} tokens; with max_new_tokens "
                                 f"{cfg.max_new_tokens} it exceeds the context {ctx}: drop it or lower --max-new-tokens")
        self.B, self.accum, self.seed = micro_batch_size, grad_accum, seed
        self.seq_len = max(len(i) for i in self.ids) + cfg.max_new_tokens - 1
        self.queue: deque = deque()
        self.log_path, self.stats, self.reward_errors = log_path, [], {}
        self.weights: Optional[RolloutWeights] = None
        self.dtype = dtype  # the trainer's compute dtype: the engine samples in it (deviation 3)
        self.rollout_recs: list[dict] = []
        # reward_fn: one callable, or [(name, weight, fn), ...] summed with their weights
        self.rewards = [("reward", 1.0, reward_fn)] if callable(reward_fn) else list(reward_fn)

    def _prompts_for(self, step: int) -> list[int]:
        step //= self.cfg.ppo_steps  # the rollout batch's index
        rank, world = rank_world()
        n = self.accum * self.B // self.cfg.group_size
        out = []
        for j in range(n):
            k = (step * world + rank) * n + j
            epoch, pos = divmod(k, len(self.problems))
            order = list(range(len(self.problems)))
            random.Random(f"grpo:{self.seed}:{epoch}").shuffle(order)
            out.append(order[pos])
        return out

    def _roll(self, step: int):
        cfg, G, tok = self.cfg, self.cfg.group_size, self.tok
        rank, world = rank_world()
        idx = self._prompts_for(step)
        t0, c0 = time.perf_counter(), time.process_time()
        if self.weights is None:
            self.weights = RolloutWeights(self.model, dtype=self.dtype)
        else:
            self.weights.refresh(self.model)  # the weights after the last optimizer step (collective under FSDP2)
        rc = RolloutConfig(max_new_tokens=cfg.max_new_tokens, group_size=G, temperature=cfg.temperature,
                           eos_id=tok.eos_id, pad_id=tok.pad_id, seed=self.seed * 1_000_003 + step * world + rank)
        r = rollout(self.weights, [self.ids[k] for k in idx], rc)
        t_roll = time.perf_counter() - t0
        samples = []
        for row, (toks, n, trunc) in enumerate(zip(r.tokens.tolist(), r.lengths.tolist(), r.truncated.tolist())):
            body = toks[:n - 1] if not trunc else toks[:n]  # the EOS is not text
            samples.append({"text": tok.decode(body, special="keep"), "tokens": toks[:n], "n_tokens": n,
                            "truncated": trunc, "problem": self.problems[idx[row // G]]})
        parts_R = {name: torch.tensor(safe_rewards(fn, samples, self.reward_errors)) for name, _, fn in self.rewards}
        rewards = sum(w * parts_R[name] for name, w, _ in self.rewards)
        adv, kept = group_advantages(rewards, G, cfg.adv_norm, cfg.std_eps)
        N, T = r.tokens.shape[0], self.seq_len
        inputs = torch.full((N, T), tok.pad_id, dtype=torch.long)
        targets = torch.full((N, T), -100, dtype=torch.long)
        old = torch.zeros(N, T)
        for row in range(N):
            p, n = self.ids[idx[row // G]], int(r.lengths[row])
            seq = torch.tensor(p + r.tokens[row, :n].tolist())
            inputs[row, :len(seq) - 1] = seq[:-1]
            targets[row, len(p) - 1:len(seq) - 1] = seq[len(p):]
            old[row, len(p) - 1:len(seq) - 1] = r.logprobs[row, :n].cpu()
        mask = (targets != -100) & kept[:, None]
        if cfg.mask_truncated:
            mask &= ~r.truncated.cpu()[:, None]
        recs = []
        for m in range(self.accum):
            sl = slice(m * self.B, (m + 1) * self.B)
            recs.append({"inputs": inputs[sl], "targets": targets[sl], "old_logp": None, "sampler_logp": old[sl],
                         "adv": adv[sl], "mask": mask[sl], "units": loss_units(mask[sl], G, cfg.agg), "m": m})
        total = sum(x["units"] for x in recs)
        if dist.is_initialized():
            t = torch.tensor([float(total)], dtype=torch.float64,
                             device="cuda" if dist.get_backend() == "nccl" else "cpu")
            dist.all_reduce(t)
            total = int(t.item())
        for x in recs:
            x["global_units"] = max(total, 1)
        self.rollout_recs = recs
        parts = [final_part(s["text"], s["truncated"], cfg.format_gate) for s in samples]
        correct = [p is not None and _safe_correct(p, s["problem"]) for p, s in zip(parts, samples)]
        std_G = rewards.view(-1, G).std(-1, correction=0)
        stat = {"step": step + 1, "mean_reward": float(rewards.mean()), "accuracy": sum(correct) / N,
                "format_rate": sum(p is not None for p in parts) / N,
                "mean_length": float(r.lengths.float().mean()), "truncation_rate": float(r.truncated.float().mean()),
                "zero_variance_groups": float((std_G < cfg.std_eps).float().mean()),
                "reward_errors": self.reward_errors.get("count", 0), "rollout_s": t_roll,
                "rollout_cpu_s": time.process_time() - c0, "new_tokens": int(r.lengths.sum()),
                "rollout_tok_s": float(r.lengths.sum()) / max(t_roll, 1e-9),
                **{f"reward/{name}": float(v.mean()) for name, v in parts_R.items() if len(self.rewards) > 1}}
        self.rollout_stat = stat

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Rolls at the first micro-batch of every ppo_steps-th optimizer step; the others replay its micro-batches."""
        step, m = divmod(i, self.accum)
        if m == 0:
            if step % self.cfg.ppo_steps == 0:
                self._roll(step)
            self.stats.append({**self.rollout_stat, "step": step + 1, "ppo_step": step % self.cfg.ppo_steps})
        rec = self.rollout_recs[m]
        self.queue.append(rec)
        return rec["inputs"], rec["targets"]

    def log_step(self):
        """Writes the step's line once its last micro-batch's loss has added the ratio diagnostics."""
        if self.log_path and rank_world()[0] == 0:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(self.stats[-1]) + "\n")


def _safe_correct(answer: str, problem: dict) -> bool:
    try:
        return "answer" in problem and math_correct(answer, problem["answer"])
    except ValueError:
        return False


def token_logprobs(model: Transformer, inputs_BT: torch.Tensor, targets_BT: torch.Tensor,
                   temperature: float) -> torch.Tensor:
    """log softmax(logits / T) of each target [B, T] (0 where the target is -100), computed only at the
    response positions: no [B, T, V] tensor."""
    sel_BT = targets_BT != -100

    def head(h_BTD, W_VD):
        logits_NV = F.linear(h_BTD[sel_BT], W_VD).float() / temperature
        lp_N = logits_NV.log_softmax(-1).gather(-1, targets_BT[sel_BT][:, None])[:, 0]
        return torch.zeros(sel_BT.shape, dtype=lp_N.dtype, device=lp_N.device).masked_scatter(sel_BT, lp_N)

    return model(inputs_BT, head_fn=head)


def grpo_loss_fn(loader: RolloutLoader, cfg: GRPOConfig) -> Callable:
    """loss_fn(model, inputs, targets, n_total) for train.train: this micro-batch's share of the step's mean."""
    def loss_fn(model, inputs_BT, targets_BT, n_total):
        rec = loader.queue.popleft()
        if not torch.equal(rec["inputs"], inputs_BT.cpu()):
            raise RuntimeError("grpo: the loss got a batch the rollout loader did not queue (out of order)")
        logp = token_logprobs(model, inputs_BT, targets_BT, cfg.temperature)
        dev = logp.device
        if rec["old_logp"] is None:  # first optimizer step on this batch: pi_old is this very forward
            rec["old_logp"] = logp.detach().cpu()
        old, m, A = rec["old_logp"].to(dev), rec["mask"].to(dev), rec["adv"].to(dev)
        loss = grpo_loss(logp, old, A, m, cfg.group_size, cfg.eps_low, cfg.eps_high, cfg.agg, cfg.max_new_tokens)
        with torch.no_grad():
            st = loader.stats[-1]
            if m.any():
                ratio, sign = torch.exp(logp - old)[m], A[:, None].expand_as(m)[m]
                samp = torch.exp(rec["old_logp"].to(dev) - rec["sampler_logp"].to(dev))[m]
                for k, v in (("ratio_max_dev", ratio), ("sampler_ratio_max_dev", samp)):
                    st[k] = max(st.get(k, 0.0), float((v - 1).abs().max()))
                for k, v in (("clipped_low", (sign < 0) & (ratio < 1 - cfg.eps_low)),
                             ("clipped_high", (sign > 0) & (ratio > 1 + cfg.eps_high)), ("tokens", m[m])):
                    st[k] = st.get(k, 0) + int(v.sum())
            if rec["m"] == loader.accum - 1:
                n = max(st.pop("tokens", 0), 1)
                st["clip_frac_low"], st["clip_frac_high"] = st.pop("clipped_low", 0) / n, st.pop("clipped_high", 0) / n
                loader.log_step()
        return loss * rec["units"] / rec["global_units"]
    return loss_fn


# -----------------------------------------------------------------------------
# Evaluation: greedy answers to held-out problems


@torch.no_grad()
def evaluate(model: Transformer, tok, problems: list[dict], cfg: GRPOConfig, batch_size: int = 64) -> dict:
    """Held-out exact-answer accuracy (format gate passed and correct), format rate, mean length,
    truncation rate, greedy, through the rollout engine."""
    W = RolloutWeights(model)
    rc = RolloutConfig(max_new_tokens=cfg.max_new_tokens, temperature=0.0, eos_id=tok.eos_id, pad_id=tok.pad_id)
    n_ok = n_fmt = n_trunc = n_tok = 0
    samples, per_problem = [], []
    for s in range(0, len(problems), batch_size):
        chunk = problems[s:s + batch_size]
        r = rollout(W, [prompt_ids(tok, p["question"]) for p in chunk], rc)
        for p, toks, n, trunc in zip(chunk, r.tokens.tolist(), r.lengths.tolist(), r.truncated.tolist()):
            text = tok.decode(toks[:n - 1] if not trunc else toks[:n], special="keep")
            answer = final_part(text, trunc, cfg.format_gate)
            fmt = answer is not None
            ok = fmt and _safe_correct(answer, p)
            n_ok, n_fmt, n_trunc, n_tok = n_ok + ok, n_fmt + fmt, n_trunc + trunc, n_tok + n
            per_problem.append(int(ok))
            if len(samples) < 4:
                samples.append({"question": p["question"], "answer": p.get("answer"), "output": text, "correct": ok})
    n = max(len(problems), 1)
    return {"n": len(problems), "accuracy": n_ok / n, "format_rate": n_fmt / n, "mean_length": n_tok / n,
            "truncation_rate": n_trunc / n, "samples": samples, "correct": per_problem}


def run_grpo(model: Transformer, tok, problems: list[dict], cfg: GRPOConfig, train_cfg: TrainConfig, *, device,
             eval_problems: Optional[list[dict]] = None, reward_fn: Optional[Callable] = None,
             judge: Optional[Judge] = None, name: str = "grpo") -> dict:
    """GRPO on `problems` through train.train: train_cfg.steps optimizer steps, each on the rollouts of
    train_cfg.batch_size / G prompts (global). Returns train()'s dict plus "rollouts" (per-step stats),
    "start"/"end" held-out evaluations and "reward_errors"."""
    check_config(cfg)
    _, world = rank_world()
    accum = train_cfg.batch_size // (train_cfg.micro_batch_size * world)
    if accum < 1 or train_cfg.batch_size % (train_cfg.micro_batch_size * world):
        raise ValueError(f"batch_size {train_cfg.batch_size} must be a multiple of micro_batch_size "
                         f"{train_cfg.micro_batch_size} x world size {world}")
    os.makedirs(train_cfg.out_dir, exist_ok=True)
    loader = RolloutLoader(model, tok, problems, cfg, reward_fn or make_reward(cfg, judge),
                           micro_batch_size=train_cfg.micro_batch_size, grad_accum=accum, seed=train_cfg.seed,
                           log_path=os.path.join(train_cfg.out_dir, "rollouts.jsonl"),
                           dtype=torch.bfloat16 if train_cfg.dtype == "bf16" else torch.float32)
    train_cfg = dataclasses.replace(train_cfg, seq_len=loader.seq_len, eval_every=cfg.eval_every_steps)
    start_file = os.path.join(train_cfg.out_dir, "eval_start.json")
    start = None
    if eval_problems:
        if os.path.exists(start_file):  # a resumed run keeps the evaluation of the true start
            with open(start_file) as f:
                start = json.load(f)
        else:
            start = evaluate(model, tok, eval_problems, cfg)
            write_json_atomic(start_file, start)
    eval_fn = (lambda m: evaluate(m, tok, eval_problems, cfg)) if eval_problems else None
    out = train(model, loader, grpo_loss_fn(loader, cfg), train_cfg, device=device, eval_fn=eval_fn, name=name,
                run_info={"grpo": dataclasses.asdict(cfg), "problems": len(problems)})
    return {**out, "rollouts": loader.stats, "start": start, "end": out["evals"][-1]["eval"] if out["evals"] else None,
            "reward_errors": loader.reward_errors}


# -----------------------------------------------------------------------------
# Command line: GRPO of a policy on a file of problems with verifiable answers


@dataclass
class GRPOTrainConfig(TrainConfig):
    """train.py's flags with GRPO defaults."""
    out_dir: str = dataclasses.field(default="runs/grpo", metadata={"flags": ("--out",)})
    steps: int = 120  # optimizer steps (a rollout batch every ppo_steps of them)
    batch_size: int = 256  # samples per step (global): 32 prompts x G 8
    micro_batch_size: int = 64  # samples per forward (whole groups)
    seq_len: int = 0  # set from the prompts and max_new_tokens
    lr: float = 2e-4  # peak learning rate
    warmup_steps: int = 0  # constant learning rate (min_lr_ratio 1)
    min_lr_ratio: float = 1.0  # no decay
    weight_decay: float = 0.0  # none in RL
    dtype: str = "fp32"  # bf16 on a GPU
    log_every: int = 5  # progress line every N steps


@dataclass
class GRPORun:
    policy: str = ""  # the policy: a checkpoint folder, a .gguf file or a fetched name ("smollm2")
    problems: str = ""  # jsonl, one {"question": ..., "answer": ...} per line (answer: a number)
    held_out: Optional[str] = None  # jsonl like --problems: scored greedy before and after
    tokenizer: Optional[str] = None  # tekken.json or .gguf; None = the policy's own


def read_problems(path: str) -> list[dict]:
    """{question, answer} rows from a .jsonl file; a bad line raises ValueError naming path:line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"problem file {path} does not exist: give a .jsonl file with one "
                                f'{{"question": ..., "answer": ...}} object per line')
    out = []
    with open(path, encoding="utf-8") as f:
        for n, row in D.jsonl_rows(path, f):
            if not (isinstance(row, dict) and isinstance(row.get("question"), str) and "answer" in row):
                raise ValueError(f'{path}:{n} needs a "question" string and an "answer"')
            out.append({**row, "answer": str(row["answer"])})
    if not out:
        raise ValueError(f"problem file {path} holds no problems")
    return out


def main(argv=None) -> int:
    tcfg, gcfg, run = configs_from_args([GRPOTrainConfig, GRPOConfig, GRPORun], argv,
                                        description="GRPO with verifiable rewards (PAPER.md section 8).")
    try:
        check_config(gcfg)
        if not (run.policy and run.problems):
            raise ValueError("pass --policy CKPT --problems PROBLEMS.jsonl (experiments/grpo_demo.py builds an "
                             "SFT-ed policy on the embedded cascade's child and runs GRPO on it)")
        path = resolve_model_path(run.policy)
        if not os.path.exists(path):
            raise FileNotFoundError(f"--policy {run.policy!r} is neither a checkpoint folder nor a .gguf file")
        problems = read_problems(run.problems)
        held = read_problems(run.held_out) if run.held_out else None
        model = load_model(path, dtype=torch.float32)
        tok = D.checkpoint_tokenizer(path, model.args.vocab_size, run.tokenizer)
        print(json.dumps({"train": dataclasses.asdict(tcfg), "grpo": dataclasses.asdict(gcfg),
                          "run": dataclasses.asdict(run)}), flush=True)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        res = run_grpo(model.to(device), tok, problems, gcfg, tcfg, device=device, eval_problems=held)
        if held:
            print(f"held-out accuracy {res['start']['accuracy']:.1%} -> {res['end']['accuracy']:.1%}", flush=True)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
