"""One prepared GPU check: every GPU figure ptlm still owes, in one command and one output folder.

    # on a machine with one CUDA GPU (the device tool's H200), wheels made by bench/gpu_wheels.sh:
    python3 bench/gpu_check.py --wheels .gpu_wheels --out "$OUT"
    # here, on CPU, every stage's code path with tiny sizes (tests/test_gpu_check.py runs it):
    python bench/gpu_check.py --rehearse --out /tmp/gpu_check

Writes gpu_check.json (every record), gpu_check.md (the tables) and gpu_check_logs.tar.gz (each
child process's output) to --out. OPT architectures are built from their configs (random init,
no hub). Stages (each runs in its own child processes with a timeout, so a stage that fails
records its error and the others still run; a stage that would overrun --budget-s is skipped
with a note):

  headline    on an emulated 16 GB T4 (torch.cuda.set_per_process_memory_fraction, fp16): the
              plain Hugging Face setting (fp32, full logits, no checkpointing, micro-batch 16 x
              seq 1024, torch AdamW) runs out of memory; ptlm's plan for --gpu T4 trains 20 steps
              under the same cap. Predicted vs max_memory_allocated / max_memory_reserved. The
              training is checked, not only its memory: real text (ptlm's Portuguese sample), and
              each step's loss against an fp32 plain-PyTorch run of the same initial weights,
              data order and seed on the same device (bench/matrix_reference.py), within the CPU
              setting matrix's fp16 tolerance; steps DeepSpeed skipped on an fp16 overflow are
              skipped by the reference too. A wrong fp16 step (gradients 65,536x too small, as
              before the loss-scale fix) trails it far beyond that (tests/test_gpu_check.py).
  accuracy    planner accuracy: predicted peak tensors vs max_memory_allocated of `ptlm probe`
              steps, OPT-125M and OPT-1.3B, ZeRO 0/1/2/3, optimizer/parameter offload,
              checkpointing, AdamW/AdamW8bit, chunked loss on/off (run several at once: memory
              is per process).
  probe       `ptlm probe` under the cap: the largest micro-batch it finds vs the true largest
              (fresh capped processes, one micro-batch each, searched in parallel waves).
  throughput  ptlm vs the Hugging Face Trainer with the same DeepSpeed config, OPT-125M, seq 1024,
              bf16, global batch 16: tokens/s after warm-up, MFU, and the attention kernel that ran.
  backoff     a real CUDA OOM: a micro-batch above what fits under the cap, back-off on; it must
              halve, keep the global batch and continue.
  packing     document-aware packing (issue 16) for OPT (ptlm's block-causal mask), GPT-2 and a
              Llama of SmolLM-135M's shape (position_ids): the mechanism the behaviour check
              picks on this machine, the data's blocks with the most documents scored by ptlm
              vs each document piece alone through plain HF on CUDA (fp32, TF32 off: mean NLL
              and gradients; OPT given position_ids only fails it, tests/test_gpu_check.py),
              and forward+backward tokens/s, peak memory and attention kernels with documents
              vs one stream, alternating.

--rehearse runs the same code on CPU (DeepSpeed's CPU accelerator) with a tiny OPT: the cap is
simulated (`ptlm probe --simulate-gpu-memory`, a predicted-peak check in the plain-HF child) and
the back-off's OOM is injected (PTLM_FAULT_OOM). The headline trains fp16 there too, with
DeepSpeed's CPU fp16 check patched in that child (tests/cpu_fp16). No rehearsal figure is a GPU
figure.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
CAP_ENV = "GPU_CHECK_CAP_BYTES"  # read by the `_capped` child: set_per_process_memory_fraction
MEM_OUT_ENV = "GPU_CHECK_MEM_OUT"  # the `_capped` child writes its max allocated/reserved here
# the GPU issue's items 1-5, then document-aware packing (issue 16)
STAGES = ("headline", "accuracy", "probe", "throughput", "backoff", "packing")
RUN_ORDER = ("headline", "probe", "backoff", "throughput", "packing", "accuracy")  # accuracy: partly
EOS = "<|endoftext|>"
UNK = "<unk>"
CORPUS = ROOT / "ptlm" / "assets" / "demo_corpus_pt.jsonl"  # real text: the shipped sample
CPU_FP16 = ROOT / "tests" / "cpu_fp16"  # DeepSpeed's CPU fp16 check patched (rehearsal only)
MATRIX_ROWS = ROOT / "docs" / "matrix_rows.json"  # the CPU setting matrix's measured rows
HEADLINE_SEED = 0
# Parallel capped children on one GPU: each takes up to its cap plus a CUDA context (about
# 0.5 GiB with cuBLAS and the caching allocator's first blocks; 1 GiB to be safe), and all of them
# within this share of the memory free at the start.
CUDA_CONTEXT_BYTES = 1 * 2**30
FREE_MEMORY_USABLE = 0.9


# ============================================================================== sizes

@dataclass
class Sizes:
    """Everything that differs between the real check and the CPU rehearsal."""

    rehearse: bool
    small: str  # model spec: OPT-125M, or a tiny config folder
    large: str  # OPT-1.3B, or a slightly larger tiny config
    seq: int
    vocab: int  # synthetic tokenizer's ids (from-scratch rounds the embedding up to 8)
    train_blocks: int
    headline_steps: int
    throughput_steps: int
    warmup_steps: int
    backoff_steps: int
    parallel: int  # child processes at once (accuracy, probe truth)
    probe_global: int  # `ptlm probe`'s global batch: it tries the divisors of it
    truth_limit: int  # the true-largest search goes up to this micro-batch
    budget_s: float
    packing_micro: int  # blocks per timed forward+backward, documents vs stream
    packing_steps: int  # timed passes each way (after a warm-up)
    stage_min_s: dict = field(default_factory=dict)  # a stage is skipped below this much budget
    headline_lr: float = 3e-3  # peak LR of the headline's run and of its fp32 reference


def real_sizes(budget_s: float) -> Sizes:
    return Sizes(rehearse=False, small="opt-125m", large="opt-1.3b", seq=1024, vocab=50265,
                 train_blocks=420, headline_steps=20, throughput_steps=10, warmup_steps=3,
                 backoff_steps=3, headline_lr=6e-4, parallel=6, probe_global=64, truth_limit=128,
                 budget_s=budget_s, packing_micro=8, packing_steps=10,
                 stage_min_s={"headline": 120, "probe": 60, "backoff": 40, "throughput": 70,
                              "packing": 45, "accuracy": 60})


def rehearsal_sizes(budget_s: float, work: Path) -> Sizes:
    from transformers import OPTConfig

    tiny = dict(dropout=0.0, attention_dropout=0.0, max_position_embeddings=128, vocab_size=256)
    small, large = work / "tiny-opt", work / "tiny-opt-2"
    OPTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
              word_embed_proj_dim=32, **tiny).save_pretrained(small)
    OPTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=2, ffn_dim=96,
              word_embed_proj_dim=48, **tiny).save_pretrained(large)
    return Sizes(rehearse=True, small=str(small), large=str(large), seq=32, vocab=253,
                 train_blocks=340, headline_steps=20, throughput_steps=5, warmup_steps=2,
                 backoff_steps=2, headline_lr=3e-3, parallel=2, probe_global=16, truth_limit=32,
                 budget_s=budget_s, packing_micro=2, packing_steps=2,
                 stage_min_s={s: 5 for s in STAGES})


def packing_models(s: Sizes, work: Path) -> list[str]:
    """One model per packing route: OPT (ptlm's block-causal mask), GPT-2 and a Llama (position_ids;
    the Llama with grouped-query attention, SmolLM-135M's shape), built from configs."""
    from transformers import GPT2Config, LlamaConfig

    gpt2, llama = work / "packing-gpt2", work / "packing-llama"
    if s.rehearse:
        GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=256, n_positions=128,
                   resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0).save_pretrained(gpt2)
        LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                    num_attention_heads=4, num_key_value_heads=2, vocab_size=256,
                    max_position_embeddings=128).save_pretrained(llama)
        return [s.small, str(gpt2), str(llama)]
    LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                num_attention_heads=9, num_key_value_heads=3, vocab_size=50272,
                max_position_embeddings=2048, tie_word_embeddings=True).save_pretrained(llama)
    return [s.small, "gpt2", str(llama)]


# The planner-accuracy grid: (model: "small"/"large", micro-batch, forced knobs). Real: OPT-125M and
# OPT-1.3B at seq 1024 over ZeRO 0/1/2/3, optimizer/parameter offload, checkpointing, AdamW/8-bit,
# chunked loss on/off.
ACCURACY_GRID = [
    ("small", 8, dict(precision="bf16", zero=0, checkpointing="off", optimizer="adamw",
                      chunked_loss="on")),
    ("small", 8, dict(precision="bf16", zero=0, checkpointing="off", optimizer="adamw",
                      chunked_loss="off")),
    ("small", 16, dict(precision="bf16", zero=0, checkpointing="on", optimizer="adamw",
                       chunked_loss="on")),
    ("small", 4, dict(precision="fp32", zero=0, checkpointing="off", optimizer="adamw",
                      chunked_loss="off")),
    ("small", 8, dict(precision="bf16", zero=0, checkpointing="off", optimizer="adamw8bit",
                      chunked_loss="on")),
    ("small", 8, dict(precision="bf16", zero=1, checkpointing="off", optimizer="adamw",
                      chunked_loss="on")),
    ("small", 16, dict(precision="bf16", zero=2, checkpointing="on", optimizer="adamw8bit",
                       chunked_loss="on")),
    ("small", 8, dict(precision="bf16", zero=2, offload="optimizer", checkpointing="off",
                      optimizer="adamw", chunked_loss="on")),
    ("small", 8, dict(precision="bf16", zero=3, checkpointing="off", optimizer="adamw",
                      chunked_loss="on")),
    ("small", 8, dict(precision="bf16", zero=3, offload="parameters", checkpointing="on",
                      optimizer="adamw", chunked_loss="on")),
    ("large", 8, dict(precision="bf16", zero=0, checkpointing="on", optimizer="adamw",
                      chunked_loss="on")),
    ("large", 8, dict(precision="bf16", zero=1, checkpointing="on", optimizer="adamw",
                      chunked_loss="on")),
    ("large", 8, dict(precision="bf16", zero=2, checkpointing="on", optimizer="adamw8bit",
                      chunked_loss="on")),
    ("large", 8, dict(precision="bf16", zero=3, checkpointing="on", optimizer="adamw",
                      chunked_loss="on")),
    ("large", 8, dict(precision="bf16", zero=2, offload="optimizer", checkpointing="on",
                      optimizer="adamw", chunked_loss="on")),
    ("large", 2, dict(precision="bf16", zero=0, checkpointing="off", optimizer="adamw",
                      chunked_loss="off")),
]
# The rehearsal: the same code path, a few settings DeepSpeed's CPU accelerator runs quickly.
REHEARSAL_GRID = [
    ("large", 4, dict(precision="fp32", zero=2, checkpointing="on", optimizer="adamw",
                      chunked_loss="off")),
]
# The knobs of a setting that does not fit micro-batch 16 x 1024 of OPT-125M on a T4 (for the
# back-off stage), tried in order; the first whose prediction says so is used.
BACKOFF_CANDIDATES = [
    dict(precision="fp16", zero=0, offload="none", checkpointing="off", optimizer="adamw",
         chunked_loss="on"),
    dict(precision="fp16", zero=0, offload="none", checkpointing="off", optimizer="adamw",
         chunked_loss="off"),
]
BACKOFF_MICRO_BATCHES = (16, 32, 64, 128)
KNOBS = ("precision", "zero", "offload", "checkpointing", "optimizer", "chunked_loss")


