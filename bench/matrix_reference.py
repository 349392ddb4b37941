"""A plain single-process PyTorch + Hugging Face trainer: the reference the setting matrix
(tests/test_matrix.py, bench/bench_matrix.py) compares ptlm's DeepSpeed runs against.

It shares nothing with ptlm's training code (no DeepSpeed, no ptlm.model/ptlm.run): it reads the
prepared blocks, orders them as the documented data order says (docs and ptlm/data/reader.py:
epoch e is a permutation of the blocks from numpy's default_rng([seed, e]); global batch k is the
next `global_batch` blocks of it; the ragged tail is dropped), and trains the saved model in fp32
on each global batch at once:

    loss      Hugging Face's own next-token loss, token-weighted over the global batch. With
              document packing (ptlm's default) each document piece of a block (a document, or
              the part of one a block edge cut) is run ALONE, positions from 0, and scores its own
              length - 1 predictions: no mask, no position_ids, nothing of ptlm's mechanism.
              With stream packing each block is one sequence of seq_len - 1 predictions.
    clipping  torch.nn.utils.clip_grad_norm_ (the global 2-norm, as DeepSpeed's)
    optimizer torch.optim.AdamW or bitsandbytes.optim.AdamW8bit; weight decay on >= 2-D weights
              that are not biases, none on biases and norm weights (the documented groups)
    schedule  transformers' cosine-with-min-lr / linear / constant schedule with warmup
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch


@dataclass
class Recipe:
    """What a run was asked for: the run's flags, written out (ptlm's defaults where not given)."""

    global_batch: int = 8
    steps: int = 8
    lr: float = 3e-3
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    warmup_ratio: float = 0.02
    seed: int = 0
    optimizer: str = "adamw"  # or "adamw8bit"
    # Steps whose gradients overflowed (fp16): their batch is consumed, but neither the weights
    # nor the optimizer's state nor the LR schedule move (DeepSpeed skips the update and the
    # scheduler's step; torch.amp.GradScaler skips the optimizer's step the same way).
    skip_steps: tuple[int, ...] = ()
    packing: str = "documents"  # or "stream"
    extra: dict = field(default_factory=dict)


def blocks(data: Path, split: str = "train") -> np.ndarray:
    """Every block of a split, (num_blocks, seq_len) int64, in stored order."""
    from ptlm.data.reader import PackedDataset  # data access only: the stored blocks

    ds = PackedDataset(data, split)
    return ds.batch(np.arange(len(ds))).numpy()


def block_pieces(data: Path, split: str, packing: str) -> list[list[tuple[int, int]]]:
    """Per block, its document pieces as (start, end) offsets inside the block, from the
    split's document lengths by a plain scan ("stream": the whole block, one piece)."""
    from ptlm.data.reader import PackedDataset  # data access only: the stored lengths

    ds = PackedDataset(data, split, packing="stream")
    T = ds.seq_len
    if packing == "stream":
        return [[(0, T)] for _ in range(len(ds))]
    ends = np.cumsum(ds.document_lengths())  # stream offsets where a document ends
    pieces = []
    for b in range(len(ds)):
        inside = (ends[(ends > b * T) & (ends < (b + 1) * T)] - b * T).tolist()
        cuts = [0, *inside, T]
        pieces.append(list(zip(cuts[:-1], cuts[1:])))
    return pieces


def pieces_nll(model, row: torch.Tensor, pieces: list[tuple[int, int]]):
    """(summed NLL, predictions) of one block, each piece run alone through the HF model."""
    total, count = row.new_zeros((), dtype=torch.float32), 0
    for a, b in pieces:
        if b - a < 2:  # a one-token piece predicts nothing
            continue
        x = row[a:b][None]
        total = total + model(input_ids=x, labels=x).loss.float() * (b - a - 1)
        count += b - a - 1
    return total, count


def global_batches(num_blocks: int, global_batch: int, seed: int, steps: int):
    """Block indices of each optimizer step (drop_last: the ragged tail of an epoch is dropped)."""
    per_epoch = num_blocks // global_batch
    for k in range(steps):
        epoch, i = divmod(k, per_epoch)
        order = np.random.default_rng([seed, epoch]).permutation(num_blocks)
        yield order[i * global_batch:(i + 1) * global_batch]


