"""Document-aware packing on the model side: inside a packed block each document piece attends
only to its own earlier tokens, with positions from 0, and no token is a target across a
boundary. `ptlm.data.documents.DocumentIndex` gives each token's position in its piece; this
module turns positions into what the model's transformers code honours.

transformers 5.x builds a block-causal mask from `position_ids` (restarting at 0) when no
attention_mask is given, for the models whose mask code receives them (GPT-2, Llama and most
recent families), and flash-attention runs them as variable-length sequences. OPT's does not
pass position_ids to its mask (it would attend across documents): it gets an explicit 4-D mask
in its attention's format. Which way a model goes is decided by behaviour, not by family name
(`choose_mechanism`): a packed example must score exactly as its documents scored one by one.
"""

from __future__ import annotations

import torch

from ptlm.errors import PtlmError
from ptlm.model.loss import IGNORE_INDEX
from ptlm.model.masks import additive_sdpa_masks

MECHANISMS = ("position_ids", "mask")
STAND_IN_DOCUMENTS_PER_BLOCK = 4
# The self-check: two documents of these lengths packed into one row, with a one-token document.
CHECK_DOCUMENTS = (5, 1, 6)
CHECK_TOLERANCE = 1e-4  # relative, per token; the check runs in the model's dtype
# 16-bit check models (flash-attention runs only in bf16/fp16): rounding, not leaks, differs.
# The exact-zero gradient test (_isolated) is what catches a leak in any dtype.
CHECK_TOLERANCE_16BIT = 3e-2


def labels_for(input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Next-token labels on packed documents: a token that starts a piece (position 0) is never a
    target, so no prediction crosses a boundary; a document's EOS still is one."""
    return input_ids.masked_fill(positions == 0, IGNORE_INDEX)


def block_causal_mask(positions: torch.Tensor, attn_implementation: str,
                      dtype: torch.dtype) -> torch.Tensor:
    """(B, 1, T, T) additive mask in the model's dtype: 0 where query i may attend key j (both
    in one piece, j <= i), the dtype's minimum elsewhere.

    Additive, not bool, for SDPA too: SDPA turns a bool mask into an additive one inside every
    call and keeps each copy for the backward, one (B, T, T) tensor per layer (measured: +T*T*4
    bytes per layer and sequence in fp32); an additive mask is used as given, one copy shared
    by every layer."""
    if attn_implementation not in ("sdpa", "eager"):
        raise PtlmError(f"{attn_implementation} attention takes packed documents through "
                        "position_ids only; this model ignores them: use --attn sdpa or eager")
    piece = torch.cumsum(positions == 0, dim=-1)  # (B, T) piece number inside the block
    same = piece[:, :, None] == piece[:, None, :]  # (B, T, T)
    allowed = same.tril()[:, None]  # (B, 1, T, T)
    return torch.zeros(allowed.shape, dtype=dtype, device=positions.device).masked_fill(
        ~allowed, torch.finfo(dtype).min)


def model_inputs(model, positions: torch.Tensor, mechanism: str) -> dict:
    """The keyword arguments that make `model` see one packed block as separate documents."""
    if mechanism == "position_ids":
        return {"position_ids": positions}
    if mechanism == "mask":
        config = model.config
        return {"position_ids": positions,
                "attention_mask": block_causal_mask(positions, config._attn_implementation,
                                                    model.dtype)}
    raise PtlmError(f"packing mechanism {mechanism!r} is not one of {MECHANISMS}")


def stand_in_positions(batch: int, seq_len: int, device=None) -> torch.Tensor:
    """(batch, seq_len) positions of STAND_IN_DOCUMENTS_PER_BLOCK equal documents per block:
    for measuring a step without data (the probe, memtrace). The memory the documents cost
    (the mask, the repeated k and v) does not depend on where they start."""
    piece = max(1, seq_len // STAND_IN_DOCUMENTS_PER_BLOCK)
    return (torch.arange(seq_len, device=device) % piece).expand(batch, -1)


def positions_of(lengths) -> torch.Tensor:
    """(1, sum(lengths)) positions restarting at 0 for documents of these lengths."""
    return torch.cat([torch.arange(n) for n in lengths])[None]


def per_token_nll(model, input_ids: torch.Tensor, labels: torch.Tensor, **kwargs) -> torch.Tensor:
    """(B, T-1) next-token NLL, 0 where the target is ignored: the model's own logits."""
    logits = model(input_ids=input_ids, use_cache=False, **kwargs).logits.float()
    targets = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2),
                                            targets.clamp(min=0), reduction="none")
    return nll * (targets != IGNORE_INDEX)


