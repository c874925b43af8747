"""Which part of pruning breaks SmolLM2's 8b child? From the cascade's 14b pruned child
(runs/probe/14b_init, made by probe_distill.py prepare), apply one cut at a time toward the 8b shape and
measure held-out KL to the parent (1K tokens): layers only, hidden width only (untied, and re-tied by each
tie policy), FFN only, and the whole 8b step with each tie policy.
Run: OMP_NUM_THREADS=1 python benchmarks/smollm2/probes/probe_prune.py  (writes prune.json beside it)
Depends on: model.py, cascade.py (through probe_distill.py).
"""
import dataclasses
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import probe_distill as PD  # noqa: E402

C, D, M, P = PD.C, PD.D, PD.M, PD.P


def main():
    torch.manual_seed(0)
    cfg, plan, train_tokens, test_tokens = PD.setup(4, 2)
    teacher = M.load_model(PD.parent_path(cfg)).eval()
    src = PD.child_path(cfg, plan, train_tokens, "14b")
    base = M.load_model(src).args
    t8 = dict(plan.sizes)["8b"]
    ld = D.PackedLoader(train_tokens, cfg.micro_batch_size, cfg.seq_len, seed=cfg.seed + 7)
    calib = [ld.batch(j)[0] for j in range(max(1, cfg.calib_seqs // cfg.micro_batch_size))]
    variants = [("14b pruned (source)", None, "mean"),
                ("layers only", dict(n_layers=t8.n_layers), "mean"),
                ("FFN only", dict(hidden_dim=t8.hidden_dim), "mean"),
                ("width only, untied", dict(dim=t8.dim, tied_embeddings=False), "mean"),
                ("width only, re-tied mean", dict(dim=t8.dim), "mean"),
                ("width only, re-tied embedding", dict(dim=t8.dim), "embedding"),
                ("width only, re-tied head", dict(dim=t8.dim), "head"),
                ("8b, re-tied mean (cascade)", dict(n_layers=t8.n_layers, dim=t8.dim, hidden_dim=t8.hidden_dim), "mean"),
                ("8b, re-tied embedding", dict(n_layers=t8.n_layers, dim=t8.dim, hidden_dim=t8.hidden_dim), "embedding"),
                ("8b, untied", dict(n_layers=t8.n_layers, dim=t8.dim, hidden_dim=t8.hidden_dim, tied_embeddings=False), "mean")]
    rows = []
    for label, change, policy in variants:
        m = M.load_model(src)
        c0 = time.process_time()
        report = {}
        if change is not None:
            m, report = P.prune(m, dataclasses.replace(base, **change), calib,
                                P.PruneConfig(layer_method=cfg.layer_selection, seed=cfg.seed, tie_policy=policy))
        r = {"variant": label, "tie_policy": policy if change and "dim" in change else None,
             "shape": [m.args.n_layers, m.args.dim, m.args.hidden_dim, m.args.tied_embeddings],
             "head_rel_error": (report.get("tie") or {}).get("head_rel_error"),
             "retained_energy": (report.get("hidden") or {}).get("retained_energy"),
             "prune_cpu_s": round(time.process_time() - c0, 1), **PD.evaluate(m.eval(), teacher, cfg, test_tokens, cfg.seq_len)}
        print(r, flush=True)
        rows.append(r)
    PD.record("prune", rows, {"command": "OMP_NUM_THREADS=1 python benchmarks/smollm2/probes/probe_prune.py",
                              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
                              "eval_sequences": 8, "seq_len": cfg.seq_len})


if __name__ == "__main__":
    main()
