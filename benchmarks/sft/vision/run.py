"""Multimodal SFT in miniature (sft.py with images, PAPER.md sections 6 and 8): tiny VLMs on Pillow pictures
(one coloured shape in one quadrant, cascade.py's shape_picture), caption accuracy on held-out pictures.

Every model shares one frozen, randomly initialised ViT (the demo's stand-in for MS3.1's trained one, so what
is learnt is learnt by the projector and text model); the student starts from a fresh projector and an
untrained text model. Rows: a wider teacher VLM SFT-ed by CE; the student before SFT; plain SFT (CE) training projector + text;
the student distilled from the teacher (KL-SFT, both seeing the images); then the CE-SFT-ed student's text
model with a fresh projector, before and after projector-only SFT (the text model and ViT frozen).
Run: `OMP_NUM_THREADS=1 python benchmarks/sft/vision/run.py` (a few CPU minutes); writes results.json, table.md.
"""
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(HERE)))
sys.path.insert(0, ROOT)

import data as D  # noqa: E402
import model as M  # noqa: E402
import sft as S  # noqa: E402
import train as T  # noqa: E402
import vision as V  # noqa: E402
from experiments import evals as E  # noqa: E402
from experiments import vision_cascade as C  # noqa: E402  (shape_picture: the multimodal cascade's pictures)

STEPS, BATCH, LR, N_TRAIN, N_HELD, SEQ = 300, 16, 3e-3, 1024, 100, 64
VOCAB = 2048  # the shipped Tekken truncated to 1000 specials + 1048 ranks (experiments/vision_cascade.py)
VARGS = V.VisionArgs.preset("demo")
STUDENT = M.ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=192, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                      rope_theta=1e4, max_seq_len=128)
TEACHER = dataclasses.replace(STUDENT, dim=128, n_layers=4, hidden_dim=384)


def chat(img, caption=None):
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": C.PROMPT}]}]
    return msgs + ([{"role": "assistant", "content": caption}] if caption is not None else [])


def parts(c):
    m = re.fullmatch(r"a (\S+) (\S+) at the (.+)", c)
    return m.groups() if m else ("?", "?", "?")


def vlm(vit, text_args, seed):
    proj = V.Projector(VARGS.hidden_size, text_args.dim, VARGS.spatial_merge_size)
    proj.init_weights(seed)
    text = M.Transformer(text_args)
    text.init_weights(seed + 1)
    return V.VisionLanguageModel(vit, proj, text)


@torch.no_grad()
def measure(model, tok, held, held_examples, teacher=None):
    model.eval()
    hits = {"caption": 0, "colour": 0, "shape": 0, "place": 0}
    examples = []
    for img, cap in held:
        ids, _, images = V.encode_chat(tok, chat(img), VARGS)
        out = tok.decode(V.greedy(model, ids, images, max_new_tokens=40, eos_id=tok.eos_id)).strip()
        hits["caption"] += out == cap
        if len(examples) < 3:
            examples.append({"want": cap, "got": out})
        for j, k in enumerate(("colour", "shape", "place")):
            hits[k] += parts(out)[j] == parts(cap)[j]
    r = {k: v / len(held) for k, v in hits.items()} | {"examples": examples}
    r["held_out_ce"] = E.eval_loss(model, held_examples, tok.pad_id)
    if teacher is not None:
        r["kl_to_teacher"] = E.eval_loss(model, held_examples, tok.pad_id, teacher)
    model.train()
    return r


