"""Shared fixtures."""
import pytest
import torch


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and when another process holds one of 2 cores,
    OpenMP's spin-waits cost milliseconds per op (seen: a 15 s cascade took 200 s). Results do not
    depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
