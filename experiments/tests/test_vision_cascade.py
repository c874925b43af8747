"""The embedded multimodal cascade (experiments/vision_cascade.py): the synthetic pictures, the caption loader's pairing
of images with ids, and (slow) the whole smoke run: every child sees the teacher's images through a frozen
ViT with its own fresh projector, and distillation lowers its KL to the parent."""
import json

import numpy as np
import pytest
import torch

import data as D
import vision as V
from experiments import vision_cascade as C


def test_shape_pictures_put_the_shape_where_the_caption_says():
    for k in range(24):
        img, caption = C.shape_picture(np.random.default_rng([5, k]))
        colour, shape, place = C._caption_parts(caption)
        a = np.asarray(img).astype(int)
        want = np.array(C.COLOURS[colour])
        hit = np.abs(a - want).sum(-1) < 30  # pixels of the shape's colour (the background is light grey)
        ys, xs = np.nonzero(hit)
        assert len(ys) >= 30, caption
        qx, qy = C.PLACES[place]
        assert ((xs >= 16) == bool(qx)).all() and ((ys >= 16) == bool(qy)).all(), caption
        if shape == "square":  # a square fills its bounding box; circles and triangles do not
            assert hit[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean() > 0.95
        else:
            assert hit[ys.min():ys.max() + 1, xs.min():xs.max() + 1].mean() < 0.9


def test_caption_loader_pairs_each_batch_with_its_images():
    tok = D.Tokenizer.from_file(vocab_size=2048)
    vargs = V.VisionArgs.preset("demo")
    ld = C.CaptionLoader(tok, vargs, 3, 64, seed=0)
    x0, y0 = ld.batch(0)
    x1, _ = ld.batch(1)
    assert x0.shape == (3, 64) and int((x0 == vargs.image_token_id).sum()) == 3 * 16  # 32 px pictures: 4 x 4 tokens
    # the targets are the caption tokens and </s> only
    img, caption = ld.sample(0)
    ids, mask, _ = C.caption_chat(tok, img, caption, vargs)
    assert [t for t in y0[0].tolist() if t != -100] == [t for t, m in zip(ids, mask) if m]
    assert tok.decode([t for t in y0[0].tolist() if t != -100]) == caption
    imgs0 = ld.images_for(x0)
    assert len(imgs0) == 3 and torch.equal(imgs0[0], V.preprocess(img, vargs)[0])
    ld.batch(2)
    with pytest.raises(RuntimeError, match="other than the next one"):
        ld.images_for(x0)  # the FIFO's head is batch 1


@pytest.mark.slow
def test_vision_cascade_smoke(tmp_path, one_thread):
    with pytest.raises(SystemExit) as e:
        C.main(["--preset", "smoke", "--out", str(tmp_path)])
    assert e.value.code == 0
    res = json.load(open(tmp_path / "vision" / "results.json"))
    rows = {r["stage"]: r for r in res["rows"]}
    assert list(rows) == ["parent", "14b pruned", "14b distilled", "8b pruned", "8b distilled", "3b pruned", "3b distilled"]
    for size in ("14b", "8b", "3b"):
        assert rows[f"{size} distilled"]["kl"] < rows[f"{size} pruned"]["kl"], size
    assert (tmp_path / "vision" / "table.md").exists()
    # the stages are cascade.py's: pruned text towers and distilled multimodal checkpoints, each with done.json
    for size in ("14b", "8b", "3b"):
        assert (tmp_path / "vision" / size / "init" / "done.json").exists()
        assert V.load_vlm(str(tmp_path / "vision" / size / "distilled" / "model")).args.dim == \
            C.C.miniature(C.TEXT["smoke"], size, res["seq_len"]).dim
    # a rerun reuses every stage and scores the same
    with pytest.raises(SystemExit):
        C.main(["--preset", "smoke", "--out", str(tmp_path)])
    again = json.load(open(tmp_path / "vision" / "results.json"))
    assert [r["caption"] for r in again["rows"]] == [r["caption"] for r in res["rows"]]
