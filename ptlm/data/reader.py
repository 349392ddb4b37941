"""Reading prepared data for training: `PackedDataset` (memory-mapped blocks as LongTensors),
a deterministic, resumable, rank-partitioned order, and a loader that yields micro-batches.

The global order of an epoch is a pure function of (seed, epoch, number of blocks): it does not
depend on the number of ranks. Global batch k is blocks order[k*G:(k+1)*G] (G = global batch in
blocks); inside it, global position p goes to rank p % W. So a run resumed on another number of
ranks W' (same G) sees the same sequence of global batches. Resuming is O(1): the state is
(epoch, blocks consumed), and iteration jumps straight to the next unseen position.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ptlm.data import shards
from ptlm.data.documents import DEFAULT_PACKING, DocumentIndex, check_packing
from ptlm.errors import PtlmError


@dataclass
class Batch:
    """Blocks as the model takes them: token ids (B, T) and, with document-aware packing, each
    token's position inside its document piece (B, T); None when blocks are one stream."""

    input_ids: torch.Tensor
    positions: torch.Tensor | None = None

    def predictions(self) -> int:
        """Next-token predictions the loss scores in these blocks: T-1 per block, less the first
        token of every piece after the first (nothing is predicted across a boundary)."""
        rows, length = self.input_ids.shape
        cut = 0 if self.positions is None else int((self.positions[:, 1:] == 0).sum())
        return rows * (length - 1) - cut

    def to(self, device, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.input_ids), move(self.positions))


class PackedDataset(torch.utils.data.Dataset):
    """Blocks of one split; item i is a (seq_len,) int64 tensor of token ids.

    packing="documents" (the default) also gives each block's document structure (`blocks`),
    from the split's document lengths, computed once here; "stream" gives none."""

    def __init__(self, root: str | Path, split: str = "train",
                 max_blocks: int | None = None, packing: str = DEFAULT_PACKING) -> None:
        self.root = Path(root)
        self.split = split
        self.packing = check_packing(packing)
        self.manifest = shards.read_manifest(self.root)
        self.blocks = shards.open_split(self.root, self.manifest, split)
        if max_blocks is not None:  # the first max_blocks blocks only (e.g. --overfit-docs)
            self.blocks.num_blocks = min(self.blocks.num_blocks, max_blocks)
        self.seq_len = self.manifest["seq_len"]
        self.vocab_size = self.manifest["tokenizer"]["vocab_size"]
        self.tokenizer_path = self.root / self.manifest["tokenizer"]["path"]
        self.documents = self._document_index() if packing == "documents" else None

    def _document_index(self) -> DocumentIndex:
        try:
            lengths = self.document_lengths()
        except PtlmError:
            raise PtlmError(f"{self.root} [{self.split}] has no per-document lengths (prepared by "
                            "an older ptlm), which document-aware packing needs: prepare it "
                            "again, or give --packing stream") from None
        return DocumentIndex(lengths, self.seq_len)

    def __len__(self) -> int:
        return self.blocks.num_blocks

    def __getitem__(self, i: int) -> torch.Tensor:
        if not -len(self) <= i < len(self):
            raise IndexError(f"block {i} out of range for {len(self)} blocks")
        return torch.from_numpy(self.blocks.take([i % len(self)])[0].astype(np.int64))

    def check_data(self) -> dict:
        """Check every shard of the dataset (all splits) before use: sha256 against the manifest
        and the largest token id against the vocabulary (shards.check_for_training)."""
        return shards.check_for_training(self.root)

    def document_lengths(self) -> np.ndarray:
        """Tokens (EOS included) of each document of the split, in stream order."""
        return shards.document_lengths(self.root, self.manifest, self.split)

    def batch(self, indices) -> torch.Tensor:
        """(len(indices), seq_len) int64 tensor: one gather, no per-item tensors."""
        return torch.from_numpy(self.blocks.take(indices).astype(np.int64))

    def blocks_of(self, indices) -> Batch:
        """The blocks `indices` with their document positions (packing="documents"): one gather
        and one vectorized search per batch, no loop over documents."""
        positions = None
        if self.documents is not None:
            positions = torch.from_numpy(self.documents.positions(np.asarray(indices)))
        return Batch(self.batch(indices), positions)