def _isolated(model, ids: torch.Tensor, inputs: dict) -> bool:
    """Whether the last document's outputs depend on no earlier document's inputs: their gradient
    with respect to the earlier input embeddings is exactly zero, in any dtype and for any weights
    (a loss comparison alone misses a small leak: an LFM2 convolution reaching into the previous
    document moved a random model's loss by 3e-6 but its conv gradients by 50%)."""
    last = CHECK_DOCUMENTS[-1]
    with torch.enable_grad():
        embeds = model.get_input_embeddings()(ids).detach().requires_grad_(True)
        hidden = model.base_model(inputs_embeds=embeds, use_cache=False, **inputs)[0]
        # a random projection, not a plain sum: a final LayerNorm at its initial weights makes
        # each token's features sum to exactly 0, whatever the inputs (a zero gradient)
        weights = torch.randn(hidden[:, -last:].shape, generator=torch.Generator().manual_seed(0))
        (grad,) = torch.autograd.grad((hidden[:, -last:].float() * weights.to(hidden.device)).sum(),
                                      embeds)
    return bool((grad[:, :-last] == 0).all()) and bool(grad[:, -last:].abs().sum() > 0)


@torch.no_grad()
def choose_mechanism(model) -> str:
    """The cheapest way this model honours packed documents, found by running it: a row of
    CHECK_DOCUMENTS packed must give each token the loss it gets with its document alone.
    PtlmError if neither position_ids nor an explicit mask does (an attention implementation
    that cannot take either)."""
    device = next(model.parameters()).device
    vocab = model.get_input_embeddings().weight.shape[0]
    total = sum(CHECK_DOCUMENTS)
    ids = (torch.arange(total, device=device)[None] * 7919 + 13) % vocab  # (1, total)
    positions = positions_of(CHECK_DOCUMENTS).to(device)
    labels = labels_for(ids, positions)
    was_training = model.training
    model.eval()  # no dropout: both ways see the same network
    # the masks training's forward gives the model (ptlm.model.loss.causal_lm_loss)
    with additive_sdpa_masks():
        try:
            alone, start = [], 0
            for n in CHECK_DOCUMENTS:
                piece = ids[:, start:start + n]
                alone.append(per_token_nll(model, piece, piece) if n > 1 else ids.new_zeros(1, 0))
                alone.append(torch.zeros(1, 1, device=device))  # the next piece's first token
                start += n
            reference = torch.cat(alone, dim=1)[:, :total - 1]
            for mechanism in MECHANISMS:
                try:
                    inputs = model_inputs(model, positions, mechanism)
                except PtlmError:
                    continue
                packed = per_token_nll(model, ids, labels, **inputs)
                tol = CHECK_TOLERANCE if model.dtype == torch.float32 else CHECK_TOLERANCE_16BIT
                if (torch.allclose(packed, reference, rtol=tol, atol=tol)
                        and _isolated(model, ids, inputs)):
                    return mechanism
        finally:
            model.train(was_training)
    raise PtlmError(f"{type(model).__name__} ({model.config._attn_implementation} attention) "
                    "scores packed documents differently from the documents alone with either "
                    "position_ids or an explicit mask: train it with --packing stream")
