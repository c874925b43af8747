"""Logit distillation: the fused forward-KL loss, and the distillation stage built on it.

Reading guide
-------------
Concept: the student learns the teacher's next-token distribution. Per token
`KL(p_T || p_S) = sum_v p_T(v) (log p_T(v) - log p_S(v))`, with the temperature T dividing both
logit sets, summed over valid tokens and divided by the global number of valid tokens (PAPER.md
section 5). At V = 131072 the logits of a 16K-token batch do not fit, so the loss is fused with both
output heads and chunked over tokens: per chunk we compute fp32 logits, the loss, and the student's
gradients (hidden states and head weight) in the *forward*; the backward only scales them by the
incoming gradient. Memory is O(chunk x V) instead of O(tokens x V). The same machinery gives the
next-token cross-entropy used by pretraining and SFT (`fused_ce`).

Sections: the fused chunk loop shared by both losses, `fused_kl` + its reference `kl_reference`,
`fused_ce` + its reference `ce_reference`, then the distillation stage (section 5).

Deviations from the paper / choices where it is silent:
 1. No T^2 factor on the KL: PAPER.md gives the student logit gradient `(softmax(z_S/T) - p_T) / (T n)`,
    which is d/dz_S of the plain KL divided by n. Multiply the loss yourself if you want Hinton's T^2.
 2. Mixing with cross-entropy (the paper's ablation, which it found worse than KL alone):
    `loss = (1 - ce_weight) * KL + ce_weight * CE`. The CE is on the untempered student logits (T = 1,
    the usual convention), over the valid tokens whose target is not -100, and both terms are divided
    by the same n (so n counts valid tokens, not valid targets).
 3. n is `n_total` when given (the global count of valid tokens over micro-batches and ranks, so that
    summing the per-micro-batch losses gives the global mean) or the local count. A micro-batch with no
    valid token gives loss 0 and zero gradients instead of 0/0, so an all-prompt SFT micro-batch does
    not poison gradient accumulation.
 4. The teacher is frozen: its tensors are detached and get no gradient.
 5. Gradients are computed in the forward (like Liger-Kernel's fused losses), so calling the loss with
    grad enabled costs the backward GEMMs even if `.backward()` never comes; under `torch.no_grad()` or
    when no input requires grad, those GEMMs are skipped. The loss cannot be differentiated twice.
 6. fp32 logits from bf16 inputs: on CUDA the GEMMs ask for an fp32 output (`out_dtype`); the
    gradient GEMMs read a bf16 copy of the logit gradient and accumulate the head gradient in fp32.
    On the CPU (no mixed-dtype GEMM) the inputs are upcast once per call, which costs one fp32 copy of
    each head. fp64 inputs stay fp64 throughout (tests). fp16 is refused: the logit gradient is
    already divided by T*n, and at n = 262144 its entries (and the hidden-state gradient, which must
    come back in the input's dtype) fall below fp16's normal range; without loss scaling the input
    gradient was far off (benchmarks/README.md). bf16 has fp32's exponent range.
 7. Masked tokens are gathered out before the chunk loop, so they cost nothing.
 8. `TeacherCache` (optional, cascade.py turns it on): a teacher forward on a batch already seen returns
    the stored hidden states. In a cascade every size distils on the same batches from the same root
    teacher, so this removes most teacher forwards after the first size without changing a number.

Run: `python -m pytest tests/test_losses.py -q`; `python benchmarks/kl_bench.py` (or `python bench.py kl`)
times the fused loss against `kl_reference` (PAPER.md section 9 anchors).
Depends on: model.py, data.py and train.py for the stage; the losses above it use torch only, so they
copy out alone.

Shape letters: N tokens (flattened), C tokens in one chunk, V vocabulary,
D hidden width (student and teacher widths may differ).
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

# -----------------------------------------------------------------------------
# The fused chunk loop (shared by fused_kl and fused_ce)

# Logits per chunk: one fp32 [C, V] buffer of 2^24 elements on the CPU (three live at once: student,
# teacher, exp scratch), 2^26 on a GPU. A chunk is processed whole: row slabs for the elementwise passes
# gained nothing on an idle CPU and lost when other processes share the cores (kl_bench.py; the figures
# are in benchmarks/README.md), and small chunks keep memory lowest.
CPU_CHUNK_ELEMENTS = 2**24
GPU_CHUNK_ELEMENTS = 2**26

_HALF = (torch.float16, torch.bfloat16)


def default_chunk_size(vocab: int, device: torch.device) -> int:
    budget = GPU_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    return max(1, budget // vocab)


def _mixed_gemm(x: torch.Tensor) -> bool:
    """bf16/fp16 on CUDA: keep the operands in half precision and ask the GEMM for an fp32 output."""
    return x.is_cuda and x.dtype in _HALF


def _operand(x: torch.Tensor, logit_dtype: torch.dtype) -> torch.Tensor:
    return x if _mixed_gemm(x) else x.to(logit_dtype)


def _mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool = False) -> None:
    """out (+)= a @ b in out's dtype. Half-precision operands with an fp32 `out` use the GEMM's fp32
    output on CUDA (`out_dtype`); elsewhere (only tests force that path on the CPU) they are upcast."""
    if a.dtype != out.dtype and not a.is_cuda:
        a, b = a.to(out.dtype), b.to(out.dtype)
    if a.dtype == out.dtype:
        torch.addmm(out, a, b, beta=1 if accumulate else 0, out=out)
    elif accumulate:
        torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
    else:
        torch.mm(a, b, out_dtype=out.dtype, out=out)


def _logits_into(out_CV: torch.Tensor, h_CD: torch.Tensor, w_VD: torch.Tensor, scale: float) -> None:
    """out = scale * h @ w^T in fp32 (or fp64): rounding the logits to bf16 is what gives
    several-percent gradient errors (PAPER.md section 5)."""
    if h_CD.dtype == out_CV.dtype:
        torch.addmm(out_CV, h_CD, w_VD.t(), beta=0, alpha=scale, out=out_CV)  # [C, D] @ [D, V]
    else:
        _mm_into(out_CV, h_CD, w_VD.t())  # [C, D] @ [D, V], fp32 out
        if scale != 1.0:
            out_CV.mul_(scale)


def _loss_and_logit_grad(zs_CV, zt_CV, scratch_CV, g_CV, kl_coef, temperature, student_scaled,
                         tgt_C, ce_coef_C):
    """One chunk of C rows, in place. On entry zs holds the student logits (already divided by T when
    `student_scaled`), zt the teacher logits divided by T (or None: cross-entropy only). Writes
    d loss / d z_S for the raw student logits z_S = h W^T into g (zs itself, or the bf16 copy the GPU's
    gradient GEMMs read, written by the last pass) and returns the chunk's summed loss [fp64 scalar].
    zs, zt and scratch are clobbered.

    KL per row, with z' = z - max(z) and S = sum exp(z'):
        KL = sum_v p_T (z'_T - z'_S) - log S_T + log S_S,    p_T = exp(z'_T) / S_T
    which needs two exp passes and no log over the vocabulary.
    """
    ms_C1 = zs_CV.amax(1, keepdim=True)
    zs_CV.sub_(ms_C1)
    ce = tgt_C is not None
    if ce:
        idx_C1 = tgt_C.clamp(min=0).unsqueeze(1)  # -100 rows have ce_coef 0; any index will do
        ztgt_C = zs_CV.gather(1, idx_C1).squeeze(1)
    loss = torch.zeros((), dtype=torch.float64, device=zs_CV.device)
    if zt_CV is None:  # cross-entropy only: grad = (exp(z') - S onehot) * coef / S
        zs_CV.exp_()
        S_C = zs_CV.sum(1)
        loss += (ce_coef_C * (S_C.log() - ztgt_C)).sum()
        zs_CV.scatter_add_(1, idx_C1, -S_C.unsqueeze(1))
        torch.mul(zs_CV, (ce_coef_C / S_C).unsqueeze(1), out=g_CV)
        return loss

    et_CV = scratch_CV[0]
    mt_C1 = zt_CV.amax(1, keepdim=True)
    zt_CV.sub_(mt_C1)
    torch.exp(zt_CV, out=et_CV)  # unnormalised p_T
    St_C = et_CV.sum(1)
    if ce and not student_scaled:  # CE at T = 1 while the KL is at T != 1: one more softmax
        e1_CV = scratch_CV[1]
        torch.exp(zs_CV, out=e1_CV)
        S1_C = e1_CV.sum(1)
        loss += (ce_coef_C * (S1_C.log() - ztgt_C)).sum()
        zs_CV.mul_(1.0 / temperature)
    zt_CV.sub_(zs_CV).mul_(et_CV)  # p_T (z'_T - z'_S) * S_T, zt is dead after this
    A_C = zt_CV.sum(1)
    zs_CV.exp_()  # unnormalised softmax(z_S / T)
    Ss_C = zs_CV.sum(1)
    log_Ss_C = Ss_C.log()
    kl_C = A_C / St_C - St_C.log() + log_Ss_C
    loss += kl_coef * kl_C.sum()
    # d/dz_S: kl_coef/T (softmax(z_S/T) - p_T) + ce_coef (softmax(z_S) - onehot(target))
    a_C = (kl_coef / temperature) / Ss_C
    if ce and student_scaled:  # T == 1: both terms share softmax(z_S)
        loss += (ce_coef_C * (log_Ss_C - ztgt_C)).sum()
        a_C = a_C + ce_coef_C / Ss_C
    zs_CV.mul_(a_C.unsqueeze(1))
    if ce:
        if not student_scaled:
            zs_CV.addcmul_(e1_CV, (ce_coef_C / S1_C).unsqueeze(1))
        zs_CV.scatter_add_(1, idx_C1, -ce_coef_C.unsqueeze(1))
    torch.addcmul(zs_CV, et_CV, ((-kl_coef / temperature) / St_C).unsqueeze(1), out=g_CV)
    return loss


def _fused_loop(hs_ND, ws_VD, ht_ND, wt_VD, tgt_N, ce_coef_N, kl_coef, temperature, chunk_size,
                need_grad_h, need_grad_w):
    """The chunk loop over valid tokens only. Returns (loss, grad_h [N, D_s] in the hidden's dtype or None,
    grad_w [V, D_s] fp32/fp64 or None)."""
    n, V = hs_ND.shape[0], ws_VD.shape[0]
    dev = hs_ND.device
    logit_dtype = torch.promote_types(hs_ND.dtype, torch.float32)
    if ht_ND is not None:
        logit_dtype = torch.promote_types(logit_dtype, ht_ND.dtype)
    mixed = _mixed_gemm(hs_ND) and logit_dtype == torch.float32
    hs, ws = _operand(hs_ND, logit_dtype), _operand(ws_VD, logit_dtype)
    if ht_ND is not None:
        ht, wt = _operand(ht_ND, logit_dtype), _operand(wt_VD, logit_dtype)
    ce = tgt_N is not None
    student_scaled = ht_ND is not None and (not ce or temperature == 1.0)

    C = max(1, min(chunk_size, n))
    zs_CV = torch.empty(C, V, dtype=logit_dtype, device=dev)
    zt_CV = torch.empty(C, V, dtype=logit_dtype, device=dev) if ht_ND is not None else None
    n_scratch = 0 if ht_ND is None else (2 if ce and not student_scaled else 1)
    scratch_2CV = torch.empty(n_scratch, C, V, dtype=logit_dtype, device=dev)
    g16_CV = torch.empty(C, V, dtype=hs_ND.dtype, device=dev) if mixed and (need_grad_h or need_grad_w) else None
    grad_h = torch.empty(n, hs_ND.shape[1], dtype=hs_ND.dtype, device=dev) if need_grad_h else None
    grad_w = torch.zeros(V, hs_ND.shape[1], dtype=logit_dtype, device=dev) if need_grad_w else None
    loss = torch.zeros((), dtype=torch.float64, device=dev)

    for i in range(0, n, C):
        c = min(C, n - i)
        zs, h = zs_CV[:c], hs[i:i + c]
        _logits_into(zs, h, ws, 1.0 / temperature if student_scaled else 1.0)
        zt = None
        if ht_ND is not None:
            zt = zt_CV[:c]
            _logits_into(zt, ht[i:i + c], wt, 1.0 / temperature)
        g = g16_CV[:c] if g16_CV is not None else zs  # d loss / d z_S [c, V]
        loss += _loss_and_logit_grad(zs, zt, scratch_2CV[:, :c], g, kl_coef, temperature, student_scaled,
                                     tgt_N[i:i + c] if ce else None, ce_coef_N[i:i + c] if ce else None)
        if need_grad_h:  # [c, V] @ [V, D]
            if g.dtype == grad_h.dtype:
                torch.mm(g, ws, out=grad_h[i:i + c])
            else:
                grad_h[i:i + c] = g @ ws
        if need_grad_w:  # += [V, c] @ [c, D], accumulated in fp32
            _mm_into(grad_w, g.t(), h, accumulate=True)
    return loss.to(logit_dtype), grad_h, grad_w


class _FusedLinearLoss(torch.autograd.Function):
    """Loss and student gradients in the forward; the backward scales them by grad_output."""

    @staticmethod
    def forward(ctx, hs_ND, ws_VD, ht_ND, wt_VD, tgt_N, ce_coef_N, kl_coef, temperature, chunk_size,
                need_grad_h, need_grad_w):
        loss, grad_h, grad_w = _fused_loop(hs_ND, ws_VD, ht_ND, wt_VD, tgt_N, ce_coef_N, kl_coef,
                                           temperature, chunk_size, need_grad_h, need_grad_w)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.w_dtype = ws_VD.dtype
        return loss

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = None if grad_h is None else grad_h * grad_out  # 0-dim grad_out: keeps grad_h's dtype
        gw = None
        if grad_w is not None:  # scale and cast in one pass: no second fp32 [V, D] copy
            gw = torch.empty(grad_w.shape, dtype=ctx.w_dtype, device=grad_w.device)
            torch.mul(grad_w, grad_out, out=gw)
        return gh, gw, None, None, None, None, None, None, None, None, None


def _token_count(n_total, n_local: int) -> float:
    """The divisor n: the global count of valid tokens if given, else the local one (never 0)."""
    if n_total is None:
        return float(max(n_local, 1))
    n = float(n_total.item() if isinstance(n_total, torch.Tensor) else n_total)
    if n_local > 0 and n < n_local:
        raise ValueError(f"n_total={n:g} is smaller than the {n_local} valid tokens of this micro-batch; "
                         "pass the global count of valid tokens summed over micro-batches and ranks")
    return max(n, 1.0)


def _check_inputs(hidden, head, prefix, N=None):
    h, w = prefix + "hidden", prefix + "head"
    if head.dim() != 2:
        raise ValueError(f"{w} must be [V, D]; got shape {tuple(head.shape)}")
    if hidden.dim() < 2 or hidden.shape[-1] != head.shape[1]:
        raise ValueError(f"{h} has shape {tuple(hidden.shape)} but {w} is {tuple(head.shape)} ([V, D]); pass "
                         "[N, D] final-norm hidden states and the lm_head weight of the same model")
    if hidden.dtype != head.dtype:
        raise ValueError(f"{h} is {hidden.dtype} but {w} is {head.dtype}; cast one of them")
    if N is not None and hidden.numel() // hidden.shape[-1] != N:
        raise ValueError(f"{h} has {hidden.numel() // hidden.shape[-1]} tokens, expected {N} "
                         "(student and teacher must see the same tokens)")


def _check_targets(targets, N, V):
    if targets.dtype != torch.long:
        raise ValueError(f"targets must be int64 token ids (-100 = ignore); got {targets.dtype}")
    if targets.numel() != N:
        raise ValueError(f"targets has {targets.numel()} entries for {N} tokens")
    bad = ((targets >= V) | ((targets < 0) & (targets != -100))).any()
    if bool(bad):
        raise ValueError(f"targets must lie in [0, {V}) or be -100 (ignore)")


def _valid_rows(mask, N, device):
    if mask is None:
        return None
    if mask.dtype != torch.bool:
        raise ValueError(f"mask must be bool (True = valid token); got {mask.dtype}")
    if mask.numel() != N:
        raise ValueError(f"mask has {mask.numel()} entries for {N} tokens")
    return mask.reshape(-1).to(device)


@torch.compiler.disable  # a data-dependent Python loop: a compiled caller must not trace or unroll it
def _run(hs, ws, ht, wt, valid, tgt, kl_weight, ce_weight, n_total, temperature, chunk_size):
    """Gather valid rows, apply the Function, scatter the hidden gradient back through autograd."""
    if chunk_size is None:
        chunk_size = default_chunk_size(ws.shape[0], hs.device)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1; got {chunk_size}")
    if torch.float16 in (hs.dtype, ws.dtype, None if ht is None else ht.dtype):
        raise ValueError("fp16 inputs underflow in the fused loss (gradients of order 1/n fall below fp16's range, "
                         "deviation 6): pass bf16 or fp32 hidden states and heads")
    if valid is not None and not bool(valid.all()):
        idx = valid.nonzero().squeeze(1)
        hs = hs.index_select(0, idx)  # autograd scatters the gradient back into [N, D]
        ht = ht.index_select(0, idx) if ht is not None else None
        tgt = tgt.index_select(0, idx) if tgt is not None else None
    n_local = hs.shape[0]
    n = _token_count(n_total, n_local)
    ce_coef = None
    if tgt is not None:
        ce_coef = (tgt != -100).to(torch.promote_types(hs.dtype, torch.float32)) * (ce_weight / n)
    grad_on = torch.is_grad_enabled()
    return _FusedLinearLoss.apply(
        hs, ws, ht, wt, tgt, ce_coef, kl_weight / n, float(temperature), int(chunk_size),
        grad_on and hs.requires_grad, grad_on and ws.requires_grad)


# -----------------------------------------------------------------------------
# Forward KL (PAPER.md section 5), optionally mixed with cross-entropy


def fused_kl(student_hidden: torch.Tensor, student_head: torch.Tensor, teacher_hidden: torch.Tensor,
             teacher_head: torch.Tensor, mask: Optional[torch.Tensor] = None, temperature: float = 1.0,
             chunk_size: Optional[int] = None, n_total: Union[int, float, torch.Tensor, None] = None,
             ce_weight: float = 0.0, targets: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Forward KL(p_T || p_S) over valid tokens, divided by n_total (or the local valid count).

    student_hidden [N, D_s] (or [..., D_s]), student_head [V, D_s], teacher_hidden [N, D_t], teacher_head
    [V, D_t]; mask bool [N] (True = valid); targets int64 [N] (-100 = ignore), needed when ce_weight > 0.
    chunk_size: tokens per chunk (default: about 2^25 logits on the CPU, 2^26 on a GPU).
    Returns a 0-dim fp32 tensor (fp64 for fp64 inputs). Conventions (no T^2, the CE mix, n, empty
    micro-batches): see the module docstring."""
    if student_head.dim() != 2 or teacher_head.dim() != 2:
        raise ValueError("student_head and teacher_head must be [V, D] lm_head weights")
    if student_head.shape[0] != teacher_head.shape[0]:
        raise ValueError(f"vocabulary mismatch: student_head has V={student_head.shape[0]} rows, teacher_head has "
                         f"V={teacher_head.shape[0]}; both models must share one tokenizer (Tekken, 131072)")
    _check_inputs(student_hidden, student_head, "student_")
    N = student_hidden.numel() // student_hidden.shape[-1]
    _check_inputs(teacher_hidden, teacher_head, "teacher_", N)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if not 0.0 <= ce_weight <= 1.0:
        raise ValueError(f"ce_weight must lie in [0, 1]; got {ce_weight}")
    V = student_head.shape[0]
    hs = student_hidden.reshape(N, -1)
    ht = teacher_hidden.detach().reshape(N, -1)
    wt = teacher_head.detach()
    tgt = None
    if ce_weight > 0:
        if targets is None:
            raise ValueError("ce_weight > 0 mixes in next-token cross-entropy: pass targets (int64 [N], -100 = ignore)")
        _check_targets(targets, N, V)
        tgt = targets.reshape(-1).to(hs.device)
    if ce_weight == 1.0:  # pure CE: the teacher is not needed
        ht = wt = None
    valid = _valid_rows(mask, N, hs.device)
    return _run(hs, student_head, ht, wt, valid, tgt, 1.0 - ce_weight, ce_weight, n_total, temperature, chunk_size)


def kl_reference(student_hidden, student_head, teacher_hidden, teacher_head, mask=None, temperature=1.0,
                 n_total=None, ce_weight=0.0, targets=None):
    """The equation on full [N, V] logits with plain autograd (readable, O(N x V) memory).
    Logits are computed in the input dtype (bf16 inputs give bf16-rounded logits), then upcast."""
    up = lambda z: z.to(torch.promote_types(z.dtype, torch.float32))
    z_s = up(student_hidden.reshape(-1, student_hidden.shape[-1]) @ student_head.t())  # [N, V]
    with torch.no_grad():
        z_t = up(teacher_hidden.reshape(-1, teacher_hidden.shape[-1]) @ teacher_head.t())  # [N, V]
    log_p_s = F.log_softmax(z_s / temperature, dim=-1)
    log_p_t = F.log_softmax(z_t / temperature, dim=-1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)  # [N]
    valid = torch.ones_like(kl, dtype=torch.bool) if mask is None else mask.reshape(-1)
    n = float(n_total) if n_total is not None else max(int(valid.sum()), 1)
    loss = kl[valid].sum() / n
    if ce_weight > 0:
        tgt = targets.reshape(-1).masked_fill(~valid, -100)
        ce = F.cross_entropy(z_s, tgt, ignore_index=-100, reduction="sum") / n
        loss = (1 - ce_weight) * loss + ce_weight * ce
    return loss


# -----------------------------------------------------------------------------
# Next-token cross-entropy on the same machinery (pretraining, SFT)


def fused_ce(hidden: torch.Tensor, head: torch.Tensor, targets: torch.Tensor, mask: Optional[torch.Tensor] = None,
             chunk_size: Optional[int] = None,
             n_total: Union[int, float, torch.Tensor, None] = None) -> torch.Tensor:
    """Sum over valid tokens of -log softmax(h W^T)[target], divided by n_total or the local count.
    A token is valid when its target is not -100 and mask (if given) is True."""
    _check_inputs(hidden, head, "")
    N = hidden.numel() // hidden.shape[-1]
    V = head.shape[0]
    _check_targets(targets, N, V)
    hs = hidden.reshape(N, -1)
    tgt = targets.reshape(-1).to(hs.device)
    valid = tgt != -100
    m = _valid_rows(mask, N, hs.device)
    if m is not None:
        valid = valid & m
    return _run(hs, head, None, None, valid, tgt, 0.0, 1.0, n_total, 1.0, chunk_size)


def ce_reference(hidden, head, targets, mask=None, n_total=None):
    """F.cross_entropy on full [N, V] logits (upcast to at least fp32), summed and divided by n."""
    z = hidden.reshape(-1, hidden.shape[-1]) @ head.t()  # [N, V]
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    tgt = targets.reshape(-1)
    if mask is not None:
        tgt = tgt.masked_fill(~mask.reshape(-1), -100)
    n = float(n_total) if n_total is not None else max(int((tgt != -100).sum()), 1)
    return F.cross_entropy(z, tgt, ignore_index=-100, reduction="sum") / n


# ---- the distillation stage (section 5) ----
#
# The stage: a frozen teacher, a trainable student, forward KL on every valid token, through train.py's
# loop. Choices where the paper is silent:
#  S1. The teacher runs first, under no_grad, and hands over its final-norm hidden states; its lm_head
#      weight is read as a plain tensor (sharded, FSDP2 leaves the root gathered after forward; a
#      DTensor head would be gathered here). The fused KL then runs inside the student's forward via
#      head_fn; afterwards the teacher's root is resharded (`_release`), so between micro-batches the
#      teacher holds 1/N of every parameter per rank (train.py reading guide, item 3).
#  S2. Long context (Algorithm 1's second distill): the student switches to YaRN (factor s, original
#      length L) plus the query temperature (beta, same L) before training, and is exported that way.
#      The teacher is left alone while the sequence fits its max_seq_len; beyond it the teacher gets
#      plain YaRN (factor seq_len / max_seq_len, original length = its max_seq_len, no query
#      temperature: MS3.1 has none) for the duration of the stage only, then is restored.
#  S3. Teacher forward FLOPs are passed to train() separately, so MFU counts the hardware's work.
#  S4. bf16 at world size 1 (autocast, no FSDP) hands the fused op bf16 student hidden states and head,
#      as FSDP2's mixed precision does when sharded: one process takes the same bf16-in, fp32-out path.
# Run: `python distill.py --student PATH --teacher PATH --data TOKENS --out DIR [--long-context ...]`;
# `--loss ce` pretrains without a teacher. Depends on (this section): model.py, data.py, train.py.

# stage imports
import dataclasses
import hashlib
import os

from dataclasses import dataclass

import torch.distributed as dist
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from data import PackedLoader, load_tokens
from model import Transformer, flops_per_token
from train import (TrainConfig, TrainingDiverged, build_model, configs_from_args, exit_process, run_main,
                   setup_distributed, teardown_distributed, train)


@dataclass
class DistillConfig:
    loss: str = "kl"  # "kl": forward KL to the teacher (section 5); "ce": next-token CE, no teacher
    temperature: float = 1.0  # T, divides both logit sets (section 5)
    ce_weight: float = 0.0  # mix (1-w) KL + w CE; paper: KL alone (w = 0) was best
    chunk_size: Optional[int] = None  # tokens per fused-loss chunk; None = stage_chunk_size's choice
    long_seq_len: Optional[int] = None  # CLI: sequence length of the long-context stage (paper 262144)
    long_yarn_factor: float = 16.0  # YaRN factor s of the long stage (section 2)
    long_original_max_pos: int = 16384  # L: the short stage's context, YaRN's and the query temperature's
    long_qtemp_beta: float = 0.1  # query temperature beta (section 2)


def stage_chunk_size(cfg: DistillConfig, vocab: int, device: torch.device) -> int:
    """cfg.chunk_size, else the fused op's default, capped on the CPU at max(256, 2^22 / V) tokens. The op's
    CPU budget (2^25 logits) is tuned at V 131072 (256 tokens, unchanged here); at small vocabularies it
    makes one chunk of thousands of tokens, which was both slower and larger at V 8192 than a few hundred
    tokens (train_bench.py; figures in benchmarks/README.md)."""
    if cfg.chunk_size is not None:
        return cfg.chunk_size
    default = default_chunk_size(vocab, device)
    return default if device.type == "cuda" else min(default, max(256, 2**22 // vocab))


def _plain(w: torch.Tensor) -> torch.Tensor:
    return w.full_tensor() if isinstance(w, DTensor) else w


def _release(teacher: Transformer) -> None:
    """Free the sharded teacher's gathered root (embedding, final norm, head) once the student's fused loss
    has read the head (S1): FSDP2 keeps a root gathered after forward, waiting for a backward that a frozen
    teacher never runs. Between micro-batches every teacher parameter is then its 1/N shard."""
    if isinstance(teacher, FSDPModule):
        teacher.reshard()


class TeacherCache:
    """The frozen teacher's final hidden states, memoised by input batch. A cascade distils every size from
    the same root teacher on the same batches (each stage's loader has the same seed) and evaluates every
    row on the same held-out windows, so after the first size most teacher forwards repeat one already
    done. The key is the input ids' bytes and shape, the teacher's args (the long stage may switch its
    RoPE) and the autocast dtype; the value is exactly what the forward returned. Entries are added until
    `max_bytes` is reached, then the cache only reads. Attach with `attach_teacher_cache`; a teacher with
    none runs its forward every time."""

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes, self.hits, self.misses = max_bytes, 0, 0, 0
        self.store: dict = {}

    def hidden(self, teacher: Transformer, inputs_BT: torch.Tensor) -> torch.Tensor:
        dev = inputs_BT.device.type
        key = (hashlib.sha1(inputs_BT.detach().cpu().numpy().tobytes()).hexdigest(), tuple(inputs_BT.shape),
               repr(teacher.args), torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None)
        hit = key in self.store
        if isinstance(teacher, FSDPModule) and dist.is_initialized():
            # a sharded teacher's forward is a collective: every rank runs it, or none does
            flag = torch.tensor([int(hit)], device=inputs_BT.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
            hit = bool(flag.item())
        if hit:
            self.hits += 1
            return self.store[key]
        self.misses += 1
        h_BTD = teacher(inputs_BT, return_hidden=True)
        size = h_BTD.numel() * h_BTD.element_size()
        if key not in self.store and self.bytes + size <= self.max_bytes:
            self.store[key], self.bytes = h_BTD, self.bytes + size
        return h_BTD


def attach_teacher_cache(teacher: Transformer, max_mb: int) -> Optional[TeacherCache]:
    """Give the (frozen) teacher a TeacherCache of at most max_mb MiB; 0 removes it."""
    teacher.hidden_cache = TeacherCache(max_mb * 2**20) if max_mb > 0 else None
    return teacher.hidden_cache


@torch.no_grad()
def teacher_hidden(teacher: Transformer, inputs_BT: torch.Tensor) -> torch.Tensor:
    """The teacher's final hidden states for a batch, through its TeacherCache when it has one."""
    cache = getattr(teacher, "hidden_cache", None)
    return cache.hidden(teacher, inputs_BT) if cache is not None else teacher(inputs_BT, return_hidden=True)


def _compute_dtype(h_BTD: torch.Tensor, W_VD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's final hidden states and head in the compute dtype (S4). Sharded, FSDP2's mixed
    precision already gives bf16; unsharded, train.py's autocast leaves both fp32 (the residual stream
    and the master weight), and the fused op would then upcast the bf16 teacher head (an fp32 copy of
    V x D per micro-batch, 2.7 GB at 24B) and run fp32 GEMMs. Autograd casts the gradients back."""
    dev = h_BTD.device.type
    if torch.is_autocast_enabled(dev):
        dt = torch.get_autocast_dtype(dev)
        return h_BTD.to(dt), W_VD.to(dt)
    return h_BTD, W_VD


def kl_loss_fn(teacher: Transformer, cfg: DistillConfig):
    """loss_fn for train(): KL(p_T || p_S) summed over valid targets / n_total (optionally mixed with CE)."""
    if cfg.loss != "kl":
        raise ValueError(f"kl_loss_fn needs DistillConfig.loss 'kl', got {cfg.loss!r}")

    def loss_fn(student, inputs_BT, targets_BT, n_total):
        t_hidden_BTD = teacher_hidden(teacher, inputs_BT)
        t_head_VD = _plain(teacher.lm_head.weight)
        valid_N = targets_BT.flatten() != -100

        def head(h_BTD, W_VD):
            h_BTD, W_VD = _compute_dtype(h_BTD, W_VD)
            return fused_kl(h_BTD.flatten(0, 1), W_VD, t_hidden_BTD.flatten(0, 1), t_head_VD, mask=valid_N,
                            temperature=cfg.temperature, chunk_size=stage_chunk_size(cfg, W_VD.shape[0], h_BTD.device),
                            n_total=n_total, ce_weight=cfg.ce_weight,
                            targets=targets_BT.flatten() if cfg.ce_weight > 0 else None)
        loss = student(inputs_BT, head_fn=head)
        _release(teacher)
        return loss
    return loss_fn


def ce_loss_fn(cfg: DistillConfig):
    """loss_fn for train(): next-token cross-entropy / n_total (pretraining, baselines)."""
    def head(h_BTD, W_VD, targets_BT, n_total):
        h_BTD, W_VD = _compute_dtype(h_BTD, W_VD)
        return fused_ce(h_BTD.flatten(0, 1), W_VD, targets_BT.flatten(),
                        chunk_size=stage_chunk_size(cfg, W_VD.shape[0], h_BTD.device), n_total=n_total)

    def loss_fn(model, inputs_BT, targets_BT, n_total):
        return model(inputs_BT, head_fn=lambda h_BTD, W_VD: head(h_BTD, W_VD, targets_BT, n_total))
    return loss_fn


def check_vocab(student: Transformer, teacher: Transformer):
    vs, vt = student.args.vocab_size, teacher.args.vocab_size
    if vs != vt:
        raise ValueError(f"vocabulary mismatch: the student has {vs} tokens, the teacher {vt}; logit distillation "
                         f"needs one tokenizer: prune/convert the student from a parent with the teacher's vocabulary")


def long_context_args(args, cfg: DistillConfig):
    """The student's ModelArgs for the long-context stage: YaRN + query temperature (S2)."""
    L = cfg.long_original_max_pos
    return dataclasses.replace(args, yarn_factor=float(cfg.long_yarn_factor), yarn_original_max_pos=L,
                       qtemp_beta=cfg.long_qtemp_beta or None, qtemp_original_max_pos=L,
                       max_seq_len=int(round(L * cfg.long_yarn_factor)))


def distill(student: Transformer, teacher: Transformer, loader, train_cfg: TrainConfig, distill_cfg: DistillConfig, *,
            device, long_context: bool = False, eval_fn=None, name: Optional[str] = None) -> dict:
    """Train the student on KL(teacher || student) with train(); returns train()'s result dict.
    Both models must already be parallelized (or plain, at world size 1)."""
    check_vocab(student, teacher)
    teacher.eval()
    teacher.requires_grad_(False)
    seq = train_cfg.seq_len
    teacher_args = teacher.args
    try:  # every change to the teacher happens inside: an error anywhere below restores it
        if long_context:
            student.args = long_context_args(student.args, distill_cfg)
            student.reset_buffers()
            if teacher.args.yarn_factor is None and seq > teacher.args.max_seq_len:  # S2: this stage only
                teacher.args = dataclasses.replace(teacher.args, yarn_factor=seq / teacher.args.max_seq_len,
                                                   yarn_original_max_pos=teacher.args.max_seq_len, max_seq_len=seq)
                teacher.reset_buffers()
        if seq > student.args.max_seq_len:
            raise ValueError(f"seq_len {seq} exceeds the student's max_seq_len {student.args.max_seq_len}: "
                             f"{'raise --long-yarn-factor' if long_context else 'use --long-context'} or shorten "
                             f"--seq-len")
        return train(student, loader, kl_loss_fn(teacher, distill_cfg), train_cfg, device=device, eval_fn=eval_fn,
                     name=name or ("distill-long" if long_context else "distill"),
                     teacher_flops_per_token=flops_per_token(teacher.args, seq, training=False),
                     run_info={"distill": dataclasses.asdict(distill_cfg), "long_context": long_context,
                               "teacher_args": dataclasses.asdict(teacher.args)})
    finally:
        if teacher.args is not teacher_args:
            teacher.args = teacher_args
            teacher.reset_buffers()


@torch.no_grad()
def evaluate_pair(student: Transformer, teacher: Optional[Transformer], loader, n_batches: int) -> dict:
    """Held-out next-token CE of the student and KL(teacher || student), token-weighted over
    loader.batch(0..n_batches-1) and all ranks, with the fused ops (teacher None: CE only)."""
    device = next(student.parameters()).device
    modes = [(m, m.training) for m in (student, teacher) if m is not None]
    for m, _ in modes:
        m.eval()
    batches = [loader.batch(i) for i in range(n_batches)]
    counts = torch.tensor([sum(int((torch.as_tensor(y) != -100).sum()) for _, y in batches)], dtype=torch.float64,
                          device=device)
    if dist.is_initialized():
        dist.all_reduce(counts)
    n = max(int(counts.item()), 1)  # every term below is already divided by the global count
    totals = torch.zeros(2, dtype=torch.float64, device=device)  # ce, kl
    for x, y in batches:
        x_BT, y_BT = torch.as_tensor(x).to(device), torch.as_tensor(y).to(device)
        valid_N = y_BT.flatten() != -100
        if teacher is not None:
            t_hidden_BTD = teacher_hidden(teacher, x_BT)
            t_head_VD = _plain(teacher.lm_head.weight)

        def head(h_BTD, W_VD):
            ce = fused_ce(h_BTD.flatten(0, 1), W_VD, y_BT.flatten(), n_total=n)
            kl = (fused_kl(h_BTD.flatten(0, 1), W_VD, t_hidden_BTD.flatten(0, 1), t_head_VD, mask=valid_N, n_total=n)
                  if teacher is not None else torch.zeros(()))
            return ce, kl

        ce, kl = student(x_BT, head_fn=head)
        if teacher is not None:
            _release(teacher)
        totals[0] += float(ce)
        totals[1] += float(kl)
    if dist.is_initialized():
        dist.all_reduce(totals)
    for m, was in modes:
        m.train(was)
    out = {"ce": float(totals[0]), "tokens": int(counts.item())}
    if teacher is not None:
        out["kl"] = float(totals[1])
    return out


@dataclass
class DistillRun:
    student: str = "tiny"  # checkpoint folder (HF or native) or a model.py preset (fresh init)
    teacher: Optional[str] = None  # checkpoint folder; required for --loss kl
    data: str = ""  # token file or shard folder (data.py's load_tokens)
    val_data: Optional[str] = None  # held-out tokens for evaluate_pair at eval time
    eval_batches: int = 8  # held-out micro-batches per evaluation
    long_context: bool = False  # the second distill of Algorithm 1: YaRN + query temperature


def main(argv=None) -> int:
    tcfg, dcfg, run = configs_from_args([TrainConfig, DistillConfig, DistillRun], argv,
                                        description="Logit distillation (PAPER.md section 5) with train.py's loop.")

    def stage() -> int:
        nonlocal tcfg
        if dcfg.loss not in ("kl", "ce"):
            raise ValueError(f"--loss must be kl or ce, got {dcfg.loss!r}")
        if dcfg.loss == "kl" and (run.teacher is None or not os.path.isdir(run.teacher)):
            raise FileNotFoundError(f"teacher checkpoint folder {run.teacher!r} not found: pass --teacher PATH to a "
                                    f"Hugging Face or Mistral-native checkpoint (or --loss ce to train without one)")
        for flag, path in (("--data", run.data), ("--val-data", run.val_data)):
            if path is not None and not os.path.exists(path):
                raise FileNotFoundError(f"{flag} {path!r} does not exist: write tokens with `python data.py ...`")
        if run.long_context and dcfg.long_seq_len:
            tcfg = dataclasses.replace(tcfg, seq_len=dcfg.long_seq_len)
        rank, world, _, device = setup_distributed()
        student = build_model(run.student, tcfg, device, train=True)
        teacher = build_model(run.teacher, tcfg, device, train=False) if dcfg.loss == "kl" else None
        if teacher is not None:
            check_vocab(student, teacher)
        V = student.args.vocab_size  # shard headers name their vocabulary: no scan of the ids
        loader = PackedLoader(load_tokens(run.data, max_vocab=V), tcfg.micro_batch_size, tcfg.seq_len,
                              seed=tcfg.seed, rank=rank, world_size=world)
        eval_fn = None
        if run.val_data:
            val = PackedLoader(load_tokens(run.val_data, max_vocab=V), tcfg.micro_batch_size, tcfg.seq_len,
                               seed=tcfg.seed + 1, rank=rank, world_size=world)
            eval_fn = lambda m: evaluate_pair(m, teacher, val, run.eval_batches)
        if teacher is None:
            if run.long_context:
                student.args = long_context_args(student.args, dcfg)
                student.reset_buffers()
            train(student, loader, ce_loss_fn(dcfg), tcfg, device=device, eval_fn=eval_fn, name="pretrain",
                  run_info={"distill": dataclasses.asdict(dcfg), "run": dataclasses.asdict(run)})
        else:
            distill(student, teacher, loader, tcfg, dcfg, device=device, long_context=run.long_context,
                    eval_fn=eval_fn)
        teardown_distributed()
        return 0

    # every rank prints its own error once and leaves at once: no peer waits for it (train.run_main)
    return run_main(stage, expected=(ValueError, FileNotFoundError, TrainingDiverged))  # CheckpointError: ValueError


if __name__ == "__main__":
    exit_process(main())  # under torchrun: leave without interpreter finalization (see there)
