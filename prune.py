"""Pruning a parent into a child's initialisation: layers, then the hidden dimension, then FFN units.

Reading guide
-------------
Concept: the `prune(parent, size)` line of Cascade Distillation (PAPER.md section 1, Algorithm 1),
following PAPER.md section 4. Each step is a public function, so tests and cascade.py can run them
one at a time:

  collect_stats            one hooked pass over calibration batches -> CalibStats (streamed sums)
  select_layers            s_l = mean ||h_out|| / ||h_in||, keep the top k   (+ ablation selections)
  prune_layers             drop blocks
  fold_norms, pca_rotation, rotate_and_slice_hidden
                           one rotation Q for the whole network, then slice the residual width to k
  select_ffn_units         mean |silu(W1 x)_j * (W3 x)_j| per unit j, keep the top k per layer
                           (ffn_score="contribution", ours: times ||W2[:, j]||, see ffn_contribution)
  prune_ffn                slice W1, W3 rows and W2 columns
  retie_embeddings, untie  tied targets (3B); tie_policy_for picks the policy
  prune                    all of it in order, recomputing statistics after every surgery

Deviations from the paper, and why:
 1. The paper names the criteria; the exact math (one float64 covariance over all 2L norm sites,
    folded norms, the sqrt(d/k) / eps*d/k norm correction) is ours, as PAPER.md section 4 says. The
    pruned checkpoint's `norm_eps` is therefore parent_eps * d / k (1.25e-5 for 5120 -> 4096), not the
    released 1e-5: it is what keeps the sliced network exactly equal to dividing by the old width.
 2. Calibration masks padding, every BOS token, and (ours, `mask_first`) position 0 of every row,
    which is an attention sink with BOS-sized norms even when a window starts mid-document.
 3. x_hat = h / sqrt(mean(h^2) + eps) uses the norm's own eps, i.e. exactly what the folded readers see.
 4. Tied embeddings are untied for the rotation. A tied target is re-tied by the "auto" policy by
    default (see `retie_embeddings`): from an untied parent "mean", the average of the embedding and the
    head (final norm folded in, scales matched); from a tied parent "head", which keeps the logits exact
    given the final hidden states and changes only the input embedding. Measured on SmolLM2-135M (tied,
    final-norm weight 1.8 +- 0.3): cutting only the width 576 -> 464 of its pruned 14b-ratio child (KL 1.25)
    gives a held-out KL to the parent of 3.29 with "head", 7.81 with "mean", 8.71 with "embedding" and
    1.96 left untied (benchmarks/smollm2/probes/prune.json): a real model's sharp logits do not survive the
    23% error that "mean" and "embedding" leave in the head. Distillation repairs the rest.
 5. The child takes the target's RoPE fields (rope_theta, max_seq_len, YaRN, query temperature) as
    given, e.g. 14b (theta 1e9) -> 8b (theta 1e6 + YaRN). Calibration runs with the parent's RoPE;
    the switch happens after all surgery and changes attention, which distillation repairs.
 6. ModelArgs has one FFN width, so every layer keeps the same number k of units (its own top k).
 7. Heads, head_dim and the vocabulary are never pruned (section 4); a target that differs there is
    refused. A pruned dim or FFN width must be a multiple of `multiple_of` (default 8: 16-byte aligned
    bf16 GEMMs); nothing else must divide anything, since heads are kept.
 8. Surgery is in place: `prune` consumes the model it is given (a 24B parent has no room for a copy).

Memory at scale. Calibration keeps no activations across batches: its state is float64 sums, the
[D, D] covariance (D^2 x 8 bytes: 210 MB at D 5120) and the [L, F] FFN sums (40 x 32768 x 8: 10 MB);
beyond the model's own forward of one batch, its hooks hold blocks of at most 2^24 elements (64 MB
fp32, 128 MB as float64). It runs on the model as the caller holds it: on one device, replicated
under torchrun (each rank its share of the batches), or FSDP2-sharded (the hooks read activations
only); sums and counts are all-reduced, so every rank scores the same. Surgery needs full (unsharded)
tensors in the model's own dtype, on CPU or one GPU, one tensor at a time with fp32 compute in blocks
of `chunk_rows`: weights (24B in bf16: 47 GB) + one extra tensor of the largest shape (the untied
head, V x D bf16: 1.3 GB) + one fp32 block (chunk_rows x D x 4: 84 MB) + the covariance, its fp64
eigenvectors and the eigh workspace (about 4 x 210 MB). No fp32 copy of the model exists at any point.

Run: `python prune.py --parent PATH --size 8b --out PATH --calib TOKENS.npy` (or a data.py shard, or
`--calib-random 8` for a smoke test; `--layers/--dim/--ffn` override single numbers). Under torchrun
each rank holds the parent on its GPU and calibrates on its share of the sequences; rank 0 writes.
Depends on: model.py, data.py (the token-shard reader and its checks, for the CLI's calibration data).

Shape letters as in model.py: B batch, T tokens, D model dim, F FFN width, V vocabulary, N flattened
(valid) tokens, L layers, K kept units / dims (k).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from data import Tokenizer, load_tokens
from model import ModelArgs, Transformer, load_model, num_params, read_checkpoint_args, save_model

LAYER_METHODS = ("norm_ratio", "block_influence", "random", "last_k")
TIE_POLICIES = ("mean", "embedding", "head")
FFN_SCORES = ("activation", "contribution")  # PruneConfig.ffn_score
# "auto" (PruneConfig): "head" when the parent is tied, else "mean" (deviation 4, tie_policy_for)
# The target's positional settings the child takes (deviation 5).
ROPE_FIELDS = ("rope_theta", "max_seq_len", "yarn_factor", "yarn_original_max_pos", "yarn_beta_fast",
               "yarn_beta_slow", "yarn_attn_factor", "qtemp_beta", "qtemp_original_max_pos")


@dataclass
class PruneConfig:
    layer_method: str = "norm_ratio"  # section 4: s_l = mean ||h_out||/||h_in||; or block_influence, random, last_k
    seed: int = 0  # RNG seed of layer_method="random"
    bos_id: int = 1  # masked in calibration: BOS norms are 10-100x larger (section 4)
    pad_id: int = 11  # masked in calibration
    mask_first: bool = True  # (ours) also mask position 0 of each row, an attention sink even without BOS
    tie_policy: str = "auto"  # section 4, re-tying a tied target: "auto" (deviation 4), "mean", "embedding" or "head"
    multiple_of: int = 8  # (ours) a pruned dim / FFN width must be a multiple of this (bf16 GEMM alignment)
    ffn_score: str = "activation"  # section 4's mean |a_j|; "contribution" (ours) scales it by ||W2[:, j]||
    chunk_rows: int = 4096  # rows per fp32 block in surgery and covariance updates: bounds temporary memory

    def __post_init__(self):
        if self.layer_method not in LAYER_METHODS:
            raise ValueError(f"layer_method {self.layer_method!r} is unknown: choose one of {', '.join(LAYER_METHODS)}")
        if self.tie_policy not in ("auto",) + TIE_POLICIES:
            raise ValueError(f"tie_policy {self.tie_policy!r} is unknown: choose one of auto, {', '.join(TIE_POLICIES)}")
        if self.ffn_score not in FFN_SCORES:
            raise ValueError(f"ffn_score {self.ffn_score!r} is unknown: choose one of {', '.join(FFN_SCORES)}")
        if self.multiple_of < 1 or self.chunk_rows < 1:
            raise ValueError(f"multiple_of ({self.multiple_of}) and chunk_rows ({self.chunk_rows}) must be >= 1")


# -----------------------------------------------------------------------------
# Target shapes


def _is_pos_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v > 0


def resolve_target(parent: ModelArgs, target: Union[str, ModelArgs, None], *, layers=None, dim=None, ffn=None,
                   multiple_of: int = 8) -> ModelArgs:
    """The child's ModelArgs: the parent's heads, head_dim, vocab and norm eps, the target's layers, dim,
    FFN width, tying and RoPE fields. target: a preset name ("14b", "8b", "3b", ...), a ModelArgs, or
    None (the parent's own shape); layers/dim/ffn override single numbers. Refuses anything that is
    not a shrink of the parent."""
    if target is None:
        t = parent
    elif isinstance(target, str):
        t = ModelArgs.preset(target)
    elif isinstance(target, ModelArgs):
        t = target
    else:
        raise TypeError(f"target must be a preset name or a ModelArgs, got {type(target).__name__}")
    over = {}
    for name, flag, v in (("n_layers", "layers", layers), ("dim", "dim", dim), ("hidden_dim", "ffn", ffn)):
        if v is not None:
            if not _is_pos_int(v):
                raise ValueError(f"target {flag} must be a positive integer, got {v!r}: pass a whole number of "
                                 f"{'layers' if flag == 'layers' else 'dimensions'} > 0")
            over[name] = int(v)
    t = dataclasses.replace(t, **over)
    for name in ("n_heads", "n_kv_heads", "head_dim", "vocab_size"):
        if getattr(t, name) != getattr(parent, name):
            raise ValueError(f"target {name}={getattr(t, name)} differs from the parent's {getattr(parent, name)}: "
                             f"heads, head_dim and the vocabulary are never pruned (PAPER.md section 4); use a "
                             f"target of the parent's family, or --layers/--dim/--ffn alone")
    for name, what in (("n_layers", "layers"), ("dim", "hidden dim"), ("hidden_dim", "FFN width")):
        if getattr(t, name) > getattr(parent, name):
            raise ValueError(f"target {what} {getattr(t, name)} is larger than the parent's {getattr(parent, name)}: "
                             f"pruning only shrinks; pick a smaller target")
    for name, what in (("dim", "hidden dim"), ("hidden_dim", "FFN width")):
        v = getattr(t, name)
        if v != getattr(parent, name) and v % multiple_of:
            raise ValueError(f"target {what} {v} is not a multiple of {multiple_of} (PruneConfig.multiple_of, "
                             f"bf16 GEMM alignment): round it to {max(multiple_of, v // multiple_of * multiple_of)} "
                             f"or set multiple_of=1")
    return dataclasses.replace(parent, n_layers=t.n_layers, dim=t.dim, hidden_dim=t.hidden_dim,
                               tied_embeddings=t.tied_embeddings, **{f: getattr(t, f) for f in ROPE_FIELDS})


# -----------------------------------------------------------------------------
# Calibration statistics (streamed; section 4)


@dataclass
class CalibStats:
    """Sums over the valid (unmasked) calibration tokens, float64, all-reduced over ranks."""
    n_tokens: int  # valid tokens
    n_batches: int
    in_norm_sum: torch.Tensor  # [L] sum ||h_in||
    out_norm_sum: torch.Tensor  # [L] sum ||h_out||
    ratio_sum: torch.Tensor  # [L] sum ||h_out|| / ||h_in||
    cos_sum: torch.Tensor  # [L] sum cos(h_in, h_out)
    cov: Optional[torch.Tensor] = None  # [D, D] sum of x_hat x_hat^T over the 2L norm sites
    ffn_abs_sum: Optional[torch.Tensor] = None  # [L, F] sum |silu(W1 n)_j * (W3 n)_j|

    @property
    def norm_ratio(self) -> torch.Tensor:  # s_l, section 4
        return self.ratio_sum / self.n_tokens

    @property
    def block_influence(self) -> torch.Tensor:  # ShortGPT: 1 - mean cos(h_in, h_out)
        return 1 - self.cos_sum / self.n_tokens

    @property
    def ffn_scores(self) -> torch.Tensor:  # [L, F] mean |silu(W1 x)_j * (W3 x)_j|
        return self.ffn_abs_sum / self.n_tokens


def calib_mask(tokens_BT: torch.Tensor, config: PruneConfig) -> torch.Tensor:
    """True where a token's activations count: not padding, not BOS, not position 0 (if mask_first)."""
    valid_BT = (tokens_BT != config.bos_id) & (tokens_BT != config.pad_id)
    if config.mask_first:
        valid_BT[:, 0] = False
    return valid_BT


def _batches(calib) -> Callable:
    """calib -> a function returning a fresh iterator of [B, T] batches (every step makes a new pass)."""
    if callable(calib):
        return calib
    if isinstance(calib, torch.Tensor):
        raise TypeError("calib must be a list of [B, T] token batches or a callable returning an iterator of them; "
                        "wrap a single tensor as [tokens_BT]")
    try:
        one_shot = iter(calib) is calib
    except TypeError:
        raise TypeError(f"calib must be a list of [B, T] token batches or a callable returning an iterator of "
                        f"them, got {type(calib).__name__}") from None
    if one_shot:
        raise TypeError("calib is a one-shot iterator, but pruning makes up to three passes: pass a list, or a "
                        "callable returning a fresh iterator")
    return lambda: iter(calib)


def _check_batch(tokens_BT, vocab_size: int) -> torch.Tensor:
    if not isinstance(tokens_BT, torch.Tensor) or tokens_BT.dim() != 2 or tokens_BT.dtype.is_floating_point \
            or tokens_BT.dtype == torch.bool:
        what = f"a {tuple(tokens_BT.shape)} {tokens_BT.dtype} tensor" if isinstance(tokens_BT, torch.Tensor) \
            else type(tokens_BT).__name__
        raise ValueError(f"a calibration batch must be an integer tensor [B, T] of token ids, got {what}")
    if tokens_BT.numel() and (int(tokens_BT.min()) < 0 or int(tokens_BT.max()) >= vocab_size):
        raise ValueError(f"calibration token ids span {int(tokens_BT.min())}..{int(tokens_BT.max())}, outside the "
                         f"model's vocabulary 0..{vocab_size - 1}: tokenize with the parent's tokenizer")
    return tokens_BT.long()


def _check_plain(model: Transformer):
    for name, p in model.named_parameters():
        if hasattr(p, "device_mesh") or p.is_meta:
            raise ValueError(f"parameter {name} is {'sharded (DTensor)' if hasattr(p, 'device_mesh') else 'on meta'}: "
                             f"surgery needs the full tensors; load the model unsharded (CPU or one GPU)")


@torch.no_grad()
def collect_stats(model: Transformer, calib, config: Optional[PruneConfig] = None, *, hidden: bool = True,
                  ffn: bool = True) -> CalibStats:
    """One forward pass over the calibration batches with hooks that fold each batch into running sums.

    Always collected: per-layer input/output norms, their ratio and cosine. hidden=True: the [D, D]
    float64 covariance of x_hat at both norm sites of every layer. ffn=True: the [L, F] sums of
    |SwiGLU intermediate|. Nothing outlives its batch, so memory does not grow with the token count.
    calib: a list of LongTensor [B, T], or a callable returning an iterator of them; pad on the right.
    Works on an FSDP2-sharded model too (the hooks read activations only); under torch.distributed the
    sums are all-reduced, so each rank passes its own share of the batches.
    """
    cfg = config or PruneConfig()
    args = model.args
    L, D, Fw = len(model.layers), args.dim, args.hidden_dim
    device = next(model.parameters()).device
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
    in_norm, out_norm, ratio, cos = z(L), z(L), z(L), z(L)
    cov_DD = z(D, D) if hidden else None
    ffn_LF = z(L, Fw) if ffn else None
    state = {}  # the current batch's valid-token mask [B, T], read by the hooks

    def valid_blocks(x_BTX):
        """The valid rows of an activation [B, T, X] as float32 blocks [n, X] of at most 2^24 elements, so
        the hooks' temporaries stay small whatever the batch (64 MB fp32, 128 MB once in float64)."""
        x_NX, v_N = x_BTX.reshape(-1, x_BTX.shape[-1]), state["valid"].reshape(-1)
        r = max(1, min(cfg.chunk_rows, 2**24 // x_NX.shape[1]))
        for j in range(0, x_NX.shape[0], r):
            yield x_NX[j:j + r][v_N[j:j + r]].float()

    def add_cov(x_BTD, eps):
        for x_nD in valid_blocks(x_BTD):
            xhat_nD = (x_nD * torch.rsqrt(x_nD.pow(2).mean(-1, keepdim=True) + eps)).double()  # the norm's scaling
            cov_DD.addmm_(xhat_nD.T, xhat_nD)  # C += x_hat^T x_hat  [D, D]

    def block_hook(i):
        def hook(block, inputs, out_BTD):
            for h_in_nD, h_out_nD in zip(valid_blocks(inputs[0]), valid_blocks(out_BTD)):
                n_in_n, n_out_n = h_in_nD.norm(dim=-1), h_out_nD.norm(dim=-1)
                in_norm[i] += n_in_n.sum(dtype=torch.float64)
                out_norm[i] += n_out_n.sum(dtype=torch.float64)
                ratio[i] += (n_out_n / n_in_n).sum(dtype=torch.float64)
                cos[i] += ((h_in_nD * h_out_nD).sum(-1) / (n_in_n * n_out_n)).sum(dtype=torch.float64)
            if hidden:  # the attention-norm site reads the block input
                add_cov(inputs[0], block.input_layernorm.eps)
        return hook

    def ffn_norm_hook(norm, inputs):
        add_cov(inputs[0], norm.eps)

    def down_hook(i):
        def hook(down, inputs):  # inputs[0] = silu(W1 n) * (W3 n)  [B, T, F]
            for u_nF in valid_blocks(inputs[0]):
                ffn_LF[i] += u_nF.abs().sum(0, dtype=torch.float64)
        return hook

    handles = []
    for i, layer in enumerate(model.layers):
        handles.append(layer.register_forward_hook(block_hook(i)))
        if hidden:
            handles.append(layer.post_attention_layernorm.register_forward_pre_hook(ffn_norm_hook))
        if ffn:
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(down_hook(i)))
    was_training = model.training
    model.eval()
    n_tokens = n_batches = 0
    try:
        for tokens_BT in _batches(calib)():
            tokens_BT = _check_batch(tokens_BT, args.vocab_size).to(device)
            state["valid"] = calib_mask(tokens_BT, cfg)
            n_tokens += int(state["valid"].sum())
            n_batches += 1
            model(tokens_BT, head_fn=lambda h_BTD, w_VD: None)  # no logits needed
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if dist.is_available() and dist.is_initialized():
        counts = torch.tensor([n_tokens, n_batches], dtype=torch.float64, device=device)
        for t in [counts, in_norm, out_norm, ratio, cos] + [t for t in (cov_DD, ffn_LF) if t is not None]:
            dist.all_reduce(t)
        n_tokens, n_batches = int(counts[0]), int(counts[1])
    if n_batches == 0:
        raise ValueError("the calibration set is empty: pass a list of [B, T] token batches (a few hundred "
                         "sequences of real pretraining text, PAPER.md section 4)")
    if n_tokens == 0:
        raise ValueError(f"every calibration token is masked (BOS {cfg.bos_id}, pad {cfg.pad_id}"
                         f"{', position 0' if cfg.mask_first else ''}): give longer sequences of real text")
    return CalibStats(n_tokens, n_batches, in_norm, out_norm, ratio, cos, cov_DD, ffn_LF)


# -----------------------------------------------------------------------------
# Layers


def select_layers(stats: CalibStats, k: int, method: str = "norm_ratio", seed: int = 0) -> list[int]:
    """Indices (increasing) of the k layers to keep.

    norm_ratio: top k by s_l = mean ||h_out|| / ||h_in|| (the paper's criterion; drops the least changing).
    block_influence: top k by ShortGPT's 1 - mean cos(h_in, h_out).
    random: k layers drawn with `seed`. last_k: drop the last L - k layers (keep 0..k-1).
    """
    L = stats.ratio_sum.numel()
    if not _is_pos_int(k) or k > L:
        raise ValueError(f"cannot keep {k!r} of {L} layers: k must be an integer in 1..{L}")
    if method == "norm_ratio":
        order = torch.argsort(stats.norm_ratio.cpu(), descending=True, stable=True)
    elif method == "block_influence":
        order = torch.argsort(stats.block_influence.cpu(), descending=True, stable=True)
    elif method == "random":
        order = torch.randperm(L, generator=torch.Generator().manual_seed(seed))
    elif method == "last_k":
        order = torch.arange(L)
    else:
        raise ValueError(f"layer method {method!r} is unknown: choose one of {', '.join(LAYER_METHODS)}")
    return sorted(order[:k].tolist())


def prune_layers(model: Transformer, keep: list[int]) -> Transformer:
    """Keep only the blocks `keep` (increasing indices), in place."""
    _check_plain(model)
    keep, L = [int(i) for i in keep], len(model.layers)
    if not keep or keep != sorted(set(keep)) or keep[0] < 0 or keep[-1] >= L:
        raise ValueError(f"keep must be non-empty, strictly increasing layer indices in 0..{L - 1}, got {keep}")
    model.layers = nn.ModuleList(model.layers[i] for i in keep)
    model.args = dataclasses.replace(model.args, n_layers=len(keep))
    return model


# -----------------------------------------------------------------------------
# Hidden dimension: fold, rotate, slice (section 4)


def _param(t: torch.Tensor, like: nn.Parameter) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=like.requires_grad)


def _set_linear(lin: nn.Linear, w: torch.Tensor):
    lin.weight = _param(w, lin.weight)
    lin.out_features, lin.in_features = w.shape


def _set_norm(norm: nn.Module, k: int, value: float, eps: float):
    w = norm.weight
    norm.weight = _param(torch.full((k,), value, dtype=w.dtype, device=w.device), w)
    norm.eps = eps


@torch.no_grad()
def untie(model: Transformer) -> Transformer:
    """Give lm_head its own copy of the embedding matrix (logits unchanged)."""
    if model.lm_head.weight is model.embed_tokens.weight:
        model.lm_head.weight = _param(model.embed_tokens.weight.detach().clone(), model.embed_tokens.weight)
    model.args = dataclasses.replace(model.args, tied_embeddings=False)
    return model


@torch.no_grad()
def fold_norms(model: Transformer, chunk_rows: int = 4096) -> Transformer:
    """Multiply every RMSNorm weight g into the linears that read its output (W <- W diag(g)) and set the
    norms to 1: q, k, v read the attention norm, gate and up the FFN norm, lm_head the final norm. A tied
    head is untied first. In place; logits change only by rounding in the model's dtype."""
    _check_plain(model)
    untie(model)

    def fold(norm, readers):
        g_D = norm.weight.detach().float()
        for lin in readers:
            W = lin.weight
            for i in range(0, W.shape[0], chunk_rows):
                W[i:i + chunk_rows] = (W[i:i + chunk_rows].float() * g_D.to(W.device)).to(W.dtype)  # [r, D] * [D]
        norm.weight.fill_(1.0)

    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        fold(layer.input_layernorm, [a.q_proj, a.k_proj, a.v_proj])
        fold(layer.post_attention_layernorm, [m.gate_proj, m.up_proj])
    fold(model.norm, [model.lm_head])
    return model


def pca_rotation(cov_DD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q [D, D] float64, eigenvalues [D] float64), columns by descending eigenvalue. Each column's sign
    is fixed (its largest |entry| positive): eigh's signs are arbitrary and vary between backends."""
    if not torch.isfinite(cov_DD).all():
        raise ValueError("the calibration covariance holds inf/NaN: the parent's activations overflowed; "
                         "calibrate in float32 or check the checkpoint")
    evals_D, Q_DD = torch.linalg.eigh(cov_DD.double())  # ascending
    evals_D, Q_DD = evals_D.flip(0).clamp_min(0), Q_DD.flip(1)
    col = torch.arange(Q_DD.shape[1], device=Q_DD.device)
    sign_D = Q_DD[Q_DD.abs().argmax(0), col].sign()
    sign_D[sign_D == 0] = 1
    return Q_DD * sign_D, evals_D


def _matmul_blocks(W: torch.Tensor, Q_DK: torch.Tensor, side: str, chunk: int) -> torch.Tensor:
    """W Q (side "right": W [R, D] -> [R, K]) or Q^T W (side "left": W [D, C] -> [K, C]) in fp32, one block of
    rows / columns at a time, into a new tensor of W's dtype: the only fp32 memory is one block."""
    Q_DK = Q_DK.to(device=W.device, dtype=torch.float32)
    K = Q_DK.shape[1]
    if side == "right":
        out_RK = torch.empty(W.shape[0], K, dtype=W.dtype, device=W.device)
        for i in range(0, W.shape[0], chunk):
            out_RK[i:i + chunk] = (W[i:i + chunk].float() @ Q_DK).to(W.dtype)  # [r, D] @ [D, K]
        return out_RK
    out_KC = torch.empty(K, W.shape[1], dtype=W.dtype, device=W.device)
    for j in range(0, W.shape[1], chunk):
        out_KC[:, j:j + chunk] = (Q_DK.T @ W[:, j:j + chunk].float()).to(W.dtype)  # [K, D] @ [D, c]
    return out_KC


@torch.no_grad()
def rotate_and_slice_hidden(model: Transformer, Q_DD: torch.Tensor, k: int, *, correct_norms: bool = True,
                            chunk_rows: int = 4096) -> Transformer:
    """Rotate the residual stream by Q and keep its first k coordinates, in place.

    Folds the norms first (untying a tied head), then with Q_k = Q[:, :k]: embedding E <- E Q_k, readers
    (q, k, v, gate, up, lm_head) W <- W Q_k, writers (o, down) W <- Q_k^T W. With k = D the logits are
    unchanged, because rms(x Q) = rms(x). correct_norms=True makes each norm a stock RMSNorm over k dims
    with weight sqrt(D/k) and eps eps*D/k, which is exactly the old division by the full width
    (OldWidthRMSNorm is that reading); False leaves weight 1, eps unchanged (logits move by O(1)).
    """
    _check_plain(model)
    D, eps = model.args.dim, model.args.norm_eps
    if tuple(Q_DD.shape) != (D, D):
        raise ValueError(f"Q has shape {tuple(Q_DD.shape)}, the model's hidden dim needs ({D}, {D})")
    if not _is_pos_int(k) or k > D:
        raise ValueError(f"cannot slice the hidden dim {D} to {k!r}: k must be an integer in 1..{D}")
    fold_norms(model, chunk_rows)
    Q_DK = Q_DD[:, :k]
    emb = model.embed_tokens
    emb.weight = _param(_matmul_blocks(emb.weight, Q_DK, "right", chunk_rows), emb.weight)  # E Q_k  [V, K]
    emb.embedding_dim = k
    scale, new_eps = (math.sqrt(D / k), eps * D / k) if correct_norms else (1.0, eps)
    for layer in model.layers:
        a, m = layer.self_attn, layer.mlp
        for lin in (a.q_proj, a.k_proj, a.v_proj, m.gate_proj, m.up_proj):
            _set_linear(lin, _matmul_blocks(lin.weight, Q_DK, "right", chunk_rows))  # W Q_k  [out, K]
        for lin in (a.o_proj, m.down_proj):
            _set_linear(lin, _matmul_blocks(lin.weight, Q_DK, "left", chunk_rows))  # Q_k^T W  [K, in]
        _set_norm(layer.input_layernorm, k, scale, new_eps)
        _set_norm(layer.post_attention_layernorm, k, scale, new_eps)
    _set_linear(model.lm_head, _matmul_blocks(model.lm_head.weight, Q_DK, "right", chunk_rows))  # [V, K]
    _set_norm(model.norm, k, scale, new_eps)
    model.args = dataclasses.replace(model.args, dim=k, norm_eps=new_eps)
    return model


class OldWidthRMSNorm(nn.Module):
    """The readable form of a sliced norm: x_k / sqrt(sum(x_k^2) / D_old + eps), i.e. still dividing by the
    parent's width. `rotate_and_slice_hidden(correct_norms=True)` replaces it by a stock RMSNorm; the tests
    check that the two agree."""

    def __init__(self, k: int, old_dim: int, eps: float):
        super().__init__()
        self.old_dim, self.eps = old_dim, eps
        self.weight = nn.Parameter(torch.ones(k))

    def forward(self, x_BTK):
        xf = x_BTK.float()
        xf = xf * torch.rsqrt(xf.pow(2).sum(-1, keepdim=True) / self.old_dim + self.eps)
        return xf.type_as(x_BTK) * self.weight


# -----------------------------------------------------------------------------
# FFN units


@torch.no_grad()
def ffn_contribution(model: Transformer, scores_LF: torch.Tensor, chunk_rows: int = 4096) -> torch.Tensor:
    """[L, F] scores_LF[l, j] * ||W2[:, j]|| of layer l. Unit j writes a_j * W2[:, j] into the residual, so
    mean |a_j| times the column norm is the mean norm of that write: a unit that fires weakly through a large
    column can matter more than one that fires strongly through a small one, which |a_j| alone cannot see."""
    _check_plain(model)
    out = []
    for layer in model.layers:
        w = layer.mlp.down_proj.weight  # [D, F]
        sq = torch.zeros(w.shape[1], dtype=torch.float64, device=w.device)
        for r in range(0, w.shape[0], chunk_rows):  # fp32 blocks: no fp32 copy of a whole bf16 matrix
            sq += w[r:r + chunk_rows].float().pow(2).sum(0, dtype=torch.float64)
        out.append(sq.sqrt().to(scores_LF.device))
    return scores_LF * torch.stack(out).to(scores_LF.dtype)


def select_ffn_units(stats: CalibStats, k: int, scores_LF: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[L, K] increasing unit indices: per layer the top k by mean |silu(W1 x)_j * (W3 x)_j| (or by
    scores_LF, e.g. ffn_contribution's)."""
    if stats.ffn_abs_sum is None:
        raise ValueError("these statistics have no FFN sums: collect them with collect_stats(..., ffn=True)")
    Fw = stats.ffn_abs_sum.shape[1]
    if not _is_pos_int(k) or k > Fw:
        raise ValueError(f"cannot keep {k!r} of {Fw} FFN units: k must be an integer in 1..{Fw}")
    top_LK = torch.topk(stats.ffn_scores if scores_LF is None else scores_LF, k, dim=1).indices
    return top_LK.sort(dim=1).values


@torch.no_grad()
def prune_ffn(model: Transformer, keep_LK) -> Transformer:
    """Keep units keep_LK[l] of layer l (the same count in every layer): rows of W1 (gate) and W3 (up),
    columns of W2 (down). In place."""
    _check_plain(model)
    keep_LK = torch.as_tensor(keep_LK, dtype=torch.long)
    Fw = model.args.hidden_dim
    if keep_LK.dim() != 2 or keep_LK.shape[0] != len(model.layers) or keep_LK.shape[1] == 0:
        raise ValueError(f"keep must be [n_layers={len(model.layers)}, k>0] unit indices, "
                         f"got shape {tuple(keep_LK.shape)}")
    if int(keep_LK.min()) < 0 or int(keep_LK.max()) >= Fw or bool((keep_LK.diff(dim=1) <= 0).any()):
        raise ValueError(f"each layer's kept units must be strictly increasing indices in 0..{Fw - 1}")
    for layer, idx_K in zip(model.layers, keep_LK):
        m = layer.mlp
        idx_K = idx_K.to(m.gate_proj.weight.device)
        _set_linear(m.gate_proj, m.gate_proj.weight[idx_K].contiguous())  # [K, D]
        _set_linear(m.up_proj, m.up_proj.weight[idx_K].contiguous())  # [K, D]
        _set_linear(m.down_proj, m.down_proj.weight[:, idx_K].contiguous())  # [D, K]
    model.args = dataclasses.replace(model.args, hidden_dim=keep_LK.shape[1])
    return model


# -----------------------------------------------------------------------------
# Tied targets


@torch.no_grad()
def retie_embeddings(model: Transformer, policy: str = "mean", chunk_rows: int = 4096) -> dict:
    """Make lm_head share one matrix with the embedding (a tied target such as 3B), in place.

    "mean" (default): the shared matrix is T = (E + a H diag(w)) / 2, the average of the embedding and the
    head with the final-norm weight w folded in, a = ||E|| / ||H diag(w)|| giving both halves the same
    weight, and the final-norm weight becomes 1/a, so the logits are (h E^T / a + h diag(w) H^T) / 2: half
    the parent's logits plus a term unrelated to them (a per-dimension least-squares fit of the norm
    weight instead, or 2/a, started and ended worse on the demo). Neither side is exact, but neither is
    lost: an untied parent's E and H are nearly unrelated, so keeping only one of them starts the child
    near a uniform guess, while the mean starts it at about half the KL and distils it lower in the same
    steps (the figures are in benchmarks/README.md, "Measurements behind code choices").
    "embedding": the shared matrix is the embedding E, so everything up to the final norm is
    exactly the untied model. The head H is fitted through the only free per-dimension scale, the
    final-norm weight w: w'_j = w_j <E_j, H_j> / ||E_j||^2 over columns j, the least-squares choice of
    diag(w') E^T against diag(w) H^T. Property (tested): logits stay exact when every column of H is a
    multiple of E's column, and the fitted head is never farther from the untied one than keeping w.
    "head": the shared matrix is the head H; logits from given final hidden states are exact, while
    the input embeddings change. Either way distillation repairs the rest (PAPER.md section 4).
    Returns {"policy", "head_rel_error"}: ||diag(w') E^T - diag(w) H^T||_F / ||diag(w) H^T||_F.
    """
    _check_plain(model)
    if policy not in TIE_POLICIES:
        raise ValueError(f"tie policy {policy!r} is unknown: choose one of {', '.join(TIE_POLICIES)}")
    E, H, w = model.embed_tokens.weight, model.lm_head.weight, model.norm.weight
    if E is H:
        return {"policy": policy, "head_rel_error": 0.0}
    D = E.shape[1]
    eh_D, ee_D, hh_D = (torch.zeros(D, dtype=torch.float64, device=E.device) for _ in range(3))
    for i in range(0, E.shape[0], chunk_rows):  # per-column dot products, float64 blocks
        e_RD, h_RD = E[i:i + chunk_rows].double(), H[i:i + chunk_rows].double()
        eh_D += (e_RD * h_RD).sum(0)
        ee_D += (e_RD * e_RD).sum(0)
        hh_D += (h_RD * h_RD).sum(0)
    w_D = w.detach().double()
    if policy == "mean":
        a = float((ee_D.sum() / (w_D ** 2 * hh_D).sum().clamp_min(1e-300)).sqrt())
        with torch.no_grad():
            for i in range(0, E.shape[0], chunk_rows):  # E becomes T in place, block by block
                t_RD = (E[i:i + chunk_rows].double() + a * H[i:i + chunk_rows].double() * w_D) / 2
                E[i:i + chunk_rows] = t_RD.to(E.dtype)
        new_w_D = torch.full_like(w_D, 1 / a)
    else:
        new_w_D = w_D * torch.where(ee_D > 0, eh_D / ee_D.clamp_min(1e-300), torch.zeros_like(ee_D))
    if policy in ("mean", "embedding"):
        new_w_D = new_w_D.to(w.dtype).double()  # the weight as stored
        err = torch.zeros((), dtype=torch.float64, device=E.device)
        for i in range(0, E.shape[0], chunk_rows):  # a second pass: the expanded square cancels badly
            diff_RD = E[i:i + chunk_rows].double() * new_w_D - H[i:i + chunk_rows].double() * w_D
            err += diff_RD.pow(2).sum()
        model.norm.weight.copy_(new_w_D.to(w.dtype))
        model.lm_head.weight = model.embed_tokens.weight
    else:
        err = torch.zeros((), dtype=torch.float64)
        model.embed_tokens.weight = model.lm_head.weight
    model.args = dataclasses.replace(model.args, tied_embeddings=True)
    ref = (w_D ** 2 * hh_D).sum().clamp_min(1e-300)
    return {"policy": policy, "head_rel_error": float((err.cpu() / ref.cpu()).sqrt())}


def tie_policy_for(policy: str, parent_tied: bool) -> str:
    """The re-tie policy "auto" stands for (deviation 4): "head" when the parent was tied, else "mean"."""
    if policy != "auto":
        return policy
    return "head" if parent_tied else "mean"


# -----------------------------------------------------------------------------
# The whole step


def prune(model: Transformer, target: Union[str, ModelArgs], calib, config: Optional[PruneConfig] = None
          ) -> tuple[Transformer, dict]:
    """Prune `model` (consumed: surgery is in place) to `target`: layers, then hidden dim, then FFN, with
    statistics recomputed after every surgery that changed the network (one pass serves two steps when
    a step keeps everything). target: a preset name ("14b", "8b", "3b") or a ModelArgs (its n_layers,
    dim, hidden_dim, tied_embeddings and RoPE fields count). calib: a list of LongTensor [B, T] token
    batches or a callable returning a fresh iterator of them (up to three passes are made).

    Returns (model, report): a standard Transformer whose args have exactly the target shape, and a
    dict with the layer scores and kept layers, the retained PCA energy and eigenvalues, the FFN scores
    and kept units (tensors on the CPU), the tie result and the seconds taken.
    """
    cfg = config or PruneConfig()
    _check_plain(model)
    parent = model.args
    parent_tied = model.lm_head.weight is model.embed_tokens.weight
    tgt = resolve_target(parent, target, multiple_of=cfg.multiple_of)
    calib = _batches(calib)
    t0 = time.perf_counter()
    drop_layers = tgt.n_layers < parent.n_layers
    shrink_dim = tgt.dim < parent.dim
    shrink_ffn = tgt.hidden_dim < parent.hidden_dim
    report = {"parent": dataclasses.asdict(parent), "target": dataclasses.asdict(tgt),
              "config": dataclasses.asdict(cfg)}

    # 1. Layers, scored on the parent. If none is dropped the same pass serves the next step that cuts.
    stats = collect_stats(model, calib, cfg, hidden=shrink_dim and not drop_layers,
                          ffn=shrink_ffn and not drop_layers and not shrink_dim)
    keep = select_layers(stats, tgt.n_layers, cfg.layer_method, cfg.seed)
    report["layers"] = {"method": cfg.layer_method, "norm_ratio": stats.norm_ratio.cpu(),
                        "block_influence": stats.block_influence.cpu(),
                        "mean_in_norm": (stats.in_norm_sum / stats.n_tokens).cpu(),
                        "mean_out_norm": (stats.out_norm_sum / stats.n_tokens).cpu(),
                        "kept": keep, "dropped": [i for i in range(parent.n_layers) if i not in keep],
                        "tokens": stats.n_tokens}
    if drop_layers:
        prune_layers(model, keep)
        stats = None  # the survivors now see other inputs

    # 2. Hidden dim: PCA over the 2L norm sites of the layer-pruned model.
    if shrink_dim:
        if stats is None:
            stats = collect_stats(model, calib, cfg, hidden=True, ffn=False)
        Q_DD, lam_D = pca_rotation(stats.cov)
        if dist.is_available() and dist.is_initialized():
            dist.broadcast(Q_DD, 0)  # every rank applies rank 0's rotation bit for bit
        rotate_and_slice_hidden(model, Q_DD, tgt.dim, chunk_rows=cfg.chunk_rows)
        energy = float(lam_D[:tgt.dim].sum() / lam_D.sum().clamp_min(1e-300))
        report["hidden"] = {"dim": tgt.dim, "parent_dim": parent.dim, "retained_energy": energy,
                            "energy_fractions": (lam_D / lam_D.sum().clamp_min(1e-300)).float().cpu(),
                            "tokens": stats.n_tokens, "sites": 2 * len(model.layers)}
        stats = None
    else:
        report["hidden"] = {"dim": tgt.dim, "parent_dim": parent.dim, "retained_energy": 1.0}

    # 3. FFN units, scored on the rotated, sliced model.
    if shrink_ffn:
        if stats is None:
            stats = collect_stats(model, calib, cfg, hidden=False, ffn=True)
        scores_LF = stats.ffn_scores
        if cfg.ffn_score == "contribution":
            scores_LF = ffn_contribution(model, scores_LF, cfg.chunk_rows)
        units_LK = select_ffn_units(stats, tgt.hidden_dim, scores_LF)
        kept_mass_L = scores_LF.gather(1, units_LK.to(scores_LF.device)).sum(1) / scores_LF.sum(1).clamp_min(1e-300)
        prune_ffn(model, units_LK)
        report["ffn"] = {"score": cfg.ffn_score, "scores": scores_LF.float().cpu(), "kept": units_LK.cpu(),
                         "kept_score_fraction": kept_mass_L.float().cpu(), "tokens": stats.n_tokens}

    # 4. Tying, then the target's RoPE fields (deviation 5).
    tied = model.lm_head.weight is model.embed_tokens.weight
    if tgt.tied_embeddings and not tied:
        report["tie"] = retie_embeddings(model, tie_policy_for(cfg.tie_policy, parent_tied), cfg.chunk_rows)
    elif not tgt.tied_embeddings and tied:
        untie(model)
    model.args = dataclasses.replace(model.args, tied_embeddings=tgt.tied_embeddings,
                                     **{f: getattr(tgt, f) for f in ROPE_FIELDS})
    model.reset_buffers()
    a = model.args
    assert (a.n_layers, a.dim, a.hidden_dim, a.tied_embeddings) == \
        (tgt.n_layers, tgt.dim, tgt.hidden_dim, tgt.tied_embeddings), "internal error: pruned shape != target"
    report["args"] = dataclasses.asdict(a)
    report["params"] = {"parent": num_params(parent), "child": num_params(a)}
    report["seconds"] = time.perf_counter() - t0
    return model, report


def report_to_json(report: dict):
    """The report with tensors as (nested) lists, ready for json.dump."""
    if isinstance(report, dict):
        return {k: report_to_json(v) for k, v in report.items()}
    if isinstance(report, (list, tuple)):
        return [report_to_json(v) for v in report]
    if isinstance(report, torch.Tensor):
        return report.tolist()
    return report


# -----------------------------------------------------------------------------
# Calibration data for the CLI (pre-tokenized: a .npy, or data.py's shards read by data.py itself)


def read_token_file(path: str, parent: Optional[str] = None, vocab_size: Optional[int] = None):
    """Token ids from a .npy file (1-D stream or 2-D rows), a data.py shard (.bin), a folder or a glob of
    shards. Shards go through data.load_tokens, so they get its checks (magic, version, size; the
    vocabulary against `vocab_size`, the parent's; the tokenizer hash against the parent's tekken.json
    when it has one) and its streaming: a folder stays memory-mapped, shard by shard, never concatenated."""
    if path.endswith(".npy"):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"calibration file {path} does not exist: pass a .npy of token ids or data.py "
                                    f"shards")
        try:
            arr = np.load(path, mmap_mode="r")
        except ValueError as e:
            raise ValueError(f"{path} is not a readable .npy file ({e}): re-save it with numpy.save") from None
        if arr.ndim not in (1, 2) or not np.issubdtype(arr.dtype, np.integer):
            raise ValueError(f"{path} holds a {arr.shape} {arr.dtype} array: expected integer token ids, 1-D or 2-D")
        return arr
    if not (os.path.exists(path) or any(c in path for c in "*?[")):
        raise FileNotFoundError(f"calibration file {path} does not exist: pass a .npy of token ids or data.py shards")
    tekken = os.path.join(parent, "tekken.json") if parent else None
    tok = Tokenizer.from_file(tekken, vocab_size=vocab_size) if tekken and os.path.exists(tekken) else None
    try:
        return load_tokens(path, tok, max_vocab=vocab_size)
    except ValueError as e:
        if "bad magic" in str(e):
            raise ValueError(f"{path} is neither a .npy file nor a data.py token shard (bad magic): save token ids "
                             f"with numpy.save or `python data.py prepare`") from None
        raise


def calibration_batches(tokens, n_seqs: int, seq_len: int, batch_size: int, rank: int = 0,
                        world_size: int = 1) -> list[torch.Tensor]:
    """Cut n_seqs evenly spaced, non-overlapping windows of seq_len tokens from a 1-D stream (or pick
    evenly spaced rows of a 2-D array, cut to seq_len) and batch them. A 1-D stream may be data.py's
    ShardedTokens: only the chosen windows are read. Rank r of W takes windows r, r+W,
    ..., the same number on every rank."""
    if tokens.ndim == 1:
        n = min(n_seqs, tokens.shape[0] // seq_len)
        if n == 0:
            raise ValueError(f"the calibration stream has {tokens.shape[0]} tokens, fewer than one {seq_len}-token "
                             f"sequence: pass more text or a smaller --seq-len")
        starts = np.linspace(0, tokens.shape[0] - seq_len, n).astype(np.int64)
        seqs = np.stack([np.asarray(tokens[s:s + seq_len]) for s in starts])
    else:
        n = min(n_seqs, tokens.shape[0])
        if n == 0 or tokens.shape[1] == 0:
            raise ValueError("the calibration array has no rows: pass token ids")
        rows = np.linspace(0, tokens.shape[0] - 1, n).astype(np.int64)
        seqs = np.asarray(tokens[rows, :seq_len])
    per_rank = len(seqs) // world_size
    if per_rank == 0:
        raise ValueError(f"{len(seqs)} calibration sequences cannot be shared by {world_size} ranks: give more")
    seqs = torch.from_numpy(seqs[rank::world_size][:per_rank].astype(np.int64))
    return [seqs[i:i + batch_size] for i in range(0, per_rank, batch_size)]


# -----------------------------------------------------------------------------
# CLI


def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}") from None
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s!r}")
    return v


def _add_config_args(ap: argparse.ArgumentParser, cls):
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            ap.add_argument(flag, type=typ, default=f.default, help=f"PruneConfig.{f.name} (default {f.default})")


def main(argv=None):
    ap = argparse.ArgumentParser(description="Prune a parent checkpoint to a child's shape (PAPER.md section 4).")
    ap.add_argument("--parent", required=True, help="parent checkpoint folder (Hugging Face or Mistral-native)")
    ap.add_argument("--out", required=True, help="output folder; written atomically in the Hugging Face format")
    ap.add_argument("--size", default=None, help="target preset: 14b, 8b, 3b (default: the parent's own shape)")
    ap.add_argument("--layers", type=_positive_int, default=None, help="override the target's n_layers")
    ap.add_argument("--dim", type=_positive_int, default=None, help="override the target's hidden dim")
    ap.add_argument("--ffn", type=_positive_int, default=None, help="override the target's FFN width")
    ap.add_argument("--calib", default=None, help="token ids: a .npy (1-D stream or 2-D rows), a data.py shard, "
                                                   "or a folder of shards (checked against the parent's tekken.json)")
    ap.add_argument("--calib-random", type=_positive_int, default=None, metavar="N",
                    help="N random-token sequences instead (smoke tests only: random text gives poor scores)")
    ap.add_argument("--calib-seqs", type=_positive_int, default=256, help="sequences to calibrate on")
    ap.add_argument("--seq-len", type=_positive_int, default=2048)
    ap.add_argument("--batch-size", type=_positive_int, default=4)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (under torchrun: each rank's own GPU)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                    help="compute and save dtype (default: the checkpoint's)")
    _add_config_args(ap, PruneConfig)
    a = ap.parse_args(argv)
    if (a.calib is None) == (a.calib_random is None):
        ap.error("give exactly one of --calib FILE (token ids) or --calib-random N")
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    device = a.device
    if world > 1:
        if device.startswith("cuda"):
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    try:
        if os.path.abspath(a.out) == os.path.abspath(a.parent):
            raise ValueError(f"--out {a.out} is the parent checkpoint: write the child to a new folder")
        cfg = PruneConfig(**{f.name: getattr(a, f.name) for f in dataclasses.fields(PruneConfig)})
        parent_args, _ = read_checkpoint_args(a.parent)
        target = resolve_target(parent_args, a.size, layers=a.layers, dim=a.dim, ffn=a.ffn,
                                multiple_of=cfg.multiple_of)  # fail fast, before reading any weight
        if a.calib is not None:
            tokens = read_token_file(a.calib, a.parent, parent_args.vocab_size)
        else:
            g = np.random.default_rng(cfg.seed)
            tokens = g.integers(0, parent_args.vocab_size, size=(a.calib_random, a.seq_len), dtype=np.int64)
        calib = calibration_batches(tokens, a.calib_seqs, a.seq_len, a.batch_size, rank, world)
        if rank == 0:
            print(json.dumps({"config": dataclasses.asdict(cfg), "target": dataclasses.asdict(target),
                              "run": {k: v for k, v in vars(a).items()
                                      if k not in {f.name for f in dataclasses.fields(PruneConfig)}}}))
        model = load_model(a.parent, dtype=getattr(torch, a.dtype) if a.dtype else None, device=device)
        model, report = prune(model, target, calib, cfg)
        if rank == 0:
            _save(model, report, a, cfg)
            L, h = report["layers"], report["hidden"]
            print(f"layers kept {len(L['kept'])}/{parent_args.n_layers} (dropped {L['dropped']}); hidden "
                  f"{h['parent_dim']} -> {h['dim']}, retained energy {h['retained_energy']:.4f}; FFN "
                  f"{parent_args.hidden_dim} -> {model.args.hidden_dim}; params {report['params']['parent']:,} -> "
                  f"{report['params']['child']:,}; {report['seconds']:.1f} s; wrote {a.out}")
    except (ValueError, TypeError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _save(model: Transformer, report: dict, a, cfg: PruneConfig):
    """The child checkpoint (HF format) with prune_report.json, prune_config.json and the parent's
    tokenizer files beside it; save_model writes into a temporary folder and renames it into place."""
    parent_dir = os.path.dirname(os.path.abspath(a.out))
    os.makedirs(parent_dir, exist_ok=True)
    extra, tmps = {}, []
    try:
        for name, obj in (("prune_report.json", report_to_json(report)),
                          ("prune_config.json", {"config": dataclasses.asdict(cfg), "run": vars(a)})):
            fd, tmp = tempfile.mkstemp(prefix=".prune-", suffix=".json", dir=parent_dir)
            tmps.append(tmp)
            with os.fdopen(fd, "w") as f:
                json.dump(obj, f)
            extra[name] = tmp
        for name in ("tekken.json", "tokenizer.json", "tokenizer_config.json"):
            if os.path.exists(os.path.join(a.parent, name)):
                extra[name] = os.path.join(a.parent, name)
        save_model(model, a.out, format="hf", extra_files=extra)
    finally:
        for tmp in tmps:
            os.remove(tmp)


if __name__ == "__main__":
    main()
