"""Test helpers shared by the tests (mechanisms' and experiments') and their subprocess workers: a learnable
synthetic token stream with data.PackedLoader's contract, a plain next-token cross-entropy (train.py owns no
loss), and the one_thread fixture."""

import os

import pytest
import torch
import torch.nn.functional as F

# The preamble of the subprocess worker scripts the tests write: the same helpers, imported from here.
HELPERS = (f"import sys\nsys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r})\nimport torch\n"
           f"import torch.nn.functional as F\nfrom toy import CycleLoader, ce_loss\n")


class CycleLoader:
    """Rows walk a fixed random cycle over the vocabulary from random starts (learnable in a few
    dozen steps). Global row k is a pure function of (seed, k); micro-batch i on rank r of w reads
    rows (i*w + r)*B .. +B-1, the contract of data.PackedLoader. A random ~25% of targets per row are
    -100, so micro-batches hold different numbers of valid tokens."""

    def __init__(self, vocab, batch_size, seq_len, seed=0, rank=0, world_size=1):
        self.vocab, self.B, self.T, self.seed, self.rank, self.world = vocab, batch_size, seq_len, seed, rank, world_size
        self.next = torch.randperm(vocab, generator=torch.Generator().manual_seed(1234))

    def batch(self, i):
        rows_x, rows_y = [], []
        for j in range(self.B):
            k = (i * self.world + self.rank) * self.B + j
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
            tok = int(torch.randint(self.vocab, (1,), generator=g))
            seq = []
            for _ in range(self.T + 1):
                seq.append(tok)
                tok = int(self.next[tok])
            seq = torch.tensor(seq)
            y = seq[1:].clone()
            y[torch.rand(self.T, generator=g) < 0.25] = -100
            rows_x.append(seq[:-1])
            rows_y.append(y)
        return torch.stack(rows_x), torch.stack(rows_y)


def ce_loss(model, x, y, n_total):
    return model(x, head_fn=lambda h, W: F.cross_entropy(
        F.linear(h, W).flatten(0, 1).float(), y.flatten(), ignore_index=-100, reduction="sum") / n_total)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and when another process holds one of 2 cores,
    OpenMP's spin-waits cost milliseconds per op (seen: a 15 s cascade took 200 s). Results do not
    depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_checkpoint(path, vocab_size: int = 1280, seed: int = 0, **shape) -> str:
    """A tiny random decoder saved as an HF checkpoint at `path` (the demos' stand-in for a cascade child);
    vocab 1280 is the shipped Tekken truncated to 1000 specials + 280 ranks."""
    import model as M
    args = dict(dim=64, n_layers=2, head_dim=16, hidden_dim=128, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                rope_theta=1e4, max_seq_len=256) | shape
    m = M.Transformer(M.ModelArgs(**args))
    m.init_weights(seed)
    M.save_model(m, str(path))
    return str(path)
