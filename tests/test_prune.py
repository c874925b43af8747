"""prune.py: statistics vs a naive recomputation, exact rotation, the slicing correction, layer and FFN
surgery, the re-tie policy, the CLI round trip, the real-size targets and bad input."""
import copy
import dataclasses
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model as M
import prune as P
from model import ModelArgs, Transformer

BOS, PAD = 1, 11


def tiny(**kw):  # dim 64, 4/2 heads x 16, FFN 192, vocab 512
    return dataclasses.replace(ModelArgs.preset("tiny"), **kw)


def build(args, seed=0, dtype=torch.float32, std=0.1):
    """A random model whose norm weights are not 1, so that folding them matters."""
    m = Transformer(args)
    m.init_weights(seed, std=std)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    return m.to(dtype).eval()


def make_calib(args, n=3, B=2, T=24, seed=0):
    """Batches with BOS at position 0, a BOS mid-row (packed documents) and right padding."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        t = torch.randint(12, args.vocab_size, (B, T), generator=g)
        t[:, 0] = BOS
        t[0, T // 2] = BOS
        t[1, -3:] = PAD
        out.append(t)
    return out


def rel(a, b):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max())


def tokens(args, seed=5, B=2, T=16):
    return torch.randint(12, args.vocab_size, (B, T), generator=torch.Generator().manual_seed(seed))


# -- statistics ------------------------------------------------------------------------------------

def naive_stats(model, calib, eps):
    """Every statistic of section 4 recomputed by calling the block's parts by hand, all tokens kept, then
    BOS / pad / position 0 masked."""
    L, D, Fw = len(model.layers), model.args.dim, model.args.hidden_dim
    ratio, cos, n = torch.zeros(L, dtype=torch.float64), torch.zeros(L, dtype=torch.float64), 0
    cov = torch.zeros(D, D, dtype=torch.float64)
    ffn = torch.zeros(L, Fw, dtype=torch.float64)
    xhat = lambda x: (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)).double()
    with torch.no_grad():
        for t in calib:
            valid = (t != BOS) & (t != PAD)
            valid[:, 0] = False
            n += int(valid.sum())
            x = model.embed_tokens(t)
            pos = torch.arange(t.shape[1]).expand_as(t)
            c, s = model.rope(pos, x.dtype)
            for i, layer in enumerate(model.layers):
                h = x + layer.self_attn(layer.input_layernorm(x), c, s, None, None)
                nrm = layer.post_attention_layernorm(h)
                inter = F.silu(layer.mlp.gate_proj(nrm)) * layer.mlp.up_proj(nrm)
                out = h + layer.mlp.down_proj(inter)
                xi, xo = x[valid], out[valid]
                ratio[i] += (xo.norm(dim=-1) / xi.norm(dim=-1)).double().sum()
                cos[i] += F.cosine_similarity(xi, xo, dim=-1).double().sum()
                for site in (x[valid], h[valid]):
                    cov += xhat(site).T @ xhat(site)
                ffn[i] += inter[valid].abs().double().sum(0)
                x = out
    return n, ratio / n, 1 - cos / n, cov, ffn / n


def test_stats_equal_naive_recomputation():
    args = tiny(n_layers=3)
    m = build(args)
    calib = make_calib(args)
    st = P.collect_stats(m, calib)
    n, ratio, bi, cov, ffn = naive_stats(m, calib, args.norm_eps)
    assert st.n_tokens == n == 3 * (2 * 24 - 2 - 1 - 3)  # minus position 0 of each row, the mid-row BOS, 3 pads
    torch.testing.assert_close(st.norm_ratio, ratio, rtol=1e-6, atol=0)
    torch.testing.assert_close(st.block_influence, bi, rtol=1e-4, atol=1e-9)
    torch.testing.assert_close(st.cov, cov, rtol=1e-6, atol=1e-6 * float(cov.abs().max()))
    torch.testing.assert_close(st.ffn_scores, ffn, rtol=1e-6, atol=1e-12)
    # a single unmasked BOS changes the scores: the mask is real
    st2 = P.collect_stats(m, calib, P.PruneConfig(bos_id=-1))
    assert st2.n_tokens == n + 3 and not torch.allclose(st2.norm_ratio, st.norm_ratio)


def test_stats_stream_and_leave_the_model_clean():
    args = tiny()
    m = build(args)
    calib = make_calib(args, n=4)
    st = P.collect_stats(m, lambda: iter(calib), hidden=False, ffn=False)  # a callable works too
    assert st.cov is None and st.ffn_abs_sum is None and st.n_batches == 4
    # the sums over two halves add up to the whole (nothing depends on holding all tokens at once)
    a, b = P.collect_stats(m, calib[:2]), P.collect_stats(m, calib[2:])
    whole = P.collect_stats(m, calib)
    torch.testing.assert_close(a.cov + b.cov, whole.cov)
    torch.testing.assert_close(a.ffn_abs_sum + b.ffn_abs_sum, whole.ffn_abs_sum)
    x = tokens(args)
    before = m(x)
    assert torch.equal(m(x), before)  # hooks removed
    assert all(not layer._forward_hooks for layer in m.layers)


def _dist_worker(rank, world, port, q):
    import torch.distributed as dist
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    args = tiny()
    m = build(args)
    calib = make_calib(args, n=4)
    st = P.collect_stats(m, calib[rank::world])
    if rank == 0:
        q.put((st.n_tokens, st.norm_ratio, st.cov, st.ffn_abs_sum))
    dist.destroy_process_group()


@pytest.mark.slow  # two spawned interpreters: several seconds
def test_stats_all_reduce_over_two_gloo_ranks():
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_dist_worker, args=(r, 2, port, q)) for r in range(2)]
    for p in procs:
        p.start()
    n, ratio, cov, ffn = q.get(timeout=120)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    args = tiny()
    one = P.collect_stats(build(args), make_calib(args, n=4))
    assert n == one.n_tokens
    torch.testing.assert_close(ratio, one.norm_ratio)
    torch.testing.assert_close(cov, one.cov)
    torch.testing.assert_close(ffn, one.ffn_abs_sum)


# -- layers ----------------------------------------------------------------------------------------

def fake_stats(ratio, cos):
    ratio, cos = torch.tensor(ratio, dtype=torch.float64), torch.tensor(cos, dtype=torch.float64)
    z = torch.zeros_like(ratio)
    return P.CalibStats(1, 1, z, z, ratio, cos)


def test_select_layers_methods():
    st = fake_stats([1.5, 1.1, 1.9, 1.2, 1.3], [0.5, 0.9, 0.7, 0.1, 0.99])
    assert P.select_layers(st, 3, "norm_ratio") == [0, 2, 4]
    assert P.select_layers(st, 2, "block_influence") == [0, 3]  # 1 - cos largest
    assert P.select_layers(st, 3, "last_k") == [0, 1, 2]
    r = P.select_layers(st, 3, "random", seed=1)
    assert r == P.select_layers(st, 3, "random", seed=1) and len(set(r)) == 3 and r == sorted(r)
    assert len({tuple(P.select_layers(st, 2, "random", seed=s)) for s in range(20)}) > 1
    assert P.select_layers(st, 5) == [0, 1, 2, 3, 4]


def test_dropping_a_layer_removes_exactly_its_weights():
    args = tiny(n_layers=3)
    m = build(args)
    sd = {k: v.clone() for k, v in m.state_dict().items()}
    n_before = sum(p.numel() for p in m.parameters())
    P.prune_layers(m, [0, 2])
    new = m.state_dict()
    assert m.args.n_layers == 2 and len(m.layers) == 2
    assert not any(k.startswith("layers.2.") for k in new)
    for k, v in new.items():
        src = k.replace("layers.1.", "layers.2.") if k.startswith("layers.1.") else k
        assert torch.equal(v, sd[src]), k
    per_layer = sum(v.numel() for k, v in sd.items() if k.startswith("layers.1."))
    assert sum(p.numel() for p in m.parameters()) == n_before - per_layer


def test_keeping_everything_reproduces_the_parent_exactly():
    args = tiny()
    parent = build(args)
    calib = make_calib(args)
    x = tokens(args)
    m = copy.deepcopy(parent)
    st = P.collect_stats(m, calib)
    P.prune_layers(m, P.select_layers(st, args.n_layers))
    P.prune_ffn(m, P.select_ffn_units(st, args.hidden_dim))
    assert m.args == parent.args
    for k, v in parent.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k
    assert torch.equal(m(x), parent(x))
    child, report = P.prune(copy.deepcopy(parent), args, calib)  # the whole pipeline, nothing to cut
    assert torch.equal(child(x), parent(x)) and report["layers"]["dropped"] == []


def test_scores_find_what_can_go_losslessly():
    """A near-identity layer is the one dropped (both criteria); dead FFN units are the ones cut, and
    cutting them leaves the logits unchanged."""
    args = tiny(n_layers=3)
    m = build(args)
    with torch.no_grad():
        m.layers[1].self_attn.o_proj.weight.mul_(1e-3)
        m.layers[1].mlp.down_proj.weight.mul_(1e-3)
        dead = [torch.randperm(args.hidden_dim, generator=torch.Generator().manual_seed(l))[:64] for l in range(3)]
        for layer, d in zip(m.layers, dead):
            layer.mlp.gate_proj.weight[d] = 0  # silu(0) = 0: the unit never fires
    st = P.collect_stats(m, make_calib(args), hidden=False)
    assert P.select_layers(st, 2, "norm_ratio") == [0, 2]
    assert P.select_layers(st, 2, "block_influence") == [0, 2]
    keep = P.select_ffn_units(st, args.hidden_dim - 64)
    for l in range(3):
        assert not torch.isin(dead[l], keep[l]).any()
    x = tokens(args)
    ref = m(x)
    P.prune_ffn(m, keep)
    assert rel(m(x), ref) < 1e-6


def test_a_residual_stream_in_a_k_dim_subspace_is_sliced_losslessly():
    """If every writer (embedding, o_proj, down_proj) writes into a k-dim subspace, PCA finds it and the
    sliced, norm-corrected child computes the parent's logits: the whole hidden step is exact."""
    args, k = tiny(), 32
    m = build(args)
    U, _ = torch.linalg.qr(torch.randn(args.dim, k, generator=torch.Generator().manual_seed(7)))
    P_DD = U @ U.T  # projector onto the subspace
    with torch.no_grad():
        m.embed_tokens.weight.copy_(m.embed_tokens.weight @ P_DD)
        for layer in m.layers:
            layer.self_attn.o_proj.weight.copy_(P_DD @ layer.self_attn.o_proj.weight)
            layer.mlp.down_proj.weight.copy_(P_DD @ layer.mlp.down_proj.weight)
    x = tokens(args)
    ref = m(x)
    child, report = P.prune(m, dataclasses.replace(args, dim=k), make_calib(args))
    assert report["hidden"]["retained_energy"] > 1 - 1e-9
    assert rel(child(x), ref) < 1e-5


