"""ptlm.model.loss: the chunked LM-head + cross-entropy equals the HF loss, in value and gradients."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import OPTConfig

from ptlm.errors import PtlmError
from ptlm.model.load import load_model
from ptlm.model.loss import (
    IGNORE_INDEX,
    causal_lm_loss,
    check_chunkable,
    check_chunked_loss,
    lm_head_loss,
)
from tests import support

ROOT = Path(__file__).resolve().parents[1]
VOCAB = 300
BATCH, SEQ = 3, 17  # 51 tokens: chunk 7 leaves a remainder, chunk 17 divides, 1 is per-token
TOLERANCE = 1e-5  # fp32


tiny_opt = partial(support.tiny_opt, vocab=VOCAB, hidden=32, ffn=64, positions=64, dropout=0.0)
tiny_gpt2 = partial(support.tiny_gpt2, vocab=VOCAB, hidden=32, positions=64, bos_token_id=0,
                    eos_token_id=0)


def batch(ignored: bool):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=gen)  # (B, T)
    labels = ids.clone()
    if ignored:
        labels[0, :6] = IGNORE_INDEX  # a masked prompt
        labels[2, -4:] = IGNORE_INDEX  # right padding
    return ids, labels


def loss_and_grads(model, ids, labels, **kwargs):
    model.zero_grad(set_to_none=True)
    mean, total, count = causal_lm_loss(model, ids, labels, with_counts=True, **kwargs)
    mean.backward()
    return mean.detach(), total.detach(), count, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("make_config", [tiny_opt, tiny_gpt2], ids=["opt", "gpt2"])
@pytest.mark.parametrize("ignored", [False, True], ids=["all-labels", "ignored-labels"])
@pytest.mark.parametrize("chunk_size", [7, 17, 1, None])
def test_chunked_equals_hf_in_value_and_every_gradient(make_config, ignored, chunk_size):
    torch.manual_seed(0)
    model = load_model(make_config(), "fp32").train()
    ids, labels = batch(ignored)
    chunked = loss_and_grads(model, ids, labels, chunked=True, chunk_size=chunk_size)
    reference = loss_and_grads(model, ids, labels, chunked=False)

    assert abs(chunked[0].item() - reference[0].item()) < TOLERANCE
    assert abs(chunked[1].item() - reference[1].item()) < TOLERANCE * chunked[2].item()
    assert chunked[2].item() == reference[2].item() == (labels[:, 1:] != IGNORE_INDEX).sum()
    assert chunked[3].keys() == reference[3].keys()
    for name, grad in reference[3].items():
        assert grad is not None and chunked[3][name] is not None, name
        assert (chunked[3][name] - grad).abs().max().item() < TOLERANCE, name


def test_lm_head_with_bias_matches_cross_entropy():
    torch.manual_seed(0)
    head = nn.Linear(16, 40, bias=True)
    hidden = torch.randn(2, 9, 16, requires_grad=True)  # (B, T, H)
    labels = torch.randint(0, 40, (2, 9))
    labels[1, 3] = IGNORE_INDEX

    total, count = lm_head_loss(hidden, head, labels, chunk_size=4)
    (total / count).backward()
    ours = [hidden.grad, head.weight.grad, head.bias.grad]
    hidden.grad = head.weight.grad = head.bias.grad = None

    logits = head(hidden)[:, :-1]  # (B, T-1, V)
    reference = F.cross_entropy(logits.reshape(-1, 40), labels[:, 1:].reshape(-1))
    reference.backward()
    assert torch.allclose(total / count, reference, atol=TOLERANCE)
    for a, b in zip(ours, [hidden.grad, head.weight.grad, head.bias.grad]):
        assert (a - b).abs().max() < TOLERANCE


def test_without_grad_mode_it_only_evaluates():
    model = load_model(tiny_opt(), "fp32").eval()
    ids, labels = batch(ignored=True)
    with torch.no_grad():
        chunked = causal_lm_loss(model, ids, labels, chunk_size=5)
        reference = causal_lm_loss(model, ids, labels, chunked=False)
    assert not chunked.requires_grad
    assert abs(chunked.item() - reference.item()) < TOLERANCE


def test_fully_ignored_batch_gives_zero_not_nan():
    model = load_model(tiny_opt(), "fp32").train()
    ids, _ = batch(ignored=False)
    labels = torch.full_like(ids, IGNORE_INDEX)
    for chunked in (True, False):
        mean, _, _, grads = loss_and_grads(model, ids, labels, chunked=chunked)
        assert mean.item() == 0.0
        assert all(torch.all(g == 0) for g in grads.values() if g is not None)


def test_bf16_close_to_hf_bf16():
    torch.manual_seed(0)
    model = load_model(tiny_gpt2(), "bf16").train()
    ids, labels = batch(ignored=True)
    chunked = loss_and_grads(model, ids, labels, chunk_size=7)
    reference = loss_and_grads(model, ids, labels, chunked=False)
    assert abs(chunked[0].item() - reference[0].item()) < 1e-2 * reference[0].item()
    for name, grad in reference[3].items():
        scale = grad.float().abs().max().item() + 1e-6
        assert (chunked[3][name].float() - grad.float()).abs().max().item() < 0.05 * scale, name


def test_fp16_loss_scale_does_not_overflow_in_backward():
    """grad_loss = 2**16 / 1 token does not fit in fp16; the scaled gradients do."""
    torch.manual_seed(0)
    head = nn.Linear(16, 40, bias=False)
    hidden = torch.randn(1, 3, 16) * 0.01  # small activations: the scaled grads stay < 65504
    labels = torch.tensor([[IGNORE_INDEX, 5, IGNORE_INDEX]])  # one counted token
    grads = {}
    for dtype in (torch.float32, torch.float16):
        h = hidden.to(dtype, copy=True).requires_grad_()
        w = nn.Linear(16, 40, bias=False).to(dtype)
        w.weight.data.copy_(head.weight)
        total, count = lm_head_loss(h, w, labels)
        (total / count * 2.0**16).backward()  # DeepSpeed's initial fp16 loss scale
        grads[dtype] = (h.grad.float(), w.weight.grad.float())
    for half, full in zip(grads[torch.float16], grads[torch.float32]):
        assert torch.isfinite(half).all()
        assert (half - full).abs().max() < 1e-2 * full.abs().max()


def test_backward_runs_once():
    head = nn.Linear(8, 20)
    hidden = torch.randn(1, 4, 8, requires_grad=True)
    total, _ = lm_head_loss(hidden, head, torch.randint(0, 20, (1, 4)))
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        total.backward()


def test_head_module_is_restored_after_the_loss():
    head = nn.Linear(8, 20)
    lm_head_loss(torch.randn(1, 4, 8), head, torch.randint(0, 20, (1, 4)))
    assert "forward" not in head.__dict__
    assert head(torch.randn(2, 8)).shape == (2, 20)


def test_logit_transforming_architectures_are_refused():
    config = tiny_opt()
    config.final_logit_softcapping = 30.0  # what Gemma-2 does after lm_head
    model = load_model(config, "fp32")
    with pytest.raises(PtlmError, match="chunked_loss off"):
        check_chunkable(model)


def test_self_check_passes_for_opt_and_catches_a_hidden_logit_transform():
    model = load_model(tiny_opt(), "fp32")
    check_chunked_loss(model)
    original = model.forward

    def doubled(*args, **kwargs):  # a model whose own loss differs from lm_head + cross-entropy
        out = original(*args, **kwargs)
        out.loss = out.loss * 2
        return out

    model.forward = doubled
    with pytest.raises(PtlmError, match="differs"):
        check_chunked_loss(model)


def test_peak_memory_far_below_full_logits():
    """OPT-125M's head at 4 x 1024 tokens, under FakeTensorMode (no compute, no memory)."""
    tokens, hidden_size, vocab = 4 * 1024, 768, 50272

    def peak(loss_fn) -> int:
        with FakeTensorMode():
            head = nn.Linear(hidden_size, vocab, bias=False)
            hidden = torch.randn(4, 1024, hidden_size, requires_grad=True)  # (B, T, H)
            labels = torch.randint(0, vocab, (4, 1024))
            tracker = MemTracker()
            tracker.track_external(head, hidden)
            with tracker:
                loss_fn(head, hidden, labels).backward()
            return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]

    def full(head, hidden, labels):  # what HF's ForCausalLMLoss does
        logits = head(hidden).float()  # (B, T, V)
        return F.cross_entropy(logits[:, :-1].reshape(-1, vocab), labels[:, 1:].reshape(-1))

    def chunked(head, hidden, labels):
        total, count = lm_head_loss(hidden, head, labels)
        return total / count

    logits_bytes = tokens * vocab * 4
    weight_and_grad_bytes = 2 * vocab * hidden_size * 4  # both paths hold these
    full_peak, chunked_peak = peak(full), peak(chunked)
    assert full_peak > 2 * logits_bytes  # logits + the cross-entropy's own copies
    assert chunked_peak < full_peak / 4
    assert chunked_peak - weight_and_grad_bytes < logits_bytes / 4


