"""Benchmark: one SFT step (sft_loss over the assistant tokens, backward, grad clipping, AdamW) in bf16 and
in FP8 (sft.py's FP8Linear: e4m3 forward through torch._scaled_mm), tokens/s and MFU, in the same run.

Shapes: on a GPU the 3B shape (model.py preset "3b"), B 1 x T 4096, fp32 master weights, bf16 autocast;
the FP8 variant converts every block linear (the lm_head stays bf16: the fused loss reads it). On the CPU
the preset bench-cpu (d 256, 4 layers, vocab 8192), B 4 x T 256: bf16 autocast only, because FP8 needs a
GPU with compute capability >= 8.9 (the variant is recorded as unavailable, with the reason).
The chats are synthetic: each row a prompt of T/4 tokens, then assistant tokens (mask 1) to the end;
tokens/s counts every row token (the forward runs over all of them), MFU is against the device's bf16
dense peak (train.py's table; None on the CPU), FLOPs per token 6N + attention (model.flops_per_token).

Time: median of `iters` steps after `warmup` steps, device synchronised around each; process CPU time is
recorded beside wall time because the CPU box is shared. Each variant runs in a fresh interpreter.

Run: `python benchmarks/sft_bench.py [--device cuda] [--record]` (appends to benchmarks/records.jsonl).
Depends on: model.py, train.py, sft.py.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import model as M  # noqa: E402
import sft as S  # noqa: E402
import train as T  # noqa: E402
from measure import emit, mem_mark, mem_peak, run_fresh, timed_median  # noqa: E402

CPU_SHAPE = dict(preset="bench-cpu", batch=4, seq=256)
GPU_SHAPE = dict(preset="3b", batch=1, seq=4096)


def run_variant(precision: str, preset: str, batch: int, seq: int, device: str = "cpu", warmup: int = 2,
                iters: int = 5) -> dict:
    torch.manual_seed(0)
    dev = torch.device(device)
    args = M.ModelArgs.preset(preset)
    model = M.Transformer(args).to(dev)  # fp32 master weights
    model.init_weights(seed=0)
    result = {"precision": precision, "preset": preset, "batch": batch, "seq": seq, "device": device}
    if precision == "fp8":
        ok, why = S.fp8_supported(dev)
        if not ok:
            return {**result, "unavailable": why}
        result["fp8_linears"] = S.convert_to_fp8(model, dev)
    ids = torch.randint(1000, args.vocab_size, (batch, seq + 1), device=dev)
    mask = torch.zeros_like(ids)
    mask[:, seq // 4:] = 1  # the assistant part of each row
    opt = T.make_optimizer(model, T.TrainConfig(lr=1e-5))
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        with torch.autocast(device_type=dev.type, dtype=torch.bfloat16):
            loss = S.sft_loss(model, ids, mask)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    for _ in range(warmup):
        step()
    base = mem_mark(dev)
    t, t_cpu = timed_median(step, dev, 0, iters)
    tok_s = batch * seq / t
    fpt = M.flops_per_token(args, seq, training=True)
    u = T.mfu(tok_s, fpt, dev, "bf16")
    return {**result, "step_s": t, "step_cpu_s": t_cpu, "tokens_per_s": tok_s, "mfu": u,
            "flops_per_token": fpt, "peak_mem_growth_bytes": mem_peak(dev) - base,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "threads": torch.get_num_threads()}


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
    except OSError:
        return "unknown"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--record", action="store_true", help="append to benchmarks/records.jsonl")
    a = ap.parse_args(argv)
    shape = GPU_SHAPE if a.device.startswith("cuda") else CPU_SHAPE
    rows = [run_fresh(__file__, "run_variant", dict(precision=p, device=a.device, iters=a.iters, **shape))
            for p in ("bf16", "fp8")]
    print("| precision | shape | tokens/s | MFU | step s (wall) | step s (CPU) |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        if "unavailable" in r:
            print(f"| {r['precision']} | {r['preset']} B{r['batch']}xT{r['seq']} | unavailable: {r['unavailable']} | | | |")
        else:
            mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
            print(f"| {r['precision']} | {r['preset']} B{r['batch']}xT{r['seq']} | {r['tokens_per_s']:,.0f} | {mfu} | "
                  f"{r['step_s']:.3f} | {r['step_cpu_s']:.3f} |")
    rec = {"bench": "sft_step", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
           "commit": commit(), "command": "python benchmarks/sft_bench.py " + " ".join(argv or sys.argv[1:]),
           "note": "CPU box shared with other jobs: wall time inflated, see step_cpu_s" if not a.device.startswith("cuda") else "",
           "rows": rows}
    emit(rec, a.record)


if __name__ == "__main__":
    main()
