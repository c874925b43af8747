"""Tokens for every stage: the Tekken tokenizer, the v13 chat format, corpora, shards and the loader.

Reading guide
-------------
Concept: everything between text and the integer batches the training loop consumes. It follows
PAPER.md section 7 (Tekken on tiktoken, ids = BPE rank + 1000, the v13 chat format and its loss
mask) and feeds sections 4-5 (calibration and distillation text) and 8 (SFT chats, GRPO rewards).

The file reads top-down: config (`DataConfig`), the tokenizer (`Tokenizer`: file lookup, BPE
truncation, encode/decode, `encode_chat`), corpora (`python_corpus`, `read_documents`,
`tokenize_documents`), shards (`write_shards`, `load_tokens`), the loader (`PackedLoader`), offline
task data (`qa_pairs`, `math_problems`, `check_math_answer`), then the command line.

Deviations from the paper / reference code, and why:
 1. Pretraining text: the paper distils on 1-3T tokens of an unpublished mix. The embedded default
    is text that ships with Python (the `pydoc_data` topics and the standard library's docstrings,
    read with `ast`, nothing imported), about 2.4 M characters, so every demo runs offline. Real runs
    pass their own .txt/.jsonl files or pre-tokenized shards.
 2. `vocab_size` may truncate the BPE to its first ranks (ours, for tiny models). BPE merges are
    learned in rank order, so keeping ranks below N is the tokenizer that training would have made
    had it stopped after N merges: still a valid BPE, still lossless (all 256 bytes stay), and
    mistral-common's own `Tekkenizer(vocab_size=...)` truncates the same way (tested).
 3. Files without a `special_tokens` list (v3, e.g. both files mistral-common ships) get the 20
    legacy names of PAPER.md section 7 and `<SPECIAL_i>` fillers, as mistral-common does. They have
    no `[THINK]`, so reasoning chats need a v13 file that lists it (Ministral 3's own tekken.json).
 4. Chat: system/user/assistant text, and images in user turns (no tools). Normalisation copies mistral-common's
    v13 instruct path so ids match it token for token: consecutive user (or assistant) messages are
    joined with a blank line, every system message is its own `[SYSTEM_PROMPT]` block in place, and
    a plain-text answer loses trailing spaces (a mistral-common quirk: an answer that carries
    thinking keeps them, because mistral-common encodes it as chunks and strips nothing).
 5. Packing: documents are concatenated as BOS + text + EOS and cut into non-overlapping windows;
    attention is not masked at document boundaries (standard packing), only the EOS -> next BOS
    target is ignored.
 6. Post-training data: the paper's SFT/RL sets are unpublished. `qa_pairs` and `math_problems` are
    small seeded stand-ins with exact answers (docstring Q/A; arithmetic and word problems checked
    by `check_math_answer`, the verifiable reward of section 8). `math_problems(level="easy")` gives
    one-digit sums for small real models, which sit at the floor on the default mixed level.
 7. GGUF tokenizers: a GPT-2-style byte-level BPE (`tokenizer.ggml.model` gpt2) is rebuilt on tiktoken
    from the file's tokens and merges, with rank = id - (leading control tokens), which is exact when
    the ids follow the merge order (checked on load; SmolLM2's do). Its chat format is ChatML. Bytes the
    vocabulary lacks (21 control/invalid bytes in SmolLM2) encode as the unknown id. The "smollm"
    pre-tokenizer (digits split off one by one) is one tiktoken pattern; transformers 5.23's GGUF
    loader ignores it and uses the plain GPT-2 split (ids differ around digits after runs of spaces).
    Packed documents are bracketed by the file's own bos/eos ids (SmolLM2: <|im_start|>, <|im_end|>).

Run: `python data.py stats` (embedded corpus size), `python data.py prepare --vocab-size 8192 --out
out/tokens` (tokenize + shard the embedded corpus; add FILES... for your own text).
Depends on: nothing in the project (torch, numpy, tiktoken, the standard library; gguf for .gguf files).
"""

from __future__ import annotations

import argparse
import ast
import base64
import dataclasses
import functools
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import random
import re
import struct
import sys
import sysconfig
import typing
from dataclasses import dataclass
from fractions import Fraction
from typing import Optional

import numpy as np
import pydoc_data.topics  # data only: the help() topic texts that ship with Python
import tiktoken
import torch

# -----------------------------------------------------------------------------
# Config


@dataclass
class DataConfig:
    tokenizer: Optional[str] = None  # tekken.json, or a checkpoint folder holding one (section 7); None = shipped
    vocab_size: Optional[int] = None  # total V incl. the 1000 special ids; None = the file's 131072 (section 7)
    out: str = "out/tokens"  # prepare writes OUT/train/ and OUT/val/ shards and OUT/prepare.json
    shard_tokens: int = 100_000_000  # tokens per shard file
    val_fraction: float = 0.05  # held-out share of documents (deterministic, by content hash)
    seed: int = 0  # split seed


# -----------------------------------------------------------------------------
# Tekken tokenizer (PAPER.md section 7)

DEFAULT_TEKKEN = "tekken_240911.json"  # the 131K Tekken file mistral-common ships
LEGACY_SPECIALS = (  # ids 0..19 when a file has no special-token list (section 7)
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]",
    "[PREFIX]", "[MIDDLE]", "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)
SPECIAL_POLICIES = ("ignore", "keep", "raise")


def default_tekken_path() -> str:
    # find_spec locates the package without running its __init__ (which pulls in pydantic etc.).
    spec = importlib.util.find_spec("mistral_common")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "no tokenizer given and mistral-common is not installed: pass --tokenizer PATH/TO/tekken.json "
            "or `pip install mistral-common` (it ships tekken_240911.json)")
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", DEFAULT_TEKKEN)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing from this mistral-common install: "
                                "pass --tokenizer PATH/TO/tekken.json")
    return path


def resolve_tekken_path(path: Optional[str | os.PathLike] = None) -> str:
    """A tokenizer file from a tekken.json or .gguf file, a checkpoint folder holding `tekken.json` or
    `tokenizer.gguf`, or None (the shipped Tekken)."""
    if path is None:
        return default_tekken_path()
    path = os.fspath(path)
    if os.path.isdir(path):
        inner = os.path.join(path, "tekken.json")
        if not os.path.isfile(inner):
            inner = os.path.join(path, GGUF_TOKENIZER)
        if not os.path.isfile(inner):
            raise FileNotFoundError(f"no tekken.json or {GGUF_TOKENIZER} in folder {path}: copy the checkpoint's "
                                    "tokenizer file there or pass the file itself")
        return os.path.abspath(inner)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer file {path} does not exist: "
                                "pass a tekken.json or .gguf file, or a folder holding one")
    return os.path.abspath(path)


class VocabSizeError(ValueError):
    """A tokenizer file cannot serve a model of the vocabulary size asked for."""


def checkpoint_tokenizer(checkpoint: Optional[str | os.PathLike], vocab_size: int,
                         tokenizer: Optional[str | os.PathLike] = None) -> "Tokenizer":
    """The tokenizer that goes with a checkpoint (a folder or a .gguf file, already resolved): `tokenizer`
    when given, else the checkpoint's own (a .gguf file carries one; a folder may hold tekken.json or
    tokenizer.gguf), else the shipped Tekken truncated to the model's vocabulary (deviation 2)."""
    path = tokenizer
    if path is None and checkpoint is not None:
        checkpoint = os.fspath(checkpoint)
        if os.path.isfile(checkpoint) and checkpoint.endswith(".gguf"):
            path = checkpoint
        elif os.path.isdir(checkpoint) and any(os.path.isfile(os.path.join(checkpoint, n))
                                               for n in ("tekken.json", GGUF_TOKENIZER)):
            path = checkpoint
    try:
        return Tokenizer.from_file(path, vocab_size=vocab_size)
    except VocabSizeError as e:  # the file is fine, its vocabulary does not fit the model's
        raise VocabSizeError(f"{e}; the model has {vocab_size} ids: pass the checkpoint's own tekken.json "
                         f"with --tokenizer") from None


