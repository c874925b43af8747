"""The one training loop: torchrun setup, parallelize (AC -> compile -> FSDP2), AdamW, checkpoints, export.

Reading guide
-------------
Concept: every stage of the cascade (PAPER.md section 1: distillation at 16K and 256K, and later SFT,
online DPO, GRPO) is "run this loss on this model over these batches". This file owns everything that
is the same across stages and has no loss of its own: the caller passes
`loss_fn(model, inputs, targets, n_total) -> loss`. Section 5 fixes the normalisation: a sum over valid
tokens divided by the GLOBAL number of valid tokens of the optimizer step (all micro-batches, all
ranks), so `train` counts and all-reduces the valid targets before any forward and the gradients of
all micro-batches and ranks simply add up. A run made of several such stages (cascade.py) marks each
finished one in `Stages`, which skips it on a rerun.

Order of parallelism (torchtitan's): activation checkpointing per block, optional `torch.compile` per
block, FSDP2 `fully_shard` per block, then the root. Build on the meta device, shard, then materialise
(`build_model`). One code path for world size 1 and N, CPU (gloo) and GPU (NCCL), one or many nodes.

Deviations and choices (the paper says nothing about the training loop):
 1. Gradients are SUMMED across ranks (FSDP2 forced to sum-reduce with divide factor 1) because the
    loss is already divided by the global token count; the default FSDP average would divide twice.
 2. bf16 means FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32) with fp32 master
    weights when the model is sharded. Unsharded (world size 1, CPU or GPU) it means `torch.autocast`
    to bf16 around the loss, again with fp32 master weights. "fp32" is plain fp32 everywhere.
 3. The frozen teacher is cast to the compute dtype (no fp32 master copy is needed) and sharded like the
    student: every block, then the root. The root matters: without it each block is its own FSDP root,
    and a root keeps its parameters gathered after forward, so after the first step every rank would
    hold the whole teacher (47 GB at 24B in bf16 instead of 47/N). With the root sharded, each block is
    gathered for its forward and freed after it. The root's own parameters (embedding, final norm,
    lm_head) stay gathered after the teacher's forward (FSDP2 keeps a root's parameters for the
    backward it expects), which is what the student's fused loss needs: the teacher's head weight as a
    plain tensor inside the STUDENT's forward; distill.py reshards the teacher once that loss is done.
    Per rank the teacher holds 1/N of its weights between micro-batches, and at the peak of a step
    additionally its gathered root (V*D, x2 untied: 1.3 GB in bf16 at 24B) and one gathered block.
 4. Weight decay on every >=2-D weight including the embedding; none on norms and other 1-D params.
 5. Learning rate: linear warmup over `warmup_steps` (step s gets lr*(s+1)/warmup), then cosine to
    min_lr_ratio*lr at `steps`. The schedule is a pure function of the step, so the scheduler's
    whole state is the step number.
 6. The data position is the step: loaders are stateless in (seed, step, rank, world_size), micro-batch
    i = step * grad_accum + micro. A resume therefore refuses a different world size, batch size,
    sequence length or seed (the data order would change), and a different schedule (steps, lr,
    warmup, cosine floor) unless `--resume-schedule-change` says so (e.g. a lower lr after a
    divergence). Checkpoints hold model, optimizer, step and per-rank RNG (torch CPU + CUDA, python,
    numpy); a resumed run ends bit-identical to an uninterrupted one. A checkpoint is written every
    `ckpt_every` steps and also when `ckpt_minutes` of wall-clock time have passed since the last one
    (rank 0's clock decides for all ranks), so a slow real run loses at most that much work.
 7. MFU is measured against a per-device bf16 dense peak table; devices not in it (CPU, fp32
    training) report no MFU rather than a guess. Teacher forward FLOPs are passed separately.

Run: this file is a library (it owns no loss). `python train.py --help` lists the TrainConfig flags that
distill.py and cascade.py share; `python distill.py ...` and `python cascade.py ...` train.
Multi-GPU: `torchrun --nproc_per_node 8 distill.py ...`; multi-node: add `--nnodes/--node_rank/
--rdzv_endpoint`, with out_dir on a filesystem all nodes share (DCP writes one file per rank).
Failures: `run_main` wraps each rank's main. The rank that fails prints its error once and leaves at
once (os._exit, no collective teardown), so its peers' next collective fails (gloo: the connection
closes) or times out (`setup_distributed(timeout_s)`, NCCL's watchdog) and they leave too, with one
line each: no rank waits at a barrier for a peer that is gone. A run that succeeds leaves through
`exit_process` too (barrier, destroy, os._exit): interpreter finalization can abort a finished gloo run.
Depends on: model.py.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import inspect
import json
import math
import os
import pickle
import platform
import random
import re
import resource
import shutil
import subprocess
import sys
import time
import traceback
import types
import typing
import warnings
from dataclasses import dataclass, field
from typing import Callable, NoReturn, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from model import PRESETS, ModelArgs, Transformer, flops_per_token, load_weights, read_checkpoint_args, save_model

# -----------------------------------------------------------------------------
# Config and the command line generated from dataclasses


@dataclass
class TrainConfig:
    out_dir: str = field(default="runs/train", metadata={"flags": ("--out",)})  # checkpoints, metrics, export
    steps: int = 1000  # optimizer steps (section 1: one pass over the data)
    batch_size: int = 8  # GLOBAL sequences per optimizer step
    micro_batch_size: int = 8  # sequences per rank per forward; grad_accum = batch / (micro * world)
    seq_len: int = 4096  # tokens per sequence (paper: 16384, then 262144 for long context)
    lr: float = 3e-4  # peak learning rate
    min_lr_ratio: float = 0.1  # cosine floor as a fraction of lr
    warmup_steps: int = 100  # linear warmup
    weight_decay: float = 0.1  # AdamW decoupled decay on >=2-D weights
    beta1: float = 0.9  # AdamW
    beta2: float = 0.95  # AdamW
    grad_clip: float = 1.0  # max global grad norm; <= 0 disables clipping
    dtype: str = "bf16"  # "bf16" (mixed precision, fp32 master and reduction) or "fp32"
    compile: bool = False  # torch.compile each block
    activation_checkpointing: bool = False  # recompute each block in backward
    fsdp: str = "auto"  # "auto": shard when world size > 1; "always" (tests at world 1); "never"
    ckpt_every: int = 0  # DCP checkpoint every N steps; 0 = only at the end (and by ckpt_minutes)
    ckpt_minutes: float = 30.0  # also checkpoint when this much wall-clock time passed since the last; 0 = off
    keep_checkpoints: int = 2  # newest checkpoints kept
    log_every: int = 10  # progress line + metrics.jsonl record every N steps
    eval_every: int = 0  # call eval_fn every N steps (and at the end); 0 = only at the end
    seed: int = 0  # torch / python / numpy RNG seed (offset by rank)
    resume: bool = False  # continue from out_dir/ckpt/latest when it exists
    resume_schedule_change: bool = False  # let --resume change steps/lr/warmup/min_lr_ratio (else refused)
    export: bool = True  # write the Hugging Face checkpoint out_dir/model at the end


def _field_comments(cls) -> dict:
    """{field: its trailing `# comment`} read from the class source: the --help text."""
    try:
        src = inspect.getsource(cls)
    except (OSError, TypeError):
        return {}
    found = re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, flags=re.M)
    return {name: text.replace("%", "%%") for name, text in found}  # argparse formats help with %


def add_dataclass_args(parser: argparse.ArgumentParser, cls, taken: Optional[set] = None):
    """One flag per field: `--field-name VALUE`, bools as `--flag/--no-flag`, Optional[X] accepts 'none'.
    Extra spellings come from `field(metadata={"flags": ("--alias",)})`."""
    taken = set() if taken is None else taken
    hints, comments = typing.get_type_hints(cls), _field_comments(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.name in taken:
            raise ValueError(f"{cls.__name__}.{f.name} clashes with a field of another config on the same command "
                             f"line: rename one of them")
        taken.add(f.name)
        typ, optional = hints[f.name], False
        if typing.get_origin(typ) in (typing.Union, types.UnionType):
            inner = [a for a in typing.get_args(typ) if a is not type(None)]
            optional, typ = True, inner[0]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        flags = ["--" + f.name.replace("_", "-"), *f.metadata.get("flags", ())]
        if typ is bool:
            group.add_argument(*flags, dest=f.name, action=argparse.BooleanOptionalAction, default=default,
                               help=comments.get(f.name, ""))
            continue

        def parse(s, typ=typ, optional=optional):
            if optional and s.lower() == "none":
                return None
            return typ(s)

        parse.__name__ = typ.__name__  # argparse's message: "invalid int value: 'x'"

        group.add_argument(*flags, dest=f.name, type=parse, default=default, metavar=typ.__name__.upper(),
                           help=f"{comments.get(f.name, '')} (default {default})")


def configs_from_args(classes: list, argv=None, description: str = "") -> tuple:
    """Parse argv into one instance of each dataclass in `classes`; unknown or abbreviated flags are errors."""
    parser = argparse.ArgumentParser(description=description, allow_abbrev=False)
    taken: set = set()
    for cls in classes:
        add_dataclass_args(parser, cls, taken)
    ns = parser.parse_args(argv)
    return tuple(cls(**{f.name: getattr(ns, f.name) for f in dataclasses.fields(cls)}) for cls in classes)


def config_from_args(cls, argv=None, description: str = ""):
    return configs_from_args([cls], argv, description)[0]


def write_text_atomic(path: str, text: str) -> None:
    """Write to a temporary name beside `path`, then rename: a reader never sees a half-written file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(tmp, path)


