"""ptlm.model: loading from configs and folders, attention choice, checkpointing, vocab checks."""

from __future__ import annotations

import json
import logging
from functools import partial

import pytest
import torch
from transformers import GPT2Config, PretrainedConfig

from ptlm.errors import PtlmError
from ptlm.model.config import max_positions
from ptlm.model.load import (
    check_vocab,
    enable_checkpointing,
    load_model,
    restore_use_cache,
)
from tests import support

VOCAB = 512


tiny_opt = partial(support.tiny_opt, vocab=VOCAB, hidden=32, ffn=64, positions=64, dropout=0.0)
tiny_gpt2 = partial(support.tiny_gpt2, vocab=VOCAB, hidden=32, positions=64, bos_token_id=0,
                    eos_token_id=0)


@pytest.mark.parametrize("precision, dtype", [("fp32", torch.float32), ("bf16", torch.bfloat16),
                                              ("fp16", torch.float16)])
def test_config_gives_random_model_in_precision_with_sdpa(precision, dtype):
    model = load_model(tiny_opt(), precision)
    assert all(p.dtype == dtype for p in model.parameters())
    assert model.config._attn_implementation == "sdpa"
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as OPT ships


def test_folder_round_trip_uses_safetensors(tmp_path):
    model = load_model(tiny_gpt2(), "fp32")
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    loaded = load_model(tmp_path, "fp32")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_folder_with_only_pickled_weights_loads_with_a_warning(tmp_path, caplog):
    model = load_model(tiny_opt(), "fp32")
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with caplog.at_level(logging.WARNING, logger="ptlm.model.load"):
        loaded = load_model(tmp_path, "fp32")
    assert "no safetensors" in caplog.text
    assert torch.equal(loaded.lm_head.weight, model.lm_head.weight)


def test_bad_specs_raise_ptlm_errors(tmp_path):
    with pytest.raises(PtlmError, match="does not exist"):
        load_model("./no/such/folder", "fp32")
    with pytest.raises(PtlmError, match="config.json"):
        load_model(tmp_path, "fp32")
    with pytest.raises(PtlmError, match="precision"):
        load_model(tiny_opt(), "fp8")
    with pytest.raises(PtlmError, match="attention"):
        load_model(tiny_opt(), "fp32", attn="magic")


def test_hub_name_without_network_is_a_ptlm_error():
    with pytest.raises(PtlmError, match="hub"):
        load_model("facebook/opt-125m", "fp32")  # conftest sets HF_HUB_OFFLINE=1


def test_flash_attention_request_without_the_package_is_explained():
    with pytest.raises(PtlmError, match="flash"):
        load_model(tiny_opt(), "bf16", attn="flash_attention_2")


def test_eager_attention_on_request():
    assert load_model(tiny_opt(), "fp32", attn="eager").config._attn_implementation == "eager"


def test_checkpointing_keeps_gradients_and_is_undone_for_export(tmp_path):
    torch.manual_seed(0)
    plain = load_model(tiny_opt(), "fp32")
    checkpointed = load_model(tiny_opt(), "fp32", checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    assert checkpointed.config.use_cache is False
    assert all(layer.gradient_checkpointing for layer in checkpointed.model.decoder.layers)

    ids = torch.randint(0, VOCAB, (2, 16))
    for model in (plain, checkpointed):
        model.train()
        model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), checkpointed.named_parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-6, rtol=1e-5, msg=name)

    restore_use_cache(checkpointed)
    checkpointed.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["use_cache"] is True


def test_checkpointing_refused_for_models_without_support():
    model = load_model(tiny_opt(), "fp32")
    model.supports_gradient_checkpointing = False
    with pytest.raises(PtlmError, match="checkpointing"):
        enable_checkpointing(model)


def test_max_positions():
    assert max_positions(tiny_opt(max_position_embeddings=2048)) == 2048
    assert max_positions(GPT2Config(n_positions=1024)) == 1024
    assert max_positions(PretrainedConfig()) is None  # says nothing about positions


def test_check_vocab_leaves_a_large_enough_table_alone():
    model = load_model(tiny_opt(), "fp32")
    assert check_vocab(model, VOCAB - 7) == VOCAB
    assert model.get_input_embeddings().weight.shape[0] == VOCAB


@pytest.mark.parametrize("make_config", [tiny_opt, tiny_gpt2])
def test_check_vocab_grows_tied_embeddings(make_config):
    model = load_model(make_config(), "fp32")
    old = model.get_input_embeddings().weight.detach().clone()
    assert check_vocab(model, VOCAB + 3, pad_to_multiple_of=8) == VOCAB + 8
    new = model.get_input_embeddings().weight
    assert new.shape[0] == VOCAB + 8 and model.config.vocab_size == VOCAB + 8
    assert torch.equal(new[:VOCAB], old)
    assert model.get_output_embeddings().weight is new
    ids = torch.tensor([[VOCAB + 2, 1, 2]])  # a new token goes through the model
    assert model(input_ids=ids).logits.shape[-1] == VOCAB + 8


def test_check_vocab_explains_when_it_cannot_resize(monkeypatch):
    model = load_model(tiny_opt(), "fp32")

    def refuse(*args, **kwargs):
        raise NotImplementedError("no resizing here")

    monkeypatch.setattr(model, "resize_token_embeddings", refuse)
    with pytest.raises(PtlmError, match="cannot be resized"):
        check_vocab(model, VOCAB + 1)
    with pytest.raises(PtlmError, match="at least one token"):
        check_vocab(model, 0)


def test_check_vocab_reads_the_real_rows_of_a_partitioned_table(monkeypatch):
    """Under ZeRO-3 the table is an empty placeholder whose real shape is ds_shape: a padded table
    (more rows than the tokenizer's ids) is left alone, never resized (nor shrunk)."""
    model = load_model(tiny_opt(vocab_size=VOCAB + 8), "fp32")
    weight = model.get_input_embeddings().weight
    weight.ds_shape = weight.shape
    weight.data = torch.empty(0)

    def refuse(*args, **kwargs):
        raise AssertionError("resized a table that was large enough")

    monkeypatch.setattr(model, "resize_token_embeddings", refuse)
    assert check_vocab(model, VOCAB) == VOCAB + 8
    assert check_vocab(model, VOCAB + 8) == VOCAB + 8
