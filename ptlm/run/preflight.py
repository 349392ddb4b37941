"""Everything the run decides before its first step: the model, the checks of data against model,
the hardware facts, the plan and the optimizer's hyper-parameters (the DeepSpeed config is
ptlm.plan.dsconfig.engine_config's). Each piece is a small function so the
checks run (and fail clearly) before any training starts."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ptlm.data import shards
from ptlm.data import tokenizer as toks
from ptlm.data.reader import PackedDataset
from ptlm.errors import PtlmError
from ptlm.model.config import is_config_only_alias, resolve_config
from ptlm.model.positions import check_length
from ptlm.model.profile import facts_for
from ptlm.plan import dsconfig, probe_cache
from ptlm.plan.facts import HardwareFacts
from ptlm.plan.memory import Job
from ptlm.plan.planner import Plan, plan
from ptlm.plan.setting import Forced
from ptlm.run.machine import hardware as machine
from ptlm.run.config import Optimization, RunConfig
from ptlm.run.machine.distributed import decided_by_rank0

log = logging.getLogger(__name__)

VOCAB_ROWS_MULTIPLE = 8  # a fresh model's embedding rows are padded to this (tensor-core tiles)
DEFAULT_GLOBAL_BATCH = 16  # sequences per optimizer step when neither flag nor plan says


@dataclass(frozen=True)
class ModelSource:
    """What the engine builds (ptlm.run.engine), the same for training and `ptlm probe`: `spec` as
    the user gave it (hub name, folder, alias), its config (checked against the data; with
    from_scratch its vocabulary sized to the data's tokenizer) and the ids the data holds
    (`vocab`; None when no data is at hand: the table is then the config's own)."""

    spec: str
    config: object
    from_scratch: bool = False
    vocab: int | None = None


def model_source(spec: str, from_scratch: bool, data: PackedDataset | None) -> ModelSource:
    """The model's config, checked against the data (its seq_len against the model's positions,
    ptlm.model.positions); for --from-scratch,
    its vocabulary sized to the data's tokenizer (rows padded to VOCAB_ROWS_MULTIPLE)."""
    config = resolve_config(spec)
    if not from_scratch and is_config_only_alias(spec):
        raise PtlmError(f"--model {spec} is a built-in config alias without weights: add "
                        "--from-scratch, or give a hub name / folder with weights")
    if data is None:
        return ModelSource(spec, config, from_scratch)
    check_length(config, data.seq_len, f"the data's seq_len {data.seq_len}", f"model {spec}",
                 lambda n: f"prepare the data again with --seq-len {n} or less")
    if from_scratch:
        config.vocab_size = -(-data.vocab_size // VOCAB_ROWS_MULTIPLE) * VOCAB_ROWS_MULTIPLE
        _set_special_ids(config, data)
    return ModelSource(spec, config, from_scratch, data.vocab_size)


def _set_special_ids(config, data: PackedDataset) -> None:
    """EOS (and BOS) are the data's document separator. No pad id: packed blocks have no
    padding, and OPT's / Llama's nn.Embedding(padding_idx=pad_token_id) zeroes that row at init
    and gives it no gradient from its input use, so a pad id equal to EOS (as set here before)
    never trained EOS as an input, though it starts every packed document after the first; a
    config's default pad id (OPT: 1) would do the same to an ordinary token."""
    eos = data.manifest["eos_id"]
    for key in ("eos_token_id", "bos_token_id"):
        if hasattr(config, key):
            setattr(config, key, eos)
    if hasattr(config, "pad_token_id"):
        config.pad_token_id = None


def tokenizer_problems(spec: str, rows: int | None, data: PackedDataset) -> list[str]:
    """Why the data's token ids are not the model's (training and `ptlm eval` alike): the model
    folder's own tokenizer.json is another tokenizer than the data's, or the data has ids past
    the model's `rows` embedding rows."""
    from pathlib import Path

    problems = []
    model_tok, data_tok = Path(spec) / "tokenizer.json", Path(data.tokenizer_path) / "tokenizer.json"
    if model_tok.is_file() and data_tok.is_file() and not toks.same_tokenizer(model_tok, data_tok):
        problems.append(f"the data {data.root} was prepared with another tokenizer "
                        f"({data.manifest['tokenizer']['source']}) than the model's own "
                        f"({model_tok.parent})")
    if isinstance(rows, int) and data.vocab_size > rows:
        problems.append(f"the data's tokenizer has {data.vocab_size:,} tokens, the model {spec} "
                        f"has {rows:,} embedding rows: ids {rows:,} and up have no row")
    return problems


def check_tokenizer(cfg: RunConfig, data: PackedDataset) -> None:
    """Before step 1, the data's tokenizer against what the run was told and the model has:

    - --tokenizer, when given, must be the tokenizer the data was made with;
    - the model's own tokenizer (its folder's tokenizer.json) must be the data's: same token ids
      for the same text. Another one is refused unless --allow-new-tokenizer;
    - every id of the data must have a row in the model's embedding table (the data's tokenizer
      size against the config's vocab_size). A smaller table is refused unless
      --allow-new-tokenizer, which resizes it (new rows), with a warning.
    --from-scratch sizes the table to the data's tokenizer: only --tokenizer is checked."""
    from pathlib import Path

    info = data.manifest["tokenizer"]
    if cfg.what.tokenizer:
        path = Path(cfg.what.tokenizer) / "tokenizer.json"
        if not path.exists():
            raise PtlmError(f"--tokenizer {cfg.what.tokenizer}: no tokenizer.json there")
        if shards.sha256_file(path) != info["sha256"]:
            raise PtlmError(f"--tokenizer {cfg.what.tokenizer} is not the tokenizer "
                            f"{cfg.corpus.data} was prepared with ({info['source']}); use "
                            f"{cfg.corpus.data / 'tokenizer'} or prepare the data again")
    if cfg.what.from_scratch:
        return
    allow = cfg.what.allow_new_tokenizer
    rows = getattr(resolve_config(cfg.what.model), "vocab_size", None)
    problems = tokenizer_problems(cfg.what.model, rows, data)
    if not problems:
        return
    if not allow:
        raise PtlmError("; ".join(problems) + ". Prepare the data with the model's tokenizer "
                        f"(`ptlm prepare --tokenizer {cfg.what.model} ...`), or pass "
                        "--allow-new-tokenizer to train on this one anyway (the embeddings are "
                        "resized to it; what the model learnt about its old token ids is lost)")
    resized = (f": its embedding table is resized from {rows:,} to {data.vocab_size:,}+ rows "
               "(new rows start at the mean of the old ones)"
               if isinstance(rows, int) and data.vocab_size > rows else "")
    log.warning("%s", "--allow-new-tokenizer: " + "; ".join(problems)
                + f". Training the model on this tokenizer anyway{resized}")


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
    its memory split across the local ranks; bf16 as DeepSpeed's CPU accelerator says (ptlm
    still trains fp32 on CPU unless --precision bf16/fp16 is forced, see plan_for)."""
    local = local_world_size(world_size)
    return machine.facts(gpus=local, nodes=max(1, world_size // max(local, 1)),
                         cpu_bf16=_accelerator_bf16)


def _accelerator_bf16() -> bool:
    """Whether DeepSpeed's accelerator (the CPU one here) trains bf16."""
    try:
        from deepspeed.accelerator import get_accelerator

        return bool(get_accelerator().is_bf16_supported())
    except Exception:  # no DeepSpeed, or an accelerator that cannot say: fp32/fp16 only
        return False


def _accelerator_fp16() -> bool:
    """Whether DeepSpeed's accelerator trains fp16 (it refuses fp16 where this is False)."""
    try:
        from deepspeed.accelerator import get_accelerator

        return bool(get_accelerator().is_fp16_supported())
    except Exception:
        return False


def resolve_plan(cfg: RunConfig, config, seq_len: int, world_size: int, on_gpu: bool) -> Plan:
    """The run's plan: --plan's file, or planned for this machine; decided by rank 0 alone and
    shared with every rank (ranks see their own host RAM, GPU and probe cache)."""
    return rank0_plan(lambda: _resolve_plan_here(cfg, config, seq_len, world_size, on_gpu))


def rank0_plan(decide: Callable[[], Plan]) -> Plan:
    """decide() on rank 0 only; every rank gets its Plan (ranks see their own host RAM, GPU and
    probe cache); an error on rank 0 is raised on every rank."""
    return decided_by_rank0(decide, "plan the run")


def _resolve_plan_here(cfg: RunConfig, config, seq_len: int, world_size: int,
                       on_gpu: bool) -> Plan:
    if cfg.what.plan != "auto":
        p = Plan.from_dict(json.loads(open(cfg.what.plan).read()))
        if p.hardware.world != world_size:
            raise PtlmError(f"--plan {cfg.what.plan} was made for {p.hardware.world} GPU(s), "
                            f"this run has {world_size} rank(s); plan again or launch as many "
                            "ranks")
        if p.job.seq_len != seq_len:
            raise PtlmError(f"--plan {cfg.what.plan} is for seq_len {p.job.seq_len}, the data has "
                            f"{seq_len}")
        return p
    return plan_for(cfg.what.model, config, seq_len, cfg.optim.global_batch or DEFAULT_GLOBAL_BATCH,
                    cfg.forced, world_size, on_gpu, documents=cfg.corpus.packing == "documents")


def plan_for(spec: str, config, seq_len: int, global_batch: int, forced: Forced, world_size: int,
             on_gpu: bool, use_probe_cache: bool = True, documents: bool = True) -> Plan:
    """plan() for this machine; a micro-batch above what `ptlm probe` saw fit here is lowered."""
    forced = forced.to_dict()  # the planner takes the set knobs as a dict
    if not on_gpu:  # CPU ranks: fp32 and no ZeRO/offload unless forced (they all run there)
        forced.setdefault("precision", "fp32")
        forced.setdefault("offload", "none")
        forced.setdefault("zero", 0)
        if forced["precision"] == "fp16" and not _accelerator_fp16():
            raise PtlmError("--precision fp16: DeepSpeed's CPU accelerator has no fp16 on this "
                            "CPU (no oneDNN fp16 kernels, e.g. AVX512-FP16/AMX-FP16); use "
                            "--precision bf16 or fp32 on CPU ranks")
    job = Job(seq_len=seq_len, global_batch=global_batch, documents=documents)
    facts = facts_for(config, spec, seq_len)
    hw = hardware(world_size)
    p = plan(facts, hw, job, forced)
    if not use_probe_cache or "micro_batch" in forced:
        return p
    key = probe_cache.cache_key(spec, hw.gpu_name, hw.gpu_memory_bytes, seq_len, p.setting,
                                world_size, documents)
    probed = probe_cache.cached_largest(key)
    if probed is not None and 0 < probed < p.micro_batch:
        log.info("ptlm probe measured micro-batch %d as the largest that fits %s here (planned "
                 "%d): using %d", probed, p.setting.describe(), p.micro_batch, probed)
        p = plan(facts, hw, job, {**forced, **p.setting.with_(micro_batch=probed).to_dict()})
    return p


def optimizer_hyper(o: Optimization) -> dsconfig.OptimizerHyper:
    """The run's optimizer hyper-parameters, as the DeepSpeed config carries them."""
    return dsconfig.OptimizerHyper(lr=o.lr, betas=o.betas, eps=o.eps,
                                   weight_decay=o.weight_decay, gradient_clipping=o.grad_clip)


def on_gpu() -> bool:
    return torch.cuda.is_available()
