"""Load a causal LM for training: dtype, attention kernel, checkpointing, vocabulary size.

`load_model` takes a hub name, a local folder or a transformers config (fresh random weights) and
returns an `AutoModelForCausalLM` in the training precision. It never runs remote code unless asked
(`trust_remote_code=True`) and reads safetensors whenever the checkpoint has them.
"""

from __future__ import annotations

import glob
import logging
import os

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel
from transformers.utils import is_flash_attn_2_available

from ptlm.errors import PtlmError

log = logging.getLogger(__name__)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
ATTN_CHOICES = ("auto", "sdpa", "flash_attention_2", "eager")
PATH_PREFIXES = (".", "/", "~")  # a spec starting with these is a folder, never a hub name


def load_model(spec, precision: str = "bf16", attn: str = "auto", checkpointing: bool = False,
               trust_remote_code: bool = False, revision: str | None = None) -> PreTrainedModel:
    """Load `spec` (hub name, local folder, or a config for a fresh random init) for training.

    precision: "bf16" | "fp16" | "fp32" -- the weights are loaded directly in that dtype (DeepSpeed's
      mixed precision builds its fp32 master copy from the 16-bit weights either way).
    attn: "auto" picks flash_attention_2 when flash-attn is installed, CUDA is present and the
      dtype is 16-bit, else SDPA (falling back to eager for architectures without SDPA).
    checkpointing: activation checkpointing on every decoder layer (non-reentrant), and
      `config.use_cache=False` while training; call `restore_use_cache` before saving for export.
    """
    if precision not in DTYPES:
        raise PtlmError(f"precision {precision!r} is not one of {tuple(DTYPES)}")
    if attn not in ATTN_CHOICES:
        raise PtlmError(f"attention {attn!r} is not one of {ATTN_CHOICES}")
    impl = _pick_attention(attn, precision)
    try:
        model = _load(spec, DTYPES[precision], impl, trust_remote_code, revision)
    except ValueError as e:
        if attn != "auto" or "attention" not in str(e).lower():
            raise PtlmError(f"cannot build a causal LM from {_describe(spec)}: {e}") from e
        # Some architectures have no SDPA path; "auto" means "the best that works".
        log.warning("%s has no %s attention (%s); using eager attention", _describe(spec), impl, e)
        model = _load(spec, DTYPES[precision], "eager", trust_remote_code, revision)
    if checkpointing:
        enable_checkpointing(model)
    return model


def _pick_attention(attn: str, precision: str) -> str:
    if attn == "flash_attention_2" and not is_flash_attn_2_available():
        raise PtlmError("flash_attention_2 needs the flash-attn package and a CUDA GPU "
                        "(pip install flash-attn --no-build-isolation), or use --attn sdpa")
    if attn == "flash_attention_2" and precision == "fp32":
        raise PtlmError("flash_attention_2 runs only in bf16/fp16; use --attn sdpa with fp32")
    if attn != "auto":
        return attn
    if is_flash_attn_2_available() and torch.cuda.is_available() and precision != "fp32":
        return "flash_attention_2"
    return "sdpa"


def _load(spec, dtype: torch.dtype, impl: str, trust_remote_code: bool,
          revision: str | None) -> PreTrainedModel:
    common = dict(dtype=dtype, attn_implementation=impl, trust_remote_code=trust_remote_code)
    if isinstance(spec, PretrainedConfig):
        return AutoModelForCausalLM.from_config(spec, **common)
    spec = str(spec)
    if os.path.isdir(spec):
        return _load_folder(spec, common)
    if spec.startswith(PATH_PREFIXES):
        raise PtlmError(f"model folder {spec!r} does not exist")
    return _load_hub(spec, common, revision)


def _load_folder(folder: str, common: dict) -> PreTrainedModel:
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise PtlmError(f"{folder!r} has no config.json: point --model at a folder written by "
                        "save_pretrained, or give a hub name")
    has_safetensors = bool(glob.glob(os.path.join(folder, "*.safetensors*")))
    if not has_safetensors and not glob.glob(os.path.join(folder, "pytorch_model*.bin*")):
        raise PtlmError(f"{folder!r} holds a config.json but no weights (no model.safetensors or "
                        "pytorch_model.bin): pass --from-scratch to train this architecture from a "
                        "random initialization, or point --model at a folder with weights")
    if not has_safetensors:
        log.warning("%s has no safetensors weights; loading the pickled pytorch_model.bin "
                    "(convert it once with save_pretrained to load faster and safer)", folder)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, use_safetensors=has_safetensors, **common)
    except OSError as e:
        raise PtlmError(f"cannot load weights from {folder!r}: {e}") from e


