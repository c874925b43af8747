"""GRPO in miniature: SFT the embedded cascade's smallest child on easy arithmetic with [THINK] traces
(sft.py), then GRPO (grpo.py, Magistral's recipe), scored greedy on held-out questions that occur in
neither SFT nor GRPO, with the paired sign test of the flips.

Run: `python experiments/grpo_demo.py` (after `python cascade.py`, or --child PATH; rerun = resume);
`python experiments/grpo_demo.py --policy smollm2 --no-format-gate --out runs/grpo_smollm2 --record
benchmarks/grpo_smollm2` (GRPO on the real model, no SFT); `--retable benchmarks/grpo/results.json`
rewrites a record's table.
"""

import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the mechanism files

import data as D  # noqa: E402
import grpo as G  # noqa: E402
import model as M  # noqa: E402
import sft as S  # noqa: E402
import train as TR  # noqa: E402
from experiments import plots  # noqa: E402
from experiments.stats import paired_flips  # noqa: E402


@dataclass
class DemoConfig:
    child: Optional[str] = None  # base model; None = the cascade's smallest child under runs/cascade
    policy: Optional[str] = None  # start GRPO from this policy instead (folder, .gguf or "smollm2"): no SFT
    retable: Optional[str] = None  # only rewrite table.md beside this results.json (a recorded run) and exit
    max_operand: int = 49  # difficulty: "What is a op b?" with 0 <= a, b <= max_operand (2,500 sums; start ~80%)
    ops: str = "+"  # operations of the problems (with "-" too the child stays near 9% and GRPO gains nothing)
    sft_problems: int = 4000  # SFT conversations ([THINK] a op b = c.[/THINK] c)
    sft_steps: int = 600  # SFT optimizer steps (the start must leave room: 10-90% held-out)
    sft_lr: float = 3e-3  # SFT peak learning rate
    grpo_problems: int = 2000  # GRPO prompt pool (questions not in the held-out set)
    eval_problems: int = 800  # held-out problems, none of whose questions occur in SFT or GRPO (at most 1/3 of all)
    record: Optional[str] = None  # also copy results.json, table.md and curves.png here (benchmarks/grpo)


CASCADE_CHILDREN = ("runs/cascade/3b/short/model", "runs/cascade/3b/long/model")