def write_json_atomic(path: str, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, default=str))


# -----------------------------------------------------------------------------
# Distributed setup


_RAN_PROCESS_GROUP = False  # set by setup_distributed under torchrun; read by exit_process


def setup_distributed(timeout_s: float = 1800.0) -> tuple[int, int, int, torch.device]:
    """(rank, world_size, local_rank, device). Under torchrun (RANK/WORLD_SIZE/LOCAL_RANK set) a process
    group is created: NCCL for CUDA tensors (plus gloo for CPU ones), gloo on a CPU-only machine.
    Without torchrun: world size 1, no process group. timeout_s bounds every collective: a rank whose
    peer is gone (or stuck) raises after it instead of waiting forever (see `run_main`). The default
    leaves room for a 24B checkpoint on a slow shared filesystem."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        if device.type == "cuda":
            torch.cuda.set_device(device)
        return 0, 1, 0, device
    global _RAN_PROCESS_GROUP
    _RAN_PROCESS_GROUP = True
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("cpu:gloo,cuda:nccl", rank=rank, world_size=world, device_id=device,
                                    timeout=datetime.timedelta(seconds=timeout_s))
    else:
        device = torch.device("cpu")
        if not dist.is_initialized():
            dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))
    return rank, world, local_rank, device


def teardown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: Optional[int] = 0) -> NoReturn:
    """The last line of a torchrun script: exit with `code`. A process that ran a process group meets its
    peers at a barrier (if the group is still up), destroys the group, flushes its output and leaves through
    os._exit, skipping interpreter finalization; any other process exits normally.

    Why: gloo's worker threads release the tensors of the last collectives on their own schedule, after
    the collective has completed. A tensor whose Python object died meanwhile is owned by its C++ side, and
    freeing it takes the GIL; if Python is finalizing by then, CPython ends that thread inside a C++
    destructor and the whole process aborts (SIGABRT, "terminate called without an active exception")
    after a run that succeeded. A barrier before exit does not help; this was seen in 1 of 20-30
    two-process runs on a loaded 2-core machine."""
    code = 0 if code is None else int(code)
    if not _RAN_PROCESS_GROUP:
        sys.exit(code)
    if dist.is_initialized():
        barrier()
        teardown_distributed()
    _exit_now(code)


def _exit_now(code: int) -> NoReturn:
    """Flush this process's output and leave at once (os._exit: no atexit handlers, no finalization)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def rank_world() -> tuple[int, int]:
    """(rank, world size): the process group's, or (0, 1) without torchrun."""
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier():
    """dist.barrier() when a process group exists; a no-op at world size 1 without torchrun."""
    if dist.is_initialized():
        dist.barrier()


