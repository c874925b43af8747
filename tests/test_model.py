"""model.py: config table, RoPE/YaRN, query temperature, attention, cache, checkpoints, bad input."""
import dataclasses
import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

import model as M
from model import CheckpointError, ModelArgs, Transformer


def tiny(**kw):
    return dataclasses.replace(ModelArgs.preset("tiny"), **kw)


def build(args, seed=0, dtype=torch.float32):
    m = Transformer(args).to(dtype)
    m.init_weights(seed)
    return m.eval()


# -- config table ---------------------------------------------------------------------------------

@pytest.mark.parametrize("name,count", [("3b", 3_429_006_336), ("8b", 8_489_553_920),
                                        ("14b", 13_506_073_600), ("24b", 23_572_403_200)])
def test_parameter_counts_match_paper(name, count):
    args = ModelArgs.preset(name)
    assert M.num_params(args) == count
    with torch.device("meta"):
        m = Transformer(args)
    assert sum(p.numel() for p in m.parameters()) == count  # tied head counted once


# -- RoPE, YaRN, query temperature ----------------------------------------------------------------

@pytest.mark.parametrize("name,low,high", [("3b", 20, 37), ("8b", 20, 37), ("14b", 13, 25)])
def test_yarn_correction_range(name, low, high):
    assert M.yarn_correction_range(ModelArgs.preset(name)) == (low, high)


def test_yarn_inverse_frequencies_by_hand():
    args = ModelArgs.preset("3b")
    inv = M.rope_inv_freq(args).double()
    d, b, s = 128, 1e6, 16.0
    for i in (0, 5, 19, 20, 25, 36, 37, 50, 63):
        f = b ** (-2 * i / d)
        ramp = min(max((i - 20) / (37 - 20), 0.0), 1.0)
        assert inv[i].item() == pytest.approx(f * (1 - ramp) + f / s * ramp, rel=1e-6)
    # without YaRN: plain RoPE frequencies
    plain = M.rope_inv_freq(ModelArgs.preset("24b")).double()
    assert plain[10].item() == pytest.approx(1e9 ** (-20 / 128), rel=1e-6)


def test_query_temperature_values():
    args = ModelArgs.preset("3b")
    q = M.query_temperature(torch.tensor([0, 16383, 16384, 262143]), args)
    assert q[0].item() == 1.0 and q[1].item() == 1.0
    assert q[2].item() == pytest.approx(1 + 0.1 * math.log(2), abs=1e-6)  # 1.0693
    assert q[3].item() == pytest.approx(1 + 0.1 * math.log(16), abs=1e-6)  # 1.2773
    assert M.query_temperature(torch.tensor([100000]), ModelArgs.preset("24b")) is None  # MS3.1 has none


def test_query_temperature_scales_only_queries():
    # Past L the logits change; below L they do not (the multiplier is exactly 1 there).
    args = tiny(qtemp_beta=0.5, qtemp_original_max_pos=8)
    m_on, m_off = build(args), build(tiny())
    x = torch.randint(0, 512, (1, 20))
    lo, lf = m_on(x), m_off(x)
    torch.testing.assert_close(lo[:, :8], lf[:, :8])
    assert (lo[:, 8:] - lf[:, 8:]).abs().max() > 1e-3


# -- attention ------------------------------------------------------------------------------------

def test_sdpa_matches_reference_with_masks():
    torch.manual_seed(0)
    B, H, K, T, E = 2, 8, 2, 7, 16
    q, k, v = torch.randn(B, H, T, E), torch.randn(B, K, T, E), torch.randn(B, K, T, E)
    torch.testing.assert_close(M.attention_sdpa(q, k, v), M.attention_reference(q, k, v), atol=1e-5, rtol=1e-5)
    mask = torch.rand(B, T, T) > 0.3
    mask |= torch.eye(T, dtype=torch.bool)
    torch.testing.assert_close(M.attention_sdpa(q, k, v, mask), M.attention_reference(q, k, v, mask),
                               atol=1e-5, rtol=1e-5)
    m = build(tiny())
    x = torch.randint(0, 512, (2, 12))
    a = m(x)
    m.set_attention("reference")
    torch.testing.assert_close(m(x), a, atol=1e-5, rtol=1e-5)


