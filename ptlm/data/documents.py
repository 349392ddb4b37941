"""Where documents start inside packed blocks, as plain arrays: the input of document-aware
packing, in which each document (or the piece of one cut by a block edge) attends only to its own
earlier tokens, its positions restart at 0, and nothing is predicted across a boundary.

A split's blocks are its documents' tokens laid end to end in stream order and cut every seq_len
tokens (ptlm prepare drops only the final partial block), so block i covers stream tokens
[i*T, (i+1)*T). `DocumentIndex` keeps each document's first stream position (one int64 per
document) and answers, for any batch of blocks at once, each token's position inside its piece:
one vectorized searchsorted per batch, no loop over documents.
"""

from __future__ import annotations

import numpy as np

from ptlm.errors import PtlmError

# How blocks reach the model: "documents" (each document piece attends only to itself, positions
# from 0, no target across a boundary) or "stream" (a block is one sequence, as it was laid out).
PACKINGS = ("documents", "stream")
DEFAULT_PACKING = "documents"


def check_packing(packing: str) -> str:
    if packing not in PACKINGS:
        raise PtlmError(f"packing {packing!r} is not one of {', '.join(PACKINGS)}")
    return packing

class DocumentIndex:
    """Document boundaries of one split, for blocks of `seq_len` tokens."""

    def __init__(self, document_lengths: np.ndarray, seq_len: int) -> None:
        lengths = np.asarray(document_lengths, dtype=np.int64)
        if lengths.ndim != 1 or (lengths < 1).any():
            raise PtlmError("document lengths must be a 1-D array of positive token counts")
        self.seq_len = seq_len
        self.starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])  # (D,) stream offsets
        self.total = int(lengths.sum())

    def positions(self, blocks) -> np.ndarray:
        """(B, T) int64: each token's position inside its document piece (0 at a document's first
        token and at every block's first token)."""
        blocks = np.asarray(blocks, dtype=np.int64)
        block_start = blocks[:, None] * self.seq_len  # (B, 1)
        tokens = block_start + np.arange(self.seq_len)  # (B, T) stream positions
        if tokens.size and tokens.max() >= self.total:
            raise PtlmError(f"block {int(blocks.max())} lies past the split's {self.total} tokens: "
                            "the data and its document lengths disagree (prepare it again)")
        doc_start = self.starts[np.searchsorted(self.starts, tokens, side="right") - 1]  # (B, T)
        return tokens - np.maximum(doc_start, block_start)
