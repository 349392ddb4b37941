"""`ptlm eval`: validation loss and perplexity of a model on prepared data or on a text file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ptlm.data import PackedDataset
from ptlm.run.evaluate import evaluate_blocks, evaluate_text, model_forward


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF model folder or hub name (or a ptlm export)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="a folder written by `ptlm prepare`")
    src.add_argument("--text", nargs="+", type=Path, help="raw text files (joined by a blank "
                     "line), scored with a strided sliding window")
    p.add_argument("--split", default="val")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-blocks", type=int, help="evaluate only the first N blocks")
    p.add_argument("--tokenizer", help="for --text: tokenizer (default: the model folder's)")
    p.add_argument("--max-length", type=int, help="for --text: window (default: model positions)")
    p.add_argument("--stride", type=int, default=512, help="for --text: window step")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from ptlm.model.config import max_positions
    from ptlm.model.load import load_model

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, precision=args.precision).to(device).eval()
    if args.data:
        dataset = PackedDataset(args.data, args.split)
        res = evaluate_blocks(model_forward(model), dataset, args.micro_batch, device=device,
                              max_blocks=args.max_blocks)
        what = f"{args.data} [{args.split}], {len(dataset)} blocks of {dataset.seq_len}"
    else:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        text = "\n\n".join(p.read_text(encoding="utf-8") for p in args.text)
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"])
        max_length = args.max_length or max_positions(model.config) or 1024
        res = evaluate_text(model, ids, max_length, min(args.stride, max_length))
        what = f"{len(args.text)} text file(s), window {max_length}, stride {args.stride}"
    if args.json:
        print(json.dumps({"model": args.model, "what": what, **res.to_dict()}))
    else:
        print(f"{args.model} on {what}: loss {res.loss:.4f}, perplexity {res.ppl:.2f} "
              f"({res.tokens:,} predicted tokens)")
    return 0
