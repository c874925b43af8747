"""Supervised fine-tuning on chat data: next-token cross-entropy, or (the paper's choice) forward-KL
logit distillation from a stronger teacher, on the assistant's tokens only; optional FP8 linears.

Reading guide
-------------
Concept: PAPER.md section 8. SFT is the first post-training step. The paper trains it in fp8 and
replaces plain next-token cross-entropy by logit distillation from a stronger teacher on the same chat
data; for the 3B reasoning model plain SFT gave repetition and endless generations, distillation did
not. The loss covers only what the assistant produces (its answer, its `[THINK]...[/THINK]` trace and
its `</s>`), position by position: a token is trained when its TARGET is an assistant token.

The interface others code against (odpo.py, grpo.py start from an SFT-ed model; their reward models
are trained by SFT):
    sft_loss(student, ids, mask, teacher=None, temperature=1.0, *, images=None) -> scalar
        ids, mask: [B, T] int64 tensors from `chat_batch` (data.Tokenizer.encode_chat, padded; mask 1 =
        a token the assistant produces). Positions t with mask[:, t+1] = 1 are trained, averaged over
        them. No teacher: next-token CE; a teacher: forward KL(p_T || p_S) there, both logit sets
        divided by T, no T^2 (distill.py's convention). Through distill.py's fused losses: no [B, T, V].
        images: the CHW tensors whose [IMG] tokens are in ids, in order; student (and teacher) are then
        vision.VisionLanguageModel-like (forward(ids, images, **kw), .language_model.lm_head).
    chat_batch(examples, pad_id, length=None) -> (ids_BL, mask_BL)
    encode_conversations(conversations, tok, max_tokens, truncate=False, vision_args=None) -> (examples, stats)
        examples are (ids, mask), or (ids, mask, images) with vision_args (vision.encode_chat's preprocessing)
    SFTConfig (dataclass), ChatLoader(examples, batch_size, seq_len, pad_id, seed, rank, world_size)
    run_sft(student, conversations, tok, train_cfg, sft_cfg, teacher=None, *, device, eval_fn=None,
            name="sft") -> dict   (train.train's result dict, plus "data": the encoding stats)
    read_conversations(path, on_bad_line="stop", tok=None) -> (conversations, [(line number, reason)])
        image parts {"type": "image", "path": P} or {"type": "image", "image": P}: P relative to the file
    FP8: quantize_e4m3(x) -> (x_fp8, inv_scale), fp8_linear_reference, FP8Linear, convert_to_fp8(model, device)

Sections: config, data (jsonl, encoding, batching, the loader), the loss, the training entry point,
FP8 linears, the command line (train, --chat).

Deviations from the paper / choices where it is silent:
 1. One conversation per row, right-padded to the row length (no packing across conversations, so no
    attention leaks between them). Padding is masked out of the loss; train.py's tokens/s counts it.
 2. A conversation longer than the row (seq_len + 1 tokens) is an error naming it, or with
    `--truncate` is cut to its first seq_len + 1 tokens; one left with no assistant token is dropped
    (counted in the stats).
 3. The teacher must share the student's vocabulary (distill.check_vocab: one clear error otherwise);
    it may be larger, wider or deeper. It runs under no_grad in the compute dtype.
 4. FP8 (`--fp8`): every nn.Linear inside the decoder blocks computes its forward in float8 e4m3 with
    one dynamic scale per tensor (amax / 448), through torch._scaled_mm, output bf16; the backward is
    bf16 (gradients of e4m3 forwards, as in the paper's "fp8 training" the format of the backward is
    not stated; e5m2 gradients are left for later). Master weights stay fp32 parameters; the lm_head is
    not converted because the fused loss reads its weight directly. Where _scaled_mm with e4m3 is not
    available (the CPU, GPUs before compute capability 8.9) it prints one line and trains in bf16.
 5. Vision (PAPER.md section 6): when the student is a vision.VisionLanguageModel, its ViT is frozen
    (requires_grad False, run without grad, checked before training), the projector trains, and the text
    model trains too unless `--no-train-text` (projector only). A teacher VLM sees the same images.
    train.py's loop moves token tensors only, so ChatLoader keeps each batch's images in a FIFO that the
    loss reads, checked to belong to exactly those ids (as experiments/vision_cascade.py does). Image paths
    in jsonl are opened once while reading (a bad one stops at its line) and again when encoding. A
    conversation cut by --truncate must keep all its image tokens. `--vision` loads multimodal
    checkpoints (vision.load_vlm) and exports with vision.save_vlm.

Run: `python sft.py --data chats.jsonl --student CKPT [--teacher CKPT] --out DIR` (SFT, KL when a
teacher is given); `python sft.py --chat CKPT` (talk to a checkpoint); `python experiments/sft_demo.py`
(plain SFT against distillation SFT on the embedded cascade's parent and child).
`python -m pytest tests/test_sft.py -q`; `python benchmarks/sft_bench.py` (bf16 vs FP8 step).
Depends on: model.py, data.py, distill.py, train.py, vision.py (multimodal SFT only: image preprocessing
for jsonl image paths, load_vlm/save_vlm for --vision; the loss and loader take any model whose forward
takes images, so the training code itself needs nothing from it).
"""

