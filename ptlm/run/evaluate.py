"""Validation loss and perplexity, and `ptlm eval`.

Perplexity = exp(token-weighted mean NLL) over every next-token prediction inside the blocks
(a block of T tokens scores T-1 predictions). Ranks take disjoint contiguous slices of the split
and the NLL sums and token counts are summed over ranks, so the figure does not depend on the
number of ranks. Only scalars are kept: never the logits (transformers #8476).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from ptlm.data.documents import DEFAULT_PACKING
from ptlm.data.reader import PackedDataset, eval_slice
from ptlm.errors import PtlmError
from ptlm.model.forward import LossModule
from ptlm.model.loss import IGNORE_INDEX, causal_lm_loss
from ptlm.model.profile import packing_mechanism
from ptlm.run.machine.distributed import all_reduce_sum

# forward(input_ids (B, T), labels (B, T), positions (B, T) or None) -> (mean, nll_sum, n_tokens)
ForwardFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], tuple]


@dataclass
class EvalResult:
    loss: float  # mean NLL per predicted token (nats)
    ppl: float
    tokens: int  # predictions scored
    blocks: int | None = None  # blocks scored (evaluate_blocks)

    def to_dict(self) -> dict:
        return asdict(self)


def result(nll_sum: float, tokens: float, blocks: int | None = None) -> EvalResult:
    """Zero scored tokens is an error, never a perfect perplexity of 1.00."""
    if tokens < 1:
        raise PtlmError("nothing was scored (0 predicted tokens): give more text or blocks, a "
                        "window of at least 2 tokens and a stride of at least 1")
    loss = nll_sum / tokens
    return EvalResult(loss=loss, ppl=math.exp(min(loss, 700.0)), tokens=int(tokens),
                      blocks=blocks)


@torch.no_grad()
def evaluate_blocks(forward: ForwardFn, dataset: PackedDataset, micro_batch: int, *,
                    rank: int = 0, world_size: int = 1, device: torch.device | str = "cpu",
                    max_blocks: int | None = None) -> EvalResult:
    """Every rank runs the same number of forwards (ZeRO-3 gathers parameters collectively, so
    an extra forward on one rank would hang the others): short slices are topped up with a
    repeated block whose labels are all ignored."""
    n = len(dataset) if max_blocks is None else min(max_blocks, len(dataset))
    if n < 1:
        raise PtlmError(f"{dataset.root} [{dataset.split}]: no block to evaluate ("
                        f"{len(dataset)} blocks, max_blocks {max_blocks}); give a split with "
                        "blocks (prepare with a larger --val-fraction) or max blocks >= 1")
    mine = eval_slice(n, world_size, rank)
    longest = len(eval_slice(n, world_size, 0))  # rank 0's slice is never shorter
    nll, count = 0.0, 0.0
    for start in range(0, longest, micro_batch):
        idx = [mine.start + i for i in range(start, min(start + micro_batch, longest))]
        real = [i < mine.stop for i in idx]
        batch = dataset.blocks_of([i if ok else mine.start if len(mine) else 0
                                   for i, ok in zip(idx, real)]).to(device)  # (B, T)
        labels = batch.input_ids.clone()
        labels[~torch.tensor(real, device=device)] = IGNORE_INDEX
        _, loss_sum, n_tokens = forward(batch.input_ids, labels, batch.positions)
        nll += float(loss_sum)
        count += float(n_tokens)
    nll, count = all_reduce_sum([nll, count], torch.device(device))
    return result(nll, count, blocks=n)


@torch.no_grad()
def evaluate_text(model, token_ids: torch.Tensor, max_length: int, stride: int,
                  chunked: bool = True) -> EvalResult:
    """Strided sliding-window perplexity of one long token sequence (the HF perplexity guide):
    each window of max_length tokens scores only the tokens not scored by the previous window,
    with up to max_length - stride tokens of context before them."""
    device = next(model.parameters()).device
    total = token_ids.numel()
    if stride < 1:
        raise PtlmError(f"--stride {stride}: the window's step must be >= 1 token")
    if max_length < 2:
        raise PtlmError(f"--max-length {max_length}: a window needs >= 2 tokens (one to predict "
                        "from, one to predict)")
    if total < 2:
        raise PtlmError(f"the text encodes to {total} token(s): nothing to predict (at least 2 "
                        "tokens needed); give a non-empty text")
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


def model_forward(model, chunked: bool = True, packing: str = DEFAULT_PACKING) -> ForwardFn:
    """The model and its loss as evaluation calls them; packing="documents" takes the blocks'
    document positions through the mechanism the model honours (decided by behaviour)."""
    mechanism = None
    if packing == "documents":
        mechanism = packing_mechanism(model.config, model.config._attn_implementation)
    return LossModule(model, chunked, mechanism)


# ------------------------------------------------------------------------------ ptlm eval
