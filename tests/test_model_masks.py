"""ptlm.model.masks: inside ptlm's forward, the masks transformers builds are additive, shared by
every layer; the scores are plain transformers' and the windows transformers' own."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch.distributed._tools.mem_tracker import MemTracker
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

from bench.matrix_reference import pieces_nll
from ptlm.model.loss import causal_lm_loss
from ptlm.model.masks import additive_sdpa_masks
from ptlm.model.packing import choose_mechanism, labels_for, model_inputs, positions_of
from tests.families import FAMILIES

LAYERS, BATCH, SEQ = 4, 2, 256
DOCUMENTS = [100, 1, 80, 75]  # one block of SEQ tokens, a one-token document among them


def _llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=LAYERS, num_attention_heads=4,
                                      num_key_value_heads=4, vocab_size=512,
                                      max_position_embeddings=SEQ)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


def _peak(model, step) -> tuple[int, torch.Tensor, list]:
    """(peak bytes of step()'s forward+backward, loss, gradients), measured by MemTracker."""
    model.zero_grad(set_to_none=True)
    tracker = MemTracker()
    with tracker:
        loss = step()
        loss.backward()
    peak = next(iter(tracker.get_tracker_snapshot("peak").values()))["Total"]
    return peak, loss.detach(), [p.grad.clone() for p in model.parameters()]


def test_packed_blocks_keep_one_mask_not_one_per_layer():
    """Plain transformers given packed position_ids (its bool mask: SDPA copies it in every
    layer and keeps the copy for the backward) against ptlm's forward of the same block: the
    same loss and gradients, and at least (layers - 1) T x T fp32 copies less at the peak."""
    model = _llama()
    ids = torch.randint(0, 512, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))
    positions = positions_of(DOCUMENTS).expand(BATCH, -1)
    labels = labels_for(ids, positions)

    def plain():
        return model(input_ids=ids, labels=labels, position_ids=positions, use_cache=False).loss

    def ptlm():
        return causal_lm_loss(model, ids, labels, chunked=False,
                              packed=model_inputs(model, positions, "position_ids"))

    plain_peak, plain_loss, plain_grads = _peak(model, plain)
    ours_peak, ours_loss, ours_grads = _peak(model, ptlm)
    assert ours_loss.item() == pytest.approx(plain_loss.item(), rel=1e-6)
    for g, r in zip(ours_grads, plain_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
    per_layer_copy = BATCH * SEQ * SEQ * 4
    # measured here: 1,568,768 B less, 2.99 copies (4 copies and a bool mask against one shared
    # additive mask, at the backward's peak)
    assert plain_peak - ours_peak >= 0.9 * (LAYERS - 1) * per_layer_copy, (plain_peak, ours_peak)


def test_sliding_windows_inside_packed_blocks_are_transformers_own():
    """Gemma 3 with a 4-token window and documents longer than it: ptlm's packed loss equals the
    documents alone through plain transformers (its bool masks, its windows), and differs from the
    same weights without a window (so the window is in play, not only the documents)."""
    def gemma(window):
        torch.manual_seed(0)
        config = FAMILIES["gemma3_text"]()
        config.sliding_window = window
        return transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()

    lengths = [9, 1, 14]
    model, full = gemma(4), gemma(10_000)
    vocab = model.get_input_embeddings().weight.shape[0]
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=torch.Generator().manual_seed(2))
    positions = positions_of(lengths)
    assert choose_mechanism(model) == "position_ids"

    def packed(m):
        return causal_lm_loss(m, ids, labels_for(ids, positions), chunked=False,
                              packed=model_inputs(m, positions, "position_ids")).item()

    ends = torch.tensor(lengths).cumsum(0).tolist()
    with torch.no_grad():
        total, count = pieces_nll(model, ids[0], list(zip([0, *ends[:-1]], ends)))
        assert packed(model) == pytest.approx(total.item() / count, rel=1e-5)
        assert abs(packed(model) - packed(full)) > 1e-3


def test_the_swap_holds_only_inside_and_keeps_an_override():
    ids = torch.zeros(1, 6, dtype=torch.long)
    positions = positions_of([3, 3])
    kwargs = dict(batch_size=1, q_length=6, kv_length=6, allow_is_causal_skip=True,
                  dtype=torch.bfloat16)
    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is sdpa_mask
    with additive_sdpa_masks():
        mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**kwargs)
        assert mask is None  # a plain causal block: still SDPA's is_causal kernels, no mask
        mask = ALL_MASK_ATTENTION_FUNCTIONS["sdpa"](**{**kwargs, "allow_is_causal_skip": False})
        bool_mask = sdpa_mask(**{**kwargs, "allow_is_causal_skip": False})
        assert mask.dtype == torch.bfloat16 and bool_mask.dtype == torch.bool
        assert torch.equal(mask == 0, bool_mask)
        assert (mask[~bool_mask] == torch.finfo(torch.bfloat16).min).all()
    assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is sdpa_mask

    def users_own(**kw):
        return sdpa_mask(**kw)

    ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] = users_own  # someone's local override survives
    try:
        model = _llama()
        causal_lm_loss(model, ids, labels_for(ids, positions),
                       packed=model_inputs(model, positions, "position_ids"))
        assert ALL_MASK_ATTENTION_FUNCTIONS["sdpa"] is users_own
    finally:
        del ALL_MASK_ATTENTION_FUNCTIONS["sdpa"]
