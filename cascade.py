"""Cascade Distillation, Algorithm 1 end to end: prune, distil short, distil long, repeat.

Reading guide
-------------
Concept: PAPER.md section 1, Algorithm 1:

    parent = MS3.1
    for size in [14B, 8B, 3B]:
        init       = prune(parent, size)                       # prune.py, section 4
        short      = distill(init, teacher=MS3.1, ctx=16384)   # distill.py, section 5
        base[size] = distill(short, teacher=MS3.1, ctx=262144) # long context, YaRN + query temperature
        parent     = short                                     # the SHORT child seeds the next size

`run_cascade` below is that loop. Each stage writes a Hugging Face checkpoint and a `done.json`
under `--out/<stage>/`; a rerun skips finished stages and resumes an interrupted one from its last
training checkpoint (train.py), so the same command is safe to repeat.

Two ways to run it:
  * `python cascade.py`: the embedded default. No GPU, no downloads: a tiny Ministral-shaped parent is
    trained on text that ships with Python (data.py) with a truncated Tekken vocabulary, then
    cascaded down three sizes whose layer / hidden / FFN ratios follow 24B -> 14B -> 8B -> 3B. Ends
    with a retention table (the paper's Table 3 in miniature), a from-scratch baseline, and a plot.
  * `torchrun --nproc_per_node=8 cascade.py --preset paper --size 3b --parent PATH --data SHARDS
    --activation-checkpointing`: a real parent
    (Hugging Face or Mistral-native) and the real 14B/8B/3B shapes, FSDP2 through train.py.
  * `python cascade.py --vision`: the embedded multimodal cascade (PAPER.md section 6, the block before
    the CLI): frozen shared ViT, a fresh projector per child, the student sees the teacher's images.
  * `python cascade.py --parent smollm2 --preset cpu-real` (or `gpu-real`, or a path to any dense Llama
    .gguf file): a real pretrained parent from the package index (SmolLM2-135M-Instruct, issue 11). Its
    children take the paper's child/parent ratios of layers, width and FFN (tied stays tied), are
    distilled on the Python corpus (plus `--data`), and are also scored on held-out arithmetic through
    the chat template and on three fixed prompts, so the table shows what pruning breaks and
    distillation mends.
  * `python cascade.py --posttrain` (any of the above but the vision cascade): after the cascade (its
    finished stages are reused), every base child goes through the paper's post-training (PAPER.md
    section 8): SFT then online DPO (instruct) and SFT then GRPO then online DPO (reasoning), each step a
    resumable stage, ending with one table of held-out math accuracy, format rate, loop rate and PWRM win
    rate per size and stage (the "Post-training" section, near the end, lists its own choices a-e).

Deviations from the paper, and why:
 1. Scale: the paper distils 1-3T tokens per child at 16K then 256K context. The embedded default
    uses a few hundred thousand tokens at 128 then 256 tokens (YaRN factor 2 instead of 16, the
    query temperature's L = the short length), and revisits its small corpus for several epochs.
 2. Retention is measured as held-out cross-entropy and KL to the teacher, not benchmark scores:
    "kept" = (ln V - CE_child) / (ln V - CE_parent), the share of the parent's gain over a uniform
    guess that the child keeps (1.0 = as good as the parent).
 3. Pruning needs whole tensors: in a multi-GPU run every rank holds the full source model (24B in
    bf16: 47 GB; a later source is a child exported in fp32, 14B: 54 GB; beside its 1/N of the
    sharded teacher) and calibrates on its own share of the
    sequences; the statistics are all-reduced, so all ranks cut the same units, and rank 0 writes the
    child. Distillation is fully sharded (FSDP2) for teacher and student.
 4. The teacher stays the original parent for every size, as in the paper; `--teacher PATH` swaps it
    for the larger-teacher ablation.
 5. RoPE per stage, for every preset (Algorithm 1, PAPER.md section 5): the short stage runs plain
    RoPE, the long stage switches YaRN (factor long/short, L = the short context) and the query
    temperature on (distill.py S2), and the exported base checkpoint carries that config. The real
    14b/8b/3b presets hold the released (long-context) config, so `make_plan` strips YaRN and the
    query temperature for the short stage. The short stage keeps the child's released rope_theta
    (1e9 for 14B, 1e6 for 8B/3B); the paper is silent on it. We keep it because YaRN of the long stage
    is defined on that base (its correction range depends on theta), so the long stage changes only
    what Algorithm 1 says it changes; a pruned child from a 1e9 parent is retuned to 1e6 by
    distillation (prune.py deviation 5).
 6. Real-run defaults (`--preset paper`): no from-scratch baseline (it would pretrain a 3B on ~1.2T
    tokens; pass --baseline), and checkpoints every 1000 steps plus every 30 minutes of wall clock
    (train.py's ckpt_minutes), not every quarter of a 500K-step stage.
 7. (ours) The evaluation text is held out for real: every held-out token inside a 32-token window that
    also occurs in the training tokens is dropped (the Python corpus repeats docstrings across
    documents), and the rest is halved into a validation half, which only chooses the from-scratch
    baseline's learning rate (a sweep), and a test half, which every figure in the table reads.
 8. (ours) The from-scratch baseline trains the smallest size on as many tokens as that child's own
    distillation stages. The cascaded child also inherits everything upstream (the parent's
    pretraining, the larger children's short stages); the table reports tokens seen, upstream included.

Run: `python cascade.py` (under 5 minutes on 2 idle CPU cores), `python cascade.py --parent smollm2 --preset
cpu-real` (after `python model.py fetch smollm2`), `python cascade.py --preset gpu` (the same experiment
sized for one GPU), `python cascade.py --ablation kl_vs_mix` (3 seeds). A rerun with changed settings
refuses, naming them; `--restart-from STAGE` redoes that stage and every later one.
`rm -rf runs/demo-record && python cascade.py --out runs/demo-record --results benchmarks/demo`
regenerates the committed demo record (table, per-stage times, lr sweep, plot); `python cascade.py
--posttrain --out runs/demo-post --results benchmarks/posttrain` adds the post-training chain to it.
Depends on: model.py, data.py, prune.py, distill.py, train.py, vision.py; sft.py, grpo.py, odpo.py (--posttrain).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from matplotlib.figure import Figure  # the object-oriented API draws with Agg and sets no global backend

import data as D
import distill as DI
import grpo as G
import model as M
import odpo as O
import prune as P
import sft as S
import train as TR
import vision as V

# -----------------------------------------------------------------------------
# Config


@dataclass
class CascadeConfig:
    out: str = "runs/cascade"  # every stage's checkpoint, report and metrics go under here
    size: str = "3b"  # the last size of the cascade: 14b, 8b or 3b (Algorithm 1 stops there)
    shapes: Optional[str] = None  # custom cascade instead of --size: "layers:dim:ffn[:tied],..." e.g. "4:64:256,3:48:192:tied"
    parent: Optional[str] = None  # HF or Mistral-native checkpoint, a .gguf file, or "smollm2" (the real pretrained
    #   parent, `python model.py fetch smollm2`); None = train the embedded tiny parent
    data: Optional[str] = None  # token shards (python data.py prepare) or .txt/.jsonl; None = Python corpus
    val_data: Optional[str] = None  # held-out tokens; None = the corpus's own split
    tokenizer: Optional[str] = None  # tekken.json; None = the parent's own, else mistral-common's
    teacher: Optional[str] = None  # None = the parent (paper); a path = the larger-teacher ablation
    preset: str = "cpu"  # stage lengths: cpu (the demo, minutes on 2 cores), gpu, smoke (seconds, tests), paper (real parent)
    seed: int = 0
    # Stage lengths; None takes the preset's value.
    parent_steps: Optional[int] = None  # pretraining of the embedded parent (next-token CE)
    short_steps: Optional[int] = None  # short-context distillation per size (section 5)
    long_steps: Optional[int] = None  # long-context distillation per size
    batch_size: Optional[int] = None  # global sequences per optimizer step
    micro_batch_size: Optional[int] = None  # per rank; None = the batch split over the ranks (at most the preset's value)
    seq_len: Optional[int] = None  # short context (paper: 16384)
    long_seq_len: Optional[int] = None  # long context (paper: 262144)
    lr: Optional[float] = None  # peak learning rate of the parent's pretraining and the baseline
    distill_lr: Optional[float] = None  # peak learning rate of the distillation stages (a pruned child starts close)
    dtype: Optional[str] = None  # fp32 or bf16
    activation_checkpointing: bool = False  # recompute each block in backward (real sizes: on)
    compile: bool = False  # torch.compile each block
    teacher_cache_mb: int = 1024  # MiB of teacher outputs kept for batches seen again (distill.TeacherCache); 0 = off
    ckpt_every: Optional[int] = None  # training checkpoint every N steps (plus every 30 min); None = preset's
    calib_seqs: Optional[int] = None  # calibration sequences for pruning (paper: a few hundred)
    eval_batches: Optional[int] = None  # held-out batches (of micro-batch x world sequences) for every CE/KL figure
    max_epochs: float = 20.0  # refuse a stage that would revisit the data more often than this
    layer_selection: str = "norm_ratio"  # prune.py: norm_ratio | block_influence | random | last_k
    ce_weight: float = 0.0  # 0 = forward KL alone (paper); >0 mixes in next-token CE (ablation)
    temperature: float = 1.0  # distillation temperature T
    baseline: Optional[bool] = None  # train the smallest size from scratch on the same tokens; None = preset's
    baseline_lrs: str = "1e-3,3e-3,1e-2"  # the baseline's lr sweep; the lowest CE on the VALIDATION split is the row
    restart_from: Optional[str] = None  # redo this stage (e.g. parent, 8b/short, baseline) and every later one
    results: Optional[str] = None  # where the table, plot and lr sweep go; None = <out>/results
    ablation: Optional[str] = None  # kl_vs_mix | layer_selection | teacher: 3 seeds, mean and spread
    ablation_seeds: int = 3
    vision: bool = False  # run the embedded multimodal cascade instead (vision.py, section 6; --preset cpu or smoke)
    # Task evaluation of every model (real parents with a chat template; 0 = off): exact-answer accuracy on
    # held-out data.math_problems through the chat template with greedy decoding, and fixed sample prompts.
    math_problems: Optional[int] = None  # how many problems (issue 11: 200)
    math_level: str = "easy"  # data.math_problems level
    math_seed: int = 1000  # held out: the post-training helpers draw their problems from small seeds
    math_new_tokens: int = 12  # greedy tokens per answer ("7 + 5 = 12" is 8 tokens with digits split)
    # Post-training (section 8): after the cascade (run first, or its finished stages reused), each base child
    # goes through SFT -> online DPO (instruct) and SFT -> GRPO -> online DPO (reasoning); one table at the end.
    posttrain: bool = False
    post_sft_steps: Optional[int] = None  # optimizer steps of each SFT stage (32 chats each)
    post_grpo_steps: Optional[int] = None  # GRPO steps (32 prompts x G 8 samples each; real presets: 8 prompts)
    post_odpo_steps: Optional[int] = None  # online DPO steps per chain (8 prompts x 2 samples each)
    post_pwrm_steps: Optional[int] = None  # SFT steps of the pairwise reward model (16 chats each)
    post_eval_problems: Optional[int] = None  # held-out problems per row of the post-training table (at most 100)


# The embedded experiment. The parent's ratios follow MS3.1; each child applies the real
# child/MS3.1 ratios of layers, hidden and FFN (40/40/34/26, 5120/5120/4096/3072, 32768/16384/14336/9216).
DEMO_PARENT = {
    "cpu": M.ModelArgs(dim=160, n_layers=6, head_dim=32, hidden_dim=960, n_heads=6, n_kv_heads=2,
                       vocab_size=4096, rope_theta=1e4, max_seq_len=4096),
    # A deeper parent for the layer-selection ablation: the gpu preset's depth, scaled to a CPU budget.
    "cpu_deep": M.ModelArgs(dim=96, n_layers=12, head_dim=32, hidden_dim=576, n_heads=4, n_kv_heads=2,
                            vocab_size=4096, rope_theta=1e4, max_seq_len=4096),
    "gpu": M.ModelArgs(dim=768, n_layers=16, head_dim=64, hidden_dim=4608, n_heads=12, n_kv_heads=4,
                       vocab_size=16384, rope_theta=1e6, max_seq_len=8192),
    "smoke": M.ModelArgs(dim=64, n_layers=4, head_dim=16, hidden_dim=384, n_heads=4, n_kv_heads=2,
                         vocab_size=2048, rope_theta=1e4, max_seq_len=1024),
}
# micro_batch_size is the most sequences per rank per forward: without --micro-batch-size the batch is split
# over the ranks and each rank's share cut to at most this (derive_micro_batch).
# cpu: the 5-minute demo (issue 10). On 2 idle cores a parent step (16 x 256 tokens) costs ~1 s, a short
# distillation step 0.3-0.5 s once the teacher cache serves the repeated teacher forwards; the lengths were
# cut from 120/80/20 to 100/80/14 to fit, which costs the 3b child less than a point of "kept".
PRESET_STAGES = {
    "cpu": dict(parent_steps=100, short_steps=80, long_steps=14, batch_size=16, micro_batch_size=16,
                seq_len=128, long_seq_len=256, lr=3e-3, distill_lr=1e-3, dtype="fp32", calib_seqs=64, eval_batches=8),
    "gpu": dict(parent_steps=4000, short_steps=1500, long_steps=300, batch_size=64, micro_batch_size=16,
                seq_len=1024, long_seq_len=4096, lr=1e-3, distill_lr=3e-4, dtype="bf16", calib_seqs=256, eval_batches=8),
    # The paper's contexts for a real parent (section 1): ~1T tokens per child = 500K steps of 2M tokens.
    "paper": dict(parent_steps=0, short_steps=500_000, long_steps=5_000, batch_size=128, micro_batch_size=1,
                  seq_len=16384, long_seq_len=262144, lr=1e-4, distill_lr=1e-4, dtype="bf16", calib_seqs=256, eval_batches=8),
    "smoke": dict(parent_steps=150, short_steps=20, long_steps=6, batch_size=8, micro_batch_size=8,
                  seq_len=64, long_seq_len=128, lr=3e-3, distill_lr=1e-3, dtype="fp32", calib_seqs=16, eval_batches=8),
    # A real pretrained parent of ~100M parameters (SmolLM2-135M-Instruct, issue 11). Measured process CPU of one
    # thread (benchmarks/smollm2/probes/lr.json): a distillation step of 8 x 128 tokens (student + teacher + the
    # 49K-vocabulary KL) costs 13.8 s for the 14b child, 11.0 s for 8b (~8.9 s for 3b by FLOPs), a long step of
    # 8 x 256 about twice that; held-out CE+KL ~7.5 s per 1K tokens; the 200 math problems ~190 s for the
    # parent (less for each child). cpu-real was estimated at ~4,500 CPU-s, ~40 minutes on 2 idle cores; with
    # the teacher cache it took 3,394 CPU-s, 33 min 44 s (benchmarks/smollm2/NOTES.md), and it
    # distils ~65K short + ~33K long tokens per child. distill_lr 1e-4, not 3e-4: on a freshly pruned child
    # 3e-4 (first Adam step at full lr) raised held-out KL 7.13 -> 8.54 in 4 steps where 1e-4 lowered it to
    # 4.99 (probes/lr.json); on the head-re-tied 8b child (prune.py deviation 4) 1e-4 matches 3e-4 (6.10 ->
    # 3.27 vs 3.33). gpu-real is the same run sized for one GPU (~130M tokens per child).
    "cpu-real": dict(parent_steps=0, short_steps=64, long_steps=16, batch_size=8, micro_batch_size=8,
                     seq_len=128, long_seq_len=256, lr=3e-4, distill_lr=1e-4, dtype="fp32", calib_seqs=32,
                     eval_batches=4, math_problems=200),
    "gpu-real": dict(parent_steps=0, short_steps=2000, long_steps=200, batch_size=32, micro_batch_size=8,
                     seq_len=2048, long_seq_len=8192, lr=3e-4, distill_lr=3e-4, dtype="bf16", calib_seqs=256,
                     eval_batches=16, math_problems=200),
}
PRESET_STAGES["cpu_deep"] = dict(PRESET_STAGES["cpu"], parent_steps=120, long_steps=20)  # its record's lengths
# Real-run defaults that differ from the demos' (deviation 6); every other preset trains the baseline.
REAL_RUN_DEFAULTS = {"paper": dict(baseline=False, ckpt_every=1000)}
REAL_SMALL = ("cpu-real", "gpu-real")  # presets whose children take the paper's ratios of a real parent
REAL_SIZES = ["14b", "8b", "3b"]
RATIOS = {  # (layers, dim, ffn) of each real child relative to MS3.1 (section 2 table)
    "14b": (40 / 40, 5120 / 5120, 16384 / 32768),
    "8b": (34 / 40, 4096 / 5120, 14336 / 32768),
    "3b": (26 / 40, 3072 / 5120, 9216 / 32768),
}


def miniature(parent: M.ModelArgs, size: str, short_len: int) -> M.ModelArgs:
    """The demo child for a real size name: the parent's shape scaled by that size's ratios, with the
    real child's rope recipe (YaRN and the query temperature, L = the short context) and tying. A tied
    parent's children stay tied (SmolLM2 is tied at every size)."""
    rl, rd, rf = RATIOS[size]
    real = M.ModelArgs.preset(size)
    return dataclasses.replace(
        parent, n_layers=max(1, round(parent.n_layers * rl)), dim=8 * max(1, round(parent.dim * rd / 8)),
        hidden_dim=8 * max(1, round(parent.hidden_dim * rf / 8)),
        tied_embeddings=real.tied_embeddings or parent.tied_embeddings,
        yarn_factor=None, qtemp_beta=None, yarn_original_max_pos=short_len, qtemp_original_max_pos=short_len)


