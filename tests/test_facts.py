"""ModelFacts against real transformers models (built on the meta device), GPU table, sizes."""

from __future__ import annotations

import pytest
import torch
import transformers

from ptlm.errors import PtlmError
from ptlm.model.config import known_config, model_facts
from ptlm.plan.facts import (
    KNOWN_CONFIGS,
    KNOWN_GPUS,
    GiB,
    HardwareFacts,
    ModelFacts,
    lookup_gpu,
)
from ptlm.units import parse_size


def meta_model(cfg):
    with torch.device("meta"):
        return transformers.AutoModelForCausalLM.from_config(cfg)


def counted(model) -> dict:
    """What ModelFacts claims, counted on the model itself (DeepSpeed's definitions)."""
    return {
        "parameters": sum(p.numel() for p in model.parameters()),  # shared tensors once
        "largest_layer_params": max(sum(p.numel() for p in m.parameters(recurse=False))
                                    for m in model.modules()),
        "vector_params": sum(p.numel() for p in model.parameters() if p.dim() == 1),
    }


SMALL_CONFIGS = {
    "opt": transformers.OPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=2,
                                  num_attention_heads=4, vocab_size=1000,
                                  max_position_embeddings=128, word_embed_proj_dim=64),
    # OPT-350M's shape: projections in/out of a smaller embedding, post-LN (no final norm)
    "opt-proj-postln": transformers.OPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=2,
                                              num_attention_heads=4, vocab_size=1000,
                                              max_position_embeddings=128, word_embed_proj_dim=32,
                                              do_layer_norm_before=False),
    "opt-nobias-untied": transformers.OPTConfig(hidden_size=64, ffn_dim=256, num_hidden_layers=2,
                                                num_attention_heads=4, vocab_size=1000,
                                                max_position_embeddings=128, word_embed_proj_dim=64,
                                                enable_bias=False, tie_word_embeddings=False),
    "gpt2": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000, n_positions=128,
                                    bos_token_id=0, eos_token_id=0),
    "gpt2-n_inner": transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=1000,
                                            n_positions=128, n_inner=96, bos_token_id=0,
                                            eos_token_id=0),
    "llama-gqa": transformers.LlamaConfig(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=2,
                                          vocab_size=1000, max_position_embeddings=128),
    "llama-tied-bias": transformers.LlamaConfig(hidden_size=64, intermediate_size=172,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                vocab_size=1000, tie_word_embeddings=True,
                                                attention_bias=True, mlp_bias=True),
    "mistral": transformers.MistralConfig(hidden_size=64, intermediate_size=224, num_hidden_layers=2,
                                          num_attention_heads=8, num_key_value_heads=2,
                                          vocab_size=1000, head_dim=16),
    "qwen2": transformers.Qwen2Config(hidden_size=64, intermediate_size=172, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=1000),
}


@pytest.mark.parametrize("name", sorted(SMALL_CONFIGS))
def test_counts_match_real_model(name):
    cfg = SMALL_CONFIGS[name]
    facts = ModelFacts.from_config(cfg)
    want = counted(meta_model(cfg))
    assert {k: getattr(facts, k) for k in want} == want


@pytest.mark.parametrize("alias", sorted(KNOWN_CONFIGS))
def test_known_configs_match_real_models(alias):
    cfg = known_config(alias)
    facts = model_facts(alias)
    want = counted(meta_model(cfg))
    assert {k: getattr(facts, k) for k in want} == want
    assert facts.layers == cfg.num_hidden_layers
    assert facts.hidden == cfg.hidden_size
    assert facts.vocab == cfg.vocab_size


def test_opt_125m_shape():
    cfg = known_config("opt-125m")
    facts = ModelFacts.from_config(cfg)
    assert (facts.layers, facts.hidden, facts.heads, facts.ffn, facts.vocab, facts.positions) == \
        (cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.ffn_dim,
         cfg.vocab_size, cfg.max_position_embeddings)
    assert facts.tied_embeddings and facts.learned_positions and facts.hidden_act == "relu"
    # the tied LM head is counted once: removing the tie adds exactly one V x h matrix
    untied = transformers.OPTConfig(**{**cfg.to_dict(), "tie_word_embeddings": False})
    assert ModelFacts.from_config(untied).parameters == facts.parameters + cfg.vocab_size * cfg.hidden_size