ZERO3_SCRIPT = textwrap.dedent("""
    import os, torch, deepspeed
    from transformers import OPTConfig
    from ptlm.model.loss import causal_lm_loss
    from ptlm.model.load import load_model
    config = OPTConfig(vocab_size=500, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                       dropout=0.0)
    losses = {}
    for chunked in (True, False):
        torch.manual_seed(0)
        model = load_model(config, "fp32").train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        ds_config = {"train_micro_batch_size_per_gpu": 2, "steps_per_print": 10**9,
                     "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        assert engine.module.lm_head.weight.numel() == 0  # partitioned: the loss must gather it
        torch.manual_seed(1)
        losses[chunked] = []
        for _ in range(3):
            ids = torch.randint(0, 500, (2, 16))
            loss = causal_lm_loss(engine.module, ids, chunked=chunked)
            engine.backward(loss)
            engine.step()
            losses[chunked].append(loss.item())
    print("LOSSES", losses)
    assert max(abs(a - b) for a, b in zip(losses[True], losses[False])) < 1e-5, losses
""")


@pytest.mark.slow
def test_chunked_loss_trains_under_deepspeed_zero3_on_cpu():
    """The head weight is a ZeRO-3 shard; running the loss as lm_head's forward gathers it."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29531", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    assert "LOSSES" in run.stdout
