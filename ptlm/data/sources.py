"""Stream documents (plain strings) out of local corpora or a Hugging Face Hub dataset.

Nothing here holds a corpus in memory: files are read line by line (jsonl, txt lines),
parquet by record batch, `datasets` folders through their memory-mapped Arrow files. The only
exceptions, by nature, are one `.txt` document read as a whole (a file *is* that document) and a
`.json` file holding a single JSON array (JSON arrays cannot be streamed).

Undecodable bytes: the policy is `decode_errors`: "strict" (default) stops with the file, line
and byte offset; "replace" substitutes U+FFFD and goes on (counted as replaced documents).
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ptlm.errors import PtlmError

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TXT_DOC_MODES = ("file", "lines", "blank-lines")
DECODE_POLICIES = ("strict", "replace")
PARQUET_BATCH_ROWS = 1024  # rows per parquet read: bounds memory for long documents
GLOB_CHARS = set("*?[")


@dataclass
class SourceOptions:
    text_field: str = "text"
    txt_docs: str = "file"
    decode_errors: str = "strict"
    hf_split: str = "train"
    hf_config: str | None = None

    def __post_init__(self) -> None:
        if self.txt_docs not in TXT_DOC_MODES:
            raise PtlmError(f"--txt-docs must be one of {TXT_DOC_MODES}, got {self.txt_docs!r}")
        if self.decode_errors not in DECODE_POLICIES:
            raise PtlmError(
                f"--decode-errors must be one of {DECODE_POLICIES}, got {self.decode_errors!r}")


@dataclass
class Source:
    kind: str  # txt | jsonl | json | parquet | datasets | hub
    location: str

    def describe(self) -> str:
        return f"{self.kind}:{self.location}"


@dataclass
class SourceStats:
    documents: int = 0
    empty_skipped: int = 0
    replaced: int = 0  # documents where undecodable bytes were replaced
    per_source: dict = field(default_factory=dict)


def _is_datasets_folder(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "state.json").exists() or (
        path / "dataset_dict.json").exists()


def _file_source(path: Path) -> Source:
    suffix = path.suffix.lower()
    if suffix not in FILE_SUFFIXES:
        raise PtlmError(f"{path}: unsupported file type {suffix!r}; supported: "
                        f"{', '.join(FILE_SUFFIXES)} or a folder written by datasets.save_to_disk")
    return Source(kind=suffix.lstrip("."), location=str(path))


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return 1 <= len(parts) <= 2 and all(parts) and not Path(spec).suffix and not spec.startswith(".")


def resolve_sources(specs: list[str]) -> list[Source]:
    """Expand globs and folders into an ordered list of sources (sorted, so runs are repeatable)."""
    if not specs:
        raise PtlmError("no SOURCE given: name at least one file, folder, glob or hub dataset")
    out: list[Source] = []
    for spec in specs:
        if GLOB_CHARS & set(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise PtlmError(f"source glob {spec!r} matched no file")
            for m in matches:
                out.extend(resolve_sources([m]) if Path(m).is_dir() else [_file_source(Path(m))])
            continue
        path = Path(spec)
        if path.is_dir():
            if _is_datasets_folder(path):
                out.append(Source("datasets", str(path)))
                continue
            files = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in FILE_SUFFIXES)
            if not files:
                raise PtlmError(f"folder {path} holds no {'/'.join(FILE_SUFFIXES)} file and is not "
                                "a datasets.save_to_disk folder")
            out.extend(_file_source(p) for p in files)
        elif path.is_file():
            out.append(_file_source(path))
        elif _looks_like_hub_id(spec):
            out.append(Source("hub", spec))
        else:
            raise PtlmError(f"source {spec!r} does not exist (not a file, folder, glob or hub "
                            "dataset name)")
    return out


def _decode(raw: bytes, where: str, policy: str) -> tuple[str, bool]:
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError as e:
        if policy == "strict":
            raise PtlmError(
                f"{where}: invalid UTF-8 at byte {e.start} ({raw[e.start:e.start + 4]!r}). Convert "
                "the file to UTF-8, or pass --decode-errors replace to replace undecodable bytes "
                "with U+FFFD") from None
        return raw.decode("utf-8", errors="replace"), True


def _iter_txt(path: str, opts: SourceOptions) -> Iterator[tuple[str, bool]]:
    if opts.txt_docs == "file":
        raw = Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf")
        yield _decode(raw, path, opts.decode_errors)
        return
    paragraph: list[str] = []
    replaced_any = False
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            line, replaced = _decode(raw, f"{path}:{lineno}", opts.decode_errors)
            if opts.txt_docs == "lines":
                line = line.rstrip("\r\n")
                if line.strip():
                    yield line, replaced
                continue
            if line.strip():
                paragraph.append(line)
                replaced_any |= replaced
            elif paragraph:
                yield "".join(paragraph).rstrip("\r\n"), replaced_any
                paragraph, replaced_any = [], False
    if paragraph:
        yield "".join(paragraph).rstrip("\r\n"), replaced_any


def _text_of(record, where: str, opts: SourceOptions):
    if not isinstance(record, dict):
        raise PtlmError(f"{where}: expected a JSON object with a {opts.text_field!r} field, got "
                        f"{type(record).__name__}")
    if opts.text_field not in record:
        raise PtlmError(f"{where}: no field {opts.text_field!r} (fields: "
                        f"{', '.join(map(str, record)) or 'none'}); pass --text-field NAME")
    text = record[opts.text_field]
    if text is not None and not isinstance(text, str):
        raise PtlmError(f"{where}: field {opts.text_field!r} is {type(text).__name__}, not text")
    return text


def _iter_jsonl(path: str, opts: SourceOptions) -> Iterator[tuple[str, bool]]:
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(b"\xef\xbb\xbf")
            if not raw.strip():
                continue
            where = f"{path}:{lineno}"
            line, replaced = _decode(raw, where, opts.decode_errors)
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise PtlmError(f"{where}: not valid JSON ({e.msg}); each line must be one JSON "
                                "object") from None
            yield _text_of(record, where, opts), replaced


def _iter_json(path: str, opts: SourceOptions) -> Iterator[tuple[str, bool]]:
    with open(path, "rb") as f:
        head = f.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    if not head.startswith(b"["):
        yield from _iter_jsonl(path, opts)  # JSON lines under a .json name
        return
    text, replaced = _decode(Path(path).read_bytes().removeprefix(b"\xef\xbb\xbf"), path,
                             opts.decode_errors)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as e:
        raise PtlmError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
    for i, record in enumerate(records):
        yield _text_of(record, f"{path}[{i}]", opts), replaced


def _check_column(names: list[str], where: str, opts: SourceOptions) -> None:
    if opts.text_field not in names:
        raise PtlmError(f"{where}: no column {opts.text_field!r} (columns: {', '.join(names)}); "
                        "pass --text-field NAME")


def _iter_parquet(path: str, opts: SourceOptions) -> Iterator[tuple[str, bool]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a bad file
        raise PtlmError(f"{path}: not a readable parquet file ({e})") from None
    _check_column(pf.schema_arrow.names, path, opts)
    for batch in pf.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[opts.text_field]):
        for text in batch.column(0).to_pylist():
            yield text, False


def _iter_datasets(path: str, opts: SourceOptions) -> Iterator[tuple[str, bool]]:
    import datasets

    ds = datasets.load_from_disk(path)
    if isinstance(ds, datasets.DatasetDict):
        if opts.hf_split not in ds:
            raise PtlmError(f"{path}: no split {opts.hf_split!r} (splits: {', '.join(ds)}); pass "
                            "--hf-split NAME")
        ds = ds[opts.hf_split]
    _check_column(ds.column_names, path, opts)
    # Arrow-backed and memory-mapped: iterating one column in batches keeps memory flat.
    for batch in ds.select_columns([opts.text_field]).iter(batch_size=PARQUET_BATCH_ROWS):
        for text in batch[opts.text_field]:
            yield text, False


def _iter_hub(name: str, opts: SourceOptions) -> Iterator[tuple[str, bool]]:
    import datasets

    try:
        ds = datasets.load_dataset(name, opts.hf_config, split=opts.hf_split, streaming=True)
    except Exception as e:
        raise PtlmError(f"source {name!r} is not a local file or folder, and loading it as a "
                        f"Hugging Face Hub dataset failed: {type(e).__name__}: {e}") from None
    for i, record in enumerate(ds):
        yield _text_of(record, f"{name}[{i}]", opts), False


_READERS = {"txt": _iter_txt, "jsonl": _iter_jsonl, "json": _iter_json, "parquet": _iter_parquet,
            "datasets": _iter_datasets, "hub": _iter_hub}


def iter_documents(sources: list[Source], opts: SourceOptions,
                   stats: SourceStats | None = None) -> Iterator[str]:
    """Yield every non-empty document, in source order. Updates `stats` as it goes."""
    stats = stats if stats is not None else SourceStats()
    for src in sources:
        n = 0
        for text, replaced in _READERS[src.kind](src.location, opts):
            if not text:
                stats.empty_skipped += 1
                continue
            stats.documents += 1
            stats.replaced += int(replaced)
            n += 1
            yield text
        stats.per_source[src.describe()] = n


def source_fingerprint(sources: list[Source]) -> list[dict]:
    """What the manifest records about the inputs (path, size, mtime for local files)."""
    out = []
    for s in sources:
        entry = {"kind": s.kind, "location": s.location}
        if s.kind not in ("hub", "datasets") and os.path.exists(s.location):
            st = os.stat(s.location)
            entry.update(bytes=st.st_size)
        out.append(entry)
    return out
