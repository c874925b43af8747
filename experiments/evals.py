"""Scoring a model by its answers: exact-match accuracy, endless and looping answers, held-out SFT loss.
Shared by the post-training experiments (the SFT demo, the post-training chain)."""

from typing import Callable, Optional

import torch

import model as M
import sft as S
from odpo import is_looping


def prompt_ids(tok, question: str) -> list:
    """`<s>[INST]question[/INST]`: a conversation ending in a user turn is a generation prompt."""
    return tok.encode_chat([{"role": "user", "content": question}])[0]


def final_answer(text: str) -> str:
    """The part after the last [/THINK] (the reasoning trace does not count), stripped."""
    return text.rsplit("[/THINK]", 1)[-1].strip()


def exact_match(text: str, answer: str) -> bool:
    return final_answer(text) == answer.strip()


@torch.no_grad()
def answer_eval(model: M.Transformer, tok, items: list, check: Callable = exact_match, max_new_tokens: int = 64,
                batch_size: int = 32, keep: int = 3, temperature: float = 0.0,
                seed: int = 0) -> dict:
    """Answers to items [{question, answer}] with model.generate (greedy, or sampled at `temperature`):
    exact-answer accuracy (check(text, answer)), the share that hit max_new_tokens without </s>
    ("endless") and that loop (odpo.is_looping, scaled to the cap), the mean length, and the first `keep` samples."""
    was = model.training
    model.eval()
    correct = endless = loops = n_tok = 0
    samples = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        outs = M.generate(model, [prompt_ids(tok, it["question"]) for it in chunk], max_new_tokens,
                        temperature=temperature, eos_id=tok.eos_id, seed=seed + i)
        for it, out in zip(chunk, outs):
            stopped = bool(out) and out[-1] == tok.eos_id
            text = tok.decode(out[:-1] if stopped else out, special="keep")
            ok = bool(check(text, it["answer"]))
            correct += ok
            endless += not stopped
            loops += is_looping(out, eos_id=tok.eos_id, max_new_tokens=max_new_tokens)
            n_tok += len(out)
            if len(samples) < keep:
                samples.append({"question": it["question"], "answer": it["answer"], "output": text, "correct": ok})
    model.train(was)
    n = max(len(items), 1)
    return {"n": len(items), "accuracy": correct / n, "endless_rate": endless / n, "loop_rate": loops / n,
            "mean_new_tokens": n_tok / n, "samples": samples}


@torch.no_grad()
def eval_loss(model: M.Transformer, examples: list, pad_id: int, teacher: Optional[M.Transformer] = None,
              batch_size: int = 16) -> float:
    """Held-out sft_loss, weighted by assistant targets over all examples (CE, or KL with a teacher)."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        rows = examples[i:i + batch_size]
        ids, mask = S.chat_batch(rows, pad_id)
        dev = next(model.parameters()).device
        n = int(mask[:, 1:].sum())
        images = [x.to(dev) for r in rows for x in r[2]] if len(rows[0]) == 3 else None
        total += float(S.sft_loss(model, ids.to(dev), mask.to(dev), teacher, images=images)) * n
        count += n
    model.train(was)
    return total / max(count, 1)


