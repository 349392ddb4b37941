"""Resuming through DeepSpeed's universal checkpoint (another number of ranks) restores the saved
RNG state of the rank, as a same-size resume does."""

from __future__ import annotations

import torch

from ptlm.run import checkpoint
from ptlm.run.machine.distributed import Dist


class FakeEngine:
    """Stands in for a DeepSpeed engine: load_checkpoint returns (path, client state)."""

    def __init__(self):
        self.loaded = None

    def load_checkpoint(self, load_dir, tag, **_):
        self.loaded = (load_dir, tag)
        return f"{load_dir}/{tag}", {"ptlm": {"step": 4}}


def test_universal_load_restores_the_rank_rng(tmp_path):
    path = tmp_path / "checkpoints" / checkpoint.tag_for(4)
    path.mkdir(parents=True)
    checkpoint.universal_path(path).mkdir()
    torch.manual_seed(123)
    torch.save(checkpoint.rng_state(), path / "rng_rank0.pt")
    expected = torch.rand(4)  # what the saving rank would have drawn next
    torch.manual_seed(0)  # a resumed run seeds from the config, then loads
    engine = FakeEngine()
    client = checkpoint.load(engine, path, Dist(0, 1, 0, torch.device("cpu")), universal=True)
    assert engine.loaded == (str(path.parent), checkpoint.universal_path(path).name)
    assert client["ptlm"]["step"] == 4
    assert torch.equal(torch.rand(4), expected)
