"""What a run leaves for people: metrics.jsonl (one JSON object per line), optional TensorBoard,
report.md with the results tables, and loss.png (when matplotlib is installed)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

log = logging.getLogger(__name__)

METRICS = "metrics.jsonl"
REPORT = "report.md"
PLOT = "loss.png"
TENSORBOARD = "tensorboard"  # event files: tensorboard --logdir RUN/tensorboard


class MetricsLog:
    """Rank 0 appends one JSON line per event (train step, eval, epoch); flushed each time so a
    killed run keeps what it measured. TensorBoard scalars too when tensorboard is installed."""

    def __init__(self, run_dir: Path, enabled: bool) -> None:
        self.enabled = enabled
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / METRICS
        self._file = self._tb = None

    def _open(self) -> None:
        """At the first record, not before: a run refused before step 1 (a resume check)
        leaves no metrics file or TensorBoard folder behind."""
        self._file = open(self.path, "a", encoding="utf-8")
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD))
        except ImportError:  # optional extra
            log.info("tensorboard not installed: metrics go to %s only (pip install "
                     "tensorboard)", self.path)

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        if self._file is None:
            self._open()
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None and "step" in record:
            kind = record.get("kind", "train")
            for key, value in record.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(f"{kind}/{key}", value, record["step"])

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            if self._tb is not None:
                self._tb.close()


def _fmt_time(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def render(summary: dict) -> str:
    """summary: run (dict of run facts) and epochs (list of per-epoch dicts)."""
    r = summary["run"]
    lines = ["# ptlm run report", "",
             f"Model `{r['model']}` on `{r['data']}`; setting: {r['setting']}.", "",
             "| seq len | epochs | micro batch | global batch | device | time/epoch | "
             "initial val ppl | final val ppl |",
             "|---|---|---|---|---|---|---|---|",
             f"| {r['seq_len']} | {r['epochs']} | {r['micro_batch']} | {r['global_batch']} | "
             f"{r['device']} | {_fmt_time(r.get('time_per_epoch_s'))} | "
             f"{_fmt(r.get('initial_val_ppl'), '.2f')} | {_fmt(r.get('final_val_ppl'), '.2f')} |",
             "", "| epoch | steps | train loss | val loss | val ppl | time |",
             "|---|---|---|---|---|---|"]
    for e in summary["epochs"]:
        lines.append(f"| {e['epoch']} | {e['step']} | {_fmt(e.get('train_loss'))} | "
                     f"{_fmt(e.get('val_loss'))} | {_fmt(e.get('val_ppl'), '.2f')} | "
                     f"{_fmt_time(e.get('time_s'))} |")
    extra = [f"- {k}: {v}" for k, v in r.get("notes", {}).items()]
    if extra:
        lines += ["", *extra]
    return "\n".join(lines) + "\n"


def plot(run_dir: Path, records: list[dict]) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no %s (pip install 'ptlm[plots]')", PLOT)
        return None
    train = [(r["step"], r["loss"]) for r in records if r.get("kind") == "train"]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("kind") == "eval"]
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    path = Path(run_dir) / PLOT
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write(run_dir: Path, summary: dict, records: list[dict]) -> Path:
    path = Path(run_dir) / REPORT
    path.write_text(render(summary), encoding="utf-8")
    plot(run_dir, records)
    return path
