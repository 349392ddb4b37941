"""Validation loss and perplexity, and `ptlm eval`.

Perplexity = exp(token-weighted mean NLL) over every next-token prediction inside the blocks
(a block of T tokens scores T-1 predictions). Ranks take disjoint contiguous slices of the split
and the NLL sums and token counts are summed over ranks, so the figure does not depend on the
number of ranks. Only scalars are kept: never the logits (transformers #8476).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from ptlm.data import PackedDataset, eval_slice
from ptlm.distributed import all_reduce_sum
from ptlm.loss import IGNORE_INDEX, causal_lm_loss

# forward(input_ids (B, T), labels (B, T)) -> (mean, nll_sum, n_tokens)
ForwardFn = Callable[[torch.Tensor, torch.Tensor], tuple]


@dataclass
class EvalResult:
    loss: float  # mean NLL per predicted token (nats)
    ppl: float
    tokens: int  # predictions scored

    def to_dict(self) -> dict:
        return asdict(self)


def result(nll_sum: float, tokens: float) -> EvalResult:
    loss = nll_sum / max(tokens, 1)
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 700.0)), tokens=int(tokens))


@torch.no_grad()
def evaluate_blocks(forward: ForwardFn, dataset: PackedDataset, micro_batch: int, *,
                    rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                    max_blocks: int | None = None) -> EvalResult:
    """Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively, so
    an extra forward on one rank would hang the others): short slices are topped up with a
    repeated block whose labels are all ignored."""
    n = len(dataset) if max_blocks is None else min(max_blocks, len(dataset))
    mine = eval_slice(n, world_size, rank)
    longest = len(eval_slice(n, world_size, 0))  # rank 0's slice is never shorter
    nll, count = 0.0, 0.0
    for start in range(0, longest, micro_batch):
        idx = [mine.start + i for i in range(start, min(start + micro_batch, longest))]
        real = [i < mine.stop for i in idx]
        ids = dataset.batch([i if ok else mine.start if len(mine) else 0
                             for i, ok in zip(idx, real)]).to(device)  # (B, T)
        labels = ids.clone()
        labels[~torch.tensor(real, device=device)] = IGNORE_INDEX
        _, loss_sum, n_tokens = forward(ids, labels)
        nll += float(loss_sum)
        count += float(n_tokens)
    nll, count = all_reduce_sum([nll, count], torch.device(device))
    return result(nll, count)


@torch.no_grad()
def evaluate_text(model, token_ids: torch.Tensor, max_length: int, stride: int,
                  chunked: bool = True) -> EvalResult:
    """Strided sliding-window perplexity of one long token sequence (the HF perplexity guide):
    each window of max_length tokens scores only the tokens not scored by the previous window,
    with up to max_length - stride tokens of context before them."""
    device = next(model.parameters()).device
    total = token_ids.numel()
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, total, stride):
        end = min(begin + max_length, total)
        target_len = end - prev_end  # tokens not scored yet
        ids = token_ids[begin:end].unsqueeze(0).to(device)  # (1, L)
        labels = ids.clone()
        labels[:, :-target_len] = IGNORE_INDEX
        _, loss_sum, n_tokens = causal_lm_loss(model, ids, labels, chunked=chunked,
                                               with_counts=True)
        nll += float(loss_sum)
        count += int(n_tokens)
        prev_end = end
        if end == total:
            break
    return result(nll, count)


def model_forward(model, chunked: bool = True) -> ForwardFn:
    return lambda ids, labels: causal_lm_loss(model, ids, labels, chunked=chunked,
                                              with_counts=True)


# ------------------------------------------------------------------------------ ptlm eval

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
    from ptlm.model import load_model, model_max_positions

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
        max_length = args.max_length or model_max_positions(model.config) or 1024
        res = evaluate_text(model, ids, max_length, min(args.stride, max_length))
        what = f"{len(args.text)} text file(s), window {max_length}, stride {args.stride}"
    if args.json:
        print(json.dumps({"model": args.model, "what": what, **res.to_dict()}))
    else:
        print(f"{args.model} on {what}: loss {res.loss:.4f}, perplexity {res.ppl:.2f} "
              f"({res.tokens:,} predicted tokens)")
    return 0