def _all_reduce_sum(x: float, device) -> float:
    if not dist.is_initialized():
        return float(x)
    t = torch.tensor([float(x)], dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return float(t.item())


def print0(*a):
    """print on rank 0 only (flushed)."""
    if rank_world()[0] == 0:
        print(*a, flush=True)


def _peer_failure(e: BaseException) -> bool:
    """A collective that failed because another rank left or stalled (not this rank's own error)."""
    text = str(e)
    return isinstance(e, dist.DistError) or (isinstance(e, RuntimeError) and any(
        k in text for k in ("Connection reset by peer", "Connection closed by peer", "Timed out", "timed out",
                            "gloo", "NCCL")))


def run_main(main: Callable[[], Optional[int]], expected: tuple = (ValueError, FileNotFoundError)) -> int:
    """Run one rank's main and return its exit code; on an error, leave the process at once.

    An `expected` error (bad input, refused resume) prints `error: <message>` on one line, any other
    error its traceback; either is printed by the rank that raised it, tagged with the rank when there
    are several. Then the rank calls os._exit without tearing down the process group: a teardown
    or a final barrier could wait for peers that wait for us. The peers' next collective fails when
    our connections close (gloo), or times out (setup_distributed's timeout, NCCL's watchdog); they
    print one line saying a peer failed and leave the same way. So every rank exits non-zero within a
    bounded time and the original error is printed once."""
    try:
        code = main()
        return 0 if code is None else int(code)
    except BaseException as e:  # noqa: BLE001 (SystemExit and KeyboardInterrupt leave the same way)
        rank, world = rank_world()
        tag = f"[rank {rank}/{world}] " if world > 1 else ""
        if isinstance(e, SystemExit):
            code = 0 if e.code is None else e.code if isinstance(e.code, int) else 1
            if not isinstance(e.code, (int, type(None))):
                print(f"{tag}{e.code}", file=sys.stderr, flush=True)
        elif world > 1 and _peer_failure(e):
            print(f"{tag}stopping: another rank failed ({type(e).__name__}: {str(e).splitlines()[0][:160]})",
                  file=sys.stderr, flush=True)
            code = 1
        elif isinstance(e, expected):
            print(f"{tag}error: {e}", file=sys.stderr, flush=True)
            code = 1
        else:
            print(tag + "".join(traceback.format_exception(e)), file=sys.stderr, flush=True)
            code = 1
        if world > 1:
            _exit_now(code)
        teardown_distributed()  # alone (torchrun --nproc_per_node 1): nobody waits for us
        return code


# -----------------------------------------------------------------------------
# parallelize and model construction


def _use_fsdp(cfg: TrainConfig) -> bool:
    if cfg.fsdp not in ("auto", "always", "never"):
        raise ValueError(f"TrainConfig.fsdp must be auto, always or never, got {cfg.fsdp!r}")
    world = rank_world()[1]
    if cfg.fsdp == "never" and world > 1:
        raise ValueError(f"fsdp='never' with world size {world} would train {world} unsynchronised copies: "
                         f"use --fsdp auto")
    shard = cfg.fsdp == "always" or (cfg.fsdp == "auto" and world > 1)
    if shard and not dist.is_initialized():
        raise ValueError("FSDP needs a process group: launch with torchrun (even --nproc_per_node 1) or pass "
                         "--fsdp never")
    return shard


def derive_micro_batch(batch_size: int, world: int, cap: int) -> int:
    """Sequences per rank per forward when --micro-batch-size is not given: the largest divisor of the rank's
    share of the batch that is at most `cap`, so any world size dividing the batch works."""
    if batch_size <= 0:
        return batch_size  # the caller's validation names the problem
    if batch_size % world:
        raise ValueError(f"--batch-size {batch_size} cannot be split over {world} processes: give a batch size "
                         f"that is a multiple of {world}, or run on a number of processes that divides it")
    share = batch_size // world
    return max(d for d in range(1, min(cap, share) + 1) if share % d == 0)


def _compute_dtype(cfg: TrainConfig) -> torch.dtype:
    if cfg.dtype not in ("bf16", "fp32"):
        raise ValueError(f"TrainConfig.dtype must be 'bf16' or 'fp32', got {cfg.dtype!r}")
    return torch.bfloat16 if cfg.dtype == "bf16" else torch.float32


def is_sharded(model: torch.nn.Module) -> bool:
    return any(isinstance(p, DTensor) for p in model.parameters())


def parallelize(model: Transformer, cfg: TrainConfig, device: torch.device, train: bool = True) -> Transformer:
    """Activation checkpointing per block, optional compile per block, then FSDP2 per block and the root.

    train=False prepares a frozen teacher: no grad, eval mode, cast to the compute dtype, blocks and root
    sharded (reading guide, item 3). Call it on a meta-device model and materialise afterwards
    (`build_model`), or on a materialised one. Parameter names stay those of the plain model."""
    shard = _use_fsdp(cfg)
    dtype = _compute_dtype(cfg)
    if not train:
        model.requires_grad_(False)
        model.eval()
        model.to(dtype)
        if not model.inv_freq.is_meta:
            model.reset_buffers()  # .to(dtype) also cast the RoPE frequencies; they stay fp32
    elif cfg.activation_checkpointing:
        model.checkpoint_layers = True  # recompute inside model.forward; no wrapper, so keys stay clean
    if cfg.compile:
        for layer in model.layers:
            layer.compile()  # in place: no `_orig_mod.` in the state dict
    if shard:
        mesh = init_device_mesh(device.type, (rank_world()[1],))
        mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32) if train else MixedPrecisionPolicy()
        for layer in model.layers:
            fully_shard(layer, mesh=mesh, mp_policy=mp)
        fully_shard(model, mesh=mesh, mp_policy=mp)  # the root too: blocks are then freed after forward (item 3)
        if train:
            for m in model.modules():  # the loss is already divided by the global token count: SUM gradients
                if isinstance(m, FSDPModule):
                    m.set_force_sum_reduction_for_comms(True)
                    m.set_gradient_divide_factor(1.0)
    return model


