"""The setting matrix, trained for real on DeepSpeed's CPU accelerator with 2 ranks.

    python bench/bench_matrix.py                 # the full product (every setting plan() can return)
    python bench/bench_matrix.py --pairwise      # the default test suite's subset
    python bench/bench_matrix.py --only fp32-Z0-nockpt-adamw8bit-chunked-acc2
    python bench/bench_matrix.py --rows docs/matrix_rows.json --minutes 60   # a chunk of the full
                                 # product; run again to go on where it stopped

The full product takes hours on a small machine, so it can be run in chunks: with --rows, every
finished setting is added to that file at once (written to a temp name, then renamed), settings
already in it are skipped, and the docs table is written from every row the file holds.

Each setting: a tiny OPT saved with save_pretrained (every run starts from the same weights),
8 optimizer steps of global batch 8, killed (SIGKILL) after step 6 with a checkpoint at step 4,
resumed with --resume auto; every loss compared with a plain single-process PyTorch reference
(bench/matrix_reference.py: same blocks in the same order, same init, torch AdamW or bitsandbytes
AdamW8bit, same schedule, clipping and weight-decay groups, no DeepSpeed); the steps the resumed
run redid compared with the killed run's; the export reloaded by plain transformers against the
run's final val perplexity. Writes the table to docs/benchmarks.md: section "Setting matrix
(CPU, 2 ranks)" for --pairwise / --only, "Setting matrix, the full product (CPU, 2 ranks)" for
the full product and its --rows chunks.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from bench import matrix_reference as mx  # noqa: E402

SECTION = "## Setting matrix (CPU, 2 ranks)"  # the pairwise subset (and --only)
FULL_SECTION = "## Setting matrix, the full product (CPU, 2 ranks)"  # all, or --rows chunks
ROWS_ORDER_SEED = 0
DOCS = ROOT / "docs" / "benchmarks.md"


def prepare_data(root: Path) -> Path:
    """The shipped demo corpus, a 1024-token BPE, seq_len 64 (the test suite's demo dataset)."""
    from ptlm.data import tokenizer as toks
    from ptlm.data.prepare import PrepareConfig, prepare

    corpus = ROOT / "ptlm" / "assets" / "demo_corpus_pt.jsonl"
    docs = [json.loads(line)["text"] for line in corpus.read_text("utf-8").splitlines()]
    toks.train_bpe(docs, 1024, root / "tok")
    out = root / "data"
    prepare(PrepareConfig(sources=[str(corpus)], out=out, seq_len=64, tokenizer=str(root / "tok"),
                          val_fraction=0.1, progress=False))
    return out


def table(rows: list[dict]) -> str:
    lines = ["| setting | micro × accum | steps | max loss dev (tol) | resume ok | export ok | "
             "wall s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            first = r["error"].strip().splitlines()[0][:80] if r["error"].strip() else "failed"
            lines.append(f"| {r['setting']} | | {r['steps']} | FAILED: {first} | | | |")
            continue
        mark = " †" if r.get("note") else ""
        lines.append(f"| {r['setting']}{mark} | {r['micro_batch']} × {r['accum']} | {r['steps']} | "
                     f"{r['max_dev']:.2e} ({r['tolerance']:.0e}) | "
                     f"{'yes' if r['resume_ok'] else 'NO'} | "
                     f"{'yes' if r['export_ok'] else 'NO'} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def write_docs(rows: list[dict], which: str, wall: float) -> None:
    from bench.common import machine

    passed = sum(mx.passed(r) for r in rows)
    total = len(mx.full_product())
    command = "" if which == "full" else " " + (which if which.startswith("--") else "--" + which)
    partial = (f" **{len(rows)} of the full product's {total} settings run so far** (chunks of "
               f"`--rows`; the rest are unmeasured)." if which.startswith("--rows") else "")
    section = FULL_SECTION if which == "full" or which.startswith("--rows") else SECTION
    body = (f"{section}\n\n`python bench/bench_matrix.py{command}`"
            f" on {machine()}; DeepSpeed's CPU accelerator (`DS_ACCELERATOR=cpu`), 2 gloo ranks, "
            f"tiny OPT (hidden 64, 2 layers, vocab 1024), seq_len 64, global batch "
            f"{mx.GLOBAL_BATCH}, {mx.STEPS} steps, killed after step {mx.KILL_AFTER} (checkpoint "
            f"at {mx.SAVE_EVERY}) and resumed. Max loss dev: the largest |loss − reference| over "
            f"the {mx.STEPS} steps against the plain single-process PyTorch reference "
            f"(bench/matrix_reference.py); tolerance per precision: "
            + ", ".join(f"{k} {v:.0e}" for k, v in mx.LOSS_TOLERANCE.items())
            + f" (adamw8bit under ZeRO-1/2: {mx.ADAMW8BIT_ZERO_TOLERANCE:.0e}, its quantization "
            f"blocks follow DeepSpeed's flat partitions). Resume ok: the resumed run redid steps "
            f"{mx.SAVE_EVERY + 1}-{mx.KILL_AFTER} bit for bit. Export ok: plain transformers "
            f"reloads the export and reproduces the run's final val perplexity. "
            f"{passed}/{len(rows)} settings pass; {wall / 60:.1f} min in all (wall s: both "
            f"launches of a setting, import time dominating; measured on a shared host with "
            f"other jobs running, so the spread is load, not the setting)." + partial
            + ("" if which == "full" else f" The full product ({len(mx.full_product())} "
               "settings) is `python bench/bench_matrix.py` or `pytest tests/test_matrix.py "
               "--run-slow`.")
            + ("" if mx.cpu_fp16_supported() else
               " † This CPU has no oneDNN fp16, so DeepSpeed's CPU accelerator refuses fp16 (and "
               "ptlm says so before training); the fp16 rows ran with that capability check "
               "patched in the test processes only (tests/cpu_fp16/sitecustomize.py): torch "
               "computes fp16 on any CPU, and the rows check ptlm's fp16 path (loss scaling, "
               "overflow checks, 16-bit export).")
            + f"\n\n{table(rows)}\n")
    text = DOCS.read_text() if DOCS.exists() else ""
    pattern = re.compile(re.escape(section) + r".*?(?=\n## |\Z)", re.S)
    text = pattern.sub(lambda _: body, text) if section in text else text.rstrip() + "\n\n" + body
    DOCS.write_text(text)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    group = ap.add_mutually_exclusive_group()
    group.add_argument("--pairwise", action="store_true", help="the default suite's subset only")
    group.add_argument("--only", nargs="+", help="settings by name (see --list)")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--no-docs", action="store_true", help="print the table, leave the docs")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--from-json", type=Path, help="rewrite the docs section from saved rows "
                                                   "(a --json file), training nothing")
    ap.add_argument("--rows", type=Path, help="run the full product in chunks: skip the settings "
                    "this file already holds, add each finished one to it at once")
    ap.add_argument("--minutes", type=float, help="start no new setting after this many minutes")
    ap.add_argument("--timeout-s", type=float, default=mx.LAUNCH_TIMEOUT_S,
                    help="a launch of a setting past this is killed (with its process group) and "
                         "recorded as a failed row (default %(default)g)")
    args = ap.parse_args(argv)
    if args.from_json:
        rows = json.loads(args.from_json.read_text())
        by_name = {s.name(): s for s in mx.full_product() + mx.PAIRWISE}
        for r in rows:
            r["tolerance"] = by_name[r["setting"]].tolerance()  # as this module states them
            if r["setting"].startswith("fp16") and not mx.cpu_fp16_supported():
                r.setdefault("note", "DeepSpeed's fp16 check patched (tests/cpu_fp16)")
        names = {r["setting"] for r in rows}
        which = ("pairwise" if names == {s.name() for s in mx.PAIRWISE} else
                 "full" if len(names) == len(mx.full_product()) else f"--rows {args.from_json}")
        write_docs(rows, which, sum(r.get("wall_s") or 0 for r in rows))
        print(table(rows))
        return 0 if all(mx.passed(r) for r in rows) else 1
    settings = mx.PAIRWISE if args.pairwise else mx.full_product()
    if args.only:
        by_name = {s.name(): s for s in mx.full_product() + mx.PAIRWISE}
        settings = [by_name[n] for n in args.only]
    if args.list:
        print("\n".join(s.name() for s in settings))
        return 0
    t0 = time.perf_counter()
    done = _load_rows(args.rows) if args.rows else []
    if args.rows:  # a fixed shuffle: any chunk is a spread over every axis, not one corner
        random.Random(ROWS_ORDER_SEED).shuffle(settings)
    settings = [s for s in settings if s.name() not in {r["setting"] for r in done}]
    rows = []
    with tempfile.TemporaryDirectory(prefix="ptlm_matrix_") as tmp:
        root = Path(tmp)
        data = prepare_data(root)
        init = mx.make_init(root / "init")
        for i, s in enumerate(settings):
            if args.minutes and time.perf_counter() - t0 > 60 * args.minutes:
                print(f"stopped after {args.minutes:g} min: {len(settings) - i} settings left")
                break
            row = mx.run_setting(s, init, data, root / f"run{i}", timeout=args.timeout_s)
            rows.append(row)
            if args.rows:
                _save_rows(args.rows, done + rows)
            status = "ok" if mx.passed(row) else "FAIL"
            print(f"[{i + 1}/{len(settings)}] {s.name()}: {status} "
                  f"{json.dumps({k: row.get(k) for k in ('max_dev', 'resume_ok', 'export_ok', 'wall_s')})}"
                  + (f"\n{row['error'][-1500:]}" if "error" in row else ""), flush=True)
    wall = time.perf_counter() - t0
    print(table(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    which = "pairwise" if args.pairwise else "only " + " ".join(args.only) if args.only else "full"
    if args.rows:
        rows, wall = done + rows, sum(r.get("wall_s") or 0 for r in done + rows)
        complete = len(rows) == len(mx.full_product())
        which = "full" if complete else f"--rows {args.rows}"
    if not args.no_docs:
        write_docs(rows, which, wall)
    return 0 if all(mx.passed(r) for r in rows) else 1


def _load_rows(path: Path) -> list[dict]:
    return json.loads(path.read_text()) if path.exists() else []


def _save_rows(path: Path, rows: list[dict]) -> None:
    """Written to a temp name, then renamed: a run killed mid-write keeps the rows it had."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(rows, indent=2))
    os.replace(tmp, path)


if __name__ == "__main__":
    sys.exit(main())
