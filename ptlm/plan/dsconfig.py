"""The DeepSpeed config from a plan: `engine_config` is the one function that makes the exact dict
the engine is built with, for `ptlm plan --write-ds-config`, training and `ptlm probe` alike;
from the plan's complete config (`build_ds_config`) or a filled template.

Keys are DeepSpeed's own (deepspeed/runtime/constants.py, runtime/zero/config.py,
runtime/zero/offload_config.py, runtime/precision_config.py). Templates in ds_configs/ use "auto"
for what the plan decides; `fill_template` fills those and refuses a template whose fixed values
contradict the plan (like HF Trainer's HfTrainerDeepSpeedConfig.fill_match), because the plan's
memory figures hold only for the plan's setting.
"""

from __future__ import annotations

import copy
import json
import sys
from dataclasses import dataclass
from pathlib import Path

from ptlm.errors import PtlmError
from ptlm.plan.planner import Plan
from ptlm.plan.setting import Setting

AUTO = "auto"
# The templates live in the checkout's ds_configs/; an installed ptlm also finds them where
# setup.cfg's data_files puts them (<prefix>/share/ptlm/ds_configs).
TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "ds_configs"
INSTALLED_TEMPLATES_DIR = Path(sys.prefix) / "share" / "ptlm" / "ds_configs"
# DeepSpeed's fp16 dynamic loss scaling defaults (precision_config.py), written out explicitly.
FP16_INITIAL_SCALE_POWER = 16
FP16_LOSS_SCALE_WINDOW = 1000
FP16_HYSTERESIS = 2
FP16_MIN_LOSS_SCALE = 1
# Effectively "never print": ptlm logs progress itself.
STEPS_PER_PRINT = 10**9

# Keys whose value the plan decides: a template may leave them "auto" or agree, never differ.
# (DeepSpeed's default stands in for a key the template leaves out.)
PLAN_OWNED: dict[str, object] = {
    "train_batch_size": None,
    "train_micro_batch_size_per_gpu": None,
    "gradient_accumulation_steps": 1,
    "bf16.enabled": False,
    "fp16.enabled": False,
    "zero_optimization.stage": 0,
    "zero_optimization.offload_optimizer.device": "none",
    "zero_optimization.offload_param.device": "none",
}

# Top-level keys the engine needs even when a template leaves them out: the optimizer's
# hyper-parameters (ptlm builds its optimizer from them) and, for 8-bit AdamW, ZeRO's leave to
# run an untested client optimizer.
PLAN_REQUIRED_EXTRAS = ("optimizer", "zero_allow_untested_optimizer")


@dataclass(frozen=True)
class OptimizerHyper:
    """The optimizer's hyper-parameters. Its defaults are the one source of every default:
    `ptlm train`'s (ptlm.run.config.Optimization), `ptlm plan --lr/--weight-decay`, the probe's,
    and ptlm.model.optim.build_optimizer's. Betas (0.9, 0.95) and weight decay 0.1 are the usual
    LLM (pre)training values (GPT-3, Llama, nanoGPT), 1.0 the usual clipping norm."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    weight_decay: float = 0.1
    gradient_clipping: float = 1.0


def build_ds_config(plan: Plan, hyper: OptimizerHyper | None = None) -> dict:
    """A complete DeepSpeed config (no "auto") for the plan's setting and batch split."""
    hyper = hyper or OptimizerHyper()
    s = plan.setting
    config = {
        "train_batch_size": plan.global_batch,
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "gradient_clipping": hyper.gradient_clipping,
        "bf16": {"enabled": s.precision == "bf16"},
        "fp16": _fp16_block(s),
        "zero_optimization": _zero_block(plan),
        "steps_per_print": STEPS_PER_PRINT,
        "wall_clock_breakdown": False,
        # The hyper-parameters' one home. ptlm builds the optimizer itself from them
        # (ptlm.model.optim, via optimizer_params) and hands it to deepspeed.initialize, which then
        # ignores this block (engine.optimizer_name() is the client's); DeepSpeed builds its own
        # from it only when ptlm hands none (CPU Adam that ptlm could not build).
        "optimizer": {"type": "AdamW", "params": {
            "lr": hyper.lr, "betas": list(hyper.betas), "eps": hyper.eps,
            "weight_decay": hyper.weight_decay}},
    }
    # ZeRO refuses a client optimizer that is not on its tested list (runtime/zero/utils.py
    # ZERO_SUPPORTED_OPTIMIZERS: torch AdamW and CPU Adam are; bitsandbytes' AdamW8bit is not)
    if s.optimizer == "adamw8bit":
        config["zero_allow_untested_optimizer"] = True
    return config


def engine_config(plan: Plan, hyper: OptimizerHyper | None = None, template: str | Path | None = None,
                  extra: dict | None = None) -> dict:
    """The exact DeepSpeed config the engine is built with (ptlm.run.engine.build_engine), the file
    `ptlm plan --write-ds-config` writes and the run's ds_config.json: the plan's complete config,
    or `template` (a ds_configs/ name or a path) filled from the plan; without a "scheduler"
    (ptlm's LR schedule is the one that runs); `extra`'s top-level entries added as they are
    (e.g. {"checkpoint": {"load_universal": True}}). A template's own optimizer values win over
    `hyper`'s, and the optimizer ptlm builds reads them back from here (optimizer_params)."""
    if template:
        config = fill_template(load_template(template), plan, hyper)
    else:
        config = build_ds_config(plan, hyper)
    config.pop("scheduler", None)
    config.update(copy.deepcopy(extra or {}))
    return config