def build_model(source, cfg: TrainConfig, device: torch.device, train: bool = True,
                init_seed: Optional[int] = None) -> Transformer:
    """A parallelized model from a checkpoint folder, a preset name or a ModelArgs (the last two freshly
    initialised): built on the meta device, sharded, materialised on `device`, then filled (each rank
    reads only its shards)."""
    from_ckpt = isinstance(source, (str, os.PathLike)) and os.path.isdir(source)
    if isinstance(source, ModelArgs):
        args = source
    elif from_ckpt:
        args, _ = read_checkpoint_args(source)
    elif source in PRESETS:
        args = ModelArgs.preset(source)
    else:
        raise FileNotFoundError(f"model {source!r} is neither a checkpoint folder nor a preset name "
                                f"({', '.join(PRESETS)}): check the path")
    with torch.device("meta"):
        model = Transformer(args)
    model = parallelize(model, cfg, device, train=train)
    model.to_empty(device=device)
    # to_empty can split a tied pair; re-tie unless FSDP2 owns the (root-level) embedding, where the tie holds
    if args.tied_embeddings and not isinstance(model.embed_tokens.weight, DTensor):
        model.lm_head.weight = model.embed_tokens.weight
    if from_ckpt:
        load_weights(model, source)
    else:
        model.init_weights(seed=cfg.seed if init_seed is None else init_seed)
    return model


# -----------------------------------------------------------------------------
# Schedule, optimizer, MFU


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup, then cosine to min_lr_ratio*lr."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights are listed once
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kw = dict(lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):  # a device or tensor type without the fused kernel
        return torch.optim.AdamW(groups, foreach=True, **kw)