def main():
    torch.set_num_threads(1)
    torch.manual_seed(0)
    t00 = time.time()
    tok = D.Tokenizer.from_file(vocab_size=VOCAB)
    train = [C.shape_picture(np.random.default_rng([0, k])) for k in range(N_TRAIN)]
    held = [C.shape_picture(np.random.default_rng([10_000, k])) for k in range(N_HELD)]
    convs = [chat(img, cap) for img, cap in train]
    held_examples, _ = S.encode_conversations([chat(i, c) for i, c in held], tok, SEQ + 1, vision_args=VARGS)
    vit = V.VisionTransformer(VARGS)
    vit.init_weights(0, std=0.2)
    vit.requires_grad_(False)
    out = os.path.join(ROOT, "runs", "sft_vision")
    rows = {}

    def sft(name, model, teacher=None, train_text=True, steps=STEPS):
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)  # a fresh run every time
        cfg = T.TrainConfig(out_dir=os.path.join(out, name), steps=steps, batch_size=BATCH, micro_batch_size=BATCH,
                            seq_len=SEQ, lr=LR, warmup_steps=steps // 10, dtype="fp32", log_every=0, export=False,
                            resume=False, seed=0)
        t0, c0 = time.time(), time.process_time()
        r = S.run_sft(model, convs, tok, cfg, S.SFTConfig(train_text=train_text), teacher, device="cpu", name=name)
        return {"steps": steps, "first_loss": r["history"][0]["loss"], "last_loss": r["history"][-1]["loss"],
                "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0,
                "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad)}

    teacher = vlm(vit, TEACHER, 100)
    info = sft("teacher_ce", teacher, steps=2 * STEPS)
    teacher.eval()
    rows["teacher (wider text model), SFT CE"] = {**measure(teacher, tok, held, held_examples), "train": info}
    student = vlm(vit, STUDENT, 10)
    rows["student before SFT"] = measure(student, tok, held, held_examples, teacher)
    for name, kw in (("student SFT CE (projector + text)", {}),
                     ("student KL-SFT from the teacher (projector + text)", {"teacher": teacher})):
        s = vlm(vit, STUDENT, 10)  # the same start every time
        info = sft(re.sub(r"\W+", "_", name), s, **kw)
        rows[name] = {**measure(s, tok, held, held_examples, teacher), "train": info}
        print(name, {k: v for k, v in rows[name].items() if k != "train"}, flush=True)
        if not kw:
            trained_text = s.language_model
    # Section 6's setting: a text model that already knows the task, a fresh projector, only the projector trains
    s = V.VisionLanguageModel(vit, V.Projector(VARGS.hidden_size, STUDENT.dim, VARGS.spatial_merge_size),
                              trained_text)
    s.multi_modal_projector.init_weights(20)
    rows["SFT-ed student text + fresh projector"] = measure(s, tok, held, held_examples, teacher)
    info = sft("projector_only", s, train_text=False)
    rows["  ... after projector-only SFT (CE)"] = {**measure(s, tok, held, held_examples, teacher), "train": info}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    rec = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": "cpu (shared 2-core box, 1 thread)",
           "torch": torch.__version__, "commit": commit, "command": "OMP_NUM_THREADS=1 python benchmarks/sft/vision/run.py",
           "setup": {"steps": STEPS, "teacher_steps": 2 * STEPS, "batch": BATCH, "lr": LR, "train_pictures": N_TRAIN,
                     "held_out_pictures": N_HELD, "seq_len": SEQ, "vision_args": dataclasses.asdict(VARGS),
                     "student_text": dataclasses.asdict(STUDENT), "teacher_text": dataclasses.asdict(TEACHER)},
           "rows": rows, "total_wall_s": time.time() - t00,
           "note": "wall times are inflated by other processes on the shared box; cpu_s is this process's CPU time"}
    T.write_json_atomic(os.path.join(HERE, "results.json"), rec)
    lines = ["| model | caption exact | colour | shape | place | held-out CE | KL to teacher | trainable params | train CPU s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in rows.items():
        kl, tr = r.get("kl_to_teacher"), r.get("train")
        lines.append(f"| {name} | {r['caption']:.0%} | {r['colour']:.0%} | {r['shape']:.0%} | {r['place']:.0%} | "
                     f"{r['held_out_ce']:.3f} | {'' if kl is None else f'{kl:.3f}'} | "
                     f"{'' if tr is None else format(tr['trainable'], ',')} | "
                     f"{'' if tr is None else format(tr['cpu_s'], '.0f')} |")
    with open(os.path.join(HERE, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
