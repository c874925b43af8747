"""Cascade Distillation, Algorithm 1 end to end: prune, distil short, distil long, repeat.

Reading guide
-------------
Concept: PAPER.md section 1, Algorithm 1 (`run_cascade` below is this loop):

    parent = MS3.1
    for size in [14B, 8B, 3B]:
        init       = prune(parent, size)                       # prune.py, section 4    (stage_prune)
        short      = distill(init, teacher=MS3.1, ctx=16384)   # distill.py, section 5  (stage_distill)
        base[size] = distill(short, teacher=MS3.1, ctx=262144) # long context, YaRN + query temperature
        parent     = short                                     # the SHORT child seeds the next size

Each stage writes a Hugging Face checkpoint and a `done.json` under `--out/<stage>/`; a rerun skips finished
stages and resumes an interrupted one from its last training checkpoint (train.py). A rerun with changed
settings refuses, naming them; `--restart-from STAGE` redoes that stage and every later one. The run ends
with a retention table (the paper's Table 3 in miniature): held-out CE, KL to the teacher and "kept".

Deviations from the paper, and why:
 1. Scale: the paper distils 1-3T tokens per child at 16K then 256K context. The embedded default trains a
    tiny Ministral-shaped parent on text that ships with Python and distils a few hundred thousand tokens
    at 128 then 256 tokens (YaRN factor 2, the query temperature's L = the short length).
 2. Retention is held-out cross-entropy and KL to the teacher, not benchmark scores: "kept" =
    (ln V - CE_child) / (ln V - CE_parent), the share of the parent's gain over a uniform guess.
 3. Pruning needs whole tensors: in a multi-GPU run every rank holds the full source model beside its 1/N
    of the sharded teacher and calibrates on its own share of the sequences; prune.py all-reduces the
    statistics, so every rank cuts the same units, and rank 0 writes the child. Distillation is FSDP2.
 4. The teacher is the original parent for every size, as in the paper (`--teacher PATH` swaps it).
 5. RoPE per stage: the short stage runs plain RoPE, the long stage switches YaRN (factor long/short, L =
    the short context) and the query temperature on (distill.py), and the exported base checkpoint carries
    that config. The released 14B/8B/3B configs are long-context ones, so `make_plan` strips YaRN for the
    short stage; it keeps the child's released rope_theta, on which the long stage's YaRN is defined.
 6. The held-out text is held out for real: every held-out token inside a 32-token window that also occurs
    in the training tokens is dropped (data.dedupe_heldout), and the rest is halved into a validation half
    (for choices an experiment makes, such as a baseline's learning rate) and a test half, which every
    figure in the table reads.
 7. Presets size the run: `cpu` (the embedded default), `smoke` (seconds, tests), `gpu` (one GPU), `paper`
    (a real Mistral parent: the paper's contexts, checkpoints every 1000 steps and 30 minutes), and
    `cpu-real` / `gpu-real` for a small pretrained parent such as SmolLM2-135M-Instruct: its children take the
    family's ratios of it (`Preset.children`) and distil on the Python corpus plus `--data` (`Preset.corpus`).
    `--chat-data` adds chats in the parent's chat format to any preset.

Run: `python cascade.py` (the embedded default: CPU, no downloads, a few minutes on 2 cores);
`torchrun --nproc_per_node=8 cascade.py --preset paper --size 3b --parent PATH --data SHARDS
--activation-checkpointing`; `python cascade.py --parent smollm2 --preset cpu-real` (after `python model.py
fetch smollm2`). The from-scratch baseline, plots, ablations, the post-training chain, the multimodal
cascade and the real parent's task evaluation are experiments that call this file (experiments/README.md).
Depends on: model.py, data.py, prune.py, distill.py, train.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

import data as D
import distill as DI
import model as M
import prune as P
import train as TR
from model import REAL_SIZES, miniature, short_stage_args  # the family's child shapes (PAPER.md section 2)

# -----------------------------------------------------------------------------
# Config


@dataclass
class CascadeConfig:
    out: str = "runs/cascade"  # every stage's checkpoint, report and metrics go under here
    size: Optional[str] = "3b"  # the last size of the cascade: 14b, 8b or 3b (Algorithm 1 stops there)
    shapes: Optional[str] = None  # custom cascade instead of --size: "layers:dim:ffn[:tied],..." e.g. "4:64:256,3:48:192:tied"
    parent: Optional[str] = None  # HF or Mistral-native checkpoint, a .gguf file, or "smollm2" (`python model.py fetch
    #   smollm2`); None = train the embedded tiny parent
    data: Optional[str] = None  # token shards (python data.py prepare) or .txt/.jsonl documents; None = Python corpus
    chat_data: Optional[str] = None  # .jsonl chats ({"messages": [...]}) added to the distillation data, in the
    #   parent's chat format (data.chat_tokens): data that covers the abilities a chat parent should keep;
    #   {"text": ...} lines join as plain documents
    chat_share: Optional[float] = None  # repeat --chat-data until it is about this share of the distillation
    #   tokens (0 < share < 1); None = each chat once
    val_data: Optional[str] = None  # held-out tokens; None = the corpus's own split
    tokenizer: Optional[str] = None  # tekken.json; None = the parent's own, else mistral-common's
    teacher: Optional[str] = None  # None = the parent (paper); a path = another teacher
    preset: str = "cpu"  # cpu (the embedded default), smoke, gpu, paper, cpu-real, gpu-real (deviation 7)
    seed: int = 0
    # Stage lengths; None takes the preset's value.
    parent_steps: Optional[int] = None  # pretraining of the embedded parent (next-token CE)
    short_steps: Optional[int] = None  # short-context distillation per size (section 5)
    long_steps: Optional[int] = None  # long-context distillation per size
    batch_size: Optional[int] = None  # global sequences per optimizer step
    micro_batch_size: Optional[int] = None  # per rank; None = the batch split over the ranks (at most the preset's value)
    seq_len: Optional[int] = None  # short context (paper: 16384)
    long_seq_len: Optional[int] = None  # long context (paper: 262144)
    lr: Optional[float] = None  # peak learning rate of the embedded parent's pretraining
    distill_lr: Optional[float] = None  # peak learning rate of the distillation stages (a pruned child starts close)
    dtype: Optional[str] = None  # fp32 or bf16
    activation_checkpointing: bool = False  # recompute each block in backward (real sizes: on)
    compile: bool = False  # torch.compile each block
    teacher_cache_mb: int = 1024  # MiB of teacher outputs kept for batches seen again (distill.TeacherCache); 0 = off
    ckpt_every: Optional[int] = None  # training checkpoint every N steps (plus every 30 min); None = preset's
    calib_seqs: Optional[int] = None  # calibration sequences for pruning (paper: a few hundred)
    calib_corpus: bool = False  # draw them from the corpus, not --chat-data: mixes compared prune alike
    calib_data: Optional[str] = None  # draw them from these .jsonl chats/texts instead (comma-separated files)
    ffn_score: str = "activation"  # FFN units by mean |a_j| (the paper), or "contribution": |a_j| * ||W2[:, j]||
    eval_batches: Optional[int] = None  # held-out batches (of micro-batch x world sequences) for every CE/KL figure
    max_epochs: float = 20.0  # refuse a stage that would revisit the data more often than this
    layer_selection: str = "norm_ratio"  # prune.py: norm_ratio | block_influence | random | last_k
    ce_weight: float = 0.0  # 0 = forward KL alone (paper); >0 mixes in next-token CE
    temperature: float = 1.0  # distillation temperature T
    restart_from: Optional[str] = None  # redo this stage (e.g. parent, 8b/short) and every later one


@dataclass(frozen=True)
class Preset:
    stages: dict  # the CascadeConfig values it fills where a flag leaves None (stage lengths, rates, dtype, ...)
    parent: Optional[M.ModelArgs] = None  # the embedded parent's shape; None = the preset needs --parent
    children: str = "released"  # "released": the real 14B/8B/3B configs; "ratios": the family's ratios of the parent
    corpus: bool = False  # distil on the Python corpus plus --data (a small pretrained parent) instead of --data alone


def _stages(parent_steps, short_steps, long_steps, batch_size, micro_batch_size, seq_len, long_seq_len, lr,
            distill_lr, dtype, calib_seqs, eval_batches, ckpt_every=None) -> dict:
    """micro_batch_size is the most sequences per rank per forward (train.derive_micro_batch); ckpt_every None =
    twice per stage."""
    return dict(locals())


# The embedded parents follow MS3.1's proportions; their children apply the real child/MS3.1 ratios.
PRESETS = {
    "cpu": Preset(_stages(100, 80, 14, 16, 16, 128, 256, 3e-3, 1e-3, "fp32", 64, 8), children="ratios",
                  parent=M.ModelArgs(dim=160, n_layers=6, head_dim=32, hidden_dim=960, n_heads=6, n_kv_heads=2,
                                     vocab_size=4096, rope_theta=1e4, max_seq_len=4096)),
    "smoke": Preset(_stages(150, 20, 6, 8, 8, 64, 128, 3e-3, 1e-3, "fp32", 16, 8), children="ratios",
                    parent=M.ModelArgs(dim=64, n_layers=4, head_dim=16, hidden_dim=384, n_heads=4, n_kv_heads=2,
                                       vocab_size=2048, rope_theta=1e4, max_seq_len=1024)),
    "gpu": Preset(_stages(4000, 1500, 300, 64, 16, 1024, 4096, 1e-3, 3e-4, "bf16", 256, 8), children="ratios",
                  parent=M.ModelArgs(dim=768, n_layers=16, head_dim=64, hidden_dim=4608, n_heads=12, n_kv_heads=4,
                                     vocab_size=16384, rope_theta=1e6, max_seq_len=8192)),
    # A real parent at the paper's contexts: ~1T tokens per child = 500K steps of 2M tokens.
    "paper": Preset(_stages(0, 500_000, 5_000, 128, 1, 16384, 262144, 1e-4, 1e-4, "bf16", 256, 8, ckpt_every=1000)),
    # A small pretrained parent (~100M parameters) is fine-tuned, not retrained: a low distillation rate.
    "cpu-real": Preset(_stages(0, 64, 16, 8, 8, 128, 256, 3e-4, 1e-4, "fp32", 32, 4), children="ratios", corpus=True),
    "gpu-real": Preset(_stages(0, 150, 20, 32, 8, 2048, 8192, 3e-4, 3e-4, "bf16", 256, 1), children="ratios",
                       corpus=True),
}
# -----------------------------------------------------------------------------
# Algorithm 1


def run_cascade(cfg: CascadeConfig, preset: Optional[Preset] = None, later_stages: tuple = ()) -> dict:
    """Algorithm 1 on cfg; returns the table's rows, each with the checkpoint it scored ("path"), and the
    run's context for experiments that go on from here (`later_stages`: the stage names they add to --out, so
    that --restart-from accepts and removes them too)."""
    rank, world, _, device = TR.setup_distributed()
    try:
        clock = TR.run_clock()
        cfg, preset = resolved(cfg, world, preset)
        ctx, plan = prepare(cfg, preset, rank, world, device, later_stages)
        stages = TR.Stages(cfg.out)  # resumable steps under --out (train.py)

        parent = stage_parent(cfg, ctx, stages, plan)
        teacher = build(cfg.teacher or parent, ctx, cfg, train=False)
        cache = DI.attach_teacher_cache(teacher, cfg.teacher_cache_mb)
        current, made = parent, {}
        for name, target in plan.sizes:
            init = stage_prune(cfg, ctx, stages, f"{name}/init", current, target)
            short = stage_distill(cfg, ctx, stages, f"{name}/short", init, teacher, False, cfg.short_steps,
                                  cfg.seed + 1)
            made[name] = (init, short)
            current = short  # the SHORT-context child seeds the next size
        # The long stages feed no later size, so they run after the chain of short ones.
        upstream = stages.info("parent").get("tokens", 0)  # tokens each row has seen, upstream included
        rows = [row(cfg, ctx, stages, "parent", "parent", parent, teacher, upstream)]
        for name, _ in plan.sizes:
            init, short = made[name]
            base = stage_distill(cfg, ctx, stages, f"{name}/long", short, teacher, True, cfg.long_steps, cfg.seed + 2)
            short_tokens = stages.info(f"{name}/short")["tokens"]
            rows += [row(cfg, ctx, stages, f"{name} pruned", f"{name}/init", init, teacher, upstream),
                     row(cfg, ctx, stages, f"{name} short", f"{name}/short", short, teacher, upstream + short_tokens),
                     row(cfg, ctx, stages, f"{name} base", f"{name}/long", base, teacher,
                         upstream + short_tokens + stages.info(f"{name}/long")["tokens"])]
            upstream += short_tokens  # the short child seeds the next size; the long stage is upstream of nothing
        run = clock()
        if rank == 0:
            write_table(cfg, rows, plan, ctx, run)
        if cache is not None:
            TR.print0(f"teacher cache: {cache.hits} forwards reused, {cache.misses} run, {cache.bytes / 2**20:.0f} MiB")
        TR.print0(f"cascade finished in {run['seconds']:.0f}s ({run['cpu_seconds']:.0f} CPU-s); table in "
                 f"{os.path.join(cfg.out, 'table.md')}")
        return {"rows": rows, "run": run, "cfg": cfg, "preset": preset, "plan": plan, "ctx": ctx, "stages": stages,
                "teacher": teacher}
    finally:
        TR.teardown_distributed()


def row(cfg, ctx, stages, label, stage, path, teacher, tokens_seen) -> dict:
    """One line of the table: held-out test CE and KL, the tokens seen (upstream included) and the time the
    stage that made the checkpoint took."""
    ev = stage_eval(cfg, ctx, stages, stage, path, teacher, cfg.seq_len)
    took = stages.info(stage)
    return {"stage": label, "dir": stage, "path": path, "params": ev["params"], "ce": ev["ce"], "kl": ev.get("kl"),
            "eval_tokens": ev["tokens"], "tokens_seen": tokens_seen, "seconds": took.get("seconds"),
            "cpu_seconds": took.get("cpu_seconds")}


@dataclass
class Context:
    rank: int
    world: int
    device: torch.device
    train_tokens: np.ndarray
    val_tokens: np.ndarray  # validation half of the de-duplicated held-out text (deviation 6)
    test_tokens: np.ndarray  # test half: every CE and KL in the table
    heldout: dict = field(default_factory=dict)  # the de-duplication record (overlap before and after)
    tok: Optional[D.Tokenizer] = None

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


def stage_parent(cfg, ctx, stages: TR.Stages, plan) -> str:
    """The parent checkpoint path: the user's, or the embedded tiny parent trained here. A .gguf parent is
    dequantised once into an HF checkpoint (fp32) that every later stage reads like any other."""
    src = cfg.parent and M.resolve_model_path(cfg.parent)
    if src and M.is_gguf(src):
        if stages.done("parent") is None:
            model = M.load_model(src)
            if ctx.rank == 0:
                M.save_model(model, os.path.join(stages.dir("parent"), "model"))
            TR.barrier()
            stages.finish("parent", {"source": src, "params": M.num_params(model.args)})
        return os.path.join(stages.dir("parent"), "model")
    if cfg.parent is not None:
        return cfg.parent
    return stage_pretrain(cfg, ctx, stages, "parent", plan.parent_args, cfg.parent_steps, cfg.long_seq_len, cfg.lr,
                          cfg.seed)


def stage_pretrain(cfg, ctx, stages, name, args: M.ModelArgs, steps: int, seq_len: int, lr: float, seed: int,
                   key: Optional[dict] = None) -> str:
    """A model of shape `args` from random initialisation, trained with next-token CE (the embedded parent;
    an experiment's from-scratch baseline)."""
    if stages.done(name, key) is None:
        TR.print0(f"== stage {name}: train {M.num_params(args):,} parameters from scratch for {steps} steps at "
                 f"{seq_len} tokens, lr {lr:g}")
        model = build(args, ctx, cfg)
        TR.train(model, loader(ctx, ctx.train_tokens, cfg, seq_len, seed), DI.ce_loss_fn(DI.DistillConfig()),
                 train_config(cfg, ctx, stages.dir(name), steps, seq_len, lr=lr), device=ctx.device, name=name)
        stages.finish(name, {"tokens": steps * cfg.batch_size * seq_len, "lr": lr})
        del model
    return os.path.join(stages.dir(name), "model")


def stage_prune(cfg, ctx, stages, name, source_path, target: M.ModelArgs, calib: Optional[list] = None,
                key: Optional[dict] = None) -> str:
    """Deviation 3: every rank holds the full source model and calibrates on its own share of the sequences
    (`calib`: token batches; None = cfg.calib_seqs sequences of the training data); rank 0 writes the child."""
    if stages.done(name, key) is None:
        TR.print0(f"== stage {name}: prune {source_path} to layers={target.n_layers} dim={target.dim} "
                 f"ffn={target.hidden_dim}")
        parent = M.load_model(source_path, device=ctx.device)
        calib = [b.to(ctx.device) for b in (calibration(cfg, ctx) if calib is None else calib)]
        child, report = P.prune(parent, target, calib, P.PruneConfig(layer_method=cfg.layer_selection, seed=cfg.seed,
                                                                  ffn_score=cfg.ffn_score))
        if ctx.rank == 0:
            M.save_model(child, os.path.join(stages.dir(name), "model"))
            TR.write_json_atomic(os.path.join(stages.dir(name), "report.json"), P.report_to_json(report))
        TR.barrier()
        stages.finish(name, {"params": M.num_params(child.args)})
        del parent, child
    return os.path.join(stages.dir(name), "model")


def calibration(cfg: CascadeConfig, ctx: Context) -> list:
    """This rank's share of cfg.calib_seqs training sequences, as [B, T] token batches."""
    tokens = ctx.train_tokens  # the chats are its tail (load_data)
    if cfg.calib_corpus:
        tokens = tokens[:len(tokens) - ctx.heldout.get("chat_tokens", 0)]
    if cfg.calib_data:  # what the pruning keeps follows what its calibration text exercises
        tokens = np.concatenate([D.chat_tokens(p, ctx.tok) for p in cfg.calib_data.split(",")])
    calib_loader = loader(ctx, tokens, cfg, cfg.seq_len, seed=cfg.seed + 7)
    return [calib_loader.batch(i)[0] for i in range(max(1, cfg.calib_seqs // (cfg.micro_batch_size * ctx.world)))]


def stage_distill(cfg, ctx, stages, name, init_path, teacher, long_context: bool, steps: int, seed: int, *,
                  student_fn: Optional[Callable] = None, data=None, loss_fn=None, train_cfg=None,
                  save: Optional[Callable] = None, key: Optional[dict] = None) -> str:
    """Forward-KL distillation of the checkpoint at init_path from `teacher` (distill.py, section 5). A
    multimodal cascade passes its own pieces, the stage logic staying the same: `student_fn(init_path)` (a
    model around the checkpoint's text model), `data` (a loader whose batches carry images), `loss_fn`,
    `train_cfg`, and `save(model, path)` (its checkpoint writer)."""
    if stages.done(name, key) is None:
        seq = cfg.long_seq_len if long_context else cfg.seq_len
        args, _ = M.read_checkpoint_args(init_path)
        TR.print0(f"== stage {name}: distil {M.num_params(args):,} parameters for {steps} steps at {seq} tokens"
                 f"{' (YaRN + query temperature)' if long_context else ''}")
        student = student_fn(init_path) if student_fn else build(init_path, ctx, cfg)
        tcfg = train_cfg or train_config(cfg, ctx, stages.dir(name), steps, seq, lr=cfg.distill_lr)
        if loss_fn is None:
            dcfg = DI.DistillConfig(temperature=cfg.temperature, ce_weight=cfg.ce_weight,
                                    long_yarn_factor=cfg.long_seq_len / cfg.seq_len, long_original_max_pos=cfg.seq_len)
            DI.distill(student, teacher, data or loader(ctx, ctx.train_tokens, cfg, seq, seed), tcfg, dcfg,
                       device=ctx.device, long_context=long_context)
        else:
            TR.train(student, data, loss_fn, tcfg, device=ctx.device, name=name)
        if save is not None and ctx.rank == 0:
            save(student, os.path.join(stages.dir(name), "model"))
        stages.finish(name, {"tokens": steps * tcfg.batch_size * tcfg.seq_len})
    return os.path.join(stages.dir(name), "model")


def stage_eval(cfg, ctx, stages, name, path, teacher, seq_len, split="test") -> dict:
    """Held-out CE and KL of a checkpoint, cached in <stage>/eval_<split>.json under a key of everything the
    figure depends on besides the checkpoint (the held-out tokens, how many windows, their length)."""
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
    held = loader(ctx, ctx.split(split), cfg, seq_len, seed=1234)
    result = DI.evaluate_pair(model, teacher, held, cfg.eval_batches) | {"params": M.num_params(args)}
    if ctx.rank == 0:
        TR.write_json_atomic(cache, {"key": key, "result": result})
    TR.barrier()
    return result


# -----------------------------------------------------------------------------
# The plan and the settings: every shape and value checked before any long work starts


def resolved(cfg: CascadeConfig, world: int = 1, preset: Optional[Preset] = None) -> tuple[CascadeConfig, Preset]:
    """Fill the None stage lengths from the preset, derive the micro-batch from the world size, and check
    every value (validate): a bad one fails here, before any data is read."""
    if preset is None:
        if cfg.preset not in PRESETS:
            raise ValueError(f"--preset {cfg.preset!r} is unknown: choose one of {', '.join(PRESETS)}")
        preset = PRESETS[cfg.preset]
    if cfg.parent is None and preset.parent is None:
        raise ValueError(f"--preset {cfg.preset} sizes a run on a real parent: give --parent PATH (or smollm2)")
    cfg = dataclasses.replace(cfg, **{k: v for k, v in preset.stages.items()
                                      if getattr(cfg, k) is None and k != "micro_batch_size"})
    if cfg.micro_batch_size is None:
        cfg = dataclasses.replace(cfg, micro_batch_size=TR.derive_micro_batch(cfg.batch_size, world,
                                                                           preset.stages["micro_batch_size"]))
    if cfg.shapes:  # --shapes names the sizes; the record must not show a --size the run never used
        cfg = dataclasses.replace(cfg, size=None)
    validate(cfg, world)
    return cfg, preset


def validate(cfg: CascadeConfig, world: int):
    """One clear error for the first bad value, before any data is read or any model is built."""
    def bad(flag, value, fix):
        raise ValueError(f"--{flag} {value} {fix}")

    if cfg.ffn_score not in P.FFN_SCORES:
        bad("ffn-score", repr(cfg.ffn_score), f"is unknown: choose one of {', '.join(P.FFN_SCORES)}")
    if cfg.layer_selection not in P.LAYER_METHODS:
        bad("layer-selection", repr(cfg.layer_selection), f"is unknown: choose one of {', '.join(P.LAYER_METHODS)}")
    if not cfg.temperature > 0:
        bad("temperature", cfg.temperature, "must be > 0: the distillation softmax divides the logits by it")
    if not 0 <= cfg.ce_weight <= 1:
        bad("ce-weight", cfg.ce_weight, "must be in [0, 1]: the loss is (1 - w) KL + w CE (0 = the paper's KL alone)")
    counts = ["short_steps", "long_steps", "batch_size", "micro_batch_size", "seq_len", "long_seq_len",
              "calib_seqs", "eval_batches"] + (["parent_steps"] if cfg.parent is None else [])
    for k in counts:
        if getattr(cfg, k) < 1:
            bad(k.replace("_", "-"), getattr(cfg, k), "must be at least 1" + (
                ": with no held-out batch every row would read 100% kept" if k == "eval_batches" else ""))
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
    if cfg.chat_data is not None and not os.path.isfile(cfg.chat_data):
        bad("chat-data", repr(cfg.chat_data), 'is not a file: give a .jsonl file with one {"messages": [...]} per line')
    for path in cfg.calib_data.split(",") if cfg.calib_data else ():
        if not os.path.isfile(path):
            bad("calib-data", repr(path), 'is not a file: give .jsonl files of {"messages": [...]} or {"text": ...} lines, '
                "comma-separated")
    if cfg.calib_data and cfg.calib_corpus:
        bad("calib-data", repr(cfg.calib_data), "and --calib-corpus each choose the calibration text: give one")
    if cfg.chat_share is not None and (cfg.chat_data is None or not 0 < cfg.chat_share < 1):
        bad("chat-share", cfg.chat_share, "needs --chat-data and a share strictly between 0 and 1")
    if cfg.batch_size % (cfg.micro_batch_size * world):
        bad("batch-size", cfg.batch_size, f"is not a multiple of --micro-batch-size {cfg.micro_batch_size} x "
            f"{world} processes = {cfg.micro_batch_size * world}: change either, or leave --micro-batch-size out "
            f"to derive it from the world size")


@dataclass
class Plan:
    parent_args: M.ModelArgs
    sizes: list  # [(name, ModelArgs)] in cascade order
    order: list  # every stage name of the run, in order (a restart removes a stage and all after it)
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


def make_plan(cfg: CascadeConfig, preset: Preset, later_stages: tuple = ()) -> Plan:
    if not cfg.shapes and cfg.size not in REAL_SIZES:
        raise ValueError(f"--size {cfg.size!r} is not a cascade size: choose 14b, 8b or 3b (or give --shapes)")
    names = [] if cfg.shapes else REAL_SIZES[: REAL_SIZES.index(cfg.size) + 1]
    parent = preset.parent if cfg.parent is None else M.read_args(cfg.parent)
    if cfg.shapes:
        sizes = parse_shapes(cfg.shapes, parent)
    elif preset.children == "ratios":
        sizes = [(n, miniature(parent, n, cfg.seq_len)) for n in names]
    else:  # the released configs are the long-context ones: the short stage runs plain RoPE (deviation 5)
        sizes = [(n, short_stage_args(M.ModelArgs.preset(n), cfg.seq_len)) for n in names]
    for name, a in sizes:
        for k in ("n_layers", "dim", "hidden_dim"):
            if getattr(a, k) > getattr(parent, k):
                raise ValueError(f"size {name} needs {k}={getattr(a, k)} but the parent has {getattr(parent, k)}: "
                                 f"the cascade only prunes; pick a smaller --size / --shapes or a larger parent")
        if (a.n_heads, a.n_kv_heads, a.head_dim, a.vocab_size) != (parent.n_heads, parent.n_kv_heads, parent.head_dim,
                                                                   parent.vocab_size):
            raise ValueError(f"size {name} has heads/vocab {(a.n_heads, a.n_kv_heads, a.head_dim, a.vocab_size)} but "
                             f"the parent has {(parent.n_heads, parent.n_kv_heads, parent.head_dim, parent.vocab_size)}: "
                             f"heads and vocabulary are never pruned (PAPER.md section 4); use a Mistral-family parent")
    fp = {k: getattr(cfg, k) for k in FIRST_STAGE_CHANGED if k not in ("parent_args", "sizes")}
    fp["parent_args"] = dataclasses.asdict(parent)
    fp["sizes"] = [[n, a.n_layers, a.dim, a.hidden_dim, a.tied_embeddings] for n, a in sizes]
    order = (["parent"] + [f"{n}/{s}" for n, _ in sizes for s in ("init", "short")] + [f"{n}/long" for n, _ in sizes]
             + list(later_stages))  # the order run_cascade makes them in
    if cfg.restart_from is not None and cfg.restart_from not in order:
        raise ValueError(f"--restart-from {cfg.restart_from!r} is not a stage of this run: choose one of "
                         f"{', '.join(order)}")
    return Plan(parent, sizes, order, fp)


# Every setting a finished stage depends on, mapped to the first stage it changes (stage kinds: the first
# size's stage of that kind, or a later one for a changed shape). Evaluation settings are keyed in each
# eval_*.json instead and recomputed. Micro-batch, world size, checkpointing, compile and the teacher cache
# change no result.
FIRST_STAGE_CHANGED = {
    **dict.fromkeys(("parent", "parent_args", "data", "chat_data", "chat_share", "tokenizer", "preset", "seed",
                     "parent_steps", "lr", "batch_size", "long_seq_len", "dtype"), "parent"),
    **dict.fromkeys(("sizes", "seq_len", "layer_selection", "calib_seqs", "calib_corpus", "calib_data",
                     "ffn_score"), "init"),
    **dict.fromkeys(("teacher", "short_steps", "distill_lr", "temperature", "ce_weight"), "short"),
    "long_steps": "long",
}


def first_changed_stage(diff: list, ours: dict, theirs: dict, order: list) -> str:
    first = len(order) - 1
    for k in diff:
        where = FIRST_STAGE_CHANGED.get(k, "parent")
        if where == "parent":
            first = 0
            continue
        size = 0  # the first child whose shape (or whose parent's shape) differs
        if k == "sizes":
            a, b = ours.get("sizes") or [], theirs.get("sizes") or []
            size = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        if size < len(ours["sizes"]):
            first = min(first, order.index(f"{ours['sizes'][size][0]}/{where}"))
    return order[first]


def claim_out_dir(cfg: CascadeConfig, plan: Plan, rank: int, write: bool = True):
    """Refuse an --out that holds stages run with other settings, unless --restart-from names the first stage
    they change (or an earlier one); then that stage and every later one are deleted and redone."""
    path = os.path.join(cfg.out, "run.json")
    ours = json.loads(json.dumps(plan.fingerprint))
    if os.path.exists(path):
        with open(path) as f:
            theirs = json.load(f).get("fingerprint", {})
        # A setting added after that run was written is absent from its run.json; the run had its default.
        defaults = json.loads(json.dumps(dataclasses.asdict(CascadeConfig())))
        theirs = {**{k: defaults[k] for k in ours if k not in theirs and k in defaults}, **theirs}
        diff = [k for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        if diff:
            first = first_changed_stage(diff, ours, theirs, plan.order)
            shown = ", ".join(k if isinstance(ours.get(k), (dict, list)) else f"{k} {theirs.get(k)} -> {ours.get(k)}"
                              for k in diff)
            if cfg.restart_from is None:
                raise ValueError(f"--out {cfg.out} holds stages run with other settings ({shown}): pass --restart-from "
                                 f"{first} to redo {first} and every later stage, or choose a new --out")
            if plan.order.index(cfg.restart_from) > plan.order.index(first):
                raise ValueError(f"--restart-from {cfg.restart_from} would keep stage {first}, which the changed "
                                 f"settings ({shown}) alter: restart from {first} or earlier")
    elif os.path.isdir(cfg.out) and os.listdir(cfg.out):
        raise ValueError(f"--out {cfg.out} is not empty and holds no run.json: choose a new --out")
    if not write:  # the up-front check, before the data is read: nothing is written, no barrier
        return
    TR.barrier()  # every rank has looked before rank 0 writes
    if rank == 0:
        if cfg.restart_from is not None and os.path.isdir(cfg.out):
            redo = plan.order[plan.order.index(cfg.restart_from):]
            for name in redo:
                shutil.rmtree(os.path.join(cfg.out, name), ignore_errors=True)
            print(f"--restart-from {cfg.restart_from}: removed stages {', '.join(redo)}", flush=True)
        os.makedirs(cfg.out, exist_ok=True)
        TR.write_json_atomic(path, {"fingerprint": plan.fingerprint, "config": dataclasses.asdict(cfg)})


def prepare(cfg: CascadeConfig, preset: Preset, rank: int, world: int, device, later_stages: tuple = ()
            ) -> tuple[Context, Plan]:
    """Every check that can fail, before any long work: shapes, parent, teacher, data, --out."""
    t0 = time.time()
    TR.print0("config: " + json.dumps(dataclasses.asdict(cfg)))
    plan = make_plan(cfg, preset, later_stages)
    if cfg.teacher is not None:
        M.read_checkpoint_args(cfg.teacher)
    claim_out_dir(cfg, plan, rank, write=False)  # refuse changed settings before reading any data
    tok, train_tokens, val_tokens, test_tokens, heldout = load_data(cfg, preset, plan)
    check_data(cfg, len(train_tokens), len(val_tokens), len(test_tokens), world)
    claim_out_dir(cfg, plan, rank)
    TR.barrier()
    ctx = Context(rank, world, device, train_tokens, val_tokens, test_tokens, heldout, tok)
    TR.print0(f"data: {len(train_tokens):,} train ({heldout['chat_tokens']:,} of them chats) / "
              f"{len(val_tokens):,} validation / {len(test_tokens):,} test tokens, vocab {tok.vocab_size}; held-out "
              f"{heldout['ngram']}-token windows also in training: {heldout.get('overlap_before', '?')} before "
              f"de-duplication, {heldout.get('overlap_after', '?')} after ({time.time() - t0:.1f}s)")
    return ctx, plan


# -----------------------------------------------------------------------------
# Data


def load_data(cfg: CascadeConfig, preset: Preset, plan: Plan):
    # A tiny parent's vocabulary is a truncated Tekken (data.py, deviation 2); a real one is the whole file.
    tok = D.checkpoint_tokenizer(cfg.parent and M.resolve_model_path(cfg.parent), plan.parent_args.vocab_size,
                                 cfg.tokenizer)
    if cfg.data is None or preset.corpus:
        train_docs, val_docs = D.python_corpus(val_fraction=0.15, seed=cfg.seed)
        train_tokens, held = D.tokenize_documents(train_docs, tok), D.tokenize_documents(val_docs, tok)
        if cfg.data is not None:  # a small real parent distils on the Python corpus plus the user's text
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
    chats = np.zeros(0, dtype=np.uint32)
    if cfg.chat_data is not None:
        chats = D.chat_tokens(cfg.chat_data, tok)
        if cfg.chat_share is not None:  # whole copies of the file, the number that comes closest to the share
            chats = np.tile(chats, max(1, round(cfg.chat_share / (1 - cfg.chat_share) * len(train_tokens) / len(chats))))
        train_tokens = np.concatenate([np.asarray(train_tokens), chats])
    held = np.asarray(held)  # the held-out text is small: in memory
    held, info = D.dedupe_heldout(train_tokens, held, D.DEDUP_NGRAM, tok.bos_id, tok.eos_id)
    info |= {"chat_tokens": len(chats), "chat_share": round(len(chats) / len(train_tokens), 4)}
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
# The retention table


def retention(ce: float, parent_ce: float, vocab: int) -> float:
    """Deviation 2: the share of the parent's gain over a uniform guess (ln V) that a model keeps."""
    return (math.log(vocab) - ce) / (math.log(vocab) - parent_ce)


def results_table(rows: list, vocab: int, columns: tuple = ()) -> str:
    """The markdown table; `columns` adds (header, row -> cell text) columns an experiment measures."""
    tokens = lambda n: "-" if not n else f"{n / 1e6:.2f}M"
    seconds = lambda s: "-" if s is None else f"{s:.0f}"
    lines = ["| model | parameters | held-out CE | KL to teacher | kept | tokens seen (upstream incl.) | stage time (s) "
             "| stage CPU (s) |" + "".join(f" {h} |" for h, _ in columns),
             "|---|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * len(columns)]
    for r in rows:
        kl = "-" if r.get("kl") is None else f"{r['kl']:.3f}"
        lines.append(f"| {r['stage']} | {r['params']:,} | {r['ce']:.3f} | {kl} | "
                     f"{100 * retention(r['ce'], rows[0]['ce'], vocab):.1f}% | {tokens(r.get('tokens_seen'))} | "
                     f"{seconds(r.get('seconds'))} | {seconds(r.get('cpu_seconds'))} |"
                     + "".join(f" {cell(r)} |" for _, cell in columns))
    return "\n".join(lines)


def write_table(cfg: CascadeConfig, rows: list, plan: Plan, ctx: Context, run: dict, out: Optional[str] = None,
                columns: tuple = (), notes: tuple = (), tail: str = "") -> dict:
    """<out>/table.md and table.json (out: cfg.out): the retention table, what it measures, and where it was
    made. An experiment adds rows, `columns` (see results_table), `notes` and a markdown `tail`; returns the header."""
    out, h, record = out or cfg.out, ctx.heldout, TR.run_record(**run)
    table = results_table(rows, plan.parent_args.vocab_size, columns)
    notes = [f"kept = (ln V - CE) / (ln V - CE_parent): the share of the parent's gain over a uniform guess that a "
             f"model keeps. 'pruned' is right after pruning, 'short' after short-context distillation, 'base' after "
             f"long-context distillation. CE and KL are on the test half of the held-out text at {cfg.seq_len} "
             f"tokens ({rows[0]['eval_tokens']:,} tokens); held-out {h['ngram']}-token windows also found in the "
             f"training tokens: {h.get('overlap_after', 'not checked')} (before de-duplication: "
             f"{h.get('overlap_before', 'not checked')} of {h['windows']:,}).",
             "Tokens seen include everything upstream: the parent's pretraining and every distillation stage on "
             "the chain of checkpoints that led to the row (each size is pruned from the previous size's short "
             "child).", *notes,
             *([f"Distillation data: {h['chat_tokens']:,} of the {len(ctx.train_tokens):,} training tokens "
                f"({100 * h['chat_share']:.1f}%) are the chats of --chat-data {cfg.chat_data} (--chat-share "
                f"{cfg.chat_share}); the rest is the corpus."] if h.get("chat_tokens") else []),
             f"{TR.run_line(record)}: {run['seconds']:.0f} s wall, {run['cpu_seconds']:.0f} s CPU (load average "
             f"{run['loadavg_start']} at the start, {run['loadavg_end']} at the end; wall time on a shared machine "
             f"is inflated). Command: `{record['command']}`."]
    TR.write_text_atomic(os.path.join(out, "table.md"), "\n\n".join(["# Cascade retention", table, *notes]) + "\n" + tail)
    TR.write_json_atomic(os.path.join(out, "table.json"), {"rows": rows, "heldout": h, "run": record,
                                                         "config": dataclasses.asdict(cfg)})
    print("\n" + table + "\n\n" + "\n\n".join(notes), flush=True)
    return record


# -----------------------------------------------------------------------------
# Command line


def parse_args(argv=None, *more) -> tuple:
    """(CascadeConfig, *instances of the `more` dataclasses) from the command line (train.py's generator; an
    experiment adds its own config); --help shows each preset's value where a preset fills a field."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    taken: set = set()
    for cls in (CascadeConfig, *more):
        TR.add_dataclass_args(parser, cls, taken)
    for action in parser._actions:
        if action.dest in PRESETS["cpu"].stages:
            values = ", ".join(f"{p} {v.stages[action.dest]}" for p, v in PRESETS.items())
            action.help = action.help.replace("(default None)", f"(default: the preset's: {values})")
    ns = parser.parse_args(argv)
    return tuple(cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}) for cls in (CascadeConfig, *more))


def config_from_argv(argv=None) -> CascadeConfig:
    return parse_args(argv)[0]


def main(argv=None):
    cfg = config_from_argv(argv)
    # an error on one rank: printed once by that rank, every rank exits at once (train.run_main)
    code = TR.run_main(lambda: run_cascade(cfg) and 0, expected=(ValueError, FileNotFoundError, M.CheckpointError))
    if code:
        sys.exit(2)


if __name__ == "__main__":
    main()
    TR.exit_process(0)  # under torchrun: leave without interpreter finalization (see there)