def knob_flags(knobs: dict) -> list[str]:
    flags = []
    for k in KNOBS:
        if k in knobs:
            v = knobs[k]
            if isinstance(v, bool):
                v = "on" if v else "off"
            flags += [f"--{k.replace('_', '-')}", str(v)]
    return flags


def as_setting_dict(knobs: dict, micro: int) -> dict:
    d = {"offload": "none"}
    for k, v in knobs.items():
        d[k] = {"on": True, "off": False}.get(v, v) if k in ("checkpointing", "chunked_loss") else v
    d["zero"] = int(d.get("zero", 0))
    d["micro_batch"] = micro
    return d


def describe_knobs(knobs: dict, micro: int) -> str:
    try:
        from ptlm.plan.setting import Setting

        return Setting(**as_setting_dict(knobs, micro)).describe()
    except Exception:  # noqa: BLE001 - a description is not worth a failed stage
        return f"{knobs}, micro-batch {micro}"


# ============================================================================== child processes

def child_capped(argv: list[str]) -> None:
    """`_capped SCRIPT ARGS...`: cap this process's CUDA memory (CAP_ENV bytes), run SCRIPT as
    __main__, and record max_memory_allocated / max_memory_reserved at exit (MEM_OUT_ENV)."""
    import atexit
    import runpy

    import torch

    cap = int(os.environ.get(CAP_ENV, "0") or 0)
    mem_out = os.environ.get(MEM_OUT_ENV)
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        if cap:
            torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)

        def record() -> None:
            if mem_out:
                Path(mem_out).write_text(json.dumps({
                    "max_allocated": torch.cuda.max_memory_allocated(0),
                    "max_reserved": torch.cuda.max_memory_reserved(0), "cap": cap or None,
                    "total": total}))

        atexit.register(record)
    sys.argv = list(argv)
    sys.path.insert(0, str(ROOT))
    runpy.run_path(argv[0], run_name="__main__")


def child_plain_hf(argv: list[str]) -> None:
    """`_plain_hf SPEC SEQ MICRO STEPS SIMULATED_PEAK`: the plain Hugging Face recipe (fp32 model,
    full logits, no checkpointing, torch AdamW; the outputs held through backward as the HF
    example scripts do) under the cap. Prints one JSON line. On CPU a prediction above the cap
    stands in for the OOM (SIMULATED_PEAK, 0 = none)."""
    import torch
    from transformers import AutoModelForCausalLM

    from ptlm.model.config import resolve_config

    spec, seq, micro, steps, simulated = argv[0], int(argv[1]), int(argv[2]), int(argv[3]), \
        int(argv[4])
    cap = int(os.environ.get(CAP_ENV, "0") or 0)
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    if cuda and cap:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), 0)
    torch.manual_seed(0)
    config = resolve_config(spec)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(dev)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    result = {"oom": False, "phase": None, "steps_done": 0, "simulated": False,
              "attn_implementation": getattr(model.config, "_attn_implementation", None)}
    phase = "forward"
    try:
        for _ in range(steps):
            ids = torch.randint(0, config.vocab_size, (micro, seq), device=dev)
            phase = "forward"
            out = model(input_ids=ids, labels=ids)
            phase = "backward"
            out.loss.backward()
            phase = "step"
            opt.step()
            opt.zero_grad(set_to_none=True)
            del out
            if not cuda and cap and simulated > cap:
                raise torch.OutOfMemoryError("simulated: predicted peak above the cap")
            result["steps_done"] += 1
    except torch.OutOfMemoryError as e:
        result.update(oom=True, phase=phase, error=str(e).splitlines()[0][:300],
                      simulated=not cuda)
    if cuda:
        result.update(max_allocated=torch.cuda.max_memory_allocated(),
                      max_reserved=torch.cuda.max_memory_reserved())
    print(json.dumps(result))


