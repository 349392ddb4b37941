import itertools
import os

import numpy as np
import pytest
import torch

from ptlm.data.reader import (
    PackedDataset,
    PackedLoader,
    epoch_length,
    epoch_order,
    eval_slice,
    rank_positions,
)
from ptlm.errors import PtlmError


def test_dataset_items_are_long_tensors_of_seq_len(demo_dataset):
    ds = PackedDataset(demo_dataset, "train")
    assert len(ds) > 100
    x = ds[3]
    assert x.dtype == torch.int64 and x.shape == (64,)
    assert torch.equal(ds.batch([3, 0])[0], x)
    assert int(ds.batch(range(len(ds))).max()) < ds.vocab_size
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(PtlmError, match="no split 'test'"):
        PackedDataset(demo_dataset, "test")


def test_order_depends_on_seed_and_epoch_only():
    a = epoch_order(1000, seed=3, epoch=0)
    assert sorted(a.tolist()) == list(range(1000))
    assert (a == epoch_order(1000, 3, 0)).all()
    assert not (a == epoch_order(1000, 3, 1)).all()
    assert not (a == epoch_order(1000, 4, 0)).all()


@pytest.mark.parametrize("n, world, drop_last", [(103, 1, True), (103, 2, False), (96, 4, True),
                                                  (1001, 3, False), (10**6, 8, True)])
def test_rank_partitions_are_disjoint_equal_and_cover(n, world, drop_last):
    global_batch = 4 * world
    total = epoch_length(n, global_batch, drop_last)
    parts = [rank_positions(0, total, world, r) for r in range(world)]
    assert len({len(p) for p in parts}) == 1  # equal
    allpos = np.concatenate(parts)
    assert len(np.unique(allpos)) == len(allpos) == total  # disjoint, exact
    if drop_last:
        assert n - global_batch < total <= n
    else:
        assert total >= n and total - n < global_batch  # covers every block


def test_eval_slices_cover_without_overlap():
    for n, w in [(10, 3), (2, 4), (1000, 7)]:
        got = [i for r in range(w) for i in eval_slice(n, w, r)]
        assert got == list(range(n))


def blocks_seen(loader, steps=None):
    """The batches a caller takes; islice stops without pulling one batch too many."""
    return [b.input_ids for b in itertools.islice(loader, steps)]


