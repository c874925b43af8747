"""Benchmark: online DPO's two costs, rollout tokens/s and the time of one ODPO optimizer step.

One ODPO step (odpo.run_odpo through train.py's loop) = sample two responses per prompt with generate.py's
rollout engine at T = 0.7, judge the pairs (loop detector, then the PWRM, both orders), the frozen
reference's summed log-probs, the policy's forward + backward with the soft DPO loss, AdamW. The step
time is train.py's own per-step clock (it includes the rollout, which the loader runs inside the step);
the rollout's share and its new tokens/s come from the loader's stats.

Shapes: on the CPU the preset bench-cpu (d 256, 4 layers, vocab 8192), 8 prompts x 2 samples, 64 new
tokens, fp32; the PWRM has the policy's shape. On a GPU the 3B shape (vocab 131072), 32 prompts x 2
samples, 256 new tokens, bf16 (code path written; no GPU has been lent to this project yet). Floor for
the rollout: every decode step reads all policy weights once, so new tokens/s <= rows * bandwidth /
weight bytes (GPU bandwidth table below; none on the CPU). Weights are random: speed does not depend on
them, but the lengths do (random policies rarely stop early, so every row runs to the cap).

Run: `python benchmarks/odpo_bench.py [--device cuda] [--record]` (appends to benchmarks/odpo/bench.jsonl).
Depends on: model.py, data.py, train.py, odpo.py.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import data as D  # noqa: E402
import model as M  # noqa: E402
import odpo as O  # noqa: E402
from measure import emit  # noqa: E402  (benchmarks/measure.py, beside this file)
from train import TrainConfig  # noqa: E402

SHAPES = {"cpu": dict(preset="bench-cpu", prompts=8, new=64, dtype="fp32"),
          "cuda": dict(preset="3b", prompts=32, new=256, dtype="bf16")}
HBM_BYTES_PER_S = [("H100", 3.35e12), ("H200", 4.8e12), ("A100", 2.0e12)]  # datasheet peaks


def bandwidth(device) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in HBM_BYTES_PER_S if key in name), None)


def run(device: str = "cpu", steps: int = 4, warmup: int = 1) -> dict:
    shape = SHAPES["cuda" if device.startswith("cuda") else "cpu"]
    args = M.ModelArgs.preset(shape["preset"])
    tok = D.Tokenizer.from_file(vocab_size=args.vocab_size)
    dtype = torch.bfloat16 if shape["dtype"] == "bf16" else torch.float32
    make = lambda seed: M.Transformer(args).to(device)
    policy, reference, judge = make(0), make(0), make(1)
    for m, seed in ((policy, 0), (reference, 0), (judge, 1)):
        m.init_weights(seed=seed)
    reference.to(dtype).requires_grad_(False)
    judge.to(dtype).requires_grad_(False)
    reference.reset_buffers()
    judge.reset_buffers()
    pwrm = O.PairwiseRewardModel(judge, tok, batch_size=shape["prompts"])
    problems = D.math_problems(shape["prompts"] * (steps + warmup), seed=0)
    prompts = [[{"role": "user", "content": q["question"]}] for q in problems]
    cfg = O.ODPOConfig(max_new_tokens=shape["new"], max_prompt_tokens=96)
    rows = 2 * shape["prompts"]
    with tempfile.TemporaryDirectory() as tmp:
        tcfg = TrainConfig(out_dir=tmp, steps=steps + warmup, batch_size=rows, micro_batch_size=rows, lr=1e-5,
                           warmup_steps=1, dtype=shape["dtype"], log_every=0, export=False)
        t0, c0 = time.perf_counter(), time.process_time()
        out = O.run_odpo(policy, reference, pwrm, tok, prompts, cfg, tcfg, device=device)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    timed = out["steps"][warmup:]
    # process CPU seconds per step: between the starts of consecutive rollouts (one micro-batch per step)
    clocks = [s["cpu_clock"] for s in loader_stats(out)] + [c0 + cpu]
    cpu_step = sorted(b - a for a, b in zip(clocks[warmup:-1], clocks[warmup + 1:]))
    cpu_roll = sorted(s["rollout_cpu_s"] for s in loader_stats(out)[warmup:])
    new_tok = [s["new_tokens"] for s in loader_stats(out)[warmup:]]
    step_s = sorted(s["step_s"] for s in timed)
    roll_s = sorted(s["rollout_s"] for s in timed)
    tok_s = sorted(s["rollout_tok_s"] for s in timed)
    weight_bytes = sum(p.numel() * p.element_size() for p in policy.parameters())
    bw = bandwidth(device)
    floor_tok_s = rows * bw / weight_bytes if bw else None
    med = lambda xs: xs[len(xs) // 2]
    return {"shape": shape, "rows": rows, "params": M.num_params(args), "steps_timed": len(timed),
            "step_s_median": med(step_s), "rollout_s_median": med(roll_s), "rollout_tok_s_median": med(tok_s),
            "rollout_share": med(roll_s) / med(step_s),
            "step_cpu_s_median": med(cpu_step), "rollout_cpu_s_median": med(cpu_roll),
            "rollout_tok_per_cpu_s": sum(new_tok) / sum(cpu_roll), "mean_length": sum(s["mean_length"] for s in timed) / len(timed),
            "rollout_floor_tok_s": floor_tok_s,
            "rollout_vs_floor": med(tok_s) / floor_tok_s if floor_tok_s else None,
            "wall_s": wall, "process_cpu_s": cpu, "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def loader_stats(out: dict) -> list:
    return out["rollout_stats"]


def env(device: str, command: str) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    name = torch.cuda.get_device_name(device) if device.startswith("cuda") else f"cpu x{torch.get_num_threads()} threads"
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": name, "torch": torch.__version__,
            "commit": commit, "command": command,
            "note": "shared machine: other jobs ran at the same time; wall clocks are inflated, process CPU time beside"}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--threads", type=int, default=0, help="torch threads on the CPU (0: torch's default)")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/odpo/bench.jsonl")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    res = {"env": env(a.device, "python benchmarks/odpo_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])),
           "odpo": run(a.device, a.steps)}
    r = res["odpo"]
    floor = r["rollout_floor_tok_s"]
    print(f"| rows | new tokens | rollout tok/s | rollout s | step s | step CPU s | rollout tok per CPU s | rollout share | floor tok/s |\n|---|---|---|---|---|---|---|---|---|\n"
          f"| {r['rows']} | {r['shape']['new']} | {r['rollout_tok_s_median']:,.0f} | {r['rollout_s_median']:.2f} | "
          f"{r['step_s_median']:.2f} | {r['step_cpu_s_median']:.2f} | {r['rollout_tok_per_cpu_s']:,.0f} | {100 * r['rollout_share']:.0f}% | "
          f"{'n/a' if floor is None else f'{floor:,.0f}'} |")
    emit(res, a.record, os.path.join(ROOT, "benchmarks", "odpo", "bench.jsonl"))


if __name__ == "__main__":
    main()
