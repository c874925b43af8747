"""The embedded multimodal cascade (PAPER.md section 6): a frozen shared ViT, a fresh projector per child.

A tiny multimodal parent learns to caption synthetic pictures (one coloured shape in one quadrant, drawn
with Pillow); its ViT is then frozen and shared. Each child runs cascade.py's stages: `stage_prune` cuts
the text tower of the previous size's distilled child (calibrated on the caption chats' tokens), and
`stage_distill` distils a model made of the frozen ViT, a freshly initialised projector and that pruned
text tower from the parent with forward KL, both seeing the same images. The measure is exact-match
greedy caption accuracy on held-out pictures, and per attribute (colour, shape, place).
Differences from the text cascade: one distillation stage per size (captions are short: no long-context
stage); the parent trains its ViT with the rest (the real ViT arrives trained with MS3.1).

Run: `OMP_NUM_THREADS=1 python experiments/vision_cascade.py --out runs/vision` (`--preset smoke` for a
seconds-long run; `--parent-steps N` / `--short-steps N` override the preset's parent and distillation steps).
"""

import collections
import dataclasses
import os
import re
import sys
import time
from typing import Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the mechanism files

import cascade as C  # noqa: E402
import data as D  # noqa: E402
import distill as DI  # noqa: E402
import model as M  # noqa: E402
import train as TR  # noqa: E402
import vision as V  # noqa: E402

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("square", "circle", "triangle")
PLACES = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
STAGES = {  # parent_steps, distill_steps per size, batch, held-out pictures, learning rates
    "cpu": dict(parent_steps=300, distill_steps=120, batch=32, n_val=96, lr=3e-3, distill_lr=2e-3),
    "smoke": dict(parent_steps=30, distill_steps=10, batch=8, n_val=8, lr=3e-3, distill_lr=2e-3),
}
TEXT = {"cpu": M.ModelArgs(dim=128, n_layers=4, head_dim=32, hidden_dim=512, n_heads=4, n_kv_heads=2,
                           vocab_size=2048, rope_theta=1e4, max_seq_len=256),
        "smoke": M.ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=192, n_heads=4, n_kv_heads=2,
                             vocab_size=2048, rope_theta=1e4, max_seq_len=256)}
PROMPT = "What is in the picture?"


def shape_picture(rng: np.random.Generator, size: int = 32):
    """(Pillow image, caption): one coloured shape in one quadrant of a noisy light background."""
    colour, shape, place = (list(COLOURS)[rng.integers(4)], SHAPES[rng.integers(3)], list(PLACES)[rng.integers(4)])
    img = Image.fromarray(rng.integers(215, 256, (size, size, 3)).astype(np.uint8))
    qx, qy = PLACES[place]
    half = size // 2
    s = int(rng.integers(9, half - 1))
    x0, y0 = qx * half + int(rng.integers(0, half - s + 1)), qy * half + int(rng.integers(0, half - s + 1))
    box, fill = [x0, y0, x0 + s - 1, y0 + s - 1], COLOURS[colour]
    draw = ImageDraw.Draw(img)
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    else:
        draw.polygon([(x0 + s / 2, y0), (x0, y0 + s - 1), (x0 + s - 1, y0 + s - 1)], fill=fill)
    return img, f"a {colour} {shape} at the {place}"


def caption_chat(tok: D.Tokenizer, img, caption: Optional[str], vargs):
    """(ids, loss mask, [image tensor]) of the v13 chat with the picture in the user turn (data.py + vision.py)."""
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": PROMPT}]}]
    if caption is not None:
        msgs.append({"role": "assistant", "content": caption})
    return V.encode_chat(tok, msgs, vargs)


class CaptionLoader:
    """batch(i) -> (ids [B, T], targets [B, T]) like data.PackedLoader: rows padded to T, targets -100 off the
    assistant tokens. train.py's loop moves token tensors only, so each batch's images wait in a FIFO that
    the loss reads (`images_for` checks it got the images of exactly these ids)."""

    def __init__(self, tok, vargs, batch_size: int, seq_len: int, seed: int):
        self.tok, self.vargs, self.B, self.T, self.seed = tok, vargs, batch_size, seq_len, seed
        self.pending = collections.deque()

    def sample(self, k: int):
        return shape_picture(np.random.default_rng([self.seed, k]))

    def batch(self, i: int):
        ids_BT = torch.full((self.B, self.T), self.tok.pad_id, dtype=torch.long)
        tgt_BT = torch.full((self.B, self.T), -100, dtype=torch.long)
        images = []
        for b in range(self.B):
            img, caption = self.sample(i * self.B + b)
            ids, mask, imgs = caption_chat(self.tok, img, caption, self.vargs)
            if len(ids) > self.T + 1:
                raise ValueError(f"a caption chat has {len(ids)} tokens, more than seq_len {self.T} + 1")
            n = len(ids) - 1
            ids_BT[b, :n] = torch.tensor(ids[:-1])
            tgt_BT[b, :n] = torch.tensor([t if m else -100 for t, m in zip(ids[1:], mask[1:])])
            images += imgs
        self.pending.append((ids_BT, images))
        return ids_BT, tgt_BT

    def images_for(self, ids_BT):
        ids0, images = self.pending.popleft()
        if not torch.equal(ids0, ids_BT.cpu()):
            raise RuntimeError("CaptionLoader: the loss got a batch other than the next one the loader gave")
        return [x.to(ids_BT.device) for x in images]


