"""Export the trained model as a plain Hugging Face folder (safetensors + config + tokenizer),
loadable by `AutoModelForCausalLM.from_pretrained` without ptlm. ZeRO-3 shards are gathered."""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path

import torch

from ptlm.model.load import restore_use_cache
from ptlm.run.machine.distributed import Dist, barrier

log = logging.getLogger(__name__)


def export_hf(model, out_dir: Path, tokenizer_dir: Path, dist: Dist, zero_stage: int) -> Path:
    """Collective: every rank must call it (ZeRO-3 gathers parameters from all ranks)."""
    import deepspeed

    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    params = list(model.parameters())
    gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None) if zero_stage == 3
              else torch.no_grad())
    with gather:
        if dist.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            restore_use_cache(model)  # training turned the KV cache off; generation wants it
            state = {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}
            model.save_pretrained(str(tmp), state_dict=state, safe_serialization=True)
            for f in Path(tokenizer_dir).iterdir():
                shutil.copyfile(f, tmp / f.name)
    if dist.is_main:
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
        log.info("exported the Hugging Face model to %s", out_dir)
    barrier()
    return out_dir