# bf16 dense tensor-core peak FLOP/s per device; the first substring of the device name that matches wins.
PEAK_FLOPS_BF16 = [
    ("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("H800", 989e12), ("GH200", 989e12),
    ("B200", 2250e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12), ("L4", 121e12),
    ("MI300X", 1307e12), ("MI250X", 383e12),
]


def peak_flops(device) -> Optional[float]:
    device = torch.device(device)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((peak for key, peak in PEAK_FLOPS_BF16 if key in name), None)


def mfu(tokens_per_s: float, flops_per_token: float, device, dtype: str = "bf16") -> Optional[float]:
    """Model FLOPs utilisation of ONE device: tokens_per_s per device times FLOPs per token over the
    device's bf16 peak. None when the device or the precision is not in the table."""
    peak = peak_flops(device) if dtype == "bf16" else None
    return None if peak is None else tokens_per_s * flops_per_token / peak


def cpu_seconds() -> float:
    """User + system CPU time of this process and its finished children: the cost of a run on a shared
    machine, where wall time depends on the neighbours."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def run_clock():
    """Start timing a run; calling the returned function gives its wall and CPU seconds so far and the
    1-minute load average at the start and now (the `run` a record header carries)."""
    t0, c0, load0 = time.time(), cpu_seconds(), os.getloadavg()[0]
    return lambda: {"seconds": round(time.time() - t0, 1), "cpu_seconds": round(cpu_seconds() - c0, 1),
                    "loadavg_start": round(load0, 2), "loadavg_end": round(os.getloadavg()[0], 2)}


def git_commit(short: bool = True) -> Optional[str]:
    """The commit of the code that runs (None outside a git checkout)."""
    try:
        out = subprocess.run(["git", "rev-parse", *(["--short"] if short else []), "HEAD"], capture_output=True,
                             text=True, timeout=10, cwd=os.path.dirname(os.path.abspath(__file__)))
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def run_record(**extra) -> dict:
    """The header of every record (results, benchmarks, experiments): where and how it was made. Date,
    device, CPU count and torch threads, torch version, git commit, the exact command, this process's CPU
    seconds so far (children included) and the 1-minute load average (wall time on a shared machine is
    inflated; CPU time beside it is the steadier figure). `extra` is merged in last."""
    device = (torch.cuda.get_device_name() if torch.cuda.is_available()
              else platform.processor() or platform.machine())
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": device, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "commit": git_commit(),
            "command": "python " + " ".join(sys.argv), "cpu_seconds_so_far": round(cpu_seconds(), 1),
            "loadavg": round(os.getloadavg()[0], 2), **extra}


def run_line(record: dict) -> str:
    """A record header (run_record) as the sentence a table's note starts its run with."""
    return (f"Run: {record['date']}, {record['device']} ({record['cpus']} CPUs, {record['torch_threads']} torch "
            f"threads), torch {record['torch']}, commit {record['commit']}")


def _fmt_duration(s: float) -> str:
    s = int(s)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


# -----------------------------------------------------------------------------
# Checkpoints (DCP)


class TrainingDiverged(RuntimeError):
    """The loss or the gradient norm became non-finite; no checkpoint was written for that step."""

    def __init__(self, step: int, loss: float, grad_norm: float):
        self.step = step
        super().__init__(f"training diverged at step {step}: loss {loss}, grad norm {grad_norm}; the last good "
                         f"checkpoint is kept: lower --lr, raise --warmup-steps or check the data, then --resume "
                         f"--resume-schedule-change")


# What a resume must not change silently: the data order (world size, batch, sequence length, seed) is
# always refused; the schedule only with --resume-schedule-change (reading guide, item 6).
_CKPT_DATA_FIELDS = ("world_size", "batch_size", "seq_len", "seed")
_CKPT_SCHEDULE_FIELDS = ("steps", "lr", "warmup_steps", "min_lr_ratio")

_CKPT_SHAPE_FIELDS = ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size",
                      "tied_embeddings")


def _rng_state() -> dict:
    s = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def _set_rng_state(s: dict):
    torch.set_rng_state(s["torch"])
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def _app_state(model, opt) -> dict:
    # optimizer first: get_optimizer_state_dict may initialise the state with a zero-lr step
    optim_sd = get_optimizer_state_dict(model, opt)
    return {"model": get_model_state_dict(model), "optim": optim_sd}


def save_checkpoint(out_dir: str, step: int, model, opt, cfg: TrainConfig) -> str:
    """DCP checkpoint out_dir/ckpt/step_XXXXXX, written to a temporary folder and renamed; then the
    `latest` pointer is replaced atomically and all but the newest `keep_checkpoints` are removed."""
    rank, world = rank_world()
    root = os.path.join(out_dir, "ckpt")
    final = os.path.join(root, f"step_{step:06d}")
    tmp = final + ".tmp"
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # leftover of a crash
        os.makedirs(tmp)
    barrier()
    with warnings.catch_warnings():  # DCP warns that a single process is single-process
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.save(_app_state(model, opt), checkpoint_id=tmp, no_dist=not dist.is_initialized())
    with open(os.path.join(tmp, f"rng_rank{rank}.pkl"), "wb") as f:
        pickle.dump(_rng_state(), f)
    barrier()
    if rank == 0:
        meta = {"step": step, "world_size": world, "model_args": dataclasses.asdict(model.args),
                **{k: getattr(cfg, k) for k in _CKPT_DATA_FIELDS + _CKPT_SCHEDULE_FIELDS if k != "world_size"}}
        write_json_atomic(os.path.join(tmp, "meta.json"), meta)  # written last: marks the folder complete
        if os.path.exists(final):
            shutil.rmtree(final)
        os.replace(tmp, final)
        with open(os.path.join(root, "latest.tmp"), "w") as f:
            f.write(os.path.basename(final) + "\n")
        os.replace(os.path.join(root, "latest.tmp"), os.path.join(root, "latest"))
        done = sorted((d for d in os.listdir(root) if _ckpt_step(d) is not None), key=_ckpt_step)
        for d in done[:-max(1, cfg.keep_checkpoints)]:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)
    barrier()
    return final


