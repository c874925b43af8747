"""vision.py: image tokens, preprocessing, 2D RoPE, block-diagonal attention, the patch merger, checkpoints,
the frozen ViT, bad input, images in the chat format, and parity with transformers' Mistral3 (where installed)."""
import io
import json
import math

import pytest
import torch
from PIL import Image
from safetensors import safe_open

import data as D
import model as M
import vision as V

TINY = V.VisionArgs.preset("tiny")  # patch 4, merge 2: one image token = 8 px; max side 64 px
TEXT = M.ModelArgs.preset("tiny")


def rand_image(w, h, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())


def tiny_vlm(seed=0, act="silu"):
    torch.manual_seed(seed)
    vit = V.VisionTransformer(V.VisionArgs.preset("tiny") if act == "silu" else
                              V.VisionArgs(**{**vars(TINY), "hidden_act": act}))
    vit.init_weights(seed, std=0.2)
    proj = V.Projector(TINY.hidden_size, TEXT.dim)
    proj.init_weights(seed + 1, std=0.2)
    text = M.Transformer(TEXT)
    text.init_weights(seed + 2)
    with torch.no_grad():  # norms away from 1 so a mixed-up norm weight shows
        for m in (vit, proj, text):
            for n, p in m.named_parameters():
                if n.endswith("norm.weight") or n == "ln_pre.weight":
                    p.add_(torch.randn(p.shape) * 0.2)
    return V.VisionLanguageModel(vit, proj, text).eval()


# -- image tokens and preprocessing ------------------------------------------------------------------


@pytest.mark.parametrize("w,h,expect", [
    (1, 1, (1, 1)), (28, 28, (1, 1)), (29, 28, (2, 1)), (100, 50, (4, 2)), (57, 300, (3, 11)),
    (1540, 1540, (55, 55)), (3080, 1000, (55, 18)),  # above 1540: halved to 1540 x 500
    (4620, 842, (55, 11)),  # a third: 842 / 3 = 280.7 rounds to 281 px, which needs an 11th row
    (20000, 3, (55, 1)),  # extreme aspect ratio: the short side keeps 1 px
])
def test_image_token_counts_and_layout(w, h, expect):
    real = V.VisionArgs()
    assert V.image_token_grid(w, h, real) == expect
    from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs
    enc = ImageEncoder(ImageConfig(image_patch_size=14, max_image_size=1540, spatial_merge_size=2),
                       SpecialImageIDs(img=10, img_break=12, img_end=13))
    assert enc._image_to_num_tokens(Image.new("RGB", (w, h))) == expect  # mistral-common's rule
    wt, ht = expect
    ids = V.image_tokens(wt, ht, real)
    rows = [ids[r * (wt + 1):(r + 1) * (wt + 1)] for r in range(ht)]
    assert len(ids) == (wt + 1) * ht
    for r, row in enumerate(rows):
        assert row[:-1] == [10] * wt and row[-1] == (13 if r == ht - 1 else 12)


def test_preprocess_shape_and_normalisation():
    x, ids = V.preprocess(Image.new("RGB", (50, 30), (200, 100, 50)))  # real args: 2 x 2 tokens of 28 px
    assert x.shape == (3, 56, 56) and x.dtype == torch.float32
    assert ids == [10, 10, 12, 10, 10, 13]
    want = [(c / 255 - m) / s for c, m, s in zip((200, 100, 50), V.CLIP_MEAN, V.CLIP_STD)]
    for c in range(3):
        assert torch.allclose(x[c], torch.full((56, 56), want[c]), atol=1e-5), c
    # transparent pixels become white (mistral-common), grey images get three channels
    x, _ = V.preprocess(Image.new("RGBA", (10, 10), (0, 0, 0, 0)))
    assert torch.allclose(x[:, 3, 3], torch.tensor([(1 - m) / s for m, s in zip(V.CLIP_MEAN, V.CLIP_STD)]), atol=1e-5)
    x, ids = V.preprocess(Image.new("L", (300, 10), 0), TINY)  # tiny: max side 64 -> 64 x 2 px -> 8 x 1 tokens
    assert x.shape == (3, 8, 64) and ids == [10] * 8 + [13]
    # a gradient keeps its orientation (width is the last axis)
    ramp = Image.fromarray(torch.arange(56).repeat(28, 1).mul(4).byte().numpy())
    x, _ = V.preprocess(ramp)
    assert x.shape == (3, 28, 56) and bool((x[0, 5, 1:] >= x[0, 5, :-1]).all())


