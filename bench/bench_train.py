"""Training throughput and peak memory: ptlm's run vs the Hugging Face Trainer, one run each, same
model, data (the same packed blocks), global batch and DeepSpeed config.

    python bench/bench_train.py                       # CPU: a small OPT on Machado, seq 256
    python bench/bench_train.py --model opt-125m --seq-len 1024 --micro-batch 16 --precision bf16
                                                      # GPU: the issue's OPT-125M figure

Each contender runs in a fresh process (one DeepSpeed rank); tokens/s is the median over the
steps after the first WARMUP ones; peak memory is torch.cuda.max_memory_allocated on a GPU, else
the sampled peak RSS of the process tree.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ptlm, bench.* of this checkout
from bench.common import ROOT, SHARED, machine, run_measured  # noqa: E402

from ptlm.run.machine.distributed import free_port  # noqa: E402

WARMUP = 2
SMALL_OPT = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, ffn_dim=1024,
                 max_position_embeddings=1024, word_embed_proj_dim=256, dropout=0.0,
                 attention_dropout=0.0)

HF_TRAINER = r"""
import json, sys, time, os, torch
from transformers import (AutoModelForCausalLM, AutoConfig, Trainer, TrainingArguments,
                          TrainerCallback, default_data_collator)
import datasets
sys.path.insert(0, sys.argv[5])
from ptlm.data.reader import PackedDataset
model_dir, data_dir, ds_config, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
cfg = json.load(open(ds_config))
blocks = PackedDataset(data_dir, "train")
ids = blocks.batch(range(len(blocks))).numpy()
train = datasets.Dataset.from_dict({"input_ids": ids, "labels": ids})  # run_clm's format
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
if cfg["bf16"]["enabled"]: model = model.to(torch.bfloat16)
cfg["optimizer"] = {"type": "AdamW", "params": {"lr": 1e-4, "betas": [0.9, 0.95], "eps": 1e-8,
                                                "weight_decay": 0.1}}
times = []
class Clock(TrainerCallback):
    def on_step_begin(self, *a, **k):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        self.t = time.perf_counter()
    def on_step_end(self, *a, **k):
        if torch.cuda.is_available(): torch.cuda.synchronize()
        times.append(time.perf_counter() - self.t)
args = TrainingArguments(output_dir=sys.argv[6], per_device_train_batch_size=cfg["train_micro_batch_size_per_gpu"],
    gradient_accumulation_steps=cfg["gradient_accumulation_steps"], max_steps=steps,
    learning_rate=1e-4, adam_beta2=0.95, weight_decay=0.1, logging_steps=10**6, save_strategy="no", report_to=[], seed=0,
    bf16=cfg["bf16"]["enabled"], fp16=cfg["fp16"]["enabled"], deepspeed=cfg,
    dataloader_num_workers=0, use_cpu=not torch.cuda.is_available())
Trainer(model=model, args=args, train_dataset=train, data_collator=default_data_collator,
        callbacks=[Clock()]).train()
