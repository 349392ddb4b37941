"""Chunked LM-head + cross-entropy vs the full-logits (Hugging Face) loss: peak memory and time.

    python bench/bench_loss.py [--batch 16] [--seq 1024] [--time-batch 2] [--time-seq 512]

Memory: OPT-125M (hidden 768, vocab 50,272) at batch x seq, measured by MemTracker under
FakeTensorMode (no compute, nothing allocated), for the loss alone (head + cross-entropy, forward
and backward, given the final hidden states) and for a whole training step (ptlm.run.tools.memtrace).
Time: real CPU forward+backward of the loss alone at the smaller --time-batch x --time-seq (the
full size takes minutes per call on a laptop CPU), median of --repeats runs.
Prints markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.distributed._tools.mem_tracker import MemTracker
from transformers import OPTConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # ptlm, bench.* of this checkout
from bench.common import machine  # noqa: E402

from ptlm.model.loss import IGNORE_INDEX, lm_head_loss  # noqa: E402
from ptlm.plan.setting import PLAIN_HF, Setting  # noqa: E402
from ptlm.run.tools.memtrace import measure_step  # noqa: E402

GiB = 2**30
HIDDEN, VOCAB = 768, 50272  # OPT-125M


def full_logits_loss(head: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """What OPTForCausalLM + ForCausalLMLoss do: all logits, upcast, shifted cross-entropy."""
    logits = head(hidden).float()  # (B, T, V)
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)  # (B, T)
    return F.cross_entropy(logits.view(-1, VOCAB), shift_labels.reshape(-1))


def chunked_loss(head: nn.Linear, hidden: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    total, count = lm_head_loss(hidden, head, labels)
    return total / count


LOSSES = {"full logits (HF)": full_logits_loss, "chunked (ptlm)": chunked_loss}


def loss_inputs(batch: int, seq: int, dtype: torch.dtype):
    head = nn.Linear(HIDDEN, VOCAB, bias=False, dtype=dtype)
    hidden = torch.randn(batch, seq, HIDDEN, dtype=dtype, requires_grad=True)  # (B, T, H)
    labels = torch.randint(0, VOCAB, (batch, seq))  # (B, T)
    return head, hidden, labels


def loss_peak(loss_fn, batch: int, seq: int, dtype: torch.dtype) -> int:
    """Peak of the loss's forward+backward above what was allocated before (head, hidden)."""
    with FakeTensorMode():
        head, hidden, labels = loss_inputs(batch, seq, dtype)
        tracker = MemTracker()
        tracker.track_external(head, hidden)
        before = sum(p.numel() * p.element_size() for p in (head.weight, hidden))
        with tracker:
            loss_fn(head, hidden, labels).backward()
        return tracker.get_tracker_snapshot("peak")[torch.device("cpu")]["Total"] - before


def loss_seconds(loss_fn, batch: int, seq: int, repeats: int) -> float:
    torch.manual_seed(0)
    head, hidden, labels = loss_inputs(batch, seq, torch.float32)
    times = []
    for _ in range(repeats + 1):  # the first run warms up the allocator and kernels
        head.weight.grad = hidden.grad = None
        start = time.perf_counter()
        loss_fn(head, hidden, labels).backward()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--time-batch", type=int, default=2)
    parser.add_argument("--time-seq", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"Measured {date.today()} on {machine()}, torch {torch.__version__}.\n")
    print(f"### Loss alone, OPT-125M head, {args.batch} x {args.seq} tokens "
          "(peak above head + hidden states; MemTracker under FakeTensorMode)\n")
    print("| loss | fp32 peak | bf16 peak |")
    print("|---|---|---|")
    for name, loss_fn in LOSSES.items():
        fp32 = loss_peak(loss_fn, args.batch, args.seq, torch.float32)
        bf16 = loss_peak(loss_fn, args.batch, args.seq, torch.bfloat16)
        print(f"| {name} | {fp32 / GiB:.2f} GiB | {bf16 / GiB:.2f} GiB |")

    print(f"\n### Whole training step, OPT-125M, {args.batch} x {args.seq}, SDPA "
          "(ptlm.run.tools.memtrace.measure_step, steady state)\n")
    print("| setting | peak | activations | temporaries | optimizer states | measured in |")
    print("|---|---|---|---|---|---|")
    settings = [PLAIN_HF, PLAIN_HF.with_(chunked_loss=True),
                Setting(precision="bf16", chunked_loss=False), Setting(precision="bf16"),
                Setting(precision="bf16", checkpointing=True)]
    for setting in settings:
        r = measure_step(OPTConfig(), setting.with_(micro_batch=args.batch), args.seq)
        print(f"| {setting.with_(micro_batch=args.batch).describe()} | {r['peak_bytes'] / GiB:.2f} GiB "
              f"| {r['activations'] / GiB:.2f} | {r['temporaries'] / GiB:.2f} "
              f"| {r['optimizer_states'] / GiB:.2f} | {r['seconds']:.1f} s |")

    print(f"\n### Loss alone, real CPU time, fp32, {args.time_batch} x {args.time_seq} tokens, "
          f"OPT-125M head (forward + backward, median of {args.repeats})\n")
    print("| loss | seconds |")
    print("|---|---|")
    for name, loss_fn in LOSSES.items():
        seconds = loss_seconds(loss_fn, args.time_batch, args.time_seq, args.repeats)
        print(f"| {name} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