# -- the ViT --------------------------------------------------------------------------------------


def test_rope_2d_positions_by_hand():
    args = V.VisionArgs(hidden_size=16, intermediate_size=8, n_layers=1, n_heads=2, rope_theta=100.0)  # E = 8
    pos = V.patch_positions([(2, 3)])
    assert pos.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    cos, sin = V.rope_2d(pos, V.vision_inv_freq(args), torch.float64)
    f = [1 / 100 ** (2 * i / 8) for i in range(4)]  # base frequencies f_0..f_3
    for n, (r, c) in enumerate(pos.tolist()):
        angles = [r * f[0], r * f[2], c * f[1], c * f[3]]  # rows on the even ones, columns on the odd ones
        assert cos[n].tolist() == pytest.approx([math.cos(a) for a in angles * 2], abs=1e-6)
        assert sin[n].tolist() == pytest.approx([math.sin(a) for a in angles * 2], abs=1e-6)
    pos2 = V.patch_positions([(1, 2), (2, 1)])  # packed images restart at (0, 0)
    assert pos2.tolist() == [[0, 0], [0, 1], [0, 0], [1, 0]]


def test_block_diagonal_masking(one_thread):
    vit = tiny_vlm().vision_tower
    a, _ = V.preprocess(rand_image(24, 16, 1), TINY)
    b, _ = V.preprocess(rand_image(8, 40, 2), TINY)
    with torch.no_grad():
        for impl in ("sdpa", "reference"):
            vit.attention = impl
            fa = vit([a])
            ab = vit([a, b])
            ba = vit([b, a])
            na = fa.shape[0]
            assert na == (16 // 4) * (24 // 4)
            torch.testing.assert_close(ab[:na], fa, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(ba[-na:], fa, rtol=1e-5, atol=1e-5)
        vit.attention = "sdpa"
        fast = vit([a, b])
        vit.attention = "reference"
        torch.testing.assert_close(vit([a, b]), fast, rtol=1e-5, atol=1e-5)


def test_patch_merger_order_against_a_loop():
    g = torch.Generator().manual_seed(0)
    grids = [(4, 6), (2, 2)]
    Dm = 5
    x = torch.randn(sum(h * w for h, w in grids), Dm, generator=g)
    out = V.patch_merge(x, grids, 2)
    rows, start = [], 0
    for h, w in grids:
        img = x[start:start + h * w].view(h, w, Dm)
        for i in range(0, h, 2):  # merged tokens row-major over the image
            for j in range(0, w, 2):
                v = torch.empty(Dm * 4)
                for c in range(Dm):
                    for kh in range(2):
                        for kw in range(2):
                            v[c * 4 + kh * 2 + kw] = img[i + kh, j + kw, c]  # channel-major (section 6)
                rows.append(v)
        start += h * w
    assert torch.equal(out, torch.stack(rows))


def test_frozen_vit_gets_no_gradient_and_the_projector_does(one_thread):
    vlm = tiny_vlm().train()
    x, ids = V.preprocess(rand_image(16, 16), TINY)
    tokens = torch.tensor([[1, 50] + ids + [60, 70]])
    vlm(tokens, [x]).logsumexp(-1).sum().backward()
    assert all(p.grad is None for p in vlm.vision_tower.parameters())
    assert all(not p.requires_grad for p in vlm.vision_tower.parameters())
    for n, p in vlm.multi_modal_projector.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n
    assert vlm.language_model.embed_tokens.weight.grad is not None


def test_img_tokens_take_the_features_in_order(one_thread):
    vlm = tiny_vlm()
    a, ia = V.preprocess(rand_image(16, 8, 1), TINY)
    b, ib = V.preprocess(rand_image(8, 16, 2), TINY)
    ids = torch.tensor([[1, 40] + ia + [41] + ib + [42]])
    with torch.no_grad():
        emb = vlm.embed(ids, [a, b])
        feats = vlm.image_features([a, b])
        text = vlm.language_model.embed_tokens(ids)
    is_img = ids[0] == 10
    assert torch.equal(emb[0, is_img], feats)
    assert torch.equal(emb[0, ~is_img], text[0, ~is_img])  # [IMG_BREAK], [IMG_END] and text keep text embeddings
    with torch.no_grad():
        assert not torch.allclose(vlm(ids, [a, b]), vlm(ids, [b, a]))  # the order of the images matters


# -- checkpoints --------------------------------------------------------------------------------------


def native_rope_reference(x_NHE, pos_N2, theta):
    """mistral-inference's 2D RoPE on native (interleaved) q rows: complex pairs (2i, 2i+1), the first E/4
    pairs rotated by row * freqs[0::2], the rest by column * freqs[1::2]."""
    E = x_NHE.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, E, 2).double() / E)
    ang = torch.cat([pos_N2[:, :1].double() * freqs[0::2], pos_N2[:, 1:].double() * freqs[1::2]], dim=-1)  # [N, E/2]
    z = torch.view_as_complex(x_NHE.double().reshape(*x_NHE.shape[:-1], E // 2, 2))
    return torch.view_as_real(z * torch.polar(torch.ones_like(ang), ang)[:, None]).flatten(-2)


def test_checkpoint_round_trip_both_formats(tmp_path, one_thread):
    vlm = tiny_vlm()
    a, ia = V.preprocess(rand_image(16, 24, 1), TINY)
    b, ib = V.preprocess(rand_image(40, 8, 2), TINY)
    ids = torch.tensor([[1, 30] + ia + [31] + ib + [32, 33]])
    with torch.no_grad():
        ref = vlm(ids, [a, b])
    for fmt in ("hf", "native"):
        V.save_vlm(vlm, tmp_path / fmt, format=fmt)
        back = V.load_vlm(tmp_path / fmt).eval()
        for (n, p), (n2, q) in zip(vlm.state_dict().items(), back.state_dict().items()):
            assert n == n2 and torch.equal(p, q), (fmt, n)
        with torch.no_grad():
            assert torch.equal(back(ids, [a, b]), ref)
        vit2, proj2 = V.load_vision(tmp_path / fmt)
        assert torch.equal(vit2.transformer.layers[1].attention.k_proj.weight,
                           vlm.vision_tower.transformer.layers[1].attention.k_proj.weight)
    # The native file holds vision q/k in the interleaved order: native RoPE on its rows equals ours.
    with safe_open(str(tmp_path / "native" / "consolidated.safetensors"), "pt") as f:
        wq_native = f.get_tensor("vision_encoder.transformer.layers.0.attention.wq.weight")
        keys = set(f.keys())
    assert {"pre_mm_projector_norm.weight", "patch_merger.merging_layer.weight", "vision_language_adapter.w_in.weight",
            "vision_language_adapter.w_out.weight", "vision_encoder.ln_pre.weight", "tok_embeddings.weight"} <= keys
    att = vlm.vision_tower.transformer.layers[0].attention
    x = torch.randn(6, TINY.hidden_size)
    pos = V.patch_positions([(2, 3)])
    cos, sin = V.rope_2d(pos, V.vision_inv_freq(TINY), torch.float32)
    H, E = TINY.n_heads, TINY.head_dim
    ours = M.apply_rope(att.q_proj(x).view(1, 6, H, E).transpose(1, 2), cos[None], sin[None])[0].transpose(0, 1)
    theirs = native_rope_reference((x @ wq_native.T).view(6, H, E), pos, TINY.rope_theta)
    theirs = M.permute_native_to_hf(theirs.reshape(6, H * E).T, H).T.reshape(6, H, E)  # back to halves order
    torch.testing.assert_close(ours.double(), theirs, rtol=1e-5, atol=1e-5)
    cfg = json.load(open(tmp_path / "hf" / "config.json"))
    assert cfg["model_type"] == "mistral3" and cfg["vision_config"]["patch_size"] == 4


# -- bad input ----------------------------------------------------------------------------------------


def test_bad_input_gets_a_clear_error(tmp_path, capsys, one_thread):
    bad = tmp_path / "photo.jpg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg" * 10)
    with pytest.raises(ValueError, match="photo.jpg is not a readable image"):
        V.load_image(str(bad))
    assert V.main(["--images", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "photo.jpg" in err[0] and "corrupt" in err[0]
    # truncated: a real JPEG cut in half
    buf = io.BytesIO()
    rand_image(64, 64).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    with pytest.raises(ValueError, match="cut.jpg is not a readable image"):
        V.load_image(str(tmp_path / "cut.jpg"))
    for w, h in ((0, 5), (5, 0), (0, 0)):
        with pytest.raises(ValueError, match="at least one pixel"):
            V.preprocess(Image.new("RGB", (w, h)))
    vlm = tiny_vlm()
    x, ids = V.preprocess(rand_image(16, 16), TINY)
    with pytest.raises(ValueError, match=r"5 \[IMG\] tokens but the 1 image\(s\) give 4 features"):
        vlm(torch.tensor([[1] + ids + [10]]), [x])
    with pytest.raises(ValueError, match=r"4 \[IMG\] tokens but the 0 image"):
        vlm(torch.tensor([[1] + ids]))
    with pytest.raises(ValueError, match="multiples of 8"):
        vlm.vision_tower([torch.zeros(3, 12, 16)])
    with pytest.raises(ValueError, match="expected a \\[3, H, W\\] tensor"):
        vlm.vision_tower([torch.zeros(16, 16)])


# -- images in the chat format -------------------------------------------------------------------------


def test_chat_with_images():
    tok = D.Tokenizer.from_file(vocab_size=2048)
    img = Image.new("RGB", (16, 8), "red")  # tiny args: 2 x 1 tokens -> [IMG] [IMG] [IMG_END]
    msgs = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, {"type": "image", "image": img},
                                         {"type": "text", "text": "What?"}]},
            {"role": "assistant", "content": "A red box."}]
    ids, mask, images = V.encode_chat(tok, msgs, TINY)
    INST, END = tok.special_id("[INST]"), tok.special_id("[/INST]")
    want = [1, INST, *tok.encode("Look:"), 10, 10, 13, *tok.encode("What?"), END, *tok.encode("A red box."), 2]
    assert ids == want and len(images) == 1 and images[0].shape == (3, 8, 16)
    assert mask == [0] * (len(want) - len(tok.encode("A red box.")) - 1) + [1] * (len(tok.encode("A red box.")) + 1)
    # mistral-common's normalisation: [text, image] encodes image first; consecutive user messages merge
    ids2, _, imgs2 = V.encode_chat(tok, [{"role": "user", "content": [{"type": "text", "text": "Hi"}]},
                                         {"role": "user", "content": [{"type": "text", "text": "there"},
                                                                      {"type": "image", "image": img}]}], TINY)
    assert ids2 == [1, INST, 10, 10, 13, *tok.encode("Hi\n\nthere"), END] and len(imgs2) == 1
    # text-only lists equal plain strings
    assert tok.encode_chat([{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]) \
        == tok.encode_chat([{"role": "user", "content": "a\n\nb"}])
    with pytest.raises(ValueError, match="pass image_encoder"):
        tok.encode_chat(msgs)
    with pytest.raises(ValueError, match="only user messages"):
        tok.encode_chat([{"role": "user", "content": "x"}, {"role": "assistant", "content": [{"type": "image", "image": img}]}])
    with pytest.raises(ValueError, match="part 0"):
        tok.encode_chat([{"role": "user", "content": [{"type": "video", "video": 1}]}])


def test_photographs_from_a_folder(tmp_path, capsys, one_thread):
    rand_image(640, 480, 3).save(tmp_path / "cat.jpg", quality=90)  # a Pillow-written JPEG stands in for a photo
    Image.new("RGBA", (30, 90), (0, 128, 0, 128)).save(tmp_path / "logo.png")
    (tmp_path / "notes.txt").write_text("not an image")
    assert V.main(["--images", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cat.jpg: 640x480 px -> 644x504 px, 414 [IMG] tokens (432 with breaks)" in out  # 23 x 18 tokens of 28 px
    assert "logo.png: 30x90 px -> 56x112 px, 8 [IMG] tokens" in out and "notes.txt" not in out
    vlm = tiny_vlm()
    V.save_vlm(vlm, tmp_path / "ckpt")
    assert V.main(["--images", str(tmp_path / "cat.jpg"), "--load", str(tmp_path / "ckpt")]) == 0
    assert "ViT features (192, 32)" in capsys.readouterr().out  # 640x480 -> 64x48 px -> 16x12 patches of 4 px


# -- parity with transformers ----------------------------------------------------------------------


def _hf_tiny_mistral3(tf, tied=False):
    """tied: transformers' own default, tie_word_embeddings=True at the top level while text_config says False
    (the released Ministral 3 3B is tied); its checkpoint then holds no lm_head.weight."""
    tie = {} if tied else dict(tie_word_embeddings=False)
    cfg = tf.Mistral3Config(
        text_config=dict(model_type="ministral3", hidden_size=64, num_hidden_layers=2, head_dim=16,
                         intermediate_size=96, num_attention_heads=4, num_key_value_heads=2, vocab_size=300,
                         rms_norm_eps=1e-5, max_position_embeddings=1024, **tie,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "llama_4_scaling_beta": 0.0,
                                          "original_max_position_embeddings": 1024}),
        vision_config=dict(model_type="pixtral", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, head_dim=16, patch_size=4, image_size=64, hidden_act="silu",
                           rope_parameters={"rope_type": "axial", "rope_theta": 10000.0}),
        image_token_index=10, spatial_merge_size=2, **tie)
    torch.manual_seed(0)
    hf = tf.Mistral3ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for n, p in hf.named_parameters():
            big = "norm" in n or "ln_pre" in n or "multi_modal_projector.linear" in n  # O(1) GELU inputs
            p.add_(torch.randn_like(p) * (0.3 if big else 0.02))
    return hf


def _hf_inputs(xs):
    sizes = torch.tensor([list(x.shape[1:]) for x in xs])
    pv = torch.zeros(len(xs), 3, int(sizes[:, 0].max()), int(sizes[:, 1].max()))
    for i, x in enumerate(xs):
        pv[i, :, :x.shape[1], :x.shape[2]] = x
    return pv, sizes


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("tied", [False, True])
def test_matches_transformers_mistral3(tmp_path, one_thread, tied):
    import transformers as tf  # requirements-test.txt: a missing package fails, it does not skip
    hf = _hf_tiny_mistral3(tf, tied)
    assert (hf.lm_head.weight is hf.model.language_model.embed_tokens.weight) == tied
    hf.save_pretrained(tmp_path / "hf")
    vlm = V.load_vlm(tmp_path / "hf").eval()
    assert (vlm.language_model.lm_head.weight is vlm.language_model.embed_tokens.weight) == tied
    args = vlm.vision_args
    xs, ids = [], [1, 50, 60]
    for k, (w, h) in enumerate([(30, 20), (17, 40)]):  # two images of different sizes
        x, t = V.preprocess(rand_image(w, h, k), args)
        xs.append(x)
        ids += t + [70 + k, 80]
    ids = torch.tensor([ids])
    pv, sizes = _hf_inputs(xs)
    with torch.no_grad():
        want_f = hf.model.vision_tower(pv, image_sizes=sizes).last_hidden_state[0]
        want = hf(input_ids=ids, pixel_values=pv, image_sizes=sizes).logits
        assert rel(vlm.vision_tower(xs), want_f) < 1e-4
        want_p = torch.cat(hf.model.get_image_features(pixel_values=pv, image_sizes=sizes).pooler_output)
        assert rel(vlm.image_features(xs), want_p) < 1e-5  # projector output (exact GELU, merge order)
        assert rel(vlm(ids, xs), want) < 1e-4
        # our HF save loads in transformers; our native save loads back to the same logits
        V.save_vlm(vlm, tmp_path / "ours", format="hf")
        hf2 = tf.Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "ours", local_files_only=True).eval()
        assert rel(hf2(input_ids=ids, pixel_values=pv, image_sizes=sizes).logits, want) < 1e-4
        V.save_vlm(vlm, tmp_path / "native", format="native")
        assert rel(V.load_vlm(tmp_path / "native")(ids, xs), want) < 1e-4


def test_bf16_follows_fp32(tmp_path, one_thread):
    vlm = tiny_vlm()
    a, ia = V.preprocess(rand_image(24, 16, 1), TINY)
    b, ib = V.preprocess(rand_image(16, 32, 2), TINY)
    ids = torch.tensor([[1, 30] + ia + [31] + ib + [32]])
    V.save_vlm(vlm, tmp_path / "ck")
    half = V.load_vlm(tmp_path / "ck", dtype=torch.bfloat16).eval()
    assert half.vision_tower.patch_conv.weight.dtype == torch.bfloat16
    assert half.language_model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        want = vlm(ids, [a, b])
        got = half(ids, [a, b])  # fp32 images are cast to the ViT's dtype
    assert got.dtype == torch.bfloat16
    assert rel(got.float(), want) < 3e-2