# -- hidden dimension ------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [False, True])
def test_full_rank_rotation_keeps_logits(tied):
    args = tiny(tied_embeddings=tied)
    m = build(args)
    x = tokens(args)
    ref = m(x)
    Q, lam = P.pca_rotation(P.collect_stats(m, make_calib(args), ffn=False).cov)
    torch.testing.assert_close(Q.T @ Q, torch.eye(args.dim, dtype=torch.float64), atol=1e-10, rtol=0)
    assert (lam[:-1] >= lam[1:]).all()
    P.rotate_and_slice_hidden(m, Q, args.dim)
    assert m.lm_head.weight is not m.embed_tokens.weight and not m.args.tied_embeddings
    assert rel(m(x), ref) < 1e-5
    assert all(torch.equal(n.weight, torch.ones(args.dim)) for n in [m.norm] + [l.input_layernorm for l in m.layers])


def test_sliced_norm_correction_equals_dividing_by_the_old_width():
    args = tiny()
    D, k = args.dim, 40
    parent = build(args)
    Q, _ = P.pca_rotation(P.collect_stats(parent, make_calib(args), ffn=False).cov)
    x = tokens(args)
    fixed = P.rotate_and_slice_hidden(copy.deepcopy(parent), Q, k)
    assert fixed.args.dim == k and fixed.args.norm_eps == pytest.approx(args.norm_eps * D / k)
    assert float(fixed.norm.weight[0].detach()) == pytest.approx((D / k) ** 0.5)
    old_width = P.rotate_and_slice_hidden(copy.deepcopy(parent), Q, k, correct_norms=False)
    stock = copy.deepcopy(old_width)
    for layer in old_width.layers:
        layer.input_layernorm = P.OldWidthRMSNorm(k, D, args.norm_eps)
        layer.post_attention_layernorm = P.OldWidthRMSNorm(k, D, args.norm_eps)
    old_width.norm = P.OldWidthRMSNorm(k, D, args.norm_eps)
    assert rel(fixed(x), old_width(x)) < 1e-5  # exact up to float rounding
    assert rel(stock(x), old_width(x)) > 0.05  # without the correction the logits move
    # blocked fp32 surgery is the same computation as one big block
    small = P.rotate_and_slice_hidden(copy.deepcopy(parent), Q, k, chunk_rows=7)
    assert rel(small(x), fixed(x)) < 1e-6


