"""Pruning benchmark (prune.py, PAPER.md section 4): calibration throughput and memory, and one prune.

Calibration: tokens/s of `collect_stats` with every statistic on (layer norms, the float64 covariance,
the FFN sums) next to a plain forward without logits on the same batches, so the hooks' cost is
visible; peak memory of each beyond the model and the batches (calib_extra_gib: what the statistics
add on top of the forward's own peak). Prune: wall time of `prune` (all passes and
the surgery) and its peak memory beyond the parent and the batches.
Shapes: on the CPU the bench-cpu preset (4 layers, d 256, FFN 768, V 8192, tied, fp32) -> 3 layers,
d 192, FFN 512, tied; on a GPU the 3B shape (bf16, random weights) -> a 1.5B target (22 layers, d 2048,
FFN 6144, tied: 1.56B parameters).
Peak memory follows bench.py: on the CPU the growth of ru_maxrss over the baseline taken once the
inputs exist, each variant in a fresh interpreter; on a GPU torch.cuda.max_memory_allocated beyond it.

Run: `python bench.py prune [--device cuda]`, or `python benchmarks/prune_bench.py [--device cuda]`.
Depends on: model.py, prune.py.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import torch  # noqa: E402

import model as M  # noqa: E402
import prune as P  # noqa: E402
from measure import mem_mark, mem_peak, run_fresh, sync  # noqa: E402

SETUPS = {
    "cpu": dict(parent="bench-cpu", target=dict(n_layers=3, dim=192, hidden_dim=512, tied_embeddings=True),
                dtype="float32", batch=4, seq=256, n_batches=8),
    "cuda": dict(parent="3b", target=dict(n_layers=22, dim=2048, hidden_dim=6144, tied_embeddings=True),
                 dtype="bfloat16", batch=4, seq=2048, n_batches=8),
}


def _setup(device: str):
    s = SETUPS["cuda" if device.startswith("cuda") else "cpu"]
    args = M.ModelArgs.preset(s["parent"])
    with torch.device("meta"):
        model = M.Transformer(args)
    model = model.to(dtype=getattr(torch, s["dtype"])).to_empty(device=device)
    model.init_weights(seed=0)
    model.eval()
    g = torch.Generator().manual_seed(0)
    calib = []
    for _ in range(s["n_batches"]):
        t = torch.randint(1000 if args.vocab_size > 2000 else 12, args.vocab_size, (s["batch"], s["seq"]), generator=g)
        t[:, 0] = 1  # BOS, masked
        calib.append(t.to(device))
    return s, args, model, calib


def calibration_variant(device: str = "cpu") -> dict:
    """Plain forward first, then collect_stats, on the same batches. Peak memory is measured from one
    baseline (model and batches exist) for both, so calib_extra_gib is what the statistics add."""
    s, args, model, calib = _setup(device)
    n_tok = s["n_batches"] * s["batch"] * s["seq"]
    no_head = lambda h_BTD, w_VD: None
    sync(device)
    base = mem_mark(device)
    with torch.no_grad():
        model(calib[0], head_fn=no_head)  # warm-up
        sync(device)
        t0 = time.perf_counter()
        for t in calib:
            model(t, head_fn=no_head)
        sync(device)
        fwd_s = time.perf_counter() - t0
    fwd_peak = mem_peak(device) - base
    P.collect_stats(model, calib[:1])  # warm-up
    sync(device)
    t0 = time.perf_counter()
    P.collect_stats(model, calib)
    sync(device)
    sec = time.perf_counter() - t0
    calib_peak = mem_peak(device) - base
    return {"tokens": n_tok, "calib_tok_s": n_tok / sec, "forward_tok_s": n_tok / fwd_s,
            "forward_peak_gib": fwd_peak / 2**30, "calib_peak_gib": calib_peak / 2**30,
            "calib_extra_gib": (calib_peak - fwd_peak) / 2**30}


def prune_variant(device: str = "cpu") -> dict:
    s, args, model, calib = _setup(device)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    target = dataclasses.replace(args, **s["target"])
    sync(device)
    base = mem_mark(device)
    t0 = time.perf_counter()
    child, report = P.prune(model, target, calib)
    sync(device)
    sec = time.perf_counter() - t0
    return {"parent": s["parent"], "target": s["target"], "dtype": s["dtype"], "prune_s": sec,
            "prune_peak_gib": (mem_peak(device) - base) / 2**30, "parent_gib": model_bytes / 2**30,
            "params_parent": report["params"]["parent"], "params_child": report["params"]["child"],
            "retained_energy": report["hidden"]["retained_energy"], "calib_tokens": report["layers"]["tokens"]}


def _in_subprocess(func: str, **kwargs) -> dict:
    return run_fresh(__file__, func, kwargs)


def bench_prune(device: str = "cpu") -> dict:
    calib = _in_subprocess("calibration_variant", device=device)
    pr = _in_subprocess("prune_variant", device=device)
    s = SETUPS["cuda" if device.startswith("cuda") else "cpu"]
    print(f"\nPruning ({s['parent']} -> {s['target']}, {s['dtype']}, {device}); calibration on "
          f"{s['n_batches']} x {s['batch']} x {s['seq']} tokens")
    print(f"{'calib tok/s':>12} {'fwd tok/s':>10} {'fwd peak GiB':>13} {'calib peak GiB':>15} {'prune s':>8} "
          f"{'prune peak GiB':>15} {'parent GiB':>11} {'energy':>7}")
    print(f"{calib['calib_tok_s']:>12,.0f} {calib['forward_tok_s']:>10,.0f} {calib['forward_peak_gib']:>13.3f} "
          f"{calib['calib_peak_gib']:>15.3f} {pr['prune_s']:>8.2f} {pr['prune_peak_gib']:>15.3f} "
          f"{pr['parent_gib']:>11.3f} {pr['retained_energy']:>7.4f}")
    return {"calibration": calib, "prune": pr}


if __name__ == "__main__":
    import argparse
    ap = argparse.ArgumentParser(description="prune.py benchmark")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(bench_prune(ap.parse_args().device)))
