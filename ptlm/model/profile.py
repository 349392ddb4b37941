"""The planner's facts for any causal LM transformers can build, measured instead of written out.

`measured_facts(config, name, seq_len)` needs no per-family code:
- parameters, the largest module's own parameters (DeepSpeed's bucket sizing), 1-D parameters,
  tied embeddings and embedding rows are counted on the model built on the meta device (no
  weights, no memory);
- activation memory comes from the model's own forward and backward traced under FakeTensorMode
  (shapes only, no compute) with MemTracker: for each decoder layer, what its forward leaves alive
  and how far its backward rises above where it started, with and without checkpointing, in fp32
  and bf16, at two sequence lengths, fitted to a per-token and a per-token-per-position term
  (`ptlm.plan.facts.LayerActivations`). Layers of different kinds (sliding-window and full
  attention, convolution or recurrent blocks) are traced one of each and weighted by their count.

The result is cached by a hash of the config, the sequence length and the library versions
(`$PTLM_CACHE/profiles/`, default ~/.cache/ptlm), so a plan stays fast after the first (a few
seconds). The pure planner receives it as plain numbers.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import asdict, replace
from pathlib import Path

import torch
import transformers
from transformers import masking_utils
from torch._subclasses.fake_tensor import FakeTensorMode
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from torch.distributed._tools.mem_tracker import MemTracker, _ModState

from ptlm.errors import PtlmError
from ptlm.model.config import max_positions, text_config
from ptlm.model.loss import causal_lm_loss, check_chunkable
from ptlm.model.packing import choose_mechanism, labels_for, model_inputs, stand_in_positions
from ptlm.plan.facts import (
    ActivationProfile,
    LayerActivations,
    ModelFacts,
    has_hand_activations,
    has_hand_reader,
)
from ptlm.plan.probe_cache import CACHE_ENV

log = logging.getLogger(__name__)

PROFILE_VERSION = 5  # bump when what a profile measures changes: old cache entries are ignored
# transformers' layer_types that get a (B, 1, T, T) mask of their own in a packed forward
FULL_ATTENTION = "full_attention"
MASKED_LAYER_TYPES = (FULL_ATTENTION, "sliding_attention", "chunked_attention")
# The profile is fitted at the planned length and a shorter one, so it is exact where it is used.
SHORT_SEQ_DIVISOR = 2
MIN_PROFILE_SEQ = 8
TRACE_DTYPES = {"fp32": torch.float32, "half": torch.bfloat16}
# Config fields naming the decoder layer count (transformers' attribute_map covers most aliases).
LAYER_COUNT_FIELDS = ("num_hidden_layers", "n_layer", "num_layers")
# Attention-dropout fields of HF configs (GPT-2, OPT/Llama/most, BERT-likes, GPT-J/Neo).
ATTENTION_DROPOUT_FIELDS = ("attn_pdrop", "attention_dropout", "attention_probs_dropout_prob",
                            "attn_dropout")
RESIDUAL_DROPOUT_FIELDS = ("resid_pdrop", "hidden_dropout", "dropout", "residual_dropout")
GRADIENT = "Gradient"  # MemTracker's category for parameter gradients (counted by the planner)
CHECK_VOCAB = 512  # the packing check model's vocabulary: the mechanism does not depend on it
SPECIAL_ID_FIELDS = ("pad_token_id", "bos_token_id", "eos_token_id")
_mechanisms: dict[tuple[str, str], str] = {}  # (config JSON, attention) -> mechanism, per process


# ----------------------------------------------------------------------------------------------
# Tracing seams
# ----------------------------------------------------------------------------------------------

@contextlib.contextmanager
def fake_trace(packed: bool = False):
    """FakeTensorMode, with transformers seeing the step it would see on real tensors.

    transformers 5.x takes FakeTensors for a graph being traced: its mask code cannot read their
    values, so it assumes the default position_ids might describe packed sequences and builds a
    (T x T) mask, which also turns off SDPA's grouped-query path (k and v repeated per head).
    A real training step (one sequence per row, no padding) gets neither: SDPA runs is_causal.
    The positions ptlm traces are always arange(T), so packed-sequence detection is answered "no".
    (Qwen3-shaped layer, fp32, T=384: 34,392 bytes/token traced without this, 30,808 with it and
    on real tensors.) packed=True: the traced step carries packed documents' position_ids, so
    transformers' own answer (a mask) is the right one and is left alone.
    """
    detect = masking_utils.find_packed_sequence_indices
    if not packed:
        masking_utils.find_packed_sequence_indices = _not_packed
    try:
        with FakeTensorMode():
            yield
    finally:
        masking_utils.find_packed_sequence_indices = detect


def _not_packed(position_ids):
    return None


def without_attention_dropout(config):
    """A copy of `config` with attention dropout 0, so CPU SDPA measures what CUDA SDPA allocates.

    On CPU, SDPA with dropout falls back to the math kernel, which materializes the (T x T)
    attention matrix and its dropout mask per layer; CUDA's flash and memory-efficient kernels
    apply dropout inside, storing only an RNG seed. (GPT-2 124M, attn_pdrop=0.1, bf16, 8 x 1024:
    20.2 GiB with the CPU fallback, 6.5 GiB without.)
    """
    config = copy.deepcopy(config)
    for target in {id(config): config, id(text_config(config)): text_config(config)}.values():
        for field in ATTENTION_DROPOUT_FIELDS:
            if getattr(target, field, 0.0):
                setattr(target, field, 0.0)
    return config


# ----------------------------------------------------------------------------------------------
# Facts
# ----------------------------------------------------------------------------------------------

def meta_model(config, attn: str = "sdpa"):
    """`AutoModelForCausalLM.from_config` on the meta device, or one clear error. The attention
    is what ptlm trains with (load_model's "auto" without flash-attn): SDPA, or eager for
    architectures that have no SDPA path (transformers refuses it at build)."""
    _check_decoder(config)
    try:
        with torch.device("meta"):
            return transformers.AutoModelForCausalLM.from_config(config, attn_implementation=attn)
    except ValueError as e:
        if "attention" in str(e).lower() and attn != "eager":
            return meta_model(config, "eager")
        raise PtlmError(_not_causal_lm(config, e)) from None
    except (KeyError, TypeError, AttributeError) as e:
        raise PtlmError(_not_causal_lm(config, e)) from None


def _check_decoder(config) -> None:
    """Encoders that transformers can also build as a causal LM head (BERT's BertLMHeadModel)
    are not decoder-only models unless the config says so (is_decoder=True)."""
    model_type = getattr(config, "model_type", None)
    encoder = (model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES
               and not getattr(config, "is_decoder", False))
    if encoder or getattr(config, "is_encoder_decoder", False):
        kind = "an encoder-decoder" if not encoder else "an encoder (masked LM)"
        raise PtlmError(f"model_type {model_type!r} is {kind}, not a decoder-only causal language "
                        "model: ptlm continues pretraining or fine-tunes causal LMs (e.g. Llama, "
                        "Qwen, Gemma, GPT-2, OPT)")


def _not_causal_lm(config, e: Exception) -> str:
    return (f"model_type {getattr(config, 'model_type', None)!r} ({type(config).__name__}) cannot "
            f"be built by transformers' AutoModelForCausalLM ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}): ptlm trains decoder-only causal language models "
            "(e.g. Llama, Qwen, Gemma, GPT-2, OPT); an encoder or encoder-decoder config cannot be "
            "trained this way")


def facts_for(config, name: str, seq_len: int) -> ModelFacts:
    """The planner's facts for `config`: hand formulas where they are exact (OPT and GPT-2
    entirely, no tracing; the parameters of Llama, Mistral and Qwen2), measured elsewhere; the
    packing mechanism always by running a small model of the architecture."""
    if has_hand_activations(config):
        facts = ModelFacts.from_config(config, name=name)
        return replace(facts, packing_mechanism=_mechanism_or_none(config, "sdpa"))
    if has_hand_reader(config):
        mechanism = _mechanism_or_none(config, "sdpa")
        return replace(ModelFacts.from_config(config, name=name), packing_mechanism=mechanism,
                       activations=_cached_profile(config, seq_len, "sdpa"),
                       documents_activations=_cached_profile(config, seq_len, "sdpa", mechanism)
                       if mechanism else None)
    return measured_facts(config, name, seq_len)


def _mechanism_or_none(config, attention: str) -> str | None:
    try:
        return packing_mechanism(config, attention)
    except PtlmError:  # cannot take packed documents: a documents run refuses it at setup
        return None


def measured_facts(config, name: str, seq_len: int) -> ModelFacts:
    """ModelFacts for any causal LM config, measured (see the module doc); cached."""
    key = _cache_key(config, seq_len)
    cached = _read_cache(key)
    if cached is not None:
        return ModelFacts.from_dict({**cached, "name": name})
    model = meta_model(config)
    structure = _structure(config, model)
    if not structure["rotary"] and structure["positions"]:
        seq_len = min(seq_len, structure["positions"])  # the planner refuses longer, clearly
    attention = model.config._attn_implementation  # what training builds: SDPA, else eager
    mechanism = _mechanism_or_none(config, attention)
    facts = ModelFacts(name=name, activations=activation_profile(config, seq_len, attention, model),
                       packing_mechanism=mechanism, **structure)
    if mechanism is not None:
        facts = replace(facts, documents_activations=activation_profile(
            config, seq_len, attention, model, mechanism))
    _write_cache(key, facts.to_dict())
    return facts


def packing_mechanism(config, attention: str) -> str:
    """How models of `config` with this attention are told where packed documents start
    (ptlm.model.packing.MECHANISMS), decided by `choose_mechanism` on a small real model of the
    architecture built on the side: one decoder layer of each kind (as the profile traces them)
    and a small vocabulary, random weights (which inputs a model honours is in its code, not its
    weights). The run's own model may be partitioned (ZeRO-3) or too large to run twice."""
    key = (config.to_json_string(use_diff=False), attention)
    if key not in _mechanisms:
        _mechanisms[key] = choose_mechanism(_small_model(config, attention))
    return _mechanisms[key]


def _small_model(config, attention: str):
    small = copy.deepcopy(representative_layers(without_attention_dropout(config))[0])
    tc = text_config(small)
    tc.vocab_size = CHECK_VOCAB
    for name in SPECIAL_ID_FIELDS:  # ids past the small vocabulary would not embed
        value = getattr(tc, name, None)
        if isinstance(value, int) and value >= CHECK_VOCAB:
            setattr(tc, name, None)
    flash = attention.startswith("flash")  # flash-attention runs in 16 bits, on CUDA only
    with torch.random.fork_rng(devices=[]):  # the caller's seeded init stays untouched
        torch.manual_seed(0)
        try:
            model = transformers.AutoModelForCausalLM.from_config(
                small, attn_implementation=attention,
                dtype=torch.bfloat16 if flash else torch.float32)
        except ValueError as e:  # no such path (Gemma 2 has no SDPA): what training falls back to
            if "attention" not in str(e).lower() or attention == "eager":
                raise
            return _small_model(config, "eager")
    return model.to("cuda" if flash else "cpu")


def _cached_profile(config, seq_len: int, attention: str,
                    mechanism: str | None = None) -> ActivationProfile:
    """activation_profile, cached; on packed documents through `mechanism` when given."""
    key = f"activations-{mechanism or 'stream'}-" + _cache_key(config, seq_len)
    cached = _read_cache(key)
    if cached is not None:
        return ActivationProfile.from_dict(cached)
    result = activation_profile(config, seq_len, attention, mechanism=mechanism)
    _write_cache(key, asdict(result))
    return result


def _structure(config, model) -> dict:
    """Everything ModelFacts needs except the activations, counted on the meta model."""
    tc = text_config(config)
    embed = model.get_input_embeddings()
    head = model.get_output_embeddings()
    vocab, width = embed.weight.shape
    hidden = getattr(tc, "hidden_size", None) or width
    heads = getattr(tc, "num_attention_heads", None) or 0
    try:
        check_chunkable(model)
        chunkable = True
    except PtlmError:
        chunkable = False
    return dict(
        model_type=getattr(config, "model_type", "unknown"),
        parameters=sum(p.numel() for p in model.parameters()),  # tied tensors once
        layers=_layer_count(tc), hidden=hidden, heads=heads,
        kv_heads=getattr(tc, "num_key_value_heads", None) or heads,
        ffn=getattr(tc, "intermediate_size", None) or getattr(tc, "ffn_dim", None) or 4 * hidden,
        vocab=vocab, positions=max_positions(config) or 0,
        largest_layer_params=max(sum(p.numel() for p in m.parameters(recurse=False))
                                 for m in model.modules()),
        vector_params=sum(p.numel() for p in model.parameters() if p.dim() == 1),
        hidden_act=str(getattr(tc, "hidden_act", None) or getattr(tc, "activation_function", "")),
        gated_mlp=False,  # only the hand formulas read these two; the profile replaces them
        residual_dropout=max([float(getattr(tc, f, 0.0) or 0.0) for f in RESIDUAL_DROPOUT_FIELDS
                              if isinstance(getattr(tc, f, None), (int, float))] or [0.0]),
        rotary=not has_position_table(model, embed),
        rms_norm=any("RMSNorm" in type(m).__name__ for m in model.modules()),
        head_dim=getattr(tc, "head_dim", None) or hidden // max(heads, 1),
        tied_embeddings=head is not None and head.weight is embed.weight,
        chunkable_loss=chunkable,
        softcapped_logits=bool(getattr(tc, "final_logit_softcapping", None)),
        **_mask_kinds(tc))


def _mask_kinds(tc) -> dict:
    """ModelFacts' attention_masks and windowed_masks from the config's layer_types."""
    kinds = set(getattr(tc, "layer_types", None) or ()) & set(MASKED_LAYER_TYPES)
    return dict(attention_masks=max(1, len(kinds)),
                windowed_masks=len(kinds - {FULL_ATTENTION}))


def _layer_count(tc) -> int:
    for field in LAYER_COUNT_FIELDS:
        value = getattr(tc, field, None)
        if isinstance(value, int) and value > 0:
            return value
    raise PtlmError(f"{type(tc).__name__} names no layer count ({', '.join(LAYER_COUNT_FIELDS)})")


def has_position_table(model, embed) -> bool:
    """A learned position table: an embedding other than the tokens' (OPT, GPT-2). Rotary, ALiBi
    and NoPE models have none, so their max_position_embeddings is a soft limit."""
    return any(isinstance(m, torch.nn.Embedding) and m is not embed
               and m.weight is not embed.weight for m in model.modules())


# ----------------------------------------------------------------------------------------------
# Activations
# ----------------------------------------------------------------------------------------------

def activation_profile(config, seq_len: int, attention: str = "sdpa", model=None,
                       mechanism: str | None = None) -> ActivationProfile:
    """Per-layer activation bytes per token, traced at seq_len and a shorter length; with
    `mechanism` (ptlm.model.packing.MECHANISMS), on packed documents given to the model that
    way (stand-in documents: the mask's cost does not depend on where they start)."""
    long = max(seq_len, MIN_PROFILE_SEQ)
    short = max(long // SHORT_SEQ_DIVISOR, MIN_PROFILE_SEQ // SHORT_SEQ_DIVISOR)
    traced, weights = representative_layers(config, model)
    profile = {}
    for width, dtype in TRACE_DTYPES.items():
        at = {(seq, ckpt): _trace(traced, weights, dtype, seq, ckpt, attention, mechanism)
              for seq in (short, long) for ckpt in (False, True)}
        saved, saved_pos = _fit(at[short, False][0], at[long, False][0], short, long)
        back, back_pos = _fit(at[short, False][1], at[long, False][1], short, long)
        back_ck, back_ck_pos = _fit(at[short, True][1], at[long, True][1], short, long)
        profile[width] = LayerActivations(
            saved=saved, saved_per_position=saved_pos, checkpointed=at[long, True][0],
            backward=back, backward_per_position=back_pos, backward_checkpointed=back_ck,
            backward_checkpointed_per_position=back_ck_pos)
    return ActivationProfile(fp32=profile["fp32"], half=profile["half"],
                             measured_seq_lens=(short, long))


def _fit(at_short: float, at_long: float, short: int, long: int) -> tuple[float, float]:
    """(a, b) with a + b * seq through both points (per-token bytes); b = 0 for one length."""
    if long == short:
        return at_long, 0.0
    per_position = max(0.0, (at_long - at_short) / (long - short))
    return at_long - per_position * long, per_position


def representative_layers(config, model=None):
    """(a config with one decoder layer of each kind, each traced layer's weight; `model`: the
    config's meta model if the caller has built it already): the weights
    are the share of the model's layers of that kind, so sum(weight * value) is the mean layer.

    A layer's kind is the tuple of the config's per-layer lists at its index (layer_types,
    no_rope_layers, ...) and its module structure. If the shortened model does not rebuild the
    same kinds in the same order (a hybrid whose pattern comes from its index), every layer is
    traced."""
    tc = text_config(config)
    layers = _layer_count(tc)
    per_layer = {f: v for f, v in tc.to_dict().items()
                 if isinstance(v, list) and len(v) == layers and f != "architectures"}
    signatures = _layer_signatures(model if model is not None else meta_model(config), layers)
    kinds = [(tuple(json.dumps(v[i]) for v in per_layer.values()), signatures[i])
             for i in range(layers)]
    first = list(dict.fromkeys(kinds))  # kinds in order of first appearance
    counts = Counter(kinds)
    chosen = [kinds.index(k) for k in first]
    short = copy.deepcopy(config)
    stc = text_config(short)
    stc.num_hidden_layers = len(chosen)
    for field, values in per_layer.items():
        setattr(stc, field, [values[i] for i in chosen])
    if _layer_signatures(meta_model(short), len(chosen)) != [signatures[i] for i in chosen]:
        log.info("%s: layer kinds depend on their index; tracing all %d layers",
                 getattr(config, "model_type", "model"), layers)
        return config, [1.0 / layers] * layers
    return short, [counts[k] / layers for k in first]


def _layer_signatures(model, layers: int) -> list[tuple]:
    stack = decoder_layers(model, layers)
    return [(type(m).__name__, tuple((n, tuple(p.shape)) for n, p in m.named_parameters()))
            for m in stack]


def decoder_layers(model, layers: int) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the ModuleList of `layers` blocks holding the most
    parameters (a model may have other lists, e.g. per-layer rotary tables)."""
    stacks = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == layers]
    if not stacks:
        raise PtlmError(f"{type(model).__name__}: no list of {layers} decoder layers found to "
                        "measure; plan it with a forced setting or report the architecture")
    return max(stacks, key=lambda m: sum(p.numel() for p in m.parameters()))


def _trace(config, weights: list[float], dtype: torch.dtype, seq: int, checkpointing: bool,
           attention: str, mechanism: str | None = None) -> tuple[float, float]:
    """(saved, backward) bytes per token of the mean decoder layer, one sequence of `seq`
    (of packed stand-in documents when a mechanism is given)."""
    config = without_attention_dropout(config)
    layers = len(weights)
    with fake_trace(packed=mechanism is not None):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=dtype, attn_implementation=attention)
        if checkpointing:
            model.gradient_checkpointing_enable({"use_reentrant": False})
        model.train()
        tracker = _ActivationTracker()
        tracker.track_external(model)
        with tracker:
            ids = torch.randint(0, model.get_input_embeddings().weight.shape[0], (1, seq))
            labels, packed = ids, None
            if mechanism is not None:
                positions = stand_in_positions(1, seq)
                labels, packed = labels_for(ids, positions), model_inputs(model, positions,
                                                                          mechanism)
            loss = causal_lm_loss(model, ids, labels, chunked=False, packed=packed)
            loss.backward()
        stack = decoder_layers(model, layers)
        saved = backward = 0.0
        for weight, layer in zip(weights, stack):
            stats = tracker.memory_tracking[layer]
            saved += weight * (_live(stats, _ModState.POST_FW) - _live(stats, _ModState.PRE_FW))
            start = _live(stats, _ModState.PRE_BW)
            backward += weight * (tracker.backward_peaks.get(stats.mod_fqn, start) - start)
    return saved / seq, backward / seq


def _live(stats, state) -> int:
    """Live bytes at a module's snapshot, parameter gradients excluded (the planner counts those).
    The first snapshot: later ones are checkpointing's recomputation."""
    return _without_gradients(next(iter(stats.snapshots[state][0].values())))


def _without_gradients(device_snapshot: dict) -> int:
    return device_snapshot["Total"] - sum(v for k, v in device_snapshot.items()
                                          if getattr(k, "value", k) == GRADIENT)


class _ActivationTracker(MemTracker):
    """MemTracker that also keeps, per module, the highest live bytes *without* parameter
    gradients during its backward. MemTracker's own module peak ranks moments by the total, so in
    a short sequence the moment it keeps is the end of the backward, when the layer's weight
    gradients outweigh its activation gradients (already freed): the wrong moment for the
    planner, which counts weight gradients on their own."""

    def __init__(self) -> None:
        super().__init__()
        self.backward_peaks: dict[str, int] = {}

    def _update_peak_stats(self, peak_state) -> None:  # MemTracker's hook at every allocation
        super()._update_peak_stats(peak_state)
        if peak_state != _ModState.PEAK_BW:
            return
        live = sum(_without_gradients(snap) for snap in self._curr_mem_snap.values())
        for fqn in self._mod_tracker.parents:
            if live > self.backward_peaks.get(fqn, 0):
                self.backward_peaks[fqn] = live


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------

def _cache_key(config, seq_len: int) -> str:
    text = json.dumps({"config": config.to_dict(), "seq_len": seq_len, "v": PROFILE_VERSION,
                       "torch": torch.__version__, "transformers": transformers.__version__},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def _cache_file(key: str) -> Path:
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "ptlm"))
    return root / "profiles" / f"{key}.json"


def _read_cache(key: str) -> dict | None:
    path = _cache_file(key)
    try:
        return json.loads(path.read_text()) if path.exists() else None
    except (OSError, json.JSONDecodeError):
        log.warning("ignoring the unreadable model profile %s", path)
        return None


def _write_cache(key: str, facts: dict) -> None:
    path = _cache_file(key)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(facts, indent=1))
        tmp.replace(path)
    except OSError as e:  # a read-only home is no reason to fail a plan
        log.warning("could not cache the model profile in %s: %s", path, e)
