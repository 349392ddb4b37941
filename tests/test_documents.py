"""Document boundaries inside packed blocks (ptlm.data.documents) against a plain loop over the
documents, and on a prepared dataset's own document lengths."""

from __future__ import annotations

import numpy as np
import pytest

from ptlm.data.documents import DocumentIndex
from ptlm.data.reader import PackedDataset
from ptlm.errors import PtlmError


def loop_positions(lengths, seq_len, blocks):
    """The reference: walk each block token by token, counting up from the block's start or from
    the last document start."""
    doc_starts, offset = set(), 0
    for n in lengths:
        doc_starts.add(offset)
        offset += n
    out = []
    for b in blocks:
        row, p = [], 0
        for t in range(b * seq_len, (b + 1) * seq_len):
            p = 0 if (t == b * seq_len or t in doc_starts) else p + 1
            row.append(p)
        out.append(row)
    return np.array(out)


@pytest.mark.parametrize("lengths", [
    [1000],  # one long document over every block
    [1] * 64,  # one-token documents
    [7, 1, 30, 2, 64, 5, 1, 1, 9, 20],
])
def test_positions_restart_at_every_document_and_block(lengths):
    seq_len = 16
    blocks = np.arange(sum(lengths) // seq_len)
    index = DocumentIndex(np.array(lengths), seq_len)
    assert (index.positions(blocks) == loop_positions(lengths, seq_len, blocks)).all()
    shuffled = blocks[::-1]
    assert (index.positions(shuffled) == loop_positions(lengths, seq_len, shuffled)).all()


def test_random_lengths_against_the_loop():
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 90, size=300)
    seq_len = 64
    blocks = rng.permutation(int(lengths.sum()) // seq_len)[:50]
    index = DocumentIndex(lengths, seq_len)
    assert (index.positions(blocks) == loop_positions(lengths.tolist(), seq_len, blocks)).all()


def test_prepared_blocks_start_pieces_where_the_eos_ends_documents(demo_dataset):
    ds = PackedDataset(demo_dataset, "train")
    eos = ds.manifest["eos_id"]
    index = DocumentIndex(ds.document_lengths(), ds.seq_len)
    blocks = np.arange(len(ds))
    positions = index.positions(blocks)
    ids = ds.batch(blocks).numpy()
    # a piece starts right after every EOS (inside a block), and nowhere else but block starts
    after_eos = np.zeros_like(ids, dtype=bool)
    after_eos[:, 1:] = ids[:, :-1] == eos
    starts = positions == 0
    assert (starts[:, 1:] == after_eos[:, 1:]).all() and starts[:, 0].all()


def test_blocks_past_the_documents_are_refused():
    with pytest.raises(PtlmError, match="prepare it again"):
        DocumentIndex(np.array([10, 10]), 8).positions([2])
