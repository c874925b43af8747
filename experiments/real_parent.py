"""A real pretrained parent's cascade, scored on held-out tasks as well as on held-out text.

`python cascade.py --parent smollm2 --preset cpu-real` gives the retention table (held-out CE, KL, kept);
this experiment runs the same cascade, then asks every model that matters (the parent, each size's pruned
and base child) the held-out task families of experiments/chat_mix.py through the parent's chat template
and scores the greedy answers: one-digit sums, the same sums in number words, and capitals, each child's
score also as a share of the parent's; three fixed sample prompts are shown as answered. No training data
holds a question of these families. Each model's scores are cached in <stage>/tasks.json under the
settings they depend on.

Run (after `python model.py fetch smollm2`), on the corpus alone, then with the parent's own chats:
  python experiments/real_parent.py --parent smollm2 --preset cpu-real --out runs/smollm2 --results R
  python experiments/chat_mix.py --parent smollm2 --out runs/chat_mix.jsonl --prompts 900
  python experiments/real_parent.py --parent smollm2 --preset cpu-real --chat-data runs/chat_mix.jsonl \
      --chat-share 0.5 --out runs/smollm2-mix --results R
"""

import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the mechanism files

import cascade as C  # noqa: E402
from experiments import chat_mix as X  # noqa: E402
import model as M  # noqa: E402
import train as TR  # noqa: E402

SAMPLE_PROMPTS = ("What is the capital of France?", "What is 7 + 5?",
                  "Write a Python function that returns the square of a number.")
SAMPLE_TOKENS = 32


FAMILY_TOKENS = {"word sums": 24, "capitals": 16}  # greedy tokens per answer beyond the sums' own setting


@dataclass
class TaskConfig:
    math_problems: int = 200  # held-out one-digit sums asked of every scored model
    math_seed: int = 1000  # held out: the post-training experiments draw their problems from small seeds
    math_new_tokens: int = 12  # greedy tokens per sum ("7 + 5 = 12" is 8 tokens with digits split)
    results: Optional[str] = None  # where the table goes; None = <out>/results


def stage_tasks(tcfg: TaskConfig, stages, name: str, path: str, tok) -> dict:
    """Exact-answer accuracy per held-out family (chat_mix.HELDOUT: one-digit sums, the same sums in
    number words, capitals) and the sample prompts' answers, greedy through the chat template; cached in
    <stage>/tasks.json (other settings recompute it)."""
    cache = os.path.join(stages.dir(name), "tasks.json")
    new_tokens = {"sums": tcfg.math_new_tokens, **FAMILY_TOKENS}
    tasks = X.heldout_tasks(tcfg.math_problems, tcfg.math_seed)
    questions = hashlib.sha256(json.dumps({f: [p["question"] for p in ps] for f, ps in tasks.items()}).encode())
    want = {"math_total": tcfg.math_problems, "math_seed": tcfg.math_seed, "new_tokens": new_tokens,
            "questions": questions.hexdigest()[:16]}
    if os.path.exists(cache):
        with open(cache) as f:
            cached = json.load(f)
        if all(cached.get(k) == v for k, v in want.items()):
            return cached
    result = want | score_tasks(X.load_for_answers(path), tok, tasks, new_tokens)
    TR.write_json_atomic(cache, result)
    return result


def score_tasks(model, tok, tasks: dict, new_tokens: dict) -> dict:
    """{"families": {family: correct, total, the first 8 examples}, "samples": the fixed prompts' answers,
    "wall_s", "cpu_s"}: one model's greedy answers to `tasks` (chat_mix.heldout_tasks), scored."""
    t0, c0 = time.time(), TR.cpu_seconds()
    families = {}
    for family, probs in tasks.items():
        texts = [a for a, _ in X.greedy_answers(model, tok, [p["question"] for p in probs], new_tokens[family])]
        correct = [p["check"](t, p["answer"]) for t, p in zip(texts, probs)]
        families[family] = {"correct": sum(correct), "total": len(probs),
                            "examples": [{"question": p["question"], "answer": p["answer"], "output": t, "correct": c}
                                         for p, t, c in list(zip(probs, texts, correct))[:8]]}
    samples = X.greedy_answers(model, tok, list(SAMPLE_PROMPTS), SAMPLE_TOKENS)
    return {"families": families, "samples": [{"prompt": q, "output": a} for q, (a, _) in zip(SAMPLE_PROMPTS, samples)],
            "wall_s": time.time() - t0, "cpu_s": TR.cpu_seconds() - c0}