def test_bf16_surgery_keeps_dtype_and_accuracy():
    args = tiny(n_layers=3)
    target = dataclasses.replace(args, n_layers=2, dim=48, hidden_dim=128)
    m16, _ = P.prune(build(args, dtype=torch.bfloat16), target, make_calib(args))
    assert all(p.dtype == torch.bfloat16 for p in m16.parameters()) and m16.args.dim == 48
    # the same surgery in bf16 and fp32 (fp32 compute per tensor either way) agree to bf16 precision
    m32 = build(args)
    Q, _ = P.pca_rotation(P.collect_stats(m32, make_calib(args), ffn=False).cov)
    x = tokens(args)
    with torch.no_grad():
        base = rel(build(args, dtype=torch.bfloat16)(x).float(), m32(x))
        a = P.rotate_and_slice_hidden(build(args, dtype=torch.bfloat16), Q, 48)(x).float()
        b = P.rotate_and_slice_hidden(m32, Q, 48)(x)
    assert rel(a, b) < 3 * base + 1e-3


# -- FFN -------------------------------------------------------------------------------------------

def test_ffn_pruning_keeps_the_top_units():
    args = tiny()
    m = build(args)
    st = P.collect_stats(m, make_calib(args), hidden=False)
    k = 64
    keep = P.select_ffn_units(st, k)
    for l in range(args.n_layers):
        s = st.ffn_scores[l]
        assert s[keep[l]].min() >= s[~torch.isin(torch.arange(args.hidden_dim), keep[l])].max()
    mlp = copy.deepcopy(m.layers[0].mlp)
    P.prune_ffn(m, keep)
    assert m.args.hidden_dim == k and m.layers[0].mlp.down_proj.weight.shape == (args.dim, k)
    x = torch.randn(3, args.dim)
    idx = keep[0]
    want = (F.silu(x @ mlp.gate_proj.weight[idx].T) * (x @ mlp.up_proj.weight[idx].T)) @ mlp.down_proj.weight[:, idx].T
    torch.testing.assert_close(m.layers[0].mlp(x), want)


