"""What several test files share, in one module that holds no tests: the checkout's paths, the
tiny model configs (sizes as parameters) and the helpers that launch a training run and read
its metrics. Fixtures stay in conftest.py; the plain-PyTorch reference of the setting matrix
is bench/matrix_reference.py (the benchmarks use it too)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from bench.common import run_bounded

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("PTLM_SHARED", ROOT.parent / "shared"))
DEMO_CORPUS = ROOT / "ptlm" / "assets" / "demo_corpus_pt.jsonl"

# The size of the models the training runs use (tiny_model).
TINY = dict(vocab=1024, hidden=64, layers=2, heads=4, ffn=128, positions=128)


def tiny_opt(vocab: int = TINY["vocab"], hidden: int = TINY["hidden"], ffn: int = TINY["ffn"],
             positions: int = TINY["positions"], layers: int = TINY["layers"],
             heads: int = TINY["heads"], **overrides):
    """A small OPTConfig; `overrides` are OPTConfig's own keywords (dropout=0.0, vocab_size=...)
    and win over the sizes."""
    from transformers import OPTConfig

    fields = dict(vocab_size=vocab, hidden_size=hidden, ffn_dim=ffn, num_hidden_layers=layers,
                  num_attention_heads=heads, max_position_embeddings=positions,
                  word_embed_proj_dim=hidden)
    return OPTConfig(**{**fields, **overrides})


def tiny_gpt2(vocab: int = TINY["vocab"], hidden: int = TINY["hidden"],
              positions: int = TINY["positions"], layers: int = TINY["layers"],
              heads: int = TINY["heads"], dropout: float = 0.0, **overrides):
    """A small GPT2Config (no attention dropout; `dropout` on the residuals and embeddings)."""
    from transformers import GPT2Config

    fields = dict(vocab_size=vocab, n_embd=hidden, n_layer=layers, n_head=heads,
                  n_positions=positions, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=0.0)
    return GPT2Config(**{**fields, **overrides})


def tiny_model(path, arch="opt", dropout=0.0, positions=TINY["positions"]):
    """A tiny OPT or GPT-2 config saved in `path` (the runs train it --from-scratch)."""
    if arch == "opt":
        cfg = tiny_opt(positions=positions, dropout=dropout, attention_dropout=0.0)
    else:
        cfg = tiny_gpt2(positions=positions, dropout=dropout)
    cfg.save_pretrained(path)
    return path


def train(data, out, model, *extra, ranks=1, check=True, scratch=True, env=None, port=None):
    """`launch/train.py` in a subprocess on CPU ranks (one plain process, or the deepspeed
    launcher's `ranks`), as users launch it."""
    from ptlm.run.machine.distributed import free_port

    args = ["launch/train.py", "--model", str(model), *(["--from-scratch"] if scratch else []),
            "--data", str(data), "--out", str(out), "--lr", "3e-3", "--seed", "0",
            *map(str, extra)]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", **(env or {})}
    if ranks == 1:
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks),
               "--master_port", str(port or free_port()), *args]
    r = run_bounded(cmd, timeout=600, cwd=ROOT, env=env)  # a hung rank ends with it
    if check:
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return r


def records(out, kind):
    return [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if r["kind"] == kind]


def losses(out):
    return [r["loss"] for r in records(out, "train")]
