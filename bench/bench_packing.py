"""What document-aware packing changes (issue 16): the same small model trained on real short
documents for the same tokens, once on packed blocks as one stream (every token attends to the
documents packed before it, positions run across them) and once document-aware (each piece
attends only to itself, positions restart, no target crosses a boundary). Both are scored as a
model is used: each validation document alone, from position 0. Also each way's training
throughput on this machine.

    python bench/bench_packing.py [--steps 150] [--families llama,opt]   # ~20 min on 2 cores

Data: paragraphs of Machado de Assis (../shared/data/pt; the works are hard-wrapped, a paragraph
ends on a short line ending a sentence: short real documents, many of them dialogue lines), a BPE
trained on them, packed at seq 128 by ptlm prepare.
The loop is plain PyTorch over ptlm's loss and packing inputs (ptlm.model.loss,
ptlm.model.packing), so only the packing differs between the two runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ptlm, bench.* of this checkout

from bench.common import SHARED, machine  # noqa: E402

from ptlm.data.documents import DocumentIndex  # noqa: E402
from ptlm.data.prepare import PrepareConfig, prepare  # noqa: E402
from ptlm.data.reader import PackedDataset  # noqa: E402
from ptlm.model.loss import causal_lm_loss  # noqa: E402
from ptlm.model.packing import choose_mechanism, labels_for, model_inputs  # noqa: E402

SEQ = 128
BATCH = 16
VOCAB = 4096  # a BPE trained on the corpus: the head's cost does not drown the model's
LR = 1e-3
MAX_PARAGRAPHS = 20_000
MIN_PARAGRAPH_CHARS = 40
PARAGRAPH_END = (".", "!", "?", "»", '"', ":")
SHORT_LINE = 70  # characters: a wrapped line is ~75-80
VAL_DOCS_SCORED = 400
MODELS = {
    "llama": dict(model_type="llama", hidden_size=256, intermediate_size=688,
                  num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=SEQ),
    "opt": dict(model_type="opt", hidden_size=256, ffn_dim=1024, num_hidden_layers=4,
                num_attention_heads=4, max_position_embeddings=SEQ, word_embed_proj_dim=256,
                dropout=0.0),
}


def paragraphs_corpus(dest: Path) -> Path:
    source = SHARED / "data" / "pt" / "machado_de_assis.jsonl"
    if not source.exists():
        sys.exit(f"needs {source} (set PTLM_SHARED)")
    out = dest / "paragraphs.jsonl"
    n = 0
    with open(source, encoding="utf-8") as f, open(out, "w", encoding="utf-8") as g:
        for line in f:
            for para in paragraphs(json.loads(line)["text"]):
                if len(para) >= MIN_PARAGRAPH_CHARS and n < MAX_PARAGRAPHS:
                    g.write(json.dumps({"text": para}, ensure_ascii=False) + "\n")
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


def build(family: str, vocab: int):
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(MODELS[family])
    config = AutoConfig.for_model(fields.pop("model_type"), vocab_size=vocab, **fields)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa")


def train(model, data: PackedDataset, index: DocumentIndex, steps: int, documents: bool) -> float:
    """Train in place; returns tokens/s."""
    mechanism = choose_mechanism(model) if documents else None
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    order = np.random.default_rng(0).permutation(len(data))
    model.train()
    tokens, t0 = 0, time.perf_counter()
    for step in range(steps):
        blocks = order[(step * BATCH) % len(order):][:BATCH]
        ids = data.batch(blocks)
        if documents:
            positions = torch.from_numpy(index.positions(blocks))
            loss = causal_lm_loss(model, ids, labels_for(ids, positions),
                                  packed=model_inputs(model, positions, mechanism))
        else:
            loss = causal_lm_loss(model, ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        tokens += ids.numel()
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--families", default="llama,opt")
    args = ap.parse_args()
    torch.set_num_threads(2)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = paragraphs_corpus(Path(tmp))
        data_dir = Path(tmp) / "data"
        manifest = prepare(PrepareConfig(sources=[str(corpus)], out=data_dir, seq_len=SEQ,
                                         train_tokenizer=VOCAB, val_fraction=0.05,
                                         progress=False))
        train_ds, val_ds = PackedDataset(data_dir, "train"), PackedDataset(data_dir, "val")
        lengths = train_ds.document_lengths()
        index = DocumentIndex(lengths, SEQ)
        print(f"Machine: {machine()}; date {date.today()}; torch {torch.__version__}")
        print(f"Data: {manifest['documents']} paragraphs of Machado de Assis, a {VOCAB}-id BPE "
              f"trained on them, median "
              f"{int(np.median(lengths))} tokens, {np.mean(lengths < SEQ):.0%} shorter than a "
              f"block; packed at seq {SEQ}: {len(train_ds)} train blocks, "
              f"{lengths.size / len(train_ds):.1f} documents per block")
        print(f"Training: {args.steps} steps x {BATCH} blocks ({args.steps * BATCH * SEQ:,} "
              f"tokens), AdamW lr {LR}, fp32, CPU; val: {VAL_DOCS_SCORED} documents scored alone\n")
        print("| model | packing | val loss, documents alone | val ppl | train tokens/s |")
        print("|---|---|---|---|---|")
        for family in args.families.split(","):
            for documents in (False, True):
                model = build(family, manifest["tokenizer"]["vocab_size"])
                tps = train(model, train_ds, index, args.steps, documents)
                loss = score_documents_alone(model, val_ds, manifest["eos_id"])
                print(f"| {family} | {'documents' if documents else 'stream'} | {loss:.4f} | "
                      f"{math.exp(loss):.1f} | {tps:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
