"""What the planner knows about a model and about the machine, as plain numbers.

`ModelFacts` comes one of two ways, both giving the same numbers (tests check each hand reader
against the measured path):
- a hand reader (`ModelFacts.from_config`) for the families whose formulas are written out here
  (OPT, GPT-2, Llama, Mistral, Qwen2): parameter counts follow each architecture's module
  definitions in transformers, from the config alone, no torch;
- measured, for any causal LM transformers can build (`ptlm.model.profile.measured_facts`): the
  parameter counts from the model built on the meta device, and an `ActivationProfile` traced from
  the model's own forward and backward under FakeTensorMode. This layer imports no torch: the
  profile arrives here as plain numbers.

`HardwareFacts` describes the GPUs, how many, and the host. `KNOWN_GPUS` holds vendor figures for
common cards; `ptlm.run.machine.hardware.detect()` is the only code that asks torch/psutil about this
machine.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, replace

from ptlm.errors import PtlmError
from ptlm.units import GB, GiB

# ----------------------------------------------------------------------------------------------
# Model facts
# ----------------------------------------------------------------------------------------------

# OPT's learned position embedding has 2 extra rows (transformers' OPTLearnedPositionalEmbedding:
# "if padding_idx is specified then offset the embedding ids by 2").
OPT_POSITION_OFFSET = 2
# LayerNorm with elementwise affine = weight + bias; RMSNorm = weight only.
LAYERNORM_PARAMS_PER_CHANNEL = 2
RMSNORM_PARAMS_PER_CHANNEL = 1
# GPT-2's MLP width when n_inner is None (modeling_gpt2: inner_dim = n_inner or 4 * hidden).
GPT2_DEFAULT_FFN_MULTIPLE = 4


@dataclass(frozen=True)
class LayerActivations:
    """Bytes one decoder layer holds, per token of a micro-batch, averaged over the model's layers
    (sliding-window, full-attention, convolution or recurrent layers weighted by their count).
    Each figure is `a + b * seq_len` per token: `b` is the attention's per-position term (eager
    attention keeps its seq x seq scores; SDPA's kernels keep none)."""

    saved: float  # kept from the layer's forward to its backward, without checkpointing
    saved_per_position: float
    checkpointed: float  # kept with activation checkpointing (the layer's input/output)
    backward: float  # the layer's backward above what it started with: grads of activations
    backward_per_position: float
    backward_checkpointed: float  # the same with checkpointing: recomputation included
    backward_checkpointed_per_position: float

    def saved_bytes(self, seq_len: int, checkpointing: bool) -> float:
        if checkpointing:
            return self.checkpointed
        return self.saved + self.saved_per_position * seq_len

    def backward_bytes(self, seq_len: int, checkpointing: bool) -> float:
        if checkpointing:
            return self.backward_checkpointed + self.backward_checkpointed_per_position * seq_len
        return self.backward + self.backward_per_position * seq_len


# Which measured profile a precision reads: fp16 and bf16 tensors have the same sizes.
PROFILE_PRECISIONS = {"fp32": "fp32", "bf16": "half", "fp16": "half"}


@dataclass(frozen=True)
class ActivationProfile:
    """Measured per-layer activation memory, one `LayerActivations` per tensor width."""

    fp32: LayerActivations
    half: LayerActivations
    measured_seq_lens: tuple[int, ...]  # the fit is exact at these lengths

    def for_precision(self, precision: str) -> LayerActivations:
        return getattr(self, PROFILE_PRECISIONS[precision])

    @classmethod
    def from_dict(cls, d: dict) -> "ActivationProfile":
        return cls(fp32=LayerActivations(**d["fp32"]), half=LayerActivations(**d["half"]),
                   measured_seq_lens=tuple(d["measured_seq_lens"]))


