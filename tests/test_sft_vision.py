"""sft.py with images: the ViT stays frozen while the projector (and text model) train, the loss through the
VLM forward equals the masked equation, a CPU micro-run learns a visual answer, jsonl image paths load."""
import dataclasses
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import data as D  # noqa: E402
import model as M  # noqa: E402
import sft as S  # noqa: E402
import train as T  # noqa: E402
import vision as V  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 1280
VARGS = V.VisionArgs.preset("tiny")  # patch 4, merge 2: one image token = 8 px
TEXT = M.ModelArgs(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=VOCAB,
                   rope_theta=1e4, max_seq_len=256)
COLOURS = {"red": (220, 30, 30), "green": (30, 170, 50), "blue": (40, 60, 220), "yellow": (230, 200, 20)}
QUESTION = "What colour is the shape?"


def tiny_vlm(seed=0, text=TEXT):
    vit = V.VisionTransformer(VARGS)
    vit.init_weights(seed, std=0.2)
    proj = V.Projector(VARGS.hidden_size, text.dim)
    proj.init_weights(seed + 1)
    lm = M.Transformer(text)
    lm.init_weights(seed + 2)
    return V.VisionLanguageModel(vit, proj, lm)


@pytest.fixture(scope="module")
def tok():
    return D.Tokenizer.from_file(vocab_size=VOCAB)


def picture(k, seed=0, size=16):
    """A coloured square on a noisy light background, at a random place and size; its colour name."""
    rng = np.random.default_rng([seed, k])
    name = list(COLOURS)[int(rng.integers(4))]
    img = Image.fromarray(rng.integers(215, 256, (size, size, 3)).astype(np.uint8))
    s = int(rng.integers(5, 10))
    x0, y0 = (int(v) for v in rng.integers(0, size - s + 1, 2))
    ImageDraw.Draw(img).rectangle([x0, y0, x0 + s - 1, y0 + s - 1], fill=COLOURS[name])
    return img, name


def colour_chat(img, answer=None):
    msgs = [{"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": QUESTION}]}]
    return msgs + ([{"role": "assistant", "content": answer}] if answer is not None else [])


def colour_accuracy(vlm, tok, n, seed):
    vlm.eval()
    hits = 0
    for k in range(n):
        img, name = picture(k, seed)
        ids, _, images = V.encode_chat(tok, colour_chat(img), VARGS)
        hits += tok.decode(V.greedy(vlm, ids, images, max_new_tokens=8, eos_id=tok.eos_id)).strip() == name
    vlm.train()
    return hits / n


def test_frozen_vit_gets_no_gradient_in_an_sft_step_while_the_projector_does(tok, tmp_path):
    torch.manual_seed(0)
    vlm = tiny_vlm()
    vlm.vision_tower.requires_grad_(True)  # run_sft must freeze it whatever it was given
    vit0 = {n: p.detach().clone() for n, p in vlm.vision_tower.named_parameters()}
    proj0 = {n: p.detach().clone() for n, p in vlm.multi_modal_projector.named_parameters()}
    text0 = {n: p.detach().clone() for n, p in vlm.language_model.named_parameters()}
    chats = [colour_chat(*picture(k)) for k in range(8)]
    cfg = T.TrainConfig(out_dir=str(tmp_path / "r"), steps=2, batch_size=4, micro_batch_size=4, seq_len=40, lr=1e-2,
                        warmup_steps=1, dtype="fp32", log_every=0, export=False)
    S.run_sft(vlm, chats, tok, cfg, S.SFTConfig(train_text=False), device="cpu")
    assert not any(p.requires_grad for p in vlm.vision_tower.parameters())
    assert all(p.grad is None for p in vlm.vision_tower.parameters())
    assert all(torch.equal(p, vit0[n]) for n, p in vlm.vision_tower.named_parameters())
    assert all(torch.equal(p, text0[n]) for n, p in vlm.language_model.named_parameters())  # projector only
    assert any(not torch.equal(p, proj0[n]) for n, p in vlm.multi_modal_projector.named_parameters())
    # one sft_loss backward by hand: the projector gets a gradient, the frozen ViT none
    examples, _ = S.encode_conversations(chats[:2], tok, 41, vision_args=VARGS)
    ids, mask = S.chat_batch(examples, tok.pad_id)
    vlm.language_model.requires_grad_(True)
    S.sft_loss(vlm, ids, mask, images=[x for e in examples for x in e[2]]).backward()
    assert all(p.grad is None for p in vlm.vision_tower.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in vlm.multi_modal_projector.parameters())