def _groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and not n.endswith("bias")]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and not n.endswith("bias"))]
    return [g for g in ({"params": decay, "weight_decay": weight_decay},
                        {"params": rest, "weight_decay": 0.0}) if g["params"]]


def _schedule(opt, r: Recipe):
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_with_min_lr_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    warmup = int(r.warmup_ratio * r.steps)
    if r.schedule == "cosine":
        return get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, r.steps,
                                                           min_lr_rate=r.min_lr_ratio)
    if r.schedule == "linear":
        return get_linear_schedule_with_warmup(opt, warmup, r.steps)
    return get_constant_schedule_with_warmup(opt, warmup)


def reference_losses(model_dir: Path, data: Path, r: Recipe) -> list[float]:
    """The loss of each of r.steps optimizer steps (before that step's update), fp32."""
    return reference_run(model_dir, data, r)["losses"]


def reference_run(model_dir: Path, data: Path, r: Recipe, device: str = "cpu") -> dict:
    """{"losses": each step's loss (before its update), "lrs": the LR after each step (the next
    step's, as ptlm logs it)}, fp32, on `device` (bench/gpu_check.py: the GPU it checks)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(r.seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device)
    model.train()
    hyper = dict(lr=r.lr, betas=r.betas, eps=r.eps, weight_decay=r.weight_decay)
    if r.optimizer == "adamw8bit":
        import bitsandbytes as bnb

        opt = bnb.optim.AdamW8bit(_groups(model, r.weight_decay), **hyper)
    else:
        opt = torch.optim.AdamW(_groups(model, r.weight_decay), **hyper)
    sched = _schedule(opt, r)
    all_blocks = blocks(data)
    pieces = block_pieces(data, "train", r.packing)
    losses, lrs = [], []
    for step, idx in enumerate(global_batches(len(all_blocks), r.global_batch, r.seed, r.steps),
                               start=1):
        ids = torch.from_numpy(all_blocks[idx]).to(device)
        nll, count = zip(*(pieces_nll(model, row, pieces[i]) for row, i in zip(ids, idx)))
        loss = sum(nll) / sum(count)
        loss.backward()
        if step not in r.skip_steps:
            if r.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), r.grad_clip)
            opt.step()
            sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        lrs.append(sched.get_last_lr()[0])
    return {"losses": losses, "lrs": lrs}


def hf_val_perplexity(model_dir: Path, data: Path, dtype="auto",
                      packing: str = "documents") -> float:
    """Plain transformers: the exported model's token-weighted perplexity over every val block
    (each document piece alone, or each block whole for "stream"), in the dtype it was saved in
    (as the run evaluated it)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).eval()
    pieces = block_pieces(data, "val", packing)
    nll, n = 0.0, 0
    with torch.no_grad():
        for row, row_pieces in zip(blocks(data, "val"), pieces):
            a, b = pieces_nll(model, torch.from_numpy(row), row_pieces)
            nll, n = nll + float(a), n + b
    return math.exp(nll / n)


# ----------------------------------------------------------------------------------------------
# The matrix harness: one setting trained for real (2 CPU ranks), killed, resumed, exported,
# and checked against the reference above. Shared by tests/test_matrix.py and bench/bench_matrix.py.
# ----------------------------------------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
RANKS = 2
GLOBAL_BATCH = 8
STEPS = 8
SAVE_EVERY = 4  # the checkpoint the killed run leaves
KILL_AFTER = 6  # SIGKILL after this step: steps 5-6 are redone by the resumed run
# Largest |loss - reference loss| allowed over the STEPS steps, per precision. fp32 differs from
# the one-process reference only by summation order (ranks, micro-batches, chunks); bf16 and
# fp16 run the forward/backward in 16 bits (DeepSpeed keeps fp32 master weights), bf16 with an
# 8-bit mantissa. adamw8bit under ZeRO-1/2 quantizes DeepSpeed's flat partitions, not the
# parameters' own tensors, so its blockwise quantization sees other blocks: a wider band.
LOSS_TOLERANCE = {"fp32": 2e-4, "fp16": 1e-2, "bf16": 1e-2}
ADAMW8BIT_ZERO_TOLERANCE = 2e-2
# The exported model, reloaded by plain transformers in its saved dtype, against the run's own
# final val perplexity (relative).
PPL_TOLERANCE = {"fp32": 1e-4, "fp16": 2e-3, "bf16": 1e-2}


