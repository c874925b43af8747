"""Where a real parent's abilities sit in its FFN: one-shot FFN pruning variants, scored before distillation.

The 14b-ratio child of a small parent halves every layer's FFN and nothing else. This probe asks what that
cut costs and where, on the parent alone and at the cascade's own calibration data (cascade.calibration,
so --chat-data and --chat-share matter as they do there). Each variant keeps a set of FFN units:

  - "activation k/F": prune.select_ffn_units in every layer, the cascade's rule, at k = the first size's FFN
    width and at each --keep share of the parent's;
  - "random k/F": the same count in every layer, drawn at random (--random-draws draws): the control that
    the activation rule must beat;
  - "layers a-b": the activation rule at the first size's width in layers a..b only, the other layers whole
    (--bands contiguous bands): which layers the loss comes from;
  - "global": as many units as the cascade's child keeps, the top scores pooled over all layers;
  - with --contribution, "contribution k/F" at the same widths (and on every further draw): each unit
    scored by mean |a_j| * ||W2[:, j]||, the mean norm of what unit j writes into the residual stream, where
    the paper's rule reads the activation a_j alone and ignores how large its output column is
    (prune.ffn_contribution; the cascade's --ffn-score contribution);
  - with --calib-draws n, the activation rows (and each file's own, below) again on n-1 further draws of
    the same calibration text, other sequences of it: how far the task scores move with the draw alone;
  - with --sources a.jsonl,b.jsonl, the activation rule on each file's own calibration sequences, and two
    ways to keep what every file exercises: "max" ranks units by the largest of their per-file scores, each
    divided by its layer's mean; "rank union" by the best of their per-file ranks in the layer.

A unit is removed by zeroing its down_proj column, which leaves the outputs prune.prune_ffn's surgery gives
(checked here against prune.prune on the cascade's own variant before anything is scored). Every variant
gets held-out CE and KL to the parent as in the cascade's table, and the held-out task families of
experiments/real_parent.py.

Run (after `python model.py fetch smollm2`):
  python experiments/ffn_probe.py --parent smollm2 --preset cpu-real --size 14b \\
      --chat-data benchmarks/smollm2/mix/chat_mix.jsonl --chat-share 0.5 --out runs/ffn-probe --results R
"""

import copy
import dataclasses
import os
import sys
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the mechanism files

import cascade as C  # noqa: E402
import distill as DI  # noqa: E402
from experiments import chat_mix as X  # noqa: E402
from experiments import real_parent as R  # noqa: E402
import model as M  # noqa: E402
import prune as P  # noqa: E402
import train as TR  # noqa: E402


@dataclass
class ProbeConfig:
    keep: str = "0.75"  # further shares of the parent's FFN units kept by the activation rule (comma-separated)
    random_draws: int = 2  # random variants at the first size's width, one seed each
    bands: int = 3  # contiguous bands of layers, each pruned alone (0 = none)
    sources: str = ""  # chat/text jsonl files scored one by one, then combined (comma-separated; "" = none)
    calib_draws: int = 1  # calibration draws per text (seeds seed, seed+1, ...): the activation rows' spread
    contribution: bool = False  # also rank units by mean |a_j| * ||W2[:, j]|| (the norm of their residual write)


def _top(scores_LF: torch.Tensor, k_l: int, layers=None) -> torch.Tensor:
    """[L, F] keep mask: the top k_l units by score in each of `layers` (default all), the others whole."""
    L, F = scores_LF.shape
    keep = torch.ones(L, F, dtype=torch.bool)
    for i in range(L) if layers is None else layers:
        keep[i] = False
        keep[i, scores_LF[i].topk(k_l).indices] = True
    return keep


def tops(prefix: str, scores_LF: torch.Tensor, ks: list, suffix: str = "") -> dict:
    """{"<prefix> k/F<suffix>": keep mask}: each layer's top k units, for each width k in ks."""
    return {f"{prefix} {k}/{scores_LF.shape[1]}{suffix}": _top(scores_LF, k) for k in ks}


