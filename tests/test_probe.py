import json
import os
import sys

import pytest

from bench.common import run_bounded
from ptlm.errors import PtlmError
from ptlm.plan import probe_cache
from ptlm.plan.setting import Setting
from ptlm.run.machine.distributed import free_port
from tests.support import ROOT
from tests.support import tiny_model


class Device:
    """A micro-batch 'fits' when it is at most `limit`; counts the trials."""

    def __init__(self, limit):
        self.limit, self.tried = limit, []

    def __call__(self, micro):
        self.tried.append(micro)
        return micro <= self.limit


@pytest.mark.parametrize("limit, start, expected", [
    (16, 16, 16), (9, 16, 8), (5, 8, 4), (0, 4, 0), (100, 2, 16), (3, 1, 2)])
def test_largest_fitting_divisor(limit, start, expected):
    dev = Device(limit)
    assert probe_cache.largest_fitting(dev, probe_cache.divisors(16), start) == expected


def test_a_correct_plan_costs_two_trials_at_most():
    dev = Device(8)
    assert probe_cache.largest_fitting(dev, probe_cache.divisors(16), 8) == 8
    assert dev.tried == [8, 16]


def test_cache_round_trip(tmp_path, monkeypatch):
    monkeypatch.setenv(probe_cache.CACHE_ENV, str(tmp_path))
    s = Setting("bf16", micro_batch=16)
    key = probe_cache.cache_key("m", "T4", 16, 1024, s, 1)
    assert probe_cache.cached_largest(key) is None
    probe_cache.write_cache(key, {"largest_micro_batch": 4})
    assert probe_cache.cached_largest(key) == 4
    # the micro-batch is what the probe measures, not part of the key; the rest is
    assert probe_cache.cache_key("m", "T4", 16, 1024, s.with_(micro_batch=2), 1) == key
    assert probe_cache.cache_key("m", "T4", 16, 1024, s.with_(checkpointing=True), 1) != key
    (tmp_path / "probe.json").write_text("{broken")
    assert probe_cache.cached_largest(key) is None


def test_probe_two_ranks_agree_and_training_uses_the_result(tmp_path, demo_dataset):
    """Real DeepSpeed steps on 2 CPU ranks; the GPU's memory size is the one simulated thing."""
    model = tiny_model(tmp_path / "m")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
           probe_cache.CACHE_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    common = ["--model", str(model), "--from-scratch", "--global-batch", "16"]
    # find the simulated memory size between micro-batch 4 and 8's predictions (2 ranks: 8 each)
    r = run_bounded([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                     "--master_port", str(free_port()), "launch/probe.py", *common,
                     "--seq-len", "64", "--simulate-gpu-memory", "1MiB", "--json"],
                    timeout=300, cwd=ROOT, env=env)
    assert r.returncode != 0 and "micro-batch 1 ran out of memory" in r.stderr + r.stdout
    trials = json.loads((tmp_path / "cache" / "probe.json").read_text())
    (entry,) = trials.values()
    assert entry["largest_micro_batch"] == 0 and set(entry["trials"]) == {"1", "2", "4", "8"}
    p4, p8 = (entry["trials"][m]["predicted_bytes"] for m in ("4", "8"))
    limit = (p4 + p8) // 2
    r = run_bounded([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                     "--master_port", str(free_port()), "launch/probe.py", *common,
                     "--seq-len", "64", "--simulate-gpu-memory", str(limit)],
                    timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "largest micro-batch that fits: 4 (planned 8)" in r.stdout
    out = tmp_path / "run"
    r = run_bounded([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                     "--master_port", str(free_port()), "launch/train.py", *common,
                     "--data", str(demo_dataset), "--out", str(out), "--max-steps", "2",
                     "--no-export"],
                    timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    plan = json.loads((out / "plan.json").read_text())
    assert plan["micro_batch"] == 4 and plan["grad_accum"] == 2 and plan["global_batch"] == 16


def test_probe_with_data_builds_the_vocabulary_training_builds(tmp_path, demo_dataset):
    """--from-scratch --data: the table is sized to the data's tokenizer as `ptlm train` sizes
    it (not the config's own 1032 rows); seq_len comes from the data."""
    import argparse

    from tokenizers import Tokenizer
    from transformers import AutoConfig

    from ptlm.commands.probe import source_and_seq_len

    model = tiny_model(tmp_path / "m")
    config = AutoConfig.from_pretrained(model)
    config.vocab_size = 1032
    config.save_pretrained(model)
    ids = Tokenizer.from_file(str(demo_dataset / "tokenizer" / "tokenizer.json")).get_vocab_size()
    args = argparse.Namespace(model=str(model), from_scratch=True, data=str(demo_dataset),
                              seq_len=None, packing="documents")
    source, seq_len, data = source_and_seq_len(args)
    assert data.documents is not None  # the run's document structure, for the probe's steps
    assert (source.config.vocab_size, source.vocab, seq_len) == (ids, ids, 64) == (1024, 1024, 64)
    args.seq_len = 128
    with pytest.raises(PtlmError, match="blocks of 64 tokens"):
        source_and_seq_len(args)
