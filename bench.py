"""Performance records: every speed and memory figure the project quotes comes from here.

Reading guide
-------------
Each benchmark runs our code and its anchor side by side in the same run (PAPER.md section 9 gives
the anchors), prints a table, and ends with one line of JSON. `--record` appends that JSON, with the
date, device, torch version, git commit and the exact command, to `benchmarks/records.jsonl`.

Peak memory on the CPU is the growth of the process's peak resident set (ru_maxrss) over the
baseline taken after the inputs exist; each variant runs in a fresh subprocess so that one variant's
peak cannot hide another's. On a GPU it is torch.cuda.max_memory_allocated beyond the inputs.
Clocks are read after a device synchronise; warm-up iterations are excluded.

Run: `python bench.py model` (decoder fwd+bwd and decoding vs transformers), `python bench.py kl`,
`python bench.py train`, `python bench.py prune`, `python bench.py tokenizer`, `python bench.py vision`,
`python bench.py real` (the SmolLM2 parent from GGUF: load, prefill, decode vs transformers), `python bench.py all`.
Depends on: model.py, train.py (MFU); the per-concept benchmark functions live in benchmarks/*.py. transformers (and
liger-kernel on a GPU) are optional baselines, imported only when present.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import os
import platform
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import model as M
import train as TR  # the one MFU definition and peak table

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "benchmarks"))
from measure import emit, mem_mark, mem_peak, run_fresh, sync  # noqa: E402  (benchmarks/measure.py)


# -----------------------------------------------------------------------------
# Measurement helpers


def timed(fn, device, warmup=1, iters=3) -> float:
    """Median seconds per call of fn(), after warm-up, with the device synchronised around each call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def in_subprocess(func: str, **kwargs) -> dict:
    """bench.<func>(**kwargs) in a fresh interpreter (a fresh peak RSS)."""
    return run_fresh(__file__, func, kwargs)


# -----------------------------------------------------------------------------
# Decoder: forward + backward, and decoding, against transformers' Ministral3ForCausalLM


def _tiny_pair(shape: str, device: str, dtype, with_hf: bool):
    args = M.ModelArgs.preset(shape)
    torch.manual_seed(0)
    ours = M.Transformer(args).to(device=device, dtype=dtype)
    ours.init_weights(0)
    hf = None
    if with_hf:
        import tempfile
        import transformers
        with tempfile.TemporaryDirectory() as d:
            M.save_model(ours, d)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa",
                                                                     local_files_only=True).to(device)
    return args, ours, hf


def fwd_bwd_variant(impl: str, shape="bench-cpu", batch=8, seq=256, device="cpu", dtype="float32", iters=3) -> dict:
    """Tokens/s and peak memory of forward + backward with a plain cross-entropy (no optimizer)."""
    dt = getattr(torch, dtype)
    args, ours, hf = _tiny_pair(shape, device, dt, with_hf=impl == "hf")
    net = hf if impl == "hf" else ours
    net.train()
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, args.vocab_size, (batch, seq), generator=g).to(device)
    y = torch.randint(0, args.vocab_size, (batch, seq), generator=g).to(device)
    base = mem_mark(device)

    def step():
        if impl == "hf":
            loss = net(input_ids=x, labels=x).loss  # HF shifts the labels itself
        else:
            loss = F.cross_entropy(net(x).flatten(0, 1).float(), y.flatten())
        loss.backward()
        net.zero_grad(set_to_none=True)

    sec = timed(step, device, warmup=1, iters=iters)
    peak = mem_peak(device) - base
    tps = batch * seq / sec
    return {"impl": impl, "tok_s": tps, "peak_gib": peak / 2**30,
            "mfu": TR.mfu(tps, M.flops_per_token(args, seq), device, "bf16" if dtype == "bfloat16" else dtype)}


