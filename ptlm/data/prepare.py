"""`ptlm prepare`: corpus -> tokenizer -> [BOS] doc EOS token stream -> fixed-length blocks ->
train/val Arrow shards + manifest, in constant memory.

Two passes over tokens, one over text:
  1. stream documents in batches, encode them (Rust tokenizer, all cores), frame each with the
     tokenizer's own specials (its BOS first where it adds one, as Llama 3's and Gemma's do; the
     EOS the model ends documents with last), and append
     the ids to a flat temporary file; keep only each document's length (8 bytes/document);
  2. choose validation documents from the lengths (ptlm.data.packing.choose_val_docs), then, per
     split, read the documents' ids back from the memory-mapped temporary file in corpus order and
     cut them into blocks (ptlm.data.packing.BlockPacker) written to shards
     (ptlm.data.shards.ShardWriter).
Everything is written under DIR's temporary sibling and renamed at the end, so an interrupted run
never leaves a half-made DIR.
"""

from __future__ import annotations

import errno
import logging
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from ptlm import __version__, hub
from ptlm.data import packing, shards, sources
from ptlm.data import tokenizer as toks
from ptlm.errors import PtlmError

log = logging.getLogger(__name__)

BATCH_CHARS = 4_000_000  # text per encode call: parallelism needs several documents per call
# (measured on Machado, 2 cores: 1M chars 1.06, 4M 1.36 M tokens/s); the encodings of one call
# (~240 B/token, ~0.4 GB here) bound prepare's memory whatever the corpus size
BATCH_DOCS = 2_000  # ...and at most this many documents (short-document corpora)
READ_TOKENS = 8 * 2**20  # pass 2 reads the token stream in slices of this many tokens
STREAM_FILE = "stream.tmp"
DOC_LENGTHS_FILE = "documents.npy"
MAX_INFLIGHT_PER_PROC = 2  # batches queued per worker: bounded memory with --num-proc > 1


@dataclass
class PrepareConfig:
    sources: list[str]
    out: Path
    seq_len: int
    tokenizer: str | None = None
    train_tokenizer: int | None = None  # vocab size of a BPE to train on the corpus
    eos_token: str | None = None
    # --model: seq_len was checked against its positions by the command (ptlm.model.positions,
    # which the data layer cannot import); the tokenizer's model_max_length is then not checked
    model: str | None = None
    val_fraction: float = 0.05
    seed: int = 0
    num_proc: int = 1
    overwrite: bool = False
    shard_bytes: int = shards.DEFAULT_SHARD_BYTES
    source_options: sources.SourceOptions = field(default_factory=sources.SourceOptions)
    progress: bool | None = None  # None: tqdm decides (on when stderr is a terminal)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.seq_len < 2:
            raise PtlmError(f"--seq-len must be >= 2 (a block predicts its tokens 1..n-1 from "
                            f"0..n-2), got {self.seq_len}")
        if (self.tokenizer is None) == (self.train_tokenizer is None):
            raise PtlmError("give exactly one of --tokenizer NAME_OR_PATH or --train-tokenizer "
                            "VOCAB_SIZE")
        if self.val_fraction == 0.0:
            raise PtlmError(
                "--val-fraction 0 is not supported: training measures validation loss and "
                "perplexity on the val split (at step 0, after each epoch and at the end) and "
                "needs one. The smallest split is one block of --seq-len tokens: pass a small "
                "fraction such as --val-fraction 0.001")
        if not 0.0 < self.val_fraction < 1.0:
            raise PtlmError(f"--val-fraction must be in (0, 1), got {self.val_fraction}")
        if self.num_proc < 1:
            raise PtlmError(f"--num-proc must be >= 1, got {self.num_proc}")
        if self.out.exists() and not self.overwrite:
            raise PtlmError(f"{self.out} already exists; pass --overwrite to replace it, or "
                            "choose another --out")


# ------------------------------------------------------------------------------ pass 1: encode

