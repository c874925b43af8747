"""Both post-training chains of PAPER.md section 8 on every base child of a cascade, stage to stage:

    Instruct:  base -> SFT (KL to the largest size's SFT) -> online DPO (a PWRM's soft labels)
    Reasoning: base -> reasoning SFT ([THINK] traces) -> GRPO (verifiable rewards) -> online DPO

The task is data.py's easy arithmetic, split by question (data.split_by_question): no held-out question is
in any training pool. Every model is scored greedy on the held-out problems (exact answer, format, loops
by odpo.is_looping at the cap) and, against the model it started from, by the paired flips with their
sign test and by one PWRM's win rate. Each stage is a cascade.py stage under --out (skipped when done,
refused naming --restart-from when its settings changed).

Choices: (a) one task for every stage so that the chain's effect is measured on one scale; (b) the
largest size's SFT teaches the smaller ones (KL), the largest itself trains by CE; (c) one PWRM,
experiments/pwrm.py's recipe, from the smallest instruct SFT; (d) every evaluation is cached beside its
checkpoint under a key of everything it depends on.

Run: `python experiments/posttrain.py` (the embedded cascade first, reused when it exists; `--out DIR
--results DIR`); `python experiments/posttrain.py --parent smollm2 --preset cpu-real --out runs/smollm2
--results benchmarks/posttrain/smollm2` (a real parent: fine-tuning rates, POST_REAL).
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the mechanism files

import cascade as C  # noqa: E402
import data as D  # noqa: E402
import grpo as G  # noqa: E402
import model as M  # noqa: E402
import odpo as O  # noqa: E402
import sft as S  # noqa: E402
import train as TR  # noqa: E402
from experiments import plots  # noqa: E402
from experiments import pwrm as PW  # noqa: E402
from experiments.stats import paired_flips  # noqa: E402

POST_STAGES = {  # optimizer steps of each stage and held-out problems scored, per cascade preset
    "smoke": dict(sft_steps=3, grpo_steps=2, odpo_steps=2, pwrm_steps=2, eval_problems=8),
    "cpu": dict(sft_steps=400, grpo_steps=60, odpo_steps=15, pwrm_steps=80, eval_problems=64),
    "gpu": dict(sft_steps=300, grpo_steps=120, odpo_steps=60, pwrm_steps=300, eval_problems=100),
    "cpu-real": dict(sft_steps=8, grpo_steps=3, odpo_steps=3, pwrm_steps=8, eval_problems=16),
}
POST_STAGES["paper"] = POST_STAGES["gpu-real"] = POST_STAGES["gpu"]
POST = dict(max_operand=49, ops="+", held_out=100, pool=2500, new_tokens=24, sft_batch=32, sft_lr=3e-3,
            grpo_group=8, grpo_prompts=32, grpo_lr=2e-4, odpo_batch=16, odpo_lr=1e-4, pwrm_batch=16, pwrm_lr=1e-3,
            pwrm_problems=96, calib_problems=32, eval_seed=1234)
# A pretrained parent's children are fine-tuned, not trained from a few thousand steps: the rates above
# (for the embedded 1-3M-parameter children) would wreck a pretrained child, so a real parent's run uses
# fine-tuning rates, fewer GRPO prompts per step (CPU cost) and sums and differences of small numbers
# whenever --parent is given.
POST_REAL = dict(sft_lr=5e-5, grpo_lr=1e-5, odpo_lr=1e-5, pwrm_lr=5e-5, grpo_prompts=8, max_operand=14, ops="+-")
POST_ROWS = ("base", "SFT", "instruct ODPO", "reasoning SFT", "GRPO", "reasoning ODPO")
KINDS = ("instruct_sft", "reasoning_sft", "grpo", "instruct_odpo", "reasoning_odpo")


@dataclass
class PostConfig:
    sft_steps: Optional[int] = dataclasses.field(default=None, metadata={"flags": ("--post-sft-steps",)})
    grpo_steps: Optional[int] = dataclasses.field(default=None, metadata={"flags": ("--post-grpo-steps",)})
    odpo_steps: Optional[int] = dataclasses.field(default=None, metadata={"flags": ("--post-odpo-steps",)})
    pwrm_steps: Optional[int] = dataclasses.field(default=None, metadata={"flags": ("--post-pwrm-steps",)})
    eval_problems: Optional[int] = dataclasses.field(default=None, metadata={"flags": ("--post-eval-problems",)})
    results: Optional[str] = None  # where posttrain.md/json/png go; None = <out>/results


def resolve(pc: PostConfig, cfg: C.CascadeConfig, preset: C.Preset, world: int) -> tuple:
    """(PostConfig with the preset's steps filled in, the recipe); refuses what the chain cannot do."""
    steps = POST_STAGES.get(cfg.preset, POST_STAGES["cpu"])
    pc = dataclasses.replace(pc, **{k: v for k, v in steps.items() if getattr(pc, k) is None})
    if world > 1:
        raise ValueError("the post-training chain runs in one process (odpo.py is world size 1): drop torchrun")
    if pc.eval_problems > POST["held_out"]:
        raise ValueError(f"--post-eval-problems {pc.eval_problems} is more than the {POST['held_out']} held-out "
                         f"problems: lower it")
    return pc, {**POST, **POST_REAL} if cfg.parent is not None else dict(POST)


def stage_names(sizes: list) -> list:
    """The chain's stages in the order it makes them (cascade.py's --restart-from accepts each)."""
    return ([f"{n}/{k}" for n in sizes for k in KINDS[:2]] + ["post/pwrm"]
            + [f"{n}/{k}" for n in sizes for k in KINDS[2:]])


@dataclass
class PostData:
    tok: D.Tokenizer
    think: bool  # the tokenizer has [THINK]/[/THINK] (Tekken v13); else the trace goes in the content
    train: list  # [{question, answer}] training pool (SFT, GRPO and ODPO prompts, PWRM pairs)
    held: list  # held-out problems, no question of which is in train
    overlap: int  # held-out questions also in the training pool (0 by construction; counted)
    prompt_tokens: int  # the longest chat prompt (odpo.py's max_prompt_tokens)

    def chat(self, p: dict, reasoning: bool) -> list:
        if not reasoning:
            return [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": f"The answer is {p['answer']}."}]
        trace = D.math_trace(p["question"], p["answer"])
        reply = ({"role": "assistant", "content": p["answer"], "thinking": trace} if self.think
                 else {"role": "assistant", "content": f"{trace} Answer: {p['answer']}"})
        return [{"role": "user", "content": p["question"]}, reply]


def post_data(cfg, ctx, recipe: dict) -> PostData:
    """The problems split by question, and a tokenizer that knows [THINK] where the run's is a legacy Tekken
    file (data.tekken_with_think: same ids, the two control tokens named)."""
    tok = ctx.tok
    if tok.path.endswith(".json") and "[THINK]" not in tok.specials:
        tok = D.Tokenizer.from_file(D.tekken_with_think(tok.path, os.path.join(cfg.out, "post", "tekken.json"),
                                                        tok.vocab_size), vocab_size=tok.vocab_size)
    pool = D.easy_math_problems(POST["pool"], seed=cfg.seed, max_operand=recipe["max_operand"], ops=recipe["ops"])
    train, held = D.split_by_question(pool, POST["held_out"], seed=cfg.seed)
    overlap = len({p["question"] for p in held} & {p["question"] for p in train})
    longest = max(len(tok.encode_chat([{"role": "user", "content": p["question"]}])[0]) for p in pool)
    return PostData(tok, "[THINK]" in tok.specials, train, held, overlap, longest)


class Chain:
    """The chain's stages on one cascade run (run_cascade's result)."""

    def __init__(self, run: dict, pc: PostConfig, recipe: dict):
        self.cfg, self.ctx, self.stages, self.pc, self.recipe = run["cfg"], run["ctx"], run["stages"], pc, recipe
        self.pd = post_data(self.cfg, self.ctx, recipe)
        self.ocfg = O.ODPOConfig(max_new_tokens=POST["new_tokens"], max_prompt_tokens=self.pd.prompt_tokens,
                                 eval_prompts=0)

    def train_config(self, name, steps, batch, lr, seq_len=0, **kw) -> TR.TrainConfig:
        kw = {"warmup_steps": max(1, steps // 10), **kw}
        return TR.TrainConfig(out_dir=self.stages.dir(name), steps=steps, batch_size=batch, micro_batch_size=batch,
                              seq_len=seq_len, lr=lr, dtype=self.cfg.dtype, seed=self.cfg.seed, resume=True,
                              ckpt_every=max(1, steps // 2), keep_checkpoints=1, log_every=max(1, steps // 5), **kw)

    def build(self, path, train=True):
        return C.build(path, self.ctx, self.cfg, train=train)

    def done(self, name, **key):
        return self.stages.done(name, key={"recipe": self.recipe, **key})

    def sft(self, name, init_path, teacher_path, reasoning: bool) -> str:
        """SFT by KL to teacher_path's model (or CE without one, choice b) on the chain's chats."""
        pd, steps = self.pd, self.pc.sft_steps
        if self.done(name, start=init_path, teacher=teacher_path, steps=steps) is None:
            convs = [pd.chat(p, reasoning) for p in pd.train]
            seq = max(len(pd.tok.encode_chat(c)[0]) for c in convs) - 1
            ctx_len = M.read_checkpoint_args(init_path)[0].max_seq_len
            if max(seq, pd.prompt_tokens + POST["new_tokens"]) > ctx_len:
                raise ValueError(f"post-training needs {max(seq, pd.prompt_tokens + POST['new_tokens'])} tokens of "
                                 f"context but {init_path} has max_seq_len {ctx_len}: raise --long-seq-len")
            TR.print0(f"== stage {name}: SFT {init_path} on {len(convs)} {'reasoning' if reasoning else 'instruct'} "
                      f"chats, {'KL to ' + teacher_path if teacher_path else 'CE'}")
            teacher = self.build(teacher_path, train=False) if teacher_path else None
            tcfg = self.train_config(name, steps, POST["sft_batch"], self.recipe["sft_lr"], seq)
            r = S.run_sft(self.build(init_path), convs, pd.tok, tcfg, S.SFTConfig(), teacher, device=self.ctx.device,
                          name=name)
            self.stages.finish(name, {"start": init_path, "teacher": teacher_path, "steps": steps,
                                      "first_loss": r["history"][0]["loss"], "last_loss": r["history"][-1]["loss"]})
        return os.path.join(self.stages.dir(name), "model")

    def pwrm(self, init_path) -> O.PairwiseRewardModel:
        """Choice c: experiments/pwrm.py's recipe on the training pool; the calibration goes in done.json."""
        name, pd, steps = "post/pwrm", self.pd, self.pc.pwrm_steps
        if self.done(name, start=init_path, steps=steps) is None:
            TR.print0(f"== stage {name}: pairwise reward model from {init_path}, {steps} SFT steps")
            policy = M.load_model(init_path, device=self.ctx.device).eval()
            k = min(POST["pwrm_problems"], 8 * steps)  # a short PWRM stage (tests) samples fewer pairs
            fit, calib = pd.train[:k], pd.train[-min(POST["calib_problems"], k):]
            tcfg = self.train_config(name, steps, POST["pwrm_batch"], self.recipe["pwrm_lr"])
            info = PW.train_pwrm(policy, lambda c: self.build(init_path), pd.tok, fit, calib, self.ocfg, tcfg,
                                 device=self.ctx.device, name=name)
            self.stages.finish(name, {"start": init_path, **info})
        return PW.load_pwrm(os.path.join(self.stages.dir(name), "model"), pd.tok,
                            self.stages.info(name)["calibration"]["temperature"], self.ocfg, self.ctx.device)

    def grpo(self, name, init_path) -> str:
        """grpo.py's recipe (constant lr, no weight decay) on the training pool, G samples per prompt."""
        steps = self.pc.grpo_steps
        if self.done(name, start=init_path, steps=steps) is None:
            TR.print0(f"== stage {name}: GRPO from {init_path} for {steps} steps")
            gcfg = G.GRPOConfig(group_size=POST["grpo_group"], max_new_tokens=POST["new_tokens"],
                                format_gate=self.pd.think, eval_every_steps=0)
            batch = POST["grpo_group"] * self.recipe["grpo_prompts"]
            tcfg = self.train_config(name, steps, batch, self.recipe["grpo_lr"], warmup_steps=0, min_lr_ratio=1.0,
                                     weight_decay=0.0)
            r = G.run_grpo(self.build(init_path), self.pd.tok, self.pd.train, gcfg, tcfg, device=self.ctx.device,
                           name=name)
            first, last = r["rollouts"][0], r["rollouts"][-1]
            self.stages.finish(name, {"start": init_path, "steps": steps, "first_mean_reward": first["mean_reward"],
                                      "last_mean_reward": last["mean_reward"]})
        return os.path.join(self.stages.dir(name), "model")

    def odpo(self, name, init_path, pwrm) -> str:
        """odpo.py's recipe: two samples per prompt at T = 0.7, soft labels from the PWRM, the start as reference."""
        steps = self.pc.odpo_steps
        if self.done(name, start=init_path, steps=steps, pwrm=self.stages.info("post/pwrm").get("key")) is None:
            TR.print0(f"== stage {name}: online DPO from {init_path} for {steps} steps")
            tcfg = self.train_config(name, steps, POST["odpo_batch"], self.recipe["odpo_lr"], weight_decay=0.0)
            prompts = [[{"role": "user", "content": p["question"]}] for p in self.pd.train]
            O.run_odpo(self.build(init_path), self.build(init_path, train=False), pwrm, self.pd.tok, prompts,
                       self.ocfg, tcfg, device=self.ctx.device, name=name)
            self.stages.finish(name, {"start": init_path, "steps": steps})
        return os.path.join(self.stages.dir(name), "model")

    def evaluate(self, name, path, reasoning: bool, start: Optional[str], pwrm) -> dict:
        """Choice d: cached in <stage>/post_eval.json under a key of what it depends on besides the checkpoint."""
        stages, ocfg, pd = self.stages, self.ocfg, self.pd
        cache = os.path.join(stages.dir(name), "post_eval.json")
        held = pd.held[:self.pc.eval_problems]
        key = {"held": [p["question"] for p in held], "new_tokens": ocfg.max_new_tokens, "reasoning": reasoning,
               "start": start, "start_made": stages.info(start) if start else None,  # done.json: one training's
               "measures": 4,  # the version of what is measured: a new measure recomputes the cached ones
               "pwrm_made": stages.info("post/pwrm") if start else None}
        if os.path.exists(cache):
            with open(cache) as f:
                cached = json.load(f)
            if cached["key"] == json.loads(json.dumps(key)):
                return cached["result"]
        model, tok = M.load_model(path, device=self.ctx.device).eval(), pd.tok
        prompts = [tok.encode_chat([{"role": "user", "content": p["question"]}])[0] for p in held]
        greedy = M.generate(model, prompts, ocfg.max_new_tokens, eos_id=tok.eos_id)
        sampled = M.generate(model, prompts, ocfg.max_new_tokens, temperature=ocfg.sample_temperature,
                             eos_id=tok.eos_id, seed=POST["eval_seed"])
        ended = [bool(r) and r[-1] == tok.eos_id for r in greedy]
        texts = [tok.decode(r[:-1] if e else r, special="keep") for r, e in zip(greedy, ended)]
        answers = [G.final_part(t, not e, pd.think and reasoning) for t, e in zip(texts, ended)]
        fmt = [a is not None and (reasoning or "[THINK]" not in t) for a, t in zip(answers, texts)]
        loops = lambda rs: float(np.mean([O.is_looping(r, eos_id=tok.eos_id, max_new_tokens=ocfg.max_new_tokens)
                                          for r in rs]))
        correct = [D.check_math_answer(t, p["answer"]) for t, p in zip(texts, held)]
        result = {"n": len(held), "accuracy": float(np.mean(correct)), "correct": correct,
                  "format_rate": float(np.mean(fmt)), "loop_rate_greedy": loops(greedy),
                  "loop_rate_sampled": loops(sampled), "mean_new_tokens": float(np.mean([len(r) for r in greedy])),
                  "sampled": sampled,
                  "examples": [{"question": p["question"], "answer": p["answer"], "output": t} for p, t in zip(held[:3], texts)]}
        if start is not None:  # the starting model's samples: same prompts, same seed
            with open(os.path.join(stages.dir(start), "post_eval.json")) as f:
                start_samples = json.load(f)["result"]["sampled"]
            convs = [[{"role": "user", "content": p["question"]}] for p in held]
            p, keep = O.judge_pairs(pwrm, tok, ocfg, convs, sampled, start_samples)
            kept = [q for q, k in zip(p, keep) if k]
            result |= {"win_rate": float(np.mean(kept)) if kept else None, "win_pairs": len(kept),
                       # a sample equal to the start's, token for token, is a tie (p = 0.5 by the both-order average)
                       "same_as_start": float(np.mean([list(a) == list(b) for a, b in zip(sampled, start_samples)]))}
        TR.write_json_atomic(cache, {"key": key, "result": result})
        return result

    def training_log(self, stage) -> dict:
        """What the stage's training did: done.json, and for ODPO the mean PWRM label p of its rollout pairs
        and the mean implicit reward margin (odpo_steps.jsonl), for GRPO its reward by quarter."""
        info = {k: v for k, v in self.stages.info(stage).items() if k not in ("seconds", "cpu_seconds", "key")}
        path = os.path.join(self.stages.dir(stage), "odpo_steps.jsonl")
        if os.path.exists(path):
            with open(path) as f:
                steps = [json.loads(line) for line in f if line.strip()]
            info |= {k: float(np.mean([s[k] for s in steps])) for k in ("mean_p", "reward_margin", "loop_rate")}
        by_step = grpo_reward_by_step(self.stages.dir(stage))
        if by_step:  # one batch is noisy: the mean of the first and of the last quarter of the steps
            r = [by_step[k] for k in sorted(by_step)]
            q = max(1, len(r) // 4)
            info |= {"reward_first_quarter": float(np.mean(r[:q])), "reward_last_quarter": float(np.mean(r[-q:]))}
        return info


def grpo_reward_by_step(stage_dir: str) -> dict:
    """step -> mean rollout reward from a GRPO stage's rollouts.jsonl ({} for other stages). A resumed stage
    replays steps: the last record of a step wins."""
    path = os.path.join(stage_dir, "rollouts.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {s["step"]: s["mean_reward"] for s in (json.loads(line) for line in f if line.strip())}


def run_posttrain(cfg: C.CascadeConfig, pc: PostConfig) -> dict:
    """The cascade (reused where done), then both chains for every base child, then the table."""
    t0, c0 = time.time(), TR.cpu_seconds()
    cfg, preset = C.resolved(cfg)
    sizes = [n for n, _ in C.make_plan(dataclasses.replace(cfg, restart_from=None), preset).sizes]  # cascade order: the largest first (choice b)
    pc, recipe = resolve(pc, cfg, preset, TR.rank_world()[1])
    run = C.run_cascade(cfg, preset, later_stages=tuple(stage_names(sizes)))
    chain = Chain(run, pc, recipe)
    bases = {n: next(r["path"] for r in run["rows"] if r["dir"] == f"{n}/long") for n in sizes}
    sft = {}
    for n in sizes:
        for kind, reasoning in (("instruct_sft", False), ("reasoning_sft", True)):
            teacher = None if n == sizes[0] else sft[sizes[0], kind]
            sft[n, kind] = chain.sft(f"{n}/{kind}", bases[n], teacher, reasoning)
    pwrm = chain.pwrm(sft[sizes[-1], "instruct_sft"])
    rows = []
    for n in sizes:
        grpo = chain.grpo(f"{n}/grpo", sft[n, "reasoning_sft"])
        steps = [("base", f"{n}/long", bases[n], True, None),
                 ("SFT", f"{n}/instruct_sft", sft[n, "instruct_sft"], False, f"{n}/long"),
                 ("instruct ODPO", f"{n}/instruct_odpo", chain.odpo(f"{n}/instruct_odpo", sft[n, "instruct_sft"], pwrm),
                  False, f"{n}/instruct_sft"),
                 ("reasoning SFT", f"{n}/reasoning_sft", sft[n, "reasoning_sft"], True, f"{n}/long"),
                 ("GRPO", f"{n}/grpo", grpo, True, f"{n}/reasoning_sft"),
                 ("reasoning ODPO", f"{n}/reasoning_odpo", chain.odpo(f"{n}/reasoning_odpo", grpo, pwrm), True,
                  f"{n}/grpo")]
        evals = {}
        for label, stage, path, reasoning, start in steps:
            ev = evals[stage] = chain.evaluate(stage, path, reasoning, start, pwrm)
            info = chain.stages.info(stage)
            rows.append({"size": n, "stage": label, "dir": stage, "start": start, "win_rate": None, "win_pairs": 0,
                         "same_as_start": None, "training": chain.training_log(stage) if start else None,
                         "paired": None if start is None else paired_flips(evals[start]["correct"], ev["correct"]),
                         **{k: v for k, v in ev.items() if k != "sampled"},
                         # base: the cascade's long stage made it (its time is in the retention table)
                         "stage_seconds": info.get("seconds") if start else None,
                         "stage_cpu_seconds": info.get("cpu_seconds") if start else None})
    total = {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(TR.cpu_seconds() - c0, 1)}
    write_post_results(chain, rows, total)
    return {**run, "post": rows}


def fmt_seconds(s) -> str:
    return "-" if s is None else f"{s:,.0f}"


def post_table(rows: list) -> str:
    lines = ["| size | stage | started from | accuracy | vs start: wrong -> right / right -> wrong (sign test p) | format "
             "| loops greedy / T=0.7 | PWRM win rate vs start (samples equal to the start's) | mean new tokens "
             "| stage CPU (s) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        win = "-" if r.get("win_rate") is None else f"{r['win_rate']:.2f} ({100 * r['same_as_start']:.0f}%)"
        pr = r.get("paired")
        flips = "-" if pr is None else f"+{pr['wrong_to_right']} / -{pr['right_to_wrong']} ({pr['sign_test_p']:.2g})"
        lines.append(f"| {r['size']} | {r['stage']} | {r['start'] or '-'} | {100 * r['accuracy']:.1f}% | {flips} | "
                     f"{100 * r['format_rate']:.0f}% | {100 * r['loop_rate_greedy']:.0f}% / "
                     f"{100 * r['loop_rate_sampled']:.0f}% | {win} | {r['mean_new_tokens']:.1f} | "
                     f"{fmt_seconds(r['stage_cpu_seconds'])} |")
    return "\n".join(lines)


def write_post_results(chain: Chain, rows: list, total: dict):
    """posttrain.md / posttrain.json / posttrain.png under PostConfig.results (default <out>/results)."""
    cfg, pd, pc, recipe = chain.cfg, chain.pd, chain.pc, chain.recipe
    out = pc.results or os.path.join(cfg.out, "results")
    record = TR.run_record(**total)
    pwrm_info = chain.stages.info("post/pwrm")
    cal = pwrm_info["calibration"]
    n_train_q = len({p["question"] for p in pd.train})
    notes = [
        f"Held-out: {rows[0]['n']} problems \"What is a op b?\" (data.easy_math_problems, operands 0..{recipe['max_operand']}, "
        f"ops {recipe['ops']!r}), none of whose questions is among the {n_train_q} distinct questions of the training "
        f"pool ({len(pd.train)} problems; overlap {pd.overlap}). Greedy answers of at most {POST['new_tokens']} tokens.",
        "accuracy: exact answer (data.check_math_answer, the number after [/THINK]); against the starting model, the "
        "held-out problems it gets right that the start got wrong and the reverse, with the two-sided exact sign test "
        "of those flips. format: reasoning stages and base, [THINK] trace [/THINK] answer ended by EOS (grpo.final_part's "
        "gate" + ("" if pd.think else "; this tokenizer has no [THINK], so: an ended, non-empty answer") +
        "); instruct stages, an ended, non-empty answer without [THINK]. loops: odpo.is_looping at the "
        f"{POST['new_tokens']}-token cap, greedy and sampled at T = 0.7.",
        "PWRM win rate: the mean P(row's sample beats the STARTING model's sample) over the held-out prompts (same "
        "seeds; loops judged first, pairs where both loop dropped), by one PWRM (post/pwrm, from the smallest "
        f"instruct SFT, {pwrm_info['pairs']} labelled pairs, calibrated temperature {cal['temperature']:.3g}, "
        f"held-out pair accuracy {100 * cal['accuracy']:.0f}%, ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}). "
        "0.5 = no preference; in brackets, the share of samples equal to the starting model's, token for token "
        "(each a tie at exactly 0.5).",
        f"SFT: KL to the largest size's SFT of the same chain ({rows[0]['size']} itself: CE), {pc.sft_steps} steps of "
        f"{POST['sft_batch']} chats; GRPO {pc.grpo_steps} steps of {recipe['grpo_prompts']} prompts x G "
        f"{POST['grpo_group']}; ODPO {pc.odpo_steps} steps of {POST['odpo_batch'] // 2} prompts x 2 samples; peak lr "
        f"SFT {recipe['sft_lr']:g}, GRPO {recipe['grpo_lr']:g}, ODPO {recipe['odpo_lr']:g}, PWRM {recipe['pwrm_lr']:g}.",
        "Training signal: GRPO mean rollout reward (T = 1), first quarter of the steps -> last quarter: " + "; ".join(
            f"{r['size']} {r['training']['reward_first_quarter']:.3f} -> {r['training']['reward_last_quarter']:.3f}"
            for r in rows if r["stage"] == "GRPO") + ". ODPO mean PWRM label p of its rollout pairs (0.5 = no "
        "preference, no gradient signal): " + "; ".join(
            f"{r['size']} {r['stage']} {r['training'].get('mean_p', float('nan')):.3f}" for r in rows if "ODPO" in r["stage"]) + ".",
        f"{TR.run_line(record)}: {total['seconds']:.0f} s wall, {total['cpu_seconds']:.0f} s "
        f"CPU for the whole command (the cascade's stages included when they ran); post-training stages "
        f"{sum(r['stage_cpu_seconds'] or 0 for r in rows if r['stage'] != 'base'):.0f} CPU-s. "
        f"Command: `{record['command']}`."]
    table = post_table(rows)
    os.makedirs(out, exist_ok=True)
    tmp = os.path.join(out, f"posttrain.md.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write("# Post-training chain\n\n" + table + "\n\n" + "\n\n".join(notes) + "\n")
    os.replace(tmp, os.path.join(out, "posttrain.md"))
    TR.write_json_atomic(os.path.join(out, "posttrain.json"), {
        "rows": rows, "split": {"train_problems": len(pd.train), "train_questions": n_train_q, "held_out": len(pd.held),
                                "overlap": pd.overlap, "think_tokens": pd.think},
        "pwrm": pwrm_info, "recipe": recipe, "post": dataclasses.asdict(pc), "run": record,
        "config": dataclasses.asdict(cfg)})
    plot_post(cfg, rows, os.path.join(out, "posttrain.png"))
    print("\n" + table + "\n\n" + "\n\n".join(notes), flush=True)


def plot_post(cfg, rows: list, path: str):
    """Left: held-out accuracy and format rate per stage, one line per size. Right: GRPO's mean rollout reward."""
    fig, (acc_ax, rl_ax) = plots.figure(2, 12, 4.5)
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    for i, n in enumerate(sizes):
        mine = [r for r in rows if r["size"] == n]
        acc_ax.plot(range(len(mine)), [r["accuracy"] for r in mine], "o-", color=f"C{i}", label=f"{n} accuracy")
        acc_ax.plot(range(len(mine)), [r["format_rate"] for r in mine], "x:", color=f"C{i}", label=f"{n} format")
        by_step = grpo_reward_by_step(os.path.join(cfg.out, n, "grpo"))
        if by_step:
            rl_ax.plot(sorted(by_step), [by_step[k] for k in sorted(by_step)], color=f"C{i}", label=n)
    acc_ax.set_xticks(range(len(POST_ROWS)), POST_ROWS, rotation=20, fontsize=8)
    acc_ax.set(title="held-out math (greedy)", ylabel="rate", ylim=(-0.02, 1.02))
    acc_ax.legend(fontsize=7)
    rl_ax.set(title="GRPO: mean reward of the rollouts", xlabel="GRPO step", ylabel="reward")
    rl_ax.legend(fontsize=8)
    for ax in (acc_ax, rl_ax):
        ax.grid(alpha=0.3)
    plots.save(fig, path)


def main(argv=None):
    cfg, pc = C.parse_args(argv, PostConfig)
    code = TR.run_main(lambda: run_posttrain(cfg, pc) and 0, expected=(ValueError, FileNotFoundError,
                                                                        M.CheckpointError))
    sys.exit(2 if code else 0)


if __name__ == "__main__":
    main()
