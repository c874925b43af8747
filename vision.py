"""Images in the token stream: the frozen Pixtral-style ViT, the projector, preprocessing, checkpoints.

Reading guide
-------------
Concept: PAPER.md section 6. Every Ministral 3 size sees images through Mistral Small 3.1's 410M ViT,
frozen, and a small projector retrained for each size. An image is resized so both sides are multiples
of 28 px (patch 14 x the 2x2 merge), cut into 14 px patches (Conv2d), normalised (`ln_pre`), and run
through 24 bidirectional SwiGLU blocks with 2D RoPE; the images of a batch are packed into one
sequence without padding and attend block-diagonally (each only to itself). The projector merges each
2x2 group of patch features into one token and maps it into the text width. In the text, an image of
w x h tokens is `([IMG] * w + [IMG_BREAK]) * h` with the last break replaced by `[IMG_END]`; only the
`[IMG]` embeddings are replaced by projected features, and the text model stays model.py's
`Transformer` fed input embeddings (it learns nothing about images).

The file reads top-down: config (`VisionArgs`), 2D RoPE and the ViT (`VisionTransformer`), the
projector (`Projector`, `patch_merge`), preprocessing (`preprocess`, `image_tokens`, `encode_chat`),
the whole model (`VisionLanguageModel`), checkpoints (`load_vision`, `load_vlm`, `save_vlm`), the CLI.

Deviations from the paper / reference code, and why:
 1. Resizing uses Pillow's bicubic filter (PAPER.md section 6). mistral-common resizes with OpenCV's
    INTER_CUBIC, which does not low-pass when shrinking, so downscaled pixels differ slightly; token
    counts and layout follow mistral-common's rule exactly (tested against it).
 2. RoPE rotates halves (the Hugging Face convention), as in model.py: native checkpoints have the
    vision q/k rows permuted on load and back on save (section 3), so a native round trip is bit-exact.
 3. Two attention paths: `attention="sdpa"` runs SDPA once per image on its slice of the packed
    sequence (block-diagonal without an N x N mask; a 1540 px image is 12,100 patches);
    `attention="reference"` builds the explicit block-diagonal mask with an fp32 softmax. Tests compare them.
 4. The ViT is frozen by construction in `VisionLanguageModel` (requires_grad False, run under no_grad
    while frozen): it stores no activations for backward; the projector and the text model train.
 5. Tiny `VisionArgs` presets (patch 4, 8 px tokens) make the embedded demo and tests run in seconds; the
    token rule is the same with 28 replaced by patch x merge.

Run: `python vision.py --images DIR [--load CKPT]` preprocesses every photograph in DIR (JPEG, PNG, ...),
prints its token grid and, with a checkpoint, the ViT feature shape; `python experiments/vision_cascade.py`
runs the embedded multimodal cascade.
Depends on: model.py (RMSNorm, RoPE helpers, attention, checkpoint I/O), data.py (the chat format).

Shape letters (as model.py): N packed patches of all images, M merged image tokens, D vision width,
H heads, E head dim, F FFN width, P text width (the projector's output), C channels, B, T text batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from safetensors.torch import save_file

import data as D
import model as M

# -----------------------------------------------------------------------------
# Config

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # section 6
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionArgs:
    hidden_size: int = 1024  # D, ViT width (section 6)
    intermediate_size: int = 4096  # F, SwiGLU width
    n_layers: int = 24
    n_heads: int = 16  # head dim E = D / H = 64
    patch_size: int = 14  # Conv2d kernel and stride, px
    max_image_size: int = 1540  # longer side above this is scaled down first
    rope_theta: float = 10000.0  # 2D RoPE base
    norm_eps: float = 1e-5  # RMSNorm eps (ln_pre and the blocks)
    num_channels: int = 3
    spatial_merge_size: int = 2  # the projector merges merge x merge patches into one token
    hidden_act: str = "silu"  # SwiGLU activation (real checkpoints: silu; transformers' default if unset: gelu)
    image_token_id: int = 10  # [IMG]
    image_break_token_id: int = 12  # [IMG_BREAK]
    image_end_token_id: int = 13  # [IMG_END]

    def __post_init__(self):
        for name in ("hidden_size", "intermediate_size", "n_layers", "n_heads", "patch_size", "max_image_size",
                     "num_channels", "spatial_merge_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"VisionArgs.{name} must be a positive integer, got {v!r}")
        if self.hidden_size % self.n_heads or (self.hidden_size // self.n_heads) % 4:
            raise ValueError(f"hidden_size {self.hidden_size} / n_heads {self.n_heads} must be a multiple of 4 "
                             f"(2D RoPE splits each head's frequencies between rows and columns)")
        if self.hidden_act not in ("silu", "gelu"):
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported: silu or gelu")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_heads

    @property
    def token_px(self) -> int:
        """Pixels per image token side: patch x merge (28 for the real ViT)."""
        return self.patch_size * self.spatial_merge_size

    @staticmethod
    def preset(name: str) -> "VisionArgs":
        if name not in VISION_PRESETS:
            raise ValueError(f"unknown vision preset {name!r}: choose one of {', '.join(VISION_PRESETS)}")
        return dataclasses.replace(VISION_PRESETS[name])


VISION_PRESETS = {
    "real": VisionArgs(),  # Mistral Small 3.1's ViT, shared by every Ministral 3 size (~400M parameters)
    "tiny": VisionArgs(hidden_size=32, intermediate_size=64, n_layers=2, n_heads=2, patch_size=4, max_image_size=64),
    "demo": VisionArgs(hidden_size=64, intermediate_size=128, n_layers=2, n_heads=4, patch_size=4, max_image_size=64),
    "bench-cpu": VisionArgs(hidden_size=256, intermediate_size=1024, n_layers=4, n_heads=4, patch_size=14,
                            max_image_size=448),
}


# -----------------------------------------------------------------------------
# 2D RoPE and the ViT


def vision_inv_freq(args: VisionArgs) -> torch.Tensor:
    """[E/2]: the row frequencies (even base frequencies) then the column frequencies (odd ones)."""
    E = args.head_dim
    base = 1.0 / (args.rope_theta ** (torch.arange(0, E, 2, dtype=torch.float64) / E))  # E/2 base frequencies
    return torch.cat([base[0::2], base[1::2]]).float()


def patch_positions(grids: list[tuple[int, int]], device=None) -> torch.Tensor:
    """[N, 2] (row, column) of every patch, images packed in order, each row-major."""
    out = []
    for h, w in grids:
        r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        out.append(torch.stack([r.flatten(), c.flatten()], dim=-1))
    return torch.cat(out) if out else torch.zeros(0, 2, dtype=torch.long, device=device)


def rope_2d(pos_N2: torch.Tensor, inv_freq: torch.Tensor, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [N, E] for rotate-half RoPE: patch (r, c) gets angles [r * f_even, c * f_odd] (section 6)."""
    half = inv_freq.shape[0] // 2
    ang_NE = torch.cat([pos_N2[:, :1].float() * inv_freq[:half], pos_N2[:, 1:].float() * inv_freq[half:]], dim=-1)
    ang_NE = torch.cat([ang_NE, ang_NE], dim=-1)  # each angle rotates dims i and i + E/2
    return ang_NE.cos().to(dtype), ang_NE.sin().to(dtype)


