"""The training run's configuration, split by concern: one dataclass per group, each field
carrying its help text, each group checking its own values with actionable errors.

    cfg.what.model   cfg.corpus.data   cfg.optim.lr   cfg.sched.epochs   cfg.eval.eval_every
    cfg.ckpt.keep_last   cfg.forced.zero   cfg.out   cfg.log_every

The `ptlm train` flags are generated from these fields (`ptlm.commands.flags`): a field named
`max_steps` is the flag `--max-steps`, its metadata gives the help (and choices), so a new field
is a new flag with no other code. A YAML file (`--config run.yaml`) is flat: each key names one
field of one group (`lr: 3e-4`, `zero: 2`); flags given on the command line win. `Forced` (the
Setting knobs the user forced; the planner chooses the rest) lives in ptlm.plan.setting.
"""

from __future__ import annotations

import types
import typing
from dataclasses import MISSING, Field, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

from ptlm.data.documents import DEFAULT_PACKING, PACKINGS
from ptlm.errors import PtlmError
from ptlm.plan.dsconfig import OptimizerHyper
from ptlm.plan.setting import Forced

SCHEDULES = ("cosine", "linear", "constant")
RESUME_CHOICES = ("auto", "none")


def opt(default=MISSING, help: str = "", **more):  # noqa: A002 - the argparse word
    """A field with its help text (and optional choices / metavar) in the metadata."""
    if isinstance(default, (list, dict, set)):
        raise TypeError("use a tuple default")
    return field(default=default, metadata={"help": help, **more})


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _fail_unless(checks: list[tuple[bool, str]]) -> None:
    for ok, message in checks:
        if not ok:
            raise PtlmError(message)