@dataclass(frozen=True)
class ModelFacts:
    name: str
    model_type: str
    parameters: int  # as sum(p.numel()) over model.parameters(): shared (tied) tensors once
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    ffn: int  # MLP inner width
    vocab: int  # embedding rows (OPT: 50272 > tokenizer's 50265)
    positions: int  # max_position_embeddings / n_positions
    largest_layer_params: int  # largest single module's own params (DeepSpeed's definition)
    vector_params: int  # 1-D params (biases, norm weights): small tensors
    hidden_act: str
    gated_mlp: bool  # SwiGLU-style gate/up/down MLP
    residual_dropout: float  # dropout on the residual branches in training
    rotary: bool  # rotary position embedding (no learned table; positions is a soft limit)
    rms_norm: bool
    tied_embeddings: bool
    # Measured activation memory (any architecture); None = the hand formulas of ptlm.plan.memory.
    activations: ActivationProfile | None = None
    # The same measured with packed documents (their mask and what it changes in every layer);
    # None = the formula of ptlm.plan.memory._mask_bytes.
    documents_activations: ActivationProfile | None = None
    # The chunked loss reproduces the model's logits (no soft-capping or scaling after the head).
    chunkable_loss: bool = True
    softcapped_logits: bool = False  # final_logit_softcapping (Gemma 2): tanh after the head
    # Width of one attention head (Qwen3, Gemma: not hidden / heads); 0 = hidden // heads.
    head_dim: int = 0
    # How the model is told where packed documents start (ptlm.model.packing.MECHANISMS:
    # "position_ids" or "mask"), decided by running it; None: unknown, or it cannot be told
    # (then a run with --packing documents refuses it).
    packing_mechanism: str | None = None
    # (B, 1, T, T) masks a forward builds, one per kind of attention layer (full, sliding-window,
    # chunked), each shared by the layers of its kind: with packed documents every kind; as one
    # stream only the windowed kinds (full attention runs SDPA's causal kernels without one).
    attention_masks: int = 1
    windowed_masks: int = 0

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim or self.hidden // max(self.heads, 1)

    @property
    def learned_positions(self) -> bool:
        return not self.rotary

    def describe(self) -> str:
        count = (f"{self.parameters / 1e9:.2f} B" if self.parameters >= 1e9
                 else f"{self.parameters / 1e6:.1f} M")
        return (f"{self.name} ({count} parameters, {self.layers} layers, hidden {self.hidden}, "
                f"vocab {self.vocab})")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelFacts":
        d = dict(d)
        for key in ("activations", "documents_activations"):
            if d.get(key) is not None:
                d[key] = ActivationProfile.from_dict(d[key])
        return cls(**d)

    @classmethod
    def from_config(cls, cfg, name: str | None = None) -> "ModelFacts":
        """Facts from a transformers `PretrainedConfig` by a hand reader (see `has_hand_reader`);
        every other architecture is measured by ptlm.model.profile.measured_facts."""
        model_type = getattr(cfg, "model_type", None)
        reader = _READERS.get(model_type)
        if reader is None:
            raise PtlmError(
                f"no hand reader for model_type {model_type!r} (they exist for "
                f"{', '.join(sorted(_READERS))}); measure it with ptlm.model.profile.measured_facts")
        facts = reader(cfg)
        default = getattr(cfg, "_name_or_path", "") or model_type
        return replace(facts, name=name or default)


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _opt_facts(cfg) -> ModelFacts:
    h, f, v, e = cfg.hidden_size, cfg.ffn_dim, cfg.vocab_size, cfg.word_embed_proj_dim
    bias = getattr(cfg, "enable_bias", True)
    ln = LAYERNORM_PARAMS_PER_CHANNEL * h if getattr(cfg, "layer_norm_elementwise_affine", True) else 0
    attn = 4 * _linear(h, h, bias)
    mlp = _linear(h, f, bias) + _linear(f, h, bias)
    layer = attn + mlp + 2 * ln
    embed = v * e
    positions = (cfg.max_position_embeddings + OPT_POSITION_OFFSET) * h
    projections = 2 * h * e if e != h else 0  # project_in / project_out, no bias
    final_ln = (LAYERNORM_PARAMS_PER_CHANNEL * h
                if cfg.do_layer_norm_before and not getattr(cfg, "_remove_final_layer_norm", False)
                else 0)
    tied = getattr(cfg, "tie_word_embeddings", True)
    lm_head = 0 if tied else v * e
    layer_vectors = (4 * h + f + h if bias else 0) + 2 * ln
    return ModelFacts(
        name="", model_type="opt",
        parameters=embed + positions + projections + cfg.num_hidden_layers * layer + final_ln + lm_head,
        layers=cfg.num_hidden_layers, hidden=h, heads=cfg.num_attention_heads,
        kv_heads=cfg.num_attention_heads, ffn=f, vocab=v, positions=cfg.max_position_embeddings,
        largest_layer_params=max(embed, positions, _linear(h, f, bias), _linear(f, h, bias)),
        vector_params=cfg.num_hidden_layers * layer_vectors + final_ln,
        hidden_act=cfg.activation_function, gated_mlp=False, residual_dropout=cfg.dropout,
        rotary=False, rms_norm=False, tied_embeddings=tied)