def vision_loss(loader: CaptionLoader, teacher=None, cfg: Optional[DI.DistillConfig] = None):
    """train.py loss_fn: next-token CE on the captions (teacher None) or forward KL to the teacher, both
    models seeing the batch's images (vision.WithImages)."""
    cfg = cfg or DI.DistillConfig()

    def loss_fn(model, ids_BT, targets_BT, n_total):
        images = loader.images_for(ids_BT)
        if teacher is None:
            return DI.ce_loss_fn(cfg)(model.with_images(images), ids_BT, targets_BT, n_total)
        return DI.kl_loss_fn(teacher.with_images(images), cfg)(model.with_images(images), ids_BT, targets_BT, n_total)
    return loss_fn


def _caption_parts(caption: str) -> tuple:
    m = re.fullmatch(r"a (\S+) (\S+) at the (.+)", caption)
    return m.groups() if m else ("?", "?", "?")


@torch.no_grad()
def caption_accuracy(vlm, tok, vargs, n: int, seed: int = 10_000, teacher=None) -> dict:
    """Exact-match greedy captions on n held-out pictures, per-attribute accuracy, and (with a teacher) the
    mean KL(teacher || model) on the reference caption tokens."""
    vlm.eval()
    hits = {"caption": 0, "colour": 0, "shape": 0, "place": 0}
    kl_sum, kl_n, examples = 0.0, 0, []
    for k in range(n):
        img, caption = shape_picture(np.random.default_rng([seed, k]))
        ids, _, images = caption_chat(tok, img, None, vargs)
        out = tok.decode(V.greedy(vlm, ids, images, max_new_tokens=16, eos_id=tok.eos_id)).strip()
        want, got = _caption_parts(caption), _caption_parts(out)
        hits["caption"] += out == caption
        for j, attr in enumerate(("colour", "shape", "place")):
            hits[attr] += got[j] == want[j]
        if len(examples) < 4:
            examples.append({"want": caption, "got": out})
        if teacher is not None:
            full, mask, _ = caption_chat(tok, img, caption, vargs)
            x = torch.tensor([full[:-1]])
            valid = torch.tensor(mask[1:], dtype=torch.bool)
            zs = vlm(x, images)[0, valid].float().log_softmax(-1)
            zt = teacher(x, images)[0, valid].float().log_softmax(-1)
            kl_sum += float((zt.exp() * (zt - zs)).sum())
            kl_n += int(valid.sum())
    out = {k: v / n for k, v in hits.items()} | {"n": n, "examples": examples}
    if teacher is not None:
        out["kl"] = kl_sum / max(kl_n, 1)
    return out