def block_diagonal_mask(lengths: list[int], device=None) -> torch.Tensor:
    """[N, N] bool, True = may attend: each image's patches see exactly their own image."""
    seg = torch.repeat_interleave(torch.arange(len(lengths), device=device), torch.tensor(lengths, device=device))
    return seg[:, None] == seg[None, :]


class VisionAttention(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.n_heads, self.head_dim = args.n_heads, args.head_dim
        D = args.hidden_size
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.o_proj = nn.Linear(D, D, bias=False)

    def forward(self, x_ND, cos_NE, sin_NE, lengths: list[int], impl: str):
        N = x_ND.shape[0]
        heads = lambda t: t.view(1, N, self.n_heads, self.head_dim).transpose(1, 2)  # [1, H, N, E]
        q_1HNE = M.apply_rope(heads(self.q_proj(x_ND)), cos_NE[None], sin_NE[None])
        k_1HNE = M.apply_rope(heads(self.k_proj(x_ND)), cos_NE[None], sin_NE[None])
        v_1HNE = heads(self.v_proj(x_ND))
        if impl == "reference":  # explicit block-diagonal mask, fp32 softmax (model.py's readable path)
            y_1HNE = M.attention_reference(q_1HNE, k_1HNE, v_1HNE, block_diagonal_mask(lengths, x_ND.device)[None])
        else:  # one bidirectional SDPA per image on its slice: the same block-diagonal attention, no N x N mask
            ys = [F.scaled_dot_product_attention(q, k, v) for q, k, v in
                  zip(q_1HNE.split(lengths, 2), k_1HNE.split(lengths, 2), v_1HNE.split(lengths, 2))]
            y_1HNE = torch.cat(ys, dim=2)
        return self.o_proj(y_1HNE.transpose(1, 2).reshape(N, -1))


class VisionFeedForward(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.gate_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)  # w1
        self.up_proj = nn.Linear(args.hidden_size, args.intermediate_size, bias=False)  # w3
        self.down_proj = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)  # w2
        self.act = F.silu if args.hidden_act == "silu" else F.gelu

    def forward(self, x_ND):
        return self.down_proj(self.act(self.gate_proj(x_ND)) * self.up_proj(x_ND))


