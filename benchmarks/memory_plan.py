"""Memory per GPU of the real cascade, from what the code holds per rank (the README's memory table).

Not a measurement: arithmetic over the parameter shapes of model.py's presets (built on the meta
device), following the rules the code implements, each named where it is used:
  * train.parallelize shards teacher and student by block and root (FSDP2, 1/N per rank);
  * the student keeps fp32 master weights, fp32 gradients (reduce_dtype fp32) and two fp32 AdamW
    moments: 16 bytes per parameter, sharded;
  * the teacher is cast to bf16 (2 bytes), sharded; during a micro-batch its root (embedding, final
    norm, head) is gathered for the student's fused loss, then resharded (distill._release), and
    each block is gathered for its own forward (FSDP2 may prefetch the next: up to two at once);
  * train.export writes the student's fp32 master weights, so a cascade child on disk is fp32, and
    prune.py (cascade.stage_prune) loads it whole on every rank in that dtype.
The 2-process test tests/test_distill_stage.py::test_fsdp_two_processes_distil_like_one checks the
sharding rule on the CPU (each rank holds half of the teacher's bytes after the steps).

Run: `python benchmarks/memory_plan.py [--gpus 8 4] [--record]` prints the table and a JSON line;
--record writes benchmarks/memory_plan.json. Depends on: model.py.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import model as M  # noqa: E402

GB = 1e9


def shapes(size: str) -> dict:
    """Parameter counts of a preset: total, root (embedding, final norm, head; a tied pair once), one block."""
    with torch.device("meta"):
        m = M.Transformer(M.ModelArgs.preset(size))
    total = sum(p.numel() for p in m.parameters())
    block = sum(p.numel() for p in m.layers[0].parameters())
    return {"total": total, "root": total - block * len(m.layers), "block": block, "layers": len(m.layers),
            "dim": m.args.dim, "vocab": m.args.vocab_size}


def plan(n: int) -> dict:
    s = {k: shapes(k) for k in ("24b", "14b", "8b", "3b")}
    t = s["24b"]
    teacher = {"shard": t["total"] * 2 / n, "root_gathered": t["root"] * 2 * (1 - 1 / n),
               "blocks_gathered": 2 * t["block"] * 2}
    teacher["peak"] = sum(teacher.values())
    students = {}
    for k in ("14b", "8b", "3b"):
        a = s[k]
        students[k] = {"states": a["total"] * 16 / n,  # fp32 weight + fp32 grad + 2 fp32 moments, sharded
                       "bf16_root_gathered": a["root"] * 2 * (1 - 1 / n),  # forward to backward
                       "bf16_blocks_gathered": 2 * a["block"] * 2,
                       "activations_16k_ckpt": a["layers"] * 16384 * a["dim"] * 2,  # block inputs kept (AC)
                       "checkpoint_on_disk": a["total"] * 16, "export_on_disk_fp32": a["total"] * 4}
    loss = 2 * 4096 * 131072 * 4  # two fp32 [chunk, V] logit buffers at the default GPU chunk (distill.py)
    prune = {"24b_parent_bf16": t["total"] * 2, "14b_child_fp32": s["14b"]["total"] * 4,
             "8b_child_fp32": s["8b"]["total"] * 4,
             "surgery_extra_14b_fp32": s["14b"]["vocab"] * s["14b"]["dim"] * 4 + 4096 * s["14b"]["dim"] * 4}
    a = students["14b"]  # the 14B short stage at its peak, before a block's recompute (a few GB more)
    total = (teacher["peak"] + a["states"] + a["bf16_root_gathered"] + a["bf16_blocks_gathered"]
             + a["activations_16k_ckpt"] + loss)
    return {"gpus": n, "params": s, "teacher": teacher, "students": students, "fused_loss": loss, "prune": prune,
            "short_stage_14b_peak_without_recompute": total}


def table(p: dict) -> str:
    n, t = p["gpus"], p["teacher"]
    f = lambda b: f"{b / GB:.1f} GB"
    rows = [f"| teacher MS3.1 24B, bf16 | {f(t['shard'])} shard; during a micro-batch + {f(t['root_gathered'])} "
            f"gathered root + up to 2 gathered blocks {f(t['blocks_gathered'])} = {f(t['peak'])} |"]
    for k, a in p["students"].items():
        rows.append(f"| {k.upper()} student states (fp32 master, grad, AdamW) | {f(a['states'])}; + bf16 root "
                    f"{f(a['bf16_root_gathered'])} and blocks {f(a['bf16_blocks_gathered'])} while training |")
    a = p["students"]["14b"]
    rows.append(f"| activations, 16K tokens per GPU, checkpointing per block (14B) | {f(a['activations_16k_ckpt'])} "
                f"kept + one block's recompute |")
    rows.append(f"| fused KL loss | {f(p['fused_loss'])} of fp32 logits at the default GPU chunk |")
    pr = p["prune"]
    rows.append(f"| pruning: every rank holds the whole source model in its checkpoint's dtype | 24B parent "
                f"(bf16) {f(pr['24b_parent_bf16'])}; the 14B child (fp32, as exported) {f(pr['14b_child_fp32'])}; "
                f"the 8B child (fp32) {f(pr['8b_child_fp32'])}; + the teacher shard {f(t['shard'])} + one fp32 "
                f"head-sized tensor {f(pr['surgery_extra_14b_fp32'])} |")
    rows.append(f"| the 14B short stage at its peak (teacher, student, activations, loss) | "
                f"{f(p['short_stage_14b_peak_without_recompute'])} + one block's recompute |")
    return f"| step (24B parent, {n} GPUs) | per GPU |\n|---|---|\n" + "\n".join(rows)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gpus", type=int, nargs="+", default=[8, 4])
    ap.add_argument("--record", action="store_true")
    a = ap.parse_args()
    plans = {str(n): plan(n) for n in a.gpus}
    for p in plans.values():
        print(table(p) + "\n")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                            text=True).stdout.strip()
    out = {"env": {"date": datetime.date.today().isoformat(), "torch": torch.__version__, "commit": commit,
                   "command": "python benchmarks/memory_plan.py --gpus " + " ".join(map(str, a.gpus)) + " --record",
                   "kind": "arithmetic over meta-device parameter shapes, not a measurement"}, "plans": plans}
    if a.record:
        with open(os.path.join(ROOT, "benchmarks", "memory_plan.json"), "w") as fh:
            json.dump(out, fh, indent=1)
    print(json.dumps({n: p["short_stage_14b_peak_without_recompute"] for n, p in plans.items()}))


if __name__ == "__main__":
    main()