def family_cell(family: str, parent: dict):
    """A table cell: correct/total, and for a child the share of the parent's correct answers."""
    def cell(r):
        if "families" not in r:
            return ""
        got, base = r["families"][family], parent["families"][family]["correct"]
        share = "" if r is parent else f" ({100 * got['correct'] / base:.0f}% of parent)" if base else " (parent 0)"
        return f"{got['correct']}/{got['total']}{share}"
    return cell


def samples_text(rows: list) -> str:
    """The fixed prompts' greedy answers, model by model."""
    out = []
    for q_i, prompt in enumerate(SAMPLE_PROMPTS):
        out += [f"**{prompt}**", ""]
        for r in rows:
            if "samples" in r:
                answer = r["samples"][q_i]["output"].replace("\n", " ").replace("|", "\\|").strip()
                out.append(f"- {r['stage']}: {answer}")
        out.append("")
    return "\n".join(out)


def run_real_parent(cfg: C.CascadeConfig, tcfg: TaskConfig) -> dict:
    if cfg.parent is None:
        raise ValueError("this experiment scores a real parent's children: give --parent PATH (or smollm2)")
    if tcfg.math_problems < 1 or tcfg.math_new_tokens < 1:
        raise ValueError(f"--math-problems {tcfg.math_problems} and --math-new-tokens {tcfg.math_new_tokens} must "
                         f"be at least 1")
    clock = TR.run_clock()
    cascade = C.run_cascade(cfg)
    cfg, ctx, stages, plan = cascade["cfg"], cascade["ctx"], cascade["stages"], cascade["plan"]
    rows = [r | stage_tasks(tcfg, stages, r["dir"], r["path"], ctx.tok) if not r["stage"].endswith(" short") else r
            for r in cascade["rows"]]  # the short children are not scored (CPU time)
    run = clock()
    columns = tuple((family, family_cell(family, rows[0])) for family in X.HELDOUT)
    # with --chat-data, write_table's own note says which share of the training tokens were chats
    data = "" if cfg.chat_data else " The children distilled on the Python corpus alone."
    note = (f"Held-out families, greedy answers through the chat template: sums = {tcfg.math_problems} one-digit "
            f"sums (data.math_problems level 'easy', seed {tcfg.math_seed}, checked by data.check_math_answer); "
            f"word sums = the 81 sums of two numbers from one to nine in words (\"What is the sum of three and "
            f"four?\", the answer's last number in digits or words); capitals = {len(X.CAPITALS)} \"What is the "
            f"capital of ...?\" (the city named in the answer). No training data holds a question of these "
            f"families: chat_mix.heldout_family drops every chat that touches one.{data} A child's share is its "
            f"correct answers over the parent's; the short children are not scored.")
    out = tcfg.results or os.path.join(cfg.out, "results")
    C.write_table(cfg, rows, plan, ctx, run, out=out, columns=columns, notes=(note,),
                  tail=f"\n## Sample answers (greedy, {SAMPLE_TOKENS} tokens)\n\n" + samples_text(rows))
    return {"rows": rows, "run": run}


def main(argv=None):
    cfg, tcfg = C.parse_args(argv, TaskConfig)
    code = TR.run_main(lambda: run_real_parent(cfg, tcfg) and 0, expected=(ValueError, FileNotFoundError,
                                                                             M.CheckpointError))
    sys.exit(2 if code else 0)


if __name__ == "__main__":
    main()
