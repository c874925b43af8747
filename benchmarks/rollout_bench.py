"""Rollout decoding: generate.py's engine against transformers' `generate`, interleaved in one process.

CPU target: bench-cpu shape (d 256, 4 layers, vocab 8192, fp32), batch 8, 32-token prompts,
64 new tokens, greedy: at least 2x HF's new tokens/s. GPU target: 3B shape, bf16, batch 32, 128-token
prompts, 256 new tokens, sampling: at least 10x HF and within 2.5x of the weight-read floor per step;
MBU reported. The two implementations alternate round by round in the same process, so a neighbour
process loading the shared machine slows both alike; each round records wall time and this process's
CPU time (time.process_time), and the record keeps the medians of both.

Ours is timed from prompt ids to the returned tokens and log-probs, with the weights already gathered
(RolloutWeights: once per rollout phase, whose size in GRPO is many such calls); the gather is timed
on its own and recorded beside. HF is timed from input ids to returned ids. Both decode exactly
`new` tokens (no EOS). With random weights the logits are nearly flat, so greedy tokens may part
ways between the two on rounding; the record keeps the fraction of identical tokens.

Run: `python benchmarks/rollout_bench.py [--device cuda] [--rounds 5] [--threads 1] [--record]`;
`--record` appends the JSON (with date, device, torch, commit, command) to benchmarks/records.jsonl.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.dirname(os.path.abspath(__file__))]
import generate as GEN  # noqa: E402
import model as M  # noqa: E402
from measure import emit, sync  # noqa: E402

SHAPES = {  # device type -> (preset, dtype, batch, prompt, new, temperature)
    "cpu": ("bench-cpu", torch.float32, 8, 32, 64, 0.0),
    "cuda": ("3b", torch.bfloat16, 32, 128, 256, 1.0),
}


def _models(preset, dtype, device, with_hf):
    args = M.ModelArgs.preset(preset)
    with torch.device("meta"):
        ours = M.Transformer(args)
    ours = ours.to_empty(device=device).to(dtype)
    if args.tied_embeddings:
        ours.lm_head.weight = ours.embed_tokens.weight  # to_empty does not keep the tie
    ours.init_weights(0)
    ours.eval()
    hf = None
    if with_hf:
        import transformers
        with tempfile.TemporaryDirectory() as d:
            M.save_model(ours, d)
            hf = transformers.AutoModelForCausalLM.from_pretrained(d, dtype=dtype, attn_implementation="sdpa",
                                                                     local_files_only=True)
        hf = hf.to(device).eval()
    return args, ours, hf


def _clock(fn, device):
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    sync(device)
    return out, time.perf_counter() - w0, time.process_time() - c0


def cpu_peaks(threads: int) -> dict:
    """This process's own ceilings on the CPU, measured now (so under the same load as the rollouts): the
    streaming read bandwidth (sum of a 256 MiB fp32 tensor) and the fp32 matmul rate (1024^3 sgemm), both at
    the benchmark's thread count; medians of 5, timed by process CPU time (a neighbour's share of the core
    is not counted, as in the CPU-time ratios). The floor of a decode step is max(bytes / bandwidth,
    flops / matmul rate)."""
    x = torch.ones(64 * 2 ** 20)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    bw, fl = [], []
    for _ in range(5):
        t0 = time.process_time()
        x.sum()
        bw.append(x.numel() * 4 / (time.process_time() - t0))
        t0 = time.process_time()
        a @ b
        fl.append(2 * 1024 ** 3 / (time.process_time() - t0))
    return {"read_bytes_per_s": statistics.median(bw), "matmul_flops_per_s": statistics.median(fl), "threads": threads}


def bench_rollout(device="cpu", rounds=5) -> dict:
    dev = torch.device(device)
    preset, dtype, batch, prompt, new, temp = SHAPES[dev.type]
    try:
        import transformers  # noqa: F401
        with_hf = True
    except ImportError:
        with_hf = False
    args, ours, hf = _models(preset, dtype, dev, with_hf)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, args.vocab_size, (batch, prompt), generator=g)
    cfg = GEN.RolloutConfig(max_new_tokens=new, temperature=temp, eos_id=None)

    _, gather_wall, gather_cpu = _clock(lambda: GEN.RolloutWeights(ours), dev)
    W = GEN.RolloutWeights(ours)

    def run_ours():
        return GEN.rollout(W, ids.tolist(), cfg)

    def run_hf():
        x = ids.to(dev)
        return hf.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                           do_sample=temp > 0, temperature=temp if temp > 0 else None, top_p=None, top_k=None,
                           pad_token_id=0)

    impls = {"ours": run_ours, **({"hf": run_hf} if hf is not None else {})}
    times = {k: {"wall": [], "cpu": []} for k in impls}
    outs = {}
    with torch.no_grad():
        for k, fn in impls.items():
            outs[k] = fn()  # warm-up (CUDA-graph capture on a GPU)
        for _ in range(rounds):
            for k, fn in impls.items():
                _, w, c = _clock(fn, dev)
                times[k]["wall"].append(w)
                times[k]["cpu"].append(c)
    res = {"shape": {"preset": preset, "dtype": str(dtype).split(".")[1], "batch": batch, "prompt": prompt,
                     "new": new, "temperature": temp}, "device": device, "rounds": rounds,
           "threads": torch.get_num_threads(), "load_average_1_5_15": os.getloadavg()}
    res["ours_weight_gather"] = {"wall_s": gather_wall, "cpu_s": gather_cpu}
    floor = GEN.decode_bytes_per_step(W, batch, prompt + new // 2)  # mean context over the decode
    for k in impls:
        wall, cpu = statistics.median(times[k]["wall"]), statistics.median(times[k]["cpu"])
        step = wall / new
        res[k] = {"new_tok_s": batch * new / wall, "ms_per_step": 1000 * step, "wall_s": times[k]["wall"],
                  "cpu_s": times[k]["cpu"], "new_tok_per_cpu_s": batch * new / cpu,
                  "mbu": GEN.mbu(floor, step, dev)}
    res["floor_bytes_per_step"] = floor
    res["flops_per_step"] = flops = GEN.decode_flops_per_step(W, batch, prompt + new // 2)
    bw = GEN.peak_bandwidth(dev)
    res["floor_ms_per_step"] = None if bw is None else 1000 * floor / bw
    if dev.type == "cpu":  # no datasheet peak: this process's measured read bandwidth and matmul rate
        res["cpu_peaks"] = pk = cpu_peaks(torch.get_num_threads())
        res["floor_ms_per_step"] = 1000 * max(floor / pk["read_bytes_per_s"], flops / pk["matmul_flops_per_s"])
        res["floor_bound"] = "bandwidth" if floor / pk["read_bytes_per_s"] > flops / pk["matmul_flops_per_s"] else "flops"
    if "hf" in impls:
        res["ratio_new_tok_s"] = res["ours"]["new_tok_s"] / res["hf"]["new_tok_s"]
        res["ratio_cpu_time"] = statistics.median(times["hf"]["cpu"]) / statistics.median(times["ours"]["cpu"])
        if temp == 0:  # greedy: both must have produced the same tokens
            res["same_tokens_frac"] = float((outs["hf"][:, prompt:].cpu() == outs["ours"].tokens.cpu()).float().mean())
    if res["floor_ms_per_step"]:
        res["ratio_to_floor"] = res["ours"]["ms_per_step"] / res["floor_ms_per_step"]
        if dev.type == "cpu":  # CPU time per step (prefill included) over the floor, as the peaks were timed
            res["ratio_to_floor_cpu_time"] = 1000 * statistics.median(times["ours"]["cpu"]) / new / res["floor_ms_per_step"]
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    import bench  # the one environment() (date, device, torch, commit, command)
    res = {"env": bench.environment(a.device), "rollout": bench_rollout(a.device, a.rounds)}
    r = res["rollout"]
    if r.get("floor_ms_per_step"):
        print(f"floor {r['floor_ms_per_step']:.2f} ms/step ({r.get('floor_bound', 'bandwidth')}); ours "
              f"{r['ratio_to_floor']:.2f}x the floor (wall), {r.get('ratio_to_floor_cpu_time', float('nan')):.2f}x (CPU time)")
    print(f"{'impl':<6} {'new tok/s':>10} {'ms/step':>8} {'new tok per CPU s':>18} {'MBU':>6}")
    for k in ("ours", "hf"):
        if k in r:
            m = "-" if r[k]["mbu"] is None else f"{100 * r[k]['mbu']:.0f}%"
            print(f"{k:<6} {r[k]['new_tok_s']:>10,.0f} {r[k]['ms_per_step']:>8.2f} {r[k]['new_tok_per_cpu_s']:>18,.0f} {m:>6}")
    if "ratio_new_tok_s" in r:
        print(f"ours / HF: {r['ratio_new_tok_s']:.2f}x wall, {r['ratio_cpu_time']:.2f}x CPU time; identical tokens: "
              f"{r.get('same_tokens_frac')}; weight gather {r['ours_weight_gather']['wall_s']:.3f} s")
    emit(res, a.record)


if __name__ == "__main__":
    main()