def epoch_order(num_blocks: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The global order of one epoch: a permutation of range(num_blocks) from (seed, epoch)."""
    if not shuffle:
        return np.arange(num_blocks, dtype=np.int64)
    return np.random.default_rng([seed, epoch]).permutation(num_blocks).astype(np.int64)


def epoch_length(num_blocks: int, global_batch: int, drop_last: bool) -> int:
    """Blocks per epoch, a multiple of global_batch: the ragged tail is dropped, or padded by
    wrapping around to the epoch's first blocks (each rank then sees equal parts)."""
    full = num_blocks // global_batch * global_batch
    if drop_last or full == num_blocks:
        return full
    return full + global_batch


def rank_positions(start: int, end: int, world_size: int, rank: int) -> np.ndarray:
    """Global positions in [start, end) that belong to `rank` (p % world_size == rank)."""
    first = start + (rank - start) % world_size
    return np.arange(first, end, world_size, dtype=np.int64)


def eval_slice(num_blocks: int, world_size: int, rank: int) -> range:
    """Disjoint contiguous slices covering all blocks (evaluation sums over ranks; no padding,
    so no block is counted twice)."""
    base, extra = divmod(num_blocks, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (rank < extra))


class PackedLoader:
    """Yields this rank's share as `Batch`es of (micro_batch, seq_len), resumably.

    global_batch (blocks per optimizer step over all ranks) must be a multiple of
    micro_batch * world_size; the epoch is cut to a multiple of it (see epoch_length)."""

    def __init__(self, dataset: PackedDataset, micro_batch: int, *, world_size: int = 1,
                 rank: int = 0, global_batch: int | None = None, seed: int = 0,
                 shuffle: bool = True, drop_last: bool = True) -> None:
        global_batch = global_batch or micro_batch * world_size
        if not 0 <= rank < world_size:
            raise PtlmError(f"rank {rank} out of range for world size {world_size}")
        if global_batch % (micro_batch * world_size):
            raise PtlmError(f"global batch {global_batch} is not a multiple of micro-batch "
                            f"{micro_batch} x {world_size} ranks")
        if len(dataset) < global_batch:
            raise PtlmError(f"split {dataset.split!r} has {len(dataset)} blocks, fewer than one "
                            f"global batch of {global_batch}; lower the batch or add data")
        self.dataset, self.micro_batch = dataset, micro_batch
        self.world_size, self.rank, self.global_batch = world_size, rank, global_batch
        self.seed, self.shuffle, self.drop_last = seed, shuffle, drop_last
        self._order: tuple[int, np.ndarray] | None = None
        self.epoch = 0
        self.consumed = 0  # global blocks of this epoch already yielded, all ranks together

    @property
    def blocks_per_epoch(self) -> int:
        return epoch_length(len(self.dataset), self.global_batch, self.drop_last)

    @property
    def steps_per_epoch(self) -> int:
        """Optimizer steps (global batches) per epoch."""
        return self.blocks_per_epoch // self.global_batch

    def __len__(self) -> int:
        """Micro-batches this rank yields in a full epoch."""
        return self.blocks_per_epoch // (self.micro_batch * self.world_size)

    def __iter__(self):
        """Yields the rest of the current epoch, then moves to the next epoch."""
        n = len(self.dataset)
        if self._order is None or self._order[0] != self.epoch:  # once per epoch, not per iter()
            self._order = (self.epoch, epoch_order(n, self.seed, self.epoch, self.shuffle))
        order = self._order[1]
        total = self.blocks_per_epoch
        step = self.micro_batch * self.world_size
        while self.consumed < total:
            pos = rank_positions(self.consumed, self.consumed + step, self.world_size, self.rank)
            batch = self.dataset.blocks_of(order[pos % n])  # % n: padded tail wraps to the start
            self.consumed += step
            yield batch
        self.finish_epoch()

    def set_micro_batch(self, micro_batch: int) -> None:
        """Change the micro-batch (OOM back-off); the global batch and order stay."""
        if self.global_batch % (micro_batch * self.world_size):
            raise PtlmError(f"micro-batch {micro_batch} x {self.world_size} ranks does not "
                            f"divide the global batch {self.global_batch}")
        self.micro_batch = micro_batch

    def finish_epoch(self) -> None:
        """Move to the next epoch (a caller that stops iterating at the epoch's last batch)."""
        self.epoch += 1
        self.consumed = 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.seed,
                "num_blocks": len(self.dataset), "global_batch": self.global_batch,
                "shuffle": self.shuffle, "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "num_blocks", "shuffle", "drop_last"):
            mine = self.state_dict()[key]
            if state[key] != mine:
                raise PtlmError(f"cannot resume the data order: checkpoint has {key}={state[key]}"
                                f", this run has {mine}. Resume with the same data and seed")
        if state["consumed"] % (self.micro_batch * self.world_size):
            raise PtlmError(f"cannot resume at block {state['consumed']} of the epoch: not a "
                            f"multiple of micro-batch x ranks ({self.micro_batch} x "
                            f"{self.world_size}); keep the global batch of the checkpoint")
        if state["global_batch"] != self.global_batch:
            raise PtlmError(f"checkpoint used global batch {state['global_batch']}, this run "
                            f"{self.global_batch}: the data order would change. Keep the "
                            "global batch when resuming")
        self.epoch, self.consumed = state["epoch"], state["consumed"]
