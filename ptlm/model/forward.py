"""One forward of a training or evaluation step: the HF model, the inputs that make a packed
block separate documents (ptlm.model.packing) and the loss (ptlm.model.loss), as one module.

DeepSpeed wraps `LossModule`, so one engine(...) call runs the whole forward through DeepSpeed
(its hooks, ZeRO-3 gathering, precision handling); evaluation without DeepSpeed (`ptlm eval`)
calls the same module directly.
"""

from __future__ import annotations

import torch
from torch import nn

from ptlm.errors import PtlmError
from ptlm.model.loss import causal_lm_loss
from ptlm.model.packing import labels_for, model_inputs


class LossModule(nn.Module):
    """model + loss. mechanism: how the model is told where documents start (see
    ptlm.model.packing.mechanism_for); None when blocks are one stream."""

    def __init__(self, model: nn.Module, chunked: bool, mechanism: str | None = None) -> None:
        super().__init__()
        self.model = model
        self.chunked = chunked
        self.mechanism = mechanism

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                positions: torch.Tensor | None = None):  # -> (mean NLL, NLL sum, counted tokens)
        """input_ids, labels (-100 = not scored; default input_ids), positions: (B, T); positions
        (each token's place in its document piece) make the block separate documents."""
        packed = None
        if positions is not None:
            if self.mechanism is None:
                raise PtlmError("internal: document positions given to a model set up for "
                                "stream packing")
            labels = labels_for(input_ids if labels is None else labels, positions)
            packed = model_inputs(self.model, positions, self.mechanism)
        return causal_lm_loss(self.model, input_ids, labels, chunked=self.chunked,
                              with_counts=True, packed=packed)
