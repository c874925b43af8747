"""Cheap probes of why the cpu-real cascade's distillation made the SmolLM2 children worse.

Run (one core, from the repository root, CASCADE_CACHE pointing at the fetched wheel):
    OMP_NUM_THREADS=1 python benchmarks/smollm2/probes/probe_distill.py rope
    OMP_NUM_THREADS=1 python benchmarks/smollm2/probes/probe_distill.py lr --size 8b --lrs 1e-5,3e-5,1e-4,3e-4 --steps 4
Each writes benchmarks/smollm2/probes/<probe>.json (appending rows); the pruned children are made once with
cascade.py's own functions (the cpu-real plan, seed 0) and kept under runs/probe/.

`rope`: held-out KL to the parent of the parent itself and of each pruned child, with the short-stage RoPE
and with the long stage's switch (distill.long_context_args: YaRN factor 2, query temperature, L = 128),
no training. `lr`: held-out KL before and after a few distillation steps (cascade.py's schedule: warmup
max(1, steps // 10), cosine, AdamW, clip 1) at each learning rate.
Depends on: model.py, cascade.py.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
import cascade as C  # noqa: E402
import data as D  # noqa: E402
import distill as DI  # noqa: E402
import model as M  # noqa: E402
import prune as P  # noqa: E402
import train as TR  # noqa: E402

OUT = "runs/probe"
HERE = os.path.dirname(os.path.abspath(__file__))


def setup(micro: int, eval_batches: int):
    cfg = C.resolved(C.CascadeConfig(parent="smollm2", preset="cpu-real", out=OUT, micro_batch_size=micro,
                                     eval_batches=eval_batches))
    plan = C.make_plan(cfg)
    tok, train_tokens, val_tokens, test_tokens, _ = C.load_data(cfg, plan)
    return cfg, plan, train_tokens, test_tokens


def tcfg(cfg, out_dir, steps=1, lr=1e-4, batch=None, seq=None):
    b = batch or cfg.batch_size
    return TR.TrainConfig(out_dir=out_dir, steps=steps, batch_size=b, micro_batch_size=min(b, cfg.micro_batch_size),
                          seq_len=seq or cfg.seq_len, lr=lr, warmup_steps=max(1, steps // 10), dtype="fp32",
                          seed=cfg.seed, ckpt_every=0, ckpt_minutes=0, keep_checkpoints=1, log_every=1, export=False,
                          fsdp="never")


def parent_path(cfg):
    path = os.path.join(OUT, "parent")
    if not os.path.exists(os.path.join(path, "config.json")):
        M.save_model(M.load_model(M.resolve_model_path("smollm2")), path)
    return path


def child_path(cfg, plan, train_tokens, size, tie_policy="mean"):
    """The cascade's pruned child of `size` (the chain of short children replaced by the pruned ones).
    tie_policy: prune.py's re-tie of a width cut ("mean" was its default when the cpu-real run was recorded;
    the children made with another policy are kept under <size>_init_<policy>)."""
    names = [n for n, _ in plan.sizes]
    i = names.index(size)
    cut = plan.sizes[i][1].dim < (plan.parent_args.dim if i == 0 else plan.sizes[i - 1][1].dim)
    path = os.path.join(OUT, f"{size}_init" + (f"_{tie_policy}" if cut and tie_policy != "mean" else ""))
    if not os.path.exists(os.path.join(path, "config.json")):
        source = parent_path(cfg) if i == 0 else child_path(cfg, plan, train_tokens, names[i - 1], tie_policy)
        parent = M.load_model(source)
        ld = D.PackedLoader(train_tokens, cfg.micro_batch_size, cfg.seq_len, seed=cfg.seed + 7)
        calib = [ld.batch(j)[0] for j in range(max(1, cfg.calib_seqs // cfg.micro_batch_size))]
        child, _ = P.prune(parent, plan.sizes[i][1], calib, P.PruneConfig(layer_method=cfg.layer_selection, seed=cfg.seed,
                                                                            tie_policy=tie_policy))
        M.save_model(child, path)
    return path


def evaluate(student, teacher, cfg, test_tokens, seq):
    held = D.PackedLoader(test_tokens, cfg.micro_batch_size, seq, seed=1234)
    c0 = time.process_time()
    r = DI.evaluate_pair(student, teacher, held, cfg.eval_batches)
    return {"ce": round(r["ce"], 4), "kl": round(r["kl"], 4), "tokens": r["tokens"],
            "cpu_s": round(time.process_time() - c0, 1)}


def record(name, rows, meta):
    path = os.path.join(HERE, f"{name}.json")
    old = json.load(open(path)) if os.path.exists(path) else {"runs": []}
    old["runs"].append({**meta, "rows": rows})
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(old, f, indent=1)
    os.replace(tmp, path)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("probe", choices=["prepare", "rope", "lr"])
    ap.add_argument("--size", default="8b")
    ap.add_argument("--sizes", default="14b,8b,3b")
    ap.add_argument("--lrs", default="1e-5,3e-5,1e-4,3e-4")
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--micro", type=int, default=4)
    ap.add_argument("--eval-batches", type=int, default=2)
    ap.add_argument("--tie-policy", default="mean", help="prune.py re-tie of the children (mean: as recorded)")
    ap.add_argument("--long", action="store_true", help="lr probe of the long stage (seq 256, YaRN switch)")
    a = ap.parse_args()
    torch.manual_seed(0)
    cfg, plan, train_tokens, test_tokens = setup(a.micro, a.eval_batches)
    meta = {"command": "OMP_NUM_THREADS=1 python " + " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "torch": torch.__version__, "threads": torch.get_num_threads(), "eval_sequences": a.micro * a.eval_batches,
            "seq_len": cfg.seq_len, "long_seq_len": cfg.long_seq_len}
    teacher = M.load_model(parent_path(cfg)).eval()
    dcfg = DI.DistillConfig(long_yarn_factor=cfg.long_seq_len / cfg.seq_len, long_original_max_pos=cfg.seq_len)
    rows = []
    if a.probe == "prepare":
        for s in a.sizes.split(","):
            print(s, child_path(cfg, plan, train_tokens, s), flush=True)
        return
    if a.probe == "rope":
        for s in ["parent"] + a.sizes.split(","):
            path = parent_path(cfg) if s == "parent" else child_path(cfg, plan, train_tokens, s, a.tie_policy)
            m = M.load_model(path).eval()
            short = C.short_stage_args(m.args, cfg.seq_len)
            for label, args in [("as loaded", m.args), ("short-stage args", short),
                                ("long-stage args", DI.long_context_args(short, dcfg))]:
                m.args = args
                m.reset_buffers()
                for seq in (cfg.seq_len, cfg.long_seq_len):
                    if seq > args.max_seq_len:
                        continue
                    r = {"model": s, "rope": label, "seq": seq, **evaluate(m, teacher, cfg, test_tokens, seq)}
                    print(r, flush=True)
                    rows.append(r)
        record("rope", rows, meta)
        return
    init = child_path(cfg, plan, train_tokens, a.size, a.tie_policy)
    seq = cfg.long_seq_len if a.long else cfg.seq_len
    for lr in [float(x) for x in a.lrs.split(",")]:
        student = TR.build_model(init, tcfg(cfg, "", batch=a.batch, seq=seq), torch.device("cpu"))
        if a.long:
            student.args = C.short_stage_args(student.args, cfg.seq_len)
        before = evaluate(student, teacher, cfg, test_tokens, cfg.seq_len)
        out_dir = os.path.join(OUT, f"lr_{a.size}_{lr:g}_{os.getpid()}")
        c0, t0 = time.process_time(), time.time()
        res = DI.distill(student, teacher, D.PackedLoader(train_tokens, min(a.batch, a.micro), seq, seed=cfg.seed + 1),
                         tcfg(cfg, out_dir, a.steps, lr, a.batch, seq), dcfg, device="cpu", long_context=a.long)
        train_cpu = time.process_time() - c0
        after = evaluate(student, teacher, cfg, test_tokens, cfg.seq_len)
        r = {"size": a.size, "tie_policy": a.tie_policy, "stage": "long" if a.long else "short", "lr": lr, "steps": a.steps, "batch": a.batch,
             "tokens_per_step": a.batch * seq, "warmup_steps": max(1, a.steps // 10),
             "before": before, "after": after, "train_losses": [round(h["loss"], 3) for h in res["history"]],
             "grad_norms": [round(h["grad_norm"], 2) for h in res["history"]],
             "train_cpu_s_per_step": round(train_cpu / a.steps, 1), "train_wall_s": round(time.time() - t0, 1)}
        print(r, flush=True)
        rows.append(r)
        import shutil
        shutil.rmtree(out_dir, ignore_errors=True)
        del student
    record("lr", rows, meta)


if __name__ == "__main__":
    main()
