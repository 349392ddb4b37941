import numpy as np
import pytest

from ptlm.data.packing import BlockPacker, choose_val_docs, pack, runs_of
from ptlm.errors import PtlmError


def test_val_split_by_tokens_is_deterministic_and_near_target():
    rng = np.random.default_rng(1)
    lengths = rng.integers(50, 5000, size=10_000)
    a = choose_val_docs(lengths, 0.05, seq_len=1024, seed=7)
    b = choose_val_docs(lengths, 0.05, seq_len=1024, seed=7)
    c = choose_val_docs(lengths, 0.05, seq_len=1024, seed=8)
    assert (a == b).all() and not (a == c).all()
    share = lengths[a].sum() / lengths.sum()
    assert 0.049 <= share <= 0.0501
    assert (~a).sum() > 0


def test_val_split_few_huge_documents_stays_nonempty_and_sensible():
    # like Machado: a handful of documents, one of them a third of the corpus
    lengths = np.array([600_000, 300_000, 250_000, 90_000, 40_000, 2_000, 900])
    for seed in range(20):
        val = choose_val_docs(lengths, 0.02, seq_len=1024, seed=seed)
        assert 1024 <= lengths[val].sum() <= 0.02 * lengths.sum()
        assert (~val).any()


def test_val_split_when_every_document_is_above_the_target_takes_the_smallest():
    lengths = np.array([10_000, 8_000, 5_000, 9_000])
    val = choose_val_docs(lengths, 0.01, seq_len=128, seed=0)
    assert val.tolist() == [False, False, True, False]


def test_val_split_errors():
    with pytest.raises(PtlmError, match="at least 2"):
        choose_val_docs(np.array([5000]), 0.1, 16, 0)
    with pytest.raises(PtlmError, match="val-fraction"):
        choose_val_docs(np.array([5000, 5000]), 0.0, 16, 0)
    with pytest.raises(PtlmError, match="cannot hold out"):
        choose_val_docs(np.array([10, 10, 10]), 0.1, seq_len=64, seed=0)


def test_val_split_scales_to_a_million_documents():
    lengths = np.random.default_rng(0).integers(100, 2000, size=1_000_000)
    val = choose_val_docs(lengths, 0.01, 2048, 0)
    assert abs(lengths[val].sum() / lengths.sum() - 0.01) < 1e-4


def test_runs_of():
    assert runs_of(np.array([1, 1, 0, 1, 0, 0, 1], bool)) == [(0, 2), (3, 4), (6, 7)]
    assert runs_of(np.zeros(3, bool)) == []


def test_packer_carries_across_documents_and_drops_only_the_tail():
    docs = [np.arange(i * 100, i * 100 + n, dtype=np.uint16) for i, n in enumerate([3, 9, 1, 6])]
    blocks = np.concatenate(list(pack(iter(docs), 4, np.uint16)))
    stream = np.concatenate(docs)
    assert blocks.shape == (4, 4)
    np.testing.assert_array_equal(blocks.reshape(-1), stream[:16])
    packer = BlockPacker(4, np.uint16)
    for d in docs:
        packer.feed(d)
    assert packer.dropped == len(stream) - 16 and packer.tokens_in == len(stream)