def short_stage_args(a: M.ModelArgs, short_len: int) -> M.ModelArgs:
    """A child's short-stage RoPE (deviation 5): its own rope_theta, no YaRN, no query temperature, with L
    recorded as the short context so the long stage's switch (distill.long_context_args) sets the rest."""
    return dataclasses.replace(a, yarn_factor=None, qtemp_beta=None, yarn_original_max_pos=short_len,
                               qtemp_original_max_pos=short_len, max_seq_len=short_len)


def resolved(cfg: CascadeConfig, world: int = 1) -> CascadeConfig:
    """Fill the None stage lengths from the preset (and the real-run defaults, deviation 6), derive the
    micro-batch from the world size, and check every value (validate): a bad one fails here, before any
    data is read."""
    if cfg.preset not in PRESET_STAGES:
        raise ValueError(f"--preset {cfg.preset!r} is unknown: choose one of {', '.join(PRESET_STAGES)}")
    if cfg.parent is None and cfg.preset not in DEMO_PARENT:
        raise ValueError(f"--preset {cfg.preset} sizes a run on a real parent: give --parent PATH (or smollm2)")
    preset = {**PRESET_STAGES[cfg.preset], "baseline": True, **REAL_RUN_DEFAULTS.get(cfg.preset, {})}
    cfg = dataclasses.replace(cfg, **{k: v for k, v in preset.items() if getattr(cfg, k) is None
                                      and k != "micro_batch_size"})
    if cfg.math_problems is None:
        cfg = dataclasses.replace(cfg, math_problems=0)
    cfg = dataclasses.replace(cfg, **{k: v for k, v in POST_STAGES[cfg.preset].items() if getattr(cfg, k) is None})
    if cfg.micro_batch_size is None:
        cfg = dataclasses.replace(cfg, micro_batch_size=derive_micro_batch(cfg.batch_size, world,
                                                                           preset["micro_batch_size"]))
    validate(cfg, world)
    return cfg


def derive_micro_batch(batch_size: int, world: int, cap: int) -> int:
    """Sequences per rank per forward when --micro-batch-size is not given: the largest divisor of the
    rank's share of the batch that is at most `cap`, so any world size dividing the batch works."""
    if batch_size <= 0:
        return batch_size  # validate() names the problem
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} cannot be split over {world} processes: give a batch size "
                         f"that is a multiple of {world}, or run on a number of processes that divides it")
    share = batch_size // world
    return max(d for d in range(1, min(cap, share) + 1) if share % d == 0)


def parse_lrs(text: str) -> list:
    try:
        lrs = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        lrs = []
    if not lrs or not all(math.isfinite(x) and x > 0 for x in lrs):
        raise ValueError(f"--baseline-lrs {text!r} is not a comma-separated list of positive learning rates, "
                         f"e.g. 3e-4,1e-3,3e-3")
    return lrs


def validate(cfg: CascadeConfig, world: int):
    """One clear error for the first bad value, before any data is read or any model is built."""
    def bad(flag, value, fix):
        raise ValueError(f"--{flag} {value} {fix}")

    if cfg.layer_selection not in P.LAYER_METHODS:
        bad("layer-selection", repr(cfg.layer_selection), f"is unknown: choose one of {', '.join(P.LAYER_METHODS)}")
    if not cfg.temperature > 0:
        bad("temperature", cfg.temperature, "must be > 0: the distillation softmax divides the logits by it")
    if not 0 <= cfg.ce_weight <= 1:
        bad("ce-weight", cfg.ce_weight, "must be in [0, 1]: the loss is (1 - w) KL + w CE (0 = the paper's KL alone)")
    counts = ["short_steps", "long_steps", "batch_size", "micro_batch_size", "seq_len", "long_seq_len",
              "calib_seqs", "eval_batches", "ablation_seeds"] + (["parent_steps"] if cfg.parent is None else [])
    for k in counts:
        if getattr(cfg, k) < 1:
            bad(k.replace("_", "-"), getattr(cfg, k), "must be at least 1" + (
                ": with no held-out batch every row would read 100% kept" if k == "eval_batches" else ""))
    for k in ("post_sft_steps", "post_grpo_steps", "post_odpo_steps", "post_pwrm_steps", "post_eval_problems"):
        if getattr(cfg, k) < 1:
            bad(k.replace("_", "-"), getattr(cfg, k), "must be at least 1")
    if cfg.post_eval_problems > POST["held_out"]:
        bad("post-eval-problems", cfg.post_eval_problems, f"is more than the {POST['held_out']} held-out problems")
    if cfg.posttrain and (world > 1 or cfg.ablation or cfg.vision):
        bad("posttrain", "", "runs in one process on the text cascade: drop torchrun (online DPO runs at world "
            "size 1), --ablation and --vision")
    if cfg.math_problems < 0:
        bad("math-problems", cfg.math_problems, "must be at least 0 (0 = no task evaluation)")
    if cfg.math_new_tokens < 1:
        bad("math-new-tokens", cfg.math_new_tokens, "must be at least 1")
    if cfg.teacher_cache_mb < 0:
        bad("teacher-cache-mb", cfg.teacher_cache_mb, "must be at least 0 (0 = no teacher cache)")
    if cfg.ckpt_every is not None and cfg.ckpt_every < 1:
        bad("ckpt-every", cfg.ckpt_every, "must be at least 1 (or none for two per stage)")
    for k in ("lr", "distill_lr", "max_epochs"):
        if not (math.isfinite(getattr(cfg, k)) and getattr(cfg, k) > 0):
            bad(k.replace("_", "-"), getattr(cfg, k), "must be a positive number")
    if cfg.long_seq_len < cfg.seq_len:
        bad("long-seq-len", cfg.long_seq_len, f"is below --seq-len {cfg.seq_len}: the long stage must not be shorter")
    if cfg.dtype not in ("fp32", "bf16"):
        bad("dtype", repr(cfg.dtype), "is unknown: choose fp32 or bf16")
    if cfg.batch_size % (cfg.micro_batch_size * world):
        bad("batch-size", cfg.batch_size, f"is not a multiple of --micro-batch-size {cfg.micro_batch_size} x "
            f"{world} processes = {cfg.micro_batch_size * world}: change either, or leave --micro-batch-size out "
            f"to derive it from the world size")
    if cfg.ablation is not None and cfg.ablation not in ABLATIONS:
        bad("ablation", repr(cfg.ablation), f"is unknown: choose one of {', '.join(ABLATIONS)}")
    parse_lrs(cfg.baseline_lrs)


# -----------------------------------------------------------------------------
# The plan: every shape, checked before any long work starts


@dataclass
class Plan:
    parent_args: M.ModelArgs
    sizes: list  # [(name, ModelArgs)] in cascade order
    fingerprint: dict = field(default_factory=dict)


def parse_shapes(text: str, parent: M.ModelArgs) -> list:
    """--shapes "L:D:F[:tied],..." -> [(name, ModelArgs)]: the parent's heads, vocabulary and rope recipe."""
    sizes = []
    for i, item in enumerate(text.split(",")):
        parts = item.strip().split(":")
        try:
            if len(parts) not in (3, 4) or (len(parts) == 4 and parts[3] != "tied"):
                raise ValueError
            L, d, f = (int(p) for p in parts[:3])
        except ValueError:
            raise ValueError(f"--shapes item {item!r} is not layers:dim:ffn[:tied] with integers, e.g. 3:48:192:tied") from None
        if min(L, d, f) <= 0:
            raise ValueError(f"--shapes item {item!r} has a zero or negative size: every number must be positive")
        sizes.append((f"s{i + 1}_{L}x{d}x{f}", dataclasses.replace(parent, n_layers=L, dim=d, hidden_dim=f,
                                                                   tied_embeddings=len(parts) == 4)))
    return sizes


def make_plan(cfg: CascadeConfig) -> Plan:
    if cfg.size not in REAL_SIZES:
        raise ValueError(f"--size {cfg.size!r} is not a cascade size: choose 14b, 8b or 3b (or give --shapes)")
    names = REAL_SIZES[: REAL_SIZES.index(cfg.size) + 1]
    if cfg.parent is None:
        parent = DEMO_PARENT[cfg.preset]
    else:
        parent = read_parent_args(cfg.parent)  # raises one clear line for an unreadable parent
    if cfg.shapes:
        sizes = parse_shapes(cfg.shapes, parent)
    elif cfg.parent is None or cfg.preset in REAL_SMALL:
        sizes = [(n, miniature(parent, n, cfg.seq_len)) for n in names]
    else:  # the released configs are the long-context ones: the short stage runs plain RoPE (deviation 5)
        sizes = [(n, short_stage_args(M.ModelArgs.preset(n), cfg.seq_len)) for n in names]
    for name, a in sizes:
        for k in ("n_layers", "dim", "hidden_dim"):
            if getattr(a, k) > getattr(parent, k):
                raise ValueError(f"size {name} needs {k}={getattr(a, k)} but the parent has {getattr(parent, k)}: "
                                 f"the cascade only prunes; pick a smaller --size / --shapes or a larger parent")
        if (a.n_heads, a.n_kv_heads, a.head_dim, a.vocab_size) != (parent.n_heads, parent.n_kv_heads, parent.head_dim, parent.vocab_size):
            raise ValueError(f"size {name} has heads/vocab {(a.n_heads, a.n_kv_heads, a.head_dim, a.vocab_size)} but the "
                             f"parent has {(parent.n_heads, parent.n_kv_heads, parent.head_dim, parent.vocab_size)}: heads "
                             f"and vocabulary are never pruned (PAPER.md section 4); use a Mistral-family parent")
    fp = {k: getattr(cfg, k) for k in FIRST_STAGE_CHANGED if k not in ("parent_args", "sizes", "post_recipe")}
    fp["parent_args"] = dataclasses.asdict(parent)
    fp["sizes"] = [[n, a.n_layers, a.dim, a.hidden_dim, a.tied_embeddings] for n, a in sizes]
    if not cfg.baseline or cfg.preset in REAL_SMALL:  # no baseline stage runs: its sweep changes nothing
        fp["baseline_lrs"] = None
    fp["post_recipe"] = post_recipe(cfg)  # task, batch sizes and rates of every post-training stage
    if cfg.restart_from is not None and cfg.restart_from not in stage_order(sizes):
        raise ValueError(f"--restart-from {cfg.restart_from!r} is not a stage of this run: choose one of "
                         f"{', '.join(stage_order(sizes))}")
    return Plan(parent, sizes, fp)


def read_parent_args(parent: str) -> M.ModelArgs:
    """ModelArgs of a checkpoint folder, a .gguf file or a fetched model's name (read from the cache)."""
    path = M.resolve_model_path(parent)
    if M.is_gguf(path):
        _, reader = M.gguf_reader(path)
        return M.args_from_gguf(reader, path)
    return M.read_checkpoint_args(path)[0]


