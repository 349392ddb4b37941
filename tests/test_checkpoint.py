"""Checkpoint files on disk (ptlm.run.checkpoint), without DeepSpeed: a stand-in engine writes a
model file the way DeepSpeed's save_checkpoint does, so a save can be "killed" half-way."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from ptlm.errors import PtlmError
from ptlm.run import checkpoint
from ptlm.run.machine.distributed import Dist

ONE = Dist(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
MODEL_FILE = "mp_rank_00_model_states.pt"


class Killed(BaseException):
    """Stands for SIGKILL in the middle of a write."""


class FakeEngine:
    def __init__(self, payload: bytes = b"w" * 4096, die_after: int | None = None):
        self.payload, self.die_after = payload, die_after

    def save_checkpoint(self, save_dir, tag, client_state, save_latest):
        folder = checkpoint.Path(save_dir) / tag
        folder.mkdir(parents=True, exist_ok=True)
        with open(folder / MODEL_FILE, "wb") as f:  # truncates, as torch.save does
            if self.die_after is not None:
                f.write(self.payload[:self.die_after])
                f.flush()
                raise Killed
            f.write(self.payload)


def test_a_complete_checkpoint_is_never_rewritten(tmp_path):
    """The periodic save and the final save of the same step: the second one, killed mid-write,
    must not leave a truncated model file under the first one's completeness marker (before the
    fix it wrote into the complete folder, and --resume auto then died on the truncated file)."""
    checkpoint.save(FakeEngine(), tmp_path, 20, {}, ONE, keep_last=2)
    try:  # the fixed save never starts writing; the old one died half-way through the file
        checkpoint.save(FakeEngine(b"v" * 4096, die_after=100), tmp_path, 20, {}, ONE, 2)
    except Killed:
        pass
    tag = tmp_path / checkpoint.CHECKPOINTS / "step00000020"
    assert (tag / MODEL_FILE).read_bytes() == b"w" * 4096
    assert checkpoint.resolve(tmp_path, "auto") == tag


def test_a_killed_save_leaves_no_tag_and_the_next_save_cleans_it(tmp_path):
    checkpoint.save(FakeEngine(), tmp_path, 10, {}, ONE, keep_last=2)
    with pytest.raises(Killed):
        checkpoint.save(FakeEngine(die_after=10), tmp_path, 20, {}, ONE, keep_last=2)
    ckpts = tmp_path / checkpoint.CHECKPOINTS
    assert not (ckpts / "step00000020").exists()  # only the .partial folder
    assert checkpoint.resolve(tmp_path, "auto") == ckpts / "step00000010"
    checkpoint.save(FakeEngine(), tmp_path, 20, {}, ONE, keep_last=2)
    assert sorted(p.name for p in ckpts.iterdir()) == ["step00000010", "step00000020"]
    marker = json.loads((ckpts / "step00000020" / checkpoint.COMPLETE).read_text())
    assert marker["files"][MODEL_FILE] == 4096 and "rng_rank0.pt" in marker["files"]


def test_a_damaged_checkpoint_is_skipped_by_auto_and_refused_by_path(tmp_path, caplog):
    for step in (10, 20):
        checkpoint.save(FakeEngine(), tmp_path, step, {}, ONE, keep_last=5)
    ckpts = tmp_path / checkpoint.CHECKPOINTS
    damaged = ckpts / "step00000020"
    (damaged / MODEL_FILE).write_bytes(b"w" * 100)  # truncated under its marker
    with caplog.at_level(logging.WARNING, logger="ptlm.run.checkpoint"):
        assert checkpoint.resolve(tmp_path, "auto") == ckpts / "step00000010"
    assert "step00000020 is damaged" in caplog.text and "100 bytes, 4096" in caplog.text
    assert "resuming from" in caplog.text
    with pytest.raises(PtlmError, match="the checkpoint is damaged .*100 bytes"):
        checkpoint.resolve(tmp_path, str(damaged))
    (ckpts / "step00000010" / "rng_rank0.pt").unlink()
    with pytest.raises(PtlmError, match="no checkpoint .* is intact"):
        checkpoint.resolve(tmp_path, "auto")


def test_keep_last_prunes_only_complete_checkpoints(tmp_path):
    for step in (1, 2, 3):
        checkpoint.save(FakeEngine(), tmp_path, step, {}, ONE, keep_last=2)
    assert [t for _, t in checkpoint.complete_tags(tmp_path / checkpoint.CHECKPOINTS)] == [
        "step00000002", "step00000003"]