peak = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
print(json.dumps({"step_times": times, "peak_cuda": peak}))
"""


def ptlm_run(model: str, from_scratch: bool, data: Path, out: Path, args,
             extra: tuple = ()) -> dict:
    cmd = [sys.executable, "launch/train.py", "--model", model, "--data", str(data), "--out",
           str(out), "--global-batch", str(args.global_batch), "--micro-batch",
           str(args.micro_batch), "--max-steps", str(args.steps), "--no-export",
           "--eval-max-blocks", "8", "--lr", "1e-4"]
    if from_scratch:
        cmd.append("--from-scratch")
    cmd += list(extra)
    for flag in ("precision", "zero", "checkpointing", "chunked_loss"):
        if getattr(args, flag) is not None:
            cmd += [f"--{flag.replace('_', '-')}", str(getattr(args, flag))]
    r = run_measured(cmd, env={"DS_ACCELERATOR": "cuda" if args.gpu else "cpu"})
    train = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train = [x for x in train if x["kind"] == "train"]
    tps = statistics.median(x["tokens_per_s"] for x in train[WARMUP:])
    peak = max(x["peak_mem_bytes"] for x in train) if args.gpu else r["peak_rss"]
    return {"tokens_per_s": tps, "peak": peak, "wall_s": r["wall_s"]}


def hf_run(model_dir: Path, data: Path, ds_config: Path, out: Path, args, tokens_per_step) -> dict:
    r = run_measured([sys.executable, "-c", HF_TRAINER, str(model_dir), str(data),
                      str(ds_config), str(args.steps), str(ROOT), str(out)],
                     env={"DS_ACCELERATOR": "cuda" if args.gpu else "cpu", "RANK": "0",
                          "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                          "MASTER_PORT": str(free_port())})
    res = json.loads(r["stdout"].strip().splitlines()[-1])
    tps = tokens_per_step / statistics.median(res["step_times"][WARMUP:])
    return {"tokens_per_s": tps, "peak": res["peak_cuda"] or r["peak_rss"], "wall_s": r["wall_s"]}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--corpus", type=Path, default=SHARED / "data/pt/machado_de_assis.jsonl")
    p.add_argument("--tokenizer", type=Path, default=SHARED / "data/tokenizers/gpt2")
    p.add_argument("--model", default=None, help="HF folder; default: a small OPT from config")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--global-batch", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--precision")
    p.add_argument("--zero", type=int)
    p.add_argument("--checkpointing")
    p.add_argument("--chunked-loss", dest="chunked_loss")
    p.add_argument("--gpu", action="store_true", help="run on CUDA")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = tmp / "data"
        r = run_measured([sys.executable, "-m", "ptlm.cli", "prepare", str(args.corpus),
                          "--tokenizer", str(args.tokenizer), "--seq-len", str(args.seq_len),
                          "--out", str(data), "--no-progress"])
        if args.model:
            model_dir, scratch = args.model, False
        else:
            from transformers import OPTConfig

            model_dir, scratch = tmp / "model", True
            vocab = -(-json.loads((data / "manifest.json").read_text())["tokenizer"][
                "vocab_size"] // 8) * 8  # what ptlm's --from-scratch sizes it to
            OPTConfig(vocab_size=vocab, **SMALL_OPT).save_pretrained(model_dir)
        ours = ptlm_run(str(model_dir), scratch, data, tmp / "ptlm", args)
        full_logits = None
        if args.chunked_loss is None:  # the same run with HF's loss: what the chunking buys
            full_logits = ptlm_run(str(model_dir), scratch, data, tmp / "ptlm_full", args,
                                   ("--chunked-loss", "off"))
        tokens_per_step = args.global_batch * args.seq_len
        hf = hf_run(Path(model_dir), data, tmp / "ptlm" / "ds_config.json", tmp / "hf", args,
                    tokens_per_step)
        setting = json.loads((tmp / "ptlm" / "plan.json").read_text())["setting"]
    unit = "peak GPU memory" if args.gpu else "peak RSS"
    print(f"\nMachine: {machine()}; date {date.today()}")
    print(f"Model {args.model or 'small OPT ' + str(SMALL_OPT)}, seq {args.seq_len}, global "
          f"batch {args.global_batch}, {args.steps} steps (median after {WARMUP}); ptlm setting "
          f"{setting}; the HF Trainer gets the same DeepSpeed config\n")
    print(f"| trainer | tokens/s | {unit} |\n|---|---|---|")
    rows = [("HF Trainer + DeepSpeed", hf), ("ptlm", ours)]
    if full_logits:
        rows.append(("ptlm, --chunked-loss off", full_logits))
    for name, r in rows:
        print(f"| {name} | {r['tokens_per_s']:,.0f} | {r['peak'] / 2**30:.2f} GiB |")
    print(f"\nptlm / HF Trainer tokens/s: {ours['tokens_per_s'] / hf['tokens_per_s']:.2f}×; "
          f"peak memory: {ours['peak'] / hf['peak']:.2f}×")


if __name__ == "__main__":
    main()
