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
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from ptlm.errors import PtlmError

log = logging.getLogger(__name__)

FILE_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
TXT_DOC_MODES = ("file", "lines", "blank-lines")
DECODE_POLICIES = ("strict", "replace")
PARQUET_BATCH_ROWS = 1024  # rows per parquet read: bounds memory for long documents
GLOB_CHARS = set("*?[")
MAX_BAD_ROWS_LISTED = 20  # bad rows named in one error (the scan stops after one more)
MAX_SKIPPED_LISTED = 20  # skipped files named in the warning
# `ptlm prepare`'s own temporaries (.OUT.tmp-PID, .OUT.old-PID): never read back as input
PREPARE_TEMP = re.compile(r"^\..+\.(tmp|old)-\d+$")


@dataclass
class SourceOptions:
    text_field: str = "text"
    txt_docs: str = "file"
    decode_errors: str = "strict"
    hf_split: str = "train"
    hf_config: str | None = None
    skip_bad_rows: bool = False  # rows without usable text: skip and count them, or stop

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
    bad_rows: int = 0  # rows without usable text (bad JSON, no such field, not text)
    bad_examples: list = field(default_factory=list)  # the first MAX_BAD_ROWS_LISTED of them
    per_source: dict = field(default_factory=dict)


class BadRow(PtlmError):
    """One record without usable text: reported with the others (or skipped), not alone."""


@dataclass
class _Bad:
    problem: str


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


def _excluded(path: Path, exclude: list[Path]) -> str | None:
    """Why `path` must not be read as input (it is prepare's own output), or None."""
    if any(PREPARE_TEMP.match(part) for part in path.parts):
        return "a temporary folder of `ptlm prepare`"
    resolved = path.resolve()
    for ex in exclude:
        if resolved == ex or ex in resolved.parents:
            return f"inside --out {ex}"
    return None


def _folder_files(path: Path, exclude: list[Path]) -> list[Path]:
    """The corpus files of a folder, sorted; every other entry is named in a warning."""
    files, skipped = [], []
    for p in sorted(path.rglob("*")):
        if p.is_dir():
            continue
        why = _excluded(p, exclude)
        if why is None and p.is_symlink() and not p.exists():
            why = "dangling symlink"
        elif why is None and not p.is_file():
            why = "not a regular file"
        elif why is None and p.suffix.lower() not in FILE_SUFFIXES:
            why = f"unsupported type {p.suffix.lower() or '(no suffix)'!r}"
        if why is None:
            files.append(p)
        else:
            skipped.append(f"{p} ({why})")
    if skipped:
        listed = skipped[:MAX_SKIPPED_LISTED]
        more = len(skipped) - len(listed)
        log.warning("folder %s: skipping %d file(s) that are not corpus input (reads %s):\n  %s%s",
                    path, len(skipped), "/".join(FILE_SUFFIXES), "\n  ".join(listed),
                    f"\n  ... and {more} more" if more else "")
    return files


