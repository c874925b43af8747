"""distill.py losses: fused_kl / fused_ce against their readable references, precision, accumulation, bad input."""
import pytest
import torch

import distill as D

N, V, DS, DT = 37, 101, 8, 12  # N prime: no chunk size below N divides it


def make(dtype=torch.float64, n=N, v=V, ds=DS, dt=DT, seed=0, logit_std=2.0, teacher_noise=None):
    """Student and teacher inputs with unequal widths. With teacher_noise the teacher's logits are the
    student's plus noise of that std (a student close to its teacher, as late in distillation)."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, ds, generator=g, dtype=torch.float64)
    ws = torch.randn(v, ds, generator=g, dtype=torch.float64) * logit_std / ds ** 0.5
    ht = torch.randn(n, dt, generator=g, dtype=torch.float64)
    wt = torch.randn(v, dt, generator=g, dtype=torch.float64) * logit_std / dt ** 0.5
    if teacher_noise is not None:  # teacher logits = student logits + noise, through a [ds + dt] head
        ht = torch.cat([hs, ht], 1)
        wt = torch.cat([ws, wt * teacher_noise / logit_std], 1)
    hs, ws, ht, wt = (x.to(dtype) for x in (hs, ws, ht, wt))
    return hs.requires_grad_(), ws.requires_grad_(), ht, wt


def grads(loss, *xs):
    return torch.autograd.grad(loss, xs, allow_unused=True)


def rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def random_mask(n=N, seed=1, p=0.7):
    return torch.rand(n, generator=torch.Generator().manual_seed(seed)) < p


def random_targets(n=N, v=V, seed=2):
    t = torch.randint(0, v, (n,), generator=torch.Generator().manual_seed(seed))
    t[::4] = -100
    return t


def assert_same(fused, ref, inputs, tol=1e-10):
    assert torch.allclose(fused, ref, rtol=tol, atol=tol), (fused.item(), ref.item())
    for a, b in zip(grads(fused, *inputs), grads(ref, *inputs)):
        assert torch.allclose(a, b, rtol=tol, atol=tol), float((a - b).abs().max())


# -- fused_kl == kl_reference (fp64) ----------------------------------------------------------------

MASKS = {
    "none": None,
    "random": random_mask(),
    "first_chunks_masked": torch.arange(N) >= 12,  # what would be two whole chunks of 5 (they are gathered out)
}


@pytest.mark.parametrize("chunk", [1, 5, 16, N, 64])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("mask", list(MASKS))
def test_fused_kl_matches_reference(chunk, temperature, mask):
    hs, ws, ht, wt = make()
    kw = dict(mask=MASKS[mask], temperature=temperature)
    assert_same(D.fused_kl(hs, ws, ht, wt, chunk_size=chunk, **kw), D.kl_reference(hs, ws, ht, wt, **kw), (hs, ws))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("ce_weight", [0.3, 1.0])
def test_fused_kl_with_ce_mix_matches_reference(temperature, ce_weight):
    hs, ws, ht, wt = make()
    kw = dict(mask=random_mask(), temperature=temperature, ce_weight=ce_weight, targets=random_targets())
    assert_same(D.fused_kl(hs, ws, ht, wt, chunk_size=5, **kw), D.kl_reference(hs, ws, ht, wt, **kw), (hs, ws))


def test_fused_kl_n_total_divides_the_sum():
    hs, ws, ht, wt = make()
    mask = random_mask()
    fused = D.fused_kl(hs, ws, ht, wt, mask=mask, chunk_size=5, n_total=100)
    assert_same(fused, D.kl_reference(hs, ws, ht, wt, mask=mask, n_total=100), (hs, ws))
    local = D.fused_kl(hs, ws, ht, wt, mask=mask, chunk_size=5)
    assert torch.allclose(fused * 100, local * int(mask.sum()))
    fused_t = D.fused_kl(hs, ws, ht, wt, mask=mask, n_total=torch.tensor(100))  # as all_reduce gives it
    assert torch.allclose(fused_t, fused)


def test_fully_masked_gives_zero_loss_and_zero_grads():
    hs, ws, ht, wt = make()
    none = torch.zeros(N, dtype=torch.bool)
    loss = D.fused_kl(hs, ws, ht, wt, mask=none)
    assert loss.item() == 0.0
    gh, gw = grads(loss, hs, ws)
    assert not gh.any() and not gw.any()
    loss = D.fused_ce(hs, ws, torch.full((N,), -100), chunk_size=4)
    assert loss.item() == 0.0
    assert not any(g.any() for g in grads(loss, hs, ws))


def test_identical_student_and_teacher_give_zero_kl():
    hs, ws, _, _ = make()
    loss = D.fused_kl(hs, ws, hs.detach(), ws.detach(), chunk_size=8)
    assert abs(loss.item()) < 1e-12
    assert all(g.abs().max() < 1e-12 for g in grads(loss, hs, ws))


def test_leading_dims_are_flattened():
    hs, ws, ht, wt = make(n=36)
    mask = random_mask(36)
    fused = D.fused_kl(hs.view(4, 9, DS), ws, ht.view(4, 9, DT), wt, mask=mask.view(4, 9), chunk_size=5)
    assert_same(fused, D.kl_reference(hs, ws, ht, wt, mask=mask), (hs, ws))


def test_inputs_without_grad():
    """Head frozen, or hidden states frozen, or no_grad: the loss is the same and only the needed
    gradients are computed."""
    hs, ws, ht, wt = make()
    ref = D.kl_reference(hs, ws, ht, wt)
    g_ref = grads(ref, hs, ws)
    loss = D.fused_kl(hs, ws.detach(), ht, wt, chunk_size=5)
    assert torch.allclose(grads(loss, hs)[0], g_ref[0], atol=1e-12)
    loss = D.fused_kl(hs.detach(), ws, ht, wt, chunk_size=5)
    assert torch.allclose(grads(loss, ws)[0], g_ref[1], atol=1e-12)
    with torch.no_grad():
        loss = D.fused_kl(hs, ws, ht, wt, chunk_size=5)
    assert loss.grad_fn is None and torch.allclose(loss, ref.detach())


def test_teacher_gets_no_gradient():
    hs, ws, ht, wt = make()
    ht.requires_grad_()
    wt.requires_grad_()
    D.fused_kl(hs, ws, ht, wt, chunk_size=5).backward()
    assert ht.grad is None and wt.grad is None and hs.grad is not None


def test_backward_scales_by_grad_output():
    hs, ws, ht, wt = make()
    g1 = grads(3.0 * D.fused_kl(hs, ws, ht, wt, chunk_size=5), hs, ws)
    g2 = grads(3.0 * D.kl_reference(hs, ws, ht, wt), hs, ws)
    assert all(torch.allclose(a, b, atol=1e-12) for a, b in zip(g1, g2))


# -- fused_ce == ce_reference -----------------------------------------------------------------------

@pytest.mark.parametrize("chunk", [1, 5, 64])
@pytest.mark.parametrize("mask", [None, "random"])
def test_fused_ce_matches_reference(chunk, mask):
    hs, ws, _, _ = make()
    tgt = random_targets()
    m = random_mask() if mask else None
    assert_same(D.fused_ce(hs, ws, tgt, mask=m, chunk_size=chunk), D.ce_reference(hs, ws, tgt, mask=m), (hs, ws))
    assert_same(D.fused_ce(hs, ws, tgt, mask=m, chunk_size=chunk, n_total=50),
                D.ce_reference(hs, ws, tgt, mask=m, n_total=50), (hs, ws))


def test_fused_ce_matches_torch_cross_entropy_mean():
    hs, ws, _, _ = make()
    tgt = random_targets()
    expected = torch.nn.functional.cross_entropy(hs @ ws.t(), tgt)  # mean over non-ignored targets
    assert torch.allclose(D.fused_ce(hs, ws, tgt, chunk_size=6), expected, atol=1e-12)


# -- precision: fp32 and bf16 -----------------------------------------------------------------------

def test_fp32_close_to_fp64():
    hs, ws, ht, wt = make(torch.float32, v=4099)
    ref = D.kl_reference(*(x.detach().double().requires_grad_() for x in (hs, ws)), ht.double(), wt.double())
    loss = D.fused_kl(hs, ws, ht, wt, chunk_size=8)
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    hs64, ws64 = (x.detach().double().requires_grad_() for x in (hs, ws))
    g_ref = grads(D.kl_reference(hs64, ws64, ht.double(), wt.double()), hs64, ws64)
    for a, b in zip(grads(loss, hs, ws), g_ref):
        assert rel_err(a, b) < 1e-4


def test_large_logits_are_stable():
    """Logits in the hundreds: exp would overflow fp32 without the max shift."""
    hs, ws, ht, wt = make(torch.float32, logit_std=300.0)
    hs64, ws64 = (x.detach().double().requires_grad_() for x in (hs, ws))
    ref = D.kl_reference(hs64, ws64, ht.double(), wt.double(), ce_weight=0.5, targets=random_targets())
    loss = D.fused_kl(hs, ws, ht, wt, chunk_size=5, ce_weight=0.5, targets=random_targets())
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    for a, b in zip(grads(loss, hs, ws), grads(ref, hs64, ws64)):
        assert rel_err(a, b) < 1e-4


def test_bf16_gradients_need_fp32_logits():
    """bf16 weights and activations: the fused loss (fp32 logits) stays within 1e-2 of an fp64 reference
    on the same bf16 values; rounding the logits to bf16 first (the naive bf16 loss) is several times worse.
    The gap is largest when the student is close to its teacher (small p_S - p_T)."""
    hs, ws, ht, wt = make(torch.bfloat16, n=64, v=2048, ds=64, dt=32, logit_std=4.0, teacher_noise=0.5)
    hs64, ws64 = (x.detach().double().requires_grad_() for x in (hs, ws))
    g_ref = grads(D.kl_reference(hs64, ws64, ht.double(), wt.double()), hs64, ws64)
    g_fused = grads(D.fused_kl(hs, ws, ht, wt, chunk_size=16), hs, ws)
    g_naive = grads(D.kl_reference(hs, ws, ht, wt), hs, ws)
    for f, n, r in zip(g_fused, g_naive, g_ref):
        assert f.dtype == torch.bfloat16
        assert rel_err(f, r) < 1e-2
        assert rel_err(n, r) > max(2e-2, 3 * rel_err(f, r))


def test_mixed_precision_gemm_path(monkeypatch):
    """The GPU path (bf16 operands, fp32 logits, a bf16 logit gradient for the gradient GEMMs, the head
    gradient accumulated in fp32), forced on the CPU where the fp32-output GEMM is emulated."""
    monkeypatch.setattr(D, "_mixed_gemm", lambda x: x.dtype in (torch.bfloat16, torch.float16))
    hs, ws, ht, wt = make(torch.bfloat16, n=64, v=2048, ds=64, dt=32, logit_std=4.0, teacher_noise=0.5)
    hs64, ws64 = (x.detach().double().requires_grad_() for x in (hs, ws))
    mask, tgt = random_mask(64), random_targets(64, 2048)
    for kw in (dict(temperature=1.5), dict(ce_weight=0.25, targets=tgt)):
        ref = D.kl_reference(hs64, ws64, ht.double(), wt.double(), mask=mask, **kw)
        loss = D.fused_kl(hs, ws, ht, wt, mask=mask, chunk_size=16, **kw)
        assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
        for a, b in zip(grads(loss, hs, ws), grads(ref, hs64, ws64)):
            assert a.dtype == torch.bfloat16 and rel_err(a, b) < 1e-2
    ref = D.ce_reference(hs64, ws64, tgt)
    loss = D.fused_ce(hs, ws, tgt, chunk_size=16)
    assert abs(loss.item() - ref.item()) < 1e-5 * ref.item()
    for a, b in zip(grads(loss, hs, ws), grads(ref, hs64, ws64)):
        assert rel_err(a, b) < 1e-2


# -- gradient accumulation --------------------------------------------------------------------------

def test_micro_batches_with_global_count_equal_one_batch():
    hs, ws, ht, wt = make()
    mask = random_mask()
    n_total = int(mask.sum())
    one = D.fused_kl(hs, ws, ht, wt, mask=mask, chunk_size=4)
    g_one = grads(one, hs, ws)
    total = 0.0
    for sl in (slice(0, 10), slice(10, 11), slice(11, N)):  # uneven micro-batches, one of a single token
        total = total + D.fused_kl(hs[sl], ws, ht[sl], wt, mask=mask[sl], chunk_size=4, n_total=n_total)
    assert torch.allclose(total, one, atol=1e-12)
    for a, b in zip(grads(total, hs, ws), g_one):
        assert torch.allclose(a, b, atol=1e-12)


# -- bad input --------------------------------------------------------------------------------------

def test_vocab_mismatch_names_both_sizes():
    hs, ws, ht, wt = make()
    with pytest.raises(ValueError, match=rf"V={V}.*V={V + 1}"):
        D.fused_kl(hs, ws, ht, torch.randn(V + 1, DT, dtype=wt.dtype))


@pytest.mark.parametrize("case,match", [
    ("width", "student_hidden has shape"),
    ("tokens", "teacher_hidden has 36 tokens"),
    ("mask_dtype", "mask must be bool"),
    ("no_targets", "pass targets"),
    ("bad_target", r"targets must lie in \[0, 101\)"),
    ("n_total_small", "n_total=3 is smaller"),
    ("temperature", "temperature must be > 0"),
])
def test_bad_input_is_one_clear_error(case, match):
    hs, ws, ht, wt = make()
    kw = {}
    if case == "width":
        hs = hs[:, :5]
    elif case == "tokens":
        ht = ht[:36]
    elif case == "mask_dtype":
        kw = dict(mask=torch.ones(N))
    elif case == "no_targets":
        kw = dict(ce_weight=0.5)
    elif case == "bad_target":
        kw = dict(ce_weight=0.5, targets=torch.full((N,), V))
    elif case == "n_total_small":
        kw = dict(n_total=3)
    elif case == "temperature":
        kw = dict(temperature=0.0)
    with pytest.raises(ValueError, match=match):
        D.fused_kl(hs, ws, ht, wt, **kw)


# -- GPU: the mixed-precision GEMM path (bf16 operands, fp32 logits and head gradient) ---------------

@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_bf16_matches_fp64_reference():
    hs, ws, ht, wt = make(torch.bfloat16, n=300, v=4096, ds=64, dt=96, teacher_noise=0.5)
    hs, ws, ht, wt = (x.detach().cuda() for x in (hs, ws, ht, wt))
    hs.requires_grad_()
    ws.requires_grad_()
    hs64, ws64 = (x.detach().double().requires_grad_() for x in (hs, ws))
    mask = random_mask(300).cuda()
    ref = D.kl_reference(hs64, ws64, ht.double(), wt.double(), mask=mask, temperature=1.5)
    loss = D.fused_kl(hs, ws, ht, wt, mask=mask, temperature=1.5, chunk_size=64)
    assert abs(loss.item() - ref.item()) < 1e-4 * ref.item()
    for a, b in zip(grads(loss, hs, ws), grads(ref, hs64, ws64)):
        assert a.dtype == torch.bfloat16 and rel_err(a, b) < 1e-2


def test_fp16_is_refused_with_a_clear_message():
    """fp16 underflows: the logit gradient is divided by T*n (n = 262144 at the long stage) and the hidden
    gradient comes back in fp16, 35% off without loss scaling. One clear error instead."""
    hs, ws, ht, wt = (torch.randn(4, 8, dtype=torch.float16), torch.randn(32, 8, dtype=torch.float16),
                      torch.randn(4, 8, dtype=torch.float16), torch.randn(32, 8, dtype=torch.float16))
    with pytest.raises(ValueError, match="fp16.*bf16 or fp32"):
        D.fused_kl(hs.requires_grad_(), ws, ht, wt, n_total=262144)
    with pytest.raises(ValueError, match="fp16"):
        D.fused_ce(hs, ws, torch.zeros(4, dtype=torch.long))
