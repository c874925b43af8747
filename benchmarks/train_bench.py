"""Benchmark: one training step (forward, loss, backward, grad clipping, AdamW step), ours vs transformers.

Ours: model.Transformer with the fused next-token CE of distill.py run through `head_fn` (no [N, V] logits
tensor beyond one chunk) and train.py's optimizer (`make_optimizer`: fused AdamW, no decay on 1-D
params). Theirs: transformers' `Ministral3ForCausalLM` with the same weights (saved by model.save_model,
loaded by from_pretrained), its own `labels=` loss, and torch's AdamW with its defaults (how a plain HF
loop runs); an `hf-fused` row gives HF the same fused AdamW, to separate the optimizer from the model and
loss. Both clip the gradient norm at 1.0 (HF Trainer's default).

Shapes: on the CPU the preset bench-cpu (d 256, 4 layers, vocab 8192, tied), B 8 x T 256, fp32 (anchor:
HF fwd+bwd 3,349 tok/s on 2 cores, PAPER.md section 9; targets: ours >= 1.1x HF tokens/s and <= 0.7x
HF peak memory). On a GPU the 3B shape, B 2 x T 4096, bf16 weights (code path only so far).

Time: median of `iters` steps after `warmup` steps, the device synchronised around each. Memory: each
variant runs in a fresh subprocess; on the CPU the growth of peak RSS (ru_maxrss) over the baseline taken
after the model and inputs exist, so it counts gradients, optimizer state, activations and logits; on a
GPU torch.cuda.max_memory_allocated beyond the same baseline.

Run: `python benchmarks/train_bench.py [--device cuda]` or `python bench.py train`.
Depends on: model.py, train.py, distill.py (transformers optional: the HF rows are skipped without it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import distill as DI  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402
from measure import emit, mem_mark, mem_peak, run_fresh, sync  # noqa: E402

CPU_SHAPE = dict(preset="bench-cpu", batch=8, seq=256, dtype="float32")
GPU_SHAPE = dict(preset="3b", batch=2, seq=4096, dtype="bfloat16")


def run_variant(impl: str, preset: str, batch: int, seq: int, dtype: str, device: str = "cpu", warmup: int = 2,
                iters: int = 5, chunk_size=None) -> dict:
    """One variant in this process: median step seconds, tokens/s, peak memory beyond model + inputs."""
    dt = getattr(torch, dtype)
    args = M.ModelArgs.preset(preset)
    ours = M.Transformer(args)
    ours.init_weights(0)
    ours = ours.to(device=device, dtype=dt)
    g = torch.Generator().manual_seed(0)
    x_BT = torch.randint(3, args.vocab_size, (batch, seq), generator=g).to(device)
    y_BT = torch.roll(x_BT, -1, dims=1)
    y_BT[:, -1] = -100
    cfg = T.TrainConfig(lr=1e-4, weight_decay=0.1)
    if impl == "ours":
        net = ours
        loss_fn = DI.ce_loss_fn(DI.DistillConfig(chunk_size=chunk_size))
        n_total = int((y_BT != -100).sum())
        forward = lambda: loss_fn(net, x_BT, y_BT, n_total)
        opt = T.make_optimizer(net, cfg)
    else:
        import transformers  # optional baseline
        with tempfile.TemporaryDirectory() as d:
            M.save_model(ours, d)
            net = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dt, attn_implementation="sdpa",
                                                                    local_files_only=True).to(device)
        del ours
        forward = lambda: net(input_ids=x_BT, labels=x_BT).loss  # HF shifts the labels itself
        if impl == "hf-fused":
            opt = T.make_optimizer(net, cfg)
        else:
            opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                    weight_decay=cfg.weight_decay)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    sync(device)
    base = mem_mark(device)

    def step():
        loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    times, losses = [], []
    for i in range(warmup + iters):
        sync(device)
        t0 = time.perf_counter()
        losses.append(step())
        sync(device)
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    sec = sorted(times)[len(times) // 2]
    tok_s = batch * seq / sec
    return {"impl": impl, "seconds": sec, "tok_s": tok_s, "peak_gib": (mem_peak(device) - base) / 2**30,
            "first_loss": losses[0], "mfu": T.mfu(tok_s, M.flops_per_token(args, seq), device,
                                                  "bf16" if dt == torch.bfloat16 else "fp32"),
            "threads": torch.get_num_threads()}


def _in_subprocess(**kw) -> dict:
    return run_fresh(__file__, "run_variant", kw)


def bench_train_step(device="cpu", impls=None, chunk_size=None, **shape_kw) -> dict:
    """Ours vs HF (and HF with our fused AdamW), each in a fresh subprocess; prints a table, returns a dict."""
    device = str(device)
    shape = dict(GPU_SHAPE if device.startswith("cuda") else CPU_SHAPE) | {k: v for k, v in shape_kw.items() if v}
    if impls is None:
        impls = ["ours"] + (["hf", "hf-fused"] if importlib.util.find_spec("transformers") else [])
    rows = {impl: _in_subprocess(impl=impl, device=device, chunk_size=chunk_size, **shape) for impl in impls}
    print(f"\nTraining step (fwd + loss + bwd + clip + AdamW): {shape['preset']}, B {shape['batch']} x T {shape['seq']}, "
          f"{shape['dtype']}, {device} ({rows[impls[0]]['threads']} threads)")
    print(f"{'impl':<9} {'s/step':>8} {'tok/s':>9} {'peak GiB':>9} {'MFU':>6} {'first loss':>11}")
    for impl, r in rows.items():
        m = "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
        print(f"{impl:<9} {r['seconds']:>8.3f} {r['tok_s']:>9,.0f} {r['peak_gib']:>9.3f} {m:>6} {r['first_loss']:>11.5f}")
    result = {"shape": shape, "device": device, **rows}
    if "hf" in rows:
        result["tok_s_ratio"] = rows["ours"]["tok_s"] / rows["hf"]["tok_s"]
        result["peak_mem_ratio"] = rows["ours"]["peak_gib"] / max(rows["hf"]["peak_gib"], 1e-9)
        print(f"ours / HF: tokens/s {result['tok_s_ratio']:.2f}x (target >= 1.1), peak memory "
              f"{result['peak_mem_ratio']:.2f}x (target <= 0.7)")
    return result


def main(argv=None):
    ap = argparse.ArgumentParser(description="one training step: ours vs transformers")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--impls", help="comma-separated subset of ours,hf,hf-fused")
    ap.add_argument("--chunk-size", type=int, help="tokens per fused-CE chunk (default: distill.py's)")
    ap.add_argument("--preset")
    ap.add_argument("--batch", type=int)
    ap.add_argument("--seq", type=int)
    ap.add_argument("--record", action="store_true", help="append to benchmarks/records.jsonl")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        print("RESULT" + json.dumps(run_variant(**json.loads(a.worker))))
        return
    res = bench_train_step(a.device, a.impls.split(",") if a.impls else None, a.chunk_size, preset=a.preset,
                           batch=a.batch, seq=a.seq)
    import bench  # the one environment() (date, device, torch, commit, command)
    emit({"env": bench.environment(a.device), "train": res}, a.record)


if __name__ == "__main__":
    main()