def _gpt2_facts(cfg) -> ModelFacts:
    h, v = cfg.n_embd, cfg.vocab_size
    f = cfg.n_inner or GPT2_DEFAULT_FFN_MULTIPLE * h
    ln = LAYERNORM_PARAMS_PER_CHANNEL * h
    # Conv1D c_attn (h -> 3h), c_proj (h -> h), c_fc (h -> f), c_proj (f -> h), all with bias.
    layer = _linear(h, 3 * h, True) + _linear(h, h, True) + _linear(h, f, True) + _linear(f, h, True)
    layer += 2 * ln
    embed, positions = v * h, cfg.n_positions * h
    tied = getattr(cfg, "tie_word_embeddings", True)
    return ModelFacts(
        name="", model_type="gpt2",
        parameters=embed + positions + cfg.n_layer * layer + ln + (0 if tied else v * h),
        layers=cfg.n_layer, hidden=h, heads=cfg.n_head, kv_heads=cfg.n_head, ffn=f, vocab=v,
        positions=cfg.n_positions,
        largest_layer_params=max(embed, positions, _linear(h, 3 * h, True), _linear(h, f, True)),
        vector_params=cfg.n_layer * (3 * h + h + f + h + 2 * ln) + ln,
        hidden_act=cfg.activation_function, gated_mlp=False, residual_dropout=cfg.resid_pdrop,
        rotary=False, rms_norm=False, tied_embeddings=tied)


# Llama-family configs whose q/k/v projections carry a bias regardless of `attention_bias`.
QKV_BIAS_MODEL_TYPES = ("qwen2",)


def _llama_facts(cfg) -> ModelFacts:
    h, f, v = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size
    heads = cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or h // heads
    qkv_bias = cfg.model_type in QKV_BIAS_MODEL_TYPES or bool(getattr(cfg, "attention_bias", False))
    out_bias = bool(getattr(cfg, "attention_bias", False))
    mlp_bias = bool(getattr(cfg, "mlp_bias", False))
    q, kvw = heads * head_dim, kv * head_dim
    attn = _linear(h, q, qkv_bias) + 2 * _linear(h, kvw, qkv_bias) + _linear(q, h, out_bias)
    mlp = 2 * _linear(h, f, mlp_bias) + _linear(f, h, mlp_bias)
    norms = 2 * RMSNORM_PARAMS_PER_CHANNEL * h
    embed = v * h
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    vectors = norms + (q + 2 * kvw if qkv_bias else 0) + (h if out_bias else 0)
    vectors += (2 * f + h) if mlp_bias else 0
    return ModelFacts(
        name="", model_type=cfg.model_type,
        parameters=embed + cfg.num_hidden_layers * (attn + mlp + norms) + h + (0 if tied else embed),
        layers=cfg.num_hidden_layers, hidden=h, heads=heads, kv_heads=kv, ffn=f, vocab=v,
        positions=cfg.max_position_embeddings,
        largest_layer_params=max(embed, _linear(h, f, mlp_bias), _linear(h, q, qkv_bias)),
        vector_params=cfg.num_hidden_layers * vectors + h,
        hidden_act=cfg.hidden_act, gated_mlp=True,
        residual_dropout=0.0, rotary=True, rms_norm=True, tied_embeddings=tied,
        head_dim=head_dim)