def test_gqa_head_mapping():
    # kv head j serves q heads 4j..4j+3: with one key, every q head returns its kv head's value.
    B, H, K, E = 1, 32, 8, 4
    q, k = torch.randn(B, H, 1, E), torch.randn(B, K, 1, E)
    v = torch.arange(K, dtype=torch.float32).view(1, K, 1, 1).expand(B, K, 1, E)
    for fn in (M.attention_sdpa, M.attention_reference):
        out = fn(q, k, v)[0, :, 0, 0]
        assert out.tolist() == [float(h // 4) for h in range(H)]


# -- KV cache and generation ----------------------------------------------------------------------

def greedy_no_cache(m, prompt, n):
    seq = list(prompt)
    for _ in range(n):
        seq.append(int(m(torch.tensor([seq]))[0, -1].argmax()))
    return seq[len(prompt):]


def test_cached_generation_equals_plain_forward_on_ragged_batch():
    m = build(tiny(qtemp_beta=0.1, qtemp_original_max_pos=8, yarn_factor=4.0, yarn_original_max_pos=8))
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=g).tolist() for n in (1, 5, 13, 9)]
    out = M.generate(m, prompts, 10, eos_id=None)
    for p, o in zip(prompts, out):
        assert o == greedy_no_cache(m, p, 10)


def test_cache_logits_match_full_forward():
    m = build(tiny())
    x = torch.randint(0, 512, (2, 9))
    full = m(x)
    cache = M.KVCache(m.args, 2, 16)
    pre = m(x[:, :5], cache=cache, start=0)
    steps = [m(x[:, i:i + 1], cache=cache, start=i) for i in range(5, 9)]
    torch.testing.assert_close(torch.cat([pre] + steps, 1), full, atol=1e-5, rtol=1e-5)


def test_generation_stops_at_eos_per_row_and_sampling_is_seeded():
    m = build(tiny())
    prompts = [[1, 7, 8], [1, 200]]
    first = M.generate(m, prompts, 1)
    eos = first[0][0]  # make row 0's first greedy token the eos id
    out = M.generate(m, prompts, 6, eos_id=eos)
    assert out[0] == [eos]
    assert len(out[1]) == 6 or out[1][-1] == eos
    a = M.generate(m, prompts, 8, temperature=1.0, top_p=0.9, seed=3, eos_id=None)
    b = M.generate(m, prompts, 8, temperature=1.0, top_p=0.9, seed=3, eos_id=None)
    c = M.generate(m, prompts, 8, temperature=1.0, top_p=0.9, seed=4, eos_id=None)
    assert a == b and a != c


def test_top_p_keeps_only_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    g = torch.Generator().manual_seed(0)
    draws = {int(M.sample_next(logits, 1.0, 0.7, g)) for _ in range(200)}
    assert draws == {0, 1}  # 0.5 + 0.3 reaches 0.7; tokens 2 and 3 are outside the nucleus


# -- checkpoints ----------------------------------------------------------------------------------

