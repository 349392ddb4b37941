"""`ptlm prepare` vs the Hugging Face recipe vs the tokenizer alone, on the same corpus.

    python bench/bench_prepare.py [--corpus ../shared/data/pt/machado_de_assis.jsonl]
                                  [--tokenizer ../shared/data/tokenizers/gpt2] [--seq-len 1024]

Each contender runs in its own fresh process; peak RSS is the sampled sum over its process tree
(workers included). Prints a markdown table for docs/benchmarks.md.
  - tokenizer alone: the Rust tokenizer's encode_batch_fast over the texts already in memory
    (the practical limit: no reading, packing or writing);
  - HF recipe: datasets.load_dataset("json") + map(tokenize, batched, num_proc) + run_clm's
    group_texts + save_to_disk;
  - ptlm prepare, on the corpus and on the corpus replicated 10x (flat memory check).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ptlm, bench.* of this checkout
from bench.common import ROOT, SHARED, machine, run_measured  # noqa: E402

TOKENIZER_ALONE = r"""
import json, sys, time
from tokenizers import Tokenizer
corpus, tok_dir = sys.argv[1], sys.argv[2]
texts = [json.loads(l)["text"] for l in open(corpus, encoding="utf-8") if l.strip()]
tok = Tokenizer.from_file(tok_dir + "/tokenizer.json")
t0 = time.perf_counter()
# the tokenizer at its best: one call over every text, all cores, memory no object
n = sum(len(e.ids) for e in tok.encode_batch_fast(texts, add_special_tokens=False))
print(json.dumps({"tokens": n + len(texts), "seconds": time.perf_counter() - t0}))
"""

HF_RECIPE = r"""
import json, sys, time
from itertools import chain
t0 = time.perf_counter()
import datasets
from transformers import AutoTokenizer
corpus, tok_dir, block, out, num_proc, cache = sys.argv[1:7]
block, num_proc = int(block), int(num_proc)
tok = AutoTokenizer.from_pretrained(tok_dir)
raw = datasets.load_dataset("json", data_files=corpus, split="train", cache_dir=cache)
def tokenize(ex):  # run_clm.py, plus the EOS per document that packing needs
    return tok([t + tok.eos_token for t in ex["text"]])