_READERS = {"opt": _opt_facts, "gpt2": _gpt2_facts, "llama": _llama_facts,
            "mistral": _llama_facts, "qwen2": _llama_facts}


# Families whose hand activation formulas match the measured profile within 1% (tests/
# test_profile.py). For the Llama-like readers the parameter formulas are exact but the
# activation formula undercounts bf16 activations by 7-8% (Llama/Qwen2/Mistral-shaped layers,
# seq 512): their activations are measured like any other architecture's.
HAND_ACTIVATION_MODEL_TYPES = ("opt", "gpt2")


def has_hand_reader(cfg) -> bool:
    """Whether `from_config` has exact parameter formulas for this config's architecture."""
    return getattr(cfg, "model_type", None) in _READERS


def has_hand_activations(cfg) -> bool:
    """Whether the hand activation formulas of ptlm.plan.memory are exact for this architecture."""
    return getattr(cfg, "model_type", None) in HAND_ACTIVATION_MODEL_TYPES

# Published configs (the model cards' config.json, the fields that matter here), so that
# `ptlm plan --model opt-125m` and the tests work offline. Everything else is transformers' default.
KNOWN_CONFIGS: dict[str, dict] = {
    "opt-125m": dict(model_type="opt", hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                     ffn_dim=3072, vocab_size=50272, max_position_embeddings=2048,
                     word_embed_proj_dim=768, do_layer_norm_before=True, dropout=0.1),
    "opt-350m": dict(model_type="opt", hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                     ffn_dim=4096, vocab_size=50272, max_position_embeddings=2048,
                     word_embed_proj_dim=512, do_layer_norm_before=False, dropout=0.1),
    "opt-1.3b": dict(model_type="opt", hidden_size=2048, num_hidden_layers=24, num_attention_heads=32,
                     ffn_dim=8192, vocab_size=50272, max_position_embeddings=2048,
                     word_embed_proj_dim=2048, do_layer_norm_before=True, dropout=0.1),
    "opt-6.7b": dict(model_type="opt", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                     ffn_dim=16384, vocab_size=50272, max_position_embeddings=2048,
                     word_embed_proj_dim=4096, do_layer_norm_before=True, dropout=0.1),
    "opt-13b": dict(model_type="opt", hidden_size=5120, num_hidden_layers=40, num_attention_heads=40,
                    ffn_dim=20480, vocab_size=50272, max_position_embeddings=2048,
                    word_embed_proj_dim=5120, do_layer_norm_before=True, dropout=0.1),
    "gpt2": dict(model_type="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257,
                 n_positions=1024, activation_function="gelu_new"),
    "gpt2-medium": dict(model_type="gpt2", n_embd=1024, n_layer=24, n_head=16, vocab_size=50257,
                        n_positions=1024, activation_function="gelu_new"),
}
# Display names matching the model cards.
KNOWN_NAMES = {"opt-125m": "OPT-125M", "opt-350m": "OPT-350M", "opt-1.3b": "OPT-1.3B",
               "opt-6.7b": "OPT-6.7B", "opt-13b": "OPT-13B", "gpt2": "GPT-2 (124M)",
               "gpt2-medium": "GPT-2 medium"}


# ----------------------------------------------------------------------------------------------
# Hardware facts
# ----------------------------------------------------------------------------------------------

