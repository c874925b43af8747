"""Plain SFT against distillation SFT (PAPER.md section 8 in miniature): SFT the embedded cascade's parent
on reasoning arithmetic ([THINK] traces) and docstring Q/A by CE, then its smallest child twice, by plain
SFT (CE) and by distillation from the SFT-ed parent (KL, sft.py's loss with a teacher). Every model is
scored on held-out answers (experiments/evals.py: accuracy, endless and looping answers, held-out CE and
KL to the SFT-ed parent), greedy and at T = 0.7.

Run: `python experiments/sft_demo.py` (after `python cascade.py`; finished stages are reused);
`python experiments/sft_demo.py --parent smollm2.gguf` (the real parent, plain SFT only);
`--out DIR --record benchmarks/sft` copies results.json and table.md into a record.
"""

import dataclasses
import json
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the mechanism files

import data as D  # noqa: E402
import model as M  # noqa: E402
import sft as S  # noqa: E402
import train as TR  # noqa: E402
from experiments import evals as E  # noqa: E402


@dataclass
class DemoConfig:
    cascade: str = "runs/cascade"  # where cascade.py wrote its stages
    parent: Optional[str] = None  # the parent checkpoint (default CASCADE/parent/model); a .gguf = the real model
    child: Optional[str] = None  # the child (default: the smallest size's base, CASCADE/<size>/long/model)
    out: str = "runs/sft_demo"  # stages, results.json, table.md
    record: Optional[str] = None  # also copy results.json and table.md here
    steps: int = 120  # optimizer steps per SFT stage
    lr: float = 1e-3  # peak learning rate
    seq_len: int = 128  # row length
    batch: int = 16  # chats per optimizer step
    new_tokens: int = 64  # generation cap per held-out answer (hitting it = "endless")
    child_sft: bool = True  # also SFT the child (--no-child-sft: the parent's stages only)
    math: int = 800  # training arithmetic problems (with [THINK] traces)
    qa: int = 400  # training docstring Q/A pairs
    held_math: int = 100  # held-out arithmetic problems
    held_qa: int = 50  # held-out Q/A pairs


