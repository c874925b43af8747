"""A pairwise reward model for data.py's arithmetic, trained as odpo.py expects: pairs of responses labelled
by honest rules, the PWRM SFT-ed on both presentation orders (sft.py), its temperature calibrated on
held-out pairs. The paper's preference data and PWRM are unpublished; this is the stand-in both ODPO
experiments use (experiments/odpo_demo.py, experiments/posttrain.py).

Rules (rule_label): a looping answer loses (odpo.is_looping), then a correct answer beats a wrong one,
then the shorter one wins among two correct ones. Candidates (candidate_responses): the policy's own
samples at odpo's sampling temperature plus five written answers (the reference, an off-by-one, a wordy
correct one, a correct sentence repeated to the length cap, the empty answer).
"""

import dataclasses
import os
import random
from typing import Callable, Optional, Sequence

import torch

import data as D
import model as M
import odpo as O
import sft as S
import train as TR


def rule_label(a: dict, b: dict, length_rule: str = "correct") -> Optional[float]:
    """1.0 when a beats b, 0.0 when b beats a, None when the rules cannot tell (or both loop).

    Each response is {"correct": bool, "looping": bool, "length": int}: a looping answer loses, then a
    correct answer beats a wrong one, then the shorter one wins among equally correct ones. length_rule
    "correct": only two correct answers are "equally correct" (the default); "equal": two wrong ones
    are too (the literal reading; on the ODPO demo it teaches the policy to answer nothing: benchmarks/odpo/NOTES.md)."""
    if length_rule not in ("correct", "equal"):
        raise ValueError(f"length_rule must be 'correct' or 'equal', got {length_rule!r}")
    if a["looping"] and b["looping"]:
        return None
    if a["looping"] != b["looping"]:
        return 0.0 if a["looping"] else 1.0
    if a["correct"] != b["correct"]:
        return 1.0 if a["correct"] else 0.0
    if a["length"] != b["length"] and (a["correct"] or length_rule == "equal"):
        return 1.0 if a["length"] < b["length"] else 0.0
    return None


def candidate_responses(problem: dict, samples: Sequence[Sequence[int]], tok, max_new_tokens: int) -> list[dict]:
    """The policy's own samples plus five written answers (correct and short, off by one, correct but
    wordy, a correct sentence repeated up to the length cap, and the empty answer, which is wrong: it has
    no number), each with the facts rule_label reads."""
    ans, wrong = problem["answer"], str(int(problem["answer"]) + 1)
    written = [tok.encode(t) + [tok.eos_id] for t in
               (f"The answer is {ans}.", f"The answer is {wrong}.", f"Let me work it out step by step. The answer is {ans}.")]
    written.append((tok.encode(f"The answer is {ans}. ") * max_new_tokens)[:max_new_tokens])  # no EOS: cut at the cap
    written.append([tok.eos_id])
    out = []
    for ids in [list(s) for s in samples] + written:
        out.append({"ids": ids, "correct": D.check_math_answer(tok.decode(ids), ans),
                    "looping": O.is_looping(ids, eos_id=tok.eos_id, max_new_tokens=max_new_tokens),
                    "length": len(ids)})
    return out


def preference_pairs(problems: Sequence[dict], samples: Sequence[Sequence[Sequence[int]]], tok, max_new_tokens: int,
                     pairs_per_problem: int = 4, seed: int = 0, length_rule: str = "correct") -> list[dict]:
    """Labelled pairs {conversation, a, b, label} (label 1.0 = a wins), A/B positions shuffled."""
    rng = random.Random(seed)
    out = []
    for prob, smp in zip(problems, samples):
        conv = [{"role": "user", "content": prob["question"]}]
        cands = candidate_responses(prob, smp, tok, max_new_tokens)
        decided = [(i, j, rule_label(cands[i], cands[j], length_rule)) for i in range(len(cands)) for j in range(i + 1, len(cands))]
        decided = [d for d in decided if d[2] is not None]
        for i, j, lab in rng.sample(decided, min(pairs_per_problem, len(decided))):
            if rng.random() < 0.5:
                i, j, lab = j, i, 1.0 - lab
            out.append({"conversation": conv, "a": cands[i]["ids"], "b": cands[j]["ids"], "label": lab})
    return out


