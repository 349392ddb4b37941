"""Pure functions of plain numbers: which documents go to validation, and how a token stream
is cut into fixed-length blocks. No I/O here, so both are tested at any scale.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np

from ptlm.errors import PtlmError

MIN_VAL_BLOCKS = 1  # a validation split that packs to zero blocks cannot measure anything


def choose_val_docs(lengths: np.ndarray, val_fraction: float, seq_len: int,
                    seed: int) -> np.ndarray:
    """Pick whole documents for validation so that val holds ~val_fraction of the *tokens*.

    Why tokens and not a document count: corpora of few, very unequal documents (the 116 works
    of Machado de Assis run from 400 B to 1.5 MB) make a per-document coin flip give an empty or a
    huge validation set. Instead, visit documents in a seeded random order and take each one that
    does not push val past its token target; if that leaves val below one block (every document
    is larger than the target), add the smallest remaining document that reaches one block.
    At least one document always stays in train.

    lengths: (D,) tokens per document, EOS included.  Returns a (D,) bool mask (True = val).
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    n_docs = len(lengths)
    if not 0.0 < val_fraction < 1.0:
        raise PtlmError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    if n_docs < 2:
        raise PtlmError(f"the corpus has {n_docs} document(s); a train/val split by document "
                        "needs at least 2 (split the text into documents, e.g. --txt-docs "
                        "blank-lines)")
    total = int(lengths.sum())
    min_val_tokens = MIN_VAL_BLOCKS * seq_len
    target = max(val_fraction * total, min_val_tokens)
    val = np.zeros(n_docs, dtype=bool)
    order = np.random.default_rng(seed).permutation(n_docs)
    taken, n_val = 0, 0
    for d in order:
        if taken + lengths[d] <= target and n_val < n_docs - 1:
            val[d] = True
            taken += int(lengths[d])
            n_val += 1
    if taken < min_val_tokens:
        rest = np.flatnonzero(~val)
        enough = rest[lengths[rest] >= min_val_tokens - taken]
        if len(enough) == 0 or len(rest) < 2:
            raise PtlmError(
                f"cannot hold out a validation split of at least {min_val_tokens} tokens (one "
                f"block of seq_len {seq_len}) and keep a training split: the corpus has only "
                f"{total} tokens in {n_docs} documents. Add text or lower --seq-len")
        # smallest document that is enough; ties broken by the seeded order for determinism
        val[enough[np.argmin(lengths[enough])]] = True
    if (~val).sum() == 0 or int(lengths[~val].sum()) < seq_len:
        raise PtlmError(f"after holding out validation, the training split has fewer than "
                        f"{seq_len} tokens; add text, lower --seq-len or lower --val-fraction")
    return val


def runs_of(mask: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, end) index runs where mask is True: contiguous documents of one split."""
    padded = np.concatenate([[False], np.asarray(mask, dtype=bool), [False]])
    edges = np.flatnonzero(np.diff(padded.astype(np.int8)))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


class BlockPacker:
    """Cut a stream of token arrays into (n, seq_len) blocks; the remainder carries over.

    Documents are concatenated (each already ends with EOS), so a block may span documents and
    no padding is ever written. Only the final partial block is dropped: see `dropped`.
    """

    def __init__(self, seq_len: int, dtype: np.dtype) -> None:
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self._carry = np.empty(0, dtype=self.dtype)
        self.tokens_in = 0

    def feed(self, tokens: np.ndarray) -> np.ndarray:
        """Returns the full blocks now available, shape (n, seq_len); n may be 0."""
        self.tokens_in += len(tokens)
        stream = np.concatenate([self._carry, tokens]) if len(self._carry) else tokens
        n_full = len(stream) // self.seq_len
        cut = n_full * self.seq_len
        self._carry = stream[cut:].copy()  # copy: don't pin the (possibly large) input array
        return stream[:cut].reshape(n_full, self.seq_len)

    @property
    def dropped(self) -> int:
        return len(self._carry)


def pack(arrays: Iterator[np.ndarray], seq_len: int, dtype) -> Iterator[np.ndarray]:
    """Convenience generator over BlockPacker (used by tests and small inputs)."""
    packer = BlockPacker(seq_len, dtype)
    for a in arrays:
        blocks = packer.feed(a)
        if len(blocks):
            yield blocks