def demo_items(tok, max_tokens: int, n_math: int, n_qa: int, held_math: int, held_qa: int) -> dict:
    """Reasoning chats on arithmetic (a [THINK] trace, then the number) and plain docstring Q/A, split into
    train and held-out items; Q/A longer than max_tokens are left out (counted)."""
    math = D.math_problems(n_math + held_math, seed=0)
    qa = D.qa_pairs(n_qa + held_qa + n_qa // 4, seed=0)
    has_think = "[THINK]" in getattr(tok, "specials", ())

    def chat_of(it, think):
        answer = {"role": "assistant", "content": it["answer"]}
        if think and has_think:
            answer["thinking"] = D.math_trace(it["question"], it["answer"])
        elif think:  # ChatML (the real SmolLM2) has no thinking tokens: the trace goes before the answer
            answer["content"] = f"{D.math_trace(it['question'], it['answer'])} Answer: {it['answer']}"
        return [{"role": "user", "content": it["question"]}, answer]

    fits = [it for it in qa if len(tok.encode_chat(chat_of(it, False))[0]) <= max_tokens]
    if len(fits) < n_qa + held_qa:
        raise ValueError(f"only {len(fits)} Q/A pairs fit in {max_tokens} tokens; lower --demo-qa")
    qa_train, qa_held = fits[:n_qa], fits[n_qa:n_qa + held_qa]
    m_train, m_held = math[:n_math], math[n_math:]
    convs = [chat_of(it, True) for it in m_train] + [chat_of(it, False) for it in qa_train]
    random.Random(0).shuffle(convs)
    held_convs = [chat_of(it, True) for it in m_held] + [chat_of(it, False) for it in qa_held]
    return {"train": convs, "math_held": m_held, "qa_held": qa_held, "held_convs": held_convs,
            "qa_left_out_long": len(qa) - len(fits)}


def demo_measure(model, tok, items: dict, held_examples: list, teacher=None, max_new_tokens: int = 64) -> dict:
    """Held-out loss (assistant tokens, CE), KL to the teacher, and greedy answers (math, Q/A)."""
    t0, c0 = time.time(), time.process_time()
    math = E.answer_eval(model, tok, items["math_held"], D.check_math_answer, max_new_tokens)
    qa = E.answer_eval(model, tok, items["qa_held"], E.exact_match, max_new_tokens)
    sampled = {k: E.answer_eval(model, tok, items[f"{k}_held"], D.check_math_answer if k == "math" else E.exact_match,
                              max_new_tokens, temperature=0.7, seed=1)
               for k in ("math", "qa")}  # T = 0.7, online DPO's sampling temperature (section 8)
    out = {"held_out_ce": E.eval_loss(model, held_examples, tok.pad_id), "math": math, "qa": qa,
           "math_t0.7": sampled["math"], "qa_t0.7": sampled["qa"]}
    if teacher is not None:
        out["held_out_kl_to_teacher"] = E.eval_loss(model, held_examples, tok.pad_id, teacher)
    out["eval_wall_s"], out["eval_cpu_s"] = time.time() - t0, time.process_time() - c0
    return out


def demo(dc: DemoConfig, scfg: S.SFTConfig) -> int:
    """PAPER.md section 8 in miniature: SFT the cascade's parent on reasoning arithmetic + docstring Q/A (CE),
    then its smallest child twice, by plain SFT (CE) and by distillation from the SFT-ed parent (KL);
    held-out accuracy, loss and loop/endless rates before and after, into <out>/results.json."""
    parent_dir = dc.parent or os.path.join(dc.cascade, "parent", "model")
    child_dir = dc.child
    real = parent_dir.endswith(".gguf")  # the real parent (SmolLM2-135M-Instruct): no cascade child by default
    if child_dir is None and not real and dc.child_sft:
        sizes = [s for s in ("3b", "8b", "14b") if os.path.isdir(os.path.join(dc.cascade, s, "long", "model"))]
        child_dir = os.path.join(dc.cascade, sizes[0], "long", "model") if sizes else ""
    for what, path in (("parent", parent_dir), ("child", child_dir)):
        if path is None or (path.endswith(".gguf") and os.path.isfile(path)):
            continue
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise FileNotFoundError(f"no {what} checkpoint at {path!r}: run `python cascade.py` first (or pass "
                                    f"--cascade DIR / --parent / --child)")
    out = dc.out
    os.makedirs(out, exist_ok=True)
    if real:
        tok = D.Tokenizer.from_file(parent_dir)  # the GGUF's own tokenizer (ChatML)
    else:
        V = M.read_checkpoint_args(parent_dir)[0].vocab_size
        tok = D.Tokenizer.from_file(D.tekken_with_think(D.default_tekken_path(), os.path.join(out, "tekken.json"), V),
                                    vocab_size=V)
    seq = dc.seq_len
    items = demo_items(tok, seq + 1, dc.math, dc.qa, dc.held_math, dc.held_qa)
    held, _ = S.encode_conversations(items["held_convs"], tok, seq + 1)
    results = {"config": {"demo": dataclasses.asdict(dc), "sft": dataclasses.asdict(scfg), "parent": parent_dir,
                          "child": child_dir, "train_conversations": len(items["train"]),
                          "qa_left_out_long": items["qa_left_out_long"], **TR.run_record(), "loop_detector": "odpo.is_looping at the cap", "max_new_tokens": dc.new_tokens},
               "models": {}}

    def stage(name, init_dir, teacher_model, lr):
        """Train (or reuse a finished) SFT stage; returns the trained model and train()'s summary."""
        stage_dir = os.path.join(out, name)
        done = os.path.join(stage_dir, "done.json")
        if os.path.exists(done):
            with open(done) as f:
                return M.load_model(os.path.join(stage_dir, "model"), dtype=torch.float32), json.load(f)
        shutil.rmtree(stage_dir, ignore_errors=True)
        tcfg = TR.TrainConfig(out_dir=stage_dir, steps=dc.steps, batch_size=dc.batch,
                           micro_batch_size=dc.batch, seq_len=seq,
                           lr=lr, warmup_steps=max(1, dc.steps // 10), dtype="fp32", log_every=10,
                           seed=0, export=True)
        model = M.load_model(init_dir, dtype=torch.float32)
        t0, c0 = time.time(), time.process_time()
        r = S.run_sft(model, items["train"], tok, tcfg, scfg, teacher_model, device="cpu", name=name)
        info = {"steps": dc.steps, "lr": lr, "teacher": teacher_model is not None, "wall_s": time.time() - t0,
                "cpu_s": time.process_time() - c0, "first_loss": r["history"][0]["loss"],
                "last_loss": r["history"][-1]["loss"], "data": r["data"]}
        if tok.path.endswith(".json"):  # a GGUF tokenizer stays where it is: pass --tokenizer to --chat
            shutil.copyfile(tok.path, os.path.join(stage_dir, "model", "tekken.json"))
        TR.write_json_atomic(done, info)
        return model, info

    def record(name, model, teacher=None, info=None):
        m = demo_measure(model, tok, items, held, teacher, max_new_tokens=dc.new_tokens)
        results["models"][name] = {**m, **({"train": info} if info else {})}
        print(f"[demo] {name}: math {m['math']['accuracy']:.1%} qa {m['qa']['accuracy']:.1%} "
              f"CE {m['held_out_ce']:.3f} endless {m['math']['endless_rate']:.1%} loop {m['math']['loop_rate']:.1%}",
              flush=True)
        TR.write_json_atomic(os.path.join(out, "results.json"), results)

    parent0 = M.load_model(parent_dir, dtype=torch.float32)
    record("parent (before SFT)", parent0)
    del parent0
    parent1, info = stage("parent_sft", parent_dir, None, dc.lr)
    record("parent SFT (CE)", parent1, info=info)
    if child_dir is not None:
        record("child (cascade, before SFT)", M.load_model(child_dir, dtype=torch.float32), teacher=parent1)
    if child_dir is None:
        write_demo_table(results, os.path.join(out, "table.md"))
        print(open(os.path.join(out, "table.md")).read())
        return 0
    child_ce, info = stage("child_sft_ce", child_dir, None, dc.lr)
    record("child plain SFT (CE)", child_ce, teacher=parent1, info=info)
    child_kl, info = stage("child_sft_kl", child_dir, parent1, dc.lr)
    record("child distillation SFT (KL to SFT-ed parent)", child_kl, teacher=parent1, info=info)
    write_demo_table(results, os.path.join(out, "table.md"))
    print(open(os.path.join(out, "table.md")).read())
    return 0


def write_demo_table(results: dict, path: str) -> None:
    rows = ["| model | held-out CE | KL to SFT-ed parent | math acc | Q/A exact | endless (math / Q/A) | "
            "loops (math / Q/A) | mean new tokens (math / Q/A) | T=0.7: math acc, endless, loops (math / Q/A) |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in results["models"].items():
        kl = m.get("held_out_kl_to_teacher")
        a, q = m["math"], m["qa"]
        rows.append(f"| {name} | {m['held_out_ce']:.3f} | {'' if kl is None else f'{kl:.3f}'} | {a['accuracy']:.1%} | "
                    f"{q['accuracy']:.1%} | {a['endless_rate']:.0%} / {q['endless_rate']:.0%} | "
                    f"{a['loop_rate']:.0%} / {q['loop_rate']:.0%} | {a['mean_new_tokens']:.1f} / {q['mean_new_tokens']:.1f} |"
                    + (f" {m['math_t0.7']['accuracy']:.0%}, {m['math_t0.7']['endless_rate']:.0%} / "
                       f"{m['qa_t0.7']['endless_rate']:.0%}, {m['math_t0.7']['loop_rate']:.0%} / "
                       f"{m['qa_t0.7']['loop_rate']:.0%} |" if "math_t0.7" in m else " |"))
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write("\n".join(rows) + "\n")
    os.replace(tmp, path)


def main(argv=None) -> int:
    dc, scfg = TR.configs_from_args([DemoConfig, S.SFTConfig], argv, description="Plain vs distillation SFT demo.")
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    try:
        rc = demo(dc, scfg)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if dc.record:
        os.makedirs(dc.record, exist_ok=True)
        for name in ("results.json", "table.md"):
            shutil.copyfile(os.path.join(dc.out, name), os.path.join(dc.record, name))
    return rc


if __name__ == "__main__":
    sys.exit(main())