def test_contribution_score_keeps_the_unit_that_writes_most():
    """ffn_score="contribution": mean |a_j| * ||W2[:, j]||, the mean norm of what unit j writes. A unit whose
    down_proj column is scaled by c has its output scaled by c and its activation unchanged: the paper's
    rule ranks it as before, the contribution rule follows the output. In layer 0 the unit the activation
    rule ranks last gets a column 1e3 times larger, and its best unit a column 1e-3 times as large."""
    args = tiny()
    m = build(args)
    st = P.collect_stats(m, make_calib(args), hidden=False)
    weak, strong = int(st.ffn_scores[0].argmin()), int(st.ffn_scores[0].argmax())
    with torch.no_grad():
        m.layers[0].mlp.down_proj.weight[:, weak] *= 1e3
        m.layers[0].mlp.down_proj.weight[:, strong] *= 1e-3
    st = P.collect_stats(m, make_calib(args), hidden=False)
    assert int(st.ffn_scores[0].argmin()) == weak  # the activation does not see the column
    # by hand: the mean norm of the write, over the calibration tokens
    col = m.layers[0].mlp.down_proj.weight.norm(dim=0)
    c = P.ffn_contribution(m, st.ffn_scores, chunk_rows=5)  # several fp32 blocks of rows
    torch.testing.assert_close(c[0], st.ffn_scores[0] * col, rtol=1e-5, atol=0)
    k = args.hidden_dim // 2
    child_a, rep_a = P.prune(copy.deepcopy(m), dataclasses.replace(args, hidden_dim=k), make_calib(args))
    child_c, rep_c = P.prune(copy.deepcopy(m), dataclasses.replace(args, hidden_dim=k), make_calib(args),
                             P.PruneConfig(ffn_score="contribution"))
    assert strong in rep_a["ffn"]["kept"][0] and weak not in rep_a["ffn"]["kept"][0]
    assert weak in rep_c["ffn"]["kept"][0] and strong not in rep_c["ffn"]["kept"][0]
    assert rep_c["ffn"]["score"] == "contribution" and rep_a["ffn"]["score"] == "activation"
    with pytest.raises(ValueError, match="ffn_score 'norm' is unknown"):
        P.PruneConfig(ffn_score="norm")


