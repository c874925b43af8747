"""Benchmark: the ViT forward (images/s) and one multimodal training step, ours vs transformers' Pixtral / Mistral3.

ViT forward: vision.VisionTransformer against transformers' `PixtralVisionModel` holding the same weights
(our parameter names are its names, so the state dict loads as is), on the same preprocessed images of
two sizes packed in one call (theirs: padded to one batch tensor plus `image_sizes`, its own convention).

Training step ("projector step"): the ViT frozen, the projector and the text model trained, as in the
cascade's distillation and in SFT (PAPER.md sections 6 and 8): ViT forward without grad, projector,
[IMG] splice, text forward, next-token CE, backward, grad clip 1.0, AdamW. Ours: vision.VisionLanguageModel
with distill.py's fused CE through `head_fn` and train.py's optimizer; theirs: transformers'
`Mistral3ForConditionalGeneration` with the same weights (saved by vision.save_vlm, loaded by
from_pretrained), its vision tower frozen, its own `labels=` loss and torch's AdamW.

Shapes: on the CPU a small ViT (VisionArgs preset bench-cpu: d 256, 4 layers, 4 heads, patch 14) on 8 images
(4 of 224 x 224 and 4 of 168 x 280 px, 256 and 240 patches), fp32; the step adds the text preset bench-cpu
(d 256, 4 layers, vocab 8192) with B 8 x T 256, one image per row. On a GPU the real ViT (24 layers, d 1024)
on 8 images of 1024 x 768 px and the 3B text shape, bf16 (code path written, not run yet: no GPU lent).
Time: median of `iters` calls after `warmup`, the device synchronised around each; process CPU time is
recorded beside wall time because the CPU is shared while these records are taken. Floor: the matmul
FLOPs (`vit_flops`, `step_flops`) at the rate of one 1024^3 fp32 matmul measured in the same run (per
process-CPU second on the CPU); "x floor" = measured / floor.

Run: `python benchmarks/vision_bench.py [--device cuda]` or `python bench.py vision --record`.
Depends on: vision.py, model.py, train.py, distill.py (transformers optional: the HF rows are skipped without it).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import distill as DI  # noqa: E402
import model as M  # noqa: E402
import train as T  # noqa: E402
import vision as V  # noqa: E402
from measure import mem_mark, mem_peak, run_fresh, timed_median  # noqa: E402

CPU_SHAPE = dict(vision="bench-cpu", text="bench-cpu", sizes=[(224, 224)] * 4 + [(280, 168)] * 4, seq=256,
                 dtype="float32")
GPU_SHAPE = dict(vision="real", text="3b", sizes=[(1024, 768)] * 8, seq=4096, dtype="bfloat16")


def _images(sizes, args, seed=0):
    g = torch.Generator().manual_seed(seed)
    from PIL import Image
    out = []
    for w, h in sizes:
        img = Image.fromarray((torch.rand(h, w, 3, generator=g) * 255).byte().numpy())
        out.append(V.preprocess(img, args))
    return out


def vit_variant(impl: str, vision: str, sizes, dtype: str, device="cpu", warmup=1, iters=5, **_) -> dict:
    dt = getattr(torch, dtype)
    args = V.VisionArgs.preset(vision)
    vit = V.VisionTransformer(args)
    vit.init_weights(0)
    vit = vit.to(device=device, dtype=dt).eval()
    xs = [x.to(device, dt) for x, _ in _images(sizes, args)]
    if impl == "hf":
        import transformers
        cfg = transformers.PixtralVisionConfig(**{k: v for k, v in V._vision_config_hf(args).items() if k != "model_type"})
        net = transformers.PixtralVisionModel(cfg)
        net.load_state_dict(vit.state_dict(), strict=True)
        net = net.to(device=device, dtype=dt).eval()
        sizes_t = torch.tensor([list(x.shape[1:]) for x in xs])
        pv = torch.zeros(len(xs), 3, int(sizes_t[:, 0].max()), int(sizes_t[:, 1].max()), device=device, dtype=dt)
        for i, x in enumerate(xs):
            pv[i, :, :x.shape[1], :x.shape[2]] = x
        run = lambda: net(pv, image_sizes=sizes_t).last_hidden_state
    else:
        run = lambda: vit(xs)
    base = mem_mark(device)
    with torch.no_grad():
        wall, cpu = timed_median(run, device, warmup, iters)
    return {"impl": impl, "images_s": len(xs) / wall, "ms_per_call": 1000 * wall, "cpu_ms_per_call": 1000 * cpu,
            "patches": sum(x.shape[1] * x.shape[2] // args.patch_size ** 2 for x in xs),
            "peak_gib": (mem_peak(device) - base) / 2**30}


def _step_batch(args_v, args_t, sizes, seq, device):
    """One image per row at the start of a user turn, then random text up to seq tokens."""
    g = torch.Generator().manual_seed(1)
    rows, xs = [], []
    for x, ids in _images(sizes, args_v):
        text = torch.randint(1000, args_t.vocab_size, (seq + 1 - 2 - len(ids),), generator=g).tolist()
        rows.append([1, 3] + ids + text)
        xs.append(x)
    batch = torch.tensor(rows, device=device)
    return batch[:, :-1], batch[:, 1:].clone(), xs


def step_variant(impl: str, vision: str, text: str, sizes, seq: int, dtype: str, device="cpu", warmup=1, iters=3,
                 **_) -> dict:
    dt = getattr(torch, dtype)
    args_v, args_t = V.VisionArgs.preset(vision), M.ModelArgs.preset(text)
    vit = V.VisionTransformer(args_v)
    vit.init_weights(0)
    proj = V.Projector(args_v.hidden_size, args_t.dim, args_v.spatial_merge_size)
    proj.init_weights(1)
    lm = M.Transformer(args_t)
    lm.init_weights(2)
    vlm = V.VisionLanguageModel(vit, proj, lm)
    x_BT, y_BT, xs = _step_batch(args_v, args_t, sizes, seq, device)
    y_BT[(y_BT == 10) | (y_BT == 12) | (y_BT == 13)] = -100  # no loss on image placeholders
    xs = [x.to(device, dt) for x in xs]
    cfg = T.TrainConfig(lr=1e-4)
    if impl == "hf":
        import transformers
        with tempfile.TemporaryDirectory() as d:
            V.save_vlm(vlm, d)
            net = transformers.Mistral3ForConditionalGeneration.from_pretrained(d, dtype=dt, attn_implementation="sdpa",
                                                                                local_files_only=True)
        net = net.to(device)
        net.model.vision_tower.requires_grad_(False)
        sizes_t = torch.tensor([list(x.shape[1:]) for x in xs])
        pv = torch.zeros(len(xs), 3, int(sizes_t[:, 0].max()), int(sizes_t[:, 1].max()), device=device, dtype=dt)
        for i, x in enumerate(xs):
            pv[i, :, :x.shape[1], :x.shape[2]] = x
        # HF shifts labels itself (labels[t + 1] = y[t]), so it has T - 1 targets per row to our T
        labels = torch.cat([torch.full_like(y_BT[:, :1], -100), y_BT[:, :-1]], 1)
        forward = lambda: net(input_ids=x_BT, pixel_values=pv, image_sizes=sizes_t, labels=labels).loss
        opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                weight_decay=cfg.weight_decay)
    else:
        net = vlm.to(device=device, dtype=dt)
        ce = DI.ce_loss_fn(DI.DistillConfig())
        n = int((y_BT != -100).sum())
        forward = lambda: ce(lambda ids, head_fn: net(ids, xs, head_fn=head_fn), x_BT, y_BT, n)
        opt = T.make_optimizer(net, cfg)
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]

    def step():
        loss = forward()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    base = mem_mark(device)
    wall, cpu = timed_median(step, device, warmup, iters)
    return {"impl": impl, "step_s": wall, "cpu_s": cpu, "tok_s": x_BT.numel() / wall,
            "peak_gib": (mem_peak(device) - base) / 2**30, "trainable": sum(p.numel() for p in params)}


def vit_flops(args: V.VisionArgs, grids) -> float:
    """Forward matmul FLOPs of the ViT on packed images: conv + every linear per patch, plus QK^T and AV
    (2 * 2 * D * n per patch per layer for an image of n patches)."""
    D, Fw = args.hidden_size, args.intermediate_size
    per_patch = 2 * (args.num_channels * args.patch_size ** 2 * D + args.n_layers * (4 * D * D + 3 * D * Fw))
    return sum(n * (per_patch + args.n_layers * 4 * D * n) for n in (h * w for h, w in grids))


def step_flops(args_v: V.VisionArgs, args_t: M.ModelArgs, grids, batch: int, seq: int) -> float:
    """One training step: the frozen ViT forward, the projector forward + backward (6 x its weights per
    merged token), the text model forward + backward (model.flops_per_token)."""
    merged = sum(h * w for h, w in grids) // args_v.spatial_merge_size ** 2
    Dv, P = args_v.hidden_size, args_t.dim
    proj = 6 * merged * (4 * Dv * Dv + Dv * P + P * P)
    return vit_flops(args_v, grids) + proj + batch * seq * M.flops_per_token(args_t, seq, training=True)


def matmul_rate(device="cpu", dtype="float32", n=1024, iters=5) -> dict:
    """FLOP/s of one square matmul per wall second and per process-CPU second: the floor's yardstick."""
    dt = getattr(torch, dtype)
    a, b = torch.randn(n, n, device=device, dtype=dt), torch.randn(n, n, device=device, dtype=dt)
    wall, cpu = timed_median(lambda: a @ b, device, 2, iters)
    return {"n": n, "flops_wall": 2 * n ** 3 / wall, "flops_cpu": 2 * n ** 3 / cpu}