# Effective transfer rates (bytes/s), used only by the throughput model. PCIe figures are what
# pinned host<->GPU copies reach in practice (about 75% of the link's nominal 16/32/64 GB/s);
# GPU<->GPU figures are NCCL all-reduce "bus bandwidth" ballparks (nccl-tests) for each link type.
PCIE3_BYTES_PER_S = 12 * GB
PCIE4_BYTES_PER_S = 24 * GB
PCIE5_BYTES_PER_S = 48 * GB
PCIE3_P2P_BYTES_PER_S = 10 * GB  # cards without NVLink all-reduce over PCIe
PCIE4_P2P_BYTES_PER_S = 20 * GB
NVLINK2_BYTES_PER_S = 130 * GB  # V100 SXM2
NVLINK3_BYTES_PER_S = 230 * GB  # A100 SXM4
NVLINK4_BYTES_PER_S = 360 * GB  # H100/H200 SXM


@dataclass(frozen=True)
class GpuSpec:
    """Vendor datasheet figures; memory is what torch's total_memory reports (approximate)."""

    name: str
    memory_bytes: int
    bf16: bool
    peak_tflops: float  # dense fp16/bf16 tensor-core peak (not the 2:4-sparse figure)
    fp32_tflops: float  # plain fp32 (no TF32), what fp32 training gets by default in torch
    memory_bandwidth: float  # bytes/s
    interconnect_bandwidth: float  # GPU<->GPU bytes/s inside a node
    pcie_bandwidth: float  # host<->GPU bytes/s


KNOWN_GPUS: dict[str, GpuSpec] = {s.name: s for s in [
    GpuSpec("T4", int(14.75 * GiB), False, 65, 8.1, 320 * GB, PCIE3_P2P_BYTES_PER_S, PCIE3_BYTES_PER_S),
    GpuSpec("V100-16GB", int(15.78 * GiB), False, 125, 15.7, 900 * GB, NVLINK2_BYTES_PER_S,
            PCIE3_BYTES_PER_S),
    GpuSpec("V100-32GB", int(31.75 * GiB), False, 125, 15.7, 900 * GB, NVLINK2_BYTES_PER_S,
            PCIE3_BYTES_PER_S),
    # AWS's A10G trades tensor throughput for CUDA-core throughput: ~70 dense TFLOP/s vs the A10's 125.
    GpuSpec("A10G", int(21.99 * GiB), True, 70, 31.2, 600 * GB, PCIE4_P2P_BYTES_PER_S, PCIE4_BYTES_PER_S),
    GpuSpec("L4", int(21.96 * GiB), True, 121, 30.3, 300 * GB, PCIE4_P2P_BYTES_PER_S, PCIE4_BYTES_PER_S),
    GpuSpec("L40S", int(44.4 * GiB), True, 362, 91.6, 864 * GB, PCIE4_P2P_BYTES_PER_S, PCIE4_BYTES_PER_S),
    GpuSpec("A100-40GB", int(39.39 * GiB), True, 312, 19.5, 1555 * GB, NVLINK3_BYTES_PER_S,
            PCIE4_BYTES_PER_S),
    GpuSpec("A100-80GB", int(79.15 * GiB), True, 312, 19.5, 2039 * GB, NVLINK3_BYTES_PER_S,
            PCIE4_BYTES_PER_S),
    GpuSpec("H100-80GB", int(79.11 * GiB), True, 989, 67, 3350 * GB, NVLINK4_BYTES_PER_S,
            PCIE5_BYTES_PER_S),
    GpuSpec("H200", int(139.7 * GiB), True, 989, 67, 4800 * GB, NVLINK4_BYTES_PER_S, PCIE5_BYTES_PER_S),
]}

# A GPU we know nothing about except its memory: figures of a mid-range PCIe card, so throughput
# numbers are relative (the plan says so); the memory check does not depend on them.
UNKNOWN_GPU = GpuSpec("unknown GPU", 0, True, 100, 20, 600 * GB, PCIE4_P2P_BYTES_PER_S,
                      PCIE4_BYTES_PER_S)


DEVICE_TYPES = ("cuda", "cpu")