@functools.lru_cache(maxsize=4)
def _read_tekken(path: str, stamp: tuple) -> dict:
    # `stamp` (mtime, size) is part of the cache key so an edited file is read again.
    with open(path, "rb") as f:
        raw = f.read()
    try:
        obj = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"tokenizer file {path} is not valid JSON ({e}): "
                         "re-download it or pass another tekken.json") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("config"), dict) or not isinstance(obj.get("vocab"), list):
        raise ValueError(f"{path} is not a tekken tokenizer file (needs 'config' and 'vocab'): pass the tekken.json "
                         "that came with the checkpoint")
    cfg = obj["config"]
    for key in ("pattern", "default_vocab_size", "default_num_special_tokens"):
        if key not in cfg:
            raise ValueError(f"{path}: config has no {key!r}; it is not a tekken.json this code can read")
    n_special = int(cfg["default_num_special_tokens"])
    names = [f"<SPECIAL_{i}>" for i in range(n_special)]
    listed = obj.get("special_tokens")
    if listed is None:
        names[: len(LEGACY_SPECIALS)] = LEGACY_SPECIALS
    else:
        for t in listed:
            try:
                rank, name = int(t["rank"]), str(t["token_str"])
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: special token entry {t!r} needs 'rank' and 'token_str'") from None
            if not 0 <= rank < n_special:
                raise ValueError(f"{path}: special token {name!r} has rank {rank} outside 0..{n_special - 1}")
            names[rank] = name
        if len(set(names)) != n_special:
            raise ValueError(f"{path}: special token names are not unique")
    return dict(pattern=cfg["pattern"], vocab=obj["vocab"], n_special=n_special,
                default_vocab_size=int(cfg["default_vocab_size"]), version=str(cfg.get("version", "?")),
                specials=tuple(names), sha256=hashlib.sha256(raw).hexdigest())


def _read_vocab(path: str, stamp: tuple) -> dict:
    return _read_gguf_vocab(path, stamp) if path.endswith(".gguf") else _read_tekken(path, stamp)


@functools.lru_cache(maxsize=8)
def _bpe(path: str, stamp: tuple, n_ranks: int) -> tiktoken.Encoding:
    info = _read_vocab(path, stamp)
    ranks: dict[bytes, int] = {}
    if "token_bytes" in info:  # GGUF: bytes already decoded and checked by _read_gguf_vocab
        for i, b in enumerate(info["token_bytes"][:n_ranks]):
            ranks[b] = i
        # Bytes the vocabulary lacks (SmolLM2 has 235 of 256) get ranks past the vocabulary, so tiktoken
        # can still split any text; Tokenizer maps those ranks to the unknown id (deviation 7).
        for b in range(256):
            ranks.setdefault(bytes([b]), len(ranks))
    else:
        for i, entry in enumerate(info["vocab"][:n_ranks]):
            try:
                b, rank = base64.b64decode(entry["token_bytes"]), entry["rank"]
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{path}: vocab entry {i} needs 'rank' and base64 'token_bytes'; "
                                 "the file is corrupt, re-download it") from None
            if rank != i or (i < 256 and b != bytes([i])):
                raise ValueError(f"{path}: vocab entry {i} has rank {rank} / bytes {b!r}; ranks must run 0..N-1 "
                                 "with the 256 raw bytes first")
            ranks[b] = i
        if len(ranks) != n_ranks:
            raise ValueError(f"{path}: duplicate token bytes among the first {n_ranks} ranks")
    # Specials never enter tiktoken: text is always encoded as plain text (see Tokenizer.encode).
    return tiktoken.Encoding(name=os.path.basename(path), pat_str=info["pattern"],
                             mergeable_ranks=ranks, special_tokens={})


# -- GPT-2-style byte-level BPE from a GGUF file's metadata (deviation 7) ---------------------------

GGUF_TOKENIZER = "tokenizer.gguf"  # the name a checkpoint folder gives its GGUF tokenizer file
_GPT2_SPLIT = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
# llama.cpp's "smollm" pre-tokenizer splits every digit off first, then runs the GPT-2 split on what is
# left. One tiktoken pattern does both: digits alone first, and a whitespace run may end before a
# digit as it would at the end of a piece (the lookahead `(?![^\s\p{N}])` instead of `(?!\S)`).
_SMOLLM_SPLIT = r"""\p{N}|'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
GGUF_PRE_SPLITS = {"smollm": _SMOLLM_SPLIT, "gpt-2": _GPT2_SPLIT, "default": _GPT2_SPLIT}
_CONTROL, _USER_DEFINED = 3, 4  # llama.cpp token types


def _byte_of_char() -> dict[str, int]:
    """GPT-2's printable spelling of the 256 bytes, reversed (char -> byte)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    extra = [b for b in range(256) if b not in keep]
    return {**{chr(b): b for b in keep}, **{chr(256 + k): b for k, b in enumerate(extra)}}


@functools.lru_cache(maxsize=4)
def _read_gguf_vocab(path: str, stamp: tuple) -> dict:
    """The tokenizer a GGUF file describes, checked to be one tiktoken can run exactly: leading control
    tokens, then byte tokens, then one token per merge in merge order (so tiktoken rank = id - specials)."""
    import gguf  # imported here: it is slow to import (it pulls in mistral-common), and only .gguf files need it
    try:
        fields = gguf.GGUFReader(path).fields
    except Exception as e:  # the reader raises ValueError/struct.error/... on truncated or foreign files
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}: {e}): it is truncated or "
                         "corrupt; fetch it again") from None
    get = lambda k, d=None: fields[k].contents() if k in fields else d
    kind, pre = get("tokenizer.ggml.model"), get("tokenizer.ggml.pre", "default")
    if kind != "gpt2":
        raise ValueError(f"{path}: tokenizer.ggml.model is {kind!r}; only GPT-2-style byte-level BPE ('gpt2') "
                         "GGUF tokenizers are supported")
    if pre not in GGUF_PRE_SPLITS:
        raise ValueError(f"{path}: pre-tokenizer {pre!r} is not supported (known: {', '.join(GGUF_PRE_SPLITS)})")
    tokens, types, merges = get("tokenizer.ggml.tokens"), get("tokenizer.ggml.token_type"), get("tokenizer.ggml.merges")
    if not tokens or not merges:
        raise ValueError(f"{path}: no tokenizer.ggml.tokens / merges: the file carries no BPE tokenizer")
    types = types or [1] * len(tokens)
    n_special = next((i for i, t in enumerate(types) if t != _CONTROL), len(types))
    if any(t in (_CONTROL, _USER_DEFINED) for t in types[n_special:]):
        raise ValueError(f"{path}: control or user-defined tokens after the first ordinary one; this loader "
                         "supports vocabularies whose control tokens come first")
    char_byte = _byte_of_char()
    try:
        token_bytes = [bytes(char_byte[c] for c in t) for t in tokens[n_special:]]
    except KeyError as e:
        raise ValueError(f"{path}: token spelled with {e.args[0]!r}, outside the byte-level alphabet") from None
    first_merge = len(tokens) - len(merges)
    index = {t: i for i, t in enumerate(tokens)}
    for k, m in enumerate(merges):
        a, _, b = m.partition(" ")
        if index.get(a + b) != first_merge + k:
            raise ValueError(f"{path}: merge {k} ({m!r}) does not make token {first_merge + k}: the vocabulary is "
                             "not in merge order, which this loader needs (tiktoken ranks = ids)")
    if any(len(b) != 1 for b in token_bytes[: first_merge - n_special]):
        raise ValueError(f"{path}: the tokens before the first merge are not all single bytes")
    digest = hashlib.sha256(json.dumps([kind, pre, list(tokens), list(merges), list(types)]).encode()).hexdigest()
    template = get("tokenizer.chat_template", "") or ""
    system = re.search(r"'<\|im_start\|>system\n(.*?)<\|im_end\|>", template, re.S)
    return dict(pattern=GGUF_PRE_SPLITS[pre], token_bytes=token_bytes, n_special=n_special,
                default_vocab_size=len(tokens), version=f"gguf-{kind}-{pre}", specials=tuple(tokens[:n_special]),
                sha256=digest, bos=get("tokenizer.ggml.bos_token_id"), eos=get("tokenizer.ggml.eos_token_id"),
                pad=get("tokenizer.ggml.padding_token_id"), unk=get("tokenizer.ggml.unknown_token_id", 0),
                add_bos=bool(get("tokenizer.ggml.add_bos_token", False)),
                chat_format="chatml" if "<|im_start|>" in template else None,
                chat_system=system.group(1) if system else None)