def test_local_folder_and_config_json(tmp_path):
    cfg = SMALL_CONFIGS["llama-gqa"]
    cfg.save_pretrained(tmp_path)
    by_folder = model_facts(str(tmp_path))
    by_file = model_facts(str(tmp_path / "config.json"))
    assert by_folder.parameters == by_file.parameters == counted(meta_model(cfg))["parameters"]


def test_unreadable_model_says_what_to_pass(tmp_path):
    with pytest.raises(PtlmError, match="opt-125m"):
        model_facts(str(tmp_path / "missing"))


def test_unsupported_model_type():
    cfg = transformers.BertConfig()
    with pytest.raises(PtlmError, match="model_type 'bert'"):
        ModelFacts.from_config(cfg)


@pytest.mark.parametrize("name, memory, expected", [
    ("Tesla T4", None, "T4"),
    ("t4", None, "T4"),
    ("NVIDIA A100-SXM4-80GB", None, "A100-80GB"),
    ("NVIDIA A100-SXM4-40GB", None, "A100-40GB"),
    ("a100-40", None, "A100-40GB"),
    ("NVIDIA A100-PCIE", 80 * 10**9, "A100-80GB"),
    ("NVIDIA H100 80GB HBM3", None, "H100-80GB"),
    ("Tesla V100-SXM2-16GB", None, "V100-16GB"),
    ("NVIDIA L4", None, "L4"),
    ("NVIDIA L40S", None, "L40S"),
    ("NVIDIA A10G", None, "A10G"),
])
def test_lookup_gpu(name, memory, expected):
    assert lookup_gpu(name, memory).name == expected


def test_lookup_gpu_unknown_and_ambiguous():
    assert lookup_gpu("NVIDIA GeForce GTX 1080") is None
    with pytest.raises(PtlmError, match="A100-40GB or A100-80GB"):
        lookup_gpu("A100")


def test_gpu_table_is_consistent():
    for spec in KNOWN_GPUS.values():
        assert spec.peak_tflops > spec.fp32_tflops > 0
        assert spec.memory_bytes > 10 * GiB
    assert not KNOWN_GPUS["T4"].bf16 and not KNOWN_GPUS["V100-16GB"].bf16
    assert KNOWN_GPUS["A100-40GB"].peak_tflops == 312 and KNOWN_GPUS["H100-80GB"].peak_tflops == 989
    assert KNOWN_GPUS["T4"].peak_tflops == 65


@pytest.mark.parametrize("text, expected", [
    ("16GiB", 16 * 2**30), ("40GB", 40 * 10**9), ("512MiB", 512 * 2**20), ("1.5TB", 1.5e12),
    ("16G", 16 * 2**30), ("123", 123), ("2 GiB", 2 * 2**30), ("64gib", 64 * 2**30),
])
def test_parse_size(text, expected):
    assert parse_size(text) == int(expected)


@pytest.mark.parametrize("text", ["", "abc", "16XB", "GiB", "16 iB", "-1GB"])
def test_parse_size_rejects(text):
    with pytest.raises(PtlmError, match="16GiB"):
        parse_size(text)


def test_hardware_validation_and_world():
    hw = HardwareFacts.from_spec(KNOWN_GPUS["A100-40GB"], gpus_per_node=8, nodes=2)
    assert hw.world == 16
    with pytest.raises(PtlmError, match="--nodes"):
        HardwareFacts(gpu_name="x", gpu_memory_bytes=GiB, gpus_per_node=1, nodes=0)
    with pytest.raises(PtlmError, match="--gpu-memory"):
        HardwareFacts(gpu_name="x", gpu_memory_bytes=0, gpus_per_node=1)
    assert HardwareFacts.from_dict(hw.to_dict()) == hw


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU path")
def test_detect_without_gpu():
    from ptlm.run.machine.hardware import detect

    hw = detect()
    assert hw.gpus_per_node == 0
    assert hw.host_memory_bytes and hw.host_memory_bytes > 0