def widths(k: int, F: int, pcfg: ProbeConfig) -> list:
    """The first size's FFN width k, then each --keep share of F."""
    out = [k]
    for share in (float(s) for s in pcfg.keep.split(",") if s.strip()):
        if not 0 < share <= 1:
            raise ValueError(f"--keep {pcfg.keep}: each share must be in (0, 1]")
        out.append(round(share * F))
    return out


def variants(scores_LF: torch.Tensor, k: int, pcfg: ProbeConfig) -> dict:
    """{name: [L, F] bool keep mask}: the variants above, from the parent's FFN scores."""
    L, F = scores_LF.shape
    out = tops("activation", scores_LF, widths(k, F, pcfg))
    for seed in range(pcfg.random_draws):
        g = torch.Generator().manual_seed(seed)
        keep = torch.zeros(L, F, dtype=torch.bool)
        for i in range(L):
            keep[i, torch.randperm(F, generator=g)[:k]] = True
        out[f"random {k}/{F} (seed {seed})"] = keep
    edges = [round(b * L / pcfg.bands) for b in range(pcfg.bands + 1)] if pcfg.bands else []
    for a, b in zip(edges, edges[1:]):
        out[f"layers {a}-{b - 1} at {k}/{F}"] = _top(scores_LF, k, range(a, b))
    flat = torch.zeros(L * F, dtype=torch.bool)
    flat[scores_LF.flatten().topk(k * L).indices] = True
    out[f"global top {k * L}"] = flat.view(L, F)
    return out


def combined(per_source: dict, k: int, pcfg: ProbeConfig) -> dict:
    """{name: [L, F] keep mask} from per-file scores {file: [L, F]}: each file's own top units, and the
    units that matter to any file, by the max of layer-normalised scores and by the best per-file rank."""
    stack_SLF = torch.stack(list(per_source.values()))
    ks = widths(k, stack_SLF.shape[2], pcfg)
    out = {}
    for name, s_LF in per_source.items():
        out.update(tops(f"{name} only", s_LF, ks))
    normed = (stack_SLF / stack_SLF.mean(dim=2, keepdim=True)).amax(0)
    rank_SLF = stack_SLF.argsort(dim=2, descending=True).argsort(dim=2).float()  # 0 = the layer's top unit
    best_rank = rank_SLF.amin(0) + rank_SLF.mean(0) / (rank_SLF.shape[2] + 1)  # ties: the better mean rank
    for k_l in ks:
        out[f"max {k_l}/{stack_SLF.shape[2]}"] = _top(normed, k_l)
        out[f"rank union {k_l}/{stack_SLF.shape[2]}"] = _top(-best_rank, k_l)
    return out


@torch.no_grad()
def masked(model, keep_LF: torch.Tensor):
    """A copy of `model` whose FFN units outside keep_LF contribute nothing (their down_proj columns zeroed)."""
    m = copy.deepcopy(model)
    for layer, keep_F in zip(m.layers, keep_LF):
        layer.mlp.down_proj.weight[:, ~keep_F.to(layer.mlp.down_proj.weight.device)] = 0
    return m