@torch.no_grad()
def sample_answers(model, tok, problems, n: int, cfg: O.ODPOConfig, seed: int) -> list:
    """n samples at cfg.sample_temperature per problem (the PWRM's training candidates)."""
    was = model.training
    model.eval()
    prompts = [tok.encode_chat([{"role": "user", "content": q["question"]}])[0] for q in problems]
    out = [[] for _ in problems]
    for k in range(n):
        for s in range(0, len(prompts), 64):
            rs = M.generate(model, prompts[s:s + 64], cfg.max_new_tokens, temperature=cfg.sample_temperature,
                            top_p=cfg.top_p, eos_id=tok.eos_id, seed=seed * 1000 + k * 100 + s)
            for j, r in enumerate(rs):
                out[s + j].append(r)
    model.train(was)
    return out


def train_pwrm(policy, build: Callable, tok, fit: Sequence[dict], calib: Sequence[dict], ocfg: O.ODPOConfig,
               tcfg: TR.TrainConfig, *, device, length_rule: str = "correct", name: str = "pwrm") -> dict:
    """The recipe: the policy samples two answers to each `fit` problem, the rules label pairs of those and
    the written candidates, a model from `build()` (same family, e.g. the SFT-ed policy) is SFT-ed on both
    orders of every pair into tcfg.out_dir/model, then its temperature is fitted on pairs from `calib`.
    tcfg.seq_len 0 = the longest PWRM chat. Returns the record: pairs, looping candidates, calibration."""
    samples = sample_answers(policy, tok, fit, 2, ocfg, seed=11)
    pairs = preference_pairs(fit, samples, tok, ocfg.max_new_tokens, seed=11, length_rule=length_rule)
    fmt = O.PairwiseRewardModel(policy, tok, max_response_tokens=ocfg.max_new_tokens)  # the formatting only
    convs = O.pwrm_conversations(fmt, pairs)
    longest = max(len(tok.encode_chat(c)[0]) for c in convs) - 1
    if longest > policy.args.max_seq_len:
        raise ValueError(f"the PWRM's chats need {longest} tokens of context but the policy has max_seq_len "
                         f"{policy.args.max_seq_len}: raise the context (--long-seq-len) or lower max_new_tokens")
    if not tcfg.seq_len:
        tcfg = dataclasses.replace(tcfg, seq_len=longest)
    S.run_sft(build(tcfg), convs, tok, tcfg, S.SFTConfig(truncate=True), device=device, name=name)
    pwrm = O.PairwiseRewardModel(M.load_model(os.path.join(tcfg.out_dir, "model"), device=device).eval(), tok,
                                 max_response_tokens=ocfg.max_new_tokens)
    held = preference_pairs(calib, sample_answers(policy, tok, calib, 2, ocfg, seed=12), tok, ocfg.max_new_tokens,
                            seed=12, length_rule=length_rule)
    calibration = pwrm.calibrate([(q["conversation"], q["a"], q["b"]) for q in held], [q["label"] for q in held])
    return {"pairs": len(pairs), "examples": len(convs), "a_wins": sum(q["label"] for q in pairs),
            "looping_candidates": sum(O.is_looping(r, eos_id=tok.eos_id, max_new_tokens=ocfg.max_new_tokens)
                                      for s in samples for r in s),
            "calibration_pairs": len(held), "calibration": calibration}


def load_pwrm(path: str, tok, temperature: float, ocfg: O.ODPOConfig, device) -> O.PairwiseRewardModel:
    model = M.load_model(path, device=device).eval().requires_grad_(False)
    return O.PairwiseRewardModel(model, tok, temperature=temperature, max_response_tokens=ocfg.max_new_tokens)
