"""Reader throughput on ONE core: ptlm's PackedDataset + PackedLoader vs datasets.load_from_disk +
a torch DataLoader (the HF recipe's output), on the same corpus packed at the same seq_len.

    python bench/bench_reader.py [--corpus ...machado_de_assis.jsonl] [--tokenizer ...gpt2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ptlm, bench.* of this checkout
from bench.bench_prepare import HF_RECIPE  # noqa: E402
from bench.common import ROOT, SHARED, machine  # noqa: E402

MIN_SECONDS = 3.0  # iterate whole epochs until at least this long


def timed_epochs(make_iter) -> tuple[float, int]:
    tokens, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < MIN_SECONDS:
        for batch in make_iter():
            tokens += getattr(batch, "input_ids", batch).numel()  # ptlm's Batch or a tensor
    return tokens / (time.perf_counter() - t0), tokens


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", type=Path, default=SHARED / "data/pt/machado_de_assis.jsonl")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "data/tokenizers/gpt2")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "ptlm.cli", "prepare", str(args.corpus),
                        "--tokenizer", str(args.tokenizer), "--seq-len", str(args.seq_len),
                        "--out", str(tmp / "ptlm"), "--no-progress"], check=True, cwd=ROOT,
                       stdout=subprocess.DEVNULL)
        subprocess.run([sys.executable, "-c", HF_RECIPE, str(args.corpus), str(args.tokenizer),
                        str(args.seq_len), str(tmp / "hf"), "2", str(tmp / "cache")], check=True,
                       stdout=subprocess.DEVNULL)
        os.sched_setaffinity(0, {0})  # one core, after the preparation
        import datasets
        import torch

        from ptlm.data.reader import PackedDataset, PackedLoader

        torch.set_num_threads(1)
        ds = PackedDataset(tmp / "ptlm", "train")
        loader = PackedLoader(ds, args.batch, seed=0)
        ours, _ = timed_epochs(lambda: loader)
        per_item, _ = timed_epochs(lambda: torch.utils.data.DataLoader(
            ds, batch_size=args.batch, shuffle=True, drop_last=True))
        hf_ds = datasets.load_from_disk(str(tmp / "hf")).with_format("torch",
                                                                     columns=["input_ids"])
        hf, _ = timed_epochs(lambda: (b["input_ids"] for b in torch.utils.data.DataLoader(
            hf_ds, batch_size=args.batch, shuffle=True, drop_last=True)))
    print(f"\nMachine: {machine()}, pinned to 1 core; date {date.today()}")
    print(f"{args.corpus.name}, seq_len {args.seq_len}, batch {args.batch}, shuffled\n")
    print("| reader | tokens/s | vs HF |")
    print("|---|---|---|")
    for name, v in [("ptlm PackedDataset + PackedLoader", ours),
                    ("ptlm PackedDataset + torch DataLoader (per-item)", per_item),
                    ("datasets.load_from_disk + torch DataLoader", hf)]:
        print(f"| {name} | {v / 1e6:.1f} M | {v / hf:.1f}× |")
    print(f"\ngoal ≥ 20 M tokens/s on one core: {'met' if ours >= 20e6 else 'NOT met'}")


if __name__ == "__main__":
    main()
