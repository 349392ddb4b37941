"""Everything the run decides before its first step: the model, the checks of data against model,
the hardware facts, the plan and the DeepSpeed config. Each piece is a small function so the
checks run (and fail clearly) before any training starts."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace

import torch

from ptlm.data.reader import PackedDataset
from ptlm.errors import PtlmError
from ptlm.model.config import is_config_only_alias, resolve_config
from ptlm.plan import dsconfig
from ptlm.plan.facts import HardwareFacts, ModelFacts
from ptlm.plan.memory import Job
from ptlm.plan.planner import Plan, plan
from ptlm.run.config import RunConfig

log = logging.getLogger(__name__)

VOCAB_ROWS_MULTIPLE = 8  # a fresh model's embedding rows are padded to this (tensor-core tiles)
DEFAULT_GLOBAL_BATCH = 16  # sequences per optimizer step when neither flag nor plan says


def checked_config(cfg: RunConfig, data: PackedDataset):
    """The model's config, checked against the data (positions >= seq_len); for --from-scratch,
    its vocabulary sized to the data's tokenizer."""
    from ptlm.model.config import max_positions

    config = resolve_config(cfg.model)
    positions = max_positions(config)
    if positions is not None and data.seq_len > positions:
        raise PtlmError(f"the data's seq_len {data.seq_len} is above the {positions} positions of "
                        f"{cfg.model}; prepare the data again with --seq-len {positions} or less")
    if cfg.from_scratch:
        config.vocab_size = -(-data.vocab_size // VOCAB_ROWS_MULTIPLE) * VOCAB_ROWS_MULTIPLE
        _set_special_ids(config, data)
    elif is_config_only_alias(cfg.model):
        raise PtlmError(f"--model {cfg.model} is a built-in config alias without weights: add "
                        "--from-scratch, or give a hub name / folder with weights")
    return config


def build_model(cfg: RunConfig, config, data: PackedDataset, precision: str,
                ds_config: dict | None = None):
    """The HF model in the training precision, its embeddings large enough for the data's ids.
    With a ZeRO-3 DeepSpeed config, transformers builds it partitioned (deepspeed.zero.Init
    through HfDeepSpeedConfig): no rank ever holds the whole model."""
    from ptlm.model.load import check_vocab, load_model

    zero3 = None
    if ds_config and ds_config.get("zero_optimization", {}).get("stage") == 3:
        from transformers.integrations import HfDeepSpeedConfig

        zero3 = HfDeepSpeedConfig(ds_config)  # noqa: F841 - must be alive while the model loads
    model = load_model(config if cfg.from_scratch else cfg.model, precision=precision)
    check_vocab(model, data.vocab_size)
    return model


def _set_special_ids(config, data: PackedDataset) -> None:
    eos = data.manifest["eos_id"]
    for key in ("eos_token_id", "bos_token_id", "pad_token_id"):
        if hasattr(config, key):
            setattr(config, key, eos)


def check_tokenizer(cfg: RunConfig, data: PackedDataset) -> None:
    """--tokenizer must be the one the data was made with (same tokenizer.json bytes)."""
    if not cfg.tokenizer:
        return
    import hashlib
    from pathlib import Path

    path = Path(cfg.tokenizer) / "tokenizer.json"
    if not path.exists():
        raise PtlmError(f"--tokenizer {cfg.tokenizer}: no tokenizer.json there")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != data.manifest["tokenizer"]["sha256"]:
        raise PtlmError(f"--tokenizer {cfg.tokenizer} is not the tokenizer {cfg.data} was "
                        f"prepared with ({data.manifest['tokenizer']['source']}); use "
                        f"{cfg.data / 'tokenizer'} or prepare the data again")


def local_world_size(world_size: int) -> int:
    """Ranks on this node, as the launcher says: LOCAL_WORLD_SIZE (torchrun), LOCAL_SIZE
    (DeepSpeed's launcher and its MPICH/IMPI runners), OMPI_COMM_WORLD_LOCAL_SIZE (mpirun);
    a launcher that says nothing means one node."""
    for key in ("LOCAL_WORLD_SIZE", "LOCAL_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
        if os.environ.get(key):
            return int(os.environ[key])
    return world_size


def hardware(world_size: int) -> HardwareFacts:
    """This machine's facts, as the planner wants them. Without a GPU the host is the device:
    its memory split across the local ranks, no bf16 (ptlm trains fp32 on CPU)."""
    from ptlm.run.hardware import detect

    local = local_world_size(world_size)
    nodes = max(1, world_size // max(local, 1))
    hw = detect()
    if hw.gpus_per_node > 0:
        return replace(hw, gpus_per_node=local, nodes=nodes)
    host = hw.host_memory_bytes or 0
    return HardwareFacts(gpu_name="cpu", gpu_memory_bytes=max(host // max(local, 1), 1),
                         gpus_per_node=local, nodes=nodes, host_memory_bytes=host, bf16=False)


def resolve_plan(cfg: RunConfig, config, seq_len: int, world_size: int, on_gpu: bool) -> Plan:
    if cfg.plan != "auto":
        p = Plan.from_dict(json.loads(open(cfg.plan).read()))
        if p.hardware.world != world_size:
            raise PtlmError(f"--plan {cfg.plan} was made for {p.hardware.world} GPU(s), this run "
                            f"has {world_size} rank(s); plan again or launch as many ranks")
        if p.job.seq_len != seq_len:
            raise PtlmError(f"--plan {cfg.plan} is for seq_len {p.job.seq_len}, the data has "
                            f"{seq_len}")
        return p
    return plan_for(cfg.model, config, seq_len, cfg.global_batch or DEFAULT_GLOBAL_BATCH,
                    cfg.forced, world_size, on_gpu)


def plan_for(spec: str, config, seq_len: int, global_batch: int, forced: dict, world_size: int,
             on_gpu: bool, use_probe_cache: bool = True) -> Plan:
    """plan() for this machine; a micro-batch above what `ptlm probe` saw fit here is lowered."""
    from ptlm.plan import probe_cache

    forced = dict(forced)
    if not on_gpu:  # CPU ranks: fp32 and nothing to offload to
        forced.setdefault("precision", "fp32")
        forced.setdefault("offload", "none")
        forced.setdefault("zero", 0)
    job = Job(seq_len=seq_len, global_batch=global_batch)
    facts = ModelFacts.from_config(config, name=spec)
    hw = hardware(world_size)
    p = plan(facts, hw, job, forced)
    if not use_probe_cache or "micro_batch" in forced:
        return p
    key = probe_cache.cache_key(spec, hw.gpu_name, hw.gpu_memory_bytes, seq_len, p.setting, world_size)
    probed = probe_cache.cached_largest(key)
    if probed is not None and 0 < probed < p.micro_batch:
        log.info("ptlm probe measured micro-batch %d as the largest that fits %s here (planned "
                 "%d): using %d", probed, p.setting.describe(), p.micro_batch, probed)
        p = plan(facts, hw, job, {**forced, **p.setting.with_(micro_batch=probed).to_dict()})
    return p


def deepspeed_config(cfg: RunConfig, p: Plan) -> tuple[dict, dict]:
    """(complete DeepSpeed config, optimizer hyper-parameters). ptlm builds the optimizer itself
    (torch AdamW, bitsandbytes AdamW8bit or DeepSpeed CPU Adam) and hands it to DeepSpeed, so the
    config's "optimizer" block only carries the hyper-parameters (a template may set them)."""
    hyper = dsconfig.OptimizerHyper(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                    weight_decay=cfg.weight_decay, gradient_clipping=cfg.grad_clip)
    if cfg.ds_config:
        ds = dsconfig.fill_template(dsconfig.load_template(cfg.ds_config), p, hyper)
    else:
        ds = dsconfig.build_ds_config(p, hyper)
    params = ds.pop("optimizer", {}).get("params", {})
    ds.pop("scheduler", None)  # ptlm's schedule (transformers) is the one that runs
    ds["zero_allow_untested_optimizer"] = True
    opt = dict(lr=params.get("lr", cfg.lr), betas=tuple(params.get("betas", cfg.betas)),
               eps=params.get("eps", cfg.eps),
               weight_decay=params.get("weight_decay", cfg.weight_decay))
    return ds, opt


def on_gpu() -> bool:
    return torch.cuda.is_available()