# Every setting a finished stage depends on, mapped to the first stage (in stage_order) it changes. A rerun
# whose settings differ refuses, naming them; --restart-from that stage (or an earlier one) redoes it and
# everything after it. Evaluation settings (--eval-batches, the held-out data) are keyed in each eval.json
# instead and simply recomputed. Micro-batch, world size, checkpointing, compile and the teacher cache change
# no result.
FIRST_STAGE_CHANGED = {
    **dict.fromkeys(("parent", "parent_args", "data", "tokenizer", "preset", "seed", "parent_steps", "lr",
                     "batch_size", "long_seq_len", "dtype"), "parent"),
    **dict.fromkeys(("sizes", "seq_len", "layer_selection", "calib_seqs"), "init"),
    **dict.fromkeys(("teacher", "short_steps", "distill_lr", "temperature", "ce_weight"), "short"),
    "long_steps": "long",
    "baseline_lrs": "baseline",
    # post-training (--posttrain): the first stage of that kind, in stage_order
    "post_sft_steps": "instruct_sft", "post_pwrm_steps": "pwrm", "post_odpo_steps": "instruct_odpo",
    "post_grpo_steps": "grpo", "post_recipe": "instruct_sft",
}
POST_KEYS = ("post_sft_steps", "post_pwrm_steps", "post_odpo_steps", "post_grpo_steps", "post_recipe")


def stage_order(sizes: list) -> list:
    """Pretraining, then post-training (--posttrain): every SFT (the largest size teaches), the PWRM (from the
    smallest instruct SFT), then each size's ODPO and GRPO stages. A restart removes a stage and all after it."""
    return (["parent"] + [f"{n}/{s}" for n, _ in sizes for s in ("init", "short", "long")] + ["baseline"]
            + [f"{n}/{s}" for n, _ in sizes for s in ("instruct_sft", "reasoning_sft")] + ["post/pwrm"]
            + [f"{n}/{s}" for n, _ in sizes for s in ("instruct_odpo", "grpo", "reasoning_odpo")])


def first_changed_stage(diff: list, ours: dict, theirs: dict, order: list) -> str:
    first = len(order) - 1
    for k in diff:
        where = FIRST_STAGE_CHANGED.get(k, "parent")
        if where == "parent":
            i = 0
        elif where == "baseline":
            i = order.index("baseline")
        elif where in POST_KINDS:
            i = next(j for j, s in enumerate(order) if s.endswith("/" + where))
        else:
            size = 0  # the first child whose shape (or whose parent's shape) differs
            if k == "sizes":
                a, b = ours.get("sizes") or [], theirs.get("sizes") or []
                size = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            i = order.index(f"{ours['sizes'][size][0]}/{where}") if size < len(ours["sizes"]) else order.index("baseline")
        first = min(first, i)
    return order[first]


def claim_out_dir(cfg: CascadeConfig, plan: Plan, rank: int, write: bool = True):
    """Refuse an --out that holds stages run with other settings, unless --restart-from names the first
    stage they change (or an earlier one); then that stage and every later one are deleted and redone.
    Record our settings otherwise."""
    path = os.path.join(cfg.out, "run.json")
    order = stage_order(plan.sizes)
    ours = json.loads(json.dumps(plan.fingerprint))
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f).get("fingerprint", {})
        # post-training settings matter only once a post-training stage exists (a run made before --posttrain
        # existed has none of them; a cascade run without --posttrain has them but no stage that used them)
        post_ran = any(os.path.exists(os.path.join(cfg.out, s)) for s in order if s.split("/")[-1] in POST_KINDS)
        diff = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)
                and not (k in POST_KEYS and not post_ran)
                and not (k == "baseline_lrs" and None in (ours.get(k), theirs.get(k)))]  # one side ran no baseline
        if diff:
            first = first_changed_stage(diff, ours, theirs, order)
            shown = ", ".join(k if isinstance(ours.get(k), (dict, list)) else f"{k} {theirs.get(k)} -> {ours.get(k)}"
                              for k in diff)
            if cfg.restart_from is None:
                raise ValueError(f"--out {cfg.out} holds stages run with other settings ({shown}): pass --restart-from "
                                 f"{first} to redo {first} and every later stage, or choose a new --out")
            if order.index(cfg.restart_from) > order.index(first):
                raise ValueError(f"--restart-from {cfg.restart_from} would keep stage {first}, which the changed "
                                 f"settings ({shown}) alter: restart from {first} or earlier")
    elif os.path.isdir(cfg.out) and os.listdir(cfg.out):
        raise ValueError(f"--out {cfg.out} is not empty and holds no run.json: choose a new --out")
    if not write:  # the up-front check (prepare, before the data is read): nothing is written, no barrier
        return
    TR.barrier()  # every rank has looked before rank 0 writes (else a peer sees run.json.tmp-* and fails)
    if rank == 0:
        if cfg.restart_from is not None and os.path.isdir(cfg.out):
            redo = order[order.index(cfg.restart_from):]
            # ablations hang off the parent and the run's settings: they are redone with any restart
            for name in redo + list(ABLATIONS) + ["larger_teacher"]:
                shutil.rmtree(os.path.join(cfg.out, name), ignore_errors=True)
            print(f"--restart-from {cfg.restart_from}: removed stages {', '.join(redo)}", flush=True)
        os.makedirs(cfg.out, exist_ok=True)
        TR.write_json_atomic(path, {"fingerprint": plan.fingerprint, "config": dataclasses.asdict(cfg)})


# -----------------------------------------------------------------------------
# Data