from __future__ import annotations

import collections
import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import data as D
import vision as V
from distill import DistillConfig, ce_loss_fn, check_vocab, kl_loss_fn
from model import Transformer, flops_per_token, generate, load_model, resolve_model_path
from train import (TrainConfig, build_model, configs_from_args, exit_process, rank_world, setup_distributed,
                   teardown_distributed, train)

# -----------------------------------------------------------------------------
# Config


@dataclass
class SFTConfig:
    temperature: float = 1.0  # T of the KL (section 5 convention: both logit sets / T, no T^2)
    chunk_size: Optional[int] = None  # tokens per fused-loss chunk; None = distill.py's choice
    truncate: bool = False  # cut conversations longer than seq_len + 1 tokens instead of refusing them
    on_bad_line: str = "stop"  # malformed jsonl line: "stop" (error naming the line) or "skip" (report, go on)
    fp8: bool = False  # float8 e4m3 forward for the block linears (section 8); bf16 where unsupported
    train_text: bool = True  # multimodal student: train the text model beside the projector (no: projector only)


# -----------------------------------------------------------------------------
# Data: jsonl conversations, encoding, batching, the loader


def as_messages(conv, where: str = "conversation") -> list:
    """A conversation is a list of {role, content[, thinking]} messages, or a dict holding one under
    'messages' (the usual jsonl form)."""
    if isinstance(conv, dict):
        if "messages" not in conv:
            raise ValueError(f"{where}: an object without a 'messages' list")
        conv = conv["messages"]
    if not isinstance(conv, list) or not conv:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{role, content}} objects")
    return conv


def read_conversations(path: str, on_bad_line: str = "stop", tok: Optional[D.Tokenizer] = None) -> tuple[list, list]:
    """Conversations from a jsonl file, one {"messages": [...]} object per line (blank lines skipped).
    A malformed line (bad JSON, no messages, a message encode_chat refuses when `tok` is given) raises
    ValueError naming `path:line` with on_bad_line="stop"; with "skip" it is left out and reported in
    the returned list of (line number, reason)."""
    if on_bad_line not in ("stop", "skip"):
        raise ValueError(f"on_bad_line must be 'stop' or 'skip', got {on_bad_line!r}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"conversation file {path!r} does not exist: pass a .jsonl file with one "
                                f'{{"messages": [...]}} object per line')
    convs, bad = [], []
    with open(path, encoding="utf-8", errors="strict") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"not valid JSON ({e.msg} at column {e.colno})") from None
                msgs = as_messages(obj, "line")
                n_images = resolve_image_paths(msgs, os.path.dirname(os.path.abspath(path)))
                if tok is not None:
                    tok.encode_chat(msgs, image_encoder=(lambda x: []) if n_images else None)
                if not any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs):
                    raise ValueError("no assistant message: nothing to train on")
                convs.append(obj)
            except ValueError as e:
                reason = str(e).removeprefix("line: ")
                if on_bad_line == "stop":
                    raise ValueError(f"{path}:{lineno}: {reason}; fix the line or pass --on-bad-line skip") from None
                bad.append((lineno, reason))
    if bad:
        print(f"sft: skipped {len(bad)} malformed line(s) of {path}: "
              + "; ".join(f"line {n}: {r}" for n, r in bad[:10]) + (" ..." if len(bad) > 10 else ""), file=sys.stderr)
    return convs, bad