# -- the whole step --------------------------------------------------------------------------------

def test_prune_recomputes_statistics_after_each_surgery(monkeypatch):
    args = tiny(n_layers=3)
    seen = []
    real = P.collect_stats

    def spy(model, calib, config=None, **kw):
        seen.append((model.args.n_layers, model.args.dim, model.args.hidden_dim, kw["hidden"], kw["ffn"]))
        return real(model, calib, config, **kw)

    monkeypatch.setattr(P, "collect_stats", spy)
    target = dataclasses.replace(args, n_layers=2, dim=48, hidden_dim=128)
    m, report = P.prune(build(args), target, make_calib(args))
    assert seen == [(3, 64, 192, False, False), (2, 64, 192, True, False), (2, 48, 192, False, True)]
    assert (m.args.n_layers, m.args.dim, m.args.hidden_dim) == (2, 48, 128)
    assert len(report["layers"]["kept"]) == 2 and len(report["layers"]["norm_ratio"]) == 3
    fr = report["hidden"]["energy_fractions"]
    assert report["hidden"]["retained_energy"] == pytest.approx(float(fr[:48].sum()), rel=1e-5)
    assert 0 < report["hidden"]["retained_energy"] < 1
    assert report["ffn"]["kept"].shape == (2, 128)
    # when no layer goes, one pass serves the hidden step as well
    seen.clear()
    P.prune(build(args), dataclasses.replace(args, dim=48), make_calib(args))
    assert seen == [(3, 64, 192, True, False)]


@pytest.mark.parametrize("policy", ["embedding", "head"])
def test_retie_policy(policy):
    """Property of "embedding": everything but the final-norm weight is the untied model's, logits are
    exact when the head's columns are multiples of the embedding's, and the fitted head is never
    farther from the untied one than keeping the final-norm weight. "head": the head is unchanged."""
    args = tiny()
    m = build(args)
    g = torch.Generator().manual_seed(3)
    c = torch.rand(args.dim, generator=g) + 0.5
    with torch.no_grad():
        m.lm_head.weight.copy_(m.embed_tokens.weight * c)  # H = E diag(c)
    x = tokens(args)
    ref = m(x)
    head = m.lm_head.weight.detach().clone()
    info = P.retie_embeddings(m, policy)
    assert m.lm_head.weight is m.embed_tokens.weight and m.args.tied_embeddings
    if policy == "embedding":
        assert rel(m(x), ref) < 1e-5 and info["head_rel_error"] < 1e-6
        m2 = build(args)  # a generic head: the fit beats w unchanged, and only w and the head move
        before = {k: v.clone() for k, v in m2.state_dict().items()}
        E, H, w = (p.detach().clone() for p in (m2.embed_tokens.weight, m2.lm_head.weight, m2.norm.weight))
        info = P.retie_embeddings(m2, policy)
        for k, v in m2.state_dict().items():
            if k not in ("norm.weight", "lm_head.weight"):
                assert torch.equal(v, before[k]), k
        err = lambda wt: float(((E * wt) - (H * w)).norm() / (H * w).norm())
        assert info["head_rel_error"] == pytest.approx(err(m2.norm.weight.detach()), rel=1e-4)
        assert info["head_rel_error"] < err(w)
    else:
        assert torch.equal(m.lm_head.weight, head)


