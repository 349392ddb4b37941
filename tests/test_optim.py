"""ptlm.model.optim: param groups and the optimizer each Setting gets."""

from __future__ import annotations

import builtins
import logging

import pytest
import torch
from transformers import OPTConfig

from ptlm.errors import PtlmError
from ptlm.model.load import load_model
from ptlm.model.optim import build_optimizer, param_groups
from ptlm.plan.setting import Setting

LR, WEIGHT_DECAY = 1e-3, 0.1


@pytest.fixture
def model():
    config = OPTConfig(vocab_size=512, hidden_size=64, ffn_dim=128, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=64,
                       dropout=0.0)
    return load_model(config, "fp32")


def one_step(model, optimizer):
    ids = torch.randint(0, 512, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def test_no_decay_on_biases_and_layer_norms(model):
    decay, no_decay = param_groups(model.named_parameters(), WEIGHT_DECAY)
    assert decay["weight_decay"] == WEIGHT_DECAY and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    not_decayed = {names[id(p)] for p in no_decay["params"]}
    assert "model.decoder.embed_tokens.weight" in decayed  # tied with lm_head: listed once
    assert "model.decoder.layers.0.fc1.weight" in decayed
    assert "model.decoder.layers.0.fc1.bias" in not_decayed
    assert "model.decoder.layers.0.self_attn_layer_norm.weight" in not_decayed
    assert "model.decoder.final_layer_norm.weight" in not_decayed
    assert len(decayed) + len(not_decayed) == len(list(model.parameters()))


def test_frozen_params_are_left_out_and_all_frozen_is_an_error(model):
    model.model.decoder.embed_tokens.weight.requires_grad_(False)
    groups = param_groups(model.named_parameters(), WEIGHT_DECAY)
    assert all(p.requires_grad for g in groups for p in g["params"])
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(PtlmError, match="no trainable"):
        param_groups(model.named_parameters(), WEIGHT_DECAY)


def test_adamw_is_fused_on_cpu_and_trains(model):
    optimizer = build_optimizer(Setting(), model.named_parameters(), LR, WEIGHT_DECAY,
                                betas=(0.9, 0.95), eps=1e-6)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.defaults["fused"] is True
    assert optimizer.defaults["betas"] == (0.9, 0.95) and optimizer.defaults["eps"] == 1e-6
    before = model.lm_head.weight.detach().clone()
    one_step(model, optimizer)
    assert not torch.equal(before, model.lm_head.weight)
    assert set(optimizer.state[model.lm_head.weight]) >= {"exp_avg", "exp_avg_sq"}


def test_adamw_falls_back_to_foreach_where_no_fused_kernel():
    params = [("w", torch.nn.Parameter(torch.empty(4, 4, device="meta")))]
    optimizer = build_optimizer(Setting(), params, LR)
    assert not optimizer.defaults["fused"] and optimizer.defaults["foreach"] is True


def test_adamw8bit_uses_bitsandbytes_8bit_states(model):
    import bitsandbytes as bnb

    optimizer = build_optimizer(Setting(optimizer="adamw8bit"), model.named_parameters(), LR,
                                WEIGHT_DECAY)
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    one_step(model, optimizer)
    state = optimizer.state[model.lm_head.weight]
    assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
    assert optimizer.state[model.model.decoder.final_layer_norm.weight]["state1"].dtype == torch.float32


def test_offload_returns_none_when_cpu_adam_cannot_be_built(model, monkeypatch, caplog):
    real_import = builtins.__import__

    def no_cpu_adam(name, *args, **kwargs):
        if name == "deepspeed.ops.adam":
            raise ImportError("simulated: no compiler")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_cpu_adam)
    with caplog.at_level(logging.WARNING, logger="ptlm.model.optim"):
        optimizer = build_optimizer(Setting(zero=2, offload="optimizer"), model.named_parameters(), LR)
    assert optimizer is None
    assert "CPU Adam could not be built" in caplog.text


@pytest.mark.slow  # JIT-compiles DeepSpeed's cpu_adam extension on first use (~1 min on 2 cores)
def test_offload_builds_deepspeed_cpu_adam(model):
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    optimizer = build_optimizer(Setting(zero=2, offload="optimizer"), model.named_parameters(), LR,
                                WEIGHT_DECAY)
    assert isinstance(optimizer, DeepSpeedCPUAdam)
    assert [g["weight_decay"] for g in optimizer.param_groups] == [WEIGHT_DECAY, 0.0]
    one_step(model, optimizer)


def test_partitioned_params_are_grouped_by_their_real_shape(model):
    """Under ZeRO-3 (zero.Init) each parameter is an empty [0] placeholder whose real shape is
    ds_shape: the matrices must still get weight decay."""
    expected = [[id(p) for p in g["params"]]
                for g in param_groups(model.named_parameters(), WEIGHT_DECAY)]
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            placeholder = torch.nn.Parameter(torch.empty(0))
            placeholder.ds_shape = p.shape  # as DeepSpeed's partitioned parameters carry it
            setattr(module, name, placeholder)
    model.tie_weights()
    groups = param_groups(model.named_parameters(), WEIGHT_DECAY)
    assert all(p.shape == (0,) for g in groups for p in g["params"])
    assert [g["weight_decay"] for g in groups] == [WEIGHT_DECAY, 0.0]
    assert [len(g["params"]) for g in groups] == [len(ids) for ids in expected]
