"""The ablations the paper reports (PAPER.md section 1, "teacher findings"), on the embedded experiment.

One cascade step per run: prune the trained parent straight to the last size, distil it at short
context, and measure held-out (test) CE and KL to the parent. Every variant runs --ablation-seeds seeds;
the table gives mean and spread (population std) and each run's dropped layers. The parent (and the
larger teacher) is trained once; runs are named by their settings, so the paper's setting (norm ratio,
KL alone, the parent as teacher) is one run per seed that all three ablations share, and two layer
rules that drop the same layers share one distilled child (the same child, bit for bit).

  kl_vs_mix        forward KL alone (paper) against 0.5 KL + 0.5 next-token CE
  layer_selection  norm ratio (paper), block influence, random, last k (prune.py)
  teacher          the parent as teacher (paper) against a larger teacher trained on the same tokens

Run: `python experiments/ablations.py --ablation kl_vs_mix --out runs/ablations --parent-steps 120 --results
benchmarks/ablations` (likewise layer_selection, teacher); `--preset cpu_deep` gives the 12-layer parent.
"""

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the mechanism files

import cascade as C  # noqa: E402
import distill as DI  # noqa: E402
import model as M  # noqa: E402
import train as TR  # noqa: E402

ABLATIONS = {  # name -> {variant: CascadeConfig overrides}
    "kl_vs_mix": {"KL only (paper)": {}, "0.5 KL + 0.5 CE": {"ce_weight": 0.5}},
    "layer_selection": {m: {"layer_selection": m} for m in ("norm_ratio", "block_influence", "random", "last_k")},
    "teacher": {"parent as teacher (paper)": {}, "larger teacher": {"teacher": "larger"}},
}
# A deeper parent for the layer-selection ablation: the gpu preset's depth, scaled to a CPU budget.
PRESETS = {"cpu_deep": dataclasses.replace(
    C.PRESETS["cpu"], stages=C.PRESETS["cpu"].stages | dict(parent_steps=120, long_steps=20),
    parent=M.ModelArgs(dim=96, n_layers=12, head_dim=32, hidden_dim=576, n_heads=4, n_kv_heads=2, vocab_size=4096,
                       rope_theta=1e4, max_seq_len=4096))}


@dataclass
class AblationConfig:
    ablation: str = "kl_vs_mix"  # kl_vs_mix | layer_selection | teacher
    ablation_seeds: int = 3  # seeds per variant, from --seed
    results: Optional[str] = None  # where the table and json go; None = <out>/results


def larger_teacher(parent: M.ModelArgs) -> M.ModelArgs:
    """The larger-teacher ablation's teacher: the parent with 4/3 the layers and 1.25x the width and FFN
    (about 2x the parameters), trained on the same tokens."""
    return dataclasses.replace(parent, n_layers=parent.n_layers * 4 // 3, dim=8 * round(parent.dim * 1.25 / 8),
                               hidden_dim=8 * round(parent.hidden_dim * 1.25 / 8))


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def mean_std(xs: list) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def run_ablation(cfg: C.CascadeConfig, acfg: AblationConfig) -> dict:
    if acfg.ablation not in ABLATIONS:
        raise ValueError(f"--ablation {acfg.ablation!r} is unknown: choose one of {', '.join(ABLATIONS)}")
    if acfg.ablation_seeds < 1:
        raise ValueError(f"--ablation-seeds {acfg.ablation_seeds} must be at least 1")
    if cfg.parent is not None:
        raise ValueError("the ablations run on the embedded experiment: drop --parent")
    rank, world, _, device = TR.setup_distributed()
    t0, c0 = time.time(), TR.cpu_seconds()
    cfg, preset = C.resolved(cfg, world, PRESETS.get(cfg.preset))
    ctx, plan = C.prepare(cfg, preset, rank, world, device, later_stages=("ablations", "larger_teacher"))
    stages = TR.Stages(cfg.out)
    parent_path = C.stage_parent(cfg, ctx, stages, plan)
    parent = C.build(parent_path, ctx, cfg, train=False)
    DI.attach_teacher_cache(parent, cfg.teacher_cache_mb)
    name, target = plan.sizes[-1]
    results, teachers = {v: [] for v in ABLATIONS[acfg.ablation]}, {}
    for variant, overrides in ABLATIONS[acfg.ablation].items():
        for s in range(acfg.ablation_seeds):
            vcfg = dataclasses.replace(cfg, seed=cfg.seed + s, **{k: v for k, v in overrides.items() if k != "teacher"})
            tag = "ablations/" + ("_".join(f"{k}_{slug(str(v))}" for k, v in sorted(overrides.items())) or "paper") \
                + f"/seed{s}"
            teacher = parent
            if overrides.get("teacher") == "larger":
                big = dataclasses.replace(plan, parent_args=larger_teacher(plan.parent_args))
                big_stages = TR.Stages(os.path.join(cfg.out, "larger_teacher"))
                big_path = C.stage_parent(cfg, ctx, big_stages, big)
                teacher = C.build(big_path, ctx, cfg, train=False)
                teachers[variant] = C.stage_eval(cfg, ctx, big_stages, "parent", big_path, None, cfg.seq_len) | {
                    "tokens_trained": big_stages.info("parent").get("tokens"), "args": dataclasses.asdict(big.parent_args)}
            init = C.stage_prune(vcfg, ctx, stages, f"{tag}/init", parent_path, target)
            with open(os.path.join(stages.dir(f"{tag}/init"), "report.json")) as f:
                layers = json.load(f)["layers"]
            # the distilled stage is named by what determines it: two rules that drop the same layers share it
            short_tag = (f"ablations/distilled/seed{vcfg.seed}_drop{'-'.join(map(str, layers['dropped']))}"
                         f"_ce{vcfg.ce_weight:g}_{'larger_teacher' if overrides.get('teacher') else 'parent'}")
            short = C.stage_distill(vcfg, ctx, stages, short_tag, init, teacher, False, cfg.short_steps, vcfg.seed + 1)
            # KL is always measured against the parent, so the two teachers are compared on one scale
            results[variant].append({
                "seed": vcfg.seed, "dropped_layers": layers["dropped"], "stage": tag, "distilled_stage": short_tag,
                "layer_scores": {k: layers[k] for k in ("norm_ratio", "block_influence")},
                "pruned": C.stage_eval(vcfg, ctx, stages, f"{tag}/init", init, parent, cfg.seq_len),
                "distilled": C.stage_eval(vcfg, ctx, stages, short_tag, short, parent, cfg.seq_len)})
    parent_eval = C.stage_eval(cfg, ctx, stages, "parent", parent_path, parent, cfg.seq_len)
    run = {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(TR.cpu_seconds() - c0, 1)}
    if rank == 0:
        write_ablation(cfg, acfg, results, parent_eval, name, plan, teachers, run)
    return results


