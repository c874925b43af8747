"""The embedded cascade's record: `python cascade.py`, plus a from-scratch baseline and the loss curves.

The baseline asks what the cascade buys: the smallest size trained from random initialisation with
next-token CE on as many tokens as its cascaded child's own two distillation stages, once per learning
rate of --baseline-lrs. The run with the lowest CE on the VALIDATION half of the held-out text is the
baseline; the test half, which every row of the table reads, plays no part in the choice. The cascaded
child also inherits everything upstream (the parent's pretraining, the larger children's short stages):
the table reports tokens seen, upstream included.

Run: `python experiments/demo.py` (the cascade's stages under --out are reused when they exist);
`rm -rf runs/demo-record && python experiments/demo.py --out runs/demo-record --results benchmarks/demo`
regenerates the committed record (table.md/json, lr_sweep.json, curves.png).
"""

import math
import os
import sys
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the mechanism files

import cascade as C  # noqa: E402
import train as TR  # noqa: E402
from experiments import plots  # noqa: E402


@dataclass
class DemoConfig:
    baseline_lrs: str = "1e-3,3e-3,1e-2"  # the baseline's lr sweep; the lowest CE on the VALIDATION split is the row
    results: Optional[str] = None  # where the table, plot and lr sweep go; None = <out>/results


def parse_lrs(text: str) -> list:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        lrs = []
    if not lrs or not all(math.isfinite(x) and x > 0 for x in lrs):
        raise ValueError(f"--baseline-lrs {text!r} is not a comma-separated list of positive learning rates, "
                         f"e.g. 3e-4,1e-3,3e-3")
    return lrs


def baseline_stage(lr: float) -> str:
    return f"baseline/lr_{lr:g}"


def run_baseline(cascade: dict, lrs: list) -> dict:
    """The sweep on the finished cascade's context: {"path", "stage", "lr", "tokens", "sweep", "seconds", ...}."""
    cfg, ctx, stages, plan = cascade["cfg"], cascade["ctx"], cascade["stages"], cascade["plan"]
    args = plan.sizes[-1][1]
    tokens = cfg.batch_size * (cfg.short_steps * cfg.seq_len + cfg.long_steps * cfg.long_seq_len)
    steps = max(1, tokens // (cfg.batch_size * cfg.seq_len))
    sweep = []
    for lr in lrs:
        name = baseline_stage(lr)
        key = {"shape": [args.n_layers, args.dim, args.hidden_dim, args.tied_embeddings], "steps": steps}
        path = C.stage_pretrain(cfg, ctx, stages, name, args, steps, cfg.seq_len, lr, cfg.seed + 99, key=key)
        val = C.stage_eval(cfg, ctx, stages, name, path, None, cfg.seq_len, split="val")
        info = stages.info(name)
        sweep.append({"lr": lr, "stage": name, "val_ce": val["ce"], "val_tokens": val["tokens"], "steps": steps,
                      "tokens": info["tokens"], "seconds": info["seconds"], "cpu_seconds": info["cpu_seconds"]})
    best = min(sweep, key=lambda r: r["val_ce"])
    return {"path": os.path.join(stages.dir(best["stage"]), "model"), "stage": best["stage"], "lr": best["lr"],
            "tokens": best["tokens"], "sweep": sweep, "seconds": sum(r["seconds"] for r in sweep),
            "cpu_seconds": sum(r["cpu_seconds"] for r in sweep)}


def plot_curves(cascade: dict, baseline: dict, path: str):
    """Left: next-token CE of the parent's pretraining and of the from-scratch baseline (every lr of the
    sweep). Right: KL to the teacher of every distillation stage in cascade order on one token axis, log
    scale (it spans decades), with the stage boundaries marked."""
    cfg, plan, stages = cascade["cfg"], cascade["plan"], cascade["stages"]
    curve = lambda stage, seq: [(s * cfg.batch_size * seq, y) for s, y in plots.read_metrics(stages.dir(stage))]
    fig, (ce_ax, kl_ax) = plots.figure(2)
    parent = curve("parent", cfg.long_seq_len)
    if parent:
        ce_ax.plot(*zip(*parent), label="parent (pretraining)", color="black")
    last = plan.sizes[-1][0]
    for r in baseline["sweep"]:
        pts = curve(r["stage"], cfg.seq_len)
        if pts:
            chosen = r["lr"] == baseline["lr"]
            ce_ax.plot(*zip(*pts), label=f"{last} from scratch, lr {r['lr']:g}" + (" (chosen)" if chosen else ""),
                       linestyle="-" if chosen else ":", linewidth=2 if chosen else 1.2)
    vocab = plan.parent_args.vocab_size
    ce_ax.axhline(math.log(vocab), color="grey", linewidth=0.8, linestyle="--", label=f"uniform guess (ln {vocab})")
    ce_ax.set(title="next-token CE (training loss)", xlabel="training tokens", ylabel="CE (nats)")
    ce_ax.legend(fontsize=8)
    ce_ax.grid(alpha=0.3)
    offset, colors = 0, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, (name, _) in enumerate(plan.sizes):
        for stage, seq, style in (("short", cfg.seq_len, "-"), ("long", cfg.long_seq_len, "--")):
            pts = curve(f"{name}/{stage}", seq)
            if not pts:
                continue
            kl_ax.plot([offset + x for x, _ in pts], [max(y, 1e-6) for _, y in pts], style, color=colors[i % 6],
                       label=f"{name} {stage} ({seq} tokens)")
            kl_ax.axvline(offset, color="grey", linewidth=0.6)
            kl_ax.text(offset, 1.0, f" {name}/{stage}", transform=kl_ax.get_xaxis_transform(), fontsize=7,
                       va="bottom", rotation=30)
            offset += pts[-1][0]
    kl_ax.set_yscale("log")
    kl_ax.set(xlabel="distillation tokens, stages in cascade order", ylabel="KL(teacher || student) (nats)")
    kl_ax.set_title("KL to the teacher (distillation)", pad=28)
    kl_ax.legend(fontsize=8)
    kl_ax.grid(alpha=0.3, which="both")
    for ax in (ce_ax, kl_ax):
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:g}M" if x else "0")
    plots.save(fig, path)


