"""data.py: Tekken parity with mistral-common, the v13 chat format, corpora, shards, loader, task data."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import data  # noqa: E402
import data as D  # noqa: E402

import mistral_common.tokens.tokenizers.tekken as mc_tekken  # noqa: E402  (requirements.txt: a hard import, never a skip)

SHIPPED = os.path.join(os.path.dirname(data.default_tekken_path()), "")
TEXTS = [
    "", " ", "Hello, world! How are you?", "  leading and trailing  ", "tabs\tand\nnewlines\r\n\n\n",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский, עברית, العربية, हिन्दी, 日本語のテキスト, 中文, 한국어",
    "emoji 🙂👍🏽 👨‍👩‍👧‍👦 flags 🇫🇷🇯🇵 and a lone ZWJ \u200d",
    "1234567890123456789012345678901234567890 3.14159 -42",
    "def f(x):\n    return {'a': [1, 2, 3]}  # comment\n\n\nclass A(B):\n\tpass\n", " " * 37 + "x" + "\n" * 9,
    "[INST] not a control token [/INST] </s> <s>", "mixed\u00a0nbsp and \u2028 line sep", "a" * 500,
]


@pytest.fixture(scope="module")
def tok():
    return data.Tokenizer.from_file()


@pytest.fixture(scope="module")
def small():
    return data.Tokenizer.from_file(vocab_size=8192)


@pytest.fixture(scope="module")
def v13_file(tmp_path_factory):
    """A v7+-style file: the shipped vocabulary plus a special-token list carrying [THINK]/[/THINK].
    The names follow mistral-common's legacy list, then [ARGS] 32, [CALL_ID] 33, [THINK] 34, [/THINK] 35."""
    with open(data.default_tekken_path()) as f:
        obj = json.load(f)
    extra = {32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]"}
    names = list(data.LEGACY_SPECIALS) + [extra.get(i, f"<SPECIAL_{i}>") for i in range(20, 36)]
    obj["special_tokens"] = [dict(rank=i, token_str=s, is_control=True) for i, s in enumerate(names)]
    obj["config"]["version"] = "v13"
    path = tmp_path_factory.mktemp("v13") / "tekken.json"
    path.write_text(json.dumps(obj))
    return str(path)


# -- tokenizer -----------------------------------------------------------------------------------


def test_check_vector(tok):
    assert tok.encode("Hello, world! How are you?") == [22177, 1044, 4304, 1033, 3075, 1584, 1636, 1063]
    assert tok.encode("Hi", bos=True, eos=True)[0::len(tok.encode("Hi")) + 1] == [1, 2]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.pad_id) == (131072, 1, 2, 11)
    assert tok.special_id("[SYSTEM_PROMPT]") == 17 and tok.special_id("[IMG_END]") == 13


@pytest.mark.parametrize("name", ["tekken_240911.json", "tekken_240718.json"])
def test_parity_with_mistral_common(name, tok):
    path = SHIPPED + name
    with open(path) as f:
        obj = json.load(f)
    assert obj["config"]["version"] == "v3" and "special_tokens" not in obj  # both shipped files are legacy v3
    ours = tok if name == data.DEFAULT_TEKKEN else data.Tokenizer.from_file(path)
    theirs = mc_tekken.Tekkenizer.from_file(path)
    for t in TEXTS:
        ids = ours.encode(t, bos=True, eos=True)
        assert ids == theirs.encode(t, bos=True, eos=True), t
        assert ours.decode(ids) == theirs.decode(ids) == t
    rng = np.random.default_rng(0)
    for _ in range(20):  # arbitrary ids, specials mixed in, under each decode policy
        ids = rng.integers(0, ours.vocab_size, 12).tolist() + [3, 1001, 17]
        assert ours.decode(ids) == theirs.decode(ids)
        assert ours.decode(ids, special="keep") == theirs.decode(ids, special_token_policy="keep")


def test_v13_file_specials(v13_file, tok):
    t13 = data.Tokenizer.from_file(os.path.dirname(v13_file))  # a checkpoint folder works too
    assert (t13.special_id("[THINK]"), t13.special_id("[/THINK]")) == (34, 35)
    assert t13.encode(TEXTS[5]) == tok.encode(TEXTS[5]) and t13.file_hash != tok.file_hash
    with pytest.raises(ValueError, match=r"\[THINK\].*not in .*tekken_240911.*v13"):
        tok.special_id("[THINK]")