def write_ablation(cfg, acfg: AblationConfig, results: dict, parent_eval: dict, size: str, plan, teachers: dict,
                   run: dict):
    seeds = acfg.ablation_seeds
    p, c = plan.parent_args, plan.sizes[-1][1]
    lines = [f"# Ablation `{acfg.ablation}` (preset {cfg.preset}, {seeds} seed{'s' * (seeds > 1)} from {cfg.seed})", "",
             f"Parent: {M.num_params(p):,} parameters, {p.n_layers} layers, d {p.dim}, FFN {p.hidden_dim}; held-out "
             f"(test) CE {parent_eval['ce']:.3f}. Each run prunes it straight to the {size} miniature ({c.n_layers} "
             f"layers, d {c.dim}, FFN {c.hidden_dim}{', tied' if c.tied_embeddings else ''}) and distils "
             f"{cfg.short_steps} short-context steps ({cfg.short_steps * cfg.batch_size * cfg.seq_len:,} tokens). "
             f"Mean ± population std over seeds; KL is to the parent.", ""]
    for variant, t in teachers.items():
        lines += [f"{variant}: {t['params']:,} parameters ({t['args']['n_layers']} layers, d {t['args']['dim']}, FFN "
                  f"{t['args']['hidden_dim']}), trained on {t['tokens_trained']:,} tokens; held-out (test) CE "
                  f"{t['ce']:.3f}.", ""]
    lines += ["| variant | CE after pruning | CE after distillation | KL to parent after distillation | "
              "dropped layers per seed |", "|---|---:|---:|---:|---|"]
    for variant, runs in results.items():
        cells = []
        for stage, key in (("pruned", "ce"), ("distilled", "ce"), ("distilled", "kl")):
            m, s = mean_std([r[stage][key] for r in runs])
            cells.append(f"{m:.3f} ± {s:.3f}")
        cells.append("; ".join(",".join(map(str, r["dropped_layers"])) for r in runs))
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    record = TR.run_record(**run)
    lines += ["", "Runs that dropped the same layers with the same seed and loss share one distilled child "
              "(`distilled_stage` in the json): their pruned models are the same, bit for bit.",
              "", "Per run (seed: CE after distillation): " + "; ".join(
                  f"{v} " + ", ".join(f"{r['seed']}: {r['distilled']['ce']:.3f}" for r in runs)
                  for v, runs in results.items()),
              "", f"Run: {record['date']}, {record['device']}, torch {record['torch']}, commit {record['commit']}, "
              f"{run['seconds']:.0f} s wall / {run['cpu_seconds']:.0f} s CPU. Command: `{record['command']}`."]
    text = "\n".join(lines) + "\n"
    out = acfg.results or os.path.join(cfg.out, "results")
    os.makedirs(out, exist_ok=True)
    stem = f"ablation_{acfg.ablation}" + ("" if cfg.preset == "cpu" else f"_{cfg.preset}")
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(text)
    TR.write_json_atomic(os.path.join(out, f"{stem}.json"), {
        "parent": parent_eval, "teachers": teachers, "runs": results, "run": record,
        "config": dataclasses.asdict(cfg) | dataclasses.asdict(acfg)})
    print("\n" + text)


def main(argv=None):
    cfg, acfg = C.parse_args(argv, AblationConfig)
    code = TR.run_main(lambda: run_ablation(cfg, acfg) and 0)
    sys.exit(2 if code else 0)


if __name__ == "__main__":
    main()
