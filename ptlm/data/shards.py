"""The on-disk format of a prepared dataset: `manifest.json` + per-split Arrow IPC shards.

    DIR/manifest.json
    DIR/tokenizer/            the exact tokenizer used (tokenizer.json, tokenizer_config.json)
    DIR/train/shard-00000.arrow
    DIR/val/shard-00000.arrow
    DIR/train/documents.npy     tokens per document of the split (int64), in stream order

Each shard is an uncompressed Arrow IPC *file* (memory-mappable, zero-copy) with one column
`input_ids: fixed_size_list<uint16|uint32>[seq_len]`, one row per block, written as several
record batches of a few MB (so writing never buffers a whole shard). No torch in this module:
`ptlm inspect` and `ptlm verify` stay light.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from ptlm.errors import PtlmError

log = logging.getLogger(__name__)

FORMAT_NAME = "ptlm-packed"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
COLUMN = "input_ids"
SPLITS = ("train", "val")
UINT16_VOCAB_LIMIT = 2**16  # ids 0..65535 fit uint16: half the disk and page cache of uint32
DEFAULT_SHARD_BYTES = 256 * 2**20  # "a few hundred MB at most" per shard
RECORD_BATCH_BYTES = 4 * 2**20  # write granularity: bounds the writer's buffer
HASH_CHUNK_BYTES = 8 * 2**20


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= UINT16_VOCAB_LIMIT else np.dtype(np.uint32)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(HASH_CHUNK_BYTES):
            h.update(chunk)
    return h.hexdigest()


def schema(seq_len: int, dtype: np.dtype) -> pa.Schema:
    return pa.schema([pa.field(COLUMN, pa.list_(pa.from_numpy_dtype(dtype), seq_len))])


class ShardWriter:
    """Append (n, seq_len) blocks; rolls to a new shard file every `shard_bytes`."""

    def __init__(self, root: Path, split: str, seq_len: int, dtype: np.dtype,
                 shard_bytes: int = DEFAULT_SHARD_BYTES) -> None:
        self.root, self.split, self.seq_len = Path(root), split, seq_len
        self.dtype = np.dtype(dtype)
        row_bytes = seq_len * self.dtype.itemsize
        self.rows_per_shard = max(1, shard_bytes // row_bytes)
        self.rows_per_batch = max(1, min(self.rows_per_shard, RECORD_BATCH_BYTES // row_bytes))
        self.schema = schema(seq_len, self.dtype)
        self.shards: list[dict] = []
        self._writer: pa.ipc.RecordBatchFileWriter | None = None
        self._rows_in_shard = 0
        self._pending: list[np.ndarray] = []
        self._pending_rows = 0
        (self.root / split).mkdir(parents=True, exist_ok=True)

    def write(self, blocks: np.ndarray) -> None:
        assert blocks.ndim == 2 and blocks.shape[1] == self.seq_len, blocks.shape
        self._pending.append(blocks.astype(self.dtype, copy=False))
        self._pending_rows += len(blocks)
        while self._pending_rows >= self.rows_per_batch:
            self._flush(self.rows_per_batch)

    def _flush(self, max_rows: int) -> None:
        buf = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        room = self.rows_per_shard - self._rows_in_shard
        n = min(max_rows, len(buf), room)
        self._write_batch(buf[:n])
        rest = buf[n:]
        self._pending = [rest] if len(rest) else []
        self._pending_rows = len(rest)

    def _write_batch(self, rows: np.ndarray) -> None:
        if self._writer is None:
            self._open()
        values = pa.array(np.ascontiguousarray(rows).reshape(-1))
        column = pa.FixedSizeListArray.from_arrays(values, self.seq_len)
        self._writer.write_batch(pa.record_batch([column], schema=self.schema))
        self._rows_in_shard += len(rows)
        if self._rows_in_shard >= self.rows_per_shard:
            self._close_shard()

    def _open(self) -> None:
        rel = f"{self.split}/shard-{len(self.shards):05d}.arrow"
        self._path = self.root / rel
        self._rel = rel
        self._writer = pa.ipc.new_file(str(self._path), self.schema)
        self._rows_in_shard = 0

    def _close_shard(self) -> None:
        self._writer.close()
        self._writer = None
        self.shards.append({"file": self._rel, "rows": self._rows_in_shard,
                            "bytes": self._path.stat().st_size,
                            "sha256": sha256_file(self._path)})

    def close(self) -> list[dict]:
        while self._pending_rows:
            self._flush(self.rows_per_batch)
        if self._writer is not None:
            self._close_shard()
        return self.shards


# ---------------------------------------------------------------------------------- reading

def read_manifest(root: Path) -> dict:
    root = Path(root)
    path = root / MANIFEST
    if not path.exists():
        raise PtlmError(f"{root}: no {MANIFEST}; is this a folder written by `ptlm prepare`?")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PtlmError(f"{path} is corrupt ({e.msg}); re-run `ptlm prepare`") from None
    if manifest.get("format") != FORMAT_NAME:
        raise PtlmError(f"{path} is not a ptlm dataset manifest (format "
                        f"{manifest.get('format')!r}, expected {FORMAT_NAME!r})")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise PtlmError(f"{root} has format version {manifest.get('format_version')}, this ptlm "
                        f"reads version {FORMAT_VERSION}; re-run `ptlm prepare` with this ptlm")
    return manifest


@dataclass
class SplitBlocks:
    """Zero-copy views of one split's blocks: a list of (rows, seq_len) arrays over mmaps."""

    chunks: list[np.ndarray]
    starts: np.ndarray  # (n_chunks,) global row index of each chunk's first row
    num_blocks: int
    seq_len: int

    def locate(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        chunk = np.searchsorted(self.starts, indices, side="right") - 1
        return chunk, indices - self.starts[chunk]

    def take(self, indices) -> np.ndarray:
        """(len(indices), seq_len) copy of the given rows, in the given order."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= self.num_blocks):
            raise IndexError(f"block index out of range [0, {self.num_blocks})")
        chunk, row = self.locate(idx)
        if len(self.chunks) == 1:
            return self.chunks[0][row]
        return np.stack([self.chunks[c][r] for c, r in zip(chunk.tolist(), row.tolist())]) \
            if idx.size else np.empty((0, self.seq_len), self.chunks[0].dtype)


class CorruptShard(PtlmError):
    """A shard that does not match the manifest; `problem` is the finding alone (for `ptlm
    verify`, whose own message must not send the user to `ptlm verify`)."""

    def __init__(self, message: str, problem: str) -> None:
        super().__init__(message)
        self.problem = problem


def _corrupt(root: Path, rel: str, why: str) -> PtlmError:
    return CorruptShard(f"{root / rel}: {why}. The shard is corrupt or not from this dataset: "
                        f"run `ptlm verify {root}`, and re-run `ptlm prepare` if it fails",
                        f"{root / rel}: {why}")


def open_split(root: Path, manifest: dict, split: str) -> SplitBlocks:
    """Memory-map one split, checking every shard against the manifest (cheap checks only;
    `verify()` hashes the bytes)."""
    root = Path(root)
    if split not in manifest["splits"]:
        raise PtlmError(f"{root}: no split {split!r} (splits: {', '.join(manifest['splits'])})")
    seq_len = manifest["seq_len"]
    dtype = np.dtype(manifest["dtype"])
    expected = schema(seq_len, dtype)
    chunks, starts, total = [], [], 0
    for shard in manifest["splits"][split]["shards"]:
        path = root / shard["file"]
        if not path.exists():
            raise _corrupt(root, shard["file"], "missing")
        if path.stat().st_size != shard["bytes"]:
            raise _corrupt(root, shard["file"], f"size {path.stat().st_size} bytes, manifest "
                           f"says {shard['bytes']}")
        try:
            reader = pa.ipc.open_file(pa.memory_map(str(path), "r"))
        except (pa.ArrowInvalid, OSError) as e:
            raise _corrupt(root, shard["file"], f"not a readable Arrow IPC file ({e})") from None
        if not reader.schema.equals(expected):
            raise _corrupt(root, shard["file"], f"schema {reader.schema} != expected {expected}")
        rows = 0
        for i in range(reader.num_record_batches):
            col = reader.get_batch(i).column(0)
            values = col.values.to_numpy(zero_copy_only=True)
            chunk = values[col.offset * seq_len:(col.offset + len(col)) * seq_len]
            chunks.append(chunk.reshape(len(col), seq_len))
            starts.append(total + rows)
            rows += len(col)
        if rows != shard["rows"]:
            raise _corrupt(root, shard["file"], f"{rows} rows, manifest says {shard['rows']}")
        total += rows
    if total != manifest["splits"][split]["blocks"]:
        raise PtlmError(f"{root}: split {split!r} has {total} blocks in its shards but the "
                        f"manifest says {manifest['splits'][split]['blocks']}")
    return SplitBlocks(chunks=chunks, starts=np.asarray(starts, dtype=np.int64),
                       num_blocks=total, seq_len=seq_len)


def document_lengths(root: Path, manifest: dict, split: str) -> np.ndarray:
    """(documents,) tokens per document of a split, EOS included, in the split's stream order."""
    rel = manifest["splits"][split].get("document_lengths")
    if rel is None or not (Path(root) / rel).exists():
        raise PtlmError(f"{root}: no per-document lengths for split {split!r}; prepare the data "
                        "again with this ptlm")
    return np.load(Path(root) / rel, allow_pickle=False)


def verify(root: Path) -> list[str]:
    """Hash every shard; returns the list of problems (empty when all is well)."""
    root = Path(root)
    manifest = read_manifest(root)
    problems = []
    for split, info in manifest["splits"].items():
        found = len(problems)
        for shard in info["shards"]:
            path = root / shard["file"]
            if not path.exists():
                problems.append(f"{shard['file']}: missing")
            elif (digest := sha256_file(path)) != shard["sha256"]:
                problems.append(f"{shard['file']}: sha256 {digest[:12]}… != manifest "
                                f"{shard['sha256'][:12]}…")
        if len(problems) == found:  # bytes as written: check the structure against the manifest
            try:
                open_split(root, manifest, split)
            except CorruptShard as e:  # the bytes match the manifest's hash: it was edited
                problems.append(f"{e.problem} (the shard's sha256 matches the manifest: was the "
                                "manifest edited?)")
            except PtlmError as e:
                problems.append(str(e))
    return problems


# What training and `ptlm inspect` check before using a dataset (PTLM_DATA_CHECK):
#   full (default): every shard's sha256 against the manifest, then its structure and the largest
#                   token id against the dataset's vocabulary;
#   ids:            structure and largest token id only (no hash; a flipped byte that stays a valid
#                   id then trains silently);
#   off:            the cheap open-time checks of open_split only (size, schema, rows).
# Cost, measured on the 2-core dev machine with the data in the page cache: sha256 0.8 s/GiB,
# the largest id 0.05-0.13 s/GiB (docs/reliability.md). Reading from disk adds the disk's time.
DATA_CHECK_ENV = "PTLM_DATA_CHECK"
DATA_CHECK_MODES = ("full", "ids", "off")


def data_check_mode(mode: str | None = None) -> str:
    mode = (mode or os.environ.get(DATA_CHECK_ENV) or "full").strip().lower()
    if mode not in DATA_CHECK_MODES:
        raise PtlmError(f"{DATA_CHECK_ENV}={mode!r}: expected one of {', '.join(DATA_CHECK_MODES)}")
    return mode


def max_token_id(blocks: SplitBlocks) -> int:
    """The largest token id of a split (-1 when it has no blocks); one pass over the mmaps."""
    return max((int(c.max()) for c in blocks.chunks if c.size), default=-1)


def check_for_training(root: Path, vocab_size: int | None = None, mode: str | None = None) -> dict:
    """Check a prepared dataset before anything uses its tokens; raise PtlmError naming every
    problem and the fix. vocab_size: ids must be below it (default: the dataset's tokenizer's
    vocabulary, from the manifest). Returns what was checked ({"mode", "bytes", "seconds",
    "max_id"}); log lines say so."""
    root = Path(root)
    mode = data_check_mode(mode)
    manifest = read_manifest(root)
    t0 = time.perf_counter()
    nbytes = sum(sh["bytes"] for s in manifest["splits"].values() for sh in s["shards"])
    if mode == "off":
        log.warning("%s=off: the shards of %s are not checked (a corrupt shard can train "
                    "silently or fail mid-run)", DATA_CHECK_ENV, root)
        return {"mode": mode, "bytes": nbytes, "seconds": 0.0, "max_id": None}
    if mode == "full":
        problems = verify(root)
        if problems:
            raise PtlmError(f"{root} is corrupt: its shards do not match the manifest:\n  "
                            + "\n  ".join(problems) + f"\nRe-run `ptlm prepare` to rebuild it "
                            f"(`ptlm verify {root}` repeats this check)")
    vocab = int(vocab_size if vocab_size is not None else manifest["tokenizer"]["vocab_size"])
    top, bad = -1, []
    for split in manifest["splits"]:
        split_max = max_token_id(open_split(root, manifest, split))
        top = max(top, split_max)
        if split_max >= vocab:
            bad.append(f"split {split!r}: token id {split_max} >= vocabulary size {vocab}")
    if bad:
        raise PtlmError(f"{root} holds token ids outside the vocabulary ({'; '.join(bad)}): the "
                        "shards are corrupt or were prepared with another tokenizer. Re-run "
                        "`ptlm prepare` with the model's tokenizer")
    seconds = time.perf_counter() - t0
    log.info("data check (%s) of %s: %.2f GiB in %.1f s, largest token id %d < %d", mode, root,
             nbytes / 2**30, seconds, top, vocab)
    return {"mode": mode, "bytes": nbytes, "seconds": seconds, "max_id": top}


def write_json_atomic(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, path)
