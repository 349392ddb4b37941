"""`ptlm demo`: the whole workflow on the shipped Portuguese sample, on whatever this machine has.

1. prepare: train a small BPE on the sample, pack, split
2. plan: the setting for the demo model on this machine, and the headline case (OPT-125M,
   seq 1024, batch 16 on a 16 GB T4) side by side with the plain Hugging Face setting
3. train: a small OPT built from a config, with DeepSpeed (all GPUs, or one CPU rank)
4. report: the run's tables, and a generated continuation
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from ptlm.data.inspection import first_blocks
from ptlm.data.prepare import PrepareConfig, prepare, summary
from ptlm.model.config import model_facts
from ptlm.plan.facts import KNOWN_GPUS, HardwareFacts
from ptlm.plan.memory import Job
from ptlm.plan.planner import Rejected, evaluate, plan
from ptlm.plan.setting import PLAIN_HF

ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEMO_CORPUS = ASSETS / "demo_corpus_pt.jsonl"
DEMO_VOCAB = 1024  # the sample is ~43 KB of text: a bigger vocabulary would be mostly unused
DEMO_SEQ_LEN = 128
DEMO_VAL_FRACTION = 0.1
# A small OPT (941,056 parameters at the demo's 1,024-token vocabulary): its 12 epochs (156 steps)
# trained in 24 s on the idle 2-core dev machine and 77 s while other jobs loaded it (load ~4).
DEMO_MODEL = dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, ffn_dim=512,
                  max_position_embeddings=DEMO_SEQ_LEN, word_embed_proj_dim=128,
                  dropout=0.0, attention_dropout=0.0)
DEMO_TRAIN_ARGS = ["--from-scratch", "--global-batch", "8", "--lr", "3e-3", "--warmup-steps",
                   "10", "--log-every", "5"]
DEMO_EPOCHS = 12  # ~13 steps each; past ~12 the demo's model overfits the sample
HEADLINE = dict(model="opt-125m", seq_len=1024, global_batch=16, gpu="T4")


def add_arguments(p) -> None:
    p.add_argument("--out", type=Path, default=Path("demo_out"),
                   help="folder for the demo's data and run (replaced on each demo run)")
    p.add_argument("--epochs", type=int, default=DEMO_EPOCHS)


def _banner(step: str) -> None:
    print(f"\n=== {step} " + "=" * max(0, 70 - len(step)), flush=True)


def _write_model_config(folder: Path, vocab_size: int) -> Path:
    from transformers import OPTConfig

    OPTConfig(vocab_size=vocab_size, **DEMO_MODEL).save_pretrained(folder)
    return folder


def _headline_plans() -> str:
    """The seed's case: plain HF vs ptlm's plan for OPT-125M, seq 1024, batch 16 on a T4."""
    facts = model_facts(HEADLINE["model"], HEADLINE["seq_len"])
    hw = HardwareFacts.from_spec(KNOWN_GPUS[HEADLINE["gpu"]])
    job = Job(seq_len=HEADLINE["seq_len"], global_batch=HEADLINE["global_batch"])
    plain = evaluate(facts, hw, job, PLAIN_HF.with_(micro_batch=job.global_batch),
                     fixed_micro=True)
    ours = plan(facts, hw, job)
    gib = 2**30
    verdict = (f"does NOT fit: {plain.reason}" if isinstance(plain, Rejected) else
               f"fits, {plain.memory.gpu_total / gib:.1f} GiB")
    return "\n".join([
        f"{facts.describe()} on {hw.describe()}, seq {job.seq_len}, batch {job.global_batch}:",
        f"  plain Hugging Face  {verdict}",
        f"  ptlm's plan         {ours.setting.describe()} x {ours.grad_accum} accumulation: "
        f"predicted peak {ours.memory.gpu_total / gib:.1f} GiB of {hw.gpu_memory_bytes / gib:.1f}"
        " GiB",
        "  (`ptlm plan --model opt-125m --seq-len 1024 --global-batch 16 --gpu T4` explains it)"])


def _train_command(data: Path, model: Path, run: Path, epochs: int) -> tuple[list[str], dict]:
    import torch

    args = ["--model", str(model), "--data", str(data), "--out", str(run), "--epochs",
            str(epochs), *DEMO_TRAIN_ARGS]
    env = dict(os.environ)
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(n),
               "--no_local_rank", "--module", "ptlm.cli", "train", *args]
    else:  # one CPU rank through the same DeepSpeed engine
        cmd = [sys.executable, "-m", "ptlm.cli", "train", *args]
        env["DS_ACCELERATOR"] = "cpu"
    return cmd, env


def run(args) -> int:
    t0 = time.perf_counter()
    out = args.out
    data_dir, run_dir = out / "data", out / "run"
    _banner(f"1. prepare: {DEMO_CORPUS.name} -> {data_dir}")
    manifest = prepare(PrepareConfig(
        sources=[str(DEMO_CORPUS)], out=data_dir, seq_len=DEMO_SEQ_LEN,
        train_tokenizer=DEMO_VOCAB, val_fraction=DEMO_VAL_FRACTION, overwrite=True))
    print(summary(manifest))
    block = first_blocks(data_dir, manifest)["val"]
    print("first validation block:", (block["text"][:200] + " […]") if block else "(none)")

    _banner("2. plan")
    print(_headline_plans())

    _banner("3. train (DeepSpeed)")
    model_dir = _write_model_config(out / "model_config", manifest["tokenizer"]["vocab_size"])
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)  # a fresh run each time (a kept run would resume)
    cmd, env = _train_command(data_dir, model_dir, run_dir, args.epochs)
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, env=env, check=True)

    _banner("4. report")
    print((run_dir / "report.md").read_text(encoding="utf-8"))
    _print_sample(run_dir / "hf_model")
    print(f"demo finished in {time.perf_counter() - t0:.0f} s. Data: {data_dir}; run, "
          f"metrics, loss.png and the Hugging Face model: {run_dir}")
    return 0


def _print_sample(model_dir: Path) -> None:
    import torch
    from transformers import AutoTokenizer

    from ptlm.model.load import load_model
    from ptlm.run.tools.generate import generate

    model = load_model(str(model_dir), precision="fp32").eval()
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    prompt = "A cidade"
    torch.manual_seed(0)
    text = generate(model, tok, prompt, 40, sample=True, temperature=0.7)
    print(f"sampled continuation of {prompt!r}: {prompt + text!r}")
    plan = json.loads((model_dir.parent / "plan.json").read_text())
    print(f"setting used: {plan['setting']}")
