"""Sampler-vs-trainer log-prob ratios of GRPO on SmolLM2-135M-Instruct under bf16 autocast, on the CPU.

Before: the engine samples from an fp32 copy while the trainer's forward runs under bf16 autocast, and
pi_old is the sampler's. After: the engine samples in bf16 (RolloutWeights(model, dtype=bf16)) and pi_old
is the trainer's own forward (ratio exactly 1 on the first step). Reported on sampled tokens (the
engine's log-probs against grpo.token_logprobs) and on teacher-forced text (a plain forward in fp32 or in
bf16 weights, standing in for the two samplers, against the autocast forward).
Run: `python benchmarks/grpo_numerics/run.py` (needs `python model.py fetch smollm2` once); writes
results.json next to this file.
"""

import json
import os
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, ROOT)

import data as D  # noqa: E402
import grpo as GR  # noqa: E402
import model as M  # noqa: E402
from generate import RolloutConfig, RolloutWeights, rollout  # noqa: E402

EPS_LOW, EPS_HIGH = GR.GRPOConfig.eps_low, GR.GRPOConfig.eps_high
QUESTIONS = ["What is 17 + 25?", "Name three primary colours.", "What is the capital of France?",
             "Write one sentence about the sea."]
TEXT = ("The water cycle describes how water evaporates from the surface of the earth, rises into the "
        "atmosphere, cools and condenses into clouds, and falls again as rain or snow.")


def ratio_stats(logp_trainer, logp_sampler, mask):
    r = torch.exp(logp_trainer.float() - logp_sampler.float())[mask]
    return {"tokens": int(mask.sum()), "max_abs_ratio_minus_1": float((r - 1).abs().max()),
            "share_off_by_more_than_5pct": float(((r - 1).abs() > 0.05).float().mean()),
            "share_outside_clip_band": float(((r < 1 - EPS_LOW) | (r > 1 + EPS_HIGH)).float().mean())}


def forward_logp(net, inputs, targets, autocast):
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        return GR.token_logprobs(net, inputs, targets, 1.0)


def main():
    torch.manual_seed(0)
    t0 = time.perf_counter()
    path = M.fetch("smollm2", download=False)
    model = M.load_model(path, dtype=torch.float32).eval()
    tok = D.Tokenizer.from_file(path)
    out = {"model": os.path.basename(path), "torch": torch.__version__, "eps_low": EPS_LOW, "eps_high": EPS_HIGH,
           "command": "python benchmarks/grpo_numerics/run.py",
           "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()}
    prompts = [GR.prompt_ids(tok, q) for q in QUESTIONS]
    rc = RolloutConfig(max_new_tokens=32, group_size=4, temperature=1.0, eos_id=tok.eos_id, pad_id=tok.pad_id, seed=1)
    sampled = {}
    for name, dtype in (("fp32_sampler", torch.float32), ("bf16_sampler", torch.bfloat16)):
        r = rollout(RolloutWeights(model, dtype=dtype), prompts, rc)
        N, L = r.tokens.shape
        T = max(map(len, prompts)) + L - 1
        inputs = torch.full((N, T), tok.pad_id, dtype=torch.long)
        targets = torch.full((N, T), -100, dtype=torch.long)
        old = torch.zeros(N, T)
        for row in range(N):
            p, n = prompts[row // rc.group_size], int(r.lengths[row])
            seq = torch.tensor(p + r.tokens[row, :n].tolist())
            inputs[row, :len(seq) - 1], targets[row, len(p) - 1:len(seq) - 1] = seq[:-1], seq[len(p):]
            old[row, len(p) - 1:len(seq) - 1] = r.logprobs[row, :n]
        trainer = forward_logp(model, inputs, targets, autocast=True)
        sampled[name + "_vs_bf16_trainer"] = ratio_stats(trainer, old, targets != -100)
        if dtype == torch.bfloat16:  # pi_old from the trainer's own forward: the first step's ratio
            sampled["trainer_pi_old_vs_bf16_trainer"] = ratio_stats(trainer, trainer, targets != -100)
    out["sampled_tokens"] = sampled
    ids = tok.encode_chat([{"role": "user", "content": "Explain the water cycle."},
                           {"role": "assistant", "content": TEXT}])[0]
    inputs, targets = torch.tensor([ids[:-1]]), torch.tensor([ids[1:]])
    trainer = forward_logp(model, inputs, targets, autocast=True)
    fp32 = forward_logp(model, inputs, targets, autocast=False)
    bf16 = forward_logp(M.load_model(path, dtype=torch.float32).eval().to(torch.bfloat16), inputs, targets, False)
    mask = targets != -100
    out["teacher_forced"] = {"fp32_forward_vs_bf16_trainer": ratio_stats(trainer, fp32, mask),
                             "bf16_weights_forward_vs_bf16_trainer": ratio_stats(trainer, bf16, mask),
                             "trainer_pi_old_vs_bf16_trainer": ratio_stats(trainer, trainer, mask)}
    out["wall_s"] = time.perf_counter() - t0
    with open(os.path.join(HERE, "results.json"), "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