def test_retie_mean_policy_gives_the_average_of_both_logit_sources():
    """"mean": T = (E + a H diag(w)) / 2 with a = ||E|| / ||H diag(w)||, final-norm weight 1/a, so the
    logits are exactly (n E^T / a + n diag(w) H^T) / 2 for the normalised final hidden state n."""
    args = tiny()
    m = build(args)
    with torch.no_grad():
        m.norm.weight.copy_(torch.rand(args.dim, generator=torch.Generator().manual_seed(4)) + 0.5)
    E, H, w = (p.detach().clone().double() for p in (m.embed_tokens.weight, m.lm_head.weight, m.norm.weight))
    a = float(E.norm() / (H * w).norm())
    x = tokens(args)
    seen = []
    hook = m.norm.register_forward_hook(lambda mod, inp, out: seen.append(inp[0].detach().double()))
    with torch.no_grad():
        m(x)
    P.retie_embeddings(m, "mean")
    assert m.lm_head.weight is m.embed_tokens.weight and m.args.tied_embeddings
    torch.testing.assert_close(m.embed_tokens.weight.double(), (E + a * H * w) / 2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m.norm.weight.double(), torch.full_like(w, 1 / a), rtol=1e-6, atol=0)
    with torch.no_grad():
        # the embedding itself changed, so feed the recorded pre-norm input into the new final norm and head
        r = seen[0]
        n = r * torch.rsqrt(r.pow(2).mean(-1, keepdim=True) + m.norm.eps)
        expect = (n @ E.T / a + (n * w) @ H.T) / 2
        got = m.lm_head(m.norm(seen[0].float())).double()
    hook.remove()
    torch.testing.assert_close(got, expect, rtol=1e-4, atol=1e-5)


def test_prune_to_a_tied_target_saves_a_tied_checkpoint(tmp_path):
    args = tiny(n_layers=3)
    target = dataclasses.replace(args, n_layers=2, dim=48, hidden_dim=128, tied_embeddings=True)
    m, report = P.prune(build(args), target, make_calib(args))
    assert m.lm_head.weight is m.embed_tokens.weight and report["tie"]["policy"] == "mean"
    M.save_model(m, str(tmp_path / "c"))
    back = M.load_model(str(tmp_path / "c"))
    assert back.args.tied_embeddings and back.args == m.args
    x = tokens(args)
    torch.testing.assert_close(back(x), m(x))


def test_a_tied_parent_is_re_tied_through_its_head_by_default():
    """Deviation 4: from a tied parent the default ("auto") re-tie shares the head, so the child's logits
    given its final hidden states are exactly the untied child's; the input embedding is what changes.
    (The "mean" policy, right for an untied parent, left SmolLM2's 8b child near a uniform guess.)"""
    args = tiny(n_layers=3, tied_embeddings=True)
    calib = make_calib(args)
    untied, _ = P.prune(build(args), dataclasses.replace(args, dim=48, tied_embeddings=False), calib)
    m, report = P.prune(build(args), dataclasses.replace(args, dim=48), calib)
    assert report["tie"] == {"policy": "head", "head_rel_error": 0.0}
    assert m.lm_head.weight is m.embed_tokens.weight and m.args.tied_embeddings
    torch.testing.assert_close(m.lm_head.weight, untied.lm_head.weight, rtol=0, atol=0)
    torch.testing.assert_close(m.norm.weight, untied.norm.weight, rtol=0, atol=0)
    assert not torch.equal(m.embed_tokens.weight, untied.embed_tokens.weight)  # the input side moved
    assert P.tie_policy_for("auto", False) == "mean" and P.tie_policy_for("embedding", True) == "embedding"


