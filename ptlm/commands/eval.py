"""`ptlm eval`: validation loss and perplexity of a model on prepared data or on a text file."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ptlm import hub
from ptlm.data import PackedDataset
from ptlm.data.documents import DEFAULT_PACKING, PACKINGS
from ptlm.errors import PtlmError
from ptlm.model.config import max_positions
from ptlm.model.positions import check_length
from ptlm.run.evaluate import evaluate_blocks, evaluate_text, model_forward
from ptlm.run.preflight import tokenizer_problems


DEFAULT_STRIDE = 512  # tokens; each window re-reads max_length - stride tokens of context


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF model folder or hub name (or a ptlm export)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--data", type=Path, help="a folder written by `ptlm prepare`")
    src.add_argument("--text", nargs="+", type=Path, help="raw text files (joined by a blank "
                     "line), scored with a strided sliding window")
    p.add_argument("--split", default="val")
    p.add_argument("--packing", choices=PACKINGS, default=DEFAULT_PACKING,
                   help="for --data: documents (default, as ptlm trains): each document in a "
                        "block is scored on itself alone; stream: a block is one sequence")
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--max-blocks", type=int, help="evaluate only the first N blocks")
    p.add_argument("--tokenizer", help="for --text: tokenizer (default: the model folder's)")
    p.add_argument("--max-length", type=int, help="for --text: window (default: model positions)")
    p.add_argument("--stride", type=int, help=f"for --text: window step (default: "
                   f"{DEFAULT_STRIDE}, or the window when it is shorter); at most --max-length")
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--json", action="store_true")


def run(args) -> int:
    from ptlm.model.load import load_model  # transformers: deferred to the command's run

    for flag, value in (("--stride", args.stride), ("--micro-batch", args.micro_batch),
                        ("--max-blocks", args.max_blocks), ("--max-length", args.max_length)):
        if value is not None and value < 1:
            raise PtlmError(f"{flag} {value}: must be >= 1")
    hub.require("--model", args.model)  # offline: at once, not after transformers' retries
    if args.text and args.tokenizer:
        hub.require("--tokenizer", args.tokenizer, "tokenizer")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, precision=args.precision).to(device).eval()
    positions = max_positions(model.config)
    if args.data:
        dataset = PackedDataset(args.data, args.split, packing=args.packing)
        _check_data_tokenizer(args.model, model, dataset)
        check_length(model.config, dataset.seq_len, f"{args.data}'s blocks of "
                     f"{dataset.seq_len} tokens", f"model {args.model}",
                     lambda n: f"prepare the data again with --seq-len {n} or less")
        res = evaluate_blocks(model_forward(model, packing=args.packing), dataset,
                              args.micro_batch, device=device,
                              max_blocks=args.max_blocks)
        scored = f"{res.blocks} of {len(dataset)}" if res.blocks != len(dataset) else res.blocks
        what = (f"{args.data} [{args.split}], {scored} blocks of {dataset.seq_len}, "
                f"{args.packing} packing")
    else:
        from transformers import AutoTokenizer

        if args.max_length is not None:
            check_length(model.config, args.max_length, f"--max-length {args.max_length}",
                         f"model {args.model}", lambda n: f"give --max-length {n} or less")
        tok = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
        try:
            text = "\n\n".join(p.read_text(encoding="utf-8") for p in args.text)
        except (OSError, UnicodeDecodeError) as e:
            raise PtlmError(f"--text: cannot read {e}") from None
        ids = torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
        if ids.numel() and int(ids.max()) >= model.get_input_embeddings().weight.shape[0]:
            raise PtlmError(f"the tokenizer gives id {int(ids.max())}, above the "
                            f"{model.get_input_embeddings().weight.shape[0]} embedding rows of "
                            f"{args.model}: give the model's own tokenizer")
        max_length = args.max_length or positions or 1024
        if args.stride is not None and args.stride > max_length:  # windows would skip tokens
            raise PtlmError(f"--stride {args.stride} is above --max-length {max_length} (the "
                            "window): tokens between windows would not be scored; give "
                            f"--stride {max_length} or less")
        stride = args.stride or min(DEFAULT_STRIDE, max_length)
        res = evaluate_text(model, ids, max_length, stride)
        what = f"{len(args.text)} text file(s), window {max_length}, stride {stride}"
    if args.json:
        print(json.dumps({"model": args.model, "what": what, **res.to_dict()}))
    else:
        print(f"{args.model} on {what}: loss {res.loss:.4f}, perplexity {res.ppl:.2f} "
              f"({res.tokens:,} predicted tokens)")
    return 0


def _check_data_tokenizer(spec: str, model, dataset: PackedDataset) -> None:
    """The data must be in the model's token ids (ptlm.run.preflight.tokenizer_problems, the
    check training makes): else the perplexity would mean nothing."""
    problems = tokenizer_problems(spec, model.get_input_embeddings().weight.shape[0], dataset)
    if problems:
        raise PtlmError("; ".join(problems) + ": the perplexity would mean nothing. Prepare the "
                        f"data with the model's tokenizer (`ptlm prepare --tokenizer {spec} ...`)")