def run_demo(cfg: C.CascadeConfig, dcfg: DemoConfig) -> dict:
    lrs = parse_lrs(dcfg.baseline_lrs)  # a bad sweep fails before any training
    clock = TR.run_clock()
    cascade = C.run_cascade(cfg, later_stages=tuple(baseline_stage(lr) for lr in lrs))
    cfg, ctx, stages, plan = cascade["cfg"], cascade["ctx"], cascade["stages"], cascade["plan"]
    baseline = run_baseline(cascade, lrs)
    last = plan.sizes[-1][0]
    r = C.row(cfg, ctx, stages, f"{last} from scratch (lr {baseline['lr']:g})", baseline["stage"], baseline["path"],
              cascade["teacher"], baseline["tokens"])
    rows = cascade["rows"] + [r | {"seconds": baseline["seconds"], "cpu_seconds": baseline["cpu_seconds"]}]
    run = {**clock(), "stages_cpu_seconds": round(sum(x["cpu_seconds"] or 0 for x in rows), 1)}
    out = dcfg.results or os.path.join(cfg.out, "results")
    sweep = ", ".join(f"lr {x['lr']:g}: {x['val_ce']:.3f}" for x in baseline["sweep"])
    notes = [f"The cascaded children therefore inherit the parent's and the larger children's training; the "
             f"from-scratch row sees only its own tokens, as many as the {last} child's own short and long stages.",
             f"The from-scratch baseline was trained once per learning rate and the lowest CE on the validation "
             f"half chose it ({sweep}); its time is the whole sweep's."]
    record = C.write_table(cfg, rows, plan, ctx, run, out=out, notes=notes)
    TR.write_json_atomic(os.path.join(out, "lr_sweep.json"), {
        "chosen_on": "validation half of the held-out text", "chosen_lr": baseline["lr"], "sweep": baseline["sweep"],
        "run": record})
    plot_curves(cascade, baseline, os.path.join(out, "curves.png"))
    return {"rows": rows, "baseline": baseline, "heldout": ctx.heldout, "run": run}


def main(argv=None):
    cfg, dcfg = C.parse_args(argv, DemoConfig)
    code = TR.run_main(lambda: run_demo(cfg, dcfg) and 0)
    sys.exit(2 if code else 0)


if __name__ == "__main__":
    main()
