"""Memory model accuracy: ptlm.plan.memory's predicted peak vs a real training step of ptlm's loop
measured under FakeTensorMode + MemTracker (ptlm.run.tools.memtrace), on OPT-125M and GPT-2 124M configs,
over a grid of settings; plus the headline (plain HF vs ptlm's T4 plan).

    python bench/bench_memory.py            # ~3 min on 2 cores; prints markdown tables
    python bench/bench_memory.py --families # today's small models at seq 1024/2048/4096, measured
                                            # facts (ptlm.model.profile) and the T4 plan
"""

from __future__ import annotations

import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ptlm, bench.* of this checkout

from ptlm.plan.setting import Setting  # noqa: E402

GiB = 2**30
TOLERANCE = 0.10

# (model alias, seq_len, Setting): seq 128-2048, micro 1-16, checkpointing on/off, fp32/bf16,
# AdamW/AdamW8bit, chunked loss on/off (ZeRO-0 on one device: what memtrace measures).
GRID = [
    ("opt-125m", 128, Setting("fp32", chunked_loss=False, micro_batch=16)),
    ("opt-125m", 256, Setting("bf16", checkpointing=True, micro_batch=8)),
    ("opt-125m", 512, Setting("bf16", optimizer="adamw8bit", micro_batch=4)),
    ("opt-125m", 1024, Setting("fp32", chunked_loss=False, micro_batch=16)),
    ("opt-125m", 1024, Setting("fp32", chunked_loss=False, checkpointing=True, micro_batch=16)),
    ("opt-125m", 1024, Setting("bf16", micro_batch=16)),
    ("opt-125m", 1024, Setting("bf16", checkpointing=True, micro_batch=8)),
    ("opt-125m", 1024, Setting("fp32", optimizer="adamw8bit", micro_batch=4)),
    ("opt-125m", 2048, Setting("bf16", chunked_loss=False, micro_batch=1)),
    ("opt-125m", 2048, Setting("fp32", checkpointing=True, micro_batch=2)),
    ("opt-125m", 1024, Setting("bf16", checkpointing=True, optimizer="adamw8bit",
                               micro_batch=16)),
    ("gpt2", 128, Setting("fp32", chunked_loss=False, micro_batch=16)),
    ("gpt2", 256, Setting("bf16", checkpointing=True, optimizer="adamw8bit", micro_batch=4)),
    ("gpt2", 512, Setting("bf16", micro_batch=8)),
    ("gpt2", 1024, Setting("fp32", chunked_loss=False, micro_batch=1)),
    ("gpt2", 1024, Setting("bf16", chunked_loss=False, checkpointing=True, micro_batch=8)),
    ("gpt2", 1024, Setting("bf16", micro_batch=16)),
    ("gpt2", 1024, Setting("fp32", chunked_loss=False, optimizer="adamw8bit", micro_batch=2)),
]


# The published shapes (each model card's config.json, the fields that matter; everything else is
# transformers' default), so the table needs no hub.
PUBLISHED = {
    "Qwen3-0.6B": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072,
                       num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                       head_dim=128, vocab_size=151936, max_position_embeddings=40960,
                       rope_theta=1000000.0, tie_word_embeddings=True),
    "Llama-3.2-1B": dict(model_type="llama", hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=64, vocab_size=128256, max_position_embeddings=131072,
                         tie_word_embeddings=True,
                         rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0,
                                          "factor": 32.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0,
                                          "original_max_position_embeddings": 8192}),
    "Gemma-3-270M": dict(model_type="gemma3_text", hidden_size=640, intermediate_size=2048,
                         num_hidden_layers=18, num_attention_heads=4, num_key_value_heads=1,
                         head_dim=256, vocab_size=262144, max_position_embeddings=32768,
                         sliding_window=512, query_pre_attn_scalar=256),
    "SmolLM2-360M": dict(model_type="llama", hidden_size=960, intermediate_size=2560,
                         num_hidden_layers=32, num_attention_heads=15, num_key_value_heads=5,
                         vocab_size=49152, max_position_embeddings=8192, rope_theta=100000.0,
                         tie_word_embeddings=True),
    "Pythia-160M": dict(model_type="gpt_neox", hidden_size=768, intermediate_size=3072,
                        num_hidden_layers=12, num_attention_heads=12, vocab_size=50304,
                        max_position_embeddings=2048, rotary_pct=0.25,
                        use_parallel_residual=True, tie_word_embeddings=False),
}
FAMILY_SEQS = (1024, 2048, 4096)
FAMILY_SETTING = Setting("bf16", micro_batch=1)  # chunked loss, no checkpointing, ZeRO-0


def published_config(name: str):
    from transformers import AutoConfig

    fields = dict(PUBLISHED[name])
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