def _load_hub(name: str, common: dict, revision: str | None) -> PreTrainedModel:
    # use_safetensors=True also takes the safetensors conversion PR (refs/pr/N, opened by
    # SFconvertbot) that many old repos have instead of safetensors on main.
    try:
        return AutoModelForCausalLM.from_pretrained(name, use_safetensors=True, revision=revision,
                                                    **common)
    except OSError as e:
        if "safetensors" not in str(e):
            raise PtlmError(f"cannot load {name!r} from the Hugging Face hub: {e}. Check the name, "
                            "your network (or HF_HUB_OFFLINE with a filled cache), or pass a local "
                            "folder") from e
    # Old repos ship only pickled weights; transformers loads them with torch.load(weights_only=True).
    log.warning("%s has no safetensors weights on the hub; loading pytorch_model.bin", name)
    try:
        return AutoModelForCausalLM.from_pretrained(name, use_safetensors=False, revision=revision,
                                                    **common)
    except OSError as e:
        raise PtlmError(f"cannot load {name!r} from the Hugging Face hub: {e}") from e


def _describe(spec) -> str:
    return f"config {type(spec).__name__}" if isinstance(spec, PretrainedConfig) else repr(str(spec))


def enable_checkpointing(model: PreTrainedModel) -> None:
    """Recompute each decoder layer in backward instead of keeping its activations.

    Non-reentrant checkpointing: works when the inputs need no grad (frozen embeddings) and under
    DeepSpeed ZeRO-3. The KV cache is useless while training and conflicts with recomputation,
    so `use_cache` goes off in the config; `restore_use_cache` turns it back on for export.
    """
    if not model.supports_gradient_checkpointing:
        raise PtlmError(f"{type(model).__name__} does not support activation checkpointing; "
                        "train without --checkpointing")
    # transformers 5.x renamed gradient_checkpointing_enable (now a deprecated alias).
    enable = (getattr(model, "activation_checkpointing_enable", None)
              or model.gradient_checkpointing_enable)
    enable({"use_reentrant": False})
    model.config.use_cache = False


def restore_use_cache(model: PreTrainedModel) -> None:
    """Set `use_cache=True` back before save_pretrained, so the exported model generates with a cache.

    Training with checkpointing sets `config.use_cache=False`, which otherwise leaks into the saved
    config.json and makes generation slow for whoever downloads the model (trl #1798).
    """
    model.config.use_cache = True
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None and getattr(generation_config, "use_cache", None) is False:
        generation_config.use_cache = True


def check_vocab(model: PreTrainedModel, vocab_size_needed: int,
                pad_to_multiple_of: int | None = None) -> int:
    """Make the embedding table hold `vocab_size_needed` ids (the tokenizer's size); return its size.

    A table larger than the tokenizer is fine (OPT pads 50,265 tokens to 50,272 rows). A smaller
    one means the tokenizer grew (added special tokens): the input and output embeddings are resized
    and the new rows initialized from the old rows' mean (transformers' mean_resizing).

    Under ZeRO-3 (zero.Init) the table is partitioned: its own shape is the placeholder [0], the
    real row count is `ds_shape[0]`. It is resized only when really too small, by transformers'
    resize_token_embeddings, which gathers the partitions itself (GatheredParameters) while the
    HfDeepSpeedConfig that built the model is alive; deepspeed.initialize partitions the new table.
    """
    if vocab_size_needed < 1:
        raise PtlmError(f"the tokenizer must have at least one token, got {vocab_size_needed}")
    try:
        have = embedding_rows(model)
    except (NotImplementedError, AttributeError) as e:
        raise PtlmError(f"{type(model).__name__} exposes no input embedding table, so its vocabulary "
                        f"cannot be checked against a tokenizer of {vocab_size_needed} tokens") from e
    if vocab_size_needed <= have:
        return have
    try:
        model.resize_token_embeddings(vocab_size_needed, pad_to_multiple_of=pad_to_multiple_of)
    except (NotImplementedError, AttributeError, ValueError, RuntimeError) as e:
        raise PtlmError(f"the tokenizer has {vocab_size_needed} tokens but {type(model).__name__} "
                        f"has {have} embedding rows and cannot be resized ({e}); use the tokenizer "
                        "the model was trained with") from e
    new = embedding_rows(model)
    log.info("resized the embeddings from %d to %d rows for a tokenizer of %d tokens",
             have, new, vocab_size_needed)
    return new


def embedding_rows(model: PreTrainedModel) -> int:
    """Rows of the input embedding table, also when ZeRO-3 has partitioned it (ds_shape)."""
    weight = model.get_input_embeddings().weight
    shape = getattr(weight, "ds_shape", None) or weight.shape
    return int(shape[0])