def test_truncation_roundtrip_and_parity(small):
    with open(data.default_tekken_path()) as f:
        obj = json.load(f)
    theirs = mc_tekken.Tekkenizer(obj["vocab"], list(mc_tekken.Tekkenizer.DEPRECATED_SPECIAL_TOKENS),
                                  obj["config"]["pattern"], 8192, 1000, mc_tekken.TokenizerVersion.v3)
    for t in TEXTS:
        ids = small.encode(t)
        assert ids == theirs.encode(t, False, False)
        assert small.decode(ids) == t and (not ids or max(ids) < 8192)
    full = data.Tokenizer.from_file()
    assert len(small.encode(TEXTS[5])) > len(full.encode(TEXTS[5]))  # fewer merges, longer sequences
    assert small.file_hash != full.file_hash and small.file_sha256 == full.file_sha256


def test_special_policies(tok):
    ids = tok.encode("[INST]")
    assert 3 not in ids and tok.decode(ids) == "[INST]"  # text never becomes a control token
    ids = [1, 3, *tok.encode("héllo"), 4, 2]
    assert tok.decode(ids) == "héllo"
    assert tok.decode(ids, special="keep") == "<s>[INST]héllo[/INST]</s>"
    with pytest.raises(ValueError, match="control token 1"):
        tok.decode(ids, special="raise")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([131072])


def test_bad_tokenizer_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json does not exist"):
        data.Tokenizer.from_file(tmp_path / "nope.json")
    with pytest.raises(FileNotFoundError, match="no tekken.json or tokenizer.gguf in folder"):
        data.Tokenizer.from_file(tmp_path)
    bad = tmp_path / "tekken.json"
    bad.write_text('{"config": {"pattern": "x", "default_vocab')
    with pytest.raises(ValueError, match="not valid JSON.*re-download"):
        data.Tokenizer.from_file(bad)
    bad.write_text('{"vocab": []}')
    with pytest.raises(ValueError, match="not a tekken tokenizer file"):
        data.Tokenizer.from_file(tmp_path)
    with pytest.raises(ValueError, match=r"vocab_size 1100 .* must lie in \[1256, 131072\]"):
        data.Tokenizer.from_file(vocab_size=1100)


# -- chat format ---------------------------------------------------------------------------------

CHATS = [
    [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "2+2?"},
     {"role": "assistant", "content": "4 "}, {"role": "user", "content": "Times 3?"},
     {"role": "assistant", "content": "12"}],
    [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant", "content": "x"},
     {"role": "assistant", "content": "y"}, {"role": "user", "content": "c"},
     {"role": "system", "content": "Mid-chat rule."}, {"role": "system", "content": "Another."},
     {"role": "user", "content": "Ünïcödé 🙂"}],
    [{"role": "user", "content": "What is 6*7?"},
     {"role": "assistant", "thinking": "6*7 = 42, check: 7*6 = 42.", "content": "42 "},
     {"role": "user", "content": ""}, {"role": "assistant", "thinking": "empty question", "content": ""}],
]


def _to_mistral_common(messages):
    from mistral_common.protocol.instruct.chunk import TextChunk, ThinkChunk
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage

    out = []
    for m in messages:
        if m["role"] == "assistant" and "thinking" in m:
            chunks = [ThinkChunk(thinking=m["thinking"])] + ([TextChunk(text=m["content"])] if m["content"] else [])
            out.append(AssistantMessage(content=chunks))
        else:
            out.append({"system": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}[m["role"]](
                content=m["content"]))
    return out


def _assistant_mask(ids, tok):
    """Reference mask read back from the ids: from after each [/INST] up to and including </s>
    (or up to a system/user block, for a turn that ends without an answer)."""
    mask, inside = [], False
    for i in ids:
        if i in (tok.special_id("[SYSTEM_PROMPT]"), tok.special_id("[INST]")):
            inside = False
        mask.append(int(inside))
        if i == tok.special_id("[/INST]"):
            inside = True
        elif i == tok.eos_id:
            inside = False
    return mask