def families() -> None:
    """Predicted (measured facts) vs measured peak for today's small models, and the T4 plan."""
    from bench.common import machine

    from ptlm.model.profile import facts_for
    from ptlm.plan.facts import KNOWN_GPUS, HardwareFacts
    from ptlm.plan.memory import Job, estimate
    from ptlm.plan.planner import plan
    from ptlm.run.tools.memtrace import measure_step

    h100 = HardwareFacts.from_spec(KNOWN_GPUS["H100-80GB"])
    t4 = HardwareFacts.from_spec(KNOWN_GPUS["T4"])
    print(f"Machine: {machine()}; date {date.today()}; FakeTensorMode + MemTracker; "
          f"setting {FAMILY_SETTING.describe()}\n")
    print("| model | params | seq | peak: predicted GiB | measured GiB | error | forward/backward"
          " peak: predicted | measured | error | `ptlm plan --gpu T4 --global-batch 16` chooses |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in PUBLISHED:
        config = published_config(name)
        for seq in FAMILY_SEQS:
            t0 = time.time()
            facts = facts_for(config, name, seq)
            predicted = estimate(facts, h100, Job(seq), FAMILY_SETTING)
            step = measure_step(config, FAMILY_SETTING, seq)
            measured = step["peak_bytes"]
            # the activations' moment: a large model's peak is its optimizer step
            fb = predicted.forward_backward_peak
            fb_measured = max(step["phase_peaks"]["forward"], step["phase_peaks"]["backward"])
            predicted = predicted.peak_tensor_bytes
            try:
                p = plan(facts, t4, Job(seq, 16))
                chosen = f"{p.setting.describe()} × {p.grad_accum}"
            except Exception as e:  # noqa: BLE001 - "does not fit" is a row too
                chosen = f"nothing fits ({str(e).splitlines()[0][:60]}...)"
            print(f"| {name} | {facts.parameters / 1e6:.0f} M | {seq} | {predicted / GiB:.2f} | "
                  f"{measured / GiB:.2f} | {predicted / measured - 1:+.1%} | {fb / GiB:.2f} | "
                  f"{fb_measured / GiB:.2f} | {fb / fb_measured - 1:+.1%} | {chosen} | "
                  f"<!-- {time.time() - t0:.0f} s -->", flush=True)


def measure(alias: str, seq_len: int, setting: Setting) -> tuple[int, int]:
    """(predicted peak tensor bytes, measured peak bytes)."""
    from ptlm.model.config import known_config
    from ptlm.plan.facts import KNOWN_GPUS, HardwareFacts, ModelFacts
    from ptlm.plan.memory import Job, estimate
    from ptlm.run.tools.memtrace import measure_step

    config = known_config(alias)
    hw = HardwareFacts.from_spec(KNOWN_GPUS["H100-80GB"])  # GPU size does not enter the tensors
    predicted = estimate(ModelFacts.from_config(config), hw, Job(seq_len), setting)
    measured = measure_step(config, setting, seq_len)["peak_bytes"]
    return predicted.peak_tensor_bytes, measured


def headline() -> list[str]:
    from ptlm.model.config import known_config, model_facts
    from ptlm.plan.facts import KNOWN_GPUS, HardwareFacts
    from ptlm.plan.memory import Job
    from ptlm.plan.planner import plan
    from ptlm.plan.setting import PLAIN_HF
    from ptlm.run.tools.memtrace import measure_step

    config = known_config("opt-125m")
    t4 = HardwareFacts.from_spec(KNOWN_GPUS["T4"])
    p = plan(model_facts("opt-125m"), t4, Job(1024, 16))
    plain = measure_step(config, PLAIN_HF.with_(micro_batch=16), 1024)["peak_bytes"]
    ours = measure_step(config, p.setting, 1024)["peak_bytes"]
    return ["| OPT-125M, seq 1024, batch 16 | setting | measured peak tensors |", "|---|---|---|",
            f"| plain Hugging Face | {PLAIN_HF.with_(micro_batch=16).describe()} | "
            f"{plain / GiB:.2f} GiB |",
            f"| ptlm plan for a 16 GB T4 | {p.setting.describe()} × {p.grad_accum} accumulation"
            f" | {ours / GiB:.2f} GiB ({ours / plain:.2f}× plain; T4 usable "
            f"{p.usable_gpu_bytes / GiB:.1f} GiB) |"]


def main() -> None:
    from bench.common import machine

    print(f"Machine: {machine()}; date {date.today()}; FakeTensorMode + MemTracker\n")
    print("| model | seq | setting | predicted GiB | measured GiB | error |")
    print("|---|---|---|---|---|---|")
    worst = 0.0
    t0 = time.time()
    for alias, seq, setting in GRID:
        predicted, measured = measure(alias, seq, setting)
        err = predicted / measured - 1
        worst = max(worst, abs(err))
        print(f"| {alias} | {seq} | {setting.describe()} | {predicted / GiB:.2f} | "
              f"{measured / GiB:.2f} | {err:+.1%} |", flush=True)
    print(f"\n{len(GRID)} settings, worst error {worst:.1%} (goal ±{TOLERANCE:.0%}); "
          f"{time.time() - t0:.0f} s\n")
    print("\n".join(headline()))


if __name__ == "__main__":
    families() if "--families" in sys.argv[1:] else main()