def demo_problems(dcfg: DemoConfig) -> dict:
    """Train and held-out splits with disjoint questions (the held-out gain must be on unseen problems)."""
    pool = D.easy_math_problems(dcfg.sft_problems + dcfg.grpo_problems + 20 * dcfg.eval_problems, seed=0,
                                max_operand=dcfg.max_operand, ops=dcfg.ops)
    n_held = min(len({p["question"] for p in pool}) // 3, dcfg.eval_problems)
    train_pool, held = D.split_by_question(pool, n_held, seed=0)
    return {"sft": train_pool[:dcfg.sft_problems], "grpo": train_pool[dcfg.sft_problems:][:dcfg.grpo_problems],
            "held": held}


def split_overlap(splits: dict) -> dict:
    """Distinct questions per split and how many held-out questions occur in SFT or GRPO (must be 0)."""
    q = {k: {p["question"] for p in v} for k, v in splits.items()}
    return {"distinct_questions": {k: len(v) for k, v in q.items()},
            "held_in_sft": len(q["held"] & q["sft"]), "held_in_grpo": len(q["held"] & q["grpo"])}


def plot_curves(stats: list[dict], evals: list[dict], path: str):
    fig, axes = plots.figure(3, 14, 4)
    steps = [s["step"] for s in stats]
    axes[0].plot(steps, [s["mean_reward"] for s in stats], label="mean reward (rollouts)")
    axes[0].plot(steps, [s["accuracy"] for s in stats], label="accuracy (rollouts, T=1)")
    axes[0].plot([e["step"] for e in evals], [e["eval"]["accuracy"] for e in evals], "o-", label="held-out accuracy (greedy)")
    axes[1].plot(steps, [s["format_rate"] for s in stats], label="format rate")
    axes[1].plot(steps, [s["zero_variance_groups"] for s in stats], label="zero-variance groups")
    axes[1].plot(steps, [s["truncation_rate"] for s in stats], label="truncation rate")
    axes[2].plot(steps, [s["mean_length"] for s in stats], label="mean length (rollouts)")
    axes[2].plot([e["step"] for e in evals], [e["eval"]["mean_length"] for e in evals], "o-", label="mean length (held-out)")
    axes[2].set_ylabel("new tokens")
    for ax in axes:
        ax.set_xlabel("GRPO step")
        ax.legend(fontsize=8)
    plots.save(fig, path)


def render_table(out: dict) -> list[str]:
    """table.md's lines from a results.json (`--retable PATH` rewrites one from its record)."""
    stats, start = out["rollouts"], "GRPO start: " + ("SFT-ed child" if out["config"]["demo"].get("policy") is None
                                                    else "the policy as given, no SFT")
    table = ["| held-out (greedy) | accuracy | format rate | mean length | truncation |", "|---|---:|---:|---:|---:|"]
    for label, e in ((start, out["held_out_before"]), ("after GRPO", out["held_out_after"])):
        table.append(f"| {label} | {e['accuracy']:.1%} | {e['format_rate']:.1%} | {e['mean_length']:.1f} | "
                     f"{e['truncation_rate']:.1%} |")
    p = out["held_out_paired"]
    table.append(f"\nSame {out['held_out_after']['n']} held-out problems before and after: {p['wrong_to_right']} went "
                 f"wrong -> right, {p['right_to_wrong']} right -> wrong (two-sided sign test p = {p['sign_test_p']:.3g}).")
    k = max(1, min(10, len(stats) // 2))
    mean = lambda rows, key: sum(r[key] for r in rows) / len(rows)
    table.append(f"\nTraining rollouts (T = {out['config']['grpo']['temperature']}), first {k} steps -> last {k}: mean "
                 f"reward {mean(stats[:k], 'mean_reward'):.3f} -> {mean(stats[-k:], 'mean_reward'):.3f}, accuracy "
                 f"{mean(stats[:k], 'accuracy'):.1%} -> {mean(stats[-k:], 'accuracy'):.1%}, zero-variance groups "
                 f"{mean(stats[:k], 'zero_variance_groups'):.1%} -> {mean(stats[-k:], 'zero_variance_groups'):.1%}, "
                 f"truncation {mean(stats[:k], 'truncation_rate'):.1%} -> {mean(stats[-k:], 'truncation_rate'):.1%}, "
                 f"mean length {mean(stats[:k], 'mean_length'):.1f} -> {mean(stats[-k:], 'mean_length'):.1f}.")
    return table


def demo(tcfg: TR.TrainConfig, gcfg: G.GRPOConfig, dcfg: DemoConfig) -> dict:
    t0, c0 = time.time(), time.process_time()
    root = tcfg.out_dir  # sft/, grpo/ and the results go here (rerun = resume)
    os.makedirs(root, exist_ok=True)
    splits = demo_problems(dcfg)
    log = lambda msg: print(f"[grpo demo] {msg}", flush=True)
    if dcfg.policy is not None:  # a ready policy (e.g. SmolLM2 from its GGUF): no SFT
        child = M.resolve_model_path(dcfg.policy)
        model = M.load_model(child, dtype=torch.float32)
        tok = D.checkpoint_tokenizer(child, model.args.vocab_size)
    else:
        child = dcfg.child or next((c for c in CASCADE_CHILDREN if os.path.isdir(c)), None)
        if child is None or not os.path.isdir(child):
            raise FileNotFoundError(f"no base model: run `python cascade.py` first (it writes {CASCADE_CHILDREN[0]}) "
                                    f"or pass --child PATH (or --policy PATH to skip SFT)")
        V = M.read_checkpoint_args(child)[0].vocab_size
        tok = D.Tokenizer.from_file(D.tekken_with_think(D.default_tekken_path(), os.path.join(root, "tekken.json"), V),
                                    vocab_size=V)
        # 1. SFT (sft.py) on reasoning chats: [THINK] the worked step [/THINK] the number
        sft_dir = os.path.join(root, "sft")
        if not os.path.exists(os.path.join(sft_dir, "done.json")):
            convs = [[{"role": "user", "content": p["question"]},
                      {"role": "assistant", "content": p["answer"], "thinking": D.math_trace(p["question"], p["answer"])}]
                     for p in splits["sft"]]
            seq = max(len(tok.encode_chat(c)[0]) for c in convs) - 1
            scfg = TR.TrainConfig(out_dir=sft_dir, steps=dcfg.sft_steps, batch_size=32, micro_batch_size=32, seq_len=seq,
                               lr=dcfg.sft_lr, warmup_steps=max(1, dcfg.sft_steps // 10), dtype="fp32", log_every=10,
                               resume=True, export=True)
            log(f"SFT {child} on {len(convs)} reasoning chats for {dcfg.sft_steps} steps")
            model = M.load_model(child, dtype=torch.float32)
            S.run_sft(model, convs, tok, scfg, S.SFTConfig(), device="cpu", name="sft")
            TR.write_json_atomic(os.path.join(sft_dir, "done.json"), {"child": child, "steps": dcfg.sft_steps})
        # 2. GRPO from the SFT-ed model
        model = M.load_model(os.path.join(sft_dir, "model"), dtype=torch.float32)
    gdir = os.path.join(root, "grpo")
    tcfg = dataclasses.replace(tcfg, out_dir=gdir, resume=True)
    log(f"GRPO: {tcfg.steps} steps x {tcfg.batch_size // gcfg.group_size} prompts x G={gcfg.group_size}; "
        f"held-out {len(splits['held'])} problems")
    res = G.run_grpo(model, tok, splits["grpo"], gcfg, tcfg, device="cpu", eval_problems=splits["held"])
    stats = [json.loads(l) for l in open(os.path.join(gdir, "rollouts.jsonl"))]
    evals = [{"step": 0, "eval": res["start"]}] + [e for e in res["evals"]]
    out = {"what": "GRPO demo: GRPO (Magistral recipe) on easy arithmetic from the SFT-ed smallest cascade child",
           **TR.run_record(), "wall_s": time.time() - t0, "process_cpu_s": time.process_time() - c0,
           "note": "wall time on a shared machine (other jobs running): process CPU time beside it; a resumed run "
                   "counts only its own part",
           "child": child, "splits": {k: len(v) for k, v in splits.items()}, "split_overlap": split_overlap(splits),
           "config": {"grpo": dataclasses.asdict(gcfg), "train": dataclasses.asdict(tcfg), "demo": dataclasses.asdict(dcfg)},
           "held_out_before": res["start"], "held_out_after": res["end"], "evals": evals,
           "rollouts": stats, "reward_errors": res["reward_errors"],
           "held_out_paired": paired_flips(res["start"]["correct"], res["end"]["correct"])}
    TR.write_json_atomic(os.path.join(root, "results.json"), out)
    plot_curves(stats, evals, os.path.join(root, "curves.png"))
    table = render_table(out)
    with open(os.path.join(root, "table.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    if dcfg.record:
        os.makedirs(dcfg.record, exist_ok=True)
        TR.write_json_atomic(os.path.join(dcfg.record, "results.json"), out)
        for name in ("curves.png", "table.md"):
            with open(os.path.join(root, name), "rb") as src, open(os.path.join(dcfg.record, name), "wb") as dst:
                dst.write(src.read())
    print("\n".join(table))
    return out



@dataclass
class DemoTrainConfig(G.GRPOTrainConfig):
    """grpo.py's training flags; out_dir is the demo's root folder (sft/, grpo/, results)."""
    out_dir: str = dataclasses.field(default="runs/grpo", metadata={"flags": ("--out",)})


def main(argv=None) -> int:
    tcfg, gcfg, dcfg = TR.configs_from_args([DemoTrainConfig, G.GRPOConfig, DemoConfig], argv,
                                         description="The GRPO demo: SFT then GRPO on easy arithmetic (PAPER.md section 8).")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    print(json.dumps({"train": dataclasses.asdict(tcfg), "grpo": dataclasses.asdict(gcfg),
                      "demo": dataclasses.asdict(dcfg)}), flush=True)
    try:
        if dcfg.retable:
            lines = render_table(json.load(open(dcfg.retable)))
            with open(os.path.join(os.path.dirname(dcfg.retable), "table.md"), "w") as f:
                f.write("\n".join(lines) + "\n")
            print("\n".join(lines))
            return 0
        G.check_config(gcfg)
        demo(tcfg, gcfg, dcfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