def _ckpt_step(name: str) -> Optional[int]:
    """The step of a complete-looking `step_N` folder name, else None. Checkpoints are ordered by this
    number, not by name: `step_1000000` sorts before `step_999999` as a string."""
    m = re.fullmatch(r"step_(\d+)", name)
    return int(m.group(1)) if m else None


def latest_checkpoint(out_dir: str) -> Optional[str]:
    """The newest complete checkpoint folder: the `latest` pointer, else the highest complete step_*."""
    root = os.path.join(out_dir, "ckpt")
    if not os.path.isdir(root):
        return None
    ptr = os.path.join(root, "latest")
    if os.path.exists(ptr):
        with open(ptr) as f:
            cand = os.path.join(root, f.read().strip())
        if os.path.exists(os.path.join(cand, "meta.json")):
            return cand
    done = sorted((d for d in os.listdir(root) if _ckpt_step(d) is not None
                   and os.path.exists(os.path.join(root, d, "meta.json"))), key=_ckpt_step)
    return os.path.join(root, done[-1]) if done else None


def load_checkpoint(path: str, model, opt, cfg: TrainConfig) -> int:
    """Restore model, optimizer and this rank's RNG from a checkpoint folder; returns the step to resume at.
    Refuses a checkpoint written for another model shape, world size, batch size, sequence length or
    seed, or (unless cfg.resume_schedule_change) another schedule: steps, lr, warmup, cosine floor."""
    rank, world = rank_world()
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    ours = dataclasses.asdict(model.args)
    diff = [f"{k} {meta['model_args'].get(k)} vs {ours[k]}" for k in _CKPT_SHAPE_FIELDS
            if meta["model_args"].get(k) != ours[k]]
    if diff:
        raise ValueError(f"checkpoint {path} was written for another model shape ({', '.join(diff)}): pass the "
                         f"matching model, or a fresh --out-dir / --no-resume to start over")
    ours = {"world_size": world, **{k: getattr(cfg, k) for k in _CKPT_DATA_FIELDS + _CKPT_SCHEDULE_FIELDS
                                      if k != "world_size"}}
    diff = [k for k in _CKPT_DATA_FIELDS if k in meta and meta[k] != ours[k]]
    if diff:
        raise ValueError(f"checkpoint {path} was written with " + ", ".join(f"{k} {meta[k]}" for k in diff)
                         + "; this run has " + ", ".join(f"{k} {ours[k]}" for k in diff) + ": the data order "
                         "depends on them, so resume with the checkpoint's values or start a fresh --out-dir")
    diff = [k for k in _CKPT_SCHEDULE_FIELDS if k in meta and meta[k] != ours[k]]
    if diff and not cfg.resume_schedule_change:
        raise ValueError(f"checkpoint {path} was written with " + ", ".join(f"{k} {meta[k]}" for k in diff)
                         + "; this run has " + ", ".join(f"{k} {ours[k]}" for k in diff) + ": resuming would "
                         "change the learning-rate schedule; pass the checkpoint's values, or "
                         "--resume-schedule-change to change it on purpose")
    state = _app_state(model, opt)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"])
    with open(os.path.join(path, f"rng_rank{rank}.pkl"), "rb") as f:
        _set_rng_state(pickle.load(f))
    return int(meta["step"])


def export(model: Transformer, path: str, dtype=None, extra_files: Optional[dict] = None) -> None:
    """Hugging Face checkpoint of the (possibly FSDP-sharded) model. Sharded: every rank joins the gather of
    the full state dict (offloaded to CPU), rank 0 writes. Collective: call on all ranks."""
    rank, _ = rank_world()
    sd = None
    if is_sharded(model):
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank == 0:
        save_model(model, path, format="hf", dtype=dtype, state_dict=sd, extra_files=extra_files)
    barrier()


# -----------------------------------------------------------------------------
# Stages: a run made of several trainings, each skipped once finished


class Stages:
    """A finished stage is skipped: its checkpoint and done.json are read back instead. done.json records the
    stage's wall and CPU seconds (of the session that finished it) and, for a stage an experiment adds, the
    `key` of what it was made from: a stage whose key no longer matches is refused, naming --restart-from."""

    def __init__(self, out: str):
        self.out, self.started = out, {}

    def dir(self, name: str) -> str:
        return os.path.join(self.out, name)

    def done(self, name: str, key: Optional[dict] = None) -> Optional[dict]:
        info = self.info(name)
        if info:
            if key is not None and info.get("key") != json.loads(json.dumps(key)):
                raise ValueError(f"stage {name} under {self.out} was made from other settings or inputs: pass "
                                 f"--restart-from {name} to redo it and every later stage, or choose a new --out")
            print0(f"== stage {name}: finished earlier, skipped")
            return info
        self.started[name] = (time.time(), cpu_seconds(), key)
        return None

    def finish(self, name: str, info: dict) -> dict:
        """train() has exported <stage>/model; done.json marks the stage finished. Later stages read the
        export, so the stage's training checkpoints (they only served a resume) are deleted."""
        t0, c0, key = self.started.pop(name, (time.time(), cpu_seconds(), None))
        info = info | {"seconds": round(time.time() - t0, 2), "cpu_seconds": round(cpu_seconds() - c0, 2)}
        if key is not None:
            info["key"] = key
        if rank_world()[0] == 0:
            write_json_atomic(os.path.join(self.dir(name), "done.json"), info)
            shutil.rmtree(os.path.join(self.dir(name), "ckpt"), ignore_errors=True)
        barrier()
        return info

    def info(self, name: str) -> dict:
        """The stage's done.json ({} for a stage not made yet, or not made by this run, e.g. a given --parent)."""
        path = os.path.join(self.dir(name), "done.json")
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)


