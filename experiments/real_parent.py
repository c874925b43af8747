"""A real pretrained parent's cascade, scored on tasks as well as on held-out text.

`python cascade.py --parent smollm2 --preset cpu-real` gives the retention table (held-out CE, KL, kept);
this experiment runs the same cascade, then asks every model that matters (the parent, each size's pruned
and base child) held-out questions through the parent's chat template and scores the greedy answers by
exact match: one-digit sums (data.math_problems, level "easy", from a seed no training split draws), and
three fixed sample prompts shown in the record as answered. Each model's scores are cached in
<stage>/tasks.json under the settings they depend on.

Run: `python experiments/real_parent.py --parent smollm2 --preset cpu-real --out runs/smollm2 --results
benchmarks/smollm2` (after `python model.py fetch smollm2`).
"""

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the mechanism files

import cascade as C  # noqa: E402
import data as D  # noqa: E402
import model as M  # noqa: E402
import train as TR  # noqa: E402

SAMPLE_PROMPTS = ("What is the capital of France?", "What is 7 + 5?",
                  "Write a Python function that returns the square of a number.")
SAMPLE_TOKENS = 32


@dataclass
class TaskConfig:
    math_problems: int = 200  # held-out one-digit sums asked of every scored model
    math_level: str = "easy"  # data.math_problems level
    math_seed: int = 1000  # held out: the post-training experiments draw their problems from small seeds
    math_new_tokens: int = 12  # greedy tokens per answer ("7 + 5 = 12" is 8 tokens with digits split)
    results: Optional[str] = None  # where the table goes; None = <out>/results


def stage_tasks(tcfg: TaskConfig, stages, name: str, path: str, tok) -> dict:
    """Exact-answer accuracy on the held-out problems and the sample prompts' answers, greedy through
    the chat template; cached in <stage>/tasks.json (other settings recompute it)."""
    cache = os.path.join(stages.dir(name), "tasks.json")
    want = {"math_total": tcfg.math_problems, "math_level": tcfg.math_level, "math_seed": tcfg.math_seed,
            "math_new_tokens": tcfg.math_new_tokens}
    if os.path.exists(cache):
        with open(cache) as f:
            cached = json.load(f)
        if all(cached.get(k) == v for k, v in want.items()):
            return cached
    t0, c0 = time.time(), time.process_time()
    model = M.load_model(path).eval()
    probs = D.math_problems(tcfg.math_problems, seed=tcfg.math_seed, level=tcfg.math_level)
    prompts = [tok.encode_chat([{"role": "user", "content": p["question"]}])[0] for p in probs]
    answers = []
    for i in range(0, len(prompts), 200):  # bounded batches: the KV cache grows with the batch
        answers += M.generate(model, prompts[i:i + 200], tcfg.math_new_tokens, eos_id=tok.eos_id)
    texts = [tok.decode(a) for a in answers]
    correct = [D.check_math_answer(t, p["answer"]) for t, p in zip(texts, probs)]
    samples = M.generate(model, [tok.encode_chat([{"role": "user", "content": q}])[0] for q in SAMPLE_PROMPTS],
                         SAMPLE_TOKENS, eos_id=tok.eos_id)
    result = {**want, "math_correct": sum(correct), "math_total": len(probs), "math_accuracy": sum(correct) / len(probs),
              "math_examples": [{"question": p["question"], "answer": p["answer"], "output": t}
                                for p, t in list(zip(probs, texts))[:5]],
              "samples": [{"prompt": q, "output": tok.decode(a)} for q, a in zip(SAMPLE_PROMPTS, samples)],
              "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
    TR.write_json_atomic(cache, result)
    return result


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
    t0, c0, load0 = time.time(), TR.cpu_seconds(), os.getloadavg()[0]
    cascade = C.run_cascade(cfg)
    cfg, ctx, stages, plan = cascade["cfg"], cascade["ctx"], cascade["stages"], cascade["plan"]
    rows = [r | stage_tasks(tcfg, stages, r["dir"], r["path"], ctx.tok) if not r["stage"].endswith(" short") else r
            for r in cascade["rows"]]  # the short children are not scored (CPU time)
    run = {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(TR.cpu_seconds() - c0, 1),
           "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2)}
    column = ("math exact", lambda r: f"{r['math_correct']}/{r['math_total']} ({100 * r['math_accuracy']:.0f}%)"
              if "math_total" in r else "")
    note = (f"math exact: greedy answers to {tcfg.math_problems} held-out data.math_problems (level "
            f"{tcfg.math_level!r}, seed {tcfg.math_seed}) asked through the chat template, checked by "
            f"data.check_math_answer; the short children are not scored (CPU time).")
    out = tcfg.results or os.path.join(cfg.out, "results")
    C.write_table(cfg, rows, plan, ctx, run, out=out, columns=(column,), notes=(note,))
    with open(os.path.join(out, "table.md"), "a") as f:
        f.write(f"\n## Sample answers (greedy, {SAMPLE_TOKENS} tokens)\n\n" + samples_text(rows))
    return {"rows": rows, "run": run}


def main(argv=None):
    cfg, tcfg = C.parse_args(argv, TaskConfig)
    code = TR.run_main(lambda: run_real_parent(cfg, tcfg) and 0, expected=(ValueError, FileNotFoundError,
                                                                             M.CheckpointError))
    sys.exit(2 if code else 0)


if __name__ == "__main__":
    main()