class Tokenizer:
    """ids 0..n_special-1 are control tokens, id = BPE rank + n_special otherwise (Tekken, and the GGUF
    byte-level BPEs whose control tokens come first, such as SmolLM2's).

    chat_format: "v13" (Tekken's [INST] format) or "chatml" (`<|im_start|>role\n...<|im_end|>\n`), chosen
    by the file; `encode_chat` gives the same (ids, mask) contract for both."""

    def __init__(self, path: str, bpe: tiktoken.Encoding, specials: tuple, vocab_size: int, version: str,
                 file_sha256: str, *, bos_id: Optional[int] = None, eos_id: Optional[int] = None,
                 pad_id: Optional[int] = None, unk_id: Optional[int] = None, chat_format: str = "v13",
                 chat_system: Optional[str] = None):
        self.path, self.version, self.vocab_size = path, version, vocab_size
        self.n_special = len(specials)
        self.specials = specials
        self.file_sha256 = file_sha256
        # The shard-header identity: same file AND same truncation, or the ids mean different things.
        self.file_hash = hashlib.sha256(f"{file_sha256}:vocab_size={vocab_size}".encode()).hexdigest()
        self._bpe = bpe
        self._special_ids = {name: i for i, name in enumerate(specials)}
        self.bos_id = self.special_id("<s>") if bos_id is None else bos_id
        self.eos_id = self.special_id("</s>") if eos_id is None else eos_id
        self.pad_id = self.special_id("<pad>") if pad_id is None else pad_id
        self.unk_id = 0 if unk_id is None else unk_id  # only reached for bytes a GGUF vocabulary lacks
        if chat_format not in ("v13", "chatml"):
            raise ValueError(f"chat_format must be 'v13' or 'chatml', got {chat_format!r}")
        self.chat_format = chat_format
        self.chat_system = chat_system  # ChatML: the system turn the template adds when a chat has none

    @classmethod
    def from_file(cls, path: Optional[str | os.PathLike] = None, vocab_size: Optional[int] = None) -> "Tokenizer":
        """From a tekken.json, a .gguf file (its tokenizer metadata), or a folder holding either."""
        path = resolve_tekken_path(path)
        st = os.stat(path)
        stamp = (st.st_mtime_ns, st.st_size)
        info = _read_vocab(path, stamp)
        n_special = info["n_special"]
        n_ordinary = len(info["token_bytes"]) if "token_bytes" in info else len(info["vocab"])
        full = min(info["default_vocab_size"], n_special + n_ordinary)
        vocab_size = full if vocab_size is None else int(vocab_size)
        n_bytes = 256 if "vocab" in info else sum(len(b) == 1 for b in info["token_bytes"])
        if not n_special + n_bytes <= vocab_size <= full:
            raise VocabSizeError(f"vocab_size {vocab_size} for {path} must lie in [{n_special + n_bytes}, {full}] "
                                 f"({n_special} special ids + at least the {n_bytes} byte tokens)")
        bpe = _bpe(path, stamp, vocab_size - n_special)
        if "vocab" in info:
            return cls(path, bpe, info["specials"], vocab_size, info["version"], info["sha256"])
        return cls(path, bpe, info["specials"], vocab_size, info["version"], info["sha256"], bos_id=info["bos"],
                   eos_id=info["eos"], pad_id=info["pad"], unk_id=info["unk"],
                   chat_format=info["chat_format"] or "chatml", chat_system=info["chat_system"])

    def _ids(self, ranks: list[int]) -> list[int]:
        n, top = self.n_special, self.vocab_size - self.n_special
        return [r + n if r < top else self.unk_id for r in ranks]  # ranks >= top: bytes the vocab lacks

    def special_id(self, name: str) -> int:
        if name not in self._special_ids:
            raise ValueError(f"special token {name!r} is not in {self.path}: use a tekken.json that lists it "
                             "(v13 files such as Ministral 3's carry [THINK]/[/THINK])")
        return self._special_ids[name]

    # Encode policy: text is always plain text. A string such as "[INST]" inside a message is split
    # into ordinary byte-level tokens and never becomes a control id, so user text cannot forge turn
    # markers; control ids come only from bos/eos here and from encode_chat. (Same as mistral-common.)
    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        ids = self._ids(self._bpe.encode_ordinary(text))
        return ([self.bos_id] if bos else []) + ids + ([self.eos_id] if eos else [])

    # Decode policy for control ids: "ignore" drops them (the default, as mistral-common), "keep" writes
    # their names ("[INST]"), "raise" refuses. Bytes that do not form UTF-8 become U+FFFD.
    def decode(self, ids, special: str = "ignore") -> str:
        if special not in SPECIAL_POLICIES:
            raise ValueError(f"special={special!r}: use one of {SPECIAL_POLICIES}")
        out: list[str] = []
        run: list[int] = []
        for i in (int(t) for t in ids):
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside this tokenizer's vocabulary 0..{self.vocab_size - 1}")
            if i >= self.n_special:
                run.append(i - self.n_special)
                continue
            if run:  # decode ordinary runs together so multi-token UTF-8 characters survive
                out.append(self._bpe.decode(run))
                run = []
            if special == "raise":
                raise ValueError(f"decode got control token {i} ({self.specials[i]}); pass special='ignore' or 'keep'")
            if special == "keep":
                out.append(self.specials[i])
        if run:
            out.append(self._bpe.decode(run))
        return "".join(out)

    def token_bytes(self, i: int) -> bytes:
        """Raw bytes of one ordinary token (for streaming decoders); control ids give b''."""
        return b"" if i < self.n_special else self._bpe.decode_single_token_bytes(i - self.n_special)

    # -- chat formats: v13 (Tekken, section 7) and ChatML (GGUF files whose template uses it) -------
    def encode_chat(self, messages: list[dict], image_encoder=None) -> tuple[list[int], list[int]]:
        """A chat as ids and its loss mask, in the tokenizer's own chat format.

        mask[i] = 1 where ids[i] is produced by the assistant (the answer, its end-of-turn token, and in
        v13 the [THINK] trace), 0 for everything else. Training on next-token targets uses ids[1:] with
        mask[1:]. A conversation ending in a user turn is a generation prompt (mask all 0): the ids end
        where the assistant's first token goes, and generation stops at `eos_id`.
        In v13, a user message's content may be a list of parts, {"type": "text", "text": s} or
        {"type": "image", "image": x}; image_encoder(x) gives the image's token ids
        ([IMG]/[IMG_BREAK]/[IMG_END], vision.py).
        """
        if self.chat_format == "chatml":
            if image_encoder is not None:
                raise ValueError("images need the v13 chat format ([IMG] tokens): this ChatML tokenizer has none")
            return self._encode_chatml(messages)
        return self._encode_v13(messages, image_encoder)

    def _encode_chatml(self, messages: list[dict]) -> tuple[list[int], list[int]]:
        """`<|im_start|>role\ncontent<|im_end|>\n` per message, as the file's template renders it (each
        message its own turn, the template's default system turn first when the chat has none), ending
        with `<|im_start|>assistant\n` when the last message is not the assistant's. Text between control
        tokens is encoded in one piece, as transformers' apply_chat_template does; an answer token that
        straddles the `assistant\n` header counts as the answer's."""
        if not messages:
            raise ValueError("encode_chat got no messages")
        start, end = self.special_id("<|im_start|>"), self.special_id("<|im_end|>")
        for k, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
                raise ValueError(f"message {k} must be a dict with role system, user or assistant, got {m!r}")
            if not isinstance(m.get("content") or "", str):
                raise ValueError(f"message {k}: 'content' must be a string")
            if m.get("thinking") is not None:
                raise ValueError(f"message {k}: this ChatML tokenizer has no thinking tokens; put the trace in 'content'")
        if messages[0]["role"] != "system" and self.chat_system is not None:
            messages = [{"role": "system", "content": self.chat_system}, *messages]
        ids, mask = [], []
        for m in messages:
            head = f"{m['role']}\n"
            ranks = self._bpe.encode_ordinary(head + (m.get("content") or ""))
            part = [start, *self._ids(ranks), end]
            bits = [0] * len(part)
            if m["role"] == "assistant":
                seen = 0
                for j, r in enumerate(ranks):  # mask tokens that end past the header
                    seen += len(self._bpe.decode_single_token_bytes(r))
                    bits[1 + j] = int(seen > len(head.encode()))
                bits[-1] = 1  # <|im_end|> ends the answer: the model must learn to stop
            nl = self._ids(self._bpe.encode_ordinary("\n"))
            ids += part + nl
            mask += bits + [0] * len(nl)
        if messages[-1]["role"] != "assistant":
            gen = [start, *self._ids(self._bpe.encode_ordinary("assistant\n"))]
            ids += gen
            mask += [0] * len(gen)
        return ids, mask

    def _encode_v13(self, messages: list[dict], image_encoder=None) -> tuple[list[int], list[int]]:
        """`<s>[SYSTEM_PROMPT]s[/SYSTEM_PROMPT][INST]u[/INST][THINK]t[/THINK]a</s>...`"""
        ids, mask = [self.bos_id], [0]
        for role, content, thinking in _chat_turns(messages):
            if role == "system":
                part = [self.special_id("[SYSTEM_PROMPT]"), *self.encode(content), self.special_id("[/SYSTEM_PROMPT]")]
            elif role == "user" and not isinstance(content, str):  # text and images, in order
                if image_encoder is None:
                    raise ValueError("a user message holds an image: pass image_encoder (e.g. vision.py's encode_chat)")
                part = [self.special_id("[INST]")]
                for p in content:
                    part += self.encode(p) if isinstance(p, str) else list(image_encoder(p["image"]))
                part.append(self.special_id("[/INST]"))
            elif role == "user":
                part = [self.special_id("[INST]"), *self.encode(content), self.special_id("[/INST]")]
            elif thinking is None:
                part = [*self.encode(content.rstrip(" ")), self.eos_id]  # deviation 4: trailing spaces go
            else:
                part = [self.special_id("[THINK]"), *self.encode(thinking), self.special_id("[/THINK]"),
                        *self.encode(content), self.eos_id]
            ids += part
            mask += [int(role == "assistant")] * len(part)
        return ids, mask