class VisionBlock(nn.Module):
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.attention_norm = M.RMSNorm(args.hidden_size, args.norm_eps)
        self.attention = VisionAttention(args)
        self.ffn_norm = M.RMSNorm(args.hidden_size, args.norm_eps)
        self.feed_forward = VisionFeedForward(args)

    def forward(self, x_ND, cos_NE, sin_NE, lengths, impl):
        h_ND = x_ND + self.attention(self.attention_norm(x_ND), cos_NE, sin_NE, lengths, impl)
        return h_ND + self.feed_forward(self.ffn_norm(h_ND))


class _Layers(nn.Module):  # the `transformer.layers.{i}` level of the checkpoint names
    def __init__(self, args: VisionArgs):
        super().__init__()
        self.layers = nn.ModuleList(VisionBlock(args) for _ in range(args.n_layers))


def image_grids(images: list[torch.Tensor], args: VisionArgs) -> list[tuple[int, int]]:
    """(rows, columns) of patches per preprocessed image; checks each image's shape."""
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"images must be a list of CHW tensors (one per image), got {type(images).__name__}")
    grids = []
    for i, img in enumerate(images):
        if not isinstance(img, torch.Tensor) or img.dim() != 3 or img.shape[0] != args.num_channels:
            what = tuple(img.shape) if isinstance(img, torch.Tensor) else type(img).__name__
            raise ValueError(f"image {i} is {what}, expected a [{args.num_channels}, H, W] tensor: pass vision.preprocess's output")
        H, W = img.shape[1:]
        if H == 0 or W == 0 or H % args.token_px or W % args.token_px:
            raise ValueError(f"image {i} is {H}x{W} px; both sides must be positive multiples of {args.token_px} "
                             f"(patch x merge): pass vision.preprocess's output")
        grids.append((H // args.patch_size, W // args.patch_size))
    return grids


class VisionTransformer(nn.Module):
    """Pixtral-style ViT: Conv2d patches -> ln_pre -> blocks with 2D RoPE -> features (the last layer's output)."""

    def __init__(self, args: VisionArgs):
        super().__init__()
        self.args = args
        self.patch_conv = nn.Conv2d(args.num_channels, args.hidden_size, args.patch_size, args.patch_size, bias=False)
        self.ln_pre = M.RMSNorm(args.hidden_size, args.norm_eps)
        self.transformer = _Layers(args)
        self.register_buffer("inv_freq", vision_inv_freq(args), persistent=False)
        self.attention = "sdpa"  # or "reference"

    def reset_buffers(self):
        self.inv_freq = vision_inv_freq(self.args).to(self.patch_conv.weight.device)

    def init_weights(self, seed: Optional[int] = None, std: float = 0.02):
        g = None if seed is None else torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            t = torch.ones(p.shape) if name.endswith("norm.weight") or name == "ln_pre.weight" else \
                torch.randn(p.shape, generator=g) * std
            M._copy_into(p, t)
        self.reset_buffers()

    def forward(self, images: list[torch.Tensor]) -> torch.Tensor:
        """images: preprocessed [C, H, W] tensors -> features [N, D] of all their patches, in order."""
        grids = image_grids(images, self.args)
        if not grids:
            return self.patch_conv.weight.new_zeros(0, self.args.hidden_size)
        w = self.patch_conv.weight
        x_ND = torch.cat([self.patch_conv(img.to(w.device, w.dtype)[None])[0].flatten(1).T for img in images])
        x_ND = self.ln_pre(x_ND)
        cos_NE, sin_NE = rope_2d(patch_positions(grids, x_ND.device), self.inv_freq.to(x_ND.device), x_ND.dtype)
        lengths = [h * w for h, w in grids]
        for layer in self.transformer.layers:
            x_ND = layer(x_ND, cos_NE, sin_NE, lengths, self.attention)
        return x_ND


# -----------------------------------------------------------------------------
# The projector


def patch_merge(x_ND: torch.Tensor, grids: list[tuple[int, int]], merge: int) -> torch.Tensor:
    """[N, D] patch features -> [M, D * merge^2]: each merge x merge block of an image becomes one row,
    blocks row-major, the row channel-major (index c * merge^2 + kh * merge + kw), as F.unfold lays it out."""
    out, start = [], 0
    D = x_ND.shape[-1]
    for h, w in grids:
        if h % merge or w % merge:
            raise ValueError(f"a {h}x{w} patch grid cannot be merged {merge}x{merge}: preprocess images to multiples "
                             f"of patch x merge pixels")
        grid_1Dhw = x_ND[start:start + h * w].view(h, w, D).permute(2, 0, 1)[None]
        out.append(F.unfold(grid_1Dhw, kernel_size=merge, stride=merge)[0].T)  # [h*w/merge^2, D*merge^2]
        start += h * w
    return torch.cat(out) if out else x_ND.new_zeros(0, D * merge * merge)


class _Merger(nn.Module):  # the `patch_merger.merging_layer` level of the checkpoint names
    def __init__(self, dim: int, merge: int):
        super().__init__()
        self.merging_layer = nn.Linear(dim * merge * merge, dim, bias=False)


class Projector(nn.Module):
    """RMSNorm -> 2x2 patch merge -> Linear(4D -> D) -> Linear(D -> P) -> exact GELU -> Linear(P -> P). No biases."""

    def __init__(self, vision_dim: int, text_dim: int, merge: int = 2, eps: float = 1e-5):
        super().__init__()
        self.merge = merge
        self.norm = M.RMSNorm(vision_dim, eps)
        self.patch_merger = _Merger(vision_dim, merge)
        self.linear_1 = nn.Linear(vision_dim, text_dim, bias=False)
        self.linear_2 = nn.Linear(text_dim, text_dim, bias=False)

    def init_weights(self, seed: Optional[int] = None, std: float = 0.02):
        """A fresh projector (each cascade child gets one, section 6)."""
        g = None if seed is None else torch.Generator().manual_seed(seed)
        for name, p in self.named_parameters():
            M._copy_into(p, torch.ones(p.shape) if name == "norm.weight" else torch.randn(p.shape, generator=g) * std)

    def forward(self, feats_ND: torch.Tensor, grids: list[tuple[int, int]]) -> torch.Tensor:
        x_MX = patch_merge(self.norm(feats_ND), grids, self.merge)  # [M, D * merge^2]
        x_MD = self.patch_merger.merging_layer(x_MX)
        return self.linear_2(F.gelu(self.linear_1(x_MD)))  # [M, P]


# -----------------------------------------------------------------------------
# Images to tensors and tokens


def image_token_grid(width: int, height: int, args: VisionArgs) -> tuple[int, int]:
    """(w_tok, h_tok) for an image of width x height px (mistral-common's rule, section 6)."""
    if width <= 0 or height <= 0:
        raise ValueError(f"the image is {width}x{height} px: an image needs at least one pixel per side")
    ratio = max(width / args.max_image_size, height / args.max_image_size)
    if ratio > 1:  # scale down; an extreme aspect ratio keeps at least 1 px
        width, height = max(round(width / ratio), 1), max(round(height / ratio), 1)
    return (width - 1) // args.token_px + 1, (height - 1) // args.token_px + 1


def image_tokens(w_tok: int, h_tok: int, args: VisionArgs) -> list[int]:
    """([IMG] * w + [IMG_BREAK]) * h with the last [IMG_BREAK] replaced by [IMG_END]."""
    ids = ([args.image_token_id] * w_tok + [args.image_break_token_id]) * h_tok
    ids[-1] = args.image_end_token_id
    return ids


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode == "RGB":
        return img
    rgba = img.convert("RGBA")  # transparent areas become white (mistral-common)
    bg = Image.new("RGBA", rgba.size, "WHITE")
    bg.paste(rgba, (0, 0), rgba)
    return bg.convert("RGB")


def preprocess(pil_image: Image.Image, args: Optional[VisionArgs] = None) -> tuple[torch.Tensor, list[int]]:
    """A Pillow image -> (float32 [3, 28 h_tok, 28 w_tok] normalised tensor, its image token ids)."""
    args = args or VisionArgs()
    if not isinstance(pil_image, Image.Image):
        raise ValueError(f"preprocess takes a PIL.Image, got {type(pil_image).__name__}: open files with vision.load_image")
    w_tok, h_tok = image_token_grid(*pil_image.size, args)
    img = _to_rgb(pil_image).resize((w_tok * args.token_px, h_tok * args.token_px), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)  # [H, W, 3]
    x = (x - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)
    return x.permute(2, 0, 1).contiguous(), image_tokens(w_tok, h_tok, args)


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


def load_image(path: str) -> Image.Image:
    """Open an image file fully (decoding errors surface here, with the file named)."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"{path} is not a readable image ({e.__class__.__name__}: {e}): the file is corrupt or "
                         f"not an image; re-export it as JPEG or PNG") from None


def encode_chat(tok: D.Tokenizer, messages: list[dict], args: Optional[VisionArgs] = None
                ) -> tuple[list[int], list[int], list[torch.Tensor]]:
    """data.py's v13 chat format with images in user turns: (ids, loss mask, the images' tensors in order).
    An image part's "image" is a PIL.Image or a path."""
    args = args or VisionArgs()
    images = []

    def encode_image(x):
        tensor, ids = preprocess(load_image(x) if isinstance(x, (str, os.PathLike)) else x, args)
        images.append(tensor)
        return ids

    ids, mask = tok.encode_chat(messages, image_encoder=encode_image)
    return ids, mask, images


# -----------------------------------------------------------------------------
# The whole model: frozen ViT + projector + model.py's Transformer


class VisionLanguageModel(nn.Module):
    """forward(ids, images) -> logits [B, T, V]: the text Transformer fed embeddings in which the [IMG] rows
    are the projected image features. Attribute names follow the HF Mistral3 checkpoint."""

    def __init__(self, vision_tower: VisionTransformer, projector: Projector, text: M.Transformer,
                 freeze_vision: bool = True):
        super().__init__()
        self.vision_tower = vision_tower
        self.multi_modal_projector = projector
        self.language_model = text
        if freeze_vision:
            vision_tower.requires_grad_(False)

    @property
    def args(self) -> M.ModelArgs:  # train.py reads model.args (FLOPs, checkpoint meta)
        return self.language_model.args

    @property
    def vision_args(self) -> VisionArgs:
        return self.vision_tower.args

    def reset_buffers(self):
        self.language_model.reset_buffers()
        self.vision_tower.reset_buffers()

    def image_features(self, images: list[torch.Tensor]) -> torch.Tensor:
        """[M, P]: projected features of every image, in order; the ViT runs without grad while frozen."""
        grids = image_grids(images, self.vision_args)
        frozen = not any(p.requires_grad for p in self.vision_tower.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
            feats_ND = self.vision_tower(images)
        return self.multi_modal_projector(feats_ND, grids)

    def embed(self, ids_BT: torch.Tensor, images: Optional[list[torch.Tensor]] = None) -> torch.Tensor:
        """Text embeddings [B, T, P] with every [IMG] row replaced, in order, by the next image feature."""
        x_BTP = self.language_model.embed_tokens(ids_BT)
        is_img_BT = ids_BT == self.vision_args.image_token_id
        n_img = int(is_img_BT.sum())
        feats_MP = self.image_features(list(images or []))
        if n_img != feats_MP.shape[0]:
            raise ValueError(f"the ids hold {n_img} [IMG] tokens but the {len(images or [])} image(s) give "
                             f"{feats_MP.shape[0]} features: build ids and images together (vision.encode_chat "
                             f"or preprocess) and pass every image whose tokens are in ids, in order")
        if n_img == 0:
            return x_BTP
        return x_BTP.masked_scatter(is_img_BT[..., None], feats_MP.to(x_BTP.dtype))

    def forward(self, ids_BT: torch.Tensor, images: Optional[list[torch.Tensor]] = None, **kw):
        """kw goes to model.Transformer.forward (positions_BT, mask_BTS, return_hidden, head_fn, ...)."""
        return self.language_model(ids_BT, embeds_BTD=self.embed(ids_BT, images), **kw)

    def with_images(self, images: list[torch.Tensor]) -> "WithImages":
        """This model bound to one batch's images (see WithImages)."""
        return WithImages(self, images)


class WithImages:
    """A VisionLanguageModel bound to one batch's images, callable as model(ids, **kw) like model.Transformer,
    so code written for a text model (distill.py's fused losses, which read `.lm_head` and call the model
    with head_fn) runs on it unchanged: the forward puts the projected features in place of the [IMG]
    embeddings and returns what the text model returns."""

    def __init__(self, vlm: VisionLanguageModel, images: list[torch.Tensor]):
        self.vlm, self.images, self.args = vlm, images, vlm.args
        self.lm_head = vlm.language_model.lm_head

    def __call__(self, ids_BT: torch.Tensor, **kw):
        return self.vlm(ids_BT, self.images, **kw)


@torch.no_grad()
def greedy(vlm: VisionLanguageModel, ids: list[int], images: list[torch.Tensor], max_new_tokens: int,
           eos_id: Optional[int] = 2) -> list[int]:
    """Greedy continuation of one prompt with images, one full forward per token (the readable path; the
    images' features are computed once)."""
    device = vlm.language_model.embed_tokens.weight.device
    prompt = torch.tensor([ids], device=device)
    x_1TP = vlm.embed(prompt, images)
    out = []
    for _ in range(max_new_tokens):
        nxt = int(vlm.language_model(prompt, embeds_BTD=x_1TP)[0, -1].argmax())
        out.append(nxt)
        if nxt == eos_id:
            break
        prompt = torch.cat([prompt, prompt.new_tensor([[nxt]])], dim=1)
        x_1TP = torch.cat([x_1TP, vlm.language_model.embed_tokens(prompt[:, -1:])], dim=1)
    return out


# -----------------------------------------------------------------------------
# Checkpoints (section 3): HF Mistral3ForConditionalGeneration and Mistral-native params.json + consolidated


def _hf_vision_keys(n_layers: int) -> dict:
    """Our VisionTransformer/Projector parameter names -> HF keys (vision tower, projector) and native keys."""
    hf, native = {}, {}
    for ours in ("patch_conv.weight", "ln_pre.weight"):
        hf["v." + ours] = "model.vision_tower." + ours
        native["v." + ours] = "vision_encoder." + ours
    nat = {"attention_norm.weight": "attention_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
           "attention.q_proj.weight": "attention.wq.weight", "attention.k_proj.weight": "attention.wk.weight",
           "attention.v_proj.weight": "attention.wv.weight", "attention.o_proj.weight": "attention.wo.weight",
           "feed_forward.gate_proj.weight": "feed_forward.w1.weight",
           "feed_forward.down_proj.weight": "feed_forward.w2.weight",
           "feed_forward.up_proj.weight": "feed_forward.w3.weight"}
    for i in range(n_layers):
        for ours, theirs in nat.items():
            hf[f"v.transformer.layers.{i}.{ours}"] = f"model.vision_tower.transformer.layers.{i}.{ours}"
            native[f"v.transformer.layers.{i}.{ours}"] = f"vision_encoder.transformer.layers.{i}.{theirs}"
    for ours, theirs in {"norm.weight": "pre_mm_projector_norm.weight",
                         "patch_merger.merging_layer.weight": "patch_merger.merging_layer.weight",
                         "linear_1.weight": "vision_language_adapter.w_in.weight",
                         "linear_2.weight": "vision_language_adapter.w_out.weight"}.items():
        hf["p." + ours] = "model.multi_modal_projector." + ours
        native["p." + ours] = theirs
    return {"hf": hf, "native": native}


_HF_ALT_PREFIXES = {"model.vision_tower.": ("vision_tower.",),
                    "model.multi_modal_projector.": ("multi_modal_projector.",)}


def vision_args_from_config(path: str) -> tuple[VisionArgs, float, str]:
    """(VisionArgs, projector RMSNorm eps, format) of a multimodal checkpoint folder."""
    text_args, fmt = M.read_checkpoint_args(path)
    if fmt == "hf":
        cfg = M._read_json(os.path.join(path, "config.json"))
        where = os.path.join(path, "config.json")
        v = cfg.get("vision_config")
        if cfg.get("model_type") != "mistral3" or not v:
            raise M.CheckpointError(f"{where}: no vision_config (model_type {cfg.get('model_type')!r}): this is a "
                                    f"text-only checkpoint; use a Mistral3ForConditionalGeneration one")
        if cfg.get("multimodal_projector_bias"):
            raise M.CheckpointError(f"{where}: multimodal_projector_bias is true; Ministral 3 has no projector biases")
        if cfg.get("vision_feature_layer", -1) != -1:
            raise M.CheckpointError(f"{where}: vision_feature_layer {cfg['vision_feature_layer']} is not supported "
                                    f"(the last layer's output is the feature)")
        rope = v.get("rope_parameters") or {}
        heads = v.get("num_attention_heads", 16)
        if v.get("head_dim") not in (None, v.get("hidden_size", 1024) // heads):
            raise M.CheckpointError(f"{where}: vision head_dim {v['head_dim']} != hidden_size / heads")
        args = VisionArgs(hidden_size=v.get("hidden_size", 1024), intermediate_size=v.get("intermediate_size", 4096),
                          n_layers=v.get("num_hidden_layers", 24), n_heads=heads, patch_size=v.get("patch_size", 16),
                          max_image_size=v.get("image_size", 1024),
                          rope_theta=float(rope.get("rope_theta", v.get("rope_theta", 10000.0))),
                          num_channels=v.get("num_channels", 3), spatial_merge_size=cfg.get("spatial_merge_size", 2),
                          hidden_act=v.get("hidden_act", "gelu"), image_token_id=cfg.get("image_token_index", cfg.get("image_token_id", 10)))
        return args, text_args.norm_eps, fmt
    p = M._read_json(os.path.join(path, "params.json"))
    v = p.get("vision_encoder")
    if not v:
        raise M.CheckpointError(f"{os.path.join(path, 'params.json')}: no vision_encoder: this is a text-only checkpoint")
    if v.get("adapter_bias") or v.get("add_pre_mm_projector_layer_norm") is False or \
            v.get("mm_projector_id", "patch_merge") != "patch_merge":
        raise M.CheckpointError(f"{path}/params.json: vision_encoder adapter_bias / no pre-projector norm / "
                                f"mm_projector_id {v.get('mm_projector_id')!r} are not Ministral 3's projector")
    args = VisionArgs(hidden_size=v["hidden_size"], intermediate_size=v["intermediate_size"],
                      n_layers=v["num_hidden_layers"], n_heads=v["num_attention_heads"], patch_size=v["patch_size"],
                      max_image_size=v.get("max_image_size", v.get("image_size", 1540)),
                      rope_theta=float(v.get("rope_theta", 10000.0)), num_channels=v.get("num_channels", 3),
                      spatial_merge_size=v.get("spatial_merge_size", 2), hidden_act="silu",
                      image_token_id=v.get("image_token_id", 10),
                      image_break_token_id=v.get("image_break_token_id", 12),
                      image_end_token_id=v.get("image_end_token_id", 13))
    return args, text_args.norm_eps, fmt


def load_vision(path: str, dtype=None, device=None) -> tuple[VisionTransformer, Projector]:
    """The vision tower and projector of a multimodal checkpoint (HF or Mistral-native)."""
    path = os.fspath(path)
    args, eps, fmt = vision_args_from_config(path)
    text_args, _ = M.read_checkpoint_args(path)
    with torch.device("meta"):
        vit, proj = VisionTransformer(args), Projector(args.hidden_size, text_args.dim, args.spatial_merge_size, eps)
    ours = {"v." + n: p for n, p in vit.named_parameters()} | {"p." + n: p for n, p in proj.named_parameters()}
    want = {theirs: name for name, theirs in _hf_vision_keys(args.n_layers)[fmt].items()}
    loaded = {}
    for file in M._weight_files(path, fmt):
        with M._open(file) as f:
            for key in f.keys():
                k = key
                for canon, alts in _HF_ALT_PREFIXES.items():
                    for alt in alts:
                        if fmt == "hf" and k.startswith(alt):
                            k = canon + k[len(alt):]
                if k not in want:
                    if k.startswith(("model.vision_tower.", "model.multi_modal_projector.", "vision_encoder.",
                                     "pre_mm_projector_norm", "patch_merger.", "vision_language_adapter.")):
                        raise M.CheckpointError(f"{file}: unexpected vision tensor {key!r}: the config says a "
                                                f"different vision shape; use the config that came with these weights")
                    continue
                try:
                    t = f.get_tensor(key)
                except Exception as e:
                    raise M.CheckpointError(f"{file}: tensor {key!r} cannot be read ({e}): re-download or re-export it") from None
                name = want[k]
                if fmt == "native" and name.endswith(("q_proj.weight", "k_proj.weight")):
                    t = M.permute_native_to_hf(t, args.n_heads)  # section 3: vision heads too
                if tuple(t.shape) != tuple(ours[name].shape):
                    raise M.CheckpointError(f"{file}: tensor {key!r} has shape {tuple(t.shape)} but the config implies "
                                            f"{tuple(ours[name].shape)}: use the config that came with these weights")
                loaded[name] = t
    missing = [want_k for want_k, n in want.items() if n not in loaded]
    if missing:
        raise M.CheckpointError(f"{path}: missing vision tensor(s) {', '.join(missing[:3])}"
                                f"{' ...' if len(missing) > 3 else ''}: the checkpoint is incomplete; re-export it")
    if dtype is None:
        dtype = next(iter(loaded.values())).dtype
    vit = vit.to(dtype=dtype).to_empty(device=device or "cpu")
    proj = proj.to(dtype=dtype).to_empty(device=device or "cpu")
    params = {"v." + n: p for n, p in vit.named_parameters()} | {"p." + n: p for n, p in proj.named_parameters()}
    for name, t in loaded.items():
        M._copy_into(params[name], t)
    vit.reset_buffers()
    return vit, proj


def load_vlm(path: str, dtype=None, device=None) -> VisionLanguageModel:
    """A whole multimodal checkpoint (HF Mistral3ForConditionalGeneration or Mistral-native with a
    vision_encoder): model.py loads the text model (it skips vision keys), load_vision the rest."""
    path = os.fspath(path)
    vit, proj = load_vision(path, dtype, device)
    text = M.load_model(path, dtype=dtype or vit.patch_conv.weight.dtype, device=device)
    return VisionLanguageModel(vit, proj, text)


def _vision_config_hf(a: VisionArgs) -> dict:
    return {"model_type": "pixtral", "hidden_size": a.hidden_size, "intermediate_size": a.intermediate_size,
            "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads, "head_dim": a.head_dim,
            "patch_size": a.patch_size, "image_size": a.max_image_size, "num_channels": a.num_channels,
            "hidden_act": a.hidden_act, "rope_parameters": {"rope_type": "axial", "rope_theta": a.rope_theta}}


def _vision_params_native(a: VisionArgs) -> dict:
    return {"hidden_size": a.hidden_size, "num_channels": a.num_channels, "max_image_size": a.max_image_size,
            "patch_size": a.patch_size, "rope_theta": a.rope_theta, "intermediate_size": a.intermediate_size,
            "num_hidden_layers": a.n_layers, "num_attention_heads": a.n_heads, "image_token_id": a.image_token_id,
            "image_break_token_id": a.image_break_token_id, "image_end_token_id": a.image_end_token_id,
            "adapter_bias": False, "spatial_merge_size": a.spatial_merge_size,
            "add_pre_mm_projector_layer_norm": True, "mm_projector_id": "patch_merge"}


def save_vlm(vlm: VisionLanguageModel, path: str, format: str = "hf", dtype=None):
    """Write a whole multimodal checkpoint: HF (config.json model_type mistral3 + model.safetensors, loadable
    by transformers' Mistral3ForConditionalGeneration) or Mistral-native (params.json with vision_encoder +
    consolidated.safetensors). Written to a temporary folder and renamed."""
    path = os.fspath(path)
    if format not in ("hf", "native"):
        raise ValueError(f"format must be 'hf' or 'native', got {format!r}")
    a, targs = vlm.vision_args, vlm.args
    if a.hidden_act != "silu" and format == "native":
        raise M.CheckpointError("the native format has no field for a non-SiLU vision activation: save with format='hf'")
    names = _hf_vision_keys(a.n_layers)[format]
    tensors = {}
    src = {"v." + n: p for n, p in vlm.vision_tower.state_dict().items()} | \
          {"p." + n: p for n, p in vlm.multi_modal_projector.state_dict().items()}
    for name, t in src.items():
        t = t.detach().to("cpu", dtype or t.dtype)
        if format == "native" and name.endswith(("q_proj.weight", "k_proj.weight")):
            t = M.permute_hf_to_native(t, a.n_heads)
        tensors[names[name]] = t.contiguous()
    for n, t in vlm.language_model.state_dict().items():
        if targs.tied_embeddings and n == "lm_head.weight":
            continue
        t = t.detach().to("cpu", dtype or t.dtype)
        if format == "native":
            if n.endswith("q_proj.weight"):
                t = M.permute_hf_to_native(t, targs.n_heads)
            elif n.endswith("k_proj.weight"):
                t = M.permute_hf_to_native(t, targs.n_kv_heads)
            tensors[M.native_name(n)] = t.contiguous()
        else:
            tensors[n if n.startswith("lm_head.") else "model.language_model." + n] = t.contiguous()
    tmp = M._atomic_dir(path)
    try:
        if format == "native":
            save_file(tensors, os.path.join(tmp, "consolidated.safetensors"))
            params = M.params_json(targs) | {"vision_encoder": _vision_params_native(a)}
            with open(os.path.join(tmp, "params.json"), "w") as f:
                json.dump(params, f, indent=2)
        else:
            save_file(tensors, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
            cfg = {"architectures": ["Mistral3ForConditionalGeneration"], "model_type": "mistral3",
                   "text_config": M.hf_config(targs), "vision_config": _vision_config_hf(a),
                   "image_token_index": a.image_token_id, "spatial_merge_size": a.spatial_merge_size,
                   "projector_hidden_act": "gelu", "multimodal_projector_bias": False, "vision_feature_layer": -1,
                   "tie_word_embeddings": targs.tied_embeddings,
                   "torch_dtype": str(next(iter(tensors.values())).dtype).split(".")[1]}
            with open(os.path.join(tmp, "config.json"), "w") as f:
                json.dump(cfg, f, indent=2)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    M._commit_dir(tmp, path)


# -----------------------------------------------------------------------------
# CLI: real photographs from a folder through the same preprocessing


@dataclass
class VisionCLIConfig:
    images: Optional[str] = None  # a folder of photographs (or one image file)
    load: Optional[str] = None  # a multimodal checkpoint: also run its ViT on each image
    preset: str = "real"  # VisionArgs preset for preprocessing when no checkpoint is given


def image_files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        raise ValueError(f"--images {path} is neither a folder nor a file: pass a folder of JPEG/PNG photographs")
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_SUFFIXES)}): put photographs in it")
    return files


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Preprocess photographs for the Pixtral-style ViT (PAPER.md section 6).")
    for f in dataclasses.fields(VisionCLIConfig):
        ap.add_argument("--" + f.name.replace("_", "-"), default=f.default, type=str)
    a = ap.parse_args(argv)
    try:
        if not a.images:
            raise ValueError("pass --images FOLDER (photographs to preprocess)")
        vit = load_vision(a.load)[0].eval() if a.load else None
        args = vit.args if vit is not None else VisionArgs.preset(a.preset)
        for file in image_files(a.images):
            img = load_image(file)
            x, ids = preprocess(img, args)
            n_img = ids.count(args.image_token_id)
            line = f"{file}: {img.size[0]}x{img.size[1]} px -> {x.shape[2]}x{x.shape[1]} px, {n_img} [IMG] tokens " \
                   f"({len(ids)} with breaks), mean {x.mean():.3f} std {x.std():.3f}"
            if vit is not None:
                with torch.no_grad():
                    line += f", ViT features {tuple(vit([x]).shape)}"
            print(line)
    except (ValueError, M.CheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