def test_chat_matches_mistral_common(v13_file):
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.validator import ValidationMode
    from mistral_common.tokens.tokenizers.instruct import InstructTokenizerV13
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    # agnostic: all content checks, no rule on the final role (training chats end in an answer, prompts in a question)
    theirs = MistralTokenizer.from_file(v13_file, mode=ValidationMode.agnostic)
    assert isinstance(theirs.instruct_tokenizer, InstructTokenizerV13)
    ours = data.Tokenizer.from_file(v13_file)
    for chat in CHATS:
        ids, mask = ours.encode_chat(chat)
        assert ids == theirs.encode_chat_completion(ChatCompletionRequest(messages=_to_mistral_common(chat))).tokens
        assert mask == _assistant_mask(ids, ours) and len(mask) == len(ids)
    ids, mask = ours.encode_chat(CHATS[3])
    answer = ours.decode([i for i, m in zip(ids, mask) if m], special="keep")
    assert answer == "[THINK]6*7 = 42, check: 7*6 = 42.[/THINK]42 </s>[THINK]empty question[/THINK]</s>"
    ids, mask = ours.encode_chat(CHATS[1])
    assert ours.decode(ids, special="keep").startswith("<s>[SYSTEM_PROMPT]You are terse.[/SYSTEM_PROMPT][INST]2+2?")


def test_chat_errors(tok):
    with pytest.raises(ValueError, match=r"\[THINK\]"):
        tok.encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "thinking": "t", "content": "a"}])
    with pytest.raises(ValueError, match="role 'tool' is not supported"):
        tok.encode_chat([{"role": "tool", "content": "{}"}])
    with pytest.raises(ValueError, match="must start with a user message"):
        tok.encode_chat([{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}])
    with pytest.raises(ValueError, match="empty content and no thinking"):
        tok.encode_chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}])
    with pytest.raises(ValueError, match="no messages"):
        tok.encode_chat([])
    ids, mask = tok.encode_chat([{"role": "user", "content": "prompt"}])
    assert ids[-1] == tok.special_id("[/INST]") and not any(mask)


# -- corpora and shards --------------------------------------------------------------------------


def test_python_corpus_and_tokenize(small):
    train, val = data.python_corpus()
    assert (train, val) == data.python_corpus()
    assert val and not set(train) & set(val)
    assert 0.02 < len(val) / (len(train) + len(val)) < 0.1
    assert sum(map(len, train + val)) > 1_500_000
    assert any(d.startswith("Module json\n") and "json.dumps(obj" in d for d in train + val)
    docs = val[:5] + ["", "x"]
    stream = data.tokenize_documents(docs, small)
    ref = [i for d in docs for i in small.encode(d, bos=True, eos=True)]
    assert stream.dtype == np.uint32 and stream.tolist() == ref
    with pytest.raises(ValueError, match="corpus is empty"):
        data.tokenize_documents([], small)


def test_read_documents(tmp_path):
    (tmp_path / "a.txt").write_text("first document\n\nstill first")
    (tmp_path / "b.jsonl").write_text('{"text": "second"}\n\n{"messages": []}\n{"text": "third"}\n')
    assert data.read_documents([tmp_path / "a.txt", tmp_path / "b.jsonl"]) == [
        "first document\n\nstill first", "second", "third"]
    assert len(data.read_documents([tmp_path])) == 3
    (tmp_path / "bad.txt").write_bytes(b"caf\xe9 latin-1")
    with pytest.raises(ValueError, match=r"bad.txt is not valid UTF-8 \(byte 3.*re-encode"):
        data.read_documents([tmp_path / "bad.txt"])
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        data.read_documents([tmp_path / "empty.txt"])
    (tmp_path / "c.jsonl").write_text('{"text": "ok"}\n{"txt": "typo"}\n')
    with pytest.raises(ValueError, match=r'c.jsonl:2 has no string "text"'):
        data.read_documents([tmp_path / "c.jsonl"])
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        data.read_documents([tmp_path / "missing.txt"])
    (tmp_path / "d.jsonl").write_text('{"messages": []}\n')
    with pytest.raises(ValueError, match="corpus is empty"):
        data.read_documents([tmp_path / "d.jsonl"])