def _chat_turns(messages: list[dict]) -> list[tuple[str, str, Optional[str]]]:
    """Validate and merge messages the way mistral-common's v13 normaliser does (deviation 4)."""
    if not messages:
        raise ValueError("encode_chat got no messages")
    turns: list[list] = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise ValueError(f"message {k} must be a dict with 'role' and 'content', got {m!r}")
        role, content, thinking = m["role"], m.get("content") or "", m.get("thinking")
        if role not in ("system", "user", "assistant"):
            raise ValueError(f"message {k}: role {role!r} is not supported (system, user, assistant only)")
        if isinstance(content, list) and role == "user":
            content = _user_parts(content, k)
        if not isinstance(content, (str, list)) or (thinking is not None and not isinstance(thinking, str)):
            raise ValueError(f"message {k}: 'content' and 'thinking' must be strings (a user message may give a "
                             f"list of text/image parts)")
        if isinstance(content, list) and role != "user":
            raise ValueError(f"message {k}: only user messages may hold a list of parts (images)")
        if thinking is not None and role != "assistant":
            raise ValueError(f"message {k}: only assistant messages may carry 'thinking'")
        if turns and role == turns[-1][0] and role != "system":
            if thinking is not None or turns[-1][2] is not None:
                raise ValueError(f"message {k}: consecutive assistant messages with 'thinking': merge them into one")
            prev = turns[-1][1]
            if isinstance(prev, list) or isinstance(content, list):  # coalesce text runs across messages
                turns[-1][1] = _join_parts([prev, content])
            else:
                turns[-1][1] = prev + "\n\n" + content if prev and content else prev or content
        else:
            turns.append([role, content, thinking])
    first = next((t[0] for t in turns if t[0] != "system"), "user")
    if first != "user":
        raise ValueError("a conversation must start with a user message (after any system messages)")
    for role, content, thinking in turns:
        if role == "assistant" and not content and thinking is None:
            raise ValueError("an assistant message has empty content and no thinking: drop it or fill it")
    for t in turns:  # mistral-common's force_img_first: a merged user turn [text, image] encodes as [image, text]
        if isinstance(t[1], list) and len(t[1]) == 2 and isinstance(t[1][0], str) and isinstance(t[1][1], dict):
            t[1] = t[1][::-1]
    return [tuple(t) for t in turns]


def _user_parts(parts: list, k: int):
    """A user message's [{"type": "text"|"image", ...}] as mistral-common normalises it: adjacent text joined
    with a blank line, images kept in place. Text only gives a plain string. Returns a str or a list of
    str / {"image": x}."""
    out = []
    for j, p in enumerate(parts):
        kind = p.get("type") if isinstance(p, dict) else None
        if kind == "text" and isinstance(p.get("text"), str):
            out.append(p["text"])
        elif kind == "image" and p.get("image") is not None:
            out.append({"image": p["image"]})
        else:
            raise ValueError(f"message {k}, part {j}: expected {{'type': 'text', 'text': str}} or "
                             f"{{'type': 'image', 'image': ...}}, got {p!r}")
    return _join_parts([out])


def _join_parts(contents: list):
    """Concatenate message contents (str or part lists), joining neighbouring non-empty text with a blank line."""
    out, text = [], []
    for content in contents:
        for p in [content] if isinstance(content, str) else content:
            if isinstance(p, str):
                if p:
                    text.append(p)
            else:
                if text:
                    out.append("\n\n".join(text))
                    text = []
                out.append(p)
    if text:
        out.append("\n\n".join(text))
    if all(isinstance(p, str) for p in out):
        return "".join(out)
    return out


# -----------------------------------------------------------------------------
# Corpora

_STDLIB_SKIP = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idlelib", "lib2to3",
                "turtledemo", "ensurepip"}


def _stdlib_files() -> list[tuple[str, str]]:
    """(module name, path) for the standard library's .py files, sorted; tests and tools left out."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for here, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _STDLIB_SKIP and not d.startswith("."))
        for f in sorted(files):
            if f.endswith(".py"):
                rel = os.path.relpath(os.path.join(here, f), root)[:-3].split(os.sep)
                if rel[-1] == "__init__":
                    rel = rel[:-1]
                found.append((".".join(rel), os.path.join(here, f)))
    return sorted(found)


@functools.lru_cache(maxsize=1)
def _stdlib_docs() -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """Read once per process: (module name, document text) and (public name, docstring) pairs."""
    docs, named = [], []
    for modname, path in _stdlib_files():
        with open(path, "rb") as f:
            source = f.read()
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            continue
        parts = []
        if doc := ast.get_docstring(tree):
            parts.append(doc)
        public_module = not any(p.startswith("_") for p in modname.split("."))

        def visit(body, prefix: str, top: bool):
            for node in body:
                if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                    continue
                name = f"{prefix}.{node.name}"
                doc = ast.get_docstring(node)
                if doc:
                    if isinstance(node, ast.ClassDef):
                        bases = ", ".join(ast.unparse(b) for b in node.bases)
                        head = f"class {name}({bases})" if bases else f"class {name}"
                    else:
                        head = f"{name}({ast.unparse(node.args)})"
                    parts.append(f"{head}\n{doc}")
                    if top and public_module and not node.name.startswith("_"):
                        named.append((name, doc))
                if isinstance(node, ast.ClassDef):
                    visit(node.body, name, False)

        visit(tree.body, modname, True)
        if parts:
            docs.append((modname, f"Module {modname}\n\n" + "\n\n".join(parts)))
    return tuple(docs), tuple(named)


def split_documents(docs: list[str], val_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """Deterministic split by a hash of (seed, text): a document's side never depends on the others."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction {val_fraction} must be in [0, 1)")
    keys = [int.from_bytes(hashlib.sha256(f"{seed}\0{d}".encode("utf-8", "surrogatepass")).digest()[:8], "big")
            / 2.0**64 for d in docs]
    is_val = [k < val_fraction for k in keys]
    if val_fraction > 0 and len(docs) > 1 and not any(is_val):  # tiny corpora still get one val document
        is_val[min(range(len(docs)), key=keys.__getitem__)] = True
    return ([d for d, v in zip(docs, is_val) if not v], [d for d, v in zip(docs, is_val) if v])


def python_corpus(val_fraction: float = 0.05, seed: int = 0) -> tuple[list[str], list[str]]:
    """The embedded default corpus (deviation 1): pydoc topics + one document per stdlib module."""
    topics = [pydoc_data.topics.topics[k].strip() for k in sorted(pydoc_data.topics.topics)]
    modules = [text for _, text in _stdlib_docs()[0]]
    return split_documents([t for t in topics if t] + modules, val_fraction, seed)


