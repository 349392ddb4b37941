"""The training run's configuration: a dataclass with actionable errors, from flags and/or YAML.

Flags use one vocabulary with `ptlm plan`: the Setting knobs (`--precision`, `--zero`,
`--offload`, `--checkpointing`, `--optimizer`, `--chunked-loss`, `--micro-batch`) come from
`ptlm.plan_cli.add_setting_arguments`. A YAML file (`--config run.yaml`) gives defaults with the
same names (underscores); flags given on the command line win.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

from ptlm.errors import PtlmError

SCHEDULES = ("cosine", "linear", "constant")
RESUME_CHOICES = ("auto", "none")


@dataclass
class RunConfig:
    model: str
    data: Path
    out: Path
    from_scratch: bool = False  # build `model`'s config with random weights
    tokenizer: str | None = None  # must match the data's tokenizer when given
    plan: str = "auto"  # "auto" or a plan JSON written by `ptlm plan --json`
    ds_config: str | None = None  # a ds_configs/ template whose "auto" values the plan fills
    forced: dict = field(default_factory=dict)  # Setting knobs forced by the user
    global_batch: int | None = None  # sequences per optimizer step, all ranks together
    epochs: int = 1
    max_steps: int | None = None
    max_tokens: int | None = None  # token budget, another way to say max_steps
    lr: float = 1e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * this
    schedule: str = "cosine"
    warmup_steps: int | None = None
    warmup_ratio: float = 0.02
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    eval_every: int = 0  # optimizer steps; 0 = at step 0 and every epoch end only
    eval_max_blocks: int | None = None
    save_every: int = 0  # optimizer steps; 0 = epoch ends and the end only
    save_every_minutes: float = 0.0
    keep_last: int = 2
    resume: str = "auto"  # "auto", "none" or a checkpoint folder
    seed: int = 0
    overfit_docs: int | None = None
    log_every: int = 1
    export: bool = True

    def __post_init__(self) -> None:
        self.data, self.out = Path(self.data), Path(self.out)
        self.betas = tuple(self.betas)
        checks = [
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "--max-tokens must be >= 1"),
            (self.global_batch is None or self.global_batch >= 1, "--global-batch must be >= 1"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
            (self.schedule in SCHEDULES, f"--schedule must be one of {SCHEDULES}"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0 (0 = off)"),
            (self.eval_every >= 0 and self.save_every >= 0, "--eval-every/--save-every >= 0"),
            (self.keep_last >= 1, "--keep-last must be >= 1"),
            (self.overfit_docs is None or self.overfit_docs >= 1, "--overfit-docs must be >= 1"),
            (self.plan == "auto" or Path(self.plan).is_file(),
             f"--plan {self.plan}: give 'auto' or a plan JSON file from `ptlm plan --json`"),
            (self.resume in RESUME_CHOICES or Path(self.resume).is_dir(),
             f"--resume {self.resume}: give auto, none, or a checkpoint folder"),
        ]
        for ok, message in checks:
            if not ok:
                raise PtlmError(message)
        if not (self.data / "manifest.json").exists():
            raise PtlmError(f"--data {self.data}: no manifest.json there; prepare the data first "
                            f"with `ptlm prepare ... --out {self.data}`")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["data"], d["out"] = str(self.data), str(self.out)
        return d