@dataclass(frozen=True)
class MatrixSetting:
    precision: str = "fp32"
    zero: int = 0
    offload: str = "none"
    checkpointing: bool = False
    optimizer: str = "adamw"
    chunked_loss: bool = True
    accum: int = 1  # gradient accumulation steps (micro-batch = GLOBAL_BATCH / RANKS / accum)

    @property
    def micro_batch(self) -> int:
        return GLOBAL_BATCH // RANKS // self.accum

    def flags(self) -> list[str]:
        return ["--precision", self.precision, "--zero", str(self.zero), "--offload", self.offload,
                "--checkpointing", "on" if self.checkpointing else "off",
                "--optimizer", self.optimizer,
                "--chunked-loss", "on" if self.chunked_loss else "off",
                "--micro-batch", str(self.micro_batch), "--global-batch", str(GLOBAL_BATCH)]

    def name(self) -> str:
        parts = [self.precision, f"Z{self.zero}"]
        if self.offload != "none":
            parts.append(f"off-{self.offload[:5]}")
        parts += ["ckpt" if self.checkpointing else "nockpt", self.optimizer,
                  "chunked" if self.chunked_loss else "logits", f"acc{self.accum}"]
        return "-".join(parts)

    def tolerance(self) -> float:
        tol = LOSS_TOLERANCE[self.precision]
        if self.optimizer == "adamw8bit" and self.zero > 0:
            tol = max(tol, ADAMW8BIT_ZERO_TOLERANCE)
        return tol


# Every value of every axis at least once, and the risky pairs (16-bit x ZeRO stage, offload x
# stage, 8-bit optimizer x stage, accumulation x stage) -- the default suite.
PAIRWISE = [
    MatrixSetting("fp32", 0, "none", False, "adamw8bit", True, 2),
    MatrixSetting("bf16", 1, "optimizer", True, "adamw", False, 1),
    MatrixSetting("fp16", 2, "none", False, "adamw8bit", False, 2),
    MatrixSetting("bf16", 3, "parameters", True, "adamw", True, 2),
    MatrixSetting("fp32", 3, "none", False, "adamw", False, 1),
    MatrixSetting("fp16", 1, "none", True, "adamw", True, 1),
    MatrixSetting("fp32", 2, "optimizer", True, "adamw", True, 2),
    # fp16 at ZeRO-0 runs DeepSpeed's own fp16 wrapper, not a ZeRO optimizer: found wrong twice
    # by the full product (a priming step, an unscaled loss; run/engine.py)
    MatrixSetting("fp16", 0, "none", False, "adamw", True, 2),
]


def full_product() -> list[MatrixSetting]:
    """Every combination the planner can return (Setting's own rules: 8-bit optimizer only
    without offload and below ZeRO-3; optimizer offload from ZeRO-1; parameter offload at
    ZeRO-3), with accumulation 1 and 2."""
    from itertools import product

    out = []
    for prec, zero, off, ckpt, opt, chunked, accum in product(
            ("fp32", "bf16", "fp16"), (0, 1, 2, 3), ("none", "optimizer", "parameters"),
            (False, True), ("adamw", "adamw8bit"), (True, False), (1, 2)):
        if off == "optimizer" and zero == 0 or off == "parameters" and zero != 3:
            continue
        if opt == "adamw8bit" and (zero == 3 or off != "none"):
            continue
        out.append(MatrixSetting(prec, zero, off, ckpt, opt, chunked, accum))
    return out