def _batches(texts: Iterable[str]) -> Iterator[list[str]]:
    """Batches of at most BATCH_CHARS characters (or one longer document alone): the encode's
    memory peak is then bounded by max(BATCH_CHARS, the longest document), whatever the corpus."""
    batch, chars = [], 0
    for t in texts:
        if batch and (chars + len(t) > BATCH_CHARS or len(batch) >= BATCH_DOCS):
            yield batch
            batch, chars = [], 0
        batch.append(t)
        chars += len(t)
    if batch:
        yield batch


def encode_batch(tok, texts: list[str], frame: toks.DocumentFrame,
                 dtype) -> tuple[np.ndarray, np.ndarray]:
    """-> (flat ids, each document framed as [BOS] ids EOS, (n_docs,) lengths with the frame)."""
    encodings = tok.encode_batch_fast(texts, add_special_tokens=False)
    ids = [e.ids for e in encodings]
    extra = frame.extra_tokens
    lengths = np.fromiter((len(x) + extra for x in ids), dtype=np.int64, count=len(ids))
    flat = np.empty(int(lengths.sum()), dtype=dtype)
    ends = np.cumsum(lengths)
    flat[ends - 1] = frame.eos_id
    if frame.bos_id is not None:
        flat[ends - lengths] = frame.bos_id
    for x, end, n in zip(ids, ends.tolist(), lengths.tolist()):
        flat[end - n + extra - 1:end - 1] = x
    return flat, lengths


_WORKER_TOK = None


def _init_worker(tok_dir: str) -> None:
    # Workers are processes already: one tokenizer thread each avoids oversubscribing the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    global _WORKER_TOK
    _WORKER_TOK = toks.load(Path(tok_dir))


def _encode_in_worker(args):
    texts, frame, dtype = args
    return encode_batch(_WORKER_TOK, texts, frame, dtype)