def train_cfg(out_dir, steps, st, seq_len, lr, seed) -> TR.TrainConfig:
    return TR.TrainConfig(out_dir=out_dir, steps=steps, batch_size=st["batch"], micro_batch_size=st["batch"],
                          seq_len=seq_len, lr=lr, warmup_steps=max(1, steps // 10), dtype="fp32", seed=seed,
                          resume=True, ckpt_every=0, log_every=max(1, steps // 10), fsdp="never", export=False,
                          weight_decay=0.0)


def run_vision_cascade(cfg: C.CascadeConfig) -> dict:
    """Parent (ViT + projector + text, trained on captions) -> per size: prune the text tower, fresh projector,
    frozen shared ViT, KL distillation from the parent on the same images; caption accuracy of every model."""
    if cfg.preset not in STAGES:
        raise ValueError(f"the multimodal demo has presets cpu and smoke, not {cfg.preset!r}")
    if cfg.shapes:
        raise ValueError("--shapes is not for the multimodal demo: it cascades the named sizes; give --size 14b, 8b or 3b")
    if cfg.size not in C.REAL_SIZES:
        raise ValueError(f"--size {cfg.size!r} is not a cascade size: choose 14b, 8b or 3b")
    st = dict(STAGES[cfg.preset])
    st["parent_steps"] = cfg.parent_steps or st["parent_steps"]  # --parent-steps / --short-steps override the preset
    st["distill_steps"] = cfg.short_steps or st["distill_steps"]
    out = os.path.join(cfg.out, "vision")
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    tok = D.Tokenizer.from_file(cfg.tokenizer, vocab_size=TEXT[cfg.preset].vocab_size)
    vargs = V.VisionArgs.preset("demo")
    probe, _, _ = caption_chat(tok, *shape_picture(np.random.default_rng(0)), vargs)
    seq_len = len(probe) + 8  # captions differ by a few tokens; rows are padded to this
    cfg = dataclasses.replace(cfg, seq_len=seq_len, long_seq_len=seq_len)
    ctx = C.Context(0, 1, torch.device("cpu"), None, None, None, tok=tok)
    stages = TR.Stages(out)
    TR.print0(f"vision demo: {seq_len}-token caption chats, {len(COLOURS) * len(SHAPES) * len(PLACES)} caption "
             f"classes, out {out}")

    # The parent: ViT, projector and text trained together on captions (it plays MS3.1).
    parent_path = os.path.join(stages.dir("parent"), "model")
    if stages.done("parent", key={"steps": st["parent_steps"], "seed": cfg.seed}) is None:
        vit = V.VisionTransformer(vargs)
        vit.init_weights(cfg.seed)
        proj = V.Projector(vargs.hidden_size, TEXT[cfg.preset].dim, vargs.spatial_merge_size)
        proj.init_weights(cfg.seed + 1)
        text = M.Transformer(TEXT[cfg.preset])
        text.init_weights(cfg.seed + 2)
        parent = V.VisionLanguageModel(vit, proj, text, freeze_vision=False)
        data = CaptionLoader(tok, vargs, st["batch"], seq_len, cfg.seed)
        TR.train(parent, data, vision_loss(data), train_cfg(stages.dir("parent"), st["parent_steps"], st, seq_len,
                                                           st["lr"], cfg.seed), device="cpu", name="vision-parent")
        V.save_vlm(parent, parent_path)
        stages.finish("parent", {"tokens": st["parent_steps"] * st["batch"] * seq_len})
    parent = V.load_vlm(parent_path, dtype=torch.float32)  # frozen from here on, shared by every child (section 6)
    parent.vision_tower.requires_grad_(False)
    parent.eval()
    rows = [{"stage": "parent", "params_text": M.num_params(parent.args),
             **caption_accuracy(parent, tok, vargs, st["n_val"])}]
    TR.print0(f"parent caption accuracy {rows[-1]['caption']:.3f}")

    calib_data = CaptionLoader(tok, vargs, st["batch"], seq_len, cfg.seed + 7)
    calib = [calib_data.batch(i)[0] for i in range(2)]  # tokens only (prune.py calibrates the text tower)
    current = parent_path
    for i, name in enumerate(C.REAL_SIZES[: C.REAL_SIZES.index(cfg.size) + 1]):
        target = C.miniature(TEXT[cfg.preset], name, seq_len)
        init = C.stage_prune(cfg, ctx, stages, f"{name}/init", current, target, calib=calib)

        def student(path, i=i):  # the frozen shared ViT, a fresh projector per size, the pruned text tower
            proj = V.Projector(vargs.hidden_size, target.dim, vargs.spatial_merge_size)
            proj.init_weights(cfg.seed + 100 + i)
            return V.VisionLanguageModel(parent.vision_tower, proj, M.load_model(path, dtype=torch.float32))

        rows.append({"stage": f"{name} pruned", "params_text": M.num_params(target),
                     **caption_accuracy(student(init), tok, vargs, st["n_val"], teacher=parent)})
        data = CaptionLoader(tok, vargs, st["batch"], seq_len, cfg.seed + 11 + i)
        current = C.stage_distill(
            cfg, ctx, stages, f"{name}/distilled", init, parent, False, st["distill_steps"], cfg.seed,
            student_fn=student, data=data, loss_fn=vision_loss(data, teacher=parent),
            train_cfg=train_cfg(stages.dir(f"{name}/distilled"), st["distill_steps"], st, seq_len, st["distill_lr"],
                                cfg.seed), save=V.save_vlm)  # the distilled child seeds the next size
        child = V.load_vlm(current, dtype=torch.float32)
        rows.append({"stage": f"{name} distilled", "params_text": M.num_params(target),
                     **caption_accuracy(child, tok, vargs, st["n_val"], teacher=parent)})
        TR.print0(f"{name}: caption accuracy pruned {rows[-2]['caption']:.3f} -> distilled {rows[-1]['caption']:.3f}")
    result = {"rows": rows, "seconds": time.time() - t0, "preset": cfg.preset, "seed": cfg.seed,
              "vision_args": dataclasses.asdict(vargs), "parent_text_args": dataclasses.asdict(parent.args),
              "seq_len": seq_len, "stages": st, "run": TR.run_record()}
    TR.write_json_atomic(os.path.join(out, "results.json"), result)
    table = ["| model | text params | caption | colour | shape | place | KL to parent |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kl = f"{r['kl']:.3f}" if "kl" in r else "-"
        table.append(f"| {r['stage']} | {r['params_text']:,} | {100 * r['caption']:.1f}% | {100 * r['colour']:.1f}% | "
                     f"{100 * r['shape']:.1f}% | {100 * r['place']:.1f}% | {kl} |")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    TR.print0(f"vision cascade finished in {time.time() - t0:.0f}s; results in {out}")
    return result


def main(argv=None):
    cfg = C.config_from_argv(argv)
    code = TR.run_main(lambda: run_vision_cascade(cfg) and 0, expected=(ValueError, FileNotFoundError,
                                                                         M.CheckpointError))
    sys.exit(2 if code else 0)


if __name__ == "__main__":
    main()