# -----------------------------------------------------------------------------
# The loop


def _wall_clock() -> float:
    return time.monotonic()


def _clock_says_checkpoint(t_last: float, cfg: TrainConfig, device) -> bool:
    """ckpt_minutes passed since the last checkpoint, on rank 0's clock (broadcast: every rank must take
    the same decision, or some would wait in the checkpoint's collectives for the others)."""
    if cfg.ckpt_minutes <= 0:
        return False
    due = torch.tensor([float(_wall_clock() - t_last >= 60.0 * cfg.ckpt_minutes)], device=device)
    if dist.is_initialized():
        dist.broadcast(due, 0)
    return bool(due.item())


def grad_accum_steps(cfg: TrainConfig, world_size: int) -> int:
    per_pass = cfg.micro_batch_size * world_size
    if cfg.batch_size <= 0 or cfg.micro_batch_size <= 0 or cfg.batch_size % per_pass:
        raise ValueError(f"batch_size {cfg.batch_size} must be a positive multiple of micro_batch_size "
                         f"{cfg.micro_batch_size} x world size {world_size} = {per_pass}: change --batch-size "
                         f"or --micro-batch-size")
    return cfg.batch_size // per_pass


def _amp(model, cfg: TrainConfig, device):
    if cfg.dtype == "bf16" and not is_sharded(model):
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _to_device(x, device):
    return torch.as_tensor(x).to(device=device, dtype=torch.long, non_blocking=True)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def evaluate(model, loader, loss_fn: Callable, n_batches: int, *, device, cfg: Optional[TrainConfig] = None) -> float:
    """Token-weighted mean of loss_fn over loader.batch(0..n_batches-1) on every rank, no grad."""
    was_training = model.training
    model.eval()
    batches = [loader.batch(i) for i in range(n_batches)]
    n_total = _all_reduce_sum(sum(int((torch.as_tensor(t) != -100).sum()) for _, t in batches), device)
    total = 0.0
    amp = _amp(model, cfg, device) if cfg is not None else contextlib.nullcontext()
    for inputs, targets in batches:
        with amp:
            total += float(loss_fn(model, _to_device(inputs, device), _to_device(targets, device), max(n_total, 1)))
    model.train(was_training)
    return _all_reduce_sum(total, device)


