"""Measurement helpers shared by bench.py and benchmarks/*.py, so every figure is taken the same way:
clocks read after a device synchronise, peak memory as growth over a baseline (ru_maxrss on the CPU,
which Linux reports in KiB; torch.cuda.max_memory_allocated on a GPU), and each variant run in a fresh
interpreter so that one variant's peak cannot hide another's."""

import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def emit(result: dict, record: bool, path: str = os.path.join(ROOT, "benchmarks", "records.jsonl")) -> None:
    """Print a benchmark's result as one JSON line; with --record, also append that line to `path`
    (benchmarks/records.jsonl unless a benchmark keeps its own file)."""
    line = json.dumps(result, default=float)
    if record:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as f:
            f.write(line + "\n")
    print(line)


def sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def timed_median(fn, device, warmup: int, iters: int) -> tuple[float, float]:
    """(wall s, process CPU s) of fn(): medians of `iters` calls after `warmup` calls, the device
    synchronised around each. CPU time is the steadier figure on a shared machine."""
    for _ in range(warmup):
        fn()
    wall, cpu = [], []
    for _ in range(iters):
        sync(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        sync(device)
        wall.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    return statistics.median(wall), statistics.median(cpu)


def mem_mark(device) -> int:
    """The baseline for mem_peak: resets the GPU's peak counter; on the CPU the peak RSS so far."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def mem_peak(device) -> int:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_fresh(module_file: str, func: str, kwargs: dict) -> dict:
    """module.func(**kwargs) in a fresh interpreter; returns its JSON-able result."""
    folder, module = os.path.split(os.path.abspath(module_file))
    code = (f"import json, sys; sys.path[:0] = [{folder!r}, {ROOT!r}]; import {module[:-3]} as m; "
            f"print('RESULT' + json.dumps(m.{func}(**json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], capture_output=True, text=True, cwd=ROOT)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(f"benchmark {module}.{func}({kwargs}) failed in its subprocess:\n{out.stderr[-3000:]}")
