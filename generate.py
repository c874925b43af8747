"""Fast rollouts: the sampling engine that GRPO (and online DPO) spend most of their time in.

Reading guide
-------------
Concept: RL post-training (PAPER.md section 8) alternates a rollout phase (sample G answers to each
prompt with the current policy, keep every sampled token's log-probability at the sampling
temperature) and one gradient step. Decoding one token per step is bound by reading the weights and
the KV cache, so the engine is built around that (gpt-fast's recipe, in plain PyTorch):

 1. Weights are gathered once per rollout phase into plain tensors (`RolloutWeights`), with q/k/v
    and gate/up fused into one matmul each. Under FSDP2 each sharded parameter is all-gathered once
    here (`DTensor.full_tensor`, a collective every rank joins) and the copy serves every prefill
    and decode step of the phase. The alternative, FSDP2's own unshard in the forward hooks, would
    all-gather every block at every decoded token (256 steps = 256 all-gathers of the model); the
    price of our choice is one full bf16 copy of the weights per rank while rolling out (7 GB for
    the 3B shape), freed after the phase. After an optimizer step call `refresh(model)`: it copies
    into the same buffers, so captured CUDA graphs stay valid.
 2. A static KV cache [L, N, K, S, E] for all N = prompts x G rows. Each prompt is prefilled ONCE
    (batched across prompts, ragged prompts left-padded with per-row RoPE positions and key mask,
    as model.generate does) and its keys/values are copied into its G rows.
 3. Decode: one token per row per step. On CUDA the step (all blocks + the head) is captured as one
    CUDA graph over the whole static cache (keys beyond the current slot are masked, so shapes never
    change); on the CPU it runs eagerly (`_Engine.decode`) and attends only to the filled part of the
    cache. At batch 8 on one core a step is ~170 small ops around 17 matmuls, and per-op cost, not
    arithmetic, is what separates it from HF, so decode is forward(T = 1) rewritten for op count: the
    attention is baddbmm / softmax / bmm with each KV head's query group as the bmm rows (no SDPA
    dispatch, no mask broadcast), the residual adds ride in addmm, RMSNorm is 3 ops, keys/values are
    written in place through views made once per batch size. A test holds it to forward() step by step.
 4. Finished rows stop: on the eager path, whenever half of the live rows have emitted EOS the
    batch is compacted (the live rows' cache is gathered into a smaller cache), so finished rows stop
    costing compute; the run ends as soon as every row is finished. The CUDA graph keeps its static
    batch (a finished row costs its share of the step; re-capturing per batch size is not worth it
    while weight reads, not rows, dominate the step) and checks for the end every `sync_every` steps.
 5. CPU matmuls use oneDNN with weights prepacked once per phase (`torch.ops.mkldnn._reorder_linear_weight`
    and `_linear_pointwise`, the ops torch.compile's CPU freezing pass emits). They are torch-internal
    ops, not a public API: the one exception to the project's "official APIs only", taken because MKL's
    sgemm is poor at 8 rows (benchmarks/README.md has the figures). A build without them, any dtype but fp32,
    or `prepack=False` uses plain `x @ W_t`; a self-check at start-up falls back on any mismatch, and a
    test holds the two paths equal. The decode step keeps oneDNN only for matmuls of >= 1024 output
    columns (the gate/up and the head here): below that its per-call cost outweighs the gain.
 6. Per-token log-probs are returned at the sampling temperature: log softmax(logits / T) of the
    sampled token (plain log softmax for greedy, T = 0), the quantity GRPO's ratio uses (section 8:
    "compute training log-probs at the sampling temperature"). With top_p < 1 the sample comes from
    the nucleus but the log-prob is still the full softmax's, which is what the trainer recomputes.

The readable reference is `generate_reference`: no cache, the full model forward on the whole
sequence for every new token. The tests require the engine to match it (greedy tokens exactly,
log-probs to tolerance) and model.generate's KV-cache path to match it too.

Run: `python generate.py --preset bench-cpu --batch 8 --prompt-len 32 --new 64` (random weights,
prints tok/s); the side-by-side benchmark with transformers is `python benchmarks/rollout_bench.py`.
Depends on: model.py.
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch.distributed.tensor import DTensor

from model import ModelArgs, Transformer, query_temperature, sample_next

# -----------------------------------------------------------------------------
# Config


@dataclass
class RolloutConfig:
    max_new_tokens: int = 256  # generation cap (section 8: Magistral raised 32K -> 80K; tiny here)
    group_size: int = 1  # G samples per prompt, contiguous in the output
    temperature: float = 1.0  # sampling temperature T; 0 = greedy
    top_p: float = 1.0  # nucleus; GRPO keeps 1.0 so the sampler and the trainer see the same distribution
    eos_id: Optional[int] = 2  # stop token (Tekken </s>); None = always max_new_tokens
    pad_id: int = 0  # written after a row's end
    seed: int = 0  # sampling generator seed
    cuda_graph: bool = True  # capture the decode step on CUDA (ignored on the CPU)
    compact: bool = True  # eager path: drop finished rows once half the live rows are done
    sync_every: int = 8  # CUDA path: check "all rows finished" every N steps (each check syncs)
    dtype: Optional[str] = None  # "bfloat16"/"float32" for the gathered weights and cache; None = the model's


@dataclass
class Rollouts:
    tokens: torch.Tensor  # [N, M] new tokens, pad_id after each row's end (EOS included when emitted)
    logprobs: torch.Tensor  # [N, M] fp32 log-prob of each new token at the sampling temperature, 0 after the end
    lengths: torch.Tensor  # [N] number of new tokens (EOS included)
    truncated: torch.Tensor  # [N] bool: hit max_new_tokens without EOS
    prompt_index: torch.Tensor  # [N] which prompt each row answers (rows of a prompt are contiguous)

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths.tolist())]


# -----------------------------------------------------------------------------
# Weights gathered once per rollout phase


class _Prepacked:
    """A CPU matmul weight prepacked into oneDNN's blocked layout (the op torch.compile's CPU freezing pass
    emits): at batch 8 it runs the wide matmuls faster than `x @ W_t` (MKL sgemm is poor at 8 rows). `x @ W_t` stays the reference; a test checks they agree."""

    def __init__(self, w_t: torch.Tensor):
        self.w_t = w_t  # kept: shape and dtype, and the reference path
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w_t.t().contiguous(), 8)

    def __rmatmul__(self, x):
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, None, "none", [], "")


def _can_prepack(device, dtype) -> bool:
    if torch.device(device).type != "cpu" or dtype != torch.float32 or not torch.backends.mkldnn.is_available():
        return False
    try:  # a build without these ops falls back to plain matmuls
        w = torch.randn(16, 8)
        return torch.allclose(torch.ones(2, 16) @ _Prepacked(w), torch.ones(2, 16) @ w, atol=1e-5)
    except (RuntimeError, AttributeError):
        return False


def _full(p: torch.Tensor) -> torch.Tensor:
    p = p.detach()
    return p.full_tensor() if isinstance(p, DTensor) else p  # all-gather of a sharded FSDP2 parameter


_MATMULS = ("wqkv", "wo", "w13", "w2", "head")


class RolloutWeights:
    """Plain tensors of the model in the inference dtype, q/k/v and gate/up fused (reading guide, 1)."""

    def __init__(self, model: Transformer, dtype: Optional[torch.dtype] = None, prepack: bool = True):
        self.args: ModelArgs = model.args
        p0 = model.embed_tokens.weight
        self.dtype = dtype or p0.dtype
        self.device = p0.device
        self.prepack = prepack and _can_prepack(self.device, self.dtype)  # CPU fp32 only
        self.layers: list[dict] = []
        self.refresh(model)

    @torch.no_grad()
    def refresh(self, model: Transformer):
        """Copy the model's current weights in (collective under FSDP2: call on every rank). Matmul weights
        are stored transposed, [in, out] contiguous: `x @ W_t` beat `F.linear(x, W)` on the
        CPU at batch 8 (the [8192, 256] head most), and is as fast on a GPU."""
        fresh = not self.layers or self.prepack  # prepacked weights are rebuilt (CPU: no graphs to keep valid)
        if fresh:
            self.layers = []
        for i, layer in enumerate(model.layers):
            a, m = layer.self_attn, layer.mlp
            w = {"ln1": _full(layer.input_layernorm.weight), "ln2": _full(layer.post_attention_layernorm.weight),
                 "wqkv": torch.cat([_full(a.q_proj.weight), _full(a.k_proj.weight), _full(a.v_proj.weight)]).t(),
                 "wo": _full(a.o_proj.weight).t(),
                 "w13": torch.cat([_full(m.gate_proj.weight), _full(m.up_proj.weight)]).t(),
                 "w2": _full(m.down_proj.weight).t()}
            self._store(w, None if fresh else self.layers[i], fresh)
        top = {"embed": _full(model.embed_tokens.weight), "norm": _full(model.norm.weight),
               "head": _full(model.lm_head.weight).t()}  # tied: a transposed copy of the embedding
        self._store(top, None if fresh else self.top, fresh)
        self.inv_freq = model.inv_freq.detach().float().to(self.device)

    def _store(self, new: dict, old: Optional[dict], fresh: bool):
        new = {k: v.to(device=self.device, dtype=self.dtype) for k, v in new.items()}
        if fresh:
            store = {k: v.contiguous().clone() if v.is_contiguous() else v.contiguous() for k, v in new.items()}
            if self.prepack:
                store = {k: _Prepacked(v) if k in _MATMULS else v for k, v in store.items()}
            if "embed" in new:
                self.top = store
            else:
                self.layers.append(store)
        else:
            for k, v in new.items():
                old[k].copy_(v)

    def nbytes(self) -> int:
        """Bytes one decode step must read: every weight once (the embedding is a row lookup)."""
        ts = [getattr(t, "w_t", t) for w in self.layers for t in w.values()]
        ts += [getattr(self.top[k], "w_t", self.top[k]) for k in ("norm", "head")]
        return sum(t.numel() * t.element_size() for t in ts)


# -----------------------------------------------------------------------------
# The forward on gathered weights (prefill: T = prompt length; decode: T = 1)


def _rms_decode(x_BD, w, eps_t):
    """RMSNorm in 3 small ops instead of F.rms_norm's CPU decomposition (7): x * rsqrt(|x|^2 / D + eps) * w.
    eps_t: eps as a 0-dim tensor of x's dtype. fp32 only (decode's CPU path); bf16 keeps _rms's fp32 order."""
    v_B1 = torch.linalg.vector_norm(x_BD, dim=-1, keepdim=True)
    return torch.addcmul(eps_t, v_B1, v_B1, value=1.0 / x_BD.shape[-1]).rsqrt_().mul(x_BD).mul_(w)