def truncate_metrics(path: str, step: int) -> None:
    """Drop the records of steps after `step` (the checkpoint a resume starts from): the resumed run logs
    them again, and a curve read from the file would otherwise double back."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get("step", 0) <= step]
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.writelines(lines)
    os.replace(tmp, path)


def train(model: Transformer, loader, loss_fn: Callable, cfg: TrainConfig, *, device,
          eval_fn: Optional[Callable] = None, name: str = "train", teacher_flops_per_token: float = 0.0,
          run_info: Optional[dict] = None) -> dict:
    """Run cfg.steps optimizer steps of loss_fn(model, inputs, targets, n_total) over loader.batch(i).

    The model must already be parallelized (or plain, at world size 1). eval_fn(model) -> float or dict is
    called every eval_every steps and at the end. Returns {"step", "tokens" (trained in this call), "history":
    [{step, loss, lr, grad_norm, tokens_per_s}], "evals": [{step, eval}], "export": path or None}.
    Raises TrainingDiverged on a non-finite loss or gradient norm, before the optimizer step.
    """
    rank, world = rank_world()
    device = torch.device(device)
    accum = grad_accum_steps(cfg, world)
    _compute_dtype(cfg)
    ckpt = latest_checkpoint(cfg.out_dir)
    if ckpt is not None and not cfg.resume:
        raise ValueError(f"{cfg.out_dir} already holds checkpoint {ckpt}: pass --resume to continue it, or choose a "
                         f"fresh --out-dir (nothing was overwritten)")
    if rank == 0:
        os.makedirs(cfg.out_dir, exist_ok=True)
        write_json_atomic(os.path.join(cfg.out_dir, "config.json"),
                          {"train": dataclasses.asdict(cfg), "world_size": world, "grad_accum": accum,
                           "model_args": dataclasses.asdict(model.args), **(run_info or {})})
    barrier()
    torch.manual_seed(cfg.seed + rank)
    random.seed(cfg.seed + rank)
    np.random.seed(cfg.seed + rank)
    opt = make_optimizer(model, cfg)
    start = 0
    if ckpt is not None:
        start = load_checkpoint(ckpt, model, opt, cfg)
        if start > cfg.steps:
            raise ValueError(f"checkpoint {ckpt} is at step {start}, past --steps {cfg.steps}: raise --steps or "
                             f"choose a fresh --out-dir")
        print0(f"[{name}] resumed from {ckpt} at step {start}")
    params = [p for p in model.parameters() if p.requires_grad]
    fpt = flops_per_token(model.args, cfg.seq_len, training=True) + teacher_flops_per_token
    tokens_per_step = cfg.batch_size * cfg.seq_len
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")
    if start and rank == 0:
        truncate_metrics(metrics_path, start)
    history, evals = [], []
    model.train()
    _sync(device)
    t_window, window_step_s, steps_in_window = time.perf_counter(), 0.0, 0  # since the last progress line
    t_ckpt = _wall_clock()  # wall clock since the last checkpoint (or the start)

    def run_eval(step):
        if eval_fn is None:
            return
        result = eval_fn(model)
        model.train()
        evals.append({"step": step, "eval": result})
        if rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps({"name": name, "step": step, "eval": result}) + "\n")
        print0(f"[{name}] eval step {step}: {result}")

    for step in range(start, cfg.steps):
        t0 = time.perf_counter()
        lr = lr_at(step, cfg)
        for g in opt.param_groups:
            g["lr"] = lr
        batches = [loader.batch(step * accum + m) for m in range(accum)]
        for inputs, _ in batches:
            if tuple(inputs.shape) != (cfg.micro_batch_size, cfg.seq_len):
                raise ValueError(f"the loader gives batches of shape {tuple(inputs.shape)} but the config asks for "
                                 f"(micro_batch_size, seq_len) = ({cfg.micro_batch_size}, {cfg.seq_len}): build the "
                                 f"loader with the same sizes")
        n_local = sum(int((torch.as_tensor(t) != -100).sum()) for _, t in batches)
        n_total = max(1, int(_all_reduce_sum(n_local, device)))  # all ranks, all micro-batches (section 5)
        loss_sum = torch.zeros((), device=device, dtype=torch.float32)
        for inputs, targets in batches:
            with _amp(model, cfg, device):
                loss = loss_fn(model, _to_device(inputs, device), _to_device(targets, device), n_total)
            loss.backward()
            loss_sum += loss.detach().float()
        if dist.is_initialized():
            dist.all_reduce(loss_sum)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if isinstance(grad_norm, DTensor):
            grad_norm = grad_norm.full_tensor()
        loss_v, gn_v = float(loss_sum), float(grad_norm)
        if not (math.isfinite(loss_v) and math.isfinite(gn_v)):
            opt.zero_grad(set_to_none=True)
            raise TrainingDiverged(step + 1, loss_v, gn_v)
        opt.step()
        opt.zero_grad(set_to_none=True)
        done = step + 1
        _sync(device)
        dt = time.perf_counter() - t0
        window_step_s += dt
        history.append({"step": done, "loss": loss_v, "lr": lr, "grad_norm": gn_v,
                        "tokens_per_s": tokens_per_step / dt})
        steps_in_window += 1
        if cfg.log_every > 0 and (done % cfg.log_every == 0 or done == cfg.steps):
            tok_s = tokens_per_step * steps_in_window / window_step_s  # training steps only
            u = mfu(tok_s / world, fpt, device, cfg.dtype)
            eta = (cfg.steps - done) * (time.perf_counter() - t_window) / steps_in_window  # evals, checkpoints too
            line = (f"[{name}] step {done}/{cfg.steps} | loss {loss_v:.3f} | lr {lr:.1e} | {tok_s:,.0f} tok/s"
                    + (f" | MFU {100 * u:.1f}%" if u is not None else "") + f" | ETA {_fmt_duration(eta)}")
            print0(line)
            if rank == 0:
                with open(metrics_path, "a") as f:
                    f.write(json.dumps({"name": name, "step": done, "loss": loss_v, "lr": lr, "grad_norm": gn_v,
                                        "tokens_per_s": tok_s, "mfu": u, "flops_per_token": fpt,
                                        "teacher_flops_per_token": teacher_flops_per_token,
                                        "time": time.time()}) + "\n")
            t_window, window_step_s, steps_in_window = time.perf_counter(), 0.0, 0
        if cfg.eval_every > 0 and done % cfg.eval_every == 0 and done != cfg.steps:
            run_eval(done)
        if (cfg.ckpt_every > 0 and done % cfg.ckpt_every == 0) or done == cfg.steps \
                or _clock_says_checkpoint(t_ckpt, cfg, device):
            save_checkpoint(cfg.out_dir, done, model, opt, cfg)
            t_ckpt = _wall_clock()
    run_eval(cfg.steps)
    out = None
    if cfg.export:
        out = os.path.join(cfg.out_dir, "model")
        export(model, out)
    return {"step": cfg.steps, "tokens": (cfg.steps - start) * tokens_per_step, "history": history, "evals": evals,
            "export": out}


# -----------------------------------------------------------------------------
# CLI: the shared flags; the losses (and so the runnable commands) live in distill.py and cascade.py


def main(argv=None):
    cfg = config_from_args(TrainConfig, argv, description="The shared training flags (train.py owns no loss: "
                           "run distill.py or cascade.py). Prints the resolved config.")
    try:
        grad_accum_steps(cfg, 1)
        _compute_dtype(cfg)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    print(json.dumps(dataclasses.asdict(cfg), indent=2))


if __name__ == "__main__":
    main()
