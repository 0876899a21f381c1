"""Memory a run gives back: chunked tokenisation (the same features as one call) and `malloc_trim`."""

from __future__ import annotations

import pytest
import torch

from helpers.tokens import WITH_CONTEXT, WITHOUT_CONTEXT, small_bpe_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return small_bpe_tokenizer()


def test_a_client_tokenised_in_chunks_gets_the_features_and_counts_of_one_call(tokenizer, monkeypatch):
    import flexmoe.data.tokens as tokens
    from flexmoe.data import Example

    long = Example(instruction="word " * 80, response="answer " * 10, id="long")
    examples = [WITH_CONTEXT, WITHOUT_CONTEXT, long] * 3  # 9 examples, some cut at 64 tokens
    whole, whole_counts = tokens.training_features(examples, tokenizer, 64, "alpaca", client_id=0)
    monkeypatch.setattr(tokens, "TOKENIZE_CHUNK", 2)  # 5 chunks, the last of one example
    chunked, chunked_counts = tokens.training_features(examples, tokenizer, 64, "alpaca", client_id=0)
    assert len(chunked) == len(whole) == 9 and whole_counts.truncated > 0 and whole_counts.response_cut > 0
    assert chunked_counts == whole_counts
    for a, b in zip(chunked, whole):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


@pytest.mark.skipif(not __import__("pathlib").Path("/proc/self/status").exists(), reason="needs Linux /proc")
def test_release_freed_memory_returns_freed_heap_pages():
    from flexmoe import heap

    if heap._malloc_trim() is None:
        pytest.skip("not glibc: nothing to trim")
    # a freed large block raises glibc's mmap threshold, so the 1 MB blocks below come from the heap;
    # the last one, kept, pins the heap's top so that free() alone cannot shrink it
    large = torch.empty(16 << 20, dtype=torch.uint8).fill_(1)
    del large
    blocks = [torch.empty(1 << 20, dtype=torch.uint8).fill_(1) for _ in range(200)]
    kept = blocks.pop()
    del blocks
    before = _rss()
    heap.release_freed_memory()
    assert before - _rss() > 100 << 20  # most of the 199 MB freed comes back
    del kept