def test_every_jsonl_reader_names_the_bad_line(tmp_path):
    """Documents, chats and GRPO problems share one parser: blank lines are skipped and a line that is not
    JSON is refused with its file and line number, whichever reader meets it."""
    import grpo
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    rows = {"docs.jsonl": ({"text": "one"}, data.read_documents),
            "chats.jsonl": (chat, data.read_chats),
            "problems.jsonl": ({"question": "1+1?", "answer": 2}, grpo.read_problems)}
    for name, (row, reader) in rows.items():
        path = tmp_path / name
        path.write_text(json.dumps(row) + "\n\n" + json.dumps(row) + "\n")
        got = reader([path] if reader is data.read_documents else path)
        assert len(got) == 2, name
        path.write_text(json.dumps(row) + "\n\n{not json\n")
        with pytest.raises(ValueError, match=rf"{name}:3 is not valid JSON .*one JSON object per line"):
            reader([path] if reader is data.read_documents else path)
    assert [n for n, _ in data.jsonl_rows("x", ["{}", " ", "[1]"])] == [1, 3]


def test_shards_roundtrip_and_mismatch(tmp_path, small):
    tokens = data.tokenize_documents(["alpha beta", "gamma ✓ delta"] * 50, small)
    paths = data.write_shards(tokens, tmp_path / "s", small, shard_tokens=300)
    assert len(paths) == -(-tokens.size // 300)
    assert sorted(os.listdir(tmp_path / "s")) == [os.path.basename(p) for p in paths]  # no temporaries left
    one = data.load_tokens(paths[0], small)
    assert isinstance(one, np.memmap) and one.dtype == np.uint16 and one.tolist() == tokens[:300].tolist()
    x, y = data.PackedLoader(one, batch_size=2, seq_len=8).batch(0)  # the loader reads a memmap directly
    assert x.dtype == torch.int64 and x.shape == (2, 8)
    assert data.load_tokens(tmp_path / "s", small).tolist() == tokens.tolist()
    assert data.load_tokens(str(tmp_path / "s" / "shard_*.bin")).tolist() == tokens.tolist()
    data.write_shards(tokens[:250], tmp_path / "s", small, shard_tokens=300)  # shorter rerun: stale shards go
    assert data.load_tokens(tmp_path / "s", small).tolist() == tokens[:250].tolist()

    other_vocab = data.Tokenizer.from_file(vocab_size=4096)
    with pytest.raises(ValueError, match=r"shard_00000.bin was written for vocab size 8192.*--vocab-size 8192"):
        data.load_tokens(tmp_path / "s", other_vocab)
    other_file = data.Tokenizer.from_file(SHIPPED + "tekken_240718.json", vocab_size=8192)
    with pytest.raises(ValueError, match=r"shard_00000.bin was written by another tokenizer.*re-run"):
        data.load_tokens(tmp_path / "s", other_file)

    foreign = data.write_shards(tokens[:100], tmp_path / "f", other_file)
    shutil.copy(foreign[0], tmp_path / "s" / "zz.bin")
    with pytest.raises(ValueError, match="written by different tokenizers"):
        data.load_tokens(tmp_path / "s")
    os.remove(tmp_path / "s" / "zz.bin")

    raw = open(paths[0], "rb").read()
    open(tmp_path / "cut.bin", "wb").write(raw[:-10])
    with pytest.raises(ValueError, match="cut.bin .* truncated"):
        data.load_tokens(tmp_path / "cut.bin")
    open(tmp_path / "junk.bin", "wb").write(b"x" * 300)
    with pytest.raises(ValueError, match="junk.bin is not a token shard"):
        data.load_tokens(tmp_path / "junk.bin")
    with pytest.raises(FileNotFoundError, match="no token shards"):
        data.load_tokens(tmp_path / "nothing")
    with pytest.raises(ValueError, match="outside this tokenizer"):
        data.write_shards(np.array([9000], np.uint32), tmp_path / "t", small)


def _raw_shards(folder, sizes, vocab=131072, file_hash="0" * 64, chunk=1 << 20):
    """Shards of the ids 0, 1, 2, ... (mod vocab) written in chunks: no array of the whole stream exists."""
    os.makedirs(folder, exist_ok=True)
    start = 0
    for i, n in enumerate(sizes):
        dtype = data._shard_dtype(vocab)
        with open(os.path.join(folder, f"shard_{i:05d}.bin"), "wb") as f:
            f.write(data.SHARD_HEADER.pack(data.SHARD_MAGIC, data.SHARD_VERSION, np.dtype(dtype).itemsize, vocab, n,
                                           file_hash.encode()).ljust(data.SHARD_HEADER_BYTES, b"\0"))
            for j in range(0, n, chunk):
                (np.arange(start + j, start + min(n, j + chunk), dtype=np.int64) % vocab).astype(dtype).tofile(f)
        start += n


def test_sharded_tokens_index_across_shard_boundaries(tmp_path):
    """A folder of shards reads like their concatenation (windows straddle shard ends), through memmaps."""
    _raw_shards(tmp_path / "s", [37, 5, 58], vocab=1000)
    t = data.load_tokens(tmp_path / "s", max_vocab=1000)
    whole = np.arange(100) % 1000
    assert isinstance(t, data.ShardedTokens) and all(isinstance(p, np.memmap) for p in t.parts)
    assert len(t) == t.size == 100 and t.tolist() == whole.tolist()
    idx = np.array([[0, 36, 37, 41, 42, 99], [-1, 5, 38, 40, 43, 98]])
    assert (t[idx] == whole[idx]).all() and t[41] == 41 and t[-1] == 99
    assert t[30:45].tolist() == whole[30:45].tolist() and t[:-60].tolist() == whole[:40].tolist()
    assert all(isinstance(p, np.memmap) for p in t[30:45].parts)  # a slice is a view, not a copy
    for seed in (0, 1):
        a, b = (data.PackedLoader(x, batch_size=3, seq_len=9, seed=seed) for x in (t, whole))
        for step in range(5):
            for u, v in zip(a.batch(step), b.batch(step)):
                assert torch.equal(u, v)
    with pytest.raises(IndexError):
        t[np.array([100])]
    with pytest.raises(ValueError, match="vocabulary of 1000 ids, the model has 512"):
        data.load_tokens(tmp_path / "s", max_vocab=512)


RSS_WORKER = """
import os, resource, sys
sys.path.insert(0, {root!r})
import numpy as np
import data

def anon_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("RssAnon")).split()[1])

def data_kb():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmData")).split()[1])

limit = (data_kb() + 16 * 1024) * 1024  # 16 MiB more private memory than the interpreter holds now
resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
before = anon_kb()
tokens = data.load_tokens(sys.argv[1], max_vocab=131072)
loader = data.PackedLoader(tokens, batch_size=4, seq_len=4096, seed=0)
total = 0
for step in range(0, 150, 7):
    x, y = loader.batch(step)
    total += int(x[:, 0].sum())
assert [int(tokens[i]) for i in (0, 4_000_000, 12_000_000 - 1)] == [i % 131072 for i in (0, 4_000_000, 12_000_000 - 1)]
print(len(tokens), anon_kb() - before)
"""


@pytest.mark.slow
def test_loader_over_shards_larger_than_an_rss_limit(tmp_path):
    """3 shards of 16 MiB each (48 MiB of uint32 ids) under a 16 MiB limit on private memory (RLIMIT_DATA,
    which counts every malloc and anonymous mapping, not the page cache behind a read-only memmap):
    loading the folder and drawing batches must not copy the stream."""
    _raw_shards(tmp_path / "s", [4_000_000] * 3)
    script = tmp_path / "rss.py"
    script.write_text(RSS_WORKER.format(root=os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    r = subprocess.run([sys.executable, str(script), str(tmp_path / "s")], capture_output=True, text=True,
                       env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    n, grew_kb = map(int, r.stdout.split())
    assert n == 12_000_000 and grew_kb < 16 * 1024


# -- loader --------------------------------------------------------------------------------------


def _stream(n_docs=40, seed=0):
    rng = np.random.default_rng(seed)
    parts = [np.concatenate([[1], rng.integers(1000, 2000, rng.integers(5, 60)), [2]]) for _ in range(n_docs)]
    return np.concatenate(parts).astype(np.uint32)


def test_loader_windows_and_targets():
    tokens = _stream()
    L = data.PackedLoader(tokens, batch_size=3, seq_len=16, seed=7)
    n_eos = 0
    for step in range(L.steps_per_epoch):
        x, y = L.batch(step)
        assert x.shape == y.shape == (3, 16) and x.dtype == y.dtype == torch.int64
        for row, w in enumerate(L.window_ids(step)):
            win = torch.from_numpy(tokens[w * 16: w * 16 + 17].astype(np.int64))
            assert torch.equal(x[row], win[:-1])
            expect = win[1:].clone()
            expect[win[:-1] == 2] = -100
            assert torch.equal(y[row], expect)
        assert (y == -100).sum() == (x == 2).sum()
        n_eos += int((x == 2).sum())
    assert n_eos > 10 and L.tokens_per_step == 48
    assert L.windows_per_epoch == L.steps_per_epoch * 3 <= L.n_windows


def test_loader_deterministic_resumable_and_disjoint():
    tokens = _stream(80)
    world, B, T = 3, 2, 8
    loaders = [data.PackedLoader(tokens, B, T, seed=1, rank=r, world_size=world) for r in range(world)]
    spe = loaders[0].steps_per_epoch
    for epoch in range(2):
        seen = []
        for step in range(epoch * spe, (epoch + 1) * spe):
            ids = [L.window_ids(step) for L in loaders]
            seen += [w for i in ids for w in i.tolist()]
        assert len(seen) == len(set(seen)) == loaders[0].windows_per_epoch  # no window twice, across ranks
    a = data.PackedLoader(tokens, B, T, seed=1, rank=1, world_size=world)
    late = a.batch(spe + 3)
    for s in range(5):
        a.batch(s)
    fresh = data.PackedLoader(tokens, B, T, seed=1, rank=1, world_size=world)
    assert all(torch.equal(u, v) for u, v in zip(late, fresh.batch(spe + 3)))
    assert all(torch.equal(u, v) for u, v in zip(a.batch(spe + 3), late))
    other = data.PackedLoader(tokens, B, T, seed=2, rank=1, world_size=world)
    assert not torch.equal(other.batch(0)[0], fresh.batch(0)[0])
    assert not np.array_equal(loaders[0].window_ids(0), loaders[0].window_ids(spe))  # reshuffled per epoch


def test_loader_too_short():
    with pytest.raises(ValueError, match=r"100 tokens < needed 129 .*give more data or a smaller batch/seq_len"):
        data.PackedLoader(np.arange(100), batch_size=2, seq_len=16, world_size=4)


# -- task data and CLI ---------------------------------------------------------------------------


def test_qa_pairs():
    qa = data.qa_pairs(50, seed=3)
    assert qa == data.qa_pairs(50, seed=3) and qa[:10] == data.qa_pairs(10, seed=3)
    assert qa != data.qa_pairs(50, seed=4) and len({q["question"] for q in qa}) == 50
    table = {name: doc for name, doc in data._stdlib_docs()[1]}
    first = " ".join(json.dumps.__doc__.strip().split("\n\n")[0].split())
    assert data._first_paragraph(table["json.dumps"]) == first


def test_math_problems_and_checker():
    probs = data.math_problems(200, seed=5)
    assert probs == data.math_problems(200, seed=5) and probs[:7] == data.math_problems(7, seed=5)
    for p in probs:
        q = p["question"]
        if q.startswith("What is ") and "divided" not in q:
            assert str(eval(q[len("What is "):-1])) == p["answer"]
        assert data.check_math_answer(f"Let me see. The answer is {p['answer']}.", p["answer"])
        assert not data.check_math_answer(f"The answer is {int(p['answer']) + 1}.", p["answer"])
    assert data.check_math_answer("[THINK]maybe 41? no[/THINK]It is 42", "42")
    assert not data.check_math_answer("[THINK]42[/THINK]It is 41", "42")
    assert data.check_math_answer("so \\boxed{1,234} and 7 more words", "1234")
    assert data.check_math_answer("= 42.0", "42") and data.check_math_answer("-8", "-8")
    assert not data.check_math_answer("no number here", "42")


def test_easy_math_level():
    """One-digit sums for small real models; the default level is unchanged for other callers."""
    assert data.math_problems(3, seed=5) == data.math_problems(3, seed=5, level="mixed")
    assert data.math_problems(1, seed=0)[0]["question"] == "A box holds 77 pencils. How many pencils are in 9 boxes?"  # as before
    easy = data.math_problems(200, seed=1, level="easy")
    assert easy == data.math_problems(200, seed=1, level="easy") and easy != data.math_problems(200, seed=2, level="easy")
    for p in easy:
        a, b = p["question"][len("What is "):].split("?")[0].split(" + ")
        assert 1 <= int(a) <= 9 and 1 <= int(b) <= 9 and int(a) + int(b) == int(p["answer"])
        assert p["question"].endswith("Answer with the number only.")
        assert data.check_math_answer(f"{a} + {b} = {p['answer']}", p["answer"])  # the format the models use
    assert len({p["question"] for p in easy}) > 60  # of the 81 pairs (draws repeat)
    with pytest.raises(ValueError, match="level 'hard' is unknown"):
        data.math_problems(1, level="hard")


def test_cli(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("some text " * 50)
    (tmp_path / "b.txt").write_text("other text " * 50)
    out = tmp_path / "out"
    assert data.main(["prepare", "--vocab-size", "4096", "--out", str(out), str(tmp_path / "a.txt"),
                      str(tmp_path / "b.txt")]) == 0
    tok = data.Tokenizer.from_file(vocab_size=4096)
    n = data.load_tokens(out / "train", tok).size + data.load_tokens(out / "val", tok).size
    assert n == 2 * 2 + len(tok.encode("some text " * 50)) + len(tok.encode("other text " * 50))
    assert json.loads((out / "prepare.json").read_text())["vocab_size"] == 4096
    assert data.main(["stats", str(tmp_path / "missing.txt")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing.txt does not exist" in err[0]
    with pytest.raises(SystemExit) as e:
        data.main(["stats", "--bogus"])
    assert e.value.code == 2


# -- held-out text: de-duplication against the training stream, validation/test halves, question split --

def test_heldout_dedupe_removes_every_shared_window():
    rng = np.random.default_rng(0)
    train = rng.integers(10, 500, 5000).astype(np.uint32)
    fresh = rng.integers(10, 500, 300).astype(np.uint32)
    held = np.concatenate([[1], fresh[:100], train[1000:1100], fresh[100:], [2]]).astype(np.uint32)
    assert D.heldout_overlap(train, held, 32) == 100 - 31
    kept, info = D.dedupe_heldout(train, held, 32, bos_id=1, eos_id=2)
    assert info["overlap_before"] == 69 and info["overlap_after"] == 0 == D.heldout_overlap(train, kept, 32)
    # the fresh text around the copied span survives (each run cut back by less than the window)
    assert len(kept) >= 300 - 2 * 31 and set(fresh[:60].tolist()) <= set(kept.tolist())
    val, test = D.split_in_two(kept, eos_id=2)
    assert len(val) + len(test) == len(kept) and val[-1] == 2


def test_in_sorted_equals_isin_on_random_values():
    rng = np.random.default_rng(0)
    for n_table in (0, 1, 7, 1000):
        table = np.unique(rng.integers(0, 2**63, n_table, dtype=np.uint64))
        values = np.concatenate([rng.choice(table, 50) if len(table) else table, rng.integers(0, 2**63, 50, dtype=np.uint64),
                                 np.array([0, 2**64 - 1], dtype=np.uint64)])
        assert np.array_equal(D.in_sorted(values, table), np.isin(values, table))


def test_split_by_question_holds_out_whole_questions():
    pool = D.easy_math_problems(600, seed=0, max_operand=9, ops="+")  # 100 distinct questions, many repeats
    train, held = D.split_by_question(pool, 30, seed=0)
    held_q = [p["question"] for p in held]
    assert len(set(held_q)) == 30 == len(held_q)
    assert not set(held_q) & {p["question"] for p in train}
    assert len(train) + sum(p["question"] in set(held_q) for p in pool) == len(pool)  # every other problem trains
    assert D.split_by_question(pool, 30, seed=0) == (train, held)
    assert D.split_by_question(pool, 30, seed=1)[1] != held
    with pytest.raises(ValueError, match="distinct questions"):
        D.split_by_question(pool, 101)
