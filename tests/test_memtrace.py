"""ptlm.run.tools.memtrace: FakeTensorMode step measurements, cross-checked against real execution."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from functools import partial
from pathlib import Path

import pytest
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers import AutoModelForCausalLM, GPT2Config, OPTConfig

from ptlm.errors import PtlmError
from ptlm.plan.setting import PLAIN_HF, Setting
from ptlm.run.tools.memtrace import measure_step
from tests import support

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
CATEGORY_KEYS = ("parameters", "buffers", "gradients", "optimizer_states", "activations",
                 "temporaries", "other")
SETTINGS = {
    "plain-hf": PLAIN_HF.with_(micro_batch=2),
    "bf16-chunked": Setting(precision="bf16", micro_batch=2),
    "fp16-checkpointing": Setting(precision="fp16", micro_batch=2, checkpointing=True),
    "bf16-adamw8bit": Setting(precision="bf16", micro_batch=2, optimizer="adamw8bit"),
    "fp32-full-logits": Setting(precision="fp32", micro_batch=2, chunked_loss=False),
}


tiny_opt = partial(support.tiny_opt, vocab=2000, hidden=64, ffn=256, positions=128)


@pytest.mark.parametrize("name", SETTINGS)
def test_fake_equals_real_execution(name):
    fake = measure_step(tiny_opt(), SETTINGS[name], seq_len=64, fake=True)
    real = measure_step(tiny_opt(), SETTINGS[name], seq_len=64, fake=False)
    for key in ("peak_bytes", *CATEGORY_KEYS, "model_states_bytes", "peak_phase", "step_peaks"):
        assert fake[key] == real[key], key


@pytest.mark.parametrize("config", [tiny_opt(), GPT2Config(vocab_size=2000, n_embd=64, n_layer=2,
                                                            n_head=4, n_positions=128)],
                         ids=["opt-mask", "gpt2-position_ids"])
def test_fake_equals_real_execution_with_packed_documents(config):
    """The packed step (a block-causal mask built by ptlm for OPT, by transformers from
    position_ids for GPT-2) traced fake allocates what it allocates for real, and more than the
    stream step: the planner's accuracy tests rest on the fake trace."""
    setting = Setting(precision="fp32", micro_batch=2)
    fake = measure_step(config, setting, seq_len=64, fake=True, packing="documents")
    real = measure_step(config, setting, seq_len=64, fake=False, packing="documents")
    for key in ("peak_bytes", *CATEGORY_KEYS, "peak_phase"):
        assert fake[key] == real[key], key
    assert fake["peak_bytes"] > measure_step(config, setting, seq_len=64)["peak_bytes"]


def test_result_keys_and_breakdown():
    result = measure_step(tiny_opt(), Setting(precision="bf16", micro_batch=2), seq_len=32)
    assert sum(result[key] for key in CATEGORY_KEYS) == result["peak_bytes"]
    assert result["peak_phase"] in result["phase_peaks"]
    assert result["peak_bytes"] == max(result["phase_peaks"].values()) == result["step_peaks"][-1]
    assert result["engine"] == "deepspeed" and result["fake"] is True
    assert result["seq_len"] == 32 and result["micro_batch"] == 2
    assert result["setting"]["precision"] == "bf16"
    n_params = sum(p.numel() for p in _params(tiny_opt()))
    assert result["master_params_bytes"] == 4 * n_params
    # bf16 weights + fp32 master + fp32 m and v between steps (+ AdamW's 4-byte step counters)
    assert abs(result["model_states_bytes"] - (2 + 4 + 8) * n_params) < 1e-3 * 14 * n_params


def test_optimizer_phase_peak_matches_deepspeed_unfused_arithmetic():
    """Few tokens, big params: the peak is the step, 2+2 (16-bit w, g) + 4+8 (master, m, v) + 4
    (fp32 grads) = 20 bytes per parameter."""
    config = tiny_opt(vocab_size=20000, hidden_size=128, word_embed_proj_dim=128)
    result = measure_step(config, Setting(precision="bf16"), seq_len=4)
    n_params = sum(p.numel() for p in _params(config))
    assert result["peak_phase"] == "optimizer"
    assert abs(result["peak_bytes"] - 20 * n_params) < 0.01 * 20 * n_params