def make_init(dest: Path) -> Path:
    """A tiny OPT saved with save_pretrained: every run (and the reference) starts from it."""
    from transformers import AutoModelForCausalLM, OPTConfig

    if (dest / "model.safetensors").exists():
        return dest
    cfg = OPTConfig(vocab_size=1024, hidden_size=64, num_hidden_layers=2, ffn_dim=128,
                    num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=64,
                    dropout=0.0, attention_dropout=0.0)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(dest)
    return dest


_REFERENCES: dict = {}


def reference_for(init: Path, data: Path, optimizer: str,
                  skip_steps: tuple[int, ...] = ()) -> dict:
    """The reference run's {"losses", "lrs"} for the matrix's recipe (cached per process)."""
    key = (str(init), str(data), optimizer, skip_steps)
    if key not in _REFERENCES:
        _REFERENCES[key] = reference_run(init, data, Recipe(
            global_batch=GLOBAL_BATCH, steps=STEPS, optimizer=optimizer, skip_steps=skip_steps))
    return _REFERENCES[key]


def cpu_fp16_supported() -> bool:
    """Whether DeepSpeed's CPU accelerator allows fp16 on this CPU (oneDNN fp16 kernels). Where
    it does not, fp16 settings run with its capability check patched (tests/cpu_fp16): torch
    computes fp16 on any CPU, and what the matrix checks is ptlm's fp16 path."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except Exception:
        return False


# One launch of a setting (both ranks) past this is killed and recorded as a failed row: the
# slowest of the 264 took 83 s (a first JIT build of an op can add minutes).
LAUNCH_TIMEOUT_S = 900


def _launch(init: Path, data: Path, out: Path, s: MatrixSetting, env: dict | None = None,
            timeout: float | None = None):
    """Both ranks started directly (RANK/WORLD_SIZE/MASTER_* as torchrun sets them): the same
    processes the deepspeed launcher starts, without its two extra interpreters. Each rank is
    the leader of a process group of its own, so a launch past `timeout` (LAUNCH_TIMEOUT_S) is
    killed with everything it started (the compilers of a JIT op build included) and returns
    returncode None and timed_out True instead of raising."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from types import SimpleNamespace

    from ptlm.run.machine.distributed import free_port

    args = ["launch/train.py", "--model", str(init), "--data", str(data), "--out", str(out),
            "--lr", "3e-3", "--seed", "0", "--max-steps", str(STEPS),
            "--save-every", str(SAVE_EVERY), *s.flags()]
    path = str(ROOT)
    env = dict(env or {})
    if s.precision == "fp16" and not cpu_fp16_supported():  # see tests/cpu_fp16/sitecustomize.py
        env["PTLM_TEST_CPU_FP16"] = "1"
    if any(k.startswith(TEST_SEAM_PREFIX) for k in env):  # the test seams live there
        path = os.pathsep.join([str(ROOT / "tests" / "cpu_fp16"), path])
    base = {**os.environ, "PYTHONPATH": path, "DS_ACCELERATOR": "cpu",
            "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(RANKS),
            "LOCAL_WORLD_SIZE": str(RANKS), **env}
    out.mkdir(parents=True, exist_ok=True)
    procs, logs = [], []
    for rank in range(RANKS):
        log = open(out.parent / f"{out.name}.rank{rank}.log", "a+")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True, env={
                                          **base, "RANK": str(rank), "LOCAL_RANK": str(rank)}))
    deadline = time.monotonic() + (LAUNCH_TIMEOUT_S if timeout is None else timeout)
    codes, timed_out = [None] * len(procs), False
    try:
        for i, p in enumerate(procs):
            codes[i] = p.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        timed_out = True
    finally:
        for p in procs:  # each rank's group: the rank and whatever it started
            try:
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass  # the group is gone: the rank and its children have all exited
            p.wait()
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    bad = [c for c in codes if c != 0]
    return SimpleNamespace(returncode=bad[0] if bad else 0, stdout=texts[0], stderr=texts[-1],
                           timed_out=timed_out)


def train_records(path: Path) -> dict[int, dict]:
    """metrics.jsonl's train records by step."""
    import json

    return {r["step"]: r for r in map(json.loads, path.read_text().splitlines())
            if r.get("kind") == "train"}