@pytest.mark.parametrize("with_teacher", [False, True])
def test_sft_loss_with_images_equals_the_masked_equation_through_the_vlm(tok, with_teacher):
    torch.manual_seed(0)
    student = tiny_vlm(0)
    teacher = tiny_vlm(5, dataclasses.replace(TEXT, dim=96, n_layers=3)) if with_teacher else None
    chats = [colour_chat(picture(0)[0], "red"), colour_chat(Image.new("RGB", (24, 8), "blue"), "a wide blue bar")]
    examples, _ = S.encode_conversations(chats, tok, 80, vision_args=VARGS)
    ids, mask = S.chat_batch(examples, tok.pad_id)
    images = [x for e in examples for x in e[2]]
    got = S.sft_loss(student, ids, mask, teacher, temperature=2.0, chunk_size=5, images=images)
    x, y = S.shift(ids, mask)
    valid = y.flatten() != -100
    zs = student(x, images).flatten(0, 1)[valid].float() / 2.0  # full logits [N, V], the equation
    if teacher is None:
        want = torch.nn.functional.cross_entropy(zs * 2.0, y.flatten()[valid])
    else:
        zt = teacher(x, images).flatten(0, 1)[valid].float() / 2.0
        want = (zt.softmax(-1) * (zt.log_softmax(-1) - zs.log_softmax(-1))).sum(-1).mean()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # the images matter: the same ids with other pictures give another loss
    other = [torch.flip(im, dims=[1]) for im in images]
    assert not torch.allclose(S.sft_loss(student, ids, mask, teacher, temperature=2.0, images=other), got)


def test_micro_run_on_pictures_raises_held_out_colour_accuracy(tok, tmp_path):
    torch.manual_seed(0)
    vlm = tiny_vlm()
    before = colour_accuracy(vlm, tok, 40, seed=99)
    chats = [colour_chat(*picture(k)) for k in range(256)]
    cfg = T.TrainConfig(out_dir=str(tmp_path / "r"), steps=80, batch_size=16, micro_batch_size=16, seq_len=40,
                        lr=3e-3, warmup_steps=8, dtype="fp32", log_every=0, export=False)
    out = S.run_sft(vlm, chats, tok, cfg, S.SFTConfig(), device="cpu")
    after = colour_accuracy(vlm, tok, 40, seed=99)
    assert out["history"][-1]["loss"] < out["history"][0]["loss"]
    assert before < 0.25 and after >= 0.7, (before, after)  # chance 0.25; seen 0.0 -> 0.8-0.9


def test_jsonl_with_image_paths_loads_and_a_bad_path_names_its_line(tok, tmp_path):
    (tmp_path / "img").mkdir()
    picture(0)[0].save(tmp_path / "img" / "a.png")
    picture(1)[0].save(tmp_path / "img" / "b.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    good = [{"messages": [{"role": "user", "content": [{"type": "image", "path": "img/a.png"},
                                                       {"type": "text", "text": QUESTION}]},
                          {"role": "assistant", "content": "red"}]},
            {"messages": [{"role": "user", "content": [{"type": "image", "image": "img/b.png"}]},
                          {"role": "assistant", "content": "blue"}]}]
    path = tmp_path / "chats.jsonl"
    path.write_text("\n".join(json.dumps(g) for g in good) + "\n")
    convs, bad = S.read_conversations(str(path), tok=tok)
    assert len(convs) == 2 and not bad
    examples, _ = S.encode_conversations(convs, tok, 80, vision_args=VARGS)
    want = preprocess_file(tmp_path / "img" / "a.png")
    assert torch.equal(examples[0][2][0], want) and len(examples[1][2]) == 1
    with pytest.raises(ValueError, match="holds an image but the student is a text model"):
        S.encode_conversations(convs, tok, 80)
    for line, reason in (({"type": "image", "path": "img/missing.png"}, "missing.png' not found"),
                         ({"type": "image", "path": "img/broken.png"}, "broken.png is not a readable image")):
        bad_path = tmp_path / "bad.jsonl"
        bad_line = {"messages": [{"role": "user", "content": [line]}, {"role": "assistant", "content": "x"}]}
        bad_path.write_text(json.dumps(good[0]) + "\n" + json.dumps(bad_line) + "\n")
        with pytest.raises(ValueError, match=rf"bad.jsonl:2: .*{reason}"):
            S.read_conversations(str(bad_path), tok=tok)
        convs, bad = S.read_conversations(str(bad_path), on_bad_line="skip", tok=tok)
        assert len(convs) == 1 and bad[0][0] == 2


def preprocess_file(path):
    return V.preprocess(V.load_image(str(path)), VARGS)[0]