def jsonl_rows(path: str, lines):
    """(line number, parsed object) for each non-blank line of a JSON-lines file; a line that is not JSON
    raises ValueError naming path:line. The one parser behind every .jsonl reader (documents, chats, problems)."""
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            yield n, json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n} is not valid JSON ({e.msg}): one JSON object per line") from None


def read_documents(paths: list[str | os.PathLike]) -> list[str]:
    """Documents from files: a .txt file is ONE document (file = document boundary); a .jsonl file
    gives one document per line from its "text" field (lines with only "messages", i.e. chat data,
    are skipped here). Folders are searched for .txt/.jsonl, sorted."""
    files: list[str] = []
    for p in map(os.fspath, paths):
        if os.path.isdir(p):
            inner = sorted(os.path.join(r, f) for r, _, fs in os.walk(p) for f in fs if f.endswith((".txt", ".jsonl")))
            if not inner:
                raise FileNotFoundError(f"folder {p} holds no .txt or .jsonl files")
            files += inner
        elif not os.path.isfile(p):
            raise FileNotFoundError(f"corpus file {p} does not exist: check the path")
        elif not p.endswith((".txt", ".jsonl")):
            raise ValueError(f"corpus file {p}: only .txt and .jsonl are read (convert it, or rename if it is text)")
        else:
            files.append(p)
    docs: list[str] = []
    for path in files:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"corpus file {path} is not valid UTF-8 (byte {e.start}: {e.reason}): re-encode it "
                             "as UTF-8, e.g. `iconv -f latin1 -t utf-8`") from None
        before = len(docs)
        if path.endswith(".txt"):
            if text.strip():
                docs.append(text)
        else:
            for n, row in jsonl_rows(path, text.splitlines()):
                if isinstance(row, dict) and isinstance(row.get("text"), str):
                    if row["text"].strip():
                        docs.append(row["text"])
                elif not (isinstance(row, dict) and "messages" in row):
                    raise ValueError(f'{path}:{n} has no string "text" field (nor "messages"): '
                                     'write lines like {"text": "..."}')
        if len(docs) == before and path.endswith(".txt"):
            raise ValueError(f"corpus file {path} is empty: remove it or add text")
    if not docs:
        raise ValueError(f"no documents in {[os.fspath(p) for p in paths]}: the corpus is empty")
    return docs


def tokenize_documents(docs: list[str], tok: Tokenizer) -> np.ndarray:
    """Flat uint32 stream, each document as BOS + ids + EOS (the boundaries PackedLoader respects).

    Same as concatenating `tok.encode(d, bos=True, eos=True)` (the readable form; tested equal), but
    the id offset and the BOS/EOS placement are done in numpy. tiktoken's threaded batch encode was
    slower than this loop on the project's 2-core machines, so there are no threads.
    """
    if not docs:
        raise ValueError("tokenize_documents got no documents: the corpus is empty")
    ranks = [tok._bpe.encode_ordinary(d) for d in docs]
    lengths = np.fromiter(map(len, ranks), dtype=np.int64, count=len(ranks)) + 2
    ends = np.cumsum(lengths)
    starts = ends - lengths
    out = np.empty(int(ends[-1]), dtype=np.uint32)
    body = np.ones(out.size, dtype=bool)
    body[starts] = body[ends - 1] = False
    flat = np.fromiter(itertools.chain.from_iterable(ranks), dtype=np.uint32, count=out.size - 2 * len(ranks))
    out[body] = np.where(flat < tok.vocab_size - tok.n_special, flat + tok.n_special, tok.unk_id)
    out[starts], out[ends - 1] = tok.bos_id, tok.eos_id
    return out


def read_chats(path: str | os.PathLike) -> list[list[dict] | str]:
    """Chats from a .jsonl file, one {"messages": [{role, content}, ...]} object per line, in order (blank
    lines skipped). A line may instead be {"text": "..."}, a plain document (returned as the string), so
    one file can mix chats with plain text. A malformed line raises ValueError naming path:line."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"chat file {path} does not exist: give a .jsonl file with one "
                                f'{{"messages": [...]}} object per line')
    chats = []
    with open(path, encoding="utf-8") as f:
        for n, row in jsonl_rows(path, f):
            if isinstance(row, dict) and "messages" not in row and isinstance(row.get("text"), str) and row["text"]:
                chats.append(row["text"])
                continue
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not (isinstance(msgs, list) and msgs and all(isinstance(m, dict) and "role" in m for m in msgs)):
                raise ValueError(f'{path}:{n} has no "messages" list of {{"role", "content"}} objects (nor a '
                                 f'non-empty "text"): write lines like {{"messages": [{{"role": "user", '
                                 f'"content": "..."}}, ...]}} or {{"text": "..."}}')
            chats.append(msgs)
    if not chats:
        raise ValueError(f"chat file {path} holds no chats")
    return chats


def chat_tokens(path: str | os.PathLike, tok: Tokenizer) -> np.ndarray:
    """A jsonl file of chats as one uint32 token stream, each chat in the tokenizer's chat format
    (tok.encode_chat: v13 for Tekken, ChatML for a GGUF tokenizer), back to back: distillation data in the
    format a chat parent's abilities live in. A {"text": ...} line is a plain document, BOS text EOS, as
    the corpus's documents are. A chat encode_chat refuses raises, naming its line."""
    ids = []
    for n, msgs in enumerate(read_chats(path), 1):
        if isinstance(msgs, str):
            ids.append(np.asarray(tok.encode(msgs, bos=True, eos=True), dtype=np.uint32))
            continue
        try:
            ids.append(np.asarray(tok.encode_chat(msgs)[0], dtype=np.uint32))
        except ValueError as e:
            raise ValueError(f"{os.fspath(path)}: chat {n}: {e}") from None
    return np.concatenate(ids)


# -----------------------------------------------------------------------------
# Pre-tokenized shards: a 256-byte header, then the tokens (uint16 when V <= 65536, else uint32)

SHARD_MAGIC = b"MIN3TOKS"
SHARD_VERSION = 1
SHARD_HEADER = struct.Struct("<8sIIQQ64s")  # magic, version, itemsize, vocab_size, n_tokens, tokenizer hash
SHARD_HEADER_BYTES = 256


def _shard_dtype(vocab_size: int):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def write_shards(tokens: np.ndarray, out_dir: str | os.PathLike, tok: Tokenizer,
                 shard_tokens: int = 100_000_000) -> list[str]:
    """Write `shard_00000.bin`, ... into out_dir; each file appears complete or not at all. Stale
    `shard_*.bin` from an earlier, longer run are removed (a folder load would otherwise mix them in)."""
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(f"write_shards needs a non-empty 1-D integer array, got shape {tokens.shape} {tokens.dtype}")
    if int(tokens.min()) < 0 or int(tokens.max()) >= tok.vocab_size:
        raise ValueError(f"token ids span {int(tokens.min())}..{int(tokens.max())}, outside this tokenizer's "
                         f"0..{tok.vocab_size - 1}: tokenize with the same tokenizer you pass here")
    if shard_tokens <= 0:
        raise ValueError(f"shard_tokens must be positive, got {shard_tokens}")
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    dtype = _shard_dtype(tok.vocab_size)
    paths = []
    for i, start in enumerate(range(0, tokens.size, shard_tokens)):
        chunk = tokens[start: start + shard_tokens].astype(dtype)
        header = SHARD_HEADER.pack(SHARD_MAGIC, SHARD_VERSION, np.dtype(dtype).itemsize, tok.vocab_size,
                                   chunk.size, tok.file_hash.encode())
        path = os.path.join(out_dir, f"shard_{i:05d}.bin")
        tmp = f"{path}.{os.getpid()}.tmp"  # same folder, so os.replace is atomic
        try:
            with open(tmp, "wb") as f:
                f.write(header.ljust(SHARD_HEADER_BYTES, b"\0"))
                f.write(chunk.tobytes())
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        paths.append(path)
    for stale in sorted(glob.glob(os.path.join(out_dir, "shard_*.bin"))):
        if stale not in paths:
            os.remove(stale)
    return paths