def child_init(argv: list[str]) -> None:
    """`_init SPEC VOCAB DEST`: the headline's initial weights, saved (fp32) so that ptlm's run
    and the fp32 reference start from the same ones: SPEC's architecture, the embedding sized as
    ptlm's --from-scratch sizes it for VOCAB ids, no dropout (the two runs would draw different
    masks), seed HEADLINE_SEED."""
    import torch
    from transformers import AutoModelForCausalLM

    from ptlm.model.config import resolve_config

    spec, vocab, dest = argv[0], int(argv[1]), argv[2]
    config = resolve_config(spec)
    config.vocab_size = max(config.vocab_size, -(-vocab // 8) * 8)
    config.dropout = config.attention_dropout = config.activation_dropout = 0.0
    torch.manual_seed(HEADLINE_SEED)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(dest)
    print(json.dumps({"parameters": sum(p.numel() for p in model.parameters()),
                      "vocab_size": config.vocab_size}))


def child_reference(argv: list[str]) -> None:
    """`_reference INIT DATA GLOBAL_BATCH STEPS LR SKIP`: the fp32 reference of the headline's run,
    plain PyTorch + transformers on this device (bench/matrix_reference.py: the documented data
    order, HF's own loss, torch AdamW, transformers' schedule); SKIP: comma-separated steps whose
    update DeepSpeed skipped on an fp16 overflow ("" for none). Prints one JSON line."""
    import torch

    from bench.matrix_reference import Recipe, reference_run

    init, data, gb, steps, lr = argv[0], argv[1], int(argv[2]), int(argv[3]), float(argv[4])
    skip = tuple(int(x) for x in argv[5].split(",") if x)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t0 = time.perf_counter()
    out = reference_run(Path(init), Path(data), Recipe(global_batch=gb, steps=steps, lr=lr,
                                                       seed=HEADLINE_SEED, skip_steps=skip),
                        device=device)
    print(json.dumps({**out, "device": device, "skip_steps": list(skip),
                      "seconds": round(time.perf_counter() - t0, 1)}))


def child_hf_trainer(argv: list[str]) -> None:
    """`_hf_trainer SPEC DATA DS_CONFIG STEPS OUT`: the Hugging Face Trainer on the same blocks with
    the same DeepSpeed config as ptlm's run (torch AdamW, as ptlm's client optimizer). Prints one
    JSON line with each step's seconds."""
    import torch
    from transformers import (AutoModelForCausalLM, Trainer, TrainerCallback, TrainingArguments,
                              default_data_collator)

    from ptlm.data.reader import PackedDataset
    from ptlm.model.config import resolve_config

    spec, data, ds_path, steps, out = argv[0], argv[1], argv[2], int(argv[3]), argv[4]
    cfg = json.loads(Path(ds_path).read_text())
    blocks = PackedDataset(data, "train")

    class Blocks(torch.utils.data.Dataset):
        def __len__(self):
            return len(blocks)

        def __getitem__(self, i):
            ids = blocks[i].long()
            return {"input_ids": ids, "labels": ids}

    config = resolve_config(spec)
    config.vocab_size = -(-blocks.vocab_size // 8) * 8  # as ptlm's --from-scratch sizes it
    torch.manual_seed(0)
    bf16 = cfg.get("bf16", {}).get("enabled", False)
    fp16 = cfg.get("fp16", {}).get("enabled", False)
    dtype = torch.bfloat16 if bf16 else torch.float16 if fp16 else torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    cfg.pop("optimizer", None)
    cfg.pop("scheduler", None)
    times: list[float] = []  # between consecutive optimizer-step ends: the whole step, data too

    class Clock(TrainerCallback):
        t = None

        def on_train_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            now = time.perf_counter()
            times.append(now - self.t)
            self.t = now

    args = TrainingArguments(
        output_dir=out, per_device_train_batch_size=cfg["train_micro_batch_size_per_gpu"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"], max_steps=steps,
        learning_rate=1e-4, adam_beta2=0.95, weight_decay=0.1, logging_steps=10**6,
        save_strategy="no", report_to=[], seed=0, bf16=bf16, fp16=fp16, deepspeed=cfg,
        dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
    Trainer(model=model, args=args, train_dataset=Blocks(), data_collator=default_data_collator,
            callbacks=[Clock()]).train()
    print(json.dumps({"step_times": times, "attn_implementation":
                      getattr(model.config, "_attn_implementation", None),
                      "max_allocated": torch.cuda.max_memory_allocated()
                      if torch.cuda.is_available() else None}))


ATTENTION_KERNEL_WORDS = ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "softmax")


def child_attention(argv: list[str]) -> None:
    """`_attention SPEC SEQ MICRO PRECISION`: build the model the way ptlm does
    (ptlm.model.load.load_model), run one forward+backward under torch.profiler and list the
    attention kernels that ran. Prints one JSON line."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ptlm.model.config import resolve_config
    from ptlm.model.load import load_model

    spec, seq, micro, precision = argv[0], int(argv[1]), int(argv[2]), argv[3]
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    config = resolve_config(spec)
    model = load_model(config, precision=precision).to(dev)
    model.train()
    ids = torch.randint(0, config.vocab_size, (micro, seq), device=dev)
    for _ in range(2):  # warm-up: kernel selection, lazy init
        model(input_ids=ids, labels=ids).loss.backward()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        model(input_ids=ids, labels=ids).loss.backward()
        if cuda:
            torch.cuda.synchronize()
    print(json.dumps({"attn_implementation": getattr(model.config, "_attn_implementation", None),
                      **_attention_kernels(prof, cuda),
                      "device": torch.cuda.get_device_name(0) if cuda else "cpu"}))


def _attention_kernels(prof, cuda: bool) -> dict:
    """{"ops": {op: calls}, "gpu_kernels": [names]}: the attention ops and CUDA kernels a
    torch.profiler run saw."""
    names: dict[str, int] = {}
    for e in prof.key_averages():
        if any(w in e.key.lower() for w in ATTENTION_KERNEL_WORDS):
            names[e.key] = names.get(e.key, 0) + int(e.count)
    gpu_kernels = []
    if cuda:
        for e in prof.events():
            dt = getattr(e, "device_type", None)
            if dt is not None and "CUDA" in str(dt) and any(
                    w in e.name.lower() for w in ATTENTION_KERNEL_WORDS):
                gpu_kernels.append(e.name)
    return {"ops": dict(sorted(names.items())), "gpu_kernels": sorted(set(gpu_kernels))[:20]}


# Packed blocks vs their document pieces alone, fp32 with TF32 off: the per-block mean NLL and
# the gradient may differ by kernel rounding only (the CPU tests hold 1e-5; a leak across
# documents moves a random model's loss by far more, tests/test_model_packing.py).
PACKING_MAX_DEV = 1e-4
PACKING_GRAD_MAX_REL = 1e-3
PACKING_EXACT_BLOCKS = 4  # the blocks with the most document pieces
PACKING_WARMUP = 2


def child_packing(argv: list[str]) -> None:
    """`_packing DATA MICRO STEPS PRECISION SPEC...`: document-aware packing on this device, per
    model spec:
    - the mechanism ptlm chooses (ptlm.run.engine.packing_record: the behaviour check) and the
      attention path it names;
    - exactness: the data's blocks with the most document pieces through ptlm's LossModule with
      their positions, vs each piece run alone through the plain HF model (no mask, no
      position_ids: bench/matrix_reference.pieces_nll), fp32 with TF32 off: |mean NLL
      difference| per block, and the relative difference of the gradients of the first block;
    - cost: a forward+backward of MICRO blocks in PRECISION with documents vs as one stream,
      alternating, STEPS times each after a warm-up: median seconds (tokens/s), peak
      allocated, and the attention kernels each way ran.
    Token ids are taken modulo the model's vocabulary (random weights; the ids' meaning is not
    tested). Prints one JSON line."""
    import torch

    from bench.matrix_reference import block_pieces
    from ptlm.data.reader import PackedDataset
    from ptlm.model.config import resolve_config
    from ptlm.model.load import load_model
    from ptlm.run.engine import packing_record

    data, micro, steps, precision, specs = Path(argv[0]), int(argv[1]), int(argv[2]), argv[3], \
        argv[4:]
    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the exactness check
    torch.backends.cudnn.allow_tf32 = False
    ds = PackedDataset(data, "train", packing="documents")
    pieces = block_pieces(data, "train", "documents")
    busiest = busiest_blocks(pieces)
    out = {"device": torch.cuda.get_device_name(0) if cuda else "cpu", "seq_len": ds.seq_len,
           "micro_batch": micro, "precision": precision, "models": []}
    for spec in specs:
        config = resolve_config(spec)
        torch.manual_seed(0)
        model = load_model(config, precision="fp32").to(dev)
        rec = {"model": Path(spec).name, **packing_record("documents", model)}
        rec["exact"] = _packing_exactness(model, ds, pieces, busiest, rec["mechanism"], dev)
        del model
        torch.manual_seed(0)
        model = load_model(config, precision=precision).to(dev)
        rec["cost"] = _packing_cost(model, ds, micro, steps, rec["mechanism"], dev)
        out["models"].append(rec)
        del model
        if cuda:
            torch.cuda.empty_cache()
    print(json.dumps(out))


def busiest_blocks(pieces: list[list[tuple[int, int]]], n: int = PACKING_EXACT_BLOCKS) -> list[int]:
    """The n blocks with the most document pieces (bench/matrix_reference.block_pieces)."""
    return sorted(range(len(pieces)), key=lambda b: -len(pieces[b]))[:n]


def _packing_exactness(model, ds, pieces, blocks, mechanism, dev) -> dict:
    import torch

    from bench.matrix_reference import pieces_nll
    from ptlm.model.forward import LossModule

    model.eval()  # no dropout: both ways see the same network
    vocab = model.get_input_embeddings().weight.shape[0]
    ours = LossModule(model, chunked=False, mechanism=mechanism)
    devs, counts_equal, grad_rel = [], True, None
    for i, b in enumerate(blocks):
        batch = ds.blocks_of([b])
        ids = (batch.input_ids % vocab).to(dev)
        mean, _, count = ours(ids, positions=batch.positions.to(dev))
        ref_sum, ref_count = pieces_nll(model, ids[0], pieces[b])
        ref = ref_sum / ref_count
        devs.append(abs(float(mean.detach()) - float(ref.detach())))
        counts_equal &= int(count) == ref_count
        if i == 0:  # the gradients of the two losses, every parameter at once
            params = [p for p in model.parameters() if p.requires_grad]
            g_ours = torch.autograd.grad(mean, params, allow_unused=True)
            g_ref = torch.autograd.grad(ref, params, allow_unused=True)
            diff = sum(float((a - r).float().pow(2).sum()) for a, r in zip(g_ours, g_ref)
                       if a is not None and r is not None)
            norm = sum(float(r.float().pow(2).sum()) for r in g_ref if r is not None)
            grad_rel = (diff / norm) ** 0.5 if norm else None
    max_dev = max(devs)
    return {"blocks": len(blocks), "pieces": [len(pieces[b]) for b in blocks],
            "max_dev": max_dev, "grad_rel_dev": grad_rel, "counts_equal": counts_equal,
            "tolerance": PACKING_MAX_DEV, "grad_tolerance": PACKING_GRAD_MAX_REL,
            "ok": bool(counts_equal and max_dev <= PACKING_MAX_DEV and grad_rel is not None
                       and grad_rel <= PACKING_GRAD_MAX_REL)}


def _packing_cost(model, ds, micro, steps, mechanism, dev) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from ptlm.model.forward import LossModule

    cuda = dev.type == "cuda"
    model.train()
    vocab = model.get_input_embeddings().weight.shape[0]
    batch = ds.blocks_of(range(micro))
    ids, positions = (batch.input_ids % vocab).to(dev), batch.positions.to(dev)
    ways = {"documents": (LossModule(model, chunked=True, mechanism=mechanism), positions),
            "stream": (LossModule(model, chunked=True), None)}

    def one(way: str) -> float:
        module, pos = ways[way]
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        module(ids, positions=pos)[0].backward()
        if cuda:
            torch.cuda.synchronize()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - t0

    for _ in range(PACKING_WARMUP):
        for way in ways:
            one(way)
    times = {way: [] for way in ways}
    for _ in range(steps):  # alternating: drift in clocks or load hits both ways alike
        for way in ways:
            times[way].append(one(way))
    rec = {}
    tokens = micro * ds.seq_len
    for way in ways:
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=acts) as prof:
            one(way)
        median = _median(times[way])
        rec[way] = {"median_s": median, "tokens_per_s": tokens / median,
                    "max_allocated": torch.cuda.max_memory_allocated() if cuda else None,
                    **_attention_kernels(prof, cuda)}
    rec["documents_over_stream"] = (rec["documents"]["tokens_per_s"]
                                    / rec["stream"]["tokens_per_s"])
    return rec


def child_env(argv: list[str]) -> None:
    """`_env`: the device, driver and library versions; a tiny bitsandbytes AdamW8bit step."""
    import importlib.metadata as md

    info: dict = {"python": sys.version.split()[0], "platform": platform.platform()}
    for pkg in ("torch", "transformers", "deepspeed", "bitsandbytes", "accelerate", "pydantic",
                "tokenizers", "pyarrow", "numpy", "triton"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            info[pkg] = None
    import torch

    info["cuda_available"] = torch.cuda.is_available()
    info["torch_cuda"] = torch.version.cuda
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(device=p.name, total_memory=int(p.total_memory),
                    free_memory=int(torch.cuda.mem_get_info(0)[0]),
                    capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    bf16=bool(torch.cuda.is_bf16_supported()))
        try:
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,name,memory.total",
                                  "--format=csv,noheader"], capture_output=True, text=True,
                                 timeout=30)
            info["nvidia_smi"] = smi.stdout.strip()
            info["driver"] = smi.stdout.split(",")[0].strip() or None
        except (OSError, subprocess.SubprocessError) as e:
            info["driver"] = f"nvidia-smi failed: {e}"
    else:
        info.update(device="cpu", total_memory=None, free_memory=None, driver=None, bf16=False)
    try:
        import bitsandbytes as bnb

        w = torch.nn.Parameter(torch.randn(4096, 2, device="cuda" if info["cuda_available"]
                                           else "cpu"))
        opt = bnb.optim.AdamW8bit([w], lr=1e-3)
        w.grad = torch.randn_like(w)
        opt.step()
        info["bnb_adamw8bit_step"] = "ok"
    except Exception as e:  # noqa: BLE001 - recorded, the 8-bit settings will say the rest
        info["bnb_adamw8bit_step"] = f"{type(e).__name__}: {str(e)[:300]}"
    try:
        import deepspeed  # noqa: F401
        from deepspeed.accelerator import get_accelerator

        info["deepspeed_accelerator"] = get_accelerator()._name
    except Exception as e:  # noqa: BLE001
        info["deepspeed_accelerator"] = f"{type(e).__name__}: {str(e)[:300]}"
    print(json.dumps(info))


CHILDREN = {"_capped": child_capped, "_plain_hf": child_plain_hf, "_hf_trainer": child_hf_trainer,
            "_attention": child_attention, "_env": child_env, "_init": child_init,
            "_reference": child_reference, "_packing": child_packing}


# ============================================================================== the parent

def last_json(text: str) -> dict | None:
    """The last JSON object printed on stdout (children may print other lines before it)."""
    dec = json.JSONDecoder()
    found = None
    pos = 0
    while True:
        i = text.find("{", pos)
        if i < 0:
            return found
        if i == 0 or text[i - 1] == "\n":
            try:
                obj, end = dec.raw_decode(text, i)
                if isinstance(obj, dict):
                    found = obj
                pos = end
                continue
            except json.JSONDecodeError:
                pass
        pos = i + 1


class StageSkipped(Exception):
    pass


class Check:
    def __init__(self, out: Path, work: Path, sizes: Sizes, site: str | None):
        self.out, self.work, self.sizes = out, work, sizes
        self.logs = work / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.t0 = time.monotonic()
        self.deadline = self.t0 + sizes.budget_s
        self.record: dict = {"rehearsal": sizes.rehearse, "started": _now(),
                             "budget_s": sizes.budget_s, "stages": {}}
        pythonpath = [str(ROOT)] + ([site] if site else []) + \
            [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
        self.env = {**os.environ, "PYTHONPATH": os.pathsep.join(pythonpath),
                    "DS_ACCELERATOR": "cpu" if sizes.rehearse else "cuda",
                    "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                    "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
        if sizes.rehearse:
            self.env.setdefault("OMP_NUM_THREADS", "1")
            if "TORCH_EXTENSIONS_DIR" not in os.environ:
                self.env["TORCH_EXTENSIONS_DIR"] = str(private_extensions_dir())
        else:
            self.env.setdefault("OMP_NUM_THREADS", "4")  # 16 cores, up to 6 children at once
        self.device: dict = {}
        self.data: Path | None = None
        self.cap: int | None = None
        self._n = 0
        self._lock = threading.Lock()
        # DeepSpeed's CPU Adam (the offload rows) is JIT-built into a folder of its own: ptlm
        # waits for any build lock in the extensions folder before starting DeepSpeed, and the
        # other children need no JIT op, so they never wait on that build.
        self.offload_ext = {"TORCH_EXTENSIONS_DIR": str(work / "torch_extensions_offload")}

    # ---------------------------------------------------------------- processes
    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def run(self, name: str, args: list[str], timeout: float, cap: int | None = None,
            env: dict | None = None, mem_out: bool = False) -> dict:
        """Run `python ARGS` (cwd: the repo) with a timeout (never past the budget); returns rc,
        seconds, stdout, the tail of its output and, with mem_out, the _capped child's memory."""
        with self._lock:
            self._n += 1
            tag = f"{self._n:02d}-{name}"
        log = self.logs / f"{tag}.log"
        # each child its own probe cache: no run's micro-batch is lowered by another's probe
        e = {**self.env, "PTLM_CACHE": str(self.work / "ptlm_cache" / tag), **(env or {})}
        if cap:
            e[CAP_ENV] = str(cap)
        mem_file = self.work / f"{tag}.mem.json"
        if mem_out:
            e[MEM_OUT_ENV] = str(mem_file)
        timeout = max(1.0, min(timeout, self.remaining()))
        cmd = [sys.executable, *args]
        t0 = time.perf_counter()
        with open(log, "w") as err:
            err.write(f"$ {' '.join(cmd)}\n")
            err.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=err,
                                    text=True, start_new_session=True)
            try:
                stdout, _ = proc.communicate(timeout=timeout)
                timed_out = False
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)  # this child's own process group
                stdout, _ = proc.communicate()
                timed_out = True
        with open(log, "a") as f:
            f.write("\n--- stdout ---\n" + (stdout or ""))
        res = {"rc": proc.returncode, "seconds": round(time.perf_counter() - t0, 2),
               "timed_out": timed_out, "stdout": stdout or "", "log": log.name}
        if mem_out and mem_file.exists():
            res["mem"] = json.loads(mem_file.read_text())
        if proc.returncode != 0:
            res["tail"] = log.read_text(errors="replace")[-2500:]
        return res

    def ptlm(self, name: str, argv: list[str], timeout: float, cap: int | None = None,
             env: dict | None = None, launch: str | None = None) -> dict:
        """A ptlm CLI command; train/probe go through launch/*.py inside the `_capped` child."""
        if launch:
            return self.run(name, [str(Path(__file__)), "_capped", f"launch/{launch}.py",
                                   *argv], timeout, cap=cap, env=env, mem_out=True)
        return self.run(name, ["-m", "ptlm", *argv], timeout, env=env)

    # ---------------------------------------------------------------- stages
    def stage(self, name: str, fn) -> None:
        rec: dict = {"status": "running"}
        self.record["stages"][name] = rec
        need = self.sizes.stage_min_s.get(name, 30)
        t0 = time.perf_counter()
        if self.remaining() < need:
            rec.update(status="skipped", note=f"budget: {self.remaining():.0f} s left of "
                       f"{self.sizes.budget_s:.0f}, the stage needs ~{need} s")
        else:
            try:
                fn(rec)
                if rec["status"] == "running":
                    rec["status"] = "ok"
            except StageSkipped as e:
                rec.update(status="skipped", note=str(e))
            except Exception as e:  # noqa: BLE001 - one stage's failure never stops the others
                import traceback

                rec.update(status="error", error=f"{type(e).__name__}: {e}",
                           traceback=traceback.format_exc()[-3000:])
        rec["seconds"] = round(time.perf_counter() - t0, 1)
        print(f"[gpu_check] {name}: {rec['status']} ({rec['seconds']} s)"
              + (f" - {rec.get('error') or rec.get('note')}" if rec["status"] != "ok" else ""),
              flush=True)
        self.save()

    def save(self) -> None:
        with self._lock:
            self.record["elapsed_s"] = round(time.monotonic() - self.t0, 1)
            self.out.mkdir(parents=True, exist_ok=True)
            text = json.dumps(self.record, indent=2, default=str)
            (self.out / "gpu_check.json").write_text(text)
            (self.out / "gpu_check.md").write_text(render_md(json.loads(text)))

    # ---------------------------------------------------------------- setup
    def start_prebuild(self):
        """`python -m ptlm.run.machine.prebuild` in the background: builds DeepSpeed's CPU Adam into the
        offload rows' own extensions folder while the first stages run."""
        log = open(self.logs / "00-prebuild-ops.log", "w")
        proc = subprocess.Popen([sys.executable, "-m", "ptlm.run.machine.prebuild"], cwd=ROOT,
                                env={**self.env, **self.offload_ext}, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        return proc, log, time.perf_counter()

    def finish_prebuild(self, prebuild) -> None:
        proc, log, t0 = prebuild
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our own child, still building at the end
            proc.wait()
        log.close()
        self.record["prebuild_ops"] = {"rc": proc.returncode, "log": "00-prebuild-ops.log",
                                       "seconds_until_checked": round(time.perf_counter() - t0)}

    def setup_env(self) -> None:
        r = self.run("env", [str(Path(__file__)), "_env"], 180)
        info = last_json(r["stdout"]) or {"error": r.get("tail", "no output")}
        self.record["environment"] = {**info, "date": _now(), "host": platform.node(),
                                      "cpus": os.cpu_count()}
        self.record["versions"] = versions = version_report(info)
        print("[gpu_check] versions that ran: " + "; ".join(
            f"{v['package']} {v['version']} ({v['verdict']})" for v in versions), flush=True)
        self.device = info
        if not self.sizes.rehearse and not info.get("cuda_available"):
            raise SystemExit("gpu_check: no CUDA GPU here; use --rehearse for the CPU rehearsal")

    def setup_data(self) -> None:
        """Real text (the shipped Portuguese sample, its documents repeated in a fresh shuffle
        until there are enough blocks) and a word-level tokenizer of OPT's vocabulary size: the
        sample's words by frequency, then filler words, never seen. Prepared by `ptlm prepare`:
        training's embedding table is OPT's (50272 rows), and a wrong step shows in the loss
        (uniformly random ids sit at ln(vocab) whatever the gradients are)."""
        from collections import Counter

        from tokenizers import Tokenizer, models, pre_tokenizers

        s = self.sizes
        docs = [json.loads(line)["text"] for line in CORPUS.read_text("utf-8").splitlines()
                if line.strip()]
        counts = Counter(w for d in docs for w in d.split())
        known = [w for w, _ in counts.most_common(s.vocab - 2)]  # the rehearsal's vocab is small
        filler = [f"w{i}" for i in range(s.vocab - 2 - len(known))]
        vocab = {EOS: 0, UNK: 1, **{w: i for i, w in enumerate(known + filler, start=2)}}
        tok_dir = self.work / "tokenizer"
        tok_dir.mkdir(exist_ok=True)
        tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.save(str(tok_dir / "tokenizer.json"))
        (tok_dir / "tokenizer_config.json").write_text(json.dumps(
            {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": EOS, "bos_token": EOS,
             "unk_token": UNK}))
        rng = random.Random(HEADLINE_SEED)
        words = int(s.train_blocks * s.seq * 1.08)
        corpus = self.work / "corpus.jsonl"
        written = 0
        with open(corpus, "w") as f:
            while written < words:
                for d in rng.sample(docs, len(docs)):
                    f.write(json.dumps({"text": d}, ensure_ascii=False) + "\n")
                    written += len(d.split())
        data = self.work / "data"
        r = self.ptlm("prepare", ["prepare", str(corpus), "--tokenizer", str(tok_dir),
                                  "--seq-len", str(s.seq), "--out", str(data),
                                  "--val-fraction", "0.04", "--no-progress", "--overwrite"], 240)
        if r["rc"] != 0:
            raise RuntimeError(f"ptlm prepare failed: {r.get('tail')}")
        self.data = data
        self.record["data"] = {"seq_len": s.seq, "vocab": s.vocab, "words": written,
                               "text": f"{CORPUS.name}, {len(docs)} documents repeated",
                               "distinct_words": len(counts), "in_vocab": len(known),
                               "prepare_s": r["seconds"]}

    # ---------------------------------------------------------------- predictions
    def hardware(self, gpu: str | None):
        """The planner's facts for the emulated T4 (gpu='T4') or for this device."""
        from dataclasses import replace

        from ptlm.plan.facts import KNOWN_GPUS, UNKNOWN_GPU, HardwareFacts, lookup_gpu

        if gpu:
            hw = HardwareFacts.from_spec(KNOWN_GPUS[gpu])
            if self.sizes.rehearse and self.cap:  # the rehearsal's "T4" is the simulated cap
                hw = replace(hw, gpu_memory_bytes=self.cap)
            return hw
        name = self.device.get("device") or "unknown"
        total = int(self.device.get("total_memory") or 64 * GiB)  # CPU: any size, unchecked
        spec = lookup_gpu(name, total) or UNKNOWN_GPU
        hw = HardwareFacts.from_spec(replace(spec, memory_bytes=total))
        return replace(hw, gpu_name=name, bf16=bool(self.device.get("bf16")),
                       device_type="cpu" if self.sizes.rehearse else "cuda")

    def predict(self, spec: str, knobs: dict, micro: int, global_batch: int, gpu: str | None,
                keep_outputs: bool = False) -> dict:
        from ptlm.model.config import model_facts
        from ptlm.plan.memory import Job, estimate
        from ptlm.plan.setting import Setting

        m = estimate(model_facts(spec), self.hardware(gpu),
                     Job(self.sizes.seq, global_batch, keep_outputs=keep_outputs),
                     Setting(**as_setting_dict(knobs, micro)))
        return {"peak_tensor_bytes": m.peak_tensor_bytes, "gpu_total": m.gpu_total,
                "peak_phase": m.peak_phase}

    def parallel_under(self, cap: int) -> int:
        """How many capped children fit the device at once: each may take its whole cap (a trial
        that does not fit runs until it hits it) plus a CUDA context, and together they must fit
        the memory free when the check started, with a margin for fragmentation. More at once
        would make real OOMs of the search read as "does not fit". CPU (rehearsal): no device
        memory to share, sizes.parallel."""
        free = self.device.get("free_memory")
        if not free:
            return self.sizes.parallel
        fit = int(free * FREE_MEMORY_USABLE // (cap + CUDA_CONTEXT_BYTES))
        return max(1, min(self.sizes.parallel, fit))

    def model_spec(self, which: str) -> str:
        return self.sizes.small if which == "small" else self.sizes.large

    # ---------------------------------------------------------------- 1. headline
    def headline(self, rec: dict) -> None:
        s = self.sizes
        rec["cap_bytes"] = self.cap
        rec["emulates"] = "T4 (no bf16: fp16)" + (", simulated on CPU" if s.rehearse else "")
        plain_knobs = dict(precision="fp32", zero=0, offload="none", checkpointing="off",
                           optimizer="adamw", chunked_loss="off")
        pred = self.predict(s.small, plain_knobs, 16, 16, "T4", keep_outputs=True)
        r = self.run("plain-hf", [str(Path(__file__)), "_plain_hf", s.small, str(s.seq), "16",
                                  "2", str(pred["gpu_total"])], 240, cap=self.cap)
        plain = last_json(r["stdout"]) or {"error": r.get("tail")}
        rec["plain_hf"] = {"setting": describe_knobs(plain_knobs, 16), "predicted": pred,
                           **plain, "seconds": r["seconds"]}
        # ptlm's plan for a T4, as a user gets it, then trained under the same cap.
        plan_file = self.work / "t4_plan.json"
        flags = ["--gpu", "T4"]
        if s.rehearse:  # CPU: fp16 as a T4 trains (no bf16), no offload; the cap as its memory
            flags = ["--gpu-memory", str(self.cap), "--no-bf16", "--precision", "fp16",
                     "--offload", "none"]
        r = self.ptlm("plan-t4", ["plan", "--model", s.small, "--seq-len", str(s.seq),
                                  "--global-batch", "16", *flags, "--json"], 120)
        p = last_json(r["stdout"])
        if not p:
            raise RuntimeError(f"ptlm plan failed: {r.get('tail')}")
        plan_file.write_text(json.dumps(p))
        setting = p["setting"] if "setting" in p else p["chosen"]["setting"]
        mem = p.get("memory") or p["chosen"]["memory"]
        rec["ptlm_plan"] = {"setting": setting, "grad_accum": p.get("grad_accum"),
                            "predicted": {"peak_tensor_bytes": mem["peak_tensor_bytes"],
                                          "gpu_total": mem["gpu_total"]}}
        self.t4_setting = setting
        # The same initial weights for ptlm's run and the fp32 reference.
        init = self.work / "init-t4"
        r = self.run("init", [str(Path(__file__)), "_init", s.small, str(s.vocab), str(init)],
                     180)
        if r["rc"] != 0:
            raise RuntimeError(f"saving the initial weights failed: {r.get('tail')}")
        out = self.work / "run-t4"
        env = None
        if s.rehearse:  # DeepSpeed refuses fp16 on a CPU without oneDNN fp16 kernels: patched
            env = {"PYTHONPATH": os.pathsep.join([str(CPU_FP16), self.env["PYTHONPATH"]]),
                   "PTLM_TEST_CPU_FP16": "1"}
        r = self.ptlm("train-t4", ["--model", str(init), "--data", str(self.data),
                                   "--out", str(out), "--plan", str(plan_file), "--max-steps",
                                   str(s.headline_steps), "--no-export", "--eval-max-blocks", "2",
                                   "--global-batch", "16", "--lr", str(s.headline_lr),
                                   "--seed", str(HEADLINE_SEED)], 300, cap=self.cap, env=env,
                      launch="train")
        train = read_metrics(out)
        steps = [m for m in train if m.get("kind") == "train"]
        rec["ptlm_run"] = {"rc": r["rc"], "seconds": r["seconds"], "steps": len(steps),
                           "backoffs": [m for m in train if m.get("kind") == "oom_backoff"],
                           "max_allocated": (r.get("mem") or {}).get("max_allocated"),
                           "max_reserved": (r.get("mem") or {}).get("max_reserved"),
                           "final_loss": steps[-1]["loss"] if steps else None}
        if r["rc"] != 0:
            rec["ptlm_run"]["tail"] = r.get("tail")
        run = rec["ptlm_run"]
        if run["max_allocated"]:
            run["error"] = mem["peak_tensor_bytes"] / run["max_allocated"] - 1
        ok_plain = plain.get("oom") is True
        ok_ptlm = r["rc"] == 0 and len(steps) >= s.headline_steps and not run["backoffs"]
        rec["fp16_vs_fp32"] = cmp = self.compare_with_reference(
            init, [m["loss"] for m in steps], skipped_steps((self.logs / r["log"]).read_text(
                errors="replace")), setting.get("precision"))
        rec["verdict"] = {"plain_hf_out_of_memory": ok_plain, "ptlm_trained_all_steps": ok_ptlm,
                          "losses_match_the_fp32_reference": cmp.get("ok", False)}
        if not all(rec["verdict"].values()):
            rec["status"] = "failed"

    def compare_with_reference(self, init: Path, losses: list[float], skipped: list[int],
                               precision: str | None) -> dict:
        """Each step's loss of the T4 run against the fp32 reference's (skipping the updates
        DeepSpeed skipped), within the CPU setting matrix's tolerance for the run's precision."""
        s = self.sizes
        tolerance, evidence = matrix_tolerance(precision or "fp16")
        r = self.run("reference-fp32", [str(Path(__file__)), "_reference", str(init),
                                        str(self.data), "16", str(s.headline_steps),
                                        str(s.headline_lr), ",".join(map(str, skipped))], 600)
        ref = last_json(r["stdout"])
        if not ref:
            return {"ok": False, "error": (r.get("tail") or "no output")[-2000:]}
        n = min(len(losses), len(ref["losses"]))
        devs = [abs(a - b) for a, b in zip(losses[:n], ref["losses"][:n])]
        worst = max(devs) if devs else None
        return {"ok": bool(devs) and n == s.headline_steps and worst <= tolerance,
                "max_dev": worst, "tolerance": tolerance, "tolerance_from": evidence,
                "losses": losses, "reference": ref["losses"], "skipped_steps": skipped,
                "reference_device": ref.get("device"), "reference_seconds": r["seconds"],
                "first_loss": losses[0] if losses else None,
                "last_loss": losses[-1] if losses else None}

    # ---------------------------------------------------------------- 2. accuracy
    def accuracy(self, rec: dict) -> None:
        s = self.sizes
        grid = REHEARSAL_GRID if s.rehearse else ACCURACY_GRID
        free = self.device.get("free_memory") or 0
        budget_bytes = FREE_MEMORY_USABLE * free if free else float("inf")
        jobs = []
        for i, (which, micro, knobs) in enumerate(grid):
            spec = self.model_spec(which)
            row = {"model": spec, "seq": s.seq, "micro_batch": micro, "knobs": knobs,
                   "setting": describe_knobs(knobs, micro)}
            try:
                row["predicted"] = self.predict(spec, knobs, micro, 2 * micro, None)
                # `ptlm probe` walks up to the next option (2m, one micro-step) once m fits
                row["walk_up_gpu_total"] = self.predict(spec, knobs, 2 * micro, 2 * micro,
                                                        None)["gpu_total"]
            except Exception as e:  # noqa: BLE001
                row["predicted_error"] = f"{type(e).__name__}: {e}"
            jobs.append((i, row))
        rows = [row for _, row in jobs]
        rec["rows"] = rows

        def measure(item):
            i, row = item
            if self.remaining() < 20:
                row["status"] = "skipped (budget)"
                return
            argv = ["--model", row["model"], "--from-scratch", "--seq-len", str(s.seq),
                    "--global-batch", str(2 * row["micro_batch"]), "--micro-batch",
                    str(row["micro_batch"]), *knob_flags(row["knobs"]), "--json"]
            offload = row["knobs"].get("offload", "none") != "none"
            r = self.ptlm(f"accuracy-{i}", argv, 300, launch="probe",
                          env=self.offload_ext if offload else None)
            out = last_json(r["stdout"]) or {}
            trial = (out.get("trials") or {}).get(str(row["micro_batch"]))
            row.update(seconds=r["seconds"], rc=r["rc"])
            if not trial:
                row["status"] = "error"
                row["error"] = (r.get("tail") or "no probe output")[-1500:]
                return
            row["fits"] = trial.get("fits")
            row["max_allocated"] = trial.get("max_allocated")
            row["max_reserved"] = trial.get("max_reserved")
            pred = (row.get("predicted") or {}).get("peak_tensor_bytes")
            if pred and row["max_allocated"]:
                row["error"] = pred / row["max_allocated"] - 1
            row["status"] = "ok" if trial.get("fits") else "oom"

        run_parallel(jobs, measure, s.parallel,
                     weight=lambda item: CUDA_CONTEXT_BYTES + max(
                         (item[1].get("predicted") or {}).get("gpu_total", 0),
                         item[1].get("walk_up_gpu_total", 0)),
                     capacity=budget_bytes)
        errs = [abs(r["error"]) for r in rows if isinstance(r.get("error"), float)]
        rec["measured"] = len(errs)
        rec["worst_abs_error"] = max(errs) if errs else None
        rec["mean_abs_error"] = sum(errs) / len(errs) if errs else None
        if not s.rehearse and len(errs) < 12:
            rec["status"] = "incomplete"
            rec["note"] = f"{len(errs)} settings measured (the issue asks for at least 12)"

    # ---------------------------------------------------------------- 3. probe
    def probe(self, rec: dict) -> None:
        s = self.sizes
        setting = getattr(self, "t4_setting", None)
        if setting is None:  # the headline has not planned (or failed to): plan here
            from ptlm.model.config import model_facts
            from ptlm.plan.memory import Job
            from ptlm.plan.planner import plan

            forced = {"precision": "fp32", "offload": "none"} if s.rehearse else {}
            setting = plan(model_facts(s.small), self.hardware("T4"), Job(s.seq, 16),
                           forced).setting.to_dict()
        knobs = {k: setting[k] for k in KNOBS if k in setting}
        cap = self.cap
        if s.rehearse:  # CPU: fp32, and a simulated cap between micro-batch 4 and 5
            knobs.update(precision="fp32", offload="none")
            cap = (self.predict(s.small, knobs, 4, 8, None)["gpu_total"]
                   + self.predict(s.small, knobs, 5, 10, None)["gpu_total"]) // 2
        rec["setting"] = describe_knobs(knobs, setting.get("micro_batch", 1))
        rec["cap_bytes"] = cap
        sim = ["--simulate-gpu-memory", str(cap)] if s.rehearse else []
        base = ["--model", s.small, "--from-scratch", "--seq-len", str(s.seq), *knob_flags(knobs)]
        r = self.ptlm("probe", [*base, "--global-batch", str(s.probe_global), *sim, "--json"],
                      300, cap=cap, launch="probe")
        out = last_json(r["stdout"]) or {}
        if "largest_micro_batch" not in out:
            raise RuntimeError(f"ptlm probe gave no result: {r.get('tail')}")
        found = out["largest_micro_batch"]
        rec["setting"] = describe_knobs(knobs, max(found, 1))
        rec["global_batch"] = s.probe_global
        rec["probe"] = {"largest_micro_batch": found, "planned": out.get("planned_micro_batch"),
                        "trials": out.get("trials"), "search_seconds": out.get("seconds"),
                        "process_seconds": r["seconds"]}
        # The truth: each micro-batch in a fresh capped process (the probe's own trial: two
        # optimizer steps of 2 accumulated micro-steps), searched in parallel waves: first the
        # probe's answer, the next micro-batch, and points up to the next option it could give.
        tried: dict[int, bool] = {}
        failed: dict[int, str] = {}
        parallel = self.parallel_under(cap)
        rec["truth_parallel"] = {"children": parallel, "free_memory": self.device.get(
            "free_memory"), "per_child": cap + CUDA_CONTEXT_BYTES}

        def trial(m: int) -> None:
            r = self.ptlm(f"truth-{m}", [*base, "--global-batch", str(2 * m), "--micro-batch",
                                         str(m), *sim, "--json"], 240, cap=cap,
                          launch="probe")
            t = ((last_json(r["stdout"]) or {}).get("trials") or {}).get(str(m))
            if t is None:  # crashed, timed out: no verdict on m
                failed[m] = (r.get("tail") or "no output")[-600:]
            else:
                tried[m] = bool(t.get("fits"))

        options = sorted(int(k) for k in (out.get("trials") or {})) or [found]
        above = [o for o in probe_options(s.probe_global) if o > found]
        lo, hi = 0, s.truth_limit + 1  # lo fits (0: none known), hi does not (limit+1: unknown)
        first = bool(found)
        t0 = time.perf_counter()
        while hi - lo > 1 and self.remaining() > 30:
            if first:  # found, found+1 and points up to the next option the probe could give
                top = min(above[0] if above else hi, hi)
                pts = [found] + wave_points(found, top, max(parallel - 1, 1), [found + 1])
                first = False
            else:
                pts = wave_points(lo, hi, parallel, [])
            pts = [m for m in pts if m not in tried and m not in failed]
            if not pts:
                break
            run_parallel(pts, trial, parallel)
            for m in sorted(tried):
                if tried[m] and lo < m < hi:
                    lo = m
                if not tried[m] and lo < m < hi:
                    hi = m
        rec["truth"] = {"largest_micro_batch": lo if hi - lo == 1 else None,
                        "bounds": [lo, hi], "at_least": lo, "limit": s.truth_limit,
                        "tried": {str(k): v for k, v in sorted(tried.items())},
                        "failed": {str(k): v for k, v in sorted(failed.items())},
                        "non_monotone": sorted(m for m, ok in tried.items() if ok and m > lo),
                        "seconds": round(time.perf_counter() - t0, 1), "simulated": s.rehearse,
                        "probe_options": options}
        if lo == s.truth_limit:
            rec["truth"]["note"] = f"fits up to the search limit {s.truth_limit}"
        elif hi - lo > 1:
            rec["status"] = "incomplete"
            rec["note"] = ("the true largest micro-batch was not pinned down (budget, or trials "
                           "that failed: see truth.failed)")

    # ---------------------------------------------------------------- 4. throughput
    def throughput(self, rec: dict) -> None:
        s = self.sizes
        precision = "fp32" if s.rehearse else "bf16"
        out = self.work / "run-throughput"
        r = self.ptlm("train-throughput", ["--model", s.small, "--from-scratch", "--data",
                                           str(self.data), "--out", str(out), "--global-batch",
                                           "16", "--precision", precision, "--max-steps",
                                           str(s.throughput_steps), "--no-export",
                                           "--eval-max-blocks", "2"], 300, launch="train")
        train = [m for m in read_metrics(out) if m.get("kind") == "train"]
        if r["rc"] != 0 or not train:
            raise RuntimeError(f"ptlm train failed: {r.get('tail')}")
        tokens_per_step = 16 * s.seq
        ours = _median([m["tokens_per_s"] for m in train[s.warmup_steps:]] or
                       [m["tokens_per_s"] for m in train])
        plan = json.loads((out / "plan.json").read_text())
        rec["setting"] = plan.get("setting")
        rec["ptlm"] = {"tokens_per_s": ours, "steps": len(train), "seconds": r["seconds"],
                       "max_allocated": (r.get("mem") or {}).get("max_allocated"),
                       "mfu_logged": _median([m["mfu"] for m in train[s.warmup_steps:]
                                              if m.get("mfu") is not None]) or None}
        r = self.run("hf-trainer", [str(Path(__file__)), "_hf_trainer", s.small, str(self.data),
                                    str(out / "ds_config.json"), str(s.throughput_steps),
                                    str(self.work / "hf-out")], 300,
                     env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0",
                          "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
        hf = last_json(r["stdout"])
        if hf and hf.get("step_times"):
            times = hf["step_times"][s.warmup_steps:] or hf["step_times"]
            rec["hf_trainer"] = {"tokens_per_s": tokens_per_step / _median(times),
                                 "steps": len(hf["step_times"]), "seconds": r["seconds"],
                                 "max_allocated": hf.get("max_allocated"),
                                 "attn_implementation": hf.get("attn_implementation")}
        else:
            rec["hf_trainer"] = {"error": (r.get("tail") or "no output")[-2000:]}
            rec["status"] = "incomplete"
        try:
            from ptlm.model.config import model_facts
            from ptlm.plan.facts import lookup_gpu
            from ptlm.plan.mfu import flops_per_token, mfu, peak_flops

            fpt = flops_per_token(model_facts(s.small), s.seq)
            spec = lookup_gpu(self.device.get("device") or "", self.device.get("total_memory"))
            peak = (peak_flops(precision, spec.peak_tflops, spec.fp32_tflops)
                    if spec and not s.rehearse else None)
            rec["flops_per_token"] = fpt
            rec["peak_flops"] = peak
            rec["peak_source"] = f"ptlm.plan.facts {spec.name} {precision}" if peak else None
            for who in ("ptlm", "hf_trainer"):
                tps = rec[who].get("tokens_per_s")
                rec[who]["mfu"] = mfu(tps, fpt, peak, 1) if tps and peak else None
        except Exception as e:  # noqa: BLE001
            rec["mfu_error"] = f"{type(e).__name__}: {e}"
        micro = (rec.get("setting") or {}).get("micro_batch", 16)
        r = self.run("attention", [str(Path(__file__)), "_attention", s.small, str(s.seq),
                                   str(micro), precision], 180)
        rec["attention"] = last_json(r["stdout"]) or {"error": (r.get("tail") or "")[-1500:]}

    # ---------------------------------------------------------------- 6. packing
    def packing(self, rec: dict) -> None:
        """Issue 16 on the device: each family's mechanism, packed == pieces alone on CUDA, and
        what documents cost against one stream (the `_packing` child)."""
        s = self.sizes
        if self.data is None:
            raise StageSkipped("no prepared data (setup failed)")
        precision = "fp32" if s.rehearse else "bf16"
        specs = packing_models(s, self.work)
        r = self.run("packing", [str(Path(__file__)), "_packing", str(self.data),
                                 str(s.packing_micro), str(s.packing_steps), precision, *specs],
                     240)
        got = last_json(r["stdout"])
        if r["rc"] != 0 or not got:
            raise RuntimeError(f"the packing child failed: {r.get('tail')}")
        rec.update(got)
        if not all(m["exact"]["ok"] for m in got["models"]):
            rec["status"] = "failed"

    def backoff(self, rec: dict) -> None:
        s = self.sizes
        # Wanted: a micro-batch M (= the global batch, no accumulation) clearly over the cap (a
        # real OOM), M/2 clearly under it (one halving, then training goes on). OPT-125M with the
        # chunked loss fits micro-batch 16 in a T4, so M grows until the prediction overflows.
        choice, fallback = None, None
        for cand in BACKOFF_CANDIDATES:
            c = dict(cand)
            if s.rehearse:  # CPU: no real OOM; PTLM_FAULT_OOM injects one at micro-batch 16
                choice = (dict(c, precision="fp32"), 16, {})
                break
            for micro in BACKOFF_MICRO_BATCHES:
                full = self.predict(s.small, c, micro, micro, "T4")
                half = self.predict(s.small, c, micro // 2, micro, "T4")
                pred = {str(micro): full, str(micro // 2): half}
                if full["gpu_total"] > 1.15 * self.cap and half["gpu_total"] < 0.9 * self.cap:
                    choice = (c, micro, pred)
                    break
                if fallback is None and full["gpu_total"] > 1.15 * self.cap:
                    fallback = (c, micro, pred)
            if choice:
                break
        choice = choice or fallback
        if choice is None:
            raise RuntimeError("no candidate setting is predicted to overflow the cap")
        knobs, micro, rec["predicted"] = choice
        rec.update(setting=describe_knobs(knobs, micro), micro_batch=micro, global_batch=micro)
        env = {"PTLM_FAULT_OOM": "1"} if s.rehearse else {}
        rec["oom"] = "injected (PTLM_FAULT_OOM=1): CPU rehearsal" if s.rehearse else \
            "real CUDA OOM under the cap"
        out = self.work / "run-backoff"
        r = self.ptlm("train-backoff", ["--model", s.small, "--from-scratch", "--data",
                                        str(self.data), "--out", str(out), "--global-batch",
                                        str(micro), "--micro-batch", str(micro),
                                        *knob_flags(knobs), "--max-steps",
                                        str(s.backoff_steps), "--no-export",
                                        "--eval-max-blocks", "1"], 300,
                      cap=self.cap, env=env, launch="train")
        metrics = read_metrics(out)
        backoffs = [m for m in metrics if m.get("kind") == "oom_backoff"]
        steps = [m for m in metrics if m.get("kind") == "train"]
        rec.update(rc=r["rc"], seconds=r["seconds"], backoffs=backoffs, steps=len(steps),
                   micro_batches=sorted({m.get("micro_batch") for m in steps}),
                   max_allocated=(r.get("mem") or {}).get("max_allocated"),
                   max_reserved=(r.get("mem") or {}).get("max_reserved"))
        if r["rc"] != 0:
            rec["tail"] = r.get("tail")
        halved = bool(backoffs) and backoffs[0].get("micro_batch") == micro // 2
        kept = all(m.get("micro_batch", 0) * m.get("grad_accum", 0) == micro for m in backoffs)
        done = r["rc"] == 0 and len(steps) >= s.backoff_steps
        rec["verdict"] = {"halved": halved, "global_batch_kept": bool(backoffs) and kept,
                          "continued_to_the_end": done}
        if not (halved and kept and done):
            rec["status"] = "failed"


VERSIONED = ("torch", "transformers", "deepspeed", "bitsandbytes", "tokenizers", "pyarrow",
             "numpy")


def declared_requirements() -> dict:
    """setup.cfg's install_requires, by package name."""
    import configparser

    from packaging.requirements import Requirement

    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    reqs = [Requirement(line.strip()) for line in
            cfg.get("options", "install_requires").splitlines() if line.strip()]
    return {r.name: r for r in reqs}


def version_report(info: dict) -> list[dict]:
    """Each package's version in the checked environment against the range setup.cfg declares
    (and tests: docs/benchmarks.md, "Versions"): a version outside it is one this check is the
    first to run ptlm with, and says so."""
    from packaging.version import InvalidVersion, Version

    declared = declared_requirements()
    out = []
    for name in VERSIONED:
        have, req = info.get(name), declared.get(name)
        if have is None:
            verdict = "missing"
        elif req is None:
            verdict = "not declared"
        else:
            try:
                inside = req.specifier.contains(Version(have), prereleases=True)
            except InvalidVersion:
                inside = False
            verdict = (f"within setup.cfg's {req.specifier}" if inside else
                       f"OUTSIDE setup.cfg's {req.specifier}: untested until this run")
        out.append({"package": name, "version": have, "declared": str(req.specifier)
                    if req else None, "verdict": verdict})
    return out


# ptlm/run/engine.py's warning when DeepSpeed skipped an update on an fp16 overflow.
SKIPPED_STEP = re.compile(r"fp16 gradient overflow in optimizer step (\d+): update skipped")


def skipped_steps(log_text: str) -> list[int]:
    """The optimizer steps DeepSpeed skipped on an fp16 overflow, as the run logged them."""
    return sorted({int(m) for m in SKIPPED_STEP.findall(log_text)})


def matrix_tolerance(precision: str) -> tuple[float, str]:
    """The largest per-step |loss - fp32 reference| the CPU setting matrix allows for a precision
    (bench/matrix_reference.py), and what its measured rows (docs/matrix_rows.json) reached."""
    from bench.matrix_reference import LOSS_TOLERANCE

    tolerance = LOSS_TOLERANCE[precision]
    try:
        rows = [r for r in json.loads(MATRIX_ROWS.read_text())
                if r["setting"].startswith(f"{precision}-") and "max_dev" in r]
    except (OSError, ValueError):
        rows = []
    worst = max((r["max_dev"] for r in rows), default=None)
    return tolerance, (f"the CPU setting matrix's {precision} tolerance; its {len(rows)} "
                       f"{precision} rows reached at most {worst:.2e}" if rows else
                       f"the CPU setting matrix's {precision} tolerance")


def probe_options(global_batch: int) -> list[int]:
    """The micro-batches `ptlm probe` can answer for one rank: the divisors of its batch."""
    return [d for d in range(1, global_batch + 1) if global_batch % d == 0]


def wave_points(lo: int, hi: int, k: int, must: list[int]) -> list[int]:
    """Up to k micro-batches strictly between lo and hi, spread evenly; `must` first."""
    inside = [m for m in dict.fromkeys(must) if lo < m < hi]
    n = min(k, hi - lo - 1)
    step = (hi - lo) / (n + 1)
    for j in range(1, n + 1):
        if len(inside) >= n:
            break
        m = int(round(lo + j * step))
        if lo < m < hi and m not in inside:
            inside.append(m)
    return sorted(inside)


def run_parallel(items, fn, parallel: int, weight=None, capacity: float = float("inf")) -> None:
    """fn(item) for each item, at most `parallel` at once and (with weight) the running items'
    weights within capacity (e.g. predicted GPU bytes within the device's memory)."""
    lock = threading.Condition()
    state = {"load": 0.0}

    def one(item):
        w = min(weight(item) if weight else 0.0, capacity)
        with lock:
            while state["load"] and state["load"] + w > capacity:
                lock.wait()
            state["load"] += w
        try:
            fn(item)
        finally:
            with lock:
                state["load"] -= w
                lock.notify_all()

    # heaviest first so that the light ones fill the gaps
    order = sorted(items, key=lambda it: -(weight(it) if weight else 0))
    with ThreadPoolExecutor(max_workers=max(1, parallel)) as pool:
        for f in [pool.submit(one, it) for it in order]:
            f.result()


def private_extensions_dir() -> Path:
    """The rehearsal's DeepSpeed JIT ops (the CPU shared-memory collectives): torch keys its
    extensions folder on the Python version alone, so two virtual environments on one host
    rebuild the same op in turn, each waiting on the other's lock. One folder per interpreter
    prefix instead, seeded from the shared one when that was built for this interpreter."""
    import hashlib

    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    tag = f"py{sys.version_info.major}{sys.version_info.minor}_cpu"
    mine = base / "ptlm-gpu-check" / "torch_extensions" / \
        hashlib.sha1(sys.prefix.encode()).hexdigest()[:10]
    shared = base / "torch_extensions" / tag
    if not (mine / tag).exists() and shared.is_dir():
        for op in shared.iterdir():
            ninja = op / "build.ninja"
            if ninja.exists() and sys.prefix in ninja.read_text(errors="replace") and \
                    not (op / "lock").exists():
                shutil.copytree(op, mine / tag / op.name, dirs_exist_ok=True)
    mine.mkdir(parents=True, exist_ok=True)
    return mine


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return 0.0
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ============================================================================== report

def _gib(b) -> str:
    if not b:
        return "–"
    return f"{b / GiB:.2f} GiB" if b >= GiB / 8 else f"{b / 2**20:.2f} MiB"


def _num(x) -> str:
    return "–" if x is None else f"{x:.1f}"


def _pct(x) -> str:
    return "–" if x is None else f"{x:+.1%}"


def render_md(rec: dict) -> str:
    env = rec.get("environment", {})
    st = rec.get("stages", {})
    model = Path(rec.get("models", {}).get("small", "opt-125m")).name
    seq = rec.get("data", {}).get("seq_len", 1024)
    kind = "CPU REHEARSAL (tiny model, simulated cap: not GPU figures)" if rec["rehearsal"] \
        else "GPU check"
    lines = [f"# ptlm {kind}", "",
             f"Date {env.get('date', rec['started'])}; device {env.get('device')} "
             f"({_gib(env.get('total_memory'))}), driver {env.get('driver')}, CUDA "
             f"{env.get('torch_cuda')}; torch {env.get('torch')}, transformers "
             f"{env.get('transformers')}, DeepSpeed {env.get('deepspeed')}, bitsandbytes "
             f"{env.get('bitsandbytes')} (AdamW8bit step: {env.get('bnb_adamw8bit_step')}), "
             f"accelerate {env.get('accelerate')}, Python {env.get('python')}. "
             f"Elapsed {rec.get('elapsed_s')} s of a {rec.get('budget_s')} s budget.", "",
             "| stage | status | seconds | note |", "|---|---|---|---|"]
    outside = [f"{v['package']} {v['version']} (setup.cfg {v['declared']})"
               for v in rec.get("versions", []) if v["verdict"].startswith("OUTSIDE")]
    if outside:
        lines[4:4] = [f"Versions outside ptlm's declared, tested range: {', '.join(outside)}.", ""]
    for name in STAGES:
        s = st.get(name, {"status": "not run"})
        note = s.get("error") or s.get("note") or ""
        lines.append(f"| {name} | {s.get('status')} | {s.get('seconds', '–')} | "
                     f"{str(note).splitlines()[0][:160] if note else ''} |")
    h = st.get("headline", {})
    if h.get("plain_hf") or h.get("ptlm_run"):
        p, pr, pl = h.get("plain_hf", {}), h.get("ptlm_run", {}), h.get("ptlm_plan", {})
        outcome = (f"OUT OF MEMORY at the {p.get('phase')}" if p.get("oom") else
                   f"ran {p.get('steps_done')} steps")
        lines += ["", f"## 1. Headline: {model}, seq {seq}, global batch 16, cap "
                      f"{_gib(h.get('cap_bytes'))} ({h.get('emulates')})", "",
                  "| run | setting | predicted peak tensors / total | max allocated | "
                  "max reserved | outcome |", "|---|---|---|---|---|---|",
                  f"| plain Hugging Face | {p.get('setting')} | "
                  f"{_gib((p.get('predicted') or {}).get('peak_tensor_bytes'))} / "
                  f"{_gib((p.get('predicted') or {}).get('gpu_total'))} | "
                  f"{_gib(p.get('max_allocated'))} | {_gib(p.get('max_reserved'))} | "
                  f"{outcome}{' (simulated)' if p.get('simulated') else ''} |",
                  f"| ptlm plan for --gpu T4 | {_setting_str(pl.get('setting'))} | "
                  f"{_gib((pl.get('predicted') or {}).get('peak_tensor_bytes'))} / "
                  f"{_gib((pl.get('predicted') or {}).get('gpu_total'))} | "
                  f"{_gib(pr.get('max_allocated'))} | {_gib(pr.get('max_reserved'))} | "
                  f"{pr.get('steps')} steps, {len(pr.get('backoffs') or [])} back-offs, final "
                  f"loss {pr.get('final_loss')} |"]
        c = h.get("fp16_vs_fp32") or {}
        if c.get("max_dev") is not None:
            lines += ["", f"Training checked on real text: each step's loss of the T4 plan's run "
                          f"vs an fp32 plain-PyTorch run from the same weights, data and seed on "
                          f"{c.get('reference_device')}: max |dev| {c['max_dev']:.2e} (tolerance "
                          f"{c['tolerance']:.0e}: {c.get('tolerance_from')}); loss "
                          f"{c.get('first_loss'):.3f} -> {c.get('last_loss'):.3f}; skipped "
                          f"(fp16 overflow) steps {c.get('skipped_steps')}; "
                          f"{'PASS' if c.get('ok') else 'FAIL'}"]
        elif c.get("error"):
            lines += ["", f"fp32 reference failed: {str(c['error']).splitlines()[-1][:200]}"]
    a = st.get("accuracy", {})
    if a.get("rows"):
        lines += ["", "## 2. Planner accuracy: predicted peak tensors vs max_memory_allocated "
                      "(`ptlm probe`, steady-state step)", "",
                  "| model | setting | predicted | max allocated | max reserved | error |",
                  "|---|---|---|---|---|---|"]
        for r in a["rows"]:
            err = _pct(r["error"]) if isinstance(r.get("error"), float) else r.get("status", "–")
            lines.append(f"| {Path(r['model']).name} | {r['setting']} | "
                         f"{_gib((r.get('predicted') or {}).get('peak_tensor_bytes'))} | "
                         f"{_gib(r.get('max_allocated'))} | {_gib(r.get('max_reserved'))} | "
                         f"{err} |")
        lines.append(f"\n{a.get('measured')} measured; worst |error| "
                     f"{_pct(a.get('worst_abs_error'))}, mean {_pct(a.get('mean_abs_error'))}")
    pb = st.get("probe", {})
    if pb.get("probe"):
        t = pb.get("truth", {})
        lines += ["", f"## 3. Probe under the cap ({_gib(pb.get('cap_bytes'))}): "
                      f"{pb.get('setting')}", "",
                  "| | largest micro-batch | seconds |", "|---|---|---|",
                  f"| `ptlm probe` (global batch {pb.get('global_batch')}: tries its divisors) | "
                  f"{pb['probe']['largest_micro_batch']} | "
                  f"{_num(pb['probe'].get('search_seconds'))} search, "
                  f"{_num(pb['probe'].get('process_seconds'))} process |",
                  f"| true largest (fresh capped process per micro-batch) | "
                  f"{t.get('largest_micro_batch') or ('≥' + str(t.get('at_least')))} "
                  f"(bounds {t.get('bounds')}) | {t.get('seconds')} |"]
    tp = st.get("throughput", {})
    if tp.get("ptlm"):
        lines += ["", f"## 4. Throughput: {model}, seq {seq}, global batch 16, same DeepSpeed "
                      "config",
                  f"ptlm setting: {_setting_str(tp.get('setting'))}", "",
                  "| trainer | tokens/s | MFU | max allocated |", "|---|---|---|---|"]
        for who, name in (("hf_trainer", "HF Trainer + DeepSpeed"), ("ptlm", "ptlm")):
            r = tp.get(who, {})
            mfu = "–" if r.get("mfu") is None else f"{r['mfu']:.1%}"
            lines.append(f"| {name} | {r.get('tokens_per_s', 0) or 0:,.0f} | {mfu} | "
                         f"{_gib(r.get('max_allocated'))} |")
        att = tp.get("attention", {})
        lines.append(f"\nAttention: `{att.get('attn_implementation')}`; kernels "
                     f"{att.get('gpu_kernels') or list((att.get('ops') or {}))[:6]}")
    b = st.get("backoff", {})
    if b.get("setting"):
        backoffs = [(x.get("micro_batch"), x.get("grad_accum")) for x in b.get("backoffs", [])]
        lines += ["", f"## 5. OOM back-off under the cap: {b.get('setting')}, global batch "
                      f"{b.get('global_batch')}", "",
                  f"{b.get('oom')}; back-offs {backoffs}"
                  f" (micro-batch, accumulation); {b.get('steps')} steps at micro-batch "
                  f"{b.get('micro_batches')}; verdict {b.get('verdict')}"]
    lines += _packing_md(st.get("packing", {}))
    return "\n".join(lines) + "\n"


def _num_or_nan(x) -> float:
    return float("nan") if x is None else x


def _packing_md(pk: dict) -> list[str]:
    if not pk.get("models"):
        return []
    lines = ["", f"## 6. Document-aware packing on {pk.get('device')}: seq {pk.get('seq_len')}",
             "", "Exactness: the data's blocks with the most document pieces through ptlm "
             "(fp32, TF32 off) vs each piece alone through plain HF. Cost: forward+backward of "
             f"{pk.get('micro_batch')} blocks in {pk.get('precision')}, documents vs one "
             "stream, alternating.", "",
             "| model | mechanism: path | max abs dev, mean NLL (blocks: pieces) | gradient "
             "rel. dev | exact | tokens/s documents / stream | ratio | max allocated documents "
             "/ stream |", "|---|---|---|---|---|---|---|---|"]
    kernels = []
    for m in pk["models"]:
        e, c = m.get("exact", {}), m.get("cost", {})
        d, st = c.get("documents", {}), c.get("stream", {})
        lines.append(f"| {m.get('model')} | {m.get('mechanism')}: {m.get('path')} | "
                     f"{e.get('max_dev', float('nan')):.1e} ({e.get('pieces')}) | "
                     f"{_num_or_nan(e.get('grad_rel_dev')):.1e} | "
                     f"{'PASS' if e.get('ok') else 'FAIL'} | "
                     f"{d.get('tokens_per_s', 0):,.0f} / {st.get('tokens_per_s', 0):,.0f} | "
                     f"{c.get('documents_over_stream', float('nan')):.2f} | "
                     f"{_gib(d.get('max_allocated'))} / {_gib(st.get('max_allocated'))} |")
        kernels.append(f"{m.get('model')}: documents {d.get('gpu_kernels') or list(d.get('ops') or {})[:3]}"
                       f"; stream {st.get('gpu_kernels') or list(st.get('ops') or {})[:3]}")
    return lines + ["", "Attention kernels: " + " | ".join(kernels)]


def _setting_str(s) -> str:
    if not s:
        return "–"
    try:
        from ptlm.plan.setting import Setting

        return Setting(**s).describe()
    except Exception:  # noqa: BLE001
        return str(s)


# ============================================================================== wheels, main

def install_wheels(folder: Path, target: Path) -> dict:
    """Install the carried wheels that this Python lacks (or has older) into `target`, with no
    index and no dependencies: torch and the image's other packages stay as they are."""
    import importlib.metadata as md

    from packaging.version import Version

    wanted, kept = [], {}
    for whl in sorted(folder.glob("*.whl")):
        name, version = whl.name.split("-")[:2]
        try:
            have = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            have = None
        if have and Version(have) >= Version(version):
            kept[name] = have
        else:
            wanted.append(whl)
    t0 = time.perf_counter()
    if wanted:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps",
                        "--no-compile", "--no-cache-dir", "--upgrade", "--target", str(target),
                        *map(str, wanted)], check=True)
    return {"installed": [w.name for w in wanted], "already_there": kept,
            "seconds": round(time.perf_counter() - t0, 1), "target": str(target)}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in CHILDREN:
        sys.path.insert(0, str(ROOT))
        CHILDREN[argv[0]](argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json/.md/logs")
    ap.add_argument("--rehearse", action="store_true", help="CPU rehearsal with tiny sizes")
    ap.add_argument("--wheels", type=Path, help="install these wheels first (bench/gpu_wheels.sh)")
    ap.add_argument("--stages", default=",".join(STAGES),
                    help=f"comma-separated subset of {','.join(STAGES)}")
    ap.add_argument("--budget-s", type=float, help="wall-clock budget of the stages "
                                                   "(default 430 on a GPU, 600 rehearsing)")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--parallel-stages", action=argparse.BooleanOptionalAction, default=None,
                    help="run the stages at once (default: only when rehearsing; never on a "
                         "GPU whose timings you want)")
    args = ap.parse_args(argv)
    stages = [s for s in args.stages.split(",") if s]
    if args.parallel_stages is None:
        args.parallel_stages = args.rehearse
    unknown = set(stages) - set(STAGES)
    if unknown:
        ap.error(f"unknown stages {sorted(unknown)}; choose from {STAGES}")
    t_start = time.monotonic()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    site = None
    wheels_rec = None
    if args.wheels:
        try:
            wheels_rec = install_wheels(args.wheels, work / "site")
        except Exception as e:  # noqa: BLE001 - the stages then record what is missing
            wheels_rec = {"error": f"{type(e).__name__}: {e}"}
        site = str(work / "site")
        sys.path.insert(0, site)
    sys.path.insert(0, str(ROOT))
    budget = args.budget_s or (600.0 if args.rehearse else 430.0)
    budget -= time.monotonic() - t_start  # the install counts
    sizes = rehearsal_sizes(budget, work) if args.rehearse else real_sizes(budget)
    check = Check(args.out, work, sizes, site)
    check.record["models"] = {"small": sizes.small, "large": sizes.large}
    if wheels_rec:
        check.record["wheels"] = wheels_rec
        print(f"[gpu_check] wheels: installed {wheels_rec.get('installed')}, kept the "
              f"environment's {wheels_rec.get('already_there')}"
              + (f", error {wheels_rec['error']}" if "error" in wheels_rec else ""), flush=True)
    prebuild = None
    try:
        check.setup_env()
        if not sizes.rehearse:  # DeepSpeed's CPU Adam (offload rows): JIT-built once, meanwhile
            prebuild = check.start_prebuild()
        from ptlm.plan.facts import KNOWN_GPUS

        if sizes.rehearse:  # just below the plain HF step's predicted peak: it "runs out"
            plain = dict(precision="fp32", zero=0, offload="none", checkpointing="off",
                         optimizer="adamw", chunked_loss="off")
            p = check.predict(sizes.small, plain, 16, 16, "T4", keep_outputs=True)
            check.cap = p["gpu_total"] - int(0.05 * p["peak_tensor_bytes"])
        else:
            check.cap = KNOWN_GPUS["T4"].memory_bytes
        check.record["cap_bytes"] = check.cap
        check.setup_data()
    except SystemExit:
        raise
    except Exception as e:  # noqa: BLE001 - stages that need no data still run
        import traceback

        check.record["setup_error"] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
    order = [n for n in RUN_ORDER if n in stages]
    if args.parallel_stages:  # rehearsal: no timing means anything on CPU, so overlap stages
        run_parallel(order, lambda n: check.stage(n, getattr(check, n)), len(order))
    else:
        for name in order:
            check.stage(name, getattr(check, name))
    if prebuild is not None:
        check.finish_prebuild(prebuild)
    check.record["finished"] = _now()
    check.save()
    with tarfile.open(args.out / "gpu_check_logs.tar.gz", "w:gz") as tar:
        tar.add(check.logs, arcname="logs")
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    print((args.out / "gpu_check.md").read_text())
    bad = [n for n in stages if check.record["stages"].get(n, {}).get("status") != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