def global_batches(ds, world, micro, global_batch, seed=0, epochs=1):
    """Per optimizer step, the sorted multiset of block rows all ranks saw."""
    loaders = [PackedLoader(ds, micro, world_size=world, rank=r, global_batch=global_batch,
                            seed=seed) for r in range(world)]
    per_rank = [[b.input_ids for _ in range(epochs) for b in ld] for ld in loaders]
    accum = global_batch // (micro * world)
    steps = []
    for s in range(len(per_rank[0]) // accum):
        rows = torch.cat([per_rank[r][s * accum + a] for r in range(world) for a in range(accum)])
        steps.append(sorted(map(tuple, rows.tolist())))
    return steps


def test_same_global_batches_whatever_the_number_of_ranks(demo_dataset):
    ds = PackedDataset(demo_dataset, "train")
    one = global_batches(ds, world=1, micro=8, global_batch=8, epochs=2)
    two = global_batches(ds, world=2, micro=2, global_batch=8, epochs=2)
    four = global_batches(ds, world=4, micro=1, global_batch=8, epochs=2)
    assert one == two == four
    assert len(one) == 2 * (len(ds) // 8)


def test_resume_mid_epoch_is_exact_and_does_not_replay(demo_dataset, monkeypatch):
    ds = PackedDataset(demo_dataset, "train")
    full = blocks_seen(PackedLoader(ds, 4, seed=5))
    first = PackedLoader(ds, 4, seed=5)
    head = blocks_seen(first, steps=7)
    state = first.state_dict()
    resumed = PackedLoader(ds, 4, seed=5)
    resumed.load_state_dict(state)
    fetched = []
    orig = ds.batch
    monkeypatch.setattr(ds, "batch", lambda idx: fetched.append(1) or orig(idx))
    tail = blocks_seen(resumed)
    assert len(fetched) == len(tail)  # O(1) resume: no skipped batch was read again
    assert all(torch.equal(a, b) for a, b in zip(head + tail, full))
    assert resumed.epoch == 1 and resumed.consumed == 0


def test_resume_on_another_world_size_continues_the_same_global_batches(demo_dataset):
    ds = PackedDataset(demo_dataset, "train")
    ref = global_batches(ds, world=1, micro=4, global_batch=8)
    two = [PackedLoader(ds, 2, world_size=2, rank=r, global_batch=8) for r in range(2)]
    for ld in two:
        blocks_seen(ld, steps=2 * 3)  # 3 optimizer steps with accumulation 2
    state = two[0].state_dict()
    one = PackedLoader(ds, 4, world_size=1, rank=0, global_batch=8)
    one.load_state_dict(state)
    rest = blocks_seen(one)
    steps = [sorted(map(tuple, torch.cat(rest[i:i + 2]).tolist())) for i in range(0, len(rest), 2)]
    assert steps == ref[3:]


def test_resume_refuses_other_data_or_batch(demo_dataset):
    ds = PackedDataset(demo_dataset, "train")
    state = PackedLoader(ds, 4, seed=1).state_dict()
    with pytest.raises(PtlmError, match="seed"):
        PackedLoader(ds, 4, seed=2).load_state_dict(state)
    with pytest.raises(PtlmError, match="global batch"):
        PackedLoader(ds, 8, seed=1).load_state_dict(state)
    with pytest.raises(PtlmError, match="not a multiple"):
        PackedLoader(ds, 3, global_batch=8)


def rss_anon_kib() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    pytest.skip("no /proc/self/status RssAnon on this OS")


def test_iterating_a_split_adds_little_resident_memory(tmp_path):
    from ptlm.data.shards import ShardWriter, write_json_atomic

    n, T = 20_000, 1024  # 40 MB of uint16 tokens on disk
    w = ShardWriter(tmp_path, "train", T, np.uint16, shard_bytes=8 * 2**20)
    rng = np.random.default_rng(0)
    for _ in range(n // 1000):
        w.write(rng.integers(0, 50000, size=(1000, T), dtype=np.uint16))
    meta = w.close()
    write_json_atomic(tmp_path / "manifest.json", {
        "format": "ptlm-packed", "format_version": 1, "seq_len": T, "dtype": "uint16",
        "tokenizer": {"path": "tokenizer", "vocab_size": 50257},
        "splits": {"train": {"shards": meta, "blocks": n}}})
    ds = PackedDataset(tmp_path, "train", packing="stream")  # no document lengths written
    loader = PackedLoader(ds, 16)
    before = rss_anon_kib()
    tokens = sum(b.input_ids.numel() for b in loader)
    grown_mib = (rss_anon_kib() - before) / 1024
    assert tokens == n // 16 * 16 * T
    assert grown_mib < 8, f"anonymous RSS grew by {grown_mib:.1f} MiB over a 40 MB split"


def test_training_refuses_a_corrupt_shard_before_step_1(tmp_path, demo_dataset):
    """Issue 9: a flipped byte inside the vocabulary used to train silently (and one outside it
    crashed mid-epoch with an IndexError); the trainer now checks every shard first."""
    import shutil
    import subprocess
    import sys

    from ptlm.data.shards import read_manifest
    from tests.support import ROOT
    from tests.support import tiny_model

    data = tmp_path / "data"
    shutil.copytree(demo_dataset, data)
    shard = data / read_manifest(data)["splits"]["train"]["shards"][0]["file"]
    raw = bytearray(shard.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    shard.write_bytes(bytes(raw))
    out = tmp_path / "run"
    r = subprocess.run(
        [sys.executable, "launch/train.py", "--model", str(tiny_model(tmp_path / "m")),
         "--from-scratch", "--data", str(data), "--out", str(out)], cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
             "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "ptlm train: error:" in r.stderr and "is corrupt" in r.stderr
    assert shard.name in r.stderr and "ptlm prepare" in r.stderr
    assert not (out / "metrics.jsonl").exists()  # failed before step 1 (before any eval too)