def test_attention_dropout_is_measured_as_cuda_sdpa_runs_it():
    """CPU SDPA with dropout materializes (T x T) attention; CUDA's fused kernels do not."""
    with_dropout = GPT2Config(vocab_size=500, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                              attn_pdrop=0.1, bos_token_id=0, eos_token_id=0)
    without = GPT2Config(**{**with_dropout.to_dict(), "attn_pdrop": 0.0})
    setting = Setting(micro_batch=2)
    assert (measure_step(with_dropout, setting, 256)["peak_bytes"]
            == measure_step(without, setting, 256)["peak_bytes"])
    assert with_dropout.attn_pdrop == 0.1  # the caller's config is left alone
    eager = measure_step(with_dropout, setting, 256, attn="eager")["peak_bytes"]
    assert eager > measure_step(without, setting, 256, attn="eager")["peak_bytes"]


def test_sharded_settings_are_refused():
    with pytest.raises(PtlmError, match="ZeRO"):
        measure_step(tiny_opt(), Setting(zero=2), seq_len=32)


def test_opt125m_plain_hf_batch4_seq1024():
    """The reference figure: plain HF OPT-125M, fp32, AdamW, SDPA, 4 x 1024 (~4 s each here).

    5.70 GiB = the lead's 6.46 GiB minus one fp32 logits tensor (4 x 1024 x 50272 x 4 B = 0.77 GiB):
    the reference loop kept the model output (logits) alive through backward; HF Trainer, like
    causal_lm_loss, drops it before backward.
    """
    result = measure_step(OPTConfig(), PLAIN_HF.with_(micro_batch=4), seq_len=1024)
    assert result["engine"] == "torch"
    assert 5.6 * GiB < result["peak_bytes"] < 5.8 * GiB
    chunked = measure_step(OPTConfig(), PLAIN_HF.with_(micro_batch=4, chunked_loss=True), seq_len=1024)
    assert chunked["peak_bytes"] < 0.7 * result["peak_bytes"]  # 3.68 vs 5.70 GiB


def _params(config):
    with FakeTensorMode():
        return list(AutoModelForCausalLM.from_config(config).parameters())


DEEPSPEED_SCRIPT = textwrap.dedent("""
    import json, sys, torch, deepspeed
    from torch.distributed._tools.mem_tracker import MemTracker
    from transformers import OPTConfig
    from ptlm.model.loss import causal_lm_loss
    from ptlm.run.tools.memtrace import measure_step
    from ptlm.model.load import load_model
    from ptlm.model.optim import build_optimizer
    from ptlm.plan.setting import Setting
    precision, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    config = OPTConfig(vocab_size=5000, hidden_size=128, ffn_dim=512, num_hidden_layers=2,
                       num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=128)
    setting = Setting(precision=precision, micro_batch=batch)
    model = load_model(config, "fp32").train()
    optimizer = build_optimizer(setting, model.named_parameters(), lr=1e-4)
    ds_config = {"train_micro_batch_size_per_gpu": batch, "steps_per_print": 10**9,
                 "zero_optimization": {"stage": 0}}
    if precision != "fp32":
        ds_config[precision] = {"enabled": True}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    inner = getattr(engine.optimizer, "optimizer", engine.optimizer)
    masters = [p for group in getattr(engine.optimizer, "fp32_groups", []) for p in group]
    tracker = MemTracker()
    tracker.track_external(engine.module, inner, *masters)
    with tracker:
        for _ in range(3):
            tracker.reset_mod_stats()
            loss = causal_lm_loss(engine.module, torch.randint(0, 5000, (batch, seq)))
            engine.backward(loss)
            del loss
            engine.step()
    real = tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"]
    emulated = measure_step(config, setting, seq, steps=3)["peak_bytes"]
    print(json.dumps({"deepspeed": real, "emulated": emulated}))
""")


@pytest.mark.slow  # DeepSpeed JIT-builds its CPU communication op on first use
@pytest.mark.parametrize("precision, batch, seq", [("bf16", 1, 8), ("bf16", 4, 128),
                                                   ("fp16", 1, 8), ("fp32", 1, 8)])
def test_emulation_matches_the_real_deepspeed_engine(precision, batch, seq):
    """DeepSpeed's engine at ZeRO-0 on CPU, under MemTracker, peaks where the emulation does."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29532", "RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", DEEPSPEED_SCRIPT, precision, str(batch), str(seq)],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    peaks = json.loads(run.stdout.strip().splitlines()[-1])
    assert abs(peaks["deepspeed"] - peaks["emulated"]) <= 1024, peaks  # a few scalars apart