def resolve_sources(specs: list[str], exclude: list[Path] | None = None) -> list[Source]:
    """Expand globs and folders into an ordered list of sources (sorted, so runs are repeatable).
    Files under `exclude` (prepare's --out) and prepare's temporaries are never inputs."""
    if not specs:
        raise PtlmError("no SOURCE given: name at least one file, folder, glob or hub dataset")
    exclude = [Path(e).resolve() for e in exclude or []]
    out: list[Source] = []
    for spec in specs:
        if GLOB_CHARS & set(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise PtlmError(f"source glob {spec!r} matched no file")
            for m in matches:
                if Path(m).is_dir():
                    out.extend(resolve_sources([m], exclude))
                elif (why := _excluded(Path(m), exclude)) is not None:
                    log.warning("source glob %r: skipping %s (%s)", spec, m, why)
                else:
                    out.append(_file_source(Path(m)))
            continue
        path = Path(spec)
        if path.is_dir():
            if _is_datasets_folder(path):
                out.append(Source("datasets", str(path)))
                continue
            files = _folder_files(path, exclude)
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
        raise BadRow(f"{where}: expected a JSON object with a {opts.text_field!r} field, got "
                     f"{type(record).__name__}")
    if opts.text_field not in record:
        raise BadRow(f"{where}: no field {opts.text_field!r} (fields: "
                     f"{', '.join(map(str, record)) or 'none'})")
    text = record[opts.text_field]
    if text is not None and not isinstance(text, str):
        raise BadRow(f"{where}: field {opts.text_field!r} is {type(text).__name__}, not text")
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
                yield _Bad(f"{where}: not valid JSON ({e.msg}); each line must be one JSON "
                           "object"), False
                continue
            try:
                yield _text_of(record, where, opts), replaced
            except BadRow as e:
                yield _Bad(str(e)), False


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
        try:
            yield _text_of(record, f"{path}[{i}]", opts), replaced
        except BadRow as e:
            yield _Bad(str(e)), False


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
        try:
            yield _text_of(record, f"{name}[{i}]", opts), False
        except BadRow as e:
            yield _Bad(str(e)), False


_READERS = {"txt": _iter_txt, "jsonl": _iter_jsonl, "json": _iter_json, "parquet": _iter_parquet,
            "datasets": _iter_datasets, "hub": _iter_hub}


def iter_documents(sources: list[Source], opts: SourceOptions,
                   stats: SourceStats | None = None) -> Iterator[str]:
    """Yield every non-empty document, in source order. Updates `stats` as it goes.

    Rows without usable text are skipped and counted with opts.skip_bad_rows; otherwise the
    first bad row stops the yielding, the scan goes on to collect up to MAX_BAD_ROWS_LISTED of
    them, and one PtlmError names them all."""
    stats = stats if stats is not None else SourceStats()
    for src in sources:
        n = 0
        for text, replaced in _READERS[src.kind](src.location, opts):
            if isinstance(text, _Bad):
                stats.bad_rows += 1
                if len(stats.bad_examples) < MAX_BAD_ROWS_LISTED:
                    stats.bad_examples.append(text.problem)
                if not opts.skip_bad_rows and stats.bad_rows > MAX_BAD_ROWS_LISTED:
                    break  # enough to show; the error below says there are more
                continue
            if stats.bad_rows and not opts.skip_bad_rows:
                stats.documents += 1  # counted for the message; no longer tokenized
                continue
            if not text:
                stats.empty_skipped += 1
                continue
            stats.documents += 1
            stats.replaced += int(replaced)
            n += 1
            yield text
        stats.per_source[src.describe()] = n
        if not opts.skip_bad_rows and stats.bad_rows > MAX_BAD_ROWS_LISTED:
            break
    if stats.bad_rows and not opts.skip_bad_rows:
        raise PtlmError(bad_rows_message(stats, opts))
    if stats.bad_rows:
        log.warning("skipped %d row(s) without usable text (--skip-bad-rows; counted in the "
                    "manifest as bad_rows_skipped); the first: %s", stats.bad_rows,
                    stats.bad_examples[0])


def bad_rows_message(stats: SourceStats, opts: SourceOptions) -> str:
    capped = stats.bad_rows > MAX_BAD_ROWS_LISTED
    count = f"more than {MAX_BAD_ROWS_LISTED}" if capped else str(stats.bad_rows)
    head = f"{count} row(s) without usable text"
    if stats.documents:
        advice = (f"the {stats.documents} other row(s) read so far have field "
                  f"{opts.text_field!r}: fix these rows, or pass --skip-bad-rows to skip them "
                  "(counted in the manifest)")
    else:
        advice = (f"no row read so far has a usable field {opts.text_field!r}: pass --text-field "
                  "NAME with the field that holds the text")
    listed = "\n  ".join(stats.bad_examples)
    return f"{head}; {advice}:\n  {listed}" + (
        f"\n  ... (scan stopped after {MAX_BAD_ROWS_LISTED + 1} bad rows)" if capped else "")


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