def _open_shard(path: str, tok: Optional[Tokenizer]) -> tuple[np.ndarray, int, str]:
    with open(path, "rb") as f:
        head = f.read(SHARD_HEADER_BYTES)
    if len(head) < SHARD_HEADER_BYTES or head[:8] != SHARD_MAGIC:
        raise ValueError(f"{path} is not a token shard (bad magic): write shards with `python data.py prepare`")
    magic, version, itemsize, vocab_size, n, hash_ = SHARD_HEADER.unpack_from(head)
    if version != SHARD_VERSION:
        raise ValueError(f"{path} has shard format version {version}, this code reads {SHARD_VERSION}: re-run prepare")
    if itemsize != np.dtype(_shard_dtype(vocab_size)).itemsize:
        raise ValueError(f"{path}: item size {itemsize} does not fit vocab size {vocab_size}; the file is corrupt")
    expected = SHARD_HEADER_BYTES + n * itemsize
    if os.path.getsize(path) != expected:
        raise ValueError(f"{path} holds {os.path.getsize(path)} bytes, its header promises {expected}: the file is "
                         "truncated or corrupt; re-run `python data.py prepare`")
    if tok is not None:
        if vocab_size != tok.vocab_size:
            raise ValueError(f"{path} was written for vocab size {vocab_size}, the tokenizer has {tok.vocab_size}: "
                             f"pass --vocab-size {vocab_size}, or re-run prepare with this tokenizer")
        if hash_.decode() != tok.file_hash:
            raise ValueError(f"{path} was written by another tokenizer (hash {hash_.decode()[:12]}..., this one "
                             f"{tok.file_hash[:12]}... from {tok.path}): load the tekken.json the shards were made "
                             "with, or re-run `python data.py prepare` with this one")
    tokens = np.memmap(path, dtype=_shard_dtype(vocab_size), mode="r", offset=SHARD_HEADER_BYTES, shape=(n,))
    return tokens, vocab_size, hash_.decode()


class ShardedTokens:
    """Several token shards read as one 1-D stream, without loading them: each shard stays a read-only
    memmap, and reads index across shard boundaries. The paper's token counts (1-3T per child) are
    terabytes, so concatenating a folder in RAM on every rank is not an option.

    Supports what the loaders need: len, .size/.shape/.ndim/.dtype, a contiguous slice (a view over the
    same memmaps, nothing copied), an integer or an integer array of positions (only those tokens are
    read), and .tolist() / np.asarray (which do copy everything: tests and small data only)."""

    def __init__(self, parts: list[np.ndarray], vocab_size: Optional[int] = None):
        self.parts = [p for p in parts if len(p)]
        self.vocab_size = vocab_size
        self.dtype = np.result_type(*[p.dtype for p in parts]) if parts else np.dtype(np.uint32)
        self.starts = np.cumsum([0] + [len(p) for p in self.parts])  # part k holds [starts[k], starts[k+1])
        self.size = int(self.starts[-1])
        self.shape, self.ndim = (self.size,), 1

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, key):
        if isinstance(key, slice):
            start, stop, step = key.indices(self.size)
            if step != 1:
                raise IndexError("ShardedTokens supports contiguous slices only")
            stop = max(start, stop)
            parts = []
            for k, p in enumerate(self.parts):
                lo, hi = max(start, self.starts[k]), min(stop, self.starts[k + 1])
                if lo < hi:
                    parts.append(p[lo - self.starts[k]: hi - self.starts[k]])
            return ShardedTokens(parts, self.vocab_size)
        idx = np.asarray(key)
        if not np.issubdtype(idx.dtype, np.integer):
            raise IndexError(f"ShardedTokens takes integer positions or a slice, got {idx.dtype}")
        flat = np.where(idx < 0, idx + self.size, idx).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.size):
            raise IndexError(f"token position out of range for a stream of {self.size} tokens")
        part = np.searchsorted(self.starts, flat, side="right") - 1  # which shard holds each position
        out = np.empty(flat.shape, dtype=self.dtype)
        for k in np.unique(part):
            sel = part == k
            out[sel] = self.parts[k][flat[sel] - self.starts[k]]
        return out.reshape(idx.shape) if idx.ndim else out[0]

    def __array__(self, dtype=None, copy=None):
        a = np.concatenate(self.parts) if self.parts else np.empty(0, self.dtype)
        return a if dtype is None else a.astype(dtype)

    def tolist(self) -> list:
        return [t for p in self.parts for t in p.tolist()]


def load_tokens(path: str | os.PathLike, tok: Optional[Tokenizer] = None, max_vocab: Optional[int] = None):
    """Tokens from a shard file, a folder of `*.bin` shards, or a glob. One shard is a read-only memmap;
    several are a `ShardedTokens` over their memmaps, in sorted name order: nothing is read into memory.
    Every header is checked (magic, version, size, and with `tok` its vocabulary and tokenizer hash);
    `max_vocab` refuses shards written for a larger vocabulary (the model's), without scanning the ids."""
    path = os.fspath(path)
    if any(c in path for c in "*?["):
        files = sorted(glob.glob(path))
    elif os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "*.bin")))
    elif os.path.isfile(path):
        files = [path]
    else:
        files = []
    if not files:
        raise FileNotFoundError(f"no token shards at {path}: run `python data.py prepare --out DIR` first")
    opened = [_open_shard(f, tok) for f in files]
    if len({(v, h) for _, v, h in opened}) > 1:
        raise ValueError(f"shards at {path} were written by different tokenizers or vocab sizes: "
                         "keep one tokenizer's shards per folder")
    vocab = opened[0][1]
    if max_vocab is not None and vocab > max_vocab:
        raise ValueError(f"{path} was tokenized for a vocabulary of {vocab} ids, the model has {max_vocab}: "
                         f"tokenize with the model's own tokenizer (python data.py prepare --vocab-size {max_vocab})")
    return opened[0][0] if len(opened) == 1 else ShardedTokens([a for a, _, _ in opened], vocab)


# -----------------------------------------------------------------------------
# The loader


class PackedLoader:
    """Batches of (seq_len + 1)-token windows cut from the packed stream, without overlap.

    Window w is tokens[w*seq_len : w*seq_len + seq_len + 1]; inputs drop its last token, targets its
    first. Epoch e visits the windows in the order of a permutation seeded by (seed, e); global batch
    `step` is the next batch_size * world_size of them and rank r takes slice r. So batch(step) is a
    pure function of (seed, step, rank, world_size): resuming needs only the step, and ranks never
    share a window. Targets whose input is EOS (predicting the next document's BOS) are -100.
    `tokens` may be a memmap or a `ShardedTokens` (load_tokens): only the batch's windows are read.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, eos_id: int = 2):
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size ({batch_size}) and seq_len ({seq_len}) must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in 0..world_size-1 = {world_size - 1}")
        self.tokens = tokens if isinstance(tokens, (np.ndarray, ShardedTokens)) else np.asarray(tokens)
        self.batch_size, self.seq_len, self.seed = batch_size, seq_len, seed
        self.rank, self.world_size, self.eos_id = rank, world_size, eos_id
        self.global_batch = batch_size * world_size
        n_windows = (len(self.tokens) - 1) // seq_len
        self.steps_per_epoch = n_windows // self.global_batch
        if self.steps_per_epoch == 0:
            need = self.global_batch * seq_len + 1
            raise ValueError(f"{len(self.tokens)} tokens < needed {need} for one global batch of "
                             f"{self.global_batch} x {seq_len}: give more data or a smaller batch/seq_len")
        self.n_windows = n_windows
        self.windows_per_epoch = self.steps_per_epoch * self.global_batch  # the remainder is skipped
        self.tokens_per_step = self.global_batch * seq_len  # global, counted as targets
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
            self._perm_epoch = epoch
        return self._perm

    def window_ids(self, step: int) -> np.ndarray:
        """The window indices this rank reads at `step` (exposed for tests and logging)."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}")
        epoch, j = divmod(step, self.steps_per_epoch)
        g = self._order(epoch)[j * self.global_batch: (j + 1) * self.global_batch]
        return g[self.rank * self.batch_size: (self.rank + 1) * self.batch_size]

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        starts_B = self.window_ids(step) * self.seq_len
        idx_BW = starts_B[:, None] + np.arange(self.seq_len + 1)  # W = seq_len + 1
        win_BW = torch.from_numpy(self.tokens[idx_BW].astype(np.int64))
        inputs_BT, targets_BT = win_BW[:, :-1], win_BW[:, 1:].clone()
        targets_BT[inputs_BT == self.eos_id] = -100
        return inputs_BT.contiguous(), targets_BT


