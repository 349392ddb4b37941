"""The optimizer for a Setting: torch AdamW, bitsandbytes 8-bit AdamW, or DeepSpeed's CPU Adam.

The optimizer is built on the model's parameters and handed to `deepspeed.initialize` as the
client optimizer; DeepSpeed then swaps its params for fp32 master copies (mixed precision) or
partitions (ZeRO), keeping the hyper-parameters and param groups built here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from ptlm.errors import PtlmError
from ptlm.plan.dsconfig import OptimizerHyper
from ptlm.plan.setting import Setting

log = logging.getLogger(__name__)

# Devices with a fused (single-kernel, no temporaries) AdamW in torch >= 2.4.
FUSED_ADAMW_DEVICES = ("cuda", "cpu", "xpu", "mps", "hpu")


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                 weight_decay: float) -> list[dict]:
    """Two groups: weight decay on matrices (linear and embedding weights), none on the rest.

    Biases and norm weights (LayerNorm, RMSNorm) are 1-D: decaying them towards 0 only fights
    the normalization (nanoGPT's rule; HF Trainer's name-based rule picks the same tensors).
    Under ZeRO-3 (zero.Init) a parameter's own shape is the empty placeholder [0]; its real
    shape is `ds_shape`.
    """
    decay, no_decay = [], []
    for name, p in named_params:
        if not p.requires_grad:
            continue
        (decay if len(full_shape(p)) >= 2 and not name.endswith("bias") else no_decay).append(p)
    if not decay and not no_decay:
        raise PtlmError("the model has no trainable parameters (all have requires_grad=False)")
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]  # DeepSpeed drops empty groups; so do we


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    """The parameter's whole shape, also when ZeRO-3 has partitioned it away (ds_shape)."""
    return tuple(getattr(p, "ds_shape", None) or p.shape)


def build_optimizer(setting: Setting, named_params: Iterable[tuple[str, torch.nn.Parameter]],
                    lr: float, weight_decay: float = OptimizerHyper.weight_decay,
                    betas: tuple[float, float] = OptimizerHyper.betas,
                    eps: float = OptimizerHyper.eps) -> torch.optim.Optimizer | None:
    """The optimizer for `setting`, or None when DeepSpeed must build its own from the config.

    - offload != "none": DeepSpeedCPUAdam (ZeRO-Offload refuses other client optimizers). It is a
      C++ extension JIT-compiled on first use (~1 min, cached under ~/.cache/torch_extensions); if the
      compile fails this returns None and DeepSpeed builds CPU Adam from the config's "optimizer".
    - adamw8bit: bitsandbytes AdamW8bit (8-bit m and v; tensors < 4096 elements stay 32-bit).
    - adamw: torch AdamW, fused where the device has the kernel, else foreach.
    """
    groups = param_groups(named_params, weight_decay)
    hyper = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if setting.offload != "none":
        return _cpu_adam(groups, hyper)
    if setting.optimizer == "adamw8bit":
        return _adamw_8bit(groups, hyper)
    return _torch_adamw(groups, hyper)


def _torch_adamw(groups: list[dict], hyper: dict) -> torch.optim.AdamW:
    params = [p for g in groups for p in g["params"]]
    devices = {p.device.type for p in params}
    fused = len(devices) == 1 and devices <= set(FUSED_ADAMW_DEVICES)
    return torch.optim.AdamW(groups, **hyper, fused=fused, foreach=None if fused else True)


def _adamw_8bit(groups: list[dict], hyper: dict) -> torch.optim.Optimizer:
    try:
        import bitsandbytes as bnb
    except ImportError as e:
        raise PtlmError("optimizer adamw8bit needs bitsandbytes (pip install bitsandbytes), "
                        "or use --optimizer adamw") from e
    return bnb.optim.AdamW8bit(groups, **hyper)


def _cpu_adam(groups: list[dict], hyper: dict) -> torch.optim.Optimizer | None:
    try:
        from deepspeed.ops.adam import DeepSpeedCPUAdam
        return DeepSpeedCPUAdam(groups, **hyper, adamw_mode=True)
    except Exception as e:  # the JIT compile can fail in many ways (no compiler, no ninja, headers)
        log.warning("DeepSpeed's CPU Adam could not be built here (%s: %s); leaving it to DeepSpeed, "
                    "which builds it from the config's \"optimizer\" section", type(e).__name__, e)
        return None