def resolve_image_paths(messages: list, base_dir: str) -> int:
    """In place: every user image part given by path ({"type": "image", "path": P} or "image": P) becomes
    {"type": "image", "image": absolute path}, P taken relative to base_dir; each file is opened once
    (vision.load_image), so a missing or corrupt one raises ValueError naming it. Returns the image count."""
    n = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if not isinstance(content, list):
            continue
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "image"):
                continue
            n += 1
            p = part.pop("path", None) if "path" in part else part.get("image")
            if isinstance(p, (str, os.PathLike)):
                full = os.path.join(base_dir, os.fspath(p))
                if not os.path.isfile(full):
                    raise ValueError(f"image {os.fspath(p)!r} not found (looked for {full}): image paths are "
                                     f"relative to the jsonl file's folder")
                V.load_image(full)
                part["image"] = full
    return n


def encode_conversations(conversations: list, tok, max_tokens: int, truncate: bool = False,
                         vision_args=None) -> tuple[list, dict]:
    """[(ids, mask)] lists from tok.encode_chat, each at most max_tokens long (= seq_len + 1: a row of
    seq_len inputs and their seq_len targets). Longer ones raise, or with truncate are cut to their
    first max_tokens tokens; conversations left without an assistant target are dropped. With
    vision_args (a multimodal student's) the chats may hold images: [(ids, mask, [CHW image tensors])]
    through vision.encode_chat's preprocessing."""
    examples, truncated, dropped = [], 0, 0
    for k, conv in enumerate(conversations):
        msgs = as_messages(conv, f"conversation {k}")
        if vision_args is None:
            try:
                ids, mask = tok.encode_chat(msgs)
            except ValueError as e:
                if "image_encoder" not in str(e):
                    raise
                raise ValueError(f"conversation {k} holds an image but the student is a text model: SFT a "
                                 f"multimodal checkpoint (--vision) or drop the image") from None
            images = None
        else:
            ids, mask, images = V.encode_chat(tok, msgs, vision_args)
        if len(ids) > max_tokens:
            if not truncate:
                raise ValueError(f"conversation {k} has {len(ids)} tokens, longer than the context of {max_tokens} "
                                 f"(seq_len + 1): raise --seq-len (up to the model's max_seq_len) or pass --truncate")
            if images and vision_args.image_token_id in ids[max_tokens:]:
                raise ValueError(f"conversation {k} has {len(ids)} tokens and truncation to {max_tokens} would cut "
                                 f"an image: raise --seq-len or use a smaller image")
            ids, mask = ids[:max_tokens], mask[:max_tokens]
            truncated += 1
        if not any(mask[1:]):
            dropped += 1
            continue
        examples.append((ids, mask) if images is None else (ids, mask, images))
    if not examples:
        raise ValueError(f"no conversation left with an assistant token to train on ({dropped} dropped after "
                         f"truncation to {max_tokens} tokens): raise --seq-len")
    n_tokens = sum(len(ex[0]) for ex in examples)
    return examples, {"conversations": len(conversations), "examples": len(examples), "truncated": truncated,
                      "dropped": dropped, "tokens": n_tokens,
                      "assistant_targets": sum(sum(ex[1][1:]) for ex in examples)}