# -----------------------------------------------------------------------------
# Held-out text: de-duplication against the training stream, validation and test halves

# Held-out text that also occurs in the training stream measures memory, not generalisation (the Python
# corpus repeats docstrings across documents). Every held-out token covered by a DEDUP_NGRAM-token window that occurs
# in the training tokens is dropped; what is left is re-cut into documents.
DEDUP_NGRAM = 32
DEDUP_MAX_TRAIN = 1 << 28  # above this many training tokens the hash table (8 B per token) is skipped


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """A 64-bit polynomial hash of every n-token window, computed in n vectorised passes (uint64 wraps)."""
    t = np.asarray(tokens).astype(np.uint64)
    h = np.zeros(max(0, len(t) - n + 1), dtype=np.uint64)
    for j in range(n):
        h = h * np.uint64(1_000_003) + t[j: j + len(h)]
    return h


def in_sorted(values: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    """np.isin(values, sorted_unique) by binary search: O(m log n) for m held-out windows against n
    training windows, instead of np.isin's sort of both arrays on every call."""
    if len(sorted_unique) == 0:
        return np.zeros(len(values), dtype=bool)
    idx = np.minimum(np.searchsorted(sorted_unique, values), len(sorted_unique) - 1)
    return sorted_unique[idx] == values


def heldout_overlap(train: np.ndarray, held: np.ndarray, n: int) -> int:
    """How many of the held-out stream's n-token windows (every position) occur in the training stream."""
    if len(held) < n or len(train) < n:
        return 0
    return int(in_sorted(ngram_hashes(held, n), np.unique(ngram_hashes(train, n))).sum())


def dedupe_heldout(train: np.ndarray, held: np.ndarray, n: int, bos_id: int, eos_id: int) -> tuple:
    """Drop every held-out token inside an n-token window that also occurs in `train`; each surviving
    run becomes a document (BOS ... EOS). Returns (tokens, record with the overlap before and after)."""
    info = {"ngram": n, "windows": max(0, len(held) - n + 1), "tokens_before": len(held)}
    if len(train) > DEDUP_MAX_TRAIN:
        return held, info | {"skipped": f"more than {DEDUP_MAX_TRAIN} training tokens"}
    train_h = np.unique(ngram_hashes(train, n))
    info["overlap_before"] = int(in_sorted(ngram_hashes(held, n), train_h).sum()) if len(held) >= n else 0
    for _ in range(4):  # re-cutting adds BOS/EOS, which could (in principle) form a new match: check again
        if len(held) < n:
            break
        seen = np.flatnonzero(in_sorted(ngram_hashes(held, n), train_h))
        if len(seen) == 0:
            break
        edges = np.zeros(len(held) + 1, dtype=np.int64)
        np.add.at(edges, seen, 1)
        np.add.at(edges, seen + n, -1)
        keep = np.cumsum(edges[:-1]) == 0
        bounds = np.flatnonzero(np.diff(np.concatenate([[0], keep.astype(np.int8), [0]])))
        pieces = []
        for a, b in zip(bounds[::2], bounds[1::2]):
            run = held[a:b]
            if len(run) < 2 or (len(run) == 2 and run[0] == bos_id):
                continue
            pieces += [run if run[0] == bos_id else np.concatenate([[bos_id], run]).astype(held.dtype)]
            if run[-1] != eos_id:
                pieces.append(np.array([eos_id], dtype=held.dtype))
        held = np.concatenate(pieces) if pieces else held[:0]
    info["tokens_after"] = len(held)
    info["overlap_after"] = int(in_sorted(ngram_hashes(held, n), train_h).sum()) if len(held) >= n else 0
    return held, info


def split_in_two(held: np.ndarray, eos_id: int) -> tuple:
    """The held-out stream cut at the document end nearest its middle: (validation, test). The validation
    half only chooses the baseline's learning rate; every figure in the table is on the test half."""
    ends = np.flatnonzero(held == eos_id) + 1
    cut = int(ends[np.argmin(np.abs(ends - len(held) // 2))]) if len(ends) else len(held) // 2
    if not 0 < cut < len(held):
        cut = len(held) // 2
    return held[:cut], held[cut:]


# -----------------------------------------------------------------------------
# Offline task data for post-training demos (deviation 6)

_QA_TEMPLATES = ("What does `{}` do?", "In the Python standard library, what does `{}` do?",
                 "Explain briefly what `{}` does.")


def _first_paragraph(doc: str) -> str:
    return " ".join(doc.strip().split("\n\n")[0].split())


def qa_pairs(n: int, seed: int = 0) -> list[dict]:
    """n questions about public stdlib functions/classes, answered by their docstring's first paragraph.
    The candidates are shuffled once by `seed`, so qa_pairs(k, s) is a prefix of qa_pairs(n, s)."""
    seen, cands = set(), []
    for name, doc in _stdlib_docs()[1]:
        answer = _first_paragraph(doc)
        if name not in seen and 20 <= len(answer) <= 400:
            seen.add(name)
            cands.append((name, answer))
    if not 0 <= n <= len(cands):
        raise ValueError(f"qa_pairs: n={n}, but only {len(cands)} docstring questions exist")
    rng = random.Random(f"qa:{seed}")
    rng.shuffle(cands)
    return [dict(question=_QA_TEMPLATES[rng.randrange(len(_QA_TEMPLATES))].format(name), answer=answer)
            for name, answer in cands[:n]]


_NAMES = ("Ada", "Bruno", "Chen", "Dalia", "Emeka", "Farah", "Goran", "Hana", "Ivo", "Jun", "Kemal", "Lena")


def _math_problem(rng: random.Random) -> tuple[str, int]:
    kind = rng.randrange(7)
    name = rng.choice(_NAMES)
    a, b, c = rng.randint(2, 99), rng.randint(2, 99), rng.randint(2, 12)
    if kind == 0:
        op = rng.choice("+-*")
        return f"What is {a} {op} {b}?", {"+": a + b, "-": a - b, "*": a * b}[op]
    if kind == 1:
        return f"What is ({a} + {b}) * {c}?", (a + b) * c
    if kind == 2:
        return f"What is {a * c} divided by {c}?", a
    if kind == 3:
        return (f"{name} has {a + b} apples, gives away {b}, then buys {c} more. "
                f"How many apples does {name} have now?", a + c)
    if kind == 4:
        return f"A box holds {a} pencils. How many pencils are in {c} boxes?", a * c
    if kind == 5:
        return (f"{name} shares {a * c} marbles equally among {c} friends. "
                f"How many marbles does each friend get?", a)
    price, k = rng.randint(1, 9), rng.randint(2, 9)
    bill = 100 if price * k > 50 else 50
    return (f"Pens cost {price} dollars each. {name} buys {k} pens and pays with a {bill} dollar note. "
            f"How many dollars of change does {name} get?", bill - price * k)


def _easy_problem(rng: random.Random) -> tuple[str, int]:
    """One-digit sums, with the answer format the checker reads. A 135M model (SmolLM2-Instruct) gets
    a fair share of these right, where it is at the floor on the "mixed" level (REAL_MODEL.md)."""
    a, b = rng.randint(1, 9), rng.randint(1, 9)
    return f"What is {a} + {b}? Answer with the number only.", a + b


MATH_LEVELS = {"mixed": _math_problem, "easy": _easy_problem}


def math_problems(n: int, seed: int = 0, level: str = "mixed") -> list[dict]:
    """Arithmetic and word problems with integer answers ("42"). Problem i depends only on (seed, i, level).

    level "mixed" (the default): two-digit arithmetic and word problems; "easy": one-digit sums."""
    if n < 0:
        raise ValueError(f"math_problems: n must be >= 0, got {n}")
    if level not in MATH_LEVELS:
        raise ValueError(f"math_problems: level {level!r} is unknown: choose one of {', '.join(MATH_LEVELS)}")
    out = []
    for i in range(n):
        key = f"math:{seed}:{i}" if level == "mixed" else f"math:{level}:{seed}:{i}"  # mixed: ids as before
        q, a = MATH_LEVELS[level](random.Random(key))
        out.append(dict(question=q, answer=str(a)))
    return out


def easy_math_problems(n: int, seed: int = 0, max_operand: int = 9, ops: str = "+-") -> list[dict]:
    """The first kind of math_problems at a chosen difficulty: "What is a op b?" with 0 <= a, b <= max_operand.
    RL demos need a starting pass rate between 10% and 90% (GRPO learns nothing from all-wrong groups);
    small models reach that here, not on math_problems' two-digit mix. Problem i depends on (seed, i)."""
    if n < 0 or max_operand < 1 or not ops or set(ops) - set("+-*"):
        raise ValueError(f"easy_math_problems: n >= 0, max_operand >= 1 and ops from '+-*' (got {n}, {max_operand}, {ops!r})")
    out = []
    for i in range(n):
        rng = random.Random(f"easy:{seed}:{i}")
        a, b, op = rng.randint(0, max_operand), rng.randint(0, max_operand), rng.choice(ops)
        out.append(dict(question=f"What is {a} {op} {b}?", answer=str({"+": a + b, "-": a - b, "*": a * b}[op])))
    return out


def split_by_question(problems: list[dict], n_held: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(train, held): n_held distinct questions drawn at random (seeded) are held out, one problem each, in
    the order drawn; train keeps every problem whose question is not held out. A held-out score then
    measures problems no training split has seen, not memorised ones (two draws may repeat a question)."""
    questions = sorted({p["question"] for p in problems})
    if not 0 <= n_held <= len(questions):
        raise ValueError(f"split_by_question: n_held={n_held}, but there are {len(questions)} distinct questions")
    random.Random(seed).shuffle(questions)
    held_q = questions[:n_held]
    one = {p["question"]: p for p in problems}
    taken = set(held_q)
    return [p for p in problems if p["question"] not in taken], [one[q] for q in held_q]


THINK_IDS = {34: "[THINK]", 35: "[/THINK]"}  # where Ministral 3's v13 tekken.json lists them


def tekken_with_think(src: str, dst: str, vocab_size: Optional[int] = None) -> str:
    """A copy of a legacy (v3) tekken.json whose special-token list names [THINK]/[/THINK] at ids 34/35.
    The shipped file has no special list and no [THINK] (deviation 3); ids 20..999 are unused
    fillers there, so every other id keeps its meaning and a model trained on the old file reads the new
    one unchanged. vocab_size keeps only the first ranks (deviation 2), so the copy is small.
    Written to a temporary name, then renamed."""
    with open(src) as f:
        obj = json.load(f)
    if "special_tokens" in obj:
        raise ValueError(f"{src} already lists its special tokens: use it directly")
    n = obj["config"].get("default_num_special_tokens", 1000)
    if vocab_size is not None:
        obj["vocab"] = obj["vocab"][:vocab_size - n]
        obj["config"]["default_vocab_size"] = vocab_size
    names = list(LEGACY_SPECIALS) + [THINK_IDS.get(i, f"<SPECIAL_{i}>") for i in range(len(LEGACY_SPECIALS), n)]
    obj["special_tokens"] = [dict(rank=i, token_str=s, is_control=True) for i, s in enumerate(names)]
    obj["config"]["version"] = "v13"
    tmp = f"{dst}.tmp-{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(dst)), exist_ok=True)
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, dst)
    return dst


_TRACES = [  # (question pattern, trace, result) for _math_problem's seven kinds
    (r"What is \((\d+) \+ (\d+)\) \* (\d+)\?", lambda a, b, c: (f"{a} + {b} = {a + b}. {a + b} * {c} = {(a + b) * c}.",
                                                       (a + b) * c)),
    (r"What is (\d+) ([-+*]) (\d+)\?", None),
    (r"What is (\d+) divided by (\d+)\?", lambda x, c: (f"{x} / {c} = {x // c}.", x // c)),
    (r"has (\d+) apples, gives away (\d+), then buys (\d+) more", lambda t, b, c: (f"{t} - {b} = {t - b}. {t - b} + {c} = "
                                                                                   f"{t - b + c}.", t - b + c)),
    (r"holds (\d+) pencils\. How many pencils are in (\d+) boxes", lambda a, c: (f"{a} * {c} = {a * c}.", a * c)),
    (r"shares (\d+) marbles equally among (\d+) friends", lambda x, c: (f"{x} / {c} = {x // c}.", x // c)),
    (r"cost (\d+) dollars each\. \w+ buys (\d+) pens and pays with a (\d+) dollar note",
     lambda p, k, b: (f"{p} * {k} = {p * k}. {b} - {p * k} = {b - p * k}.", b - p * k)),
]


def math_trace(question: str, answer: str) -> str:
    """A worked step-by-step trace for a data.math_problems question (the reasoning SFT's [THINK] part),
    checked against the answer."""
    for pattern, fn in _TRACES:
        m = re.search(pattern, question)
        if m is None:
            continue
        if fn is None:  # a op b
            a, op, b = int(m.group(1)), m.group(2), int(m.group(3))
            r = {"+": a + b, "-": a - b, "*": a * b}[op]
            trace = f"{a} {op} {b} = {r}."
        else:
            trace, r = fn(*(int(g) for g in m.groups()))
        if str(r) != answer:
            raise ValueError(f"trace for {question!r} gives {r}, the answer is {answer}")
        return trace
    raise ValueError(f"no trace template matches {question!r}")


_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_BOXED = re.compile(r"\\boxed\{([^{}]*)\}")


def check_math_answer(text: str, answer: str) -> bool:
    """True when the final number of a model's output equals `answer` exactly.

    Only the part after the last `[/THINK]` counts (the trace may try many numbers); a `\\boxed{...}`
    there wins over plain text; thousands separators are allowed ("1,234"); "42.0" equals "42".
    """
    text = text.rsplit("[/THINK]", 1)[-1]
    boxed = _BOXED.findall(text)
    found = _NUMBER.findall(boxed[-1] if boxed else text)
    if not found:
        return False
    try:
        return Fraction(found[-1].replace(",", "")) == Fraction(answer.replace(",", ""))
    except (ValueError, ZeroDivisionError):
        return False


# -----------------------------------------------------------------------------
# Command line


def _add_config_args(ap: argparse.ArgumentParser) -> None:
    hints = typing.get_type_hints(DataConfig)
    for f in dataclasses.fields(DataConfig):
        kind = typing.get_args(hints[f.name])[0] if typing.get_origin(hints[f.name]) is typing.Union else hints[f.name]
        ap.add_argument("--" + f.name.replace("_", "-"), type=kind, default=f.default, help=f"default {f.default}")


def _corpus(files: list[str], cfg: DataConfig) -> tuple[list[str], list[str]]:
    if files:
        return split_documents(read_documents(files), cfg.val_fraction, cfg.seed)
    return python_corpus(cfg.val_fraction, cfg.seed)


def _write_json(path: str, obj) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="Tekken tokenization, corpora and shards (PAPER.md section 7).")
    sub = ap.add_subparsers(dest="cmd", required=True)
    for name, text in (("prepare", "tokenize FILES (default: the embedded Python corpus) into out/train, out/val"),
                       ("stats", "print corpus size in documents, characters and tokens")):
        p = sub.add_parser(name, help=text)
        _add_config_args(p)
        p.add_argument("files", nargs="*", help=".txt / .jsonl files or folders; none = embedded Python corpus")
    args = ap.parse_args(argv)
    files = args.files
    cfg = DataConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DataConfig)})
    try:
        tok = Tokenizer.from_file(cfg.tokenizer, cfg.vocab_size)
        train, val = _corpus(files, cfg)
        print(f"config: {dataclasses.asdict(cfg)}")
        print(f"tokenizer: {tok.path} (version {tok.version}, vocab {tok.vocab_size}, hash {tok.file_hash[:12]})")
        summary = {}
        for split, docs in (("train", train), ("val", val)):
            toks = tokenize_documents(docs, tok) if docs else np.zeros(0, np.uint32)
            summary[split] = dict(documents=len(docs), characters=sum(map(len, docs)), tokens=int(toks.size))
            print(f"{split}: {len(docs)} documents, {summary[split]['characters']:,} characters, {toks.size:,} tokens")
            if args.cmd == "prepare" and docs:
                paths = write_shards(toks, os.path.join(cfg.out, split), tok, cfg.shard_tokens)
                print(f"  wrote {len(paths)} shard(s) to {os.path.join(cfg.out, split)}")
        if args.cmd == "prepare":
            _write_json(os.path.join(cfg.out, "prepare.json"),
                        dict(config=dataclasses.asdict(cfg), files=files, tokenizer=tok.path,
                             tokenizer_hash=tok.file_hash, vocab_size=tok.vocab_size, **summary))
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
