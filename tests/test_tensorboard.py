"""TensorBoard event files (issue 9): written by MetricsLog and by a real short run, readable by
tensorboard's own EventAccumulator (tensorboard is in the dev extra)."""

import pytest

# Not an importorskip: tensorboard is in the dev extra, and a skip would hide that the wiring
# went untested (as it did before).
from tensorboard.backend.event_processing import event_accumulator

from ptlm.run.report import TENSORBOARD, MetricsLog


def scalars(run_dir):
    acc = event_accumulator.EventAccumulator(str(run_dir / TENSORBOARD))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_metrics_log_writes_readable_event_files(tmp_path):
    log = MetricsLog(tmp_path, enabled=True)
    for step in (1, 2, 3):
        log.write({"kind": "train", "step": step, "loss": 5.0 - step, "lr": 1e-3, "note": "x"})
    log.write({"kind": "eval", "step": 3, "val_loss": 2.5, "val_ppl": 12.18, "tag": "final"})
    log.close()
    got = scalars(tmp_path)
    assert got["train/loss"] == [(1, 4.0), (2, 3.0), (3, 2.0)]
    assert got["eval/val_loss"] == [(3, 2.5)] and "train/note" not in got
    assert not (tmp_path / "other").exists()
    MetricsLog(tmp_path / "off", enabled=False).close()  # ranks other than 0 write nothing
    assert not (tmp_path / "off").exists()


def test_a_short_run_writes_readable_event_files(tmp_path, demo_dataset):
    from tests.support import records, tiny_model, train

    out = tmp_path / "run"
    train(demo_dataset, out, tiny_model(tmp_path / "m"), "--max-steps", 3, "--global-batch", 8,
          "--micro-batch", 8, "--eval-max-blocks", 8)
    got = scalars(out)
    steps = [r["step"] for r in records(out, "train")]
    assert [s for s, _ in got["train/loss"]] == steps and len(steps) == 3
    assert [v for _, v in got["train/loss"]] == pytest.approx(
        [r["loss"] for r in records(out, "train")], rel=1e-6)
    assert [s for s, _ in got["eval/val_loss"]] == [r["step"] for r in records(out, "eval")]