def run_probe(cfg: C.CascadeConfig, pcfg: ProbeConfig, tcfg: R.TaskConfig) -> dict:
    if cfg.parent is None:
        raise ValueError("this probe prunes a real parent: give --parent PATH (or smollm2)")
    if pcfg.calib_draws < 1:
        raise ValueError(f"--calib-draws {pcfg.calib_draws}: give 1 (the cascade's own draw) or more")
    for flag, n in (("--random-draws", pcfg.random_draws), ("--bands", pcfg.bands)):
        if n < 0:
            raise ValueError(f"{flag} {n} is negative: give 0 (no such variants) or more")
    paths = pcfg.sources.split(",") if pcfg.sources else []
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--sources {path!r} is not a file: give .jsonl files of chats or texts, comma-separated")
    rank, world, _, device = TR.setup_distributed()
    if world != 1:
        raise ValueError("the FFN probe runs in one process: start it with python, not torchrun")
    clock = TR.run_clock()
    cfg, preset = C.resolved(cfg, world)
    ctx, plan = C.prepare(cfg, preset, rank, world, device)
    stages = TR.Stages(cfg.out)
    parent_path = C.stage_parent(cfg, ctx, stages, plan)
    parent = M.load_model(parent_path, device=device).eval()
    target = plan.sizes[0][1]
    if (target.n_layers, target.dim) != (parent.args.n_layers, parent.args.dim):
        raise ValueError(f"the first size ({plan.sizes[0][0]}) also cuts layers or the hidden dim; this probe "
                         f"varies the FFN alone: choose a cascade whose first size only narrows the FFN")
    calib = [b.to(device) for b in C.calibration(cfg, ctx)]

    def scores(draw: int = 0, calib_data=None) -> torch.Tensor:
        """[L, F] FFN scores on calibration draw `draw` of calib_data (default: the cascade's own text)."""
        c = dataclasses.replace(cfg, seed=cfg.seed + draw, calib_data=calib_data or cfg.calib_data)
        batches = calib if c == cfg else [b.to(device) for b in C.calibration(c, ctx)]
        stats = P.collect_stats(parent, batches, P.PruneConfig(seed=cfg.seed), hidden=False, ffn=True)
        return stats.ffn_scores.float().cpu()

    first = scores()
    masks = variants(first, target.hidden_dim, pcfg)
    ks = widths(target.hidden_dim, parent.args.hidden_dim, pcfg)
    if pcfg.contribution:
        masks.update(tops("contribution", P.ffn_contribution(parent, first), ks))
    for draw in range(1, pcfg.calib_draws):
        s_LF = scores(draw)
        masks.update(tops("activation", s_LF, ks, f" (draw {draw})"))
        if pcfg.contribution:
            masks.update(tops("contribution", P.ffn_contribution(parent, s_LF), ks, f" (draw {draw})"))
    if paths:
        masks.update(combined({os.path.basename(p): scores(0, p) for p in paths}, target.hidden_dim, pcfg))
    for draw in range(1, pcfg.calib_draws):
        for p in paths:
            masks.update(tops(f"{os.path.basename(p)} only", scores(draw, p), ks, f" (draw {draw})"))

    # The masked copy must be the pruned child: same units (prune.select_ffn_units), same outputs.
    ours = next(iter(masks.values()))
    child, report = P.prune(copy.deepcopy(parent), target, calib, P.PruneConfig(seed=cfg.seed))
    kept_LF = torch.zeros_like(ours).scatter_(1, report["ffn"]["kept"], True)
    if not torch.equal(kept_LF, ours):
        raise RuntimeError("internal error: the activation variant keeps other units than prune.prune")
    with torch.no_grad():
        x = calib[0][:2]
        gap = float((masked(parent, ours)(x) - child(x)).abs().max())
    if gap > 1e-3:
        raise RuntimeError(f"internal error: zeroed units differ from pruned ones by {gap:.2e} in the logits")
    del child

    tasks = X.heldout_tasks(tcfg.math_problems, tcfg.math_seed)
    new_tokens = {"sums": tcfg.math_new_tokens, **R.FAMILY_TOKENS}
    held = C.loader(ctx, ctx.test_tokens, cfg, cfg.seq_len, seed=1234)
    D, L, F = parent.args.dim, parent.args.n_layers, parent.args.hidden_dim
    rows = []
    for name, keep_LF in {"parent": torch.ones(L, F, dtype=torch.bool), **masks}.items():
        TR.print0(f"== {name}")
        model = parent if name == "parent" else masked(parent, keep_LF)
        ev = DI.evaluate_pair(model, parent, held, cfg.eval_batches)
        scored = R.score_tasks(model, ctx.tok, tasks, new_tokens)
        rows.append({"stage": name, "units": int(keep_LF.sum()), "units_share": float(keep_LF.float().mean()),
                     "params": M.num_params(parent.args) - 3 * D * int((~keep_LF).sum()), "ce": ev["ce"],
                     "kl": ev["kl"], "eval_tokens": ev["tokens"], "per_layer": keep_LF.sum(1).tolist(), **scored})
        del model
    run = clock()
    write_record(cfg, tcfg, rows, plan, ctx, run, logit_gap=gap)
    return {"rows": rows, "run": run}