def bench_vision(device="cpu") -> dict:
    shape = GPU_SHAPE if str(device).startswith("cuda") else CPU_SHAPE
    impls = ["ours"] + (["hf"] if importlib.util.find_spec("transformers") else [])
    rows = {}
    for impl in impls:
        rows[f"vit_{impl}"] = run_fresh(__file__, "vit_variant", dict(impl=impl, device=device, **shape))
        rows[f"step_{impl}"] = run_fresh(__file__, "step_variant", dict(impl=impl, device=device, **shape))
    rows["matmul"] = run_fresh(__file__, "matmul_rate", dict(device=device, dtype=shape["dtype"]))
    args_v, args_t = V.VisionArgs.preset(shape["vision"]), M.ModelArgs.preset(shape["text"])
    grids = [(args_v.token_px * V.image_token_grid(w, h, args_v)[1] // args_v.patch_size,
              args_v.token_px * V.image_token_grid(w, h, args_v)[0] // args_v.patch_size) for w, h in shape["sizes"]]
    rate = rows["matmul"]["flops_cpu" if not str(device).startswith("cuda") else "flops_wall"]
    rows["floor"] = {"vit_flops": vit_flops(args_v, grids), "step_flops": step_flops(args_v, args_t, grids, len(grids), shape["seq"]),
                     "rate": rate}
    rows["floor"]["vit_s"] = rows["floor"]["vit_flops"] / rate
    rows["floor"]["step_s"] = rows["floor"]["step_flops"] / rate
    cpu = not str(device).startswith("cuda")
    for impl in impls:  # measured / floor, both in process-CPU seconds on the CPU (wall is inflated by sharing)
        v, st = rows[f"vit_{impl}"], rows[f"step_{impl}"]
        rows[f"vit_{impl}"]["x_floor"] = (v["cpu_ms_per_call"] / 1000 if cpu else v["ms_per_call"] / 1000) / rows["floor"]["vit_s"]
        rows[f"step_{impl}"]["x_floor"] = (st["cpu_s"] if cpu else st["step_s"]) / rows["floor"]["step_s"]
    print(f"\nViT forward ({shape['vision']} ViT, {len(shape['sizes'])} images {sorted(set(shape['sizes']))}, "
          f"{shape['dtype']}, {device}) and one training step (frozen ViT; projector + {shape['text']} text trained, "
          f"B {len(shape['sizes'])} x T {shape['seq']})")
    print(f"{'impl':<5} {'ViT images/s':>12} {'ms (cpu ms)':>14} {'x floor':>8} {'peak GiB':>9} {'step s (cpu s)':>16} "
          f"{'x floor':>8} {'tok/s':>8} {'peak GiB':>9}")
    for impl in impls:
        v, s = rows[f"vit_{impl}"], rows[f"step_{impl}"]
        print(f"{impl:<5} {v['images_s']:>12.1f} {v['ms_per_call']:>7.1f} ({v['cpu_ms_per_call']:>5.0f}) {v['x_floor']:>8.2f} "
              f"{v['peak_gib']:>9.3f} {s['step_s']:>8.3f} ({s['cpu_s']:>5.2f}) {s['x_floor']:>8.2f} {s['tok_s']:>8,.0f} "
              f"{s['peak_gib']:>9.3f}")
    f = rows["floor"]
    print(f"floor: {f['vit_flops'] / 1e9:.2f} GFLOP per ViT call, {f['step_flops'] / 1e9:.1f} GFLOP per step, at the "
          f"measured {rows['matmul']['n']}^3 matmul rate {f['rate'] / 1e9:.1f} GFLOP/s per {'CPU' if cpu else 'wall'} second")
    if "hf" in impls:
        rows["ratio_vit_images_s"] = rows["vit_ours"]["images_s"] / rows["vit_hf"]["images_s"]
        rows["ratio_vit_cpu_time"] = rows["vit_ours"]["cpu_ms_per_call"] / rows["vit_hf"]["cpu_ms_per_call"]
        rows["ratio_step_time"] = rows["step_ours"]["step_s"] / rows["step_hf"]["step_s"]
        rows["ratio_step_cpu_time"] = rows["step_ours"]["cpu_s"] / rows["step_hf"]["cpu_s"]
        rows["ratio_step_peak"] = rows["step_ours"]["peak_gib"] / max(rows["step_hf"]["peak_gib"], 1e-9)
        print(f"ours / HF: ViT images/s {rows['ratio_vit_images_s']:.2f}x (CPU time {rows['ratio_vit_cpu_time']:.2f}x), step time {rows['ratio_step_time']:.2f}x "
              f"(CPU time {rows['ratio_step_cpu_time']:.2f}x), step peak memory {rows['ratio_step_peak']:.2f}x")
    return rows


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    print(json.dumps(bench_vision(ap.parse_args().device), default=float))