def decode_variant(impl: str, shape="bench-cpu", batch=8, prompt=32, new=64, device="cpu", dtype="float32") -> dict:
    """Greedy decoding throughput: new tokens per second over the whole generate call (prefill included)."""
    dt = getattr(torch, dtype)
    args, ours, hf = _tiny_pair(shape, device, dt, with_hf=impl == "hf")
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(3, args.vocab_size, (batch, prompt), generator=g)
    if impl == "hf":
        hf.eval()
        x = prompts.to(device)
        mask = torch.ones_like(x)
        run = lambda: hf.generate(input_ids=x, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                                  do_sample=False, pad_token_id=0)
    else:
        ours.eval()
        lists = prompts.tolist()
        run = lambda: M.generate(ours, lists, new, eos_id=None)
    with torch.no_grad():
        sec = timed(run, device, warmup=1, iters=3)
    return {"impl": impl, "new_tok_s": batch * new / sec, "ms_per_step": 1000 * sec / new}


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def bench_model(device="cpu") -> dict:
    gpu = device.startswith("cuda")
    shape, dtype = ("3b", "bfloat16") if gpu else ("bench-cpu", "float32")
    fb_kw = dict(shape=shape, device=device, dtype=dtype, batch=2 if gpu else 8, seq=4096 if gpu else 256)
    dec_kw = dict(shape=shape, device=device, dtype=dtype, batch=32 if gpu else 8, prompt=128 if gpu else 32,
                  new=256 if gpu else 64)
    impls = ["ours"] + (["hf"] if has("transformers") else [])
    rows = {}
    for impl in impls:
        rows[f"fwd_bwd_{impl}"] = in_subprocess("fwd_bwd_variant", impl=impl, **fb_kw)
        rows[f"decode_{impl}"] = in_subprocess("decode_variant", impl=impl, **dec_kw)
    print(f"\nDecoder ({shape}, {dtype}, {device}); forward+backward at B={fb_kw['batch']} T={fb_kw['seq']}, "
          f"greedy decode batch {dec_kw['batch']}, {dec_kw['prompt']}-token prompts, {dec_kw['new']} new")
    print(f"{'impl':<6} {'fwd+bwd tok/s':>14} {'peak GiB':>9} {'MFU':>7} {'decode new tok/s':>17} {'ms/step':>8}")
    for impl in impls:
        fb, dec = rows[f"fwd_bwd_{impl}"], rows[f"decode_{impl}"]
        m = "-" if fb["mfu"] is None else f"{100 * fb['mfu']:.1f}%"
        print(f"{impl:<6} {fb['tok_s']:>14,.0f} {fb['peak_gib']:>9.2f} {m:>7} {dec['new_tok_s']:>17,.0f} {dec['ms_per_step']:>8.2f}")
    if "hf" in impls:
        rows["ratio_fwd_bwd"] = rows["fwd_bwd_ours"]["tok_s"] / rows["fwd_bwd_hf"]["tok_s"]
        rows["ratio_decode"] = rows["decode_ours"]["new_tok_s"] / rows["decode_hf"]["new_tok_s"]
        rows["ratio_peak_mem"] = rows["fwd_bwd_ours"]["peak_gib"] / max(rows["fwd_bwd_hf"]["peak_gib"], 1e-9)
        print(f"ours / HF: fwd+bwd {rows['ratio_fwd_bwd']:.2f}x, decode {rows['ratio_decode']:.2f}x, "
              f"peak memory {rows['ratio_peak_mem']:.2f}x")
    return rows


# -----------------------------------------------------------------------------
# The other concepts' benchmarks live beside their records in benchmarks/*.py


def _from_benchmarks(module: str, func: str):
    return getattr(importlib.import_module(module), func)


SUITES = {
    "model": lambda device: bench_model(device),
    "kl": lambda device: _from_benchmarks("kl_bench", "bench_kl")(device=device),
    "train": lambda device: _from_benchmarks("train_bench", "bench_train_step")(device=device),
    "prune": lambda device: _from_benchmarks("prune_bench", "bench_prune")(device=device),
    "tokenizer": lambda device: _from_benchmarks("tokenizer_bench", "bench_tokenizer")(),
    "vision": lambda device: _from_benchmarks("vision_bench", "bench_vision")(device=device),
    "real": lambda device: _from_benchmarks("real_bench", "bench_real")(device=device),  # the real SmolLM2 parent (a fetched GGUF)
}


def environment(device) -> dict:
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    dev = torch.cuda.get_device_name(device) if str(device).startswith("cuda") else f"cpu x{torch.get_num_threads()} threads ({platform.processor() or platform.machine()})"
    return {"date": datetime.date.today().isoformat(), "device": dev, "torch": torch.__version__, "commit": commit,
            "command": "python " + " ".join(sys.argv)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("suite", nargs="?", default="all", choices=["all", *SUITES])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--record", action="store_true", help="append the result to benchmarks/records.jsonl")
    a = ap.parse_args(argv)
    names = [n for n in SUITES if n != "real"] if a.suite == "all" else [a.suite]  # real needs the fetched file
    result = {"env": environment(a.device)}
    for name in names:
        result[name] = SUITES[name](a.device)
    emit(result, a.record)


if __name__ == "__main__":
    main()