def write_record(cfg, tcfg, rows, plan, ctx, run, logit_gap: float):
    out, record = tcfg.results or os.path.join(cfg.out, "results"), TR.run_record(**run)
    vocab = plan.parent_args.vocab_size
    lines = ["| variant | FFN units kept | parameters | held-out CE | KL to parent | kept |"
             + "".join(f" {f} |" for f in X.HELDOUT), "|---|---:|---:|---:|---:|---:|" + "---:|" * len(X.HELDOUT)]
    for r in rows:
        lines.append(f"| {r['stage']} | {r['units']:,} ({100 * r['units_share']:.0f}%) | {r['params']:,} | "
                     f"{r['ce']:.3f} | {r['kl']:.3f} | {100 * C.retention(r['ce'], rows[0]['ce'], vocab):.1f}% |"
                     + "".join(f" {R.family_cell(f, rows[0])(r)} |" for f in X.HELDOUT))
    first = plan.sizes[0][0]
    notes = [f"One-shot FFN pruning of the parent, no distillation. 'activation k/F' keeps each layer's top k units by "
             f"mean |silu(W1 x) * (W3 x)| on the cascade's calibration sequences (prune.select_ffn_units; the first "
             f"row at k is the cascade's own '{first} pruned' child, and zeroing its units matched prune.prune's "
             f"surgery to {logit_gap:.1e} in the logits); 'random' keeps k random units per layer; 'layers a-b' "
             f"prunes those layers alone; 'global' pools the scores of all layers; 'contribution k/F' ranks units by "
             f"mean |a_j| * ||W2[:, j]||, the mean norm of their write to the residual. 'draw n' rows use other "
             f"calibration sequences of the same text (seed + n). Parameters count the units kept.",
             f"CE and KL are on the test half of the held-out text at {cfg.seq_len} tokens ({rows[0]['eval_tokens']:,} "
             f"tokens), as in the cascade's table; kept = (ln V - CE) / (ln V - CE_parent). The task families are "
             f"experiments/real_parent.py's ({tcfg.math_problems} sums, seed {tcfg.math_seed}).",
             *([f"Calibration data: the cascade's training tokens, {100 * ctx.heldout['chat_share']:.1f}% of them the "
                f"chats of --chat-data {cfg.chat_data}."] if ctx.heldout.get("chat_tokens") else []),
             f"{TR.run_line(record)}: {run['seconds']:.0f} s wall, {run['cpu_seconds']:.0f} s CPU. Command: `{record['command']}`."]
    table = "\n".join(lines)
    samples = R.samples_text(rows)
    TR.write_text_atomic(os.path.join(out, "table.md"), "\n\n".join(["# FFN pruning probe", table, *notes])
                         + f"\n\n## Sample answers (greedy, {R.SAMPLE_TOKENS} tokens)\n\n" + samples)
    TR.write_json_atomic(os.path.join(out, "table.json"), {"rows": rows, "run": record, "heldout": ctx.heldout})
    print("\n" + table + "\n\n" + "\n\n".join(notes), flush=True)


def main(argv=None):
    cfg, pcfg, tcfg = C.parse_args(argv, ProbeConfig, R.TaskConfig)
    code = TR.run_main(lambda: run_probe(cfg, pcfg, tcfg) and 0, expected=(ValueError, FileNotFoundError,
                                                                           M.CheckpointError))
    sys.exit(2 if code else 0)


if __name__ == "__main__":
    main()