def optimizer_params(config: dict) -> dict:
    """The optimizer's hyper-parameters in an engine config (engine_config's), as keyword
    arguments of ptlm.model.optim.build_optimizer."""
    params = config["optimizer"]["params"]
    return dict(lr=params["lr"], betas=tuple(params["betas"]), eps=params["eps"],
                weight_decay=params["weight_decay"])


def _fp16_block(s: Setting) -> dict:
    block = {"enabled": s.precision == "fp16"}
    if s.precision == "fp16":
        block.update(loss_scale=0, initial_scale_power=FP16_INITIAL_SCALE_POWER,
                     loss_scale_window=FP16_LOSS_SCALE_WINDOW, hysteresis=FP16_HYSTERESIS,
                     min_loss_scale=FP16_MIN_LOSS_SCALE)
    return block


def _zero_block(plan: Plan) -> dict:
    s, b = plan.setting, plan.ds_buffers
    zero = {"stage": s.zero}
    if s.zero == 0:
        return zero
    zero.update(contiguous_gradients=True, overlap_comm=s.zero >= 2, reduce_scatter=True,
                reduce_bucket_size=b.reduce_bucket_size)
    # Written even when "none" (a valid device), so templates can say "auto" for it.
    zero["offload_optimizer"] = {"device": "cpu" if s.offload != "none" else "none",
                                 "pin_memory": True}
    if s.zero < 3:
        zero.update(allgather_partitions=True, allgather_bucket_size=b.allgather_bucket_size)
        return zero
    zero["offload_param"] = {"device": "cpu" if s.offload == "parameters" else "none",
                             "pin_memory": True}
    zero.update(stage3_prefetch_bucket_size=b.prefetch_bucket_size,
                stage3_param_persistence_threshold=b.param_persistence_threshold,
                stage3_max_live_parameters=b.max_live_parameters,
                stage3_max_reuse_distance=b.max_live_parameters,
                sub_group_size=b.sub_group_size,
                stage3_gather_16bit_weights_on_model_save=True)
    return zero


# ----------------------------------------------------------------------------------------------
# Templates
# ----------------------------------------------------------------------------------------------

def template_name(setting: Setting) -> str:
    """The shipped template for a setting's ZeRO stage and offload."""
    if setting.zero in (0, 1):
        return f"zero{setting.zero}.json"
    suffix = "_offload" if setting.offload != "none" else ""
    return f"zero{setting.zero}{suffix}.json"


def load_template(path: str | Path) -> dict:
    """A template as a dict, without its documentation keys (those starting with "_")."""
    path = Path(path)
    for folder in (TEMPLATES_DIR, INSTALLED_TEMPLATES_DIR):
        if not path.is_file() and (folder / str(path)).is_file():
            path = folder / str(path)
    try:
        return _strip_private(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError) as e:
        raise PtlmError(f"cannot read DeepSpeed template {path}: {e}") from e


def _strip_private(value):
    if isinstance(value, dict):
        return {k: _strip_private(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list):
        return [_strip_private(v) for v in value]
    return value


def fill_template(template: dict, plan: Plan, hyper: OptimizerHyper | None = None) -> dict:
    """The template with every "auto" filled from the plan; PtlmError on a contradiction."""
    complete = build_ds_config(plan, hyper)
    template = _strip_private(copy.deepcopy(template))
    _check_plan_owned(template, complete)
    filled = _fill(template, complete, "")
    for key in PLAN_REQUIRED_EXTRAS:  # what this setting needs even if the template omits it
        if key in complete:
            filled.setdefault(key, complete[key])
    # a template's optimizer values win; the ones it leaves out are the hyper-parameters'
    filled["optimizer"]["params"] = {**complete["optimizer"]["params"],
                                     **filled["optimizer"].get("params", {})}
    return filled


def _check_plan_owned(template: dict, complete: dict) -> None:
    for key, default in PLAN_OWNED.items():
        have = _get(template, key, default)
        want = _get(complete, key, default)
        if have != AUTO and have != want:
            raise PtlmError(
                f"DeepSpeed template sets {key} = {have!r} but the plan needs {want!r}: set it to "
                f'"auto" (or use the template for this setting) so memory stays as planned')


def _fill(node, complete, path: str):
    if isinstance(node, dict):
        return {k: _fill(v, complete, f"{path}.{k}" if path else k) for k, v in node.items()}
    if node != AUTO:
        return node
    value = _get(complete, path, AUTO)
    if value == AUTO:
        raise PtlmError(f'DeepSpeed template has {path} = "auto" but the plan has no value for it '
                        f"(this setting does not use it): remove the key or give a value")
    return value


def _get(config: dict, dotted: str, default):
    node = config
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return default
        node = node[part]
    return node