def _rms(x, w, eps):
    if x.dtype == torch.float32:  # one fused op; the same arithmetic as model.RMSNorm in fp32
        return F.rms_norm(x, (x.shape[-1],), w, eps)
    return F.rms_norm(x.float(), (x.shape[-1],), eps=eps).type_as(x) * w  # model.RMSNorm's order


class _Engine:
    """Cache, RoPE tables and the forward over RolloutWeights for one rollout call."""

    def __init__(self, W: RolloutWeights, n_rows: int, max_len: int):
        a = W.args
        self.W, self.a = W, a
        self.k = torch.zeros(a.n_layers, n_rows, a.n_kv_heads, max_len, a.head_dim, device=W.device, dtype=W.dtype)
        self.v = torch.zeros_like(self.k)
        freqs = torch.arange(max_len, device=W.device)[:, None].float() * W.inv_freq  # [S, E/2]
        att = a.yarn_attn_factor if a.yarn_factor is not None else 1.0
        # rotate_half(x) * sin == x.roll(E/2) * [-sin, sin]: one roll instead of chunk, neg and cat
        self.cos = (torch.cat([freqs, freqs], -1).cos() * att).to(W.dtype)  # [S, E]
        s = freqs.sin() * att
        self.sin_signed = torch.cat([-s, s], -1).to(W.dtype)
        self._views: dict = {}  # decode(): per batch size, the per-layer cache views
        self.eps = torch.tensor(a.norm_eps, dtype=W.dtype, device=W.device)  # decode()'s RMSNorm eps
        # decode()'s matmul weights: oneDNN's prepacked layout only where it pays at a few rows (reading guide, 5)
        self.dec_layers = [{k: _for_decode(v) for k, v in w.items()} for w in W.layers]

    def forward(self, tok_BT, pos_BT, mask_BTS, start, n_keys, slot_t=None):
        """Last-position logits [B, V] (fp32). Keys/values of these T tokens go to cache slots start..;
        slot_t (a tensor) replaces `start` inside a CUDA graph. Attention reads cache slots [0, n_keys).
        mask_BTS: bool (True = may attend) or additive float, broadcastable to [B, T, n_keys]."""
        W, a = self.W, self.a
        B, T = tok_BT.shape
        H, K, E = a.n_heads, a.n_kv_heads, a.head_dim
        cos = self.cos[pos_BT][:, :, None]  # [B, T, 1, E]
        sin = self.sin_signed[pos_BT][:, :, None]
        qscale_BT = query_temperature(pos_BT, a)
        x_BTD = F.embedding(tok_BT, W.top["embed"])
        for i, w in enumerate(W.layers):
            h_BTD = _rms(x_BTD, w["ln1"], a.norm_eps)
            qkv = h_BTD @ w["wqkv"]  # [B, T, (H + 2K) E]
            qk_BTXE = qkv[..., :(H + K) * E].view(B, T, H + K, E)
            qk_BTXE = qk_BTXE * cos + qk_BTXE.roll(E // 2, -1) * sin  # RoPE on q and k at once
            q_BHTE = qk_BTXE[:, :, :H].transpose(1, 2)
            k_BKTE = qk_BTXE[:, :, H:].transpose(1, 2)
            v_BKTE = qkv[..., (H + K) * E:].view(B, T, K, E).transpose(1, 2)
            if qscale_BT is not None:
                q_BHTE = q_BHTE * qscale_BT[:, None, :, None].to(q_BHTE.dtype)
            if slot_t is None:
                self.k[i, :B, :, start:start + T] = k_BKTE
                self.v[i, :B, :, start:start + T] = v_BKTE
            else:
                self.k[i].index_copy_(2, slot_t, k_BKTE)
                self.v[i].index_copy_(2, slot_t, v_BKTE)
            y_BHTE = F.scaled_dot_product_attention(q_BHTE, self.k[i, :B, :, :n_keys], self.v[i, :B, :, :n_keys],
                                                    attn_mask=mask_BTS[:, None], enable_gqa=True)
            x_BTD = x_BTD + y_BHTE.transpose(1, 2).reshape(B, T, H * E) @ w["wo"]
            h_BTD = _rms(x_BTD, w["ln2"], a.norm_eps)
            g_BTF, u_BTF = (h_BTD @ w["w13"]).chunk(2, -1)
            x_BTD = x_BTD + (F.silu(g_BTF) * u_BTF) @ w["w2"]
        h_BD = _rms(x_BTD[:, -1].contiguous(), W.top["norm"], a.norm_eps)
        return (h_BD @ W.top["head"]).float()

    def decode(self, tok_B, pos_B, bias_BKS, slot: int):
        """The eager decode step (one new token per row), written for op count: at batch 8 on the CPU a step
        is a few hundred small ops, so each one saved is time saved. Same arithmetic as forward(T=1), with
        three changes: attention is three batched matmuls over the filled slots [0, slot] (the KV heads'
        query groups as bmm rows: no SDPA dispatch, no mask broadcast), the residual adds are fused into
        the matmuls (addmm), and the small matmuls use plain `x @ W_t` (oneDNN's per-call cost exceeds its
        gain below the head's size; the prepacked head stays). bias_BKS: [B, K, >= slot + 1] additive key
        mask (0 or -inf, the padding of left-padded prompts), shared by all layers. Returns [B, V] fp32."""
        W, a = self.W, self.a
        B = tok_B.shape[0]
        H, K, E = a.n_heads, a.n_kv_heads, a.head_dim
        n = slot + 1
        views = self._views.get(B)
        if views is None:  # per layer: [B, K, S, E] cache rows (writes), keys as [B*K, E, S], values as [B*K, S, E]
            S = self.k.shape[3]
            views = self._views[B] = [(self.k[i, :B], self.k[i, :B].view(B * K, S, E).transpose(1, 2),
                                       self.v[i, :B], self.v[i, :B].view(B * K, S, E)) for i in range(a.n_layers)]
        cos, sin = self.cos[pos_B][:, None], self.sin_signed[pos_B][:, None]  # [B, 1, E]
        qscale_B = query_temperature(pos_B, a)
        bias = bias_BKS[:, :, :n].reshape(B * K, 1, n)
        scale = E ** -0.5
        fp32 = self.W.dtype == torch.float32
        eps = self.eps
        rms = _rms_decode if fp32 else (lambda x, w, _: _rms(x, w, a.norm_eps))
        x_BD = F.embedding(tok_B, W.top["embed"])
        for w, (k4, kT, v4, vc) in zip(self.dec_layers, views):
            qkv = rms(x_BD, w["ln1"], eps) @ w["wqkv"]  # [B, (H + 2K) E]
            qk = qkv[:, :(H + K) * E].view(B, H + K, E)
            qk = torch.addcmul(qk * cos, qk.roll(E // 2, -1), sin)  # RoPE on q and k at once
            k4.select(2, slot).copy_(qk[:, H:])
            v4.select(2, slot).copy_(qkv[:, (H + K) * E:].view(B, K, E))
            q = qk[:, :H].reshape(B * K, H // K, E)  # kv head j serves q heads j*H/K .. (j+1)*H/K-1
            if qscale_B is not None:
                q = q * qscale_B.repeat_interleave(K)[:, None, None].to(q.dtype)
            s = torch.baddbmm(bias, q, kT[:, :, :n], alpha=scale)  # [B*K, H/K, n]
            p = torch.softmax(s, -1) if fp32 else torch.softmax(s, -1, dtype=torch.float32).to(s.dtype)
            y_BD = torch.bmm(p, vc[:, :n]).view(B, H * E)
            x_BD = _addmm(x_BD, y_BD, w["wo"])
            g, u = (rms(x_BD, w["ln2"], eps) @ w["w13"]).chunk(2, -1)
            x_BD = _addmm(x_BD, F.silu(g).mul_(u), w["w2"])
        return (rms(x_BD, W.top["norm"], eps) @ W.top["head"]).float()

    def keep_rows(self, idx):
        """Compaction: rows idx of the cache move to the front (reading guide, 4)."""
        n = idx.numel()
        self.k[:, :n] = self.k[:, idx]
        self.v[:, :n] = self.v[:, idx]


def _for_decode(w, min_cols: int = 1024):
    """The plain [in, out] weight behind a prepacked one with fewer than min_cols output columns. At batch 8
    on the CPU oneDNN's per-call cost outweighs its gain below about a thousand columns (the qkv and o
    projections of rollout_bench.py's shape run faster as `x @ W_t`, the gate/up and the head prepacked)."""
    return w.w_t if isinstance(w, _Prepacked) and w.w_t.shape[1] < min_cols else w


def _addmm(x, y, w):
    """x + y @ w, one fused op when w is a plain tensor."""
    return x + y @ w if isinstance(w, _Prepacked) else torch.addmm(x, y, w)


def _pick(logits_BV, cfg: RolloutConfig, gen):
    """(token, its log-prob at the sampling temperature)."""
    tok_B = sample_next(logits_BV, cfg.temperature, cfg.top_p, gen)
    scaled = logits_BV / cfg.temperature if cfg.temperature > 0 else logits_BV
    logp_B = torch.log_softmax(scaled, -1).gather(-1, tok_B[:, None])[:, 0]
    return tok_B, logp_B


class _DecodeGraph:
    """The decode step captured as one CUDA graph over the whole static cache (reading guide, 3)."""

    def __init__(self, eng: _Engine, real_BS, n_keys: int):
        dev = real_BS.device
        B = real_BS.shape[0]
        self.tok = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.pos = torch.zeros(B, 1, dtype=torch.long, device=dev)
        self.slot = torch.zeros(1, dtype=torch.long, device=dev)
        keys = torch.arange(n_keys, device=dev)

        def step():
            mask_B1S = (real_BS[:, :n_keys] & (keys[None, :] <= self.slot))[:, None, :]
            return eng.forward(self.tok, self.pos, mask_B1S, None, n_keys, slot_t=self.slot)

        s = torch.cuda.Stream()  # warm up off the default stream, as torch.cuda.graphs asks
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(2):
                step()
        torch.cuda.current_stream().wait_stream(s)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step()

    def __call__(self, tok_B, pos_B, slot: int):
        self.tok[:, 0].copy_(tok_B)
        self.pos[:, 0].copy_(pos_B)
        self.slot.fill_(slot)
        self.graph.replay()
        return self.logits


# -----------------------------------------------------------------------------
# The rollout call


@torch.no_grad()
def rollout(weights: RolloutWeights, prompts: list[list[int]], cfg: RolloutConfig) -> Rollouts:
    """Sample cfg.group_size continuations of every prompt. Rows p*G .. p*G+G-1 answer prompt p."""
    a, dev = weights.args, weights.device
    G = cfg.group_size
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("rollout needs a non-empty list of non-empty prompts (token-id lists)")
    if G < 1 or cfg.max_new_tokens < 1:
        raise ValueError(f"group_size ({G}) and max_new_tokens ({cfg.max_new_tokens}) must be >= 1")
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    P, M = int(lens.max()), cfg.max_new_tokens
    if P + M > a.max_seq_len:
        raise ValueError(f"a prompt of {P} tokens plus max_new_tokens {M} exceeds the model's context "
                         f"({a.max_seq_len}): shorten or drop that prompt, or lower --max-new-tokens")
    n, N, S = len(prompts), len(prompts) * G, P + M
    eng = _Engine(weights, N, S)
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)

    # Prefill once per prompt (left-padded), then copy each prompt's keys/values into its G rows.
    pad_n = P - lens
    tok_nP = torch.zeros(n, P, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        tok_nP[b, P - len(p):] = torch.tensor(p, device=dev)
    slot = torch.arange(S, device=dev)
    real_nS = slot[None, :] >= pad_n[:, None]
    causal_PP = torch.ones(P, P, dtype=torch.bool, device=dev).tril()
    mask_nPP = (causal_PP[None] & real_nS[:, None, :P]) | torch.eye(P, dtype=torch.bool, device=dev)[None]
    pos_nP = (slot[None, :P] - pad_n[:, None]).clamp(min=0)
    logits_nV = eng.forward(tok_nP, pos_nP, mask_nPP, 0, P)
    if G > 1:  # rows 0..n-1 hold the prefill; row p*G+g gets prompt p's keys/values
        eng.k[:, :N, :, :P] = eng.k[:, :n, :, :P].repeat_interleave(G, 1)
        eng.v[:, :N, :, :P] = eng.v[:, :n, :, :P].repeat_interleave(G, 1)
    logits = logits_nV.repeat_interleave(G, 0)
    lens_N, real_NS = lens.repeat_interleave(G), real_nS.repeat_interleave(G, 0)

    # Live rows, in the order of the (possibly compacted) cache; `rows` maps them to output rows.
    rows = torch.arange(N, device=dev)
    tok_RM = torch.full((N, M), cfg.pad_id, dtype=torch.long, device=dev)
    logp_RM = torch.zeros(N, M, dtype=torch.float32, device=dev)
    len_R = torch.full((N,), M, dtype=torch.long, device=dev)
    done_R = torch.zeros(N, dtype=torch.bool, device=dev)
    bias_RKS = torch.zeros(N, a.n_kv_heads, S, device=dev, dtype=weights.dtype)  # key mask, one row per KV head
    bias_RKS.masked_fill_(~real_NS[:, None], float("-inf"))
    out = [torch.full_like(tok_RM, cfg.pad_id), torch.zeros_like(logp_RM), torch.full_like(len_R, M),
           torch.zeros_like(done_R)]

    def flush(idx):  # finished (or all remaining) live rows -> the outputs
        for o, src in zip(out, (tok_RM, logp_RM, len_R, done_R)):
            o[rows[idx]] = src[idx]

    graph = None
    if dev.type == "cuda" and cfg.cuda_graph and M > 1:
        graph = _DecodeGraph(eng, real_NS, S)
    for i in range(M):
        tok_B, logp_B = _pick(logits, cfg, gen)
        tok_RM[:, i] = tok_B
        logp_RM[:, i] = logp_B
        if cfg.eos_id is not None:
            ended = (tok_B == cfg.eos_id) & ~done_R
            len_R = torch.where(ended, i + 1, len_R)
            done_R |= ended
            if (graph is None or i % cfg.sync_every == cfg.sync_every - 1) and bool(done_R.all()):
                break
        if i == M - 1:
            break
        if graph is not None:
            logits = graph(tok_B, lens_N + i, P + i)
            continue
        if cfg.compact and cfg.eos_id is not None and 2 * int(done_R.sum()) >= rows.numel():
            flush(done_R.nonzero()[:, 0])
            keep = (~done_R).nonzero()[:, 0]
            eng.keep_rows(keep)
            rows, tok_B, lens_N, bias_RKS = rows[keep], tok_B[keep], lens_N[keep], bias_RKS[keep]
            tok_RM, logp_RM, len_R, done_R = tok_RM[keep], logp_RM[keep], len_R[keep], done_R[keep]
        logits = eng.decode(tok_B, lens_N + i, bias_RKS, P + i)
    flush(torch.arange(rows.numel(), device=dev))
    out_tok, out_logp, length, done_N = out
    # Everything after a row's EOS is padding (the static CUDA-graph batch kept sampling finished rows).
    after = torch.arange(M, device=dev)[None, :] >= length[:, None]
    out_tok.masked_fill_(after, cfg.pad_id)
    out_logp.masked_fill_(after, 0.0)
    return Rollouts(out_tok, out_logp, length, ~done_N, torch.arange(n, device=dev).repeat_interleave(G))


# -----------------------------------------------------------------------------
# The readable reference: no cache, the full forward for every new token


@torch.no_grad()
def generate_reference(model: Transformer, prompts: list[list[int]], cfg: RolloutConfig) -> Rollouts:
    """One prompt row at a time, recomputing model(all tokens so far) for every new token. Slow on
    purpose: it is what the engine must reproduce."""
    dev = model.embed_tokens.weight.device
    gen = torch.Generator(device=dev).manual_seed(cfg.seed)
    G, M = cfg.group_size, cfg.max_new_tokens
    N = len(prompts) * G
    out_tok = torch.full((N, M), cfg.pad_id, dtype=torch.long)
    out_logp = torch.zeros(N, M)
    length = torch.full((N,), M, dtype=torch.long)
    truncated = torch.ones(N, dtype=torch.bool)
    for r in range(N):
        seq = list(prompts[r // G])
        for i in range(M):
            logits_V = model(torch.tensor([seq], device=dev))[0, -1].float()
            tok, logp = _pick(logits_V[None], cfg, gen)
            out_tok[r, i], out_logp[r, i] = int(tok), float(logp)
            seq.append(int(tok))
            if cfg.eos_id is not None and int(tok) == cfg.eos_id:
                length[r], truncated[r] = i + 1, False
                break
    return Rollouts(out_tok, out_logp, length, truncated, torch.arange(len(prompts)).repeat_interleave(G))


# -----------------------------------------------------------------------------
# Decoding roofline: MBU against a per-device peak memory bandwidth table


PEAK_BANDWIDTH = [  # (substring of torch.cuda.get_device_name, bytes/s); unknown devices report None
    ("H200", 4.8e12), ("H100 PCIe", 2.0e12), ("H100 NVL", 3.9e12), ("H100", 3.35e12),
    ("A100-SXM4-80GB", 2.039e12), ("A100-PCIE-80GB", 1.935e12), ("A100", 1.555e12), ("L40S", 0.864e12),
]


def peak_bandwidth(device) -> Optional[float]:
    if torch.device(device).type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((bw for key, bw in PEAK_BANDWIDTH if key in name), None)


def decode_bytes_per_step(weights: RolloutWeights, batch: int, context: int) -> int:
    """The floor of one decode step: every weight once plus the keys/values of `context` slots per row."""
    a = weights.args
    kv = 2 * a.n_layers * batch * a.n_kv_heads * context * a.head_dim * torch.finfo(weights.dtype).bits // 8
    return weights.nbytes() + kv


def decode_flops_per_step(weights: RolloutWeights, batch: int, context: int) -> int:
    """The arithmetic of one decode step: 2 flops per matmul weight per row, plus q.k and p.v over `context` keys."""
    a = weights.args
    mats = sum(getattr(w[k], "w_t", w[k]).numel() for w in weights.layers for k in _MATMULS if k in w)
    mats += getattr(weights.top["head"], "w_t", weights.top["head"]).numel()
    return 2 * batch * mats + 4 * batch * a.n_layers * a.n_heads * a.head_dim * context


def mbu(bytes_per_step: int, seconds_per_step: float, device) -> Optional[float]:
    """Model bandwidth utilisation: floor bytes per step / step time / peak bandwidth (None if unknown)."""
    bw = peak_bandwidth(device)
    return None if bw is None else bytes_per_step / seconds_per_step / bw


# -----------------------------------------------------------------------------
# CLI


def main(argv=None):
    ap = argparse.ArgumentParser(description="Time the rollout engine on a randomly initialised preset.")
    ap.add_argument("--preset", default="bench-cpu")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--group-size", type=int, default=1)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = ap.parse_args(argv)
    args = ModelArgs.preset(a.preset)
    with torch.device("meta"):
        model = Transformer(args)
    model = model.to_empty(device=a.device).to(getattr(torch, a.dtype))
    if args.tied_embeddings:
        model.lm_head.weight = model.embed_tokens.weight  # to_empty does not keep the tie
    model.init_weights(0)
    W = RolloutWeights(model)
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(3, args.vocab_size, (a.batch, a.prompt_len), generator=g).tolist()
    cfg = RolloutConfig(max_new_tokens=a.new, group_size=a.group_size, temperature=a.temperature, eos_id=None)
    rollout(W, prompts, cfg)  # warm-up (and CUDA-graph capture)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    r = rollout(W, prompts, cfg)
    if a.device.startswith("cuda"):
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    print(dataclasses.asdict(cfg))
    print(f"{r.tokens.shape[0]} rows x {a.new} new tokens in {dt:.3f} s: {r.lengths.sum().item() / dt:,.0f} new tok/s")


if __name__ == "__main__":
    main()
