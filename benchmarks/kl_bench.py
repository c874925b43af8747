"""Benchmark: the fused forward-KL loss (distill.fused_kl) against the naive loss (distill.kl_reference).

Forward + backward of the loss alone, on the shapes of PAPER.md section 9: on the CPU 2048 tokens,
V 131072, student d 256, teacher d 512, fp32 (anchors on 2 cores: naive 16.4 s and 5.8 GiB peak;
targets for fused: <= 0.4x naive time and <= 0.1x naive peak memory, measured side by side). On a
GPU 16384 tokens, V 131072, d 3072 / 5120, bf16, plus Liger-Kernel's LigerFusedLinearJSD (beta 0 =
forward KL) when it is installed (anchors on an H100: naive 190 ms / 56 GiB, Liger 194 ms / 3.2 GiB;
target <= 130 ms and <= 4 GiB beyond the inputs).

Time: median of `repeats` forward+backward calls after one warm-up. Memory: on the CPU each variant
runs in a fresh subprocess and reports the growth of its peak resident set (ru_maxrss) over the
baseline taken after the inputs exist; on a GPU, torch.cuda.max_memory_allocated beyond the inputs.

Run: `python benchmarks/kl_bench.py [--device cuda] [--tokens N]` or `python bench.py kl`.
Depends on: distill.py (liger-kernel optional, GPU only).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import distill  # noqa: E402
from measure import emit, mem_mark, mem_peak, run_fresh, sync  # noqa: E402

CPU_SHAPE = dict(tokens=2048, vocab=131072, d_student=256, d_teacher=512, dtype="float32")
GPU_SHAPE = dict(tokens=16384, vocab=131072, d_student=3072, d_teacher=5120, dtype="bfloat16")


def _inputs(tokens, vocab, d_student, d_teacher, dtype, device, seed=0):
    """Logits of std ~2 for both models, like a trained LM's. Built in place, so that no transient copy
    raises the peak-RSS baseline."""
    g = torch.Generator(device=device).manual_seed(seed)
    dt = getattr(torch, dtype)

    def make(*shape, scale=1.0):
        return torch.randn(*shape, generator=g, device=device, dtype=dt).mul_(scale)

    hs = make(tokens, d_student).requires_grad_()
    ws = make(vocab, d_student, scale=2.0 / d_student ** 0.5).requires_grad_()
    ht = make(tokens, d_teacher)
    wt = make(vocab, d_teacher, scale=2.0 / d_teacher ** 0.5)
    return hs, ws, ht, wt


def _loss_fn(variant, chunk_size):
    if variant == "naive":
        return distill.kl_reference
    if variant == "fused":
        return lambda hs, ws, ht, wt: distill.fused_kl(hs, ws, ht, wt, chunk_size=chunk_size)
    if variant == "liger":
        from liger_kernel.transformers import LigerFusedLinearJSD  # optional GPU baseline
        jsd = LigerFusedLinearJSD(jsd_beta=0.0, temperature=1.0)
        return lambda hs, ws, ht, wt: jsd(hs, ws, ht, wt)
    raise ValueError(f"unknown variant {variant!r}; use naive, fused or liger")


def run_variant(variant, tokens, vocab, d_student, d_teacher, dtype, device="cpu", repeats=3, chunk_size=None):
    """One variant, in this process: median seconds of loss + backward, peak memory beyond the inputs."""
    hs, ws, ht, wt = _inputs(tokens, vocab, d_student, d_teacher, dtype, device)
    fn = _loss_fn(variant, chunk_size)
    sync(device)
    base = mem_mark(device)
    times, loss = [], None
    for i in range(repeats + 1):
        hs.grad = ws.grad = None
        sync(device)
        t0 = time.perf_counter()
        loss = fn(hs, ws, ht, wt)
        loss.backward()
        sync(device)
        if i > 0:  # the first call is the warm-up
            times.append(time.perf_counter() - t0)
    peak = mem_peak(device) - base
    return {"variant": variant, "seconds": sorted(times)[len(times) // 2], "peak_gib": peak / 2**30,
            "loss": float(loss.detach()), "grad_h_norm": float(hs.grad.float().norm()),
            "grad_w_norm": float(ws.grad.float().norm())}


def _in_subprocess(**kw) -> dict:
    return run_fresh(__file__, "run_variant", kw)


def bench_kl(device="cpu", tokens=None, vocab=None, d_student=None, d_teacher=None, dtype=None, repeats=3,
             chunk_size=None, variants=None) -> dict:
    """Naive vs fused (vs Liger on a GPU when installed), side by side; prints a table, returns a dict."""
    device = str(device)
    gpu = device.startswith("cuda")
    shape = dict(GPU_SHAPE if gpu else CPU_SHAPE)
    for k, v in dict(tokens=tokens, vocab=vocab, d_student=d_student, d_teacher=d_teacher, dtype=dtype).items():
        if v is not None:
            shape[k] = v
    if variants is None:
        variants = ["naive", "fused"]
        if gpu:
            try:
                import liger_kernel  # noqa: F401
                variants.append("liger")
            except ImportError:
                pass
    rows = {}
    for v in variants:
        kw = dict(variant=v, device=device, repeats=repeats, chunk_size=chunk_size, **shape)
        if gpu:
            try:
                rows[v] = run_variant(**kw)
            except Exception as e:  # an optional baseline that fails (old Liger: beta must be in (0, 1))
                if v != "liger":
                    raise
                print(f"liger skipped: {type(e).__name__}: {e}")
            torch.cuda.empty_cache()
        else:
            rows[v] = _in_subprocess(**kw)
    print(f"\nForward-KL loss fwd+bwd: {shape['tokens']} tokens, V {shape['vocab']}, student d {shape['d_student']}, "
          f"teacher d {shape['d_teacher']}, {shape['dtype']}, {device} ({torch.get_num_threads()} threads)")
    print(f"{'variant':<8} {'seconds':>9} {'peak GiB':>9} {'loss':>12}")
    for v, r in rows.items():
        print(f"{v:<8} {r['seconds']:>9.3f} {r['peak_gib']:>9.3f} {r['loss']:>12.6f}")
    result = {"shape": shape, "device": device, **rows}
    if "naive" in rows and "fused" in rows:
        result["time_ratio"] = rows["fused"]["seconds"] / rows["naive"]["seconds"]
        result["mem_ratio"] = rows["fused"]["peak_gib"] / max(rows["naive"]["peak_gib"], 1e-9)
        result["loss_rel_diff"] = abs(rows["fused"]["loss"] - rows["naive"]["loss"]) / abs(rows["naive"]["loss"])
        print(f"fused / naive: time {result['time_ratio']:.3f}x (target <= 0.4), peak memory "
              f"{result['mem_ratio']:.3f}x (target <= 0.1), loss rel. diff {result['loss_rel_diff']:.1e}")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description="fused forward-KL loss vs the naive reference")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokens", type=int)
    ap.add_argument("--vocab", type=int)
    ap.add_argument("--d-student", type=int)
    ap.add_argument("--d-teacher", type=int)
    ap.add_argument("--dtype", choices=["float32", "bfloat16"])  # fp16 is refused by the fused loss
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--chunk-size", type=int)
    ap.add_argument("--variants", help="comma-separated subset of naive,fused,liger")
    ap.add_argument("--record", action="store_true", help="append to benchmarks/records.jsonl")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT" + json.dumps(run_variant(**json.loads(a.worker))))
        return
    res = bench_kl(a.device, a.tokens, a.vocab, a.d_student, a.d_teacher, a.dtype, a.repeats, a.chunk_size,
                   a.variants.split(",") if a.variants else None)
    import bench  # the one environment() (date, device, torch, commit, command)
    emit({"env": bench.environment(a.device), "kl": res}, a.record)


if __name__ == "__main__":
    main()