def _train_losses(path: Path) -> dict[int, float]:
    return {step: r["loss"] for step, r in train_records(path).items()}


# tests/cpu_fp16/sitecustomize.py: rank 0 puts an inf into one gradient at these steps
INF_GRAD_ENV = "PTLM_TEST_INF_GRAD"
TEST_SEAM_PREFIX = "PTLM_TEST_"  # the variables tests/cpu_fp16/sitecustomize.py reads


def _timed_out(row: dict, which: str, launch, timeout: float | None, t0: float) -> dict:
    import time

    limit = LAUNCH_TIMEOUT_S if timeout is None else timeout
    return {**row, "error": f"timed out: the {which} run was still running after {limit:g} s "
            f"(killed with its process group)\n{launch.stdout[-2000:]}",
            "timed_out": True, "wall_s": time.perf_counter() - t0}


def run_setting(s: MatrixSetting, init: Path, data: Path, out: Path,
                overflow_steps: tuple[int, ...] = (), timeout: float | None = None) -> dict:
    """Train s for STEPS steps, killed after KILL_AFTER and resumed (--resume auto); returns the
    row: max loss deviation from the reference, whether the resumed run redid the killed run's
    last steps identically, whether the export reproduces the reported val perplexity.
    overflow_steps: an inf injected into one gradient on rank 0 at each (the reference skips
    those steps' updates). timeout: each launch's (LAUNCH_TIMEOUT_S): past it, the row records
    the error."""
    import json
    import time

    t0 = time.perf_counter()
    row = {"setting": s.name(), "steps": STEPS, "tolerance": s.tolerance()}
    if s.precision == "fp16" and not cpu_fp16_supported():
        row["note"] = "DeepSpeed's fp16 check patched (tests/cpu_fp16)"
    inject = {INF_GRAD_ENV: ",".join(map(str, overflow_steps))} if overflow_steps else {}
    killed = _launch(init, data, out, s, env={"PTLM_FAULT_KILL_AFTER_STEP": str(KILL_AFTER),
                                               **inject}, timeout=timeout)
    if killed.timed_out:
        return _timed_out(row, "first", killed, timeout, t0)
    if killed.returncode == 0 or not (out / "metrics.jsonl").exists():
        return {**row, "error": "the killed run did not die after step "
                f"{KILL_AFTER}:\n{killed.stdout[-2000:]}{killed.stderr[-4000:]}"}
    before = _train_losses(out / "metrics.jsonl")
    resumed = _launch(init, data, out, s, env=inject, timeout=timeout)
    if resumed.timed_out:
        return _timed_out(row, "resumed", resumed, timeout, t0)
    if resumed.returncode != 0:
        return {**row, "error": f"the resumed run failed:\n{resumed.stdout[-4000:]}"}
    after = _train_losses(out / "metrics.jsonl")
    ref = reference_for(init, data, s.optimizer, tuple(overflow_steps))["losses"]
    got = [after[k] for k in range(1, STEPS + 1)]
    summary = json.loads((out / "summary.json").read_text())["run"]
    ppl = hf_val_perplexity(out / "hf_model", data)
    row.update(
        losses=got, reference=ref,
        max_dev=max(abs(a - b) for a, b in zip(got, ref)),
        resume_ok=all(after[k] == before[k] for k in range(SAVE_EVERY + 1, KILL_AFTER + 1))
        and sorted(before) == list(range(1, KILL_AFTER + 1)),
        resumed_from=SAVE_EVERY, redone=[before[k] for k in range(SAVE_EVERY + 1, KILL_AFTER + 1)],
        run_ppl=summary["final_val_ppl"], export_ppl=ppl,
        export_ok=abs(ppl - summary["final_val_ppl"]) <= PPL_TOLERANCE[s.precision]
        * summary["final_val_ppl"],
        micro_batch=s.micro_batch, accum=s.accum,
        wall_s=time.perf_counter() - t0)
    return row


def passed(row: dict) -> bool:
    return ("error" not in row and row["max_dev"] <= row["tolerance"] and row["resume_ok"]
            and row["export_ok"])