def test_prune_takes_the_target_rope_fields():
    args = tiny(n_layers=3)
    target = dataclasses.replace(args, n_layers=2, rope_theta=1e6, yarn_factor=4.0, yarn_original_max_pos=64,
                                 qtemp_beta=0.1, qtemp_original_max_pos=64, max_seq_len=256)
    m, _ = P.prune(build(args), target, make_calib(args))
    assert m.args == dataclasses.replace(args, **{f: getattr(target, f) for f in P.ROPE_FIELDS}, n_layers=2)
    torch.testing.assert_close(m.inv_freq, M.rope_inv_freq(m.args))


def test_cli_writes_a_checkpoint_with_exactly_the_target_shape(tmp_path):
    args = tiny(n_layers=3)
    parent = build(args)
    M.save_model(parent, str(tmp_path / "parent"))
    stream = np.random.default_rng(0).integers(12, args.vocab_size, size=4000).astype(np.uint32)
    stream[::97] = BOS
    np.save(tmp_path / "calib.npy", stream)
    out = tmp_path / "child"
    P.main(["--parent", str(tmp_path / "parent"), "--out", str(out), "--layers", "2", "--dim", "48", "--ffn", "128",
            "--calib", str(tmp_path / "calib.npy"), "--calib-seqs", "6", "--seq-len", "32", "--batch-size", "4"])
    child = M.load_model(str(out))
    want = dataclasses.replace(args, n_layers=2, dim=48, hidden_dim=128, norm_eps=args.norm_eps * 64 / 48)
    assert child.args == want
    assert M.read_checkpoint_args(str(out)) == (want, "hf")
    report = json.load(open(out / "prune_report.json"))
    assert len(report["layers"]["kept"]) == 2 and len(report["ffn"]["kept"][0]) == 128
    # the same calibration in memory gives the same child
    calib = P.calibration_batches(stream, 6, 32, 4)
    mem, _ = P.prune(build(args), dataclasses.replace(args, n_layers=2, dim=48, hidden_dim=128), calib)
    x = tokens(args)
    torch.testing.assert_close(child(x), mem(x))


# -- real sizes ------------------------------------------------------------------------------------

@pytest.mark.parametrize("parent,size,shape", [("24b", "14b", (40, 5120, 16384, False)),
                                               ("14b", "8b", (34, 4096, 14336, False)),
                                               ("8b", "3b", (26, 3072, 9216, True))])
def test_real_size_targets(parent, size, shape):
    p = ModelArgs.preset(parent)
    t = P.resolve_target(p, size)
    assert (t.n_layers, t.dim, t.hidden_dim, t.tied_embeddings) == shape
    assert (t.n_heads, t.n_kv_heads, t.head_dim, t.vocab_size) == (32, 8, 128, 131072)
    assert all(getattr(t, f) == getattr(ModelArgs.preset(size), f) for f in P.ROPE_FIELDS)
    assert P.resolve_target(p, size, dim=2048).dim == 2048


# -- bad input -------------------------------------------------------------------------------------

@pytest.mark.parametrize("kw,match", [
    (dict(layers=3), "larger than the parent"), (dict(dim=128), "larger than the parent"),
    (dict(ffn=256), "larger than the parent"), (dict(dim=48.5), "positive integer"),
    (dict(ffn=0), "positive integer"), (dict(layers=True), "positive integer"),
    (dict(dim=50), "multiple of 8"), (dict(ffn=100), "multiple of 8"),
])
def test_bad_targets(kw, match):
    with pytest.raises(ValueError, match=match):
        P.resolve_target(tiny(), None, **kw)


def test_bad_target_family_and_calibration():
    args = tiny()
    with pytest.raises(ValueError, match="never pruned"):
        P.resolve_target(args, "8b")
    with pytest.raises(ValueError, match="never pruned"):
        P.resolve_target(args, dataclasses.replace(args, n_heads=2, n_kv_heads=1))
    with pytest.raises(ValueError, match="unknown model preset"):
        P.resolve_target(args, "7b")
    m = build(args)
    small = dataclasses.replace(args, dim=48)
    with pytest.raises(ValueError, match="calibration set is empty"):
        P.prune(m, small, [])
    with pytest.raises(ValueError, match="every calibration token is masked"):
        P.prune(m, small, [torch.full((2, 8), BOS)])
    with pytest.raises(TypeError, match="one-shot iterator"):
        P.prune(m, small, (t for t in make_calib(args)))
    with pytest.raises(ValueError, match="integer tensor"):
        P.collect_stats(m, [torch.rand(2, 8)])
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        P.collect_stats(m, [torch.full((2, 8), args.vocab_size)])
    with pytest.raises(ValueError, match="tie_policy"):
        P.PruneConfig(tie_policy="median")
    with pytest.raises(ValueError, match="strictly increasing"):
        P.prune_layers(m, [1, 0])
    assert m.args == args  # nothing was cut by the failed calls


