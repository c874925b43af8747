"""Tekken encode throughput: data.py's Tokenizer against mistral-common's Tekkenizer, same text.

The text is the embedded Python corpus (`data.python_corpus`, about 2.4 MB). Both tokenizers run the
same tiktoken BPE, so the per-document `encode` numbers differ only by per-call overhead (the id
offset, list building); `ours_tokenize_documents` is the whole-corpus path (`data.tokenize_documents`,
BOS/EOS added, numpy output) that `python data.py prepare` uses. Loading is timed
cold (caches cleared) and reported apart. The ids are compared, so a fast but wrong run shows.
mistral-common is optional: without it the baseline fields are None.
Called by bench.py; `bench_tokenizer()` returns a dict.
"""

import os
import platform
import sys
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import data  # noqa: E402


def _rate(fn, n_bytes: int, seconds: float) -> float:
    """MB/s of fn over whole passes, repeated until `seconds` have passed; one warm-up pass excluded."""
    fn()
    passes, t0 = 0, time.perf_counter()
    while True:
        fn()
        passes += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds:
            return passes * n_bytes / elapsed / 1e6


def bench_tokenizer(seconds: float = 2.0) -> dict:
    train, val = data.python_corpus()
    docs = train + val
    n_bytes = sum(len(d.encode("utf-8", "surrogatepass")) for d in docs)

    data._read_tekken.cache_clear()
    data._bpe.cache_clear()
    t0 = time.perf_counter()
    tok = data.Tokenizer.from_file()
    ours_load = time.perf_counter() - t0
    ours_ids = [tok.encode(d) for d in docs]
    out = dict(
        name="tokenizer_encode", device=platform.processor() or platform.machine(), cpu_count=os.cpu_count(),
        python=platform.python_version(), corpus_docs=len(docs), corpus_mb=n_bytes / 1e6,
        corpus_tokens=sum(map(len, ours_ids)), ours_load_s=ours_load,
        ours_encode_mb_s=_rate(lambda: [tok.encode(d) for d in docs], n_bytes, seconds),
        ours_tokenize_documents_mb_s=_rate(lambda: data.tokenize_documents(docs, tok), n_bytes, seconds),
        mistral_common_load_s=None, mistral_common_encode_mb_s=None, identical_ids=None,
    )
    try:
        from mistral_common.tokens.tokenizers.tekken import Tekkenizer
    except ImportError:
        return out
    t0 = time.perf_counter()
    mc = Tekkenizer.from_file(data.default_tekken_path())
    out["mistral_common_load_s"] = time.perf_counter() - t0
    out["identical_ids"] = all(mc.encode(d, False, False) == ids for d, ids in zip(docs, ours_ids))
    out["mistral_common_encode_mb_s"] = _rate(lambda: [mc.encode(d, False, False) for d in docs], n_bytes, seconds)
    return out