tokd = raw.map(tokenize, batched=True, num_proc=num_proc, remove_columns=raw.column_names)
def group_texts(examples):  # run_clm.py's group_texts, verbatim in substance
    concatenated = {k: list(chain(*examples[k])) for k in examples.keys()}
    total_length = len(concatenated[list(examples.keys())[0]])
    total_length = (total_length // block) * block
    result = {k: [t[i : i + block] for i in range(0, total_length, block)]
              for k, t in concatenated.items()}
    result["labels"] = result["input_ids"].copy()
    return result
lm = tokd.map(group_texts, batched=True, num_proc=num_proc)
lm.save_to_disk(out)
n_tokens = sum(len(x) for x in tokd["input_ids"])
print(json.dumps({"tokens": n_tokens, "blocks": len(lm), "seconds": time.perf_counter() - t0}))
"""


def replicate(corpus: Path, times: int, dest: Path) -> Path:
    data = corpus.read_bytes()
    with open(dest, "wb") as f:
        for _ in range(times):
            f.write(data)
    return dest


REPEATS = 3  # ptlm runs: the median wall time and peak RSS (thread timing moves the peak ±5%)


def ptlm_prepare(corpus: Path, tok: Path, seq_len: int, out: Path) -> dict:
    runs = []
    for _ in range(REPEATS):
        runs.append(run_measured([sys.executable, "-m", "ptlm.cli", "prepare", str(corpus),
                                  "--tokenizer", str(tok), "--seq-len", str(seq_len), "--out",
                                  str(out), "--overwrite", "--no-progress"]))
        manifest = json.loads((out / "manifest.json").read_text())
        runs[-1]["tokenize_s"] = manifest["timing_s"]["tokenize"]
    return {"wall_s": statistics.median(r["wall_s"] for r in runs),
            "peak_rss": statistics.median(r["peak_rss"] for r in runs),
            "tokens": manifest["tokens"],
            "tokenize_s": statistics.median(r["tokenize_s"] for r in runs)}


def row(name: str, r: dict, tokens: int, ref: dict | None = None) -> str:
    tps = tokens / r["wall_s"]
    rel = f"{tps / (ref['tokens'] / ref['wall_s']):.2f}×" if ref else "1.00×"
    return (f"| {name} | {r['wall_s']:.2f} | {tokens / 1e6:.2f} M | {tps / 1e6:.3f} M | {rel} | "
            f"{r['peak_rss'] / 2**20:.0f} MiB |")


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", type=Path, default=SHARED / "data/pt/machado_de_assis.jsonl")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "data/tokenizers/gpt2")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--hf-num-proc", type=int, default=2)
    p.add_argument("--replicate", type=int, default=10)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        alone = run_measured([sys.executable, "-c", TOKENIZER_ALONE, str(args.corpus),
                              str(args.tokenizer)])
        alone.update(json.loads(alone["stdout"]))
        # the tokenizer-alone figure is its encode time only; wall_s for the table uses that
        alone_row = {**alone, "wall_s": alone["seconds"]}
        hf = run_measured([sys.executable, "-c", HF_RECIPE, str(args.corpus), str(args.tokenizer),
                           str(args.seq_len), str(tmp / "hf"), str(args.hf_num_proc),
                           str(tmp / "hf_cache")])
        hf.update(json.loads(hf["stdout"]))
        ours = ptlm_prepare(args.corpus, args.tokenizer, args.seq_len, tmp / "ptlm")
        big = replicate(args.corpus, args.replicate, tmp / f"x{args.replicate}.jsonl")
        ours_big = ptlm_prepare(big, args.tokenizer, args.seq_len, tmp / "ptlm_big")
    ref = {"tokens": hf["tokens"], "wall_s": hf["wall_s"]}
    print(f"\nMachine: {machine()}; date {date.today()}")
    print(f"Corpus: {args.corpus.name}, tokenizer {args.tokenizer.name}, seq_len {args.seq_len}\n")
    print("| contender | wall s | tokens | tokens/s | vs HF recipe | peak RSS |")
    print("|---|---|---|---|---|---|")
    print(row("tokenizer alone (encode only, texts in RAM)", alone_row, alone["tokens"], ref))
    print(row(f"HF recipe (map num_proc={args.hf_num_proc} + group_texts + save_to_disk)", hf,
              hf["tokens"], ref))
    print(row(f"ptlm prepare (median of {REPEATS})", ours, ours["tokens"], ref))
    print(row(f"ptlm prepare, corpus ×{args.replicate} (median of {REPEATS})", ours_big,
              ours_big["tokens"], ref))
    tps = lambda r: r["tokens"] / r["wall_s"]
    print(f"\nptlm / HF recipe tokens/s: {tps(ours) / tps(ref):.2f}× (goal ≥ 1.0)")
    print(f"ptlm / tokenizer alone tokens/s: {tps(ours) / tps(alone_row):.2f}× on the corpus, "
          f"{tps(ours_big) / tps(alone_row):.2f}× on it ×{args.replicate} (goal ≥ 0.8; ptlm's "
          "figure is end-to-end wall time, process start and tokenizer load included)")
    pass1 = lambda r: r["tokens"] / r["tokenize_s"]  # noqa: E731
    print(f"ptlm's tokenizing pass (read + encode + write, from the manifest's timing) / "
          f"tokenizer alone: {pass1(ours) / tps(alone_row):.2f}× on the corpus, "
          f"{pass1(ours_big) / tps(alone_row):.2f}× on it ×{args.replicate}")
    print(f"ptlm / HF recipe peak RSS: {ours['peak_rss'] / hf['peak_rss']:.2f}× (goal ≤ 0.5)")
    print(f"ptlm peak RSS ×{args.replicate} corpus / ×1: "
          f"{ours_big['peak_rss'] / ours['peak_rss']:.3f} (goal within ±10%)")


if __name__ == "__main__":
    main()