def test_cli_bad_input(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        P.main(["--parent", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--calib-random", "2"])
    assert "error:" in str(e.value.code) and "does not exist" in str(e.value.code)
    with pytest.raises(SystemExit) as e:
        P.main(["--parent", "p", "--out", "o", "--dim", "4.5", "--calib-random", "2"])
    assert e.value.code == 2 and "positive integer" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        P.main(["--parent", "p", "--out", "o", "--bogus-flag", "1", "--calib-random", "2"])
    assert e.value.code == 2
    args = tiny()
    M.save_model(build(args), str(tmp_path / "parent"))
    with pytest.raises(SystemExit) as e:
        P.main(["--parent", str(tmp_path / "parent"), "--out", str(tmp_path / "o"), "--size", "3b",
                "--calib-random", "2"])
    assert "never pruned" in str(e.value.code) and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:
        P.main(["--parent", str(tmp_path / "parent"), "--out", str(tmp_path / "parent"), "--calib-random", "2"])
    assert "is the parent checkpoint" in str(e.value.code)
    (tmp_path / "junk.bin").write_bytes(b"not a shard")
    with pytest.raises(SystemExit) as e:
        P.main(["--parent", str(tmp_path / "parent"), "--out", str(tmp_path / "o"), "--dim", "48",
                "--calib", str(tmp_path / "junk.bin")])
    assert "bad magic" in str(e.value.code)


# -- the CLI's calibration reader ------------------------------------------------------------------

def test_calibration_shards_get_data_py_checks_and_stay_on_disk(tmp_path):
    """prune.py reads data.py's shards with data.py's checks (format version, the parent's vocabulary and
    tekken.json hash) and streams a folder through memmaps instead of concatenating it."""
    import shutil

    import data as D
    tok = D.Tokenizer.from_file(vocab_size=2048)
    ids = D.tokenize_documents(["def f(x):\n    return x + 1\n"] * 40, tok)
    D.write_shards(ids, tmp_path / "s", tok, shard_tokens=150)
    parent = tmp_path / "parent"
    parent.mkdir()
    shutil.copy(tok.path, parent / "tekken.json")
    got = P.read_token_file(str(tmp_path / "s"), str(parent), 2048)
    assert isinstance(got, D.ShardedTokens) and len(got.parts) > 2 and got.tolist() == ids.tolist()
    batches = P.calibration_batches(got, 4, 64, 2)  # windows cut across shard ends
    starts = np.linspace(0, len(ids) - 64, 4).astype(np.int64)
    assert torch.equal(torch.cat(batches), torch.from_numpy(np.stack([ids[s:s + 64] for s in starts]).astype(np.int64)))

    other = tmp_path / "other"
    other.mkdir()
    shutil.copy(os.path.join(os.path.dirname(tok.path), "tekken_240718.json"), other / "tekken.json")
    with pytest.raises(ValueError, match="written by another tokenizer"):
        P.read_token_file(str(tmp_path / "s"), str(other), 2048)
    with pytest.raises(ValueError, match="vocabulary of 2048 ids, the model has 1500"):
        P.read_token_file(str(tmp_path / "s"), None, 1500)
    raw = bytearray((tmp_path / "s" / "shard_00000.bin").read_bytes())
    raw[8:12] = (2).to_bytes(4, "little")  # a future format version
    (tmp_path / "s" / "shard_00000.bin").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="format version 2"):
        P.read_token_file(str(tmp_path / "s"), None, 2048)
    (tmp_path / "junk.bin").write_bytes(b"x" * 300)
    with pytest.raises(ValueError, match="neither a .npy file nor a data.py token shard"):
        P.read_token_file(str(tmp_path / "junk.bin"))