def field_type(cls, f: Field):
    """(base type, optional) of a field: `int | None` -> (int, True)."""
    hint = typing.get_type_hints(cls)[f.name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def coerce_fields(obj) -> None:
    """Check each field's value against its annotation (YAML gives any type); a wrong one is a
    PtlmError naming the flag. Normalizes int -> float, str -> Path, list -> tuple."""
    for f in fields(obj):
        value = getattr(obj, f.name)
        base, optional = field_type(type(obj), f)
        if value is None and optional:
            continue
        object.__setattr__(obj, f.name, _coerce(f.name, base, value))


def _coerce(name: str, base, value):
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is bool and isinstance(value, bool):
        return value
    if base is int and number and float(value).is_integer():
        return int(value)
    if base is float and number:
        return float(value)
    if base is str and isinstance(value, (str, Path)):
        return str(value)
    if base is Path and isinstance(value, (str, Path)) and str(value):
        return Path(value)
    if typing.get_origin(base) is tuple and isinstance(value, (list, tuple)):
        items = typing.get_args(base)
        if len(items) == len(value):
            return tuple(_coerce(name, t, v) for t, v in zip(items, value))
    expected = {bool: "true or false", int: "a whole number", float: "a number", str: "a string",
                Path: "a path"}.get(base, f"{len(typing.get_args(base))} numbers")
    raise PtlmError(f"{_flag(name)} {value!r}: expected {expected}")


@dataclass
class ModelSpec:
    """what to train"""

    model: str = opt(help="hub name, local HF folder, or a ptlm alias (opt-125m, gpt2)")
    from_scratch: bool = opt(False, "random init from the model's config (vocab sized to the data)")
    tokenizer: str | None = opt(None, "check that the data was made with this tokenizer")
    allow_new_tokenizer: bool = opt(False, "train on data from another tokenizer than the "
                                           "model's own: resizes the embeddings (new rows)")
    plan: str = opt("auto", "'auto' or a plan JSON from `ptlm plan --json`")
    ds_config: str | None = opt(None, "DeepSpeed template (ds_configs/*.json); its 'auto' values "
                                      "are filled from the plan")

    def __post_init__(self) -> None:
        coerce_fields(self)
        _fail_unless([
            (bool(self.model), "--model must name a model"),
            (self.plan == "auto" or Path(self.plan).is_file(),
             f"--plan {self.plan}: give 'auto' or a plan JSON file from `ptlm plan --json`"),
        ])


@dataclass
class Data:
    """the data"""

    data: Path = opt(help="folder written by `ptlm prepare`")
    seed: int = opt(0, "seed of the initial weights and the data order")
    overfit_docs: int | None = opt(None, "train (and evaluate) on the first N documents only: "
                                         "can the loop learn?", metavar="N")
    packing: str = opt(DEFAULT_PACKING, "documents: inside a packed block each document attends "
                                        "only to itself, its positions restart at 0 and nothing "
                                        "is predicted across a boundary (training, evaluation); "
                                        "stream: a block is one sequence", choices=PACKINGS)

    def __post_init__(self) -> None:
        coerce_fields(self)
        _fail_unless([
            (self.overfit_docs is None or self.overfit_docs >= 1, "--overfit-docs must be >= 1"),
            (self.packing in PACKINGS,
             f"--packing {self.packing!r} must be one of {', '.join(PACKINGS)}"),
        ])
        if not (self.data / "manifest.json").exists():
            raise PtlmError(f"--data {self.data}: no manifest.json there; prepare the data first "
                            f"with `ptlm prepare ... --out {self.data}`")


@dataclass
class Optimization:
    """optimization"""

    # the defaults are OptimizerHyper's, the one source (plan, probe and run alike)
    lr: float = opt(OptimizerHyper.lr, "peak learning rate")
    betas: tuple[float, float] = opt(OptimizerHyper.betas, "AdamW betas", metavar=("B1", "B2"))
    eps: float = opt(OptimizerHyper.eps, "AdamW epsilon")
    weight_decay: float = opt(OptimizerHyper.weight_decay, "AdamW weight decay")
    grad_clip: float = opt(OptimizerHyper.gradient_clipping, "gradient clipping norm (0 = off)")
    global_batch: int | None = opt(None, "sequences per optimizer step, all ranks together "
                                         "(default: the plan's)", metavar="B")

    def __post_init__(self) -> None:
        coerce_fields(self)
        _fail_unless([
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (all(0 <= b < 1 for b in self.betas), f"--betas must be in [0, 1), got {self.betas}"),
            (self.eps > 0, f"--eps must be > 0, got {self.eps}"),
            (self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.grad_clip >= 0, "--grad-clip must be >= 0 (0 = off)"),
            (self.global_batch is None or self.global_batch >= 1, "--global-batch must be >= 1"),
        ])


@dataclass
class Schedule:
    """how long, and the learning-rate schedule"""

    epochs: int = opt(1, "passes over the training data")
    stop_after_epochs: int | None = opt(None, "stop once N epochs are done, with the LR schedule "
                                              "planned for --epochs (resume with the same "
                                              "--epochs to go on, exactly as one run)",
                                        metavar="N")
    max_steps: int | None = opt(None, "stop after this many optimizer steps")
    max_tokens: int | None = opt(None, "token budget (sets the number of steps)")
    schedule: str = opt("cosine", "learning-rate schedule after the warmup", choices=SCHEDULES)
    warmup_steps: int | None = opt(None, "warmup steps (default: --warmup-ratio of the steps)")
    warmup_ratio: float = opt(0.02, "warmup as a fraction of the steps")
    min_lr_ratio: float = opt(0.1, "cosine decays to lr * this")
    rewarm_steps: int | None = opt(None, "on resuming a finished schedule (more --epochs or "
                                         "--max-steps): warm up again over N steps and decay to "
                                         "the new end (default: continue at the floor lr)",
                                   metavar="N")

    def __post_init__(self) -> None:
        coerce_fields(self)
        _fail_unless([
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.stop_after_epochs is None or 1 <= self.stop_after_epochs <= self.epochs,
             f"--stop-after-epochs {self.stop_after_epochs} is above --epochs {self.epochs} (or "
             "below 1): give N from 1 to --epochs; the schedule is planned for --epochs"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be >= 1"),
            (self.max_tokens is None or self.max_tokens >= 1, "--max-tokens must be >= 1"),
            (self.schedule in SCHEDULES,
             f"--schedule {self.schedule!r} must be one of {', '.join(SCHEDULES)}"),
            (self.warmup_steps is None or self.warmup_steps >= 0, "--warmup-steps must be >= 0"),
            (0 <= self.warmup_ratio < 1, "--warmup-ratio must be in [0, 1)"),
            (0 <= self.min_lr_ratio <= 1, "--min-lr-ratio must be in [0, 1]"),
            (self.rewarm_steps is None or self.rewarm_steps >= 1, "--rewarm-steps must be >= 1"),
        ])


@dataclass
class Evaluation:
    """evaluation"""

    eval_every: int = opt(0, "evaluate every N optimizer steps (0 = at step 0 and epoch ends "
                             "only)", metavar="N")
    eval_max_blocks: int | None = opt(None, "evaluate on at most N validation blocks",
                                      metavar="N")

    def __post_init__(self) -> None:
        coerce_fields(self)
        _fail_unless([
            (self.eval_every >= 0, "--eval-every must be >= 0 (0 = epoch ends only)"),
            (self.eval_max_blocks is None or self.eval_max_blocks >= 1,
             "--eval-max-blocks must be >= 1"),
        ])


@dataclass
class Checkpoints:
    """checkpoints and export"""

    save_every: int = opt(0, "save every N optimizer steps (0 = epoch ends and the end only)",
                          metavar="N")
    save_every_minutes: float = opt(0.0, "also save every M minutes (0 = off)", metavar="M")
    keep_last: int = opt(2, "complete checkpoints to keep", metavar="N")
    resume: str = opt("auto", "auto: the latest complete checkpoint in --out; none; or a "
                              "checkpoint folder")
    export: bool = opt(True, "export a Hugging Face model to OUT/hf_model at the end")

    def __post_init__(self) -> None:
        coerce_fields(self)
        _fail_unless([
            (self.save_every >= 0, "--save-every must be >= 0 (0 = epoch ends only)"),
            (self.save_every_minutes >= 0, "--save-every-minutes must be >= 0 (0 = off)"),
            (self.keep_last >= 1, "--keep-last must be >= 1"),
            (self.resume in RESUME_CHOICES or Path(self.resume).is_dir(),
             f"--resume {self.resume}: give auto, none, or a checkpoint folder"),
        ])


@dataclass(kw_only=True)
class RunConfig:
    """A training run. Build it from flat options with `RunConfig.from_flat`."""

    what: ModelSpec
    corpus: Data
    out: Path = opt(help="run folder (checkpoints, metrics, report, export)")
    optim: Optimization = field(default_factory=Optimization)
    sched: Schedule = field(default_factory=Schedule)
    eval: Evaluation = field(default_factory=Evaluation)
    ckpt: Checkpoints = field(default_factory=Checkpoints)
    forced: Forced = field(default_factory=Forced)
    log_every: int = opt(1, "log every N optimizer steps", metavar="N")

    def __post_init__(self) -> None:
        for f in fields(self):
            group, value = _group_type(f), getattr(self, f.name)
            if group is None:
                setattr(self, f.name, _coerce(f.name, field_type(RunConfig, f)[0], value))
            elif not isinstance(value, group):
                raise TypeError(f"RunConfig.{f.name} must be a {group.__name__}")
        _fail_unless([(self.log_every >= 1, "--log-every must be >= 1")])

    @classmethod
    def from_flat(cls, values: dict) -> "RunConfig":
        """From flat options (YAML keys / flag names with underscores): each key names one
        field of one group. Unknown keys and missing required ones are errors."""
        owners = option_owners()
        unknown = set(values) - set(owners)
        if unknown:
            raise PtlmError(f"unknown keys {sorted(unknown)}: each key is a run option with "
                            "underscores (e.g. max_steps: 100); see `ptlm train --help`")
        grouped: dict[str | None, dict] = {}
        for name, value in values.items():
            grouped.setdefault(owners[name], {})[name] = value
        for name, group in owners.items():
            f = _fields_of(_group_class(group))[name]
            if f.default is MISSING and f.default_factory is MISSING and name not in values:
                raise PtlmError(f"{_flag(name)} is required (on the command line or in --config)")
        # value checks first, the file-system checks (plan, resume, data) after them
        order = [f.name for f in fields(cls) if _group_type(f) is not None]
        order.sort(key=lambda g: g in ("what", "corpus"))
        groups = {g: _group_type(_fields_of(cls)[g])(**grouped.get(g, {})) for g in order}
        return cls(**groups, **grouped.get(None, {}))

    def flat(self) -> dict:
        """The inverse of from_flat: {option: value}."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if _group_type(f) is not None:
                out.update({g.name: getattr(value, g.name) for g in fields(value)})
            else:
                out[f.name] = value
        return out

    def to_dict(self) -> dict:
        """Nested by group, JSON-ready (run_config.json, the checkpoint's client state)."""
        return _plain(asdict(self))


def _group_type(f: Field):
    """The dataclass of a RunConfig group field, None for a plain option."""
    hint = typing.get_type_hints(RunConfig)[f.name]
    return hint if is_dataclass(hint) else None


def _group_class(group: str | None):
    return RunConfig if group is None else _group_type(_fields_of(RunConfig)[group])


def _fields_of(cls) -> dict[str, Field]:
    return {f.name: f for f in fields(cls)}


def option_owners() -> dict[str, str | None]:
    """Each flat option -> the RunConfig group holding it (None: a field of RunConfig itself)."""
    owners: dict[str, str | None] = {}
    for f in fields(RunConfig):
        group = _group_type(f)
        names = [g.name for g in fields(group)] if group else [f.name]
        for name in names:
            if name in owners:
                raise TypeError(f"run option {name!r} is in two groups")
            owners[name] = f.name if group else None
    return owners


def _plain(value):
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value) if isinstance(value, Path) else value
