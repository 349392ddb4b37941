"""Small versions (real transformers architecture code, 2-4 layers, small widths) of the model
families people bring today, shared by the tests of the measured model facts and of training."""

from __future__ import annotations

import transformers

VOCAB = 4096
POSITIONS = 2048
# Some families' defaults name ids of their full vocabulary (SmolLM3's pad 128004, Phi-3's eos
# 32000); inside the small vocabulary, as a real tokenizer's would be.
SPECIAL_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=None)


def _config(model_type: str, **fields):
    return transformers.AutoConfig.for_model(model_type, vocab_size=VOCAB, **fields)


# Each is the published model's shape, shrunk: its quirks kept (GQA, head_dim != hidden/heads,
# q/k norms, sliding-window layers, NoPE layers, tied/untied heads, parallel blocks, conv blocks).
FAMILIES = {
    # Qwen3-0.6B: GQA 16/8, head_dim 128 != 1024/16, q/k RMSNorm, tied
    "qwen3": lambda: _config("qwen3", hidden_size=128, intermediate_size=384, num_hidden_layers=3,
                             num_attention_heads=4, num_key_value_heads=2, head_dim=64,
                             max_position_embeddings=POSITIONS, tie_word_embeddings=True),
    # Gemma 3 270M: 5 sliding (window 512) : 1 full layers, head_dim 256 > hidden/heads,
    # 4 norms per layer, embeddings scaled by sqrt(hidden), MQA
    "gemma3_text": lambda: _config("gemma3_text", hidden_size=128, intermediate_size=256,
                                   num_hidden_layers=4, num_attention_heads=2,
                                   num_key_value_heads=1, head_dim=96, sliding_window=128,
                                   layer_types=["sliding_attention"] * 3 + ["full_attention"],
                                   max_position_embeddings=POSITIONS),
    # Llama 3.2: GQA, llama3 rope scaling, tied
    "llama": lambda: _config("llama", hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=POSITIONS, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                              "factor": 32.0, "low_freq_factor": 1.0,
                                              "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 1024}),
    # SmolLM3: every 4th layer without rotary positions (NoPE), GQA, tied
    "smollm3": lambda: _config("smollm3", hidden_size=128, intermediate_size=384,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                               max_position_embeddings=POSITIONS, **SPECIAL_IDS),
    # Phi-3: fused qkv and gate_up projections, untied
    "phi3": lambda: _config("phi3", hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4,
                            max_position_embeddings=POSITIONS, **SPECIAL_IDS),
    # Pythia (GPT-NeoX): parallel attention + MLP, partial rotary, LayerNorm with biases
    "gpt_neox": lambda: _config("gpt_neox", hidden_size=128, intermediate_size=512,
                                num_hidden_layers=2, num_attention_heads=4,
                                max_position_embeddings=POSITIONS),
    # No hand reader and a hybrid: LFM2 mixes short convolutions with attention layers
    "lfm2": lambda: _config("lfm2", hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                            num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=POSITIONS,
                            layer_types=["conv", "conv", "full_attention", "conv"]),
}