def _encoded(batches: Iterator[list[str]], tok_dir: Path, frame: toks.DocumentFrame, dtype,
             num_proc: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Encoded batches in corpus order, whatever num_proc is (so outputs are identical)."""
    if num_proc == 1:
        tok = toks.load(tok_dir)
        for texts in batches:
            yield encode_batch(tok, texts, frame, dtype)
        return
    ctx = multiprocessing.get_context("spawn")
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(str(tok_dir),)) as pool:
        pending: deque = deque()
        for texts in batches:
            pending.append(pool.apply_async(_encode_in_worker, ((texts, frame, dtype),)))
            if len(pending) >= num_proc * MAX_INFLIGHT_PER_PROC:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


def _release_freed_memory() -> None:
    """Hand freed heap back to the OS (glibc keeps it otherwise)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


# The Rust tokenizer's Encodings cost ~240 bytes/token, allocated and freed by its worker threads.
# With glibc's default of up to 8 arenas per core, each thread's arena keeps its own freed pages
# and resident memory creeps up with the number of batches (+16% over a 10x corpus, measured);
# two arenas and a malloc_trim every few batches keep it flat. A trim after every batch costs
# ~10% speed (the next batch faults the pages back in); every TRIM_EVERY batches, ~1%.
M_ARENA_MAX = -8  # glibc's mallopt parameter number
ARENAS = 2
TRIM_EVERY = 8


def _load_libc():
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        if not hasattr(libc, "malloc_trim"):
            return None
        libc.mallopt(M_ARENA_MAX, ARENAS)
        return libc
    except OSError:  # not glibc (macOS, musl): nothing to trim
        return None


_LIBC = _load_libc()


def _progress(enabled: bool | None, desc: str, unit: str):
    from tqdm import tqdm

    return tqdm(desc=desc, unit=unit, disable=None if enabled is None else not enabled,
                dynamic_ncols=True, file=sys.stderr)


def tokenize_to_stream(docs: Iterable[str], tok_dir: Path, frame: toks.DocumentFrame, dtype,
                       path: Path, num_proc: int, progress: bool | None) -> np.ndarray:
    """Pass 1. Appends every document's ids ([BOS] ... EOS) to `path`; returns (D,) lengths."""
    lengths: list[np.ndarray] = []
    n_tokens, t0 = 0, time.perf_counter()
    with open(path, "wb") as f, _progress(progress, "tokenize", "doc") as bar:
        for i, (flat, lens) in enumerate(_encoded(_batches(docs), tok_dir, frame, dtype,
                                                  num_proc)):
            flat.tofile(f)
            lengths.append(lens)
            n_tokens += len(flat)
            if i % TRIM_EVERY == TRIM_EVERY - 1:
                _release_freed_memory()
            bar.update(len(lens))
            bar.set_postfix_str(f"{n_tokens / max(time.perf_counter() - t0, 1e-9) / 1e6:.2f}M "
                                f"tok/s, {n_tokens / 1e6:.1f}M tokens", refresh=False)
    _release_freed_memory()  # pass 2 needs little: give the encode's heap back
    return np.concatenate(lengths) if lengths else np.empty(0, dtype=np.int64)


# ------------------------------------------------------------------------------ pass 2: pack

def pack_split(stream_path: Path, dtype, lengths: np.ndarray, mask: np.ndarray,
               writer: shards.ShardWriter, seq_len: int) -> dict:
    """Pack the documents selected by `mask` (in corpus order) into blocks; returns stats.

    The stream is read with plain reads, not a memory map: mapped pages would count in this
    process's resident memory, growing with the corpus."""
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    itemsize = np.dtype(dtype).itemsize
    packer = packing.BlockPacker(seq_len, dtype)
    blocks = 0
    with open(stream_path, "rb") as f:
        for start_doc, end_doc in packing.runs_of(mask):
            lo, hi = int(offsets[start_doc]), int(offsets[end_doc])
            for pos in range(lo, hi, READ_TOKENS):
                f.seek(pos * itemsize)
                out = packer.feed(np.fromfile(f, dtype=dtype, count=min(READ_TOKENS, hi - pos)))
                if len(out):
                    writer.write(out)
                    blocks += len(out)
    doc_file = f"{writer.split}/{DOC_LENGTHS_FILE}"
    np.save(writer.root / doc_file, lengths[mask].astype(np.int64), allow_pickle=False)
    return {"documents": int(mask.sum()), "tokens": packer.tokens_in, "blocks": blocks,
            "dropped_tokens": packer.dropped, "shards": writer.close(),
            "document_lengths": doc_file}


# ------------------------------------------------------------------------------ the command

def _check_seq_len(cfg: PrepareConfig, info: toks.TokenizerInfo) -> None:
    if not cfg.model and info.model_max_length and cfg.seq_len > info.model_max_length:
        raise PtlmError(f"--seq-len {cfg.seq_len} is above the tokenizer's model_max_length "
                        f"{info.model_max_length} ({info.source}); use a smaller --seq-len, or "
                        "pass --model to check against the model's positions instead")


def _tokenizer_into(cfg: PrepareConfig, srcs, dest: Path) -> toks.TokenizerInfo:
    if cfg.train_tokenizer is not None:
        log.info("training a byte-level BPE with %d ids on the corpus", cfg.train_tokenizer)
        toks.train_bpe(sources.iter_documents(srcs, cfg.source_options), cfg.train_tokenizer,
                       dest)
        return toks.describe(dest, f"trained:{cfg.train_tokenizer}")
    toks.materialize(cfg.tokenizer, dest, cfg.eos_token)
    return toks.describe(dest, cfg.tokenizer)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def clean_stale_temporaries(out: Path) -> list[Path]:
    """Remove the `.OUT.tmp-PID` / `.OUT.old-PID` folders that killed runs of `ptlm prepare
    --out OUT` left next to OUT (their process is gone); name each one in a warning. A folder of
    a process still running (a concurrent prepare) is left alone, and said so. An `.old-PID` when
    OUT is missing is the previous dataset of a run killed inside _commit: it is put back as OUT,
    not removed. Returns the removed folders. (PIDs are of this host: on a folder shared by
    several hosts, a live prepare elsewhere may look dead here; do not prepare the same --out from
    two hosts at once.)"""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(tmp|old)-(\d+)$")
    removed = []
    if not out.parent.is_dir():
        return removed
    for entry in sorted(out.parent.iterdir()):
        m = pattern.match(entry.name)
        if not m or not entry.is_dir():
            continue
        pid = int(m.group(2))
        if pid != os.getpid() and _pid_alive(pid):
            log.warning("%s belongs to a running process (pid %d), maybe another `ptlm prepare` "
                        "of the same --out; leaving it", entry, pid)
            continue
        if m.group(1) == "old" and not out.exists() and (entry / shards.MANIFEST).exists():
            os.replace(entry, out)
            log.warning("restored %s from %s: an interrupted `ptlm prepare --overwrite` (pid %d) "
                        "had moved it aside", out, entry, pid)
            continue
        size = sum(f.stat().st_size for f in entry.rglob("*") if f.is_file())
        shutil.rmtree(entry, ignore_errors=True)
        log.warning("removed %s (%.1f MiB) left by an interrupted `ptlm prepare` (pid %d, no "
                    "longer running)", entry, size / 2**20, pid)
        removed.append(entry)
    return removed


_NO_WRITE = {errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
             errno.EPERM: "permission denied", errno.ENOSPC: "no space left on device",
             errno.EDQUOT: "disk quota exceeded"}


def _write_error(e: OSError, out: Path) -> PtlmError:
    what = _NO_WRITE[e.errno]
    fix = ("free some space or choose --out on another disk"
           if e.errno in (errno.ENOSPC, errno.EDQUOT) else "choose a writable --out")
    return PtlmError(f"cannot write --out {out} ({what}: {e.filename or out.parent}); {fix}")


def prepare(cfg: PrepareConfig) -> dict:
    """Run the whole job; returns the manifest written to cfg.out."""
    out = cfg.out.resolve()
    if cfg.tokenizer and cfg.train_tokenizer is None:  # offline: at once, not after retries
        hub.require("--tokenizer", cfg.tokenizer, "tokenizer")
    srcs = sources.resolve_sources(cfg.sources, exclude=[out])
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        clean_stale_temporaries(out)
        if out.exists() and not cfg.overwrite:  # put back just now from an interrupted run
            raise PtlmError(f"{out} already exists; pass --overwrite to replace it, or choose "
                            "another --out")
        tmp.mkdir(parents=True)
        try:
            manifest = _prepare_into(cfg, srcs, tmp)
            _commit(tmp, out, cfg.overwrite)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except OSError as e:
        if _is_output_error(e, out, tmp):
            raise _write_error(e, out) from None
        raise
    return manifest


def _is_output_error(e: OSError, out: Path, tmp: Path) -> bool:
    """A failure to write the output (not, say, an unreadable source)."""
    if e.errno in (errno.EROFS, errno.ENOSPC, errno.EDQUOT):
        return True
    if e.errno not in _NO_WRITE or not e.filename:
        return False
    f = Path(os.fsdecode(e.filename)).resolve()
    return any(f == p or f in p.parents or p in f.parents for p in (tmp, out))


def _prepare_into(cfg: PrepareConfig, srcs, tmp: Path) -> dict:
    t0 = time.perf_counter()
    info = _tokenizer_into(cfg, srcs, tmp / shards.TOKENIZER_DIR)
    _check_seq_len(cfg, info)
    dtype = shards.token_dtype(info.vocab_size)
    stats = sources.SourceStats()
    stream_path = tmp / STREAM_FILE
    lengths = tokenize_to_stream(sources.iter_documents(srcs, cfg.source_options, stats),
                                 tmp / shards.TOKENIZER_DIR, info.frame, dtype, stream_path,
                                 cfg.num_proc, cfg.progress)
    if stats.documents == 0:
        raise PtlmError(f"the corpus is empty: no non-empty document in {', '.join(cfg.sources)}"
                        f" ({stats.empty_skipped} empty skipped); check the path and "
                        f"--text-field {cfg.source_options.text_field!r}")
    tokenize_s = time.perf_counter() - t0
    val_mask = packing.choose_val_docs(lengths, cfg.val_fraction, cfg.seq_len, cfg.seed)
    _warn_if_val_share_off(cfg, lengths, val_mask)
    splits = {}
    for split, mask in (("train", ~val_mask), ("val", val_mask)):
        writer = shards.ShardWriter(tmp, split, cfg.seq_len, dtype, cfg.shard_bytes)
        splits[split] = pack_split(stream_path, dtype, lengths, mask, writer, cfg.seq_len)
    stream_path.unlink()
    manifest = {
        "format": shards.FORMAT_NAME, "format_version": shards.FORMAT_VERSION,
        "ptlm_version": __version__, "created": datetime.now(timezone.utc).isoformat(),
        "seq_len": cfg.seq_len, "dtype": dtype.name, "column": shards.COLUMN,
        "eos_id": info.eos_id,
        "bos_id": info.bos_id,  # before every document; null when the tokenizer adds none
        "tokenizer": {"path": shards.TOKENIZER_DIR, **info.to_dict()},
        "documents": stats.documents, "empty_documents_skipped": stats.empty_skipped,
        "documents_with_replaced_bytes": stats.replaced,
        "bad_rows_skipped": stats.bad_rows,
        "tokens": int(lengths.sum()),
        "splits": splits,
        "sources": sources.source_fingerprint(srcs),
        "options": {"val_fraction": cfg.val_fraction, "seed": cfg.seed,
                    **asdict(cfg.source_options)},
        "timing_s": {"tokenize": round(tokenize_s, 3),
                     "total": round(time.perf_counter() - t0, 3)},
    }
    shards.write_json_atomic(tmp / shards.MANIFEST, manifest)
    return manifest


VAL_SHARE_TOLERANCE = 2.0  # warn when the val share is off --val-fraction by more than this factor


def _warn_if_val_share_off(cfg: PrepareConfig, lengths: np.ndarray, val_mask: np.ndarray) -> None:
    """Validation is cut by whole documents and holds at least one block: on a small corpus, or
    one of a few long documents, its share can be far from --val-fraction. Say so."""
    share = float(lengths[val_mask].sum()) / max(1, int(lengths.sum()))
    ratio = share / cfg.val_fraction
    if 1 / VAL_SHARE_TOLERANCE <= ratio <= VAL_SHARE_TOLERANCE:
        return
    log.warning("the validation split holds %.1f%% of the tokens (%d of %d documents), not the "
                "%.1f%% of --val-fraction %g: it takes whole documents and at least one block of "
                "%d tokens, and this corpus has %d tokens. %s", 100 * share, int(val_mask.sum()),
                len(lengths), 100 * cfg.val_fraction, cfg.val_fraction, cfg.seq_len,
                int(lengths.sum()),
                "Add text, lower --seq-len, or split long texts into more documents (e.g. "
                "--txt-docs blank-lines)" if ratio > 1 else
                "The documents are large compared to the target: split them into smaller ones "
                "(e.g. --txt-docs blank-lines) for a closer share")


def _commit(tmp: Path, out: Path, overwrite: bool) -> None:
    """Move the finished folder into place; an old DIR is replaced only once the new one is whole."""
    if out.exists():
        if not overwrite:
            raise PtlmError(f"{out} appeared while preparing; pass --overwrite to replace it")
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)


def summary(manifest: dict) -> str:
    lines = [f"seq_len {manifest['seq_len']}, {manifest['dtype']} tokens, tokenizer "
             f"{manifest['tokenizer']['source']} ({manifest['tokenizer']['vocab_size']} ids, EOS "
             f"{manifest['eos_id']}), {manifest['documents']} documents, "
             f"{manifest['tokens']:,} tokens"]
    if manifest.get("bad_rows_skipped"):
        lines.append(f"  {manifest['bad_rows_skipped']:,} row(s) without usable text skipped "
                     "(--skip-bad-rows)")
    for split, s in manifest["splits"].items():
        size = sum(sh["bytes"] for sh in s["shards"])
        lines.append(f"  {split:5s}: {s['documents']:>8,} docs {s['tokens']:>13,} tokens "
                     f"{s['blocks']:>9,} blocks  {s['dropped_tokens']:>6,} tokens dropped (last "
                     f"partial block)  {len(s['shards'])} shard(s), {size / 2**20:.1f} MiB")
    return "\n".join(lines)
