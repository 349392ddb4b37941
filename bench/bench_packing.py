"""What document-aware packing changes (issue 16): the same small model trained on real short
documents for the same tokens, once on packed blocks as one stream (every token attends to the
documents packed before it, positions run across them) and once document-aware (each piece
attends only to itself, positions restart, no target crosses a boundary). Both are scored as a
model is used: each validation document alone, from position 0. Also each way's training
throughput on this machine.

    python bench/bench_packing.py [--steps 300] [--families llama,opt] [--seeds 0,1]
                                  [--unit sentences|paragraphs]     # ~30 min on 2 cores

Data: sentences (default; the issue's case: several ~25-token documents per block) or paragraphs
of Machado de Assis (../shared/data/pt; the works are hard-wrapped, a paragraph ends on a short
line ending a sentence), a BPE trained on them, packed at seq 128 by ptlm prepare.
The step is ptlm's own forward (ptlm.model.forward.LossModule: the loss, and the packed
documents through the mechanism ptlm.model.profile.packing_mechanism finds) in a plain AdamW
loop, so only the packing differs between the two runs of a seed (same init, same blocks).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ptlm, bench.* of this checkout

from bench.common import SHARED, machine  # noqa: E402

from ptlm.data.prepare import PrepareConfig, prepare  # noqa: E402
from ptlm.data.reader import PackedDataset  # noqa: E402
from ptlm.model.forward import LossModule  # noqa: E402
from ptlm.model.profile import packing_mechanism  # noqa: E402

SEQ = 128
BATCH = 16
VOCAB = 4096  # a BPE trained on the corpus: the head's cost does not drown the model's
LR = 1e-3
MAX_DOCUMENTS = 40_000
MIN_PARAGRAPH_CHARS = 40
PARAGRAPH_END = (".", "!", "?", "»", '"', ":")
SHORT_LINE = 70  # characters: a wrapped line is ~75-80
SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-ZÀ-Ú—«\"])")  # a sentence ends, the next begins
MIN_SENTENCE_CHARS = 20
VAL_DOCS_SCORED = 400
MODELS = {
    "llama": dict(model_type="llama", hidden_size=256, intermediate_size=688,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=SEQ),
    "opt": dict(model_type="opt", hidden_size=256, ffn_dim=1024, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=SEQ, word_embed_proj_dim=256,
                dropout=0.0),
}


def documents_corpus(dest: Path, unit: str) -> Path:
    """The corpus as one short real document per line: paragraphs, or the sentences of them."""
    source = SHARED / "data" / "pt" / "machado_de_assis.jsonl"
    if not source.exists():
        sys.exit(f"needs {source} (set PTLM_SHARED)")
    out = dest / f"{unit}.jsonl"
    n = 0
    shortest = MIN_SENTENCE_CHARS if unit == "sentences" else MIN_PARAGRAPH_CHARS
    with open(source, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            for para in paragraphs(json.loads(line)["text"]):
                for doc in SENTENCE_END.split(para) if unit == "sentences" else [para]:
                    if len(doc) >= shortest and n < MAX_DOCUMENTS:
                        g.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
                        n += 1
    return out


def paragraphs(text: str):
    """The works are hard-wrapped at ~80 columns with no blank lines: a paragraph ends on a short
    line that ends a sentence."""
    lines = []
    for line in text.splitlines():
        lines.append(line.strip())
        if line.rstrip().endswith(PARAGRAPH_END) and len(line) < SHORT_LINE:
            yield " ".join(x for x in lines if x)
            lines = []
    if lines:
        yield " ".join(x for x in lines if x)


def build(family: str, vocab: int, seed: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(MODELS[family])
    config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=vocab, **fields)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def train(model, data: PackedDataset, steps: int, documents: bool, seed: int) -> float:
    """Train in place; returns tokens/s."""
    mechanism = packing_mechanism(model.config, "sdpa") if documents else None
    step_fn = LossModule(model, chunked=True, mechanism=mechanism)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    order = np.random.default_rng(seed).permutation(len(data))
    model.train()
    tokens, t0 = 0, time.perf_counter()
    for step in range(steps):
        blocks = order[(step * BATCH) % len(order):][:BATCH]
        batch = data.blocks_of(blocks)
        loss, _, _ = step_fn(batch.input_ids, None, batch.positions if documents else None)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += batch.input_ids.numel()
    return tokens / (time.perf_counter() - t0)


@torch.no_grad()
def score_documents_alone(model, val: PackedDataset, eos: int) -> float:
    """Token-weighted mean NLL of whole validation documents, each run alone from position 0
    (plain transformers forward), the way a model meets text at inference."""
    model.eval()
    stream = val.batch(np.arange(len(val))).reshape(-1).numpy()
    ends = np.flatnonzero(stream == eos)
    starts = np.concatenate([[0], ends[:-1] + 1])
    nll, n = 0.0, 0
    for a, b in list(zip(starts, ends + 1))[:VAL_DOCS_SCORED]:
        doc = torch.from_numpy(stream[a:b].astype(np.int64))[None]
        if doc.shape[1] < 2 or doc.shape[1] > SEQ:
            continue
        loss = model(input_ids=doc, labels=doc).loss.item()
        nll += loss * (doc.shape[1] - 1)
        n += doc.shape[1] - 1
    return nll / n


def paired_throughput(family: str, data: PackedDataset, vocab: int, rounds: int) -> dict:
    """Training tokens/s of each way measured in alternation (stream, documents, stream, ...) on
    one model, so a machine's varying load hits both alike: the median per way."""
    model = build(family, vocab, 0)
    steps = {False: LossModule(model, chunked=True), True: LossModule(
        model, chunked=True, mechanism=packing_mechanism(model.config, "sdpa"))}
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    model.train()
    times = {False: [], True: []}
    for r in range(rounds + 1):  # round 0 warms up
        for documents in (False, True):
            batch = data.blocks_of(np.arange(r * BATCH, (r + 1) * BATCH) % len(data))
            t0 = time.perf_counter()
            loss, _, _ = steps[documents](batch.input_ids, None,
                                          batch.positions if documents else None)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            if r:
                times[documents].append(time.perf_counter() - t0)
    return {("documents" if d else "stream"): BATCH * SEQ / float(np.median(t))
            for d, t in times.items()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--families", default="llama,opt")
    ap.add_argument("--seeds", default="0,1", help="init and data order; each seed trains both ways")
    ap.add_argument("--unit", choices=("sentences", "paragraphs"), default="sentences")
    ap.add_argument("--throughput-only", type=int, metavar="ROUNDS", default=None,
                    help="only the paired throughput: ROUNDS steps of each way, alternating")
    args = ap.parse_args()
    torch.set_num_threads(2)
    seeds = [int(x) for x in args.seeds.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        corpus = documents_corpus(Path(tmp), args.unit)
        data_dir = Path(tmp) / "data"
        manifest = prepare(PrepareConfig(sources=[str(corpus)], out=data_dir, seq_len=SEQ,
                                         train_tokenizer=VOCAB, val_fraction=0.05,
                                         progress=False))
        train_ds, val_ds = PackedDataset(data_dir, "train"), PackedDataset(data_dir, "val")
        lengths = train_ds.document_lengths()
        print(f"Machine: {machine()}; date {date.today()}; torch {torch.__version__}")
        print(f"Data: {manifest['documents']} {args.unit} of Machado de Assis, a {VOCAB}-id BPE "
              f"trained on them, median "
              f"{int(np.median(lengths))} tokens, {np.mean(lengths < SEQ):.0%} shorter than a "
              f"block; packed at seq {SEQ}: {len(train_ds)} train blocks, "
              f"{lengths.size / len(train_ds):.1f} documents per block")
        if args.throughput_only:
            print("| model | stream tokens/s | documents tokens/s | documents / stream |")
            print("|---|---|---|---|")
            for family in args.families.split(","):
                tps = paired_throughput(family, train_ds, manifest["tokenizer"]["vocab_size"],
                                        args.throughput_only)
                print(f"| {family} | {tps['stream']:,.0f} | {tps['documents']:,.0f} | "
                      f"{tps['documents'] / tps['stream']:.2f} |", flush=True)
            return
        print(f"Training: {args.steps} steps x {BATCH} blocks ({args.steps * BATCH * SEQ:,} "
              f"tokens), AdamW lr {LR}, fp32, CPU; val: {VAL_DOCS_SCORED} documents scored "
              f"alone; seeds {args.seeds}\n")
        print("| model | seed | packing | val loss, documents alone | val ppl | train tokens/s |")
        print("|---|---|---|---|---|---|")
        for family in args.families.split(","):
            gaps = []
            for seed in seeds:
                result = {}
                for documents in (False, True):
                    model = build(family, manifest["tokenizer"]["vocab_size"], seed)
                    tps = train(model, train_ds, args.steps, documents, seed)
                    loss = score_documents_alone(model, val_ds, manifest["eos_id"])
                    result[documents] = loss
                    print(f"| {family} | {seed} | {'documents' if documents else 'stream'} | "
                          f"{loss:.4f} | {math.exp(loss):.1f} | {tps:,.0f} |", flush=True)
                gaps.append(result[True] - result[False])
            print(f"| {family} | mean | documents - stream | {np.mean(gaps):+.4f} "
                  f"(per seed: {', '.join(f'{g:+.4f}' for g in gaps)}) | | |", flush=True)


if __name__ == "__main__":
    main()