def logits_of(m, seed=0):
    x = torch.randint(0, m.args.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return m(x)


def state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("tied", [False, True])
def test_hf_round_trip_single_and_sharded(tmp_path, tied):
    m = build(tiny(tied_embeddings=tied, yarn_factor=16.0, qtemp_beta=0.1, max_seq_len=65536))
    M.save_model(m, tmp_path / "one")
    M.save_model(m, tmp_path / "many", max_shard_bytes=20_000)
    assert os.path.exists(tmp_path / "one" / "model.safetensors")
    index = json.load(open(tmp_path / "many" / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    assert ("lm_head.weight" in index["weight_map"]) == (not tied)
    for sub in ("one", "many"):
        r = M.load_model(str(tmp_path / sub))
        assert r.args == m.args
        assert state_equal(m, r)
        assert (r.lm_head.weight is r.embed_tokens.weight) == tied


def test_native_round_trip_is_bit_exact_through_hf(tmp_path):
    m = build(tiny(yarn_factor=16.0, qtemp_beta=0.1, max_seq_len=65536), dtype=torch.bfloat16)
    M.save_model(m, tmp_path / "native", format="native")
    sd = load_file(tmp_path / "native" / "consolidated.safetensors")
    assert "layers.0.attention.wq.weight" in sd and "tok_embeddings.weight" in sd
    # the native q rows are the interleaved permutation of ours
    torch.testing.assert_close(M.permute_native_to_hf(sd["layers.0.attention.wq.weight"], 4),
                               m.layers[0].self_attn.q_proj.weight, rtol=0, atol=0)
    a = M.load_model(str(tmp_path / "native"))
    assert a.embed_tokens.weight.dtype == torch.bfloat16
    M.save_model(a, tmp_path / "hf")
    b = M.load_model(str(tmp_path / "hf"))
    assert a.args == b.args == m.args
    assert state_equal(m, a) and state_equal(a, b)
    M.save_model(b, tmp_path / "native2", format="native")
    sd2 = load_file(tmp_path / "native2" / "consolidated.safetensors")
    assert all(torch.equal(sd[k], sd2[k]) for k in sd)


def test_native_permutation_is_the_rope_convention_change():
    # Adjacent-pair rotation on native rows == half rotation on permuted rows.
    torch.manual_seed(0)
    n_heads, E, d_in = 2, 8, 5
    w_native = torch.randn(n_heads * E, d_in)
    x = torch.randn(d_in)
    theta = torch.rand(E // 2) * 3
    q_nat = (w_native @ x).view(n_heads, E // 2, 2)
    c, s = theta.cos(), theta.sin()
    rot_nat = torch.stack([q_nat[..., 0] * c - q_nat[..., 1] * s, q_nat[..., 0] * s + q_nat[..., 1] * c], -1)
    q_hf = (M.permute_native_to_hf(w_native, n_heads) @ x).view(n_heads, E)
    rot_hf = q_hf * torch.cat([c, c]) + M.rotate_half(q_hf) * torch.cat([s, s])
    torch.testing.assert_close(rot_hf, M.permute_native_to_hf(rot_nat.reshape(n_heads * E, 1), n_heads).view(n_heads, E))
    assert torch.equal(M.permute_hf_to_native(M.permute_native_to_hf(w_native, n_heads), n_heads), w_native)


@pytest.mark.parametrize("layout", ["model.language_model.", "language_model.model."])
def test_multimodal_wrapper_text_part_loads(tmp_path, layout):
    m = build(tiny())
    sd = {}
    for n, t in m.state_dict().items():
        if n == "lm_head.weight":
            sd["language_model.lm_head.weight" if layout.startswith("language_model") else "lm_head.weight"] = t
        else:
            sd[layout + n] = t
    sd["model.vision_tower.transformer.layers.0.attention.q_proj.weight"] = torch.zeros(4, 4)
    sd["model.multi_modal_projector.linear_1.weight"] = torch.zeros(4, 4)
    save_file(sd, tmp_path / "model.safetensors")
    cfg = {"model_type": "mistral3", "text_config": M.hf_config(m.args), "vision_config": {"hidden_size": 4}}
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    r = M.load_model(str(tmp_path))
    torch.testing.assert_close(logits_of(r), logits_of(m), rtol=0, atol=0)


def test_plain_mistral_config_with_rope_theta_at_top_level(tmp_path):
    m = build(tiny())
    M.save_model(m, tmp_path)
    cfg = json.load(open(tmp_path / "config.json"))
    cfg.pop("rope_parameters")
    cfg.update(model_type="mistral", rope_theta=m.args.rope_theta)
    json.dump(cfg, open(tmp_path / "config.json", "w"))
    r = M.load_model(str(tmp_path))
    assert r.args == m.args


def test_matches_transformers_ministral3(tmp_path):
    import transformers as tf  # requirements-test.txt: a missing package fails, it does not skip
    m = build(tiny(yarn_factor=4.0, yarn_original_max_pos=16, qtemp_beta=0.1, qtemp_original_max_pos=16, max_seq_len=64))
    M.save_model(m, tmp_path)
    hf = tf.AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32, local_files_only=True).eval()
    x = torch.randint(0, 512, (2, 60))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, m(x), atol=2e-5, rtol=1e-4)


# -- bad input ------------------------------------------------------------------------------------

@pytest.fixture
def ckpt(tmp_path):
    m = build(tiny())
    M.save_model(m, tmp_path / "ck")
    return tmp_path / "ck", m


def test_missing_folder_and_files(tmp_path, ckpt):
    with pytest.raises(CheckpointError, match="does not exist"):
        M.load_model(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither config.json nor params.json"):
        M.load_model(str(tmp_path / "empty"))
    path, _ = ckpt
    os.remove(path / "model.safetensors")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        M.load_model(str(path))


def test_truncated_safetensors(ckpt):
    path, _ = ckpt
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        M.load_model(str(path))


def test_shape_mismatch_and_contradicting_config(ckpt):
    path, _ = ckpt
    cfg = json.load(open(path / "config.json"))
    json.dump(cfg | {"intermediate_size": 128}, open(path / "config.json", "w"))
    with pytest.raises(CheckpointError, match="has shape .* the config and the weights disagree"):
        M.load_model(str(path))
    json.dump(cfg | {"num_hidden_layers": 1}, open(path / "config.json", "w"))
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.1"):
        M.load_model(str(path))
    json.dump(cfg | {"tie_word_embeddings": True}, open(path / "config.json", "w"))
    M.load_model(str(path))  # a tied config may ignore a stored head copy
    json.dump(cfg | {"num_hidden_layers": 3}, open(path / "config.json", "w"))
    with pytest.raises(CheckpointError, match="missing tensor"):
        M.load_model(str(path))


def test_missing_key_and_unknown_model_type(ckpt):
    path, m = ckpt
    sd = load_file(path / "model.safetensors")
    sd.pop("model.norm.weight")
    save_file(sd, path / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensor.*norm.weight"):
        M.load_model(str(path))
    cfg = json.load(open(path / "config.json"))
    json.dump(cfg | {"model_type": "gpt2"}, open(path / "config.json", "w"))
    with pytest.raises(CheckpointError, match="model_type 'gpt2' is not supported"):
        M.load_model(str(path))
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        M.load_model(str(path))


def test_failed_save_keeps_the_previous_checkpoint(ckpt, monkeypatch):
    path, m = ckpt
    before = (path / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(M, "save_file", boom)
    with pytest.raises(OSError):
        M.save_model(build(tiny(), seed=5), path)
    assert (path / "model.safetensors").read_bytes() == before
    assert not [p for p in os.listdir(path.parent) if ".tmp-" in p]


def test_bad_model_args():
    with pytest.raises(ValueError, match="n_layers must be a positive integer"):
        tiny(n_layers=0)
    with pytest.raises(ValueError, match="multiple of n_kv_heads"):
        tiny(n_heads=5)
    with pytest.raises(ValueError, match="unknown model preset"):
        ModelArgs.preset("70b")


def test_flops_per_token():
    a = ModelArgs.preset("3b")
    # tied: the embedding matrix is the head, counted once as a matmul; norm weights are not matmuls
    n = M.num_params(a) - a.dim * (2 * a.n_layers + 1)
    assert M.flops_per_token(a, 0) == 6 * n
    assert M.flops_per_token(a, 4096, training=False) == 2 * n + 2 * 26 * 32 * 128 * 4096
