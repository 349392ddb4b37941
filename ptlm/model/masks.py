"""transformers' SDPA attention masks as additive tensors while ptlm runs a packed forward.

Given position_ids that restart at 0 (document-aware packing), transformers builds a packed
block's mask itself (masking_utils.sdpa_mask, with its sliding windows, chunks and padding): a
bool (B, 1, T, T) tensor, built once per forward and passed to every layer. torch's SDPA turns a
bool mask into an additive one inside every call and keeps that copy for the layer's backward:
one (B, T, T) tensor per layer in the activation dtype (measured on a small Llama at T=1024,
fp32: +4,456,448 bytes per layer and sequence before this module; docs/planner.md). An additive
mask is used as given, so one tensor serves every layer. Inside `additive_sdpa_masks()`
transformers' SDPA mask function hands its mask over as 0 / the dtype's minimum, as its own
`eager_mask` does; a mask it would skip (a plain causal block: None, SDPA's is_causal kernels)
is still skipped, and which positions are masked stays transformers' logic.

The swap goes through transformers' mask registry (ALL_MASK_ATTENTION_FUNCTIONS, its
per-instance override) and is undone on exit: outside ptlm's forward, SDPA masks are bool again.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch

SDPA = "sdpa"


def _additive(bool_mask_function):
    def additive_mask(*args, dtype: torch.dtype = torch.float32, **kwargs):
        mask = bool_mask_function(*args, **kwargs)
        if mask is None or mask.dtype != torch.bool:
            return mask
        allowed = torch.zeros((), dtype=dtype, device=mask.device)
        return torch.where(mask, allowed, torch.finfo(dtype).min)

    return additive_mask


@contextmanager
def additive_sdpa_masks():
    """Within: models with SDPA attention get transformers' masks as additive tensors."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS as masks

    local = masks._local_mapping  # transformers' GeneralInterface: this instance's overrides
    had, before = SDPA in local, local.get(SDPA)
    masks[SDPA] = _additive(masks[SDPA])
    try:
        yield
    finally:
        if had:
            masks[SDPA] = before
        else:
            del masks[SDPA]