def load_data(cfg: CascadeConfig, plan: Plan):
    tok_path = cfg.tokenizer
    if tok_path is None and cfg.parent and os.path.exists(os.path.join(cfg.parent, "tekken.json")):
        tok_path = os.path.join(cfg.parent, "tekken.json")
    if tok_path is None and cfg.parent and M.is_gguf(M.resolve_model_path(cfg.parent)):
        tok_path = M.resolve_model_path(cfg.parent)  # a GGUF file carries its tokenizer (BPE + ChatML)
    # A tiny parent's vocabulary is a truncated Tekken (data.py, deviation 2); a real one is the whole file.
    tok = D.Tokenizer.from_file(tok_path, vocab_size=plan.parent_args.vocab_size)
    if tok.vocab_size != plan.parent_args.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} ids but the parent's vocabulary is "
                         f"{plan.parent_args.vocab_size}: pass the parent's own tekken.json with --tokenizer")
    if cfg.data is None or cfg.preset in REAL_SMALL:
        train_docs, val_docs = D.python_corpus(val_fraction=0.15, seed=cfg.seed)  # ~9% of tokens held out
        train_tokens, held = D.tokenize_documents(train_docs, tok), D.tokenize_documents(val_docs, tok)
        if cfg.data is not None:  # a real parent distils on the Python corpus plus the user's text
            train_tokens = np.concatenate([train_tokens, _tokens_from(cfg.data, tok)])
        if cfg.val_data is not None:
            held = np.concatenate([held, _tokens_from(cfg.val_data, tok)])
    else:
        train_tokens = _tokens_from(cfg.data, tok)  # a folder of shards: a data.ShardedTokens over memmaps
        if cfg.val_data:
            held = _tokens_from(cfg.val_data, tok)
        else:
            n_val = max(len(train_tokens) // 50, 2 * (cfg.eval_batches * cfg.micro_batch_size + 1) * cfg.seq_len + 2)
            if n_val * 2 > len(train_tokens):
                raise ValueError(f"--data {cfg.data} holds {len(train_tokens)} tokens, too few to hold out {n_val} "
                                 f"for evaluation: give more data or --val-data")
            train_tokens, held = train_tokens[:-n_val], train_tokens[-n_val:]
    held = np.asarray(held)  # the held-out text is small: in memory (de-duplication, hashing, == eos_id)
    held, info = D.dedupe_heldout(train_tokens, held, D.DEDUP_NGRAM, tok.bos_id, tok.eos_id)
    val_tokens, test_tokens = D.split_in_two(held, tok.eos_id)
    return tok, train_tokens, val_tokens, test_tokens, info


def _tokens_from(path: str, tok):
    if path.endswith((".txt", ".jsonl")):
        return D.tokenize_documents(D.read_documents([path]), tok)
    return D.load_tokens(path, tok)


def check_data(cfg: CascadeConfig, n_train: int, n_val: int, n_test: int, world: int):
    needs = {"short": cfg.short_steps * cfg.batch_size * cfg.seq_len,
             "long": cfg.long_steps * cfg.batch_size * cfg.long_seq_len}
    if cfg.parent is None:
        needs["parent"] = cfg.parent_steps * cfg.batch_size * cfg.long_seq_len
    for stage, n in needs.items():
        if n > cfg.max_epochs * n_train:
            raise ValueError(f"the {stage} stage needs {n:,} tokens but the data has {n_train:,} (--max-epochs "
                             f"{cfg.max_epochs}): give more data, fewer steps, or raise --max-epochs")
    need_val = cfg.eval_batches * (cfg.micro_batch_size * world) * cfg.seq_len + 1
    if min(n_val, n_test) < need_val:
        raise ValueError(f"each held-out half (validation {n_val:,}, test {n_test:,} tokens after de-duplication) "
                         f"needs the {need_val:,} tokens that --eval-batches {cfg.eval_batches} reads: give more "
                         f"--val-data or lower --eval-batches")


# -----------------------------------------------------------------------------
# Stages


class Stages:
    """Finished stages are skipped: their checkpoint and done.json are read back instead. done.json also
    records the stage's wall and CPU seconds (of the session that finished it)."""

    def __init__(self, cfg, ctx):
        self.cfg, self.ctx = cfg, ctx
        self.started = {}

    def dir(self, name):
        return os.path.join(self.cfg.out, name)

    def done(self, name) -> Optional[dict]:
        path = os.path.join(self.dir(name), "done.json")
        while self.ctx.world == 1 and self.claim(name) == "busy":
            log(self.ctx, f"== stage {name}: being made by another process, waiting")
            time.sleep(5)
        if os.path.exists(path):
            log(self.ctx, f"== stage {name}: finished earlier, skipped")
            with open(path) as f:
                return json.load(f)
        self.started[name] = (time.time(), TR.cpu_seconds())
        return None

    def claim(self, name) -> str:
        """Single-process runs on one --out (the ablations side by side, or one ablation in several
        processes) share stages: the first to reach a stage claims it with a lock file holding its pid.
        Returns "done", "mine" (claimed, or ours already) or "busy" (another live process holds it). A
        lock whose process has died is taken over (that stage then resumes from its checkpoint)."""
        if os.path.exists(os.path.join(self.dir(name), "done.json")):
            return "done"
        lock = os.path.join(self.dir(name), "running.pid")
        os.makedirs(self.dir(name), exist_ok=True)
        while True:
            try:
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                try:
                    with open(lock) as f:
                        pid = int(f.read().strip())
                    if pid == os.getpid():
                        return "mine"
                    os.kill(pid, 0)  # raises ProcessLookupError if that process is gone
                except FileNotFoundError:
                    continue  # just released
                except ValueError:
                    return "busy"  # created, pid not yet written
                except ProcessLookupError:
                    with contextlib.suppress(FileNotFoundError):
                        os.remove(lock)  # stale: its process died
                    continue
                except PermissionError:
                    pass  # alive, another user's
                return "done" if os.path.exists(os.path.join(self.dir(name), "done.json")) else "busy"
            with os.fdopen(fd, "w") as f:
                f.write(str(os.getpid()))
            return "mine"

    def finish(self, name, info: dict) -> dict:
        """train() has exported <stage>/model; done.json marks the stage finished. The export is what later
        stages read, so the stage's training checkpoints are deleted (they only served a resume)."""
        t0, c0 = self.started.pop(name, (time.time(), TR.cpu_seconds()))
        info = info | {"seconds": round(time.time() - t0, 2), "cpu_seconds": round(TR.cpu_seconds() - c0, 2)}
        if self.ctx.rank == 0:
            TR.write_json_atomic(os.path.join(self.dir(name), "done.json"), info)
            shutil.rmtree(os.path.join(self.dir(name), "ckpt"), ignore_errors=True)
            if os.path.exists(os.path.join(self.dir(name), "running.pid")):
                os.remove(os.path.join(self.dir(name), "running.pid"))
        TR.barrier()
        return info

    def info(self, name) -> dict:
        """The stage's done.json ({} for a stage this run did not make, e.g. a given --parent)."""
        path = os.path.join(self.dir(name), "done.json")
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device
    train_tokens: np.ndarray
    val_tokens: np.ndarray  # validation half of the de-duplicated held-out text: chooses the baseline's lr
    test_tokens: np.ndarray  # test half: every CE and KL in the tables
    heldout: dict = field(default_factory=dict)  # the de-duplication record (overlap before and after)
    tok: Optional[D.Tokenizer] = None  # for the task evaluation (chat template, decoding)

    def split(self, name: str) -> np.ndarray:
        return {"val": self.val_tokens, "test": self.test_tokens}[name]


def train_config(cfg: CascadeConfig, ctx: Context, out_dir: str, steps: int, seq_len: int, lr=None) -> TR.TrainConfig:
    return TR.TrainConfig(out_dir=out_dir, steps=steps, batch_size=cfg.batch_size,
                          micro_batch_size=cfg.micro_batch_size, seq_len=seq_len, lr=lr or cfg.lr,
                          warmup_steps=max(1, steps // 10), dtype=cfg.dtype, seed=cfg.seed, resume=True,
                          ckpt_every=cfg.ckpt_every or max(1, steps // 2), keep_checkpoints=1,
                          log_every=max(1, steps // 25),
                          activation_checkpointing=cfg.activation_checkpointing, compile=cfg.compile)


def loader(ctx: Context, tokens, cfg: CascadeConfig, seq_len: int, seed: int):
    return D.PackedLoader(tokens, cfg.micro_batch_size, seq_len, seed=seed, rank=ctx.rank, world_size=ctx.world)


def build(source, ctx: Context, cfg: CascadeConfig, train=True):
    """A checkpoint path or a ModelArgs (fresh init) -> a model built on meta, sharded, materialised (train.py)."""
    return TR.build_model(source, train_config(cfg, ctx, "", 1, cfg.seq_len), ctx.device, train=train,
                          init_seed=cfg.seed)


def evaluate(student, teacher, ctx: Context, cfg: CascadeConfig, seq_len: int, split: str = "test") -> dict:
    held = loader(ctx, ctx.split(split), cfg, seq_len, seed=1234)
    return DI.evaluate_pair(student, teacher, held, cfg.eval_batches)


def stage_parent(cfg, ctx, stages: Stages, plan: Plan) -> str:
    """The parent checkpoint path: the user's, or the embedded tiny parent trained here. A .gguf parent
    is dequantised once into an HF checkpoint (fp32) that every later stage reads like any other."""
    name = "parent"
    if cfg.parent is not None and M.is_gguf(M.resolve_model_path(cfg.parent)):
        if stages.done(name) is None:
            src = M.resolve_model_path(cfg.parent)
            t0, c0 = time.time(), time.process_time()
            model = M.load_model(src)
            if ctx.rank == 0:
                M.save_model(model, os.path.join(stages.dir(name), "model"))
            TR.barrier()
            stages.finish(name, {"source": src, "params": M.num_params(model.args),
                                 "load_s": time.time() - t0, "load_cpu_s": time.process_time() - c0})
            del model
        return os.path.join(stages.dir(name), "model")
    if cfg.parent is not None:
        return cfg.parent
    if stages.done(name) is None:
        log(ctx, f"== stage {name}: pretrain the tiny parent ({M.num_params(plan.parent_args):,} parameters) "
                 f"for {cfg.parent_steps} steps at {cfg.long_seq_len} tokens")
        model = build(plan.parent_args, ctx, cfg)
        tcfg = train_config(cfg, ctx, stages.dir(name), cfg.parent_steps, cfg.long_seq_len)
        TR.train(model, loader(ctx, ctx.train_tokens, cfg, cfg.long_seq_len, cfg.seed), DI.ce_loss_fn(DI.DistillConfig()),
                 tcfg, device=ctx.device, name=name)
        stages.finish(name, {"tokens": cfg.parent_steps * cfg.batch_size * cfg.long_seq_len})
    return os.path.join(stages.dir(name), "model")


def stage_prune(cfg, ctx, stages, name, source_path, target: M.ModelArgs) -> str:
    """Deviation 3: every rank holds the full source model on its device and calibrates on its own share
    of the sequences; prune.py all-reduces the statistics, so every rank makes the same cuts; rank 0
    writes the child."""
    if stages.done(name) is None:
        log(ctx, f"== stage {name}: prune {source_path} to layers={target.n_layers} dim={target.dim} ffn={target.hidden_dim}")
        parent = M.load_model(source_path, device=ctx.device)
        calib_loader = loader(ctx, ctx.train_tokens, cfg, cfg.seq_len, seed=cfg.seed + 7)
        n_batches = max(1, cfg.calib_seqs // (cfg.micro_batch_size * ctx.world))
        calib = [calib_loader.batch(i)[0].to(ctx.device) for i in range(n_batches)]
        child, report = P.prune(parent, target, calib, P.PruneConfig(layer_method=cfg.layer_selection, seed=cfg.seed))
        if ctx.rank == 0:
            M.save_model(child, os.path.join(stages.dir(name), "model"))
            TR.write_json_atomic(os.path.join(stages.dir(name), "report.json"), P.report_to_json(report))
        TR.barrier()
        stages.finish(name, {"params": M.num_params(child.args)})
        del parent, child
    return os.path.join(stages.dir(name), "model")


def stage_distill(cfg, ctx, stages, name, init_path, teacher, long_context: bool, steps: int, seed: int) -> str:
    if stages.done(name) is None:
        seq = cfg.long_seq_len if long_context else cfg.seq_len
        args, _ = M.read_checkpoint_args(init_path)
        log(ctx, f"== stage {name}: distil {M.num_params(args):,} parameters for {steps} steps at {seq} tokens"
                 f"{' (YaRN + query temperature)' if long_context else ''}")
        student = build(init_path, ctx, cfg)
        tcfg = train_config(cfg, ctx, stages.dir(name), steps, seq, lr=cfg.distill_lr)
        dcfg = DI.DistillConfig(temperature=cfg.temperature, ce_weight=cfg.ce_weight,
                                long_yarn_factor=cfg.long_seq_len / cfg.seq_len,
                                long_original_max_pos=cfg.seq_len)
        DI.distill(student, teacher, loader(ctx, ctx.train_tokens, cfg, seq, seed), tcfg, dcfg, device=ctx.device,
                   long_context=long_context)
        stages.finish(name, {"tokens": steps * cfg.batch_size * seq})
    return os.path.join(stages.dir(name), "model")


def stage_eval(cfg, ctx, stages, name, path, teacher, seq_len, split="test") -> dict:
    """Held-out CE and KL of a checkpoint, cached in <stage>/eval_<split>.json under a key of everything
    the figure depends on besides the checkpoint (the held-out tokens, how many windows, their length):
    another --eval-batches or held-out text recomputes it."""
    cache = os.path.join(stages.dir(name), f"eval_{split}.json")
    key = {"split": split, "tokens_sha1": hashlib.sha1(ctx.split(split).tobytes()).hexdigest(),
           "sequences": cfg.eval_batches * cfg.micro_batch_size * ctx.world, "seq_len": seq_len,
           "teacher": teacher is not None}
    if os.path.exists(cache):
        with open(cache) as f:
            cached = json.load(f)
        if cached.get("key") == key:
            return cached["result"]
    args, _ = M.read_checkpoint_args(path)
    model = build(path, ctx, cfg, train=False)
    result = evaluate(model, teacher, ctx, cfg, seq_len, split) | {"params": M.num_params(args)}
    if ctx.rank == 0:
        TR.write_json_atomic(cache, {"key": key, "result": result})
    TR.barrier()
    return result


SAMPLE_PROMPTS = ("What is the capital of France?", "What is 7 + 5?",
                  "Write a Python function that returns the square of a number.")
SAMPLE_TOKENS = 32


def stage_tasks(cfg, ctx, stages, name, path) -> dict:
    """Exact-answer accuracy on cfg.math_problems held-out problems, asked through the tokenizer's chat
    template and answered greedily, and greedy answers to SAMPLE_PROMPTS; cached in <stage>/tasks.json.
    Generation (and the cache) is rank 0's alone (model.generate is single-process); every rank meets at
    the barrier, so a cache written meanwhile cannot send one rank past it."""
    cache = os.path.join(stages.dir(name), "tasks.json")
    if not cfg.math_problems:
        return {}
    want = {"math_total": cfg.math_problems, "math_level": cfg.math_level, "math_seed": cfg.math_seed,
            "math_new_tokens": cfg.math_new_tokens}
    result = {}
    if ctx.rank == 0 and os.path.exists(cache):  # another --math-problems / level / seed / length recomputes it
        with open(cache) as f:
            cached = json.load(f)
        if all(cached.get(k) == v for k, v in want.items()):
            result = cached
    if ctx.rank == 0 and not result:
        t0, c0 = time.time(), time.process_time()
        model = M.load_model(path, device=ctx.device).eval()
        tok = ctx.tok
        probs = D.math_problems(cfg.math_problems, seed=cfg.math_seed, level=cfg.math_level)
        prompts = [tok.encode_chat([{"role": "user", "content": p["question"]}])[0] for p in probs]
        answers = []
        for i in range(0, len(prompts), 200):  # bounded batches: the KV cache grows with the batch
            answers += M.generate(model, prompts[i:i + 200], cfg.math_new_tokens, eos_id=tok.eos_id)
        texts = [tok.decode(a) for a in answers]
        correct = [D.check_math_answer(t, p["answer"]) for t, p in zip(texts, probs)]
        samples = M.generate(model, [tok.encode_chat([{"role": "user", "content": q}])[0] for q in SAMPLE_PROMPTS],
                             SAMPLE_TOKENS, eos_id=tok.eos_id)
        result = {"math_correct": sum(correct), "math_total": len(probs), "math_accuracy": sum(correct) / len(probs),
                  "math_level": cfg.math_level, "math_seed": cfg.math_seed, "math_new_tokens": cfg.math_new_tokens,
                  "math_examples": [{"question": p["question"], "answer": p["answer"], "output": t}
                                    for p, t in list(zip(probs, texts))[:5]],
                  "samples": [{"prompt": q, "output": tok.decode(a)} for q, a in zip(SAMPLE_PROMPTS, samples)],
                  "wall_s": time.time() - t0, "cpu_s": time.process_time() - c0}
        TR.write_json_atomic(cache, result)
        del model
    TR.barrier()
    return result


def stage_baseline(cfg, ctx, stages, name, args: M.ModelArgs, tokens_budget: int, seq_len: int) -> dict:
    """The smallest size from random initialisation, trained with next-token CE on as many tokens as its
    cascade child's own distillation stages, once per learning rate of --baseline-lrs. The run with the
    lowest CE on the VALIDATION half of the held-out text is the baseline; the test half, which every
    row of the table reads, plays no part in the choice. Returns {"path", "lr", "sweep", "tokens", ...}."""
    steps = max(1, tokens_budget // (cfg.batch_size * seq_len))
    sweep = []
    for lr in parse_lrs(cfg.baseline_lrs):
        sub = f"{name}/lr_{lr:g}"
        if stages.done(sub) is None:
            log(ctx, f"== stage {sub}: train {M.num_params(args):,} parameters from scratch for {steps} steps at lr {lr:g}")
            model = build(args, ctx, cfg)
            tcfg = train_config(cfg, ctx, stages.dir(sub), steps, seq_len, lr=lr)
            TR.train(model, loader(ctx, ctx.train_tokens, cfg, seq_len, cfg.seed + 99),
                     DI.ce_loss_fn(DI.DistillConfig()), tcfg, device=ctx.device, name=sub)
            stages.finish(sub, {"tokens": steps * cfg.batch_size * seq_len, "lr": lr})
            del model
        path = os.path.join(stages.dir(sub), "model")
        val = stage_eval(cfg, ctx, stages, sub, path, None, seq_len, split="val")
        info = stages.info(sub)
        sweep.append({"lr": lr, "stage": sub, "val_ce": val["ce"], "val_tokens": val["tokens"], "steps": steps,
                      "tokens": info["tokens"], "seconds": info["seconds"], "cpu_seconds": info["cpu_seconds"]})
    best = min(sweep, key=lambda r: r["val_ce"])
    return {"path": os.path.join(stages.dir(best["stage"]), "model"), "stage": best["stage"], "lr": best["lr"],
            "tokens": best["tokens"], "sweep": sweep, "seconds": sum(r["seconds"] for r in sweep),
            "cpu_seconds": sum(r["cpu_seconds"] for r in sweep)}


# -----------------------------------------------------------------------------
# Algorithm 1


def prepare(cfg: CascadeConfig, rank: int, world: int, device) -> tuple[Context, Plan]:
    """Every check that can fail, before any long work: shapes, parent, teacher, data, --out."""
    t0 = time.time()
    log(rank, "config: " + json.dumps(dataclasses.asdict(cfg)))
    plan = make_plan(cfg)
    if cfg.teacher is not None:
        M.read_checkpoint_args(cfg.teacher)
    claim_out_dir(cfg, plan, rank, write=False)  # refuse changed settings before reading any data
    tok, train_tokens, val_tokens, test_tokens, heldout = load_data(cfg, plan)
    check_data(cfg, len(train_tokens), len(val_tokens), len(test_tokens), world)
    claim_out_dir(cfg, plan, rank)
    TR.barrier()
    ctx = Context(rank, world, device, train_tokens, val_tokens, test_tokens, heldout, tok)
    log(ctx, f"data: {len(train_tokens):,} train / {len(val_tokens):,} validation / {len(test_tokens):,} test "
             f"tokens, vocab {tok.vocab_size}; held-out {heldout['ngram']}-token windows also in training: "
             f"{heldout.get('overlap_before', '?')} before de-duplication, {heldout.get('overlap_after', '?')} after "
             f"({time.time() - t0:.1f}s)")
    return ctx, plan


def run_cascade(cfg: CascadeConfig) -> dict:
    rank, world, _, device = TR.setup_distributed()
    try:
        t0, c0, load0 = time.time(), TR.cpu_seconds(), os.getloadavg()[0]
        cfg = resolved(cfg, world)
        ctx, plan = prepare(cfg, rank, world, device)
        stages = Stages(cfg, ctx)
        if cfg.ablation:
            return run_ablation(cfg, ctx, plan, stages)

        parent_path = stage_parent(cfg, ctx, stages, plan)
        teacher_path = cfg.teacher or parent_path
        teacher = build(teacher_path, ctx, cfg, train=False)
        cache = DI.attach_teacher_cache(teacher, cfg.teacher_cache_mb)
        # Tokens each row has seen, upstream included: the parent's pretraining (unknown for a given parent)
        # plus every distillation stage on the chain of checkpoints that led to it.
        upstream = stages.info("parent").get("tokens", 0)
        rows = [row(cfg, ctx, stages, "parent", "parent", parent_path, teacher, upstream, tasks=True)]

        def run_info(**extra) -> dict:  # wall and CPU time so far (CPU beside wall: the box may be shared)
            return {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(TR.cpu_seconds() - c0, 1),
                    "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2),
                    "stages_cpu_seconds": round(sum(r["cpu_seconds"] or 0 for r in rows), 1), **extra}

        current, made = parent_path, {}  # Algorithm 1: `parent` in the loop
        for name, target in plan.sizes:
            init = stage_prune(cfg, ctx, stages, f"{name}/init", current, target)
            short = stage_distill(cfg, ctx, stages, f"{name}/short", init, teacher, False, cfg.short_steps, cfg.seed + 1)
            made[name] = (init, short)
            current = short  # the SHORT-context child seeds the next size
        # The long stages feed no later size, so they run after the chain of short ones (another process on
        # the same --out can take them meanwhile). The task evaluation (real parents) scores the pruned and
        # the base child of each size, not the short one (CPU time).
        for name, _ in plan.sizes:
            init, short = made[name]
            base = stage_distill(cfg, ctx, stages, f"{name}/long", short, teacher, True, cfg.long_steps, cfg.seed + 2)
            short_tokens = stages.info(f"{name}/short")["tokens"]
            rows.append(row(cfg, ctx, stages, f"{name} pruned", f"{name}/init", init, teacher, upstream, tasks=True))
            rows.append(row(cfg, ctx, stages, f"{name} short", f"{name}/short", short, teacher, upstream + short_tokens))
            rows.append(row(cfg, ctx, stages, f"{name} base", f"{name}/long", base, teacher,
                            upstream + short_tokens + stages.info(f"{name}/long")["tokens"], tasks=True))
            upstream += short_tokens  # the short child seeds the next size; the long stage is upstream of nothing
            if rank == 0 and cfg.math_problems:  # a real parent's run is long: keep a table of the sizes done so far
                write_results(cfg, rows, plan, ctx, None, run_info(partial_after=name))
        baseline = None
        # a few thousand tokens from scratch say nothing next to a pretrained parent: no baseline for REAL_SMALL
        if cfg.baseline and cfg.preset not in REAL_SMALL:
            last_name, last_args = plan.sizes[-1]
            child_tokens = cfg.batch_size * (cfg.short_steps * cfg.seq_len + cfg.long_steps * cfg.long_seq_len)
            baseline = stage_baseline(cfg, ctx, stages, "baseline", last_args, child_tokens, cfg.seq_len)
            rows.append(row(cfg, ctx, stages, f"{last_name} from scratch (lr {baseline['lr']:g})", baseline["stage"],
                            baseline["path"], teacher, baseline["tokens"], seconds=baseline))
        run = run_info()
        if rank == 0:
            write_results(cfg, rows, plan, ctx, baseline, run)
        if cache is not None:
            log(ctx, f"teacher cache: {cache.hits} forwards reused, {cache.misses} run, {cache.bytes / 2**20:.0f} MiB")
        log(ctx, f"cascade finished in {run['seconds']:.0f}s ({run['cpu_seconds']:.0f} CPU-s); results in "
                 f"{results_dir(cfg)}")
        post = None
        if cfg.posttrain:  # section 8 on every base child (the section before the vision cascade)
            del teacher
            bases = {name: os.path.join(stages.dir(f"{name}/long"), "model") for name, _ in plan.sizes}
            post = run_posttrain(cfg, ctx, plan, stages, bases, run_info)
        return {"rows": rows, "baseline": baseline, "heldout": ctx.heldout, "run": run, "post": post}
    finally:
        TR.teardown_distributed()


def row(cfg, ctx, stages, label, stage, path, teacher, tokens_seen, seconds=None, tasks=False) -> dict:
    """One line of the table: held-out test CE and KL, the tokens seen (upstream included) and the time
    the stage that made the checkpoint took (the baseline: its whole lr sweep); with `tasks`, the task
    evaluation's math accuracy and sample answers (stage_tasks: real parents, else nothing)."""
    ev = stage_eval(cfg, ctx, stages, stage, path, teacher, cfg.seq_len)
    took = seconds or stages.info(stage)
    return {"stage": label, "params": ev["params"], "ce": ev["ce"], "kl": ev.get("kl"), "eval_tokens": ev["tokens"],
            "tokens_seen": tokens_seen, "seconds": took.get("seconds"), "cpu_seconds": took.get("cpu_seconds"),
            **(stage_tasks(cfg, ctx, stages, stage, path) if tasks else {})}


def log(ctx_or_rank, msg: str):
    rank = ctx_or_rank if isinstance(ctx_or_rank, int) else ctx_or_rank.rank
    if rank == 0:
        print(msg, flush=True)


# -----------------------------------------------------------------------------
# Ablations the paper reports (section 1 "teacher findings"), on the embedded experiment


ABLATIONS = {  # name -> {variant: CascadeConfig overrides}
    "kl_vs_mix": {"KL only (paper)": {}, "0.5 KL + 0.5 CE": {"ce_weight": 0.5}},
    "layer_selection": {m: {"layer_selection": m} for m in ("norm_ratio", "block_influence", "random", "last_k")},
    "teacher": {"parent as teacher (paper)": {}, "larger teacher": {"teacher": "larger"}},
}


def larger_teacher(parent: M.ModelArgs) -> M.ModelArgs:
    """The larger-teacher ablation's teacher: the parent with 4/3 the layers and 1.25x the width and FFN
    (about 2x the parameters), trained on the same tokens."""
    return dataclasses.replace(parent, n_layers=parent.n_layers * 4 // 3, dim=8 * round(parent.dim * 1.25 / 8),
                               hidden_dim=8 * round(parent.hidden_dim * 1.25 / 8))


def run_ablation(cfg: CascadeConfig, ctx: Context, plan: Plan, stages: Stages) -> dict:
    """One cascade step per run: prune the trained parent straight to the last size, distil it at short
    context, and measure held-out (test) CE and KL to the parent. Every variant runs ablation_seeds seeds;
    the table gives mean and spread (population std) and each run's dropped layers. The parent (and any
    larger teacher) is trained once."""
    if cfg.parent is not None:
        raise ValueError("--ablation runs on the embedded experiment: drop --parent")
    t0, c0 = time.time(), TR.cpu_seconds()
    parent_path = stage_parent(cfg, ctx, stages, plan)
    parent = build(parent_path, ctx, cfg, train=False)
    DI.attach_teacher_cache(parent, cfg.teacher_cache_mb)
    name, target = plan.sizes[-1]
    results, teachers = {v: [None] * cfg.ablation_seeds for v in ABLATIONS[cfg.ablation]}, {}
    # A run another process is making (the same command in several processes, or the ablations side by side)
    # is put back at the end of the queue; the paper's variant goes last, since all three ablations share it.
    queue = [(v, o, s) for v, o in sorted(ABLATIONS[cfg.ablation].items(), key=lambda kv: not kv[1])
             for s in range(cfg.ablation_seeds)]
    while queue:
        variant, overrides, s = queue.pop(0)
        vcfg = dataclasses.replace(cfg, seed=cfg.seed + s, **{k: v for k, v in overrides.items() if k != "teacher"})
        # Stages are named by their settings, not by the ablation: the paper's setting (norm ratio, KL
        # alone, the parent as teacher) is one run per seed that all three ablations share.
        tag = "ablations/" + ("_".join(f"{k}_{slug(str(v))}" for k, v in sorted(overrides.items())) or "paper") + f"/seed{s}"
        teacher = parent
        if overrides.get("teacher") == "larger":
            big = dataclasses.replace(plan, parent_args=larger_teacher(plan.parent_args))
            big_stages = Stages(dataclasses.replace(cfg, out=os.path.join(cfg.out, "larger_teacher")), ctx)
            big_path = stage_parent(cfg, ctx, big_stages, big)
            teacher = build(big_path, ctx, cfg, train=False)
            teachers[variant] = stage_eval(cfg, ctx, big_stages, "parent", big_path, None, cfg.seq_len) | {
                "tokens_trained": big_stages.info("parent").get("tokens"),
                "args": dataclasses.asdict(big.parent_args)}
        init = stage_prune(vcfg, ctx, stages, f"{tag}/init", parent_path, target)
        with open(os.path.join(stages.dir(f"{tag}/init"), "report.json")) as f:
            layers = json.load(f)["layers"]
        # Two layer rules that drop the same layers (same seed, same data) make the same child, bit for
        # bit: the distilled stage is named by what determines it, so it is run once and shared.
        short_tag = (f"ablations/distilled/seed{vcfg.seed}_drop{'-'.join(map(str, layers['dropped']))}"
                     f"_ce{vcfg.ce_weight:g}_{'larger_teacher' if overrides.get('teacher') else 'parent'}")
        if ctx.world == 1 and stages.claim(short_tag) == "busy":
            queue.append((variant, overrides, s))
            time.sleep(2)
            continue
        short = stage_distill(vcfg, ctx, stages, short_tag, init, teacher, False, cfg.short_steps, vcfg.seed + 1)
        # KL is always measured against the parent, so the two teachers are compared on one scale
        results[variant][s] = {"seed": vcfg.seed, "dropped_layers": layers["dropped"], "stage": tag,
                               "distilled_stage": short_tag,
                               "layer_scores": {k: layers[k] for k in ("norm_ratio", "block_influence")},
                               "pruned": stage_eval(vcfg, ctx, stages, f"{tag}/init", init, parent, cfg.seq_len),
                               "distilled": stage_eval(vcfg, ctx, stages, short_tag, short, parent, cfg.seq_len)}
    parent_eval = stage_eval(cfg, ctx, stages, "parent", parent_path, parent, cfg.seq_len)
    run = {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(TR.cpu_seconds() - c0, 1)}
    if ctx.rank == 0:
        write_ablation(cfg, results, parent_eval, name, plan, teachers, run)
    return results


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in text).strip("_").lower()


def mean_std(xs: list) -> tuple[float, float]:
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def write_ablation(cfg: CascadeConfig, results: dict, parent_eval: dict, size: str, plan: Plan, teachers: dict,
                   run: dict):
    seeds = len(next(iter(results.values())))
    p, c = plan.parent_args, plan.sizes[-1][1]
    lines = [f"# Ablation `{cfg.ablation}` (preset {cfg.preset}, {seeds} seed{'s' * (seeds > 1)} from {cfg.seed})", "",
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
    record = run_record(cfg, run)
    lines += ["", "Runs that dropped the same layers with the same seed and loss share one distilled child "
              "(`distilled_stage` in the json): their pruned models are the same, bit for bit.",
              "", f"Per run (seed: CE after distillation): " + "; ".join(
        f"{v} " + ", ".join(f"{r['seed']}: {r['distilled']['ce']:.3f}" for r in runs) for v, runs in results.items()),
        "", f"Run: {record['date']}, {record['device']}, torch {record['torch']}, commit {record['commit']}, "
        f"{run['seconds']:.0f} s wall / {run['cpu_seconds']:.0f} s CPU on a shared machine. Command: "
        f"`{record['command']}`."]
    text = "\n".join(lines) + "\n"
    out = results_dir(cfg)
    os.makedirs(out, exist_ok=True)
    stem = f"ablation_{cfg.ablation}" + ("" if cfg.preset == "cpu" else f"_{cfg.preset}")
    with open(os.path.join(out, f"{stem}.md"), "w") as f:
        f.write(text)
    TR.write_json_atomic(os.path.join(out, f"{stem}.json"), {"parent": parent_eval, "teachers": teachers,
                                                             "runs": results, "run": record,
                                                             "config": dataclasses.asdict(cfg)})
    print("\n" + text)


# -----------------------------------------------------------------------------
# Results: the retention table and the loss curves


def retention(ce: float, parent_ce: float, vocab: int) -> float:
    """Deviation 2: the share of the parent's gain over a uniform guess (ln V) that a model keeps."""
    return (math.log(vocab) - ce) / (math.log(vocab) - parent_ce)


def results_dir(cfg: CascadeConfig) -> str:
    return cfg.results or os.path.join(cfg.out, "results")


def fmt_tokens(n) -> str:
    return "-" if not n else f"{n / 1e6:.2f}M"


def fmt_seconds(s) -> str:
    return "-" if s is None else f"{s:.0f}"


def results_table(rows: list, vocab: int) -> str:
    parent_ce = rows[0]["ce"]
    math = "math_total" in rows[0]  # a real parent's task evaluation: one more column
    lines = ["| model | parameters | held-out CE | KL to teacher | kept | tokens seen (upstream incl.) | stage time (s) "
             "| stage CPU (s) |" + (" math exact |" if math else ""),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|" if math else "")]
    for r in rows:
        kl = "-" if r.get("kl") is None else f"{r['kl']:.3f}"
        cell = (f" {r['math_correct']}/{r['math_total']} ({100 * r['math_accuracy']:.0f}%) |"
                if "math_total" in r else (" |" if math else ""))
        lines.append(f"| {r['stage']} | {r['params']:,} | {r['ce']:.3f} | {kl} | "
                     f"{100 * retention(r['ce'], parent_ce, vocab):.1f}% | {fmt_tokens(r.get('tokens_seen'))} | "
                     f"{fmt_seconds(r.get('seconds'))} | {fmt_seconds(r.get('cpu_seconds'))} |" + cell)
    return "\n".join(lines)


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


def run_record(cfg: CascadeConfig, run: dict) -> dict:
    """Where and how a result was made: date, machine, torch, commit, the command, threads, load."""
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": platform.processor() or
            platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "commit": commit, "command": "python " + " ".join(sys.argv), **run}


def write_results(cfg: CascadeConfig, rows: list, plan: Plan, ctx: Context, baseline: Optional[dict], run: dict):
    out = results_dir(cfg)
    os.makedirs(out, exist_ok=True)
    table = results_table(rows, plan.parent_args.vocab_size)
    record = run_record(cfg, run)
    last = plan.sizes[-1][0]
    notes = [f"kept = (ln V - CE) / (ln V - CE_parent): the share of the parent's gain over a uniform guess that a "
             f"model keeps. 'pruned' is right after pruning, 'short' after short-context distillation, 'base' after "
             f"long-context distillation. CE and KL are on the test half of the held-out text at {cfg.seq_len} "
             f"tokens ({rows[0]['eval_tokens']:,} tokens); held-out {ctx.heldout['ngram']}-token windows also found "
             f"in the training tokens: {ctx.heldout.get('overlap_after', 'not checked')} (before de-duplication: "
             f"{ctx.heldout.get('overlap_before', 'not checked')} of {ctx.heldout['windows']:,})."]
    notes.append("Tokens seen include everything upstream: the parent's pretraining and every distillation stage on "
                 "the chain of checkpoints that led to the row (each size is pruned from the previous size's short "
                 "child). The cascaded children therefore inherit the parent's and the larger children's training; "
                 "the from-scratch row sees only its own tokens, as many as the "
                 f"{last} child's own short and long stages.")
    if baseline is not None:
        sweep = ", ".join(f"lr {r['lr']:g}: {r['val_ce']:.3f}" for r in baseline["sweep"])
        notes.append(f"The from-scratch baseline was trained once per learning rate and the lowest CE on the "
                     f"validation half chose it ({sweep}); its time is the whole sweep's.")
    notes.append(f"Run: {record['date']}, {record['device']} ({record['cpus']} CPUs, {record['torch_threads']} torch "
                 f"threads), torch {record['torch']}, commit {record['commit']}: {run['seconds']:.0f} s wall, "
                 f"{run['cpu_seconds']:.0f} s CPU (load average {run['loadavg_start']} at the start, "
                 f"{run['loadavg_end']} at the end; wall time on a shared machine is inflated). "
                 f"Command: `{record['command']}`.")
    if "math_total" in rows[0]:  # before the Run line
        notes.insert(-1, f"math exact: greedy answers to {cfg.math_problems} held-out data.math_problems (level "
                         f"{cfg.math_level!r}, seed {cfg.math_seed}) asked through the chat template, checked by "
                         f"data.check_math_answer; the short children are not scored (CPU time).")
    if run.get("partial_after"):
        notes.append(f"Partial table: the sizes up to {run['partial_after']} are done; the run goes on.")
    text = f"# Cascade retention\n\n{table}\n\n" + "\n\n".join(notes) + "\n"
    if any("samples" in r for r in rows):
        text += f"\n## Sample answers (greedy, {SAMPLE_TOKENS} tokens)\n\n" + samples_text(rows)
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text)
    TR.write_json_atomic(os.path.join(out, "table.json"), {"rows": rows, "heldout": ctx.heldout, "run": record,
                                                         "config": dataclasses.asdict(cfg)})
    if baseline is not None:
        TR.write_json_atomic(os.path.join(out, "lr_sweep.json"), {
            "chosen_on": "validation half of the held-out text", "chosen_lr": baseline["lr"],
            "sweep": baseline["sweep"], "run": record})
    plot_curves(cfg, plan, baseline, os.path.join(out, "curves.png"))
    print("\n" + table + "\n\n" + "\n\n".join(notes))


def read_metrics(cfg: CascadeConfig, stage: str, seq_len: int) -> list:
    """[(tokens, loss)] of a stage's metrics.jsonl. A resumed stage replays the steps after its last
    checkpoint; the last record of each step wins, so the curve never doubles back."""
    path = os.path.join(cfg.out, stage, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    by_step = {}
    with open(path) as f:
        for line in f:
            if line.strip():
                r = json.loads(line)
                if "loss" in r:
                    by_step[r["step"]] = r["loss"]
    return [(s * cfg.batch_size * seq_len, by_step[s]) for s in sorted(by_step)]


def plot_curves(cfg: CascadeConfig, plan: Plan, baseline: Optional[dict], path: str):
    """Left: next-token CE of the parent's pretraining and of the from-scratch baseline (every lr of the
    sweep). Right: KL to the teacher of every distillation stage in cascade order on one token axis, log
    scale (it spans decades), with the stage boundaries marked."""
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    ce_ax, kl_ax = fig.subplots(1, 2)
    ln_v = math.log(plan.parent_args.vocab_size)
    parent = read_metrics(cfg, "parent", cfg.long_seq_len)
    if parent:
        ce_ax.plot(*zip(*parent), label="parent (pretraining)", color="black")
    last = plan.sizes[-1][0]
    for r in (baseline or {}).get("sweep", []):
        pts = read_metrics(cfg, r["stage"], cfg.seq_len)
        if pts:
            chosen = r["lr"] == baseline["lr"]
            ce_ax.plot(*zip(*pts), label=f"{last} from scratch, lr {r['lr']:g}" + (" (chosen)" if chosen else ""),
                       linestyle="-" if chosen else ":", linewidth=2 if chosen else 1.2)
    ce_ax.axhline(ln_v, color="grey", linewidth=0.8, linestyle="--", label=f"uniform guess (ln {plan.parent_args.vocab_size})")
    ce_ax.set(title="next-token CE (training loss)", xlabel="training tokens", ylabel="CE (nats)")
    ce_ax.legend(fontsize=8)
    ce_ax.grid(alpha=0.3)

    offset, colors = 0, ["tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown"]
    for i, (name, _) in enumerate(plan.sizes):
        for stage, seq, style in (("short", cfg.seq_len, "-"), ("long", cfg.long_seq_len, "--")):
            pts = read_metrics(cfg, f"{name}/{stage}", seq)
            if not pts:
                continue
            kl_ax.plot([offset + x for x, _ in pts], [max(y, 1e-6) for _, y in pts], style, color=colors[i % 6],
                       label=f"{name} {stage} ({seq} tokens)")
            kl_ax.axvline(offset, color="grey", linewidth=0.6)
            kl_ax.text(offset, 1.0, f" {name}/{stage}", transform=kl_ax.get_xaxis_transform(), fontsize=7,
                       va="bottom", rotation=30)
            offset += pts[-1][0]
    kl_ax.set_yscale("log")
    kl_ax.set(xlabel="distillation tokens, stages in cascade order", ylabel="KL(teacher || student) (nats)")
    kl_ax.set_title("KL to the teacher (distillation)", pad=28)
    kl_ax.legend(fontsize=8)
    kl_ax.grid(alpha=0.3, which="both")
    for ax in (ce_ax, kl_ax):
        ax.xaxis.set_major_formatter(lambda x, _: f"{x / 1e6:g}M" if x else "0")
    fig.savefig(path, dpi=110)


# -----------------------------------------------------------------------------
# Post-training: `python cascade.py --posttrain` (PAPER.md section 8)
#
# Each base child (<size>/long) goes through both of the paper's chains, every step a resumable stage:
#     instruct:   <size>/instruct_sft  -> <size>/instruct_odpo
#     reasoning:  <size>/reasoning_sft -> <size>/grpo -> <size>/reasoning_odpo
# plus one pairwise reward model, post/pwrm, shared by every ODPO stage and every win rate. The stages
# call sft.run_sft, grpo.run_grpo and odpo.run_odpo with their demos' recipes (grpo.py's task, SFT learning
# rate and GRPO recipe: lr 2e-4, 32 prompts x G 8 per step; odpo.py's lr 1e-4; the PWRM's honest labelling
# rules and calibration), with fewer steps. An earlier chain ran GRPO and ODPO at lr 3e-4 on 8 prompts, on
# sums and differences of operands up to 14, after 150 SFT steps: its SFT models answered 3-12% of the
# held-out problems, and GRPO, starting below grpo.py's 10% floor, gained nothing (benchmarks/posttrain/NOTES.md).
# Choices, ours where the paper is silent or the demo is smaller:
#  a. Data: data.easy_math_problems ("What is a + b?", operands up to 49: 2,500 distinct questions; the real
#     presets keep operands up to 14 with + and -, 450 questions) split by QUESTION into a held-out set and a
#     training pool; the overlap is counted and reported (0).
#     Instruct answers "The answer is N." (odpo.py's format); reasoning answers [THINK] the worked step
#     [/THINK] N (sft.math_trace). A tokenizer without [THINK] (ChatML: SmolLM2) writes the step before
#     "Answer: N" (sft.demo_items' fallback), and GRPO's format gate is off.
#  b. SFT is logit distillation (forward KL on the assistant's tokens) from the LARGEST size's SFT of the
#     same chain, the strongest post-trained model here (the paper distils from a stronger model); the
#     largest size itself has no stronger post-trained teacher and is SFT-ed by cross-entropy.
#  c. The PWRM starts from the smallest instruct SFT (CPU cost; odpo.py's demo starts it from its SFT
#     policy), is trained by sft.py on pairs labelled by odpo.py's rules and calibrated on held-out pairs.
#  d. Every row is measured on the same held-out problems: greedy exact-answer accuracy (data.check_math_answer:
#     the number after [/THINK]), the format rate (reasoning: grpo.final_part's gate, [THINK] trace
#     [/THINK] answer, ended by EOS; instruct and base: an ended, non-empty answer with no [THINK]), the
#     loop rate (odpo.is_looping, greedy and sampled at T = 0.7), and the PWRM win rate of the row's
#     samples against its STARTING model's samples (same prompts and seeds): SFT vs base, ODPO vs its SFT,
#     GRPO vs reasoning SFT, reasoning ODPO vs GRPO.
#  e. One process: odpo.run_odpo runs at world size 1 (odpo.py reading guide, item 7).

POST_KINDS = ("instruct_sft", "reasoning_sft", "pwrm", "instruct_odpo", "grpo", "reasoning_odpo")
POST_STAGES = {  # optimizer steps per post-training stage, held-out problems per row
    "smoke": dict(post_sft_steps=3, post_grpo_steps=2, post_odpo_steps=2, post_pwrm_steps=2, post_eval_problems=8),
    "cpu": dict(post_sft_steps=400, post_grpo_steps=60, post_odpo_steps=15, post_pwrm_steps=80, post_eval_problems=64),
    "gpu": dict(post_sft_steps=300, post_grpo_steps=120, post_odpo_steps=60, post_pwrm_steps=300, post_eval_problems=100),
    "cpu-real": dict(post_sft_steps=8, post_grpo_steps=3, post_odpo_steps=3, post_pwrm_steps=8, post_eval_problems=16),
}
for _p in ("cpu_deep", "paper", "gpu-real"):
    POST_STAGES[_p] = POST_STAGES["cpu" if _p == "cpu_deep" else "gpu"]
POST = dict(max_operand=49, ops="+", held_out=100, pool=2500, new_tokens=24, sft_batch=32, sft_lr=3e-3,
            grpo_group=8, grpo_prompts=32, grpo_lr=2e-4, odpo_batch=16, odpo_lr=1e-4, pwrm_batch=16, pwrm_lr=1e-3,
            pwrm_problems=96, calib_problems=32, eval_seed=1234)
# A pretrained parent's children are fine-tuned, not trained from a few thousand steps: the rates above (chosen
# on the demo's 1-3M-parameter children) would wreck a 36-95M-parameter SmolLM2 child, so the real presets use
# fine-tuning rates, 8 GRPO prompts per step (CPU cost), and the task of their record (benchmarks/posttrain/smollm2).
POST_REAL = dict(sft_lr=5e-5, grpo_lr=1e-5, odpo_lr=1e-5, pwrm_lr=5e-5, grpo_prompts=8, max_operand=14, ops="+-")


def post_recipe(cfg) -> dict:
    """The post-training settings of this preset (POST, with POST_REAL's on a real parent's small presets)."""
    return {**POST, **POST_REAL} if cfg.preset in REAL_SMALL else dict(POST)


@dataclass
class PostData:
    tok: D.Tokenizer
    think: bool  # the tokenizer has [THINK]/[/THINK] (Tekken v13); else the trace goes in the content
    train: list  # [{question, answer}] training pool (SFT, GRPO and ODPO prompts, PWRM pairs)
    held: list  # held-out problems, no question of which is in train
    overlap: int  # held-out questions also in the training pool (0 by construction; counted)
    prompt_tokens: int  # the longest chat prompt (odpo.py's max_prompt_tokens)

    def chat(self, p: dict, reasoning: bool) -> list:
        if not reasoning:
            return [{"role": "user", "content": p["question"]}, {"role": "assistant", "content": f"The answer is {p['answer']}."}]
        trace = D.math_trace(p["question"], p["answer"])
        reply = ({"role": "assistant", "content": p["answer"], "thinking": trace} if self.think
                 else {"role": "assistant", "content": f"{trace} Answer: {p['answer']}"})
        return [{"role": "user", "content": p["question"]}, reply]


def post_data(cfg: CascadeConfig, ctx: Context) -> PostData:
    """The problems split by question (choice a), and a tokenizer that knows [THINK] where the run's is a
    legacy Tekken file (sft.tekken_with_think: same ids, the two control tokens named)."""
    tok = ctx.tok
    if tok.path.endswith(".json") and "[THINK]" not in tok.specials:
        tok = D.Tokenizer.from_file(D.tekken_with_think(tok.path, os.path.join(cfg.out, "post", "tekken.json"),
                                                        tok.vocab_size), vocab_size=tok.vocab_size)
    recipe = post_recipe(cfg)
    pool = D.easy_math_problems(POST["pool"], seed=cfg.seed, max_operand=recipe["max_operand"], ops=recipe["ops"])
    questions = sorted({p["question"] for p in pool})
    np.random.default_rng(cfg.seed).shuffle(questions)
    held_q = set(questions[:POST["held_out"]])
    held = sorted({p["question"]: p for p in pool if p["question"] in held_q}.values(), key=lambda p: p["question"])
    train = [p for p in pool if p["question"] not in held_q]
    overlap = len(held_q & {p["question"] for p in train})
    longest = max(len(tok.encode_chat([{"role": "user", "content": q}])[0]) for q in questions)
    return PostData(tok, "[THINK]" in tok.specials, train, held, overlap, longest)


def post_train_config(cfg, stages, name, steps, batch, lr, seq_len=0, **kw) -> TR.TrainConfig:
    kw = {"warmup_steps": max(1, steps // 10), **kw}
    return TR.TrainConfig(out_dir=stages.dir(name), steps=steps, batch_size=batch, micro_batch_size=batch,
                          seq_len=seq_len, lr=lr, dtype=cfg.dtype, seed=cfg.seed, resume=True,
                          ckpt_every=max(1, steps // 2), keep_checkpoints=1, log_every=max(1, steps // 5), **kw)


def stage_post_sft(cfg, ctx, stages, pd: PostData, name, init_path, teacher_path, reasoning: bool) -> str:
    """SFT by KL to teacher_path's model (or CE without one, choice b) on the chain's chats."""
    if stages.done(name) is None:
        convs = [pd.chat(p, reasoning) for p in pd.train]
        seq = max(len(pd.tok.encode_chat(c)[0]) for c in convs) - 1
        ctx_len = M.read_checkpoint_args(init_path)[0].max_seq_len
        if max(seq, pd.prompt_tokens + POST["new_tokens"]) > ctx_len:
            raise ValueError(f"post-training needs {max(seq, pd.prompt_tokens + POST['new_tokens'])} tokens of context "
                             f"but {init_path} has max_seq_len {ctx_len}: raise --long-seq-len")
        log(ctx, f"== stage {name}: SFT {init_path} on {len(convs)} {'reasoning' if reasoning else 'instruct'} chats, "
                 f"{'KL to ' + teacher_path if teacher_path else 'CE'}")
        student = build(init_path, ctx, cfg)
        teacher = build(teacher_path, ctx, cfg, train=False) if teacher_path else None
        lr = post_recipe(cfg)["sft_lr"]
        tcfg = post_train_config(cfg, stages, name, cfg.post_sft_steps, POST["sft_batch"], lr, seq)
        r = S.run_sft(student, convs, pd.tok, tcfg, S.SFTConfig(), teacher, device=ctx.device, name=name)
        stages.finish(name, {"start": init_path, "teacher": teacher_path, "steps": cfg.post_sft_steps,
                             "first_loss": r["history"][0]["loss"], "last_loss": r["history"][-1]["loss"]})
    return os.path.join(stages.dir(name), "model")


def odpo_config(pd: PostData) -> O.ODPOConfig:
    return O.ODPOConfig(max_new_tokens=POST["new_tokens"], max_prompt_tokens=pd.prompt_tokens, eval_prompts=0)


def stage_pwrm(cfg, ctx, stages, pd: PostData, init_path) -> O.PairwiseRewardModel:
    """Choice c: odpo.py's PWRM recipe on the training pool; the calibrated temperature goes in done.json."""
    name, ocfg = "post/pwrm", odpo_config(pd)
    if stages.done(name) is None:
        log(ctx, f"== stage {name}: pairwise reward model from {init_path}, {cfg.post_pwrm_steps} SFT steps")
        policy = M.load_model(init_path, device=ctx.device).eval()
        k = min(POST["pwrm_problems"], 8 * cfg.post_pwrm_steps)  # a short PWRM stage (tests) samples fewer pairs
        fit, calib = pd.train[:k], pd.train[-min(POST["calib_problems"], k):]
        pairs = O.preference_pairs(fit, O.sample_answers(policy, pd.tok, fit, 2, ocfg, seed=11), pd.tok,
                                   ocfg.max_new_tokens, seed=11)
        convs = O.pwrm_conversations(O.PairwiseRewardModel(policy, pd.tok, max_response_tokens=ocfg.max_new_tokens), pairs)
        seq = max(len(pd.tok.encode_chat(c)[0]) for c in convs) - 1
        if seq > policy.args.max_seq_len:
            raise ValueError(f"the PWRM's chats need {seq} tokens of context but {init_path} has max_seq_len "
                             f"{policy.args.max_seq_len}: raise --long-seq-len")
        lr = post_recipe(cfg)["pwrm_lr"]
        tcfg = post_train_config(cfg, stages, name, cfg.post_pwrm_steps, POST["pwrm_batch"], lr, seq)
        S.run_sft(build(init_path, ctx, cfg), convs, pd.tok, tcfg, S.SFTConfig(), device=ctx.device, name=name)
        pwrm = O.PairwiseRewardModel(M.load_model(os.path.join(stages.dir(name), "model"), device=ctx.device).eval(),
                                     pd.tok, max_response_tokens=ocfg.max_new_tokens)
        held_pairs = O.preference_pairs(calib, O.sample_answers(policy, pd.tok, calib, 2, ocfg, seed=12), pd.tok,
                                        ocfg.max_new_tokens, seed=12)
        calibration = pwrm.calibrate([(q["conversation"], q["a"], q["b"]) for q in held_pairs],
                                     [q["label"] for q in held_pairs])
        stages.finish(name, {"start": init_path, "pairs": len(pairs), "calibration": calibration})
    model = M.load_model(os.path.join(stages.dir(name), "model"), device=ctx.device).eval().requires_grad_(False)
    return O.PairwiseRewardModel(model, pd.tok, temperature=stages.info(name)["calibration"]["temperature"],
                                 max_response_tokens=ocfg.max_new_tokens)


def stage_grpo(cfg, ctx, stages, pd: PostData, name, init_path) -> str:
    """grpo.py's recipe (constant lr, no weight decay) on the training pool, G samples per prompt."""
    if stages.done(name) is None:
        log(ctx, f"== stage {name}: GRPO from {init_path} for {cfg.post_grpo_steps} steps")
        gcfg = G.GRPOConfig(group_size=POST["grpo_group"], max_new_tokens=POST["new_tokens"], format_gate=pd.think,
                            eval_every_steps=0)
        recipe = post_recipe(cfg)
        batch = POST["grpo_group"] * recipe["grpo_prompts"]
        tcfg = post_train_config(cfg, stages, name, cfg.post_grpo_steps, batch, recipe["grpo_lr"], warmup_steps=0,
                                 min_lr_ratio=1.0, weight_decay=0.0)
        r = G.run_grpo(build(init_path, ctx, cfg), pd.tok, pd.train, gcfg, tcfg, device=ctx.device, name=name)
        first, last = r["rollouts"][0], r["rollouts"][-1]
        stages.finish(name, {"start": init_path, "steps": cfg.post_grpo_steps, "first_mean_reward": first["mean_reward"],
                             "last_mean_reward": last["mean_reward"]})
    return os.path.join(stages.dir(name), "model")


def stage_odpo(cfg, ctx, stages, pd: PostData, name, init_path, pwrm) -> str:
    """odpo.py's recipe: two samples per prompt at T = 0.7, soft labels from the PWRM, the start as reference."""
    if stages.done(name) is None:
        log(ctx, f"== stage {name}: online DPO from {init_path} for {cfg.post_odpo_steps} steps")
        lr = post_recipe(cfg)["odpo_lr"]
        tcfg = post_train_config(cfg, stages, name, cfg.post_odpo_steps, POST["odpo_batch"], lr, weight_decay=0.0)
        prompts = [[{"role": "user", "content": p["question"]}] for p in pd.train]
        O.run_odpo(build(init_path, ctx, cfg), build(init_path, ctx, cfg, train=False), pwrm, pd.tok, prompts,
                   odpo_config(pd), tcfg, device=ctx.device, name=name)
        stages.finish(name, {"start": init_path, "steps": cfg.post_odpo_steps})
    return os.path.join(stages.dir(name), "model")


def post_eval(cfg, ctx, stages, pd: PostData, name, path, reasoning: bool, start: Optional[str], pwrm) -> dict:
    """Choice d, cached in <stage>/post_eval.json under a key of what it depends on besides the checkpoint."""
    cache, ocfg = os.path.join(stages.dir(name), "post_eval.json"), odpo_config(pd)
    held = pd.held[:cfg.post_eval_problems]
    key = {"held": [p["question"] for p in held], "new_tokens": ocfg.max_new_tokens, "reasoning": reasoning,
           "start": start, "start_made": stages.info(start) if start else None,  # done.json: unique to one training
           "measures": 3,  # the version of what is measured: a new measure recomputes the cached ones
           "pwrm_made": stages.info("post/pwrm") if start else None}
    if os.path.exists(cache):
        with open(cache) as f:
            cached = json.load(f)
        if cached["key"] == key:
            return cached["result"]
    model, tok = M.load_model(path, device=ctx.device).eval(), pd.tok
    prompts = [tok.encode_chat([{"role": "user", "content": p["question"]}])[0] for p in held]
    greedy = M.generate(model, prompts, ocfg.max_new_tokens, eos_id=tok.eos_id)
    sampled = M.generate(model, prompts, ocfg.max_new_tokens, temperature=ocfg.sample_temperature,
                         eos_id=tok.eos_id, seed=POST["eval_seed"])
    ended = [bool(r) and r[-1] == tok.eos_id for r in greedy]
    texts = [tok.decode(r[:-1] if e else r, special="keep") for r, e in zip(greedy, ended)]
    answers = [G.final_part(t, not e, pd.think and reasoning) for t, e in zip(texts, ended)]
    fmt = [a is not None and (reasoning or "[THINK]" not in t) for a, t in zip(answers, texts)]
    loops = lambda rs: float(np.mean([O.is_looping(r, eos_id=tok.eos_id, max_new_tokens=ocfg.max_new_tokens) for r in rs]))
    correct = [D.check_math_answer(t, p["answer"]) for t, p in zip(texts, held)]
    result = {"n": len(held), "accuracy": float(np.mean(correct)), "correct": correct,
              "format_rate": float(np.mean(fmt)), "loop_rate_greedy": loops(greedy), "loop_rate_sampled": loops(sampled),
              "mean_new_tokens": float(np.mean([len(r) for r in greedy])), "sampled": sampled,
              "examples": [{"question": p["question"], "answer": p["answer"], "output": t} for p, t in zip(held[:3], texts)]}
    if start is not None:  # the starting model's samples: same prompts, same seed
        start_samples = json.load(open(os.path.join(stages.dir(start), "post_eval.json")))["result"]["sampled"]
        convs = [[{"role": "user", "content": p["question"]}] for p in held]
        p, keep = O.judge_pairs(pwrm, tok, ocfg, convs, sampled, start_samples)
        kept = [q for q, k in zip(p, keep) if k]
        result |= {"win_rate": float(np.mean(kept)) if kept else None, "win_pairs": len(kept),
                   # a sample equal to the start's, token for token, is a tie (p = 0.5 by the both-order average)
                   "same_as_start": float(np.mean([list(a) == list(b) for a, b in zip(sampled, start_samples)]))}
    TR.write_json_atomic(cache, {"key": key, "result": result})
    return result


def run_posttrain(cfg: CascadeConfig, ctx: Context, plan: Plan, stages: Stages, bases: dict, run_info) -> list:
    """Both chains for every base child (bases: size -> checkpoint), then the table (write_post_results)."""
    pd = post_data(cfg, ctx)
    sizes = [n for n, _ in plan.sizes]  # cascade order: the largest first (it teaches the others, choice b)
    sft = {}
    for n in sizes:
        for kind, reasoning in (("instruct_sft", False), ("reasoning_sft", True)):
            teacher = None if n == sizes[0] else sft[sizes[0], kind]
            sft[n, kind] = stage_post_sft(cfg, ctx, stages, pd, f"{n}/{kind}", bases[n], teacher, reasoning)
    pwrm = stage_pwrm(cfg, ctx, stages, pd, sft[sizes[-1], "instruct_sft"])
    rows = []
    for n in sizes:
        grpo = stage_grpo(cfg, ctx, stages, pd, f"{n}/grpo", sft[n, "reasoning_sft"])
        chain = [("base", f"{n}/long", bases[n], True, None),
                 ("SFT", f"{n}/instruct_sft", sft[n, "instruct_sft"], False, f"{n}/long"),
                 ("instruct ODPO", f"{n}/instruct_odpo",
                  stage_odpo(cfg, ctx, stages, pd, f"{n}/instruct_odpo", sft[n, "instruct_sft"], pwrm), False,
                  f"{n}/instruct_sft"),
                 ("reasoning SFT", f"{n}/reasoning_sft", sft[n, "reasoning_sft"], True, f"{n}/long"),
                 ("GRPO", f"{n}/grpo", grpo, True, f"{n}/reasoning_sft"),
                 ("reasoning ODPO", f"{n}/reasoning_odpo",
                  stage_odpo(cfg, ctx, stages, pd, f"{n}/reasoning_odpo", grpo, pwrm), True, f"{n}/grpo")]
        evals = {}
        for label, stage, path, reasoning, start in chain:
            ev = evals[stage] = post_eval(cfg, ctx, stages, pd, stage, path, reasoning, start, pwrm)
            info = stages.info(stage)
            paired = None if start is None else G.paired_flips(evals[start]["correct"], ev["correct"])
            rows.append({"size": n, "stage": label, "dir": stage, "start": start, "win_rate": None, "win_pairs": 0,
                         "same_as_start": None, "training": post_training_log(stages, stage) if start else None,
                         "paired": paired, **{k: v for k, v in ev.items() if k != "sampled"},
                         # base: the cascade's long stage made it (its time is in the retention table)
                         "stage_seconds": info.get("seconds") if start else None,
                         "stage_cpu_seconds": info.get("cpu_seconds") if start else None})
    if ctx.rank == 0:
        write_post_results(cfg, rows, pd, stages.info("post/pwrm"), run_info())
    return rows


def post_training_log(stages, stage) -> dict:
    """What the stage's training did, for the record: done.json, and for ODPO the mean PWRM label p of its
    rollout pairs and the mean implicit reward margin (odpo_steps.jsonl)."""
    info = {k: v for k, v in stages.info(stage).items() if k not in ("seconds", "cpu_seconds")}
    path = os.path.join(stages.dir(stage), "odpo_steps.jsonl")
    if os.path.exists(path):
        steps = [json.loads(line) for line in open(path) if line.strip()]
        info |= {k: float(np.mean([s[k] for s in steps])) for k in ("mean_p", "reward_margin", "loop_rate")}
    by_step = grpo_reward_by_step(stages.dir(stage))
    if by_step:  # GRPO: one batch is noisy, so the mean of the first and of the last quarter of the steps
        r = [by_step[k] for k in sorted(by_step)]
        q = max(1, len(r) // 4)
        info |= {"reward_first_quarter": float(np.mean(r[:q])), "reward_last_quarter": float(np.mean(r[-q:]))}
    return info


def grpo_reward_by_step(stage_dir: str) -> dict:
    """step -> mean rollout reward from a GRPO stage's rollouts.jsonl ({} for other stages). A resumed stage
    replays steps: the last record of a step wins."""
    path = os.path.join(stage_dir, "rollouts.jsonl")
    if not os.path.exists(path):
        return {}
    with open(path) as f:
        return {s["step"]: s["mean_reward"] for s in (json.loads(line) for line in f if line.strip())}


POST_ROWS = ("base", "SFT", "instruct ODPO", "reasoning SFT", "GRPO", "reasoning ODPO")


def post_table(rows: list) -> str:
    lines = ["| size | stage | started from | accuracy | vs start: wrong -> right / right -> wrong (sign test p) | format "
             "| loops greedy / T=0.7 | PWRM win rate vs start (samples equal to the start's) | mean new tokens "
             "| stage CPU (s) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        win = "-" if r.get("win_rate") is None else f"{r['win_rate']:.2f} ({100 * r['same_as_start']:.0f}%)"
        pr = r.get("paired")
        flips = "-" if pr is None else f"+{pr['wrong_to_right']} / -{pr['right_to_wrong']} ({pr['sign_test_p']:.2g})"
        lines.append(f"| {r['size']} | {r['stage']} | {r['start'] or '-'} | {100 * r['accuracy']:.1f}% | {flips} | "
                     f"{100 * r['format_rate']:.0f}% | {100 * r['loop_rate_greedy']:.0f}% / {100 * r['loop_rate_sampled']:.0f}% | "
                     f"{win} | {r['mean_new_tokens']:.1f} | {fmt_seconds(r['stage_cpu_seconds'])} |")
    return "\n".join(lines)


def write_post_results(cfg: CascadeConfig, rows: list, pd: PostData, pwrm_info: dict, run: dict):
    """posttrain.md / posttrain.json / posttrain.png beside the cascade's table (results_dir)."""
    out = results_dir(cfg)
    os.makedirs(out, exist_ok=True)
    record = run_record(cfg, run)
    cal, recipe = pwrm_info["calibration"], post_recipe(cfg)
    n_train_q = len({p["question"] for p in pd.train})
    notes = [
        f"Held-out: {rows[0]['n']} problems \"What is a op b?\" (data.easy_math_problems, "
        f"operands 0..{recipe['max_operand']}, "
        f"ops {recipe['ops']!r}), none of whose questions is among the {n_train_q} distinct questions of the training "
        f"pool ({len(pd.train)} problems; overlap {pd.overlap}). Greedy answers of at most {POST['new_tokens']} tokens.",
        "accuracy: exact answer (data.check_math_answer, the number after [/THINK]); against the starting model (below), "
        "the held-out problems it gets right that the start got wrong and the reverse, with the two-sided exact sign "
        "test of those flips. format: reasoning stages and "
        "base, [THINK] trace [/THINK] answer ended by EOS (grpo.final_part's gate" +
        ("" if pd.think else "; this tokenizer has no [THINK], so: an ended, non-empty answer") +
        "); instruct stages, an ended, non-empty answer without [THINK]. loops: odpo.is_looping, greedy and sampled "
        "at T = 0.7.",
        "PWRM win rate: the mean P(row's sample beats the STARTING model's sample) over the held-out prompts (same "
        "seeds; loops judged first, pairs where both loop dropped), by one PWRM (post/pwrm, from the smallest "
        f"instruct SFT, {pwrm_info['pairs']} labelled pairs, calibrated temperature {cal['temperature']:.3g}, "
        f"held-out pair accuracy {100 * cal['accuracy']:.0f}%, ECE {cal['ece_before']:.3f} -> {cal['ece_after']:.3f}). "
        "Starting models: SFT and reasoning SFT from base, ODPO from its SFT, GRPO from reasoning SFT, reasoning "
        "ODPO from GRPO. 0.5 = no preference; in brackets, the share of samples equal to the starting model's, "
        "token for token (each a tie at exactly 0.5).",
        f"SFT: KL to the largest size's SFT of the same chain ({rows[0]['size']} itself: CE), {cfg.post_sft_steps} "
        f"steps of {POST['sft_batch']} chats; GRPO {cfg.post_grpo_steps} steps of {recipe['grpo_prompts']} prompts x "
        f"G {POST['grpo_group']}; ODPO {cfg.post_odpo_steps} steps of {POST['odpo_batch'] // 2} prompts x 2 samples; "
        f"peak lr SFT {recipe['sft_lr']:g}, GRPO {recipe['grpo_lr']:g}, ODPO {recipe['odpo_lr']:g}, "
        f"PWRM {recipe['pwrm_lr']:g}.",
        "Training signal: GRPO mean rollout reward (T = 1), first quarter of the steps -> last quarter: " + "; ".join(
            f"{r['size']} {r['training']['reward_first_quarter']:.3f} -> {r['training']['reward_last_quarter']:.3f}"
            for r in rows if r["stage"] == "GRPO") + ". ODPO mean PWRM label p of its rollout pairs (0.5 = no "
        "preference, no gradient signal): " + "; ".join(
            f"{r['size']} {r['stage']} {r['training'].get('mean_p', float('nan')):.3f}" for r in rows if "ODPO" in r["stage"]) + ".",
        f"Run: {record['date']}, {record['device']} ({record['cpus']} CPUs, {record['torch_threads']} torch threads), "
        f"torch {record['torch']}, commit {record['commit']}: {run['seconds']:.0f} s wall, {run['cpu_seconds']:.0f} s "
        f"CPU for the whole command (the cascade's stages included when they ran); post-training stages "
        f"{sum(r['stage_cpu_seconds'] or 0 for r in rows if r['stage'] != 'base'):.0f} CPU-s. "
        f"Command: `{record['command']}`."]
    table = post_table(rows)
    text = "# Post-training chain\n\n" + table + "\n\n" + "\n\n".join(notes) + "\n"
    tmp = os.path.join(out, f"posttrain.md.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(out, "posttrain.md"))
    TR.write_json_atomic(os.path.join(out, "posttrain.json"), {
        "rows": rows, "split": {"train_problems": len(pd.train), "train_questions": n_train_q, "held_out": len(pd.held),
                                "overlap": pd.overlap, "think_tokens": pd.think},
        "pwrm": pwrm_info, "recipe": recipe, "run": record, "config": dataclasses.asdict(cfg)})
    plot_post(cfg, rows, os.path.join(out, "posttrain.png"))
    print("\n" + table + "\n\n" + "\n\n".join(notes))


def plot_post(cfg: CascadeConfig, rows: list, path: str):
    """Left: held-out accuracy and format rate per stage, one line per size. Right: GRPO's mean rollout reward."""
    fig = Figure(figsize=(12, 4.5), layout="constrained")
    acc_ax, rl_ax = fig.subplots(1, 2)
    sizes = list(dict.fromkeys(r["size"] for r in rows))
    for i, n in enumerate(sizes):
        mine = [r for r in rows if r["size"] == n]
        acc_ax.plot(range(len(mine)), [r["accuracy"] for r in mine], "o-", color=f"C{i}", label=f"{n} accuracy")
        acc_ax.plot(range(len(mine)), [r["format_rate"] for r in mine], "x:", color=f"C{i}", label=f"{n} format")
        stats = grpo_reward_by_step(os.path.join(cfg.out, n, "grpo"))
        if stats:
            rl_ax.plot(sorted(stats), [stats[k] for k in sorted(stats)], color=f"C{i}", label=n)
    acc_ax.set_xticks(range(len(POST_ROWS)), POST_ROWS, rotation=20, fontsize=8)
    acc_ax.set(title="held-out math (greedy)", ylabel="rate", ylim=(-0.02, 1.02))
    acc_ax.legend(fontsize=7)
    rl_ax.set(title="GRPO: mean reward of the rollouts", xlabel="GRPO step", ylabel="reward")
    rl_ax.legend(fontsize=8)
    for ax in (acc_ax, rl_ax):
        ax.grid(alpha=0.3)
    tmp = f"{path}.tmp-{os.getpid()}.png"
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


# -----------------------------------------------------------------------------
# The embedded multimodal cascade (`python cascade.py --vision`, PAPER.md section 6)
#
# A tiny multimodal parent learns to caption synthetic pictures (one coloured shape in one quadrant,
# drawn with Pillow); its ViT is then frozen and shared, and each child of the cascade is pruned from the
# previous size's distilled child (text tower, prune.py, calibrated on the caption chats' tokens), given a
# freshly initialised projector, and distilled from the parent with forward KL while seeing the same
# images. The measure is exact-match caption accuracy (greedy) on held-out pictures.
# Differences from the text demo: one distillation stage per size (captions are short, so there is no
# long-context stage); the parent trains its ViT with the rest (the real ViT arrives trained with MS3.1).

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (230, 200, 20)}
SHAPES = ("square", "circle", "triangle")
PLACES = {"top left": (0, 0), "top right": (1, 0), "bottom left": (0, 1), "bottom right": (1, 1)}
VISION_STAGES = {  # parent_steps, distill_steps per size, batch, held-out pictures, learning rates
    "cpu": dict(parent_steps=300, distill_steps=120, batch=32, n_val=96, lr=3e-3, distill_lr=2e-3),
    "smoke": dict(parent_steps=30, distill_steps=10, batch=8, n_val=8, lr=3e-3, distill_lr=2e-3),
}
VISION_TEXT = {"cpu": M.ModelArgs(dim=128, n_layers=4, head_dim=32, hidden_dim=512, n_heads=4, n_kv_heads=2,
                                  vocab_size=2048, rope_theta=1e4, max_seq_len=256),
               "smoke": M.ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=192, n_heads=4, n_kv_heads=2,
                                    vocab_size=2048, rope_theta=1e4, max_seq_len=256)}
PROMPT = "What is in the picture?"


def shape_picture(rng: np.random.Generator, size: int = 32):
    """(Pillow image, caption): one coloured shape in one quadrant of a noisy light background."""
    from PIL import Image, ImageDraw
    colour, shape, place = (list(COLOURS)[rng.integers(4)], SHAPES[rng.integers(3)], list(PLACES)[rng.integers(4)])
    bg = rng.integers(215, 256, (size, size, 3)).astype(np.uint8)
    img = Image.fromarray(bg)
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
    models seeing the batch's images."""
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
    kl_sum, kl_n = 0.0, 0
    examples = []
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


def _vlm_train_cfg(out_dir, steps, st, seq_len, lr, seed) -> TR.TrainConfig:
    return TR.TrainConfig(out_dir=out_dir, steps=steps, batch_size=st["batch"], micro_batch_size=st["batch"],
                          seq_len=seq_len, lr=lr, warmup_steps=max(1, steps // 10), dtype="fp32", seed=seed,
                          resume=True, ckpt_every=0, log_every=max(1, steps // 10), fsdp="never", export=False,
                          weight_decay=0.0)


def run_vision_cascade(cfg: CascadeConfig) -> dict:
    """Parent (ViT + projector + text, trained on captions) -> per size: prune the text tower, fresh projector,
    frozen shared ViT, KL distillation from the parent on the same images; caption accuracy of every model."""
    if cfg.preset not in VISION_STAGES:
        raise ValueError(f"--vision runs the embedded multimodal demo: --preset cpu or smoke, not {cfg.preset!r}")
    if cfg.size not in REAL_SIZES:
        raise ValueError(f"--size {cfg.size!r} is not a cascade size: choose 14b, 8b or 3b")
    st = dict(VISION_STAGES[cfg.preset])
    st["parent_steps"] = cfg.parent_steps or st["parent_steps"]  # --parent-steps / --short-steps override the preset
    st["distill_steps"] = cfg.short_steps or st["distill_steps"]
    out = os.path.join(cfg.out, "vision")
    os.makedirs(out, exist_ok=True)
    torch.manual_seed(cfg.seed)
    t0 = time.time()
    tok = D.Tokenizer.from_file(cfg.tokenizer, vocab_size=VISION_TEXT[cfg.preset].vocab_size)
    vargs = V.VisionArgs.preset("demo")
    probe, _, _ = caption_chat(tok, *shape_picture(np.random.default_rng(0)), vargs)
    seq_len = len(probe) + 8  # captions differ by a few tokens; rows are padded to this
    log(0, f"vision demo: {seq_len}-token caption chats, {len(COLOURS) * len(SHAPES) * len(PLACES)} caption classes, "
           f"out {out}")

    # The parent: ViT, projector and text trained together on captions (it plays MS3.1).
    vit = V.VisionTransformer(vargs)
    vit.init_weights(cfg.seed)
    proj = V.Projector(vargs.hidden_size, VISION_TEXT[cfg.preset].dim, vargs.spatial_merge_size)
    proj.init_weights(cfg.seed + 1)
    text = M.Transformer(VISION_TEXT[cfg.preset])
    text.init_weights(cfg.seed + 2)
    parent = V.VisionLanguageModel(vit, proj, text, freeze_vision=False)
    train_data = CaptionLoader(tok, vargs, st["batch"], seq_len, cfg.seed)
    TR.train(parent, train_data, vision_loss(train_data),
             _vlm_train_cfg(os.path.join(out, "parent"), st["parent_steps"], st, seq_len, st["lr"], cfg.seed),
             device="cpu", name="vision-parent")
    parent.vision_tower.requires_grad_(False)  # frozen from here on, shared by every child (section 6)
    parent.eval()
    rows = [{"stage": "parent", "params_text": M.num_params(text.args),
             **caption_accuracy(parent, tok, vargs, st["n_val"])}]
    log(0, f"parent caption accuracy {rows[-1]['caption']:.3f}")

    calib_data = CaptionLoader(tok, vargs, st["batch"], seq_len, cfg.seed + 7)
    calib = [calib_data.batch(i)[0] for i in range(2)]  # tokens only (prune.py calibrates the text tower)
    current = parent.language_model
    names = REAL_SIZES[: REAL_SIZES.index(cfg.size) + 1]
    for i, name in enumerate(names):
        target = miniature(VISION_TEXT[cfg.preset], name, seq_len)
        child_text, _ = P.prune(copy.deepcopy(current), target, calib, P.PruneConfig(seed=cfg.seed))
        child_proj = V.Projector(vargs.hidden_size, target.dim, vargs.spatial_merge_size)
        child_proj.init_weights(cfg.seed + 100 + i)  # a fresh projector per size
        child = V.VisionLanguageModel(parent.vision_tower, child_proj, child_text)
        rows.append({"stage": f"{name} pruned", "params_text": M.num_params(target),
                     **caption_accuracy(child, tok, vargs, st["n_val"], teacher=parent)})
        data = CaptionLoader(tok, vargs, st["batch"], seq_len, cfg.seed + 11 + i)
        TR.train(child, data, vision_loss(data, teacher=parent),
                 _vlm_train_cfg(os.path.join(out, name), st["distill_steps"], st, seq_len, st["distill_lr"], cfg.seed),
                 device="cpu", name=f"vision-{name}")
        rows.append({"stage": f"{name} distilled", "params_text": M.num_params(target),
                     **caption_accuracy(child, tok, vargs, st["n_val"], teacher=parent)})
        log(0, f"{name}: caption accuracy pruned {rows[-2]['caption']:.3f} -> distilled {rows[-1]['caption']:.3f}")
        current = child.language_model  # the distilled child seeds the next size
    result = {"rows": rows, "seconds": time.time() - t0, "preset": cfg.preset, "seed": cfg.seed,
              "vision_args": dataclasses.asdict(vargs), "parent_text_args": dataclasses.asdict(text.args),
              "seq_len": seq_len, "stages": st, "torch": torch.__version__}
    TR.write_json_atomic(os.path.join(out, "results.json"), result)
    table = ["| model | text params | caption | colour | shape | place | KL to parent |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        kl = f"{r['kl']:.3f}" if "kl" in r else "-"
        table.append(f"| {r['stage']} | {r['params_text']:,} | {100 * r['caption']:.1f}% | {100 * r['colour']:.1f}% | "
                     f"{100 * r['shape']:.1f}% | {100 * r['place']:.1f}% | {kl} |")
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write("\n".join(table) + "\n")
    print("\n".join(table))
    log(0, f"vision cascade finished in {time.time() - t0:.0f}s; results in {out}")
    return result


# -----------------------------------------------------------------------------
# CLI


def config_from_argv(argv=None) -> CascadeConfig:
    """The flags of CascadeConfig (train.py's generator); --help shows each preset's value of the fields a
    preset fills instead of "default None"."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    TR.add_dataclass_args(parser, CascadeConfig)
    for action in parser._actions:
        for table in (PRESET_STAGES, POST_STAGES):
            if action.dest in table["cpu"]:
                values = ", ".join(f"{p} {v[action.dest]}" for p, v in table.items())
                action.help = action.help.replace("(default None)", f"(default: the preset's: {values})")
    ns = parser.parse_args(argv)
    return CascadeConfig(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(CascadeConfig)})


def main(argv=None):
    cfg = config_from_argv(argv)

    def body():
        run_vision_cascade(cfg) if cfg.vision else run_cascade(cfg)
        return 0

    # an error on one rank: printed once by that rank, every rank exits at once (train.run_main)
    code = TR.run_main(body, expected=(ValueError, FileNotFoundError, M.CheckpointError))
    if code:
        sys.exit(2)


if __name__ == "__main__":
    main()
    TR.exit_process(0)  # under torchrun: leave without interpreter finalization (see there)