@dataclass(frozen=True)
class HardwareFacts:
    gpu_name: str
    gpu_memory_bytes: int  # per GPU
    gpus_per_node: int
    nodes: int = 1
    host_memory_bytes: int | None = None  # per node; None = unknown (host checks are skipped)
    bf16: bool = True
    peak_tflops: float = UNKNOWN_GPU.peak_tflops
    fp32_tflops: float = UNKNOWN_GPU.fp32_tflops
    memory_bandwidth: float = UNKNOWN_GPU.memory_bandwidth
    interconnect_bandwidth: float = UNKNOWN_GPU.interconnect_bandwidth
    pcie_bandwidth: float = UNKNOWN_GPU.pcie_bandwidth
    known_gpu: bool = False  # throughput figures come from a datasheet (else relative only)
    # What torch runs the step on: "cuda" (the default, what plans are for) or "cpu" (DeepSpeed's
    # CPU accelerator, the tests' and benchmarks' 2-rank runs). Some tensors differ in size
    # between the two (dropout masks: ptlm.plan.memory.DROPOUT_MASK_BYTES).
    device_type: str = "cuda"

    def __post_init__(self) -> None:
        if self.gpus_per_node < 0:
            raise PtlmError(f"GPU count must be >= 0, got {self.gpus_per_node}")
        if self.nodes < 1:
            raise PtlmError(f"node count must be >= 1, got {self.nodes} (use --nodes 1)")
        if self.device_type not in DEVICE_TYPES:
            raise PtlmError(f"device type {self.device_type!r} is not one of {DEVICE_TYPES}")
        if self.gpus_per_node and self.gpu_memory_bytes <= 0:
            raise PtlmError("GPU memory must be > 0: pass --gpu-memory (e.g. 16GiB) or --gpu NAME")

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    def describe(self) -> str:
        where = f"{self.gpus_per_node}× {self.gpu_name}"
        if self.nodes > 1:
            where = f"{self.nodes} nodes × {where}"
        return f"{where} ({self.gpu_memory_bytes / GiB:.1f} GiB{'' if self.bf16 else ', no bf16'})"

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "HardwareFacts":
        return cls(**d)

    @classmethod
    def from_spec(cls, spec: GpuSpec, gpus_per_node: int = 1, nodes: int = 1,
                  host_memory_bytes: int | None = None) -> "HardwareFacts":
        return cls(gpu_name=spec.name, gpu_memory_bytes=spec.memory_bytes,
                   gpus_per_node=gpus_per_node, nodes=nodes, host_memory_bytes=host_memory_bytes,
                   bf16=spec.bf16, peak_tflops=spec.peak_tflops, fp32_tflops=spec.fp32_tflops,
                   memory_bandwidth=spec.memory_bandwidth,
                   interconnect_bandwidth=spec.interconnect_bandwidth,
                   pcie_bandwidth=spec.pcie_bandwidth, known_gpu=KNOWN_GPUS.get(spec.name) == spec)


_FAMILY_RE = re.compile(r"^([A-Z]+\d+[A-Z]?)(?:-(\d+)GB)?$")


def _tokens(name: str) -> list[str]:
    return [t for t in re.split(r"[^A-Z0-9]+", name.upper()) if t]


def lookup_gpu(name: str, memory_bytes: int | None = None) -> GpuSpec | None:
    """The known spec for a device name ("Tesla T4", "NVIDIA A100-SXM4-80GB", "a100-40gb", "H100").

    A family with several memory sizes (A100, V100) is told apart by a size in the name
    ("80GB", "80") or, failing that, by `memory_bytes`. Returns None for an unknown card.
    """
    tokens = _tokens(name)
    matches = [s for s in KNOWN_GPUS.values() if _FAMILY_RE.match(s.name).group(1) in tokens]
    if len(matches) <= 1:
        return matches[0] if matches else None
    for spec in matches:
        size = _FAMILY_RE.match(spec.name).group(2)
        if size and (size in tokens or f"{size}GB" in tokens):
            return spec
    if memory_bytes:
        return min(matches, key=lambda s: abs(s.memory_bytes - memory_bytes))
    raise PtlmError(f"{name!r} comes in several sizes: say which, e.g. "
                    f"{' or '.join(s.name for s in matches)}")