def chat_batch(examples: list, pad_id: int, length: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ids, mask [B, L] int64: each (ids, mask) pair right-padded with pad_id / 0 to L (default: the longest)."""
    L = max(len(ex[0]) for ex in examples) if length is None else length
    ids_BL = torch.full((len(examples), L), pad_id, dtype=torch.long)
    mask_BL = torch.zeros(len(examples), L, dtype=torch.long)
    for b, (ids, mask, *_) in enumerate(examples):
        if len(ids) > L:
            raise ValueError(f"example {b} has {len(ids)} tokens, more than the batch length {L}")
        ids_BL[b, :len(ids)] = torch.tensor(ids)
        mask_BL[b, :len(mask)] = torch.tensor(mask)
    return ids_BL, mask_BL


def shift(ids_BL: torch.Tensor, mask_BL: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs [B, L-1] and next-token targets [B, L-1], -100 where the target is not an assistant token."""
    return ids_BL[:, :-1], ids_BL[:, 1:].masked_fill(mask_BL[:, 1:] == 0, -100)


class ChatLoader:
    """train.py's loader contract for chats: batch(i) -> (inputs, targets) [B, seq_len], stateless in
    (seed, i, rank, world_size). Global row k = (i * world + rank) * B + j reads example perm_e[k % n] of
    epoch e = k // n (a fresh permutation per epoch). Examples with images (ids, mask, images): train.py's
    loop moves token tensors only, so each batch's images wait in a FIFO that the loss reads with
    images_for(inputs), checked to be the images of exactly those inputs."""

    def __init__(self, examples: list, batch_size: int, seq_len: int, pad_id: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        if any(len(ex[0]) > seq_len + 1 for ex in examples):
            raise ValueError(f"an example is longer than seq_len + 1 = {seq_len + 1}: encode with that max_tokens")
        self.examples, self.B, self.T, self.pad_id = examples, batch_size, seq_len, pad_id
        self.seed, self.rank, self.world, self.shuffle = seed, rank, world_size, shuffle
        self._perms: dict = {}
        self.multimodal = bool(examples) and len(examples[0]) == 3
        self.pending = collections.deque()

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            n = len(self.examples)
            self._perms[epoch] = (np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle
                                  else np.arange(n))
        return self._perms[epoch]

    def batch(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        n = len(self.examples)
        rows = []
        for j in range(self.B):
            k = (i * self.world + self.rank) * self.B + j
            rows.append(self.examples[int(self._perm(k // n)[k % n])])
        inputs_BT, targets_BT = shift(*chat_batch(rows, self.pad_id, self.T + 1))
        if self.multimodal:
            self.pending.append((inputs_BT, [x for r in rows for x in r[2]]))
        return inputs_BT, targets_BT

    def images_for(self, inputs_BT: torch.Tensor) -> list:
        ids0, images = self.pending.popleft()
        if not torch.equal(ids0, inputs_BT.cpu()):
            raise RuntimeError("ChatLoader: the loss got a batch other than the next one the loader gave")
        return [x.to(inputs_BT.device) for x in images]


# -----------------------------------------------------------------------------
# The loss (section 8 on section 5's fused losses)


def sft_loss(student: Transformer, ids: torch.Tensor, mask: torch.Tensor, teacher: Optional[Transformer] = None,
             temperature: float = 1.0, *, chunk_size: Optional[int] = None, images: Optional[list] = None
             ) -> torch.Tensor:
    """Mean over the positions whose target is an assistant token of next-token CE (no teacher) or of
    KL(p_T || p_S) at temperature T (teacher). ids, mask: [B, L]. Never builds [B, L, V] logits. With
    images, student and teacher are multimodal and both see them."""
    if ids.shape != mask.shape or ids.dim() != 2:
        raise ValueError(f"ids and mask must both be [B, T]; got {tuple(ids.shape)} and {tuple(mask.shape)}")
    if teacher is not None:
        check_vocab(student, teacher)
    inputs_BT, targets_BT = shift(ids, mask)
    n = max(int((targets_BT != -100).sum()), 1)
    cfg = DistillConfig(temperature=temperature, chunk_size=chunk_size)
    if images is not None:
        student = student.with_images(images)
        teacher = None if teacher is None else teacher.with_images(images)
    return loss_fn_for(teacher, cfg)(student, inputs_BT, targets_BT, n)


def loss_fn_for(teacher: Optional[Transformer], cfg: DistillConfig, loader: Optional["ChatLoader"] = None
                ) -> Callable:
    """train.py's loss_fn(model, inputs, targets, n_total): distill.py's fused KL to the teacher over the
    targets that are not -100 (the assistant's), or its fused CE without a teacher. With a multimodal
    loader both models see the batch's images (loader.images_for)."""
    fn = ce_loss_fn(cfg) if teacher is None else kl_loss_fn(teacher, cfg)
    if loader is None or not loader.multimodal:
        return fn

    def loss_fn(model, inputs_BT, targets_BT, n_total):
        images = loader.images_for(inputs_BT)
        if teacher is None:
            return fn(model.with_images(images), inputs_BT, targets_BT, n_total)
        return kl_loss_fn(teacher.with_images(images), cfg)(model.with_images(images), inputs_BT, targets_BT, n_total)
    return loss_fn


def freeze_vision(student, train_text: bool = True) -> None:
    """Section 6: the ViT stays frozen (requires_grad False, so VisionLanguageModel runs it without grad
    and the optimizer never holds it); the projector trains; the text model trains unless train_text
    is False. Raises if anything of the ViT is still trainable afterwards."""
    student.vision_tower.requires_grad_(False)
    student.multi_modal_projector.requires_grad_(True)
    student.language_model.requires_grad_(train_text)
    if any(p.requires_grad for p in student.vision_tower.parameters()):
        raise RuntimeError("the ViT must stay frozen during SFT")


# -----------------------------------------------------------------------------
# Training entry point: train.py's one loop


def run_sft(student: Transformer, conversations: list, tok, train_cfg: TrainConfig, sft_cfg: SFTConfig,
            teacher: Optional[Transformer] = None, *, device, eval_fn: Optional[Callable] = None,
            name: str = "sft") -> dict:
    """SFT `student` on `conversations` through train.train (the model must already be built/parallelized,
    e.g. with train.build_model). KL to `teacher` when given, else CE. Rows are train_cfg.seq_len tokens;
    train_cfg.steps x batch_size conversations are read (epochs wrap). Returns train()'s dict plus
    "data" (encoding stats) and "fp8" (whether FP8 linears were used). A vision.VisionLanguageModel student
    trains on chats with images: ViT frozen, projector (and text model unless sft_cfg.train_text is False)
    trained; its export is vision.save_vlm's."""
    if train_cfg.seq_len > student.args.max_seq_len:
        raise ValueError(f"seq_len {train_cfg.seq_len} exceeds the student's context max_seq_len "
                         f"{student.args.max_seq_len}: lower --seq-len")
    if teacher is not None:
        check_vocab(student, teacher)
        if train_cfg.seq_len > teacher.args.max_seq_len:
            raise ValueError(f"seq_len {train_cfg.seq_len} exceeds the teacher's max_seq_len "
                             f"{teacher.args.max_seq_len}: lower --seq-len")
        teacher.eval()
        teacher.requires_grad_(False)
    if tok.vocab_size > student.args.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the model only {student.args.vocab_size}: "
                         f"load the tokenizer with vocab_size={student.args.vocab_size}")
    multimodal = hasattr(student, "vision_tower")
    if multimodal:
        freeze_vision(student, sft_cfg.train_text)
        if teacher is not None and not hasattr(teacher, "vision_tower"):
            raise ValueError("the student is multimodal but the teacher is a text model: distillation SFT on "
                             "chats with images needs a multimodal teacher that sees the same images")
    examples, stats = encode_conversations(conversations, tok, train_cfg.seq_len + 1, sft_cfg.truncate,
                                           student.vision_args if multimodal else None)
    rank, world = rank_world()
    loader = ChatLoader(examples, train_cfg.micro_batch_size, train_cfg.seq_len, tok.pad_id, seed=train_cfg.seed,
                        rank=rank, world_size=world)
    fp8 = False
    if sft_cfg.fp8:
        fp8 = convert_to_fp8(student.language_model if multimodal else student, device) > 0
    dcfg = DistillConfig(temperature=sft_cfg.temperature, chunk_size=sft_cfg.chunk_size)
    tflops = flops_per_token(teacher.args, train_cfg.seq_len, training=False) if teacher is not None else 0.0
    tcfg = dataclasses.replace(train_cfg, export=False) if multimodal else train_cfg  # train.export is text-only
    out = train(student, loader, loss_fn_for(teacher, dcfg, loader), tcfg, device=device, eval_fn=eval_fn,
                name=name, teacher_flops_per_token=tflops,
                run_info={"sft": dataclasses.asdict(sft_cfg), "data": stats, "fp8_active": fp8,
                          "teacher_args": dataclasses.asdict(teacher.args) if teacher is not None else None})
    if multimodal and train_cfg.export:
        out["export"] = os.path.join(train_cfg.out_dir, "model")
        if rank == 0:
            V.save_vlm(student, out["export"])
    return {**out, "data": stats, "fp8": fp8}


# -----------------------------------------------------------------------------
# FP8 linears (section 8: "fp8 training"), with a readable reference

E4M3_MAX = 448.0  # largest finite float8 e4m3fn value


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """Per-tensor scale s with x * s filling the e4m3 range: s = 448 / amax (1 for an all-zero tensor).
    fp32, so the scale of a bf16 tensor is not itself rounded."""
    amax = amax.float()
    return torch.where(amax > 0, E4M3_MAX / amax.clamp(min=1e-12), torch.ones_like(amax))


def quantize_e4m3(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x * s saturated to +-448 in float8_e4m3fn, 1 / s): x ~ x_fp8.float() * inv_scale."""
    s = fp8_scale(x.detach().abs().amax())
    x8 = (x.float() * s).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return x8, s.reciprocal()


def fp8_linear_reference(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The readable equation: quantize both operands, dequantize, matmul in fp32. What _scaled_mm computes
    (up to accumulation order), on any device."""
    x8, ix = quantize_e4m3(x)
    w8, iw = quantize_e4m3(w)
    return (x8.float() * ix) @ (w8.float() * iw).t()


def fp8_supported(device) -> tuple[bool, str]:
    """(ok, why not). Needs CUDA, compute capability >= 8.9 (Ada, Hopper, Blackwell) and torch._scaled_mm."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False, f"FP8 matmuls need a CUDA GPU with compute capability >= 8.9; this is {device.type}"
    cap = torch.cuda.get_device_capability(device)
    if cap < (8, 9):
        return False, f"FP8 matmuls need compute capability >= 8.9 (Ada/Hopper); {torch.cuda.get_device_name(device)} is {cap}"
    if not hasattr(torch, "_scaled_mm"):
        return False, f"torch {torch.__version__} has no torch._scaled_mm"
    return True, ""


class _FP8Matmul(torch.autograd.Function):
    """y = x W^T with e4m3 operands and fp32 per-tensor scales; the backward is bf16 (deviation 4)."""

    @staticmethod
    def forward(ctx, x_ND, w_OD):
        x16, w16 = x_ND.to(torch.bfloat16), w_OD.to(torch.bfloat16)
        ctx.save_for_backward(x16, w16)
        ctx.w_dtype = w_OD.dtype
        x8, ix = quantize_e4m3(x16)
        w8, iw = quantize_e4m3(w16)
        # _scaled_mm: a row-major [N, D], b column-major [D, O] (w8.t() of a row-major [O, D] is), fp32 scales
        return torch._scaled_mm(x8, w8.t(), scale_a=ix, scale_b=iw, out_dtype=torch.bfloat16)  # [N, O]

    @staticmethod
    def backward(ctx, g_NO):
        x16, w16 = ctx.saved_tensors
        g16 = g_NO.to(torch.bfloat16)
        gx = g16 @ w16  # [N, O] @ [O, D]
        gw = (g16.t() @ x16).to(ctx.w_dtype)  # [O, N] @ [N, D], into the fp32 master weight's grad
        return gx, gw


class FP8Linear(nn.Linear):
    """nn.Linear (same parameter, same state-dict key) whose forward runs in e4m3 through _scaled_mm when the
    shapes allow it (dims multiples of 16), else in bf16. The weight stays in its master precision."""

    def forward(self, x):
        D, O = self.in_features, self.out_features
        x_ND = x.reshape(-1, D)
        if x.is_cuda and D % 16 == 0 and O % 16 == 0 and x_ND.shape[0] % 16 == 0:
            y = _FP8Matmul.apply(x_ND, self.weight)
        else:
            y = F.linear(x_ND.to(torch.bfloat16), self.weight.to(torch.bfloat16))
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], O)


def convert_to_fp8(model: Transformer, device) -> int:
    """Turn the block linears into FP8Linear in place (class swap: parameters, keys and FSDP wrapping are
    untouched). Returns how many were converted: 0, with one printed line, where FP8 is unsupported."""
    ok, why = fp8_supported(device)
    if not ok:
        print(f"sft: --fp8 requested but unavailable ({why}); training in bf16 instead", file=sys.stderr)
        return 0
    n = 0
    for layer in model.layers:
        for m in layer.modules():
            if type(m) is nn.Linear:
                m.__class__ = FP8Linear
                n += 1
    return n


# -----------------------------------------------------------------------------
# Command line: train, terminal chat


@dataclass
class SFTRun:
    student: str = ""  # checkpoint folder (HF or native) to fine-tune
    teacher: Optional[str] = None  # checkpoint folder; given = KL distillation (the paper's SFT), else CE
    data: str = ""  # jsonl, one {"messages": [...]} per line
    tokenizer: Optional[str] = None  # tekken.json or a folder holding one; None = the student's, else shipped
    chat: Optional[str] = None  # checkpoint folder: talk to it in the terminal instead of training
    vision: bool = False  # --student/--teacher are multimodal checkpoints (vision.load_vlm); chats may hold images
    max_new_tokens: int = 256  # per reply in --chat
    chat_temperature: float = 0.7  # sampling temperature in --chat (0 = greedy)
    top_p: float = 0.95  # nucleus in --chat


def chat(ckpt: str, run: SFTRun, stdin=None, stdout=None) -> None:
    """A terminal conversation with a checkpoint (model.py's cached generation). Empty line or EOF ends it;
    '/reset' starts over. The oldest turns are dropped when the context would overflow."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model = load_model(ckpt, dtype=torch.float32)
    model.eval()
    tok = D.checkpoint_tokenizer(resolve_model_path(ckpt), model.args.vocab_size, run.tokenizer)
    messages: list = []
    print(f"chatting with {ckpt} ({model.args.num_params:,} parameters); empty line to quit, /reset to restart",
          file=stdout, flush=True)
    while True:
        print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line or not line.strip():
            return
        if line.strip() == "/reset":
            messages = []
            continue
        messages.append({"role": "user", "content": line.rstrip("\n")})
        ids = tok.encode_chat(messages)[0]
        while len(ids) + run.max_new_tokens > model.args.max_seq_len and len(messages) > 1:
            messages = messages[2:] if len(messages) > 2 else messages[-1:]  # drop the oldest exchange
            ids = tok.encode_chat(messages)[0]
        out = generate(model, [ids], run.max_new_tokens, temperature=run.chat_temperature, top_p=run.top_p,
                       eos_id=tok.eos_id, seed=len(messages))[0]
        stopped = bool(out) and out[-1] == tok.eos_id
        text = tok.decode(out[:-1] if stopped else out, special="keep")
        print("model> " + text + ("" if stopped else " [cut at --max-new-tokens]"), file=stdout, flush=True)
        thinking, sep, answer = text.removeprefix("[THINK]").rpartition("[/THINK]")
        msg = {"role": "assistant", "content": answer if sep else text}
        if sep:
            msg["thinking"] = thinking
        if msg["content"] or sep:
            messages.append(msg)
        else:
            messages.pop()


def main(argv=None) -> int:
    tcfg, scfg, run = configs_from_args([TrainConfig, SFTConfig, SFTRun], argv,
                                        description="SFT by CE or logit distillation (PAPER.md section 8).")
    rank = 0
    try:
        if run.chat:
            if not (os.path.isdir(run.chat) or (os.path.isfile(run.chat) and run.chat.endswith(".gguf"))):
                raise FileNotFoundError(f"--chat {run.chat!r} is not a checkpoint folder or .gguf file: pass the "
                                        f"folder sft.py exported (OUT/model)")
            chat(run.chat, run)
            return 0
        if not run.data:
            raise ValueError("nothing to do: pass --data CHATS.jsonl --student CKPT (or --chat CKPT)")
        for flag, path in (("--student", run.student), ("--teacher", run.teacher)):
            if path is not None and not os.path.isdir(path):
                raise FileNotFoundError(f"{flag} {path!r} is not a checkpoint folder (HF or Mistral-native)")
        rank, world, _, device = setup_distributed()
        if run.vision and world > 1:
            raise ValueError("--vision SFT runs in one process (the VLM is not sharded yet): drop torchrun")
        if run.vision:  # fp32 master weights; train.py's dtype sets the compute dtype
            student = V.load_vlm(run.student, dtype=torch.float32, device=device)
            teacher = V.load_vlm(run.teacher, dtype=torch.float32, device=device) if run.teacher else None
        else:
            student = build_model(run.student, tcfg, device, train=True)
            teacher = build_model(run.teacher, tcfg, device, train=False) if run.teacher else None
        if teacher is not None:
            check_vocab(student, teacher)
        tok = D.checkpoint_tokenizer(resolve_model_path(run.student), student.args.vocab_size, run.tokenizer)
        convs, _ = read_conversations(run.data, scfg.on_bad_line, tok)
        if rank == 0:
            print(json.dumps({"train": dataclasses.asdict(tcfg), "sft": dataclasses.asdict(scfg),
                              "run": dataclasses.asdict(run)}), flush=True)
        out = run_sft(student, convs, tok, tcfg, scfg, teacher, device=device)
        if rank == 0 and out["export"] and os.path.isfile(tok.path):
            shutil.copyfile(tok.path, os.path.join(out["export"], "tekken.json"))
    except (ValueError, FileNotFoundError) as e:
        if rank == 0:
            print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        teardown_distributed()
    return 0


if __name__ == "__main__":
    exit_process(main())  # under torchrun: leave without interpreter finalization (see there)
