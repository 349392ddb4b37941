"""Per-GPU (and per-node host) memory of one training step, from facts alone.

`estimate(model, hw, job, setting)` is a pure function: plain numbers in, a `MemoryBreakdown` out.
The step has two memory peaks and the larger one counts:
  1. forward/backward: model states + DeepSpeed buffers + stored activations + the larger of
     (loss/logits temporaries, the backward of one layer: its recomputed activations when
     checkpointed, the gradients of its activations, the LM head's gradient);
  2. optimizer step: model states + fp32 gradients + the copies made building them
     (activations are gone by then).
Ψ below is the parameter count, N the data-parallel world size (GPUs), b·s the tokens of one
micro-batch, h hidden, f MLP width, V vocabulary, L layers. docs/planner.md derives every term.

Calibration (tests/test_memory.py, docs/planner.md): the plain-HF OPT-125M peaks measured with
FakeTensorMode + MemTracker (docs/reference-figures.md) and ptlm.run.tools.memtrace's
measurements of ptlm's own step are reproduced within 10% (most within 5%). The ZeRO stages and
offloads are checked against the real DeepSpeed 0.19.8 engine on 2 CPU ranks, every live tensor
byte counted from the allocator (bench/bench_zero_memory.py, tests/test_memory_zero.py,
docs/benchmarks.md): which buffers persist, which live only in the backward or the step, follows
those measurements and the DeepSpeed lines cited below.

Which device: `hw.device_type` ("cuda" by default, what plans are for; "cpu" for DeepSpeed's CPU
accelerator). A few tensors differ between the two (DROPOUT_MASK_BYTES,
CHUNK_LOSS_MIXED_ADD_FP32_COPIES); every figure is for the device the HardwareFacts name.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace

from ptlm.errors import PtlmError
from ptlm.plan.facts import GiB, HardwareFacts, ModelFacts
from ptlm.plan.setting import Setting

# ----------------------------------------------------------------------------------------------
# Bytes per parameter (model states)
# ----------------------------------------------------------------------------------------------
# Weights and gradients live in the training precision: DeepSpeed casts the module to fp16/bf16
# and, with its default grad_accum_dtype (= model dtype), keeps 16-bit gradients.
PRECISION_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
FP32_BYTES = 4
# fp32 master weights: DeepSpeed's fp16/bf16 optimizers and every ZeRO stage keep a separate fp32
# copy of the (partitioned) weights, even when training in fp32 (stage_1_and_2.py clones the
# partition .float()). ZeRO paper Table I: part of K = 12 (4 master + 8 Adam moments).
MASTER_WEIGHT_BYTES = 4
# torch/DeepSpeed AdamW: exp_avg + exp_avg_sq in fp32.
ADAMW_STATE_BYTES = 8
# bitsandbytes AdamW8bit, blockwise: 1 byte each for m and v plus one fp32 absmax per 256-element
# block per state (bitsandbytes/optim/optimizer.py, blocksize = 256).
BNB_BLOCKSIZE = 256
BNB_ABSMAX_BYTES = 4
ADAMW8BIT_STATE_BYTES = 2 * (1 + BNB_ABSMAX_BYTES / BNB_BLOCKSIZE)
# ...but tensors under min_8bit_size = 4096 elements keep 32-bit states. That matters only at
# ZeRO-0 (one tensor per parameter); ZeRO hands the optimizer a few huge flat partitions instead.
# We count the model's 1-D params (biases, norms) as the small ones.
# fp32 gradient partition built for the optimizer step (DeepSpeed's own estimator:
# "18 = 2_grads_16bit + 4_grads_32bit + 4_params_32bit + 8_optimizer_states_32bit").
FP32_GRAD_BYTES = 4
# ZeRO-1/2 with optimizer offload take each gradient slice's norm in fp64 on the device
# (zero/utils.py get_norm_dtype: fp64 where supported); see _backward_end.
GRAD_NORM_BYTES = 8
ZERO3_NORM_CHUNK_ELEMENTS = 250_000_000  # stage3.py _constant_buffered_norm2's buffer_size
# ptlm hands DeepSpeed a client optimizer (ptlm/model/optim.py: torch AdamW, bitsandbytes, CPU-Adam),
# so 16-bit ZeRO-0 runs FP16_UnfusedOptimizer: one fp32 master and one fp32 grad per parameter
# (built for all params at once in step()), no flat copies.
# ZeRO-1/2 (stage_1_and_2.py step) build the fp32 grad partition from a flat 16-bit copy of it:
# one more short-lived 16-bit copy, which DeepSpeed's estimator leaves out.
ZERO12_EXTRA_HALF_GRAD_COPIES = 1
# While loading, each rank holds the model on the host in the training dtype
# (ptlm.model.load.load_model passes it to from_pretrained); DeepSpeed's estimator assumes fp32 (4).
# DeepSpeed's estimators multiply host memory by this "additional_buffer_factor".
HOST_BUFFER_FACTOR = 1.5
# Host RSS of one training process besides offloaded states: python + torch + CUDA runtime +
# DeepSpeed + a data loader (typical 2-3 GiB per rank; we take the high end).
HOST_PROCESS_BYTES = 3 * GiB

# ----------------------------------------------------------------------------------------------
# Activations (bytes per token per layer), SDPA attention: no s² term is stored
# ----------------------------------------------------------------------------------------------
# Counted from what autograd saves in transformers' decoder layers (tensors of width h):
#   2 norms × (input + normalized output that feeds the next matmul)   = 4
#   q, k, v for SDPA (k, v shrink with grouped-query attention)       = 1 + 2·kv/heads
#   SDPA output (= o_proj input; the transpose is a view)              = 1
#   rotary models also save rotate_half(q), rotate_half(k)            = 1 + kv/heads
# This is Korthikanti et al. (2022) Eq. 1 without the 5·a·s/h attention-score term.
NORM_SAVED_TENSORS_PER_LAYER = 4
ATTN_OUTPUT_SAVED_TENSORS = 1
ROPE_SAVED_TENSORS_PER_QK = 1
# MLP tensors of width f that autograd keeps, by activation function:
#   relu: its output (also fc2's input); a C-kernel gelu/silu: input + output;
#   gelu_new (GPT-2, written in python in transformers): 4 intermediates + the output;
#   gated (SwiGLU): gate out, act(gate), up out, their product.
FFN_SAVED_TENSORS = {"relu": 1, "gelu_new": 5, "gelu_fast": 5, "quick_gelu": 3}
FFN_SAVED_TENSORS_DEFAULT = 2
GATED_FFN_SAVED_TENSORS = 4
# Dropout on the two residual branches saves a mask each. On CUDA it is bool (1 byte per
# element: aten native_dropout's CUDA kernel); on CPU torch builds the mask with bernoulli_ on a
# tensor like the input and saves it in the input's dtype (measured, bench/bench_zero_memory.py):
# `hw.device_type` picks which (DROPOUT_MASK_BYTES by device; None = the activation dtype's size).
DROPOUT_MASK_BYTES = {"cuda": 1, "cpu": None}
DROPOUTS_PER_LAYER = 2
# transformers' RMSNorm upcasts to fp32, adding one fp32 tensor of width h per layer in 16-bit.
RMSNORM_FP32_TENSORS_PER_LAYER = 1
# Outside the layers: the final norm's input and output (the LM head's input).
HEAD_SAVED_TENSORS = 2
# Gradient checkpointing keeps each layer's input; the backward recomputes one layer at a time.
CHECKPOINT_SAVED_TENSORS_PER_LAYER = 1
# While one layer runs its backward, the gradients of its activations are live: about one MLP-wide
# and four hidden-wide tensors in the activation dtype (calibrated on ptlm.run.tools.memtrace, OPT-125M:
# 0.33 GiB fp32 / 0.24 GiB bf16 at 16×1024), plus the gradient flowing down the residual stream.
LAYER_GRAD_FFN_TENSORS = 1
LAYER_GRAD_HIDDEN_TENSORS = 4
RESIDUAL_GRAD_TENSORS = 1

# ----------------------------------------------------------------------------------------------
# Loss / logits
# ----------------------------------------------------------------------------------------------
# transformers' ForCausalLMLoss: logits (training dtype) -> .float() -> log_softmax (saved) ->
# backward: grad of the log-softmax output + grad of the logits, all fp32 (b·s·V). Peak at the
# loss backward: 3 fp32 copies (memtrace of ptlm's loop: 18.59 GiB at OPT-125M fp32 16×1024).
FULL_LOSS_FP32_COPIES = 3
# A loop that keeps the model's outputs alive through backward (`out = model(...)`,
# `out.loss.backward()`, as HF's run_clm_no_trainer.py) also holds the logits in the training
# dtype: 4 fp32 copies in fp32, the reference figures' 21.65 GiB. ptlm and HF Trainer drop them.
HELD_OUTPUT_LOGITS_COPIES = 1
# Soft-capped logits (Gemma 2's cap * tanh(logits / cap)) keep one more (b·s·V) tensor of the
# activation dtype for tanh's backward (measured: Gemma 2 shape, fp32, 2 x 1024 tokens, vocab
# 4096: +32 MiB, exactly one copy). A scaled head (Cohere, Granite) keeps none (measured too).
SOFTCAP_SAVED_COPIES = 1
# ptlm's chunked loss (ptlm/model/loss.py) computes each chunk's loss and gradients in its forward,
# in place on one fp32 (rows × V) buffer; 16-bit models add one 16-bit (rows × V) tensor (the logits
# before .float(), later the logits' grad), and one 16-bit (V × h) GEMM result per chunk. Across
# chunks it keeps grad(hidden) (b·s·h, model dtype) and an fp32 grad of the LM-head weight (V × h).
CHUNK_LOSS_FP32_COPIES = 1
CHUNK_LOSS_HALF_COPIES = 1
CHUNK_LOSS_HEAD_GRAD_FP32_BYTES = 4
# ...and on CPU one more fp32 (V x h): `grads.weight.add_(dlogits.T @ h)` adds a 16-bit tensor into
# an fp32 one; CPU's TensorIterator first casts the 16-bit operand to an fp32 temporary (CUDA
# kernels cast element by element). Measured: bench/bench_zero_memory.py, docs/benchmarks.md.
CHUNK_LOSS_MIXED_ADD_FP32_COPIES = {"cuda": 0, "cpu": 1}
# Rows per chunk = this many bytes of fp32 logits (must equal ptlm.model.loss.LOGITS_CHUNK_BYTES;
# a test checks it): 667 rows for a 50k vocabulary.
LOSS_LOGITS_CHUNK_BYTES = 128 * 2**20

# ----------------------------------------------------------------------------------------------
# DeepSpeed buffers (the sizes chosen here go into the DeepSpeed config: ptlm.plan.dsconfig)
# ----------------------------------------------------------------------------------------------
DS_DEFAULT_BUCKET_ELEMENTS = int(5e8)  # DeepSpeed's reduce/allgather_bucket_size default
# We cap each gradient bucket at 1% of the GPU's memory (DeepSpeed's default bucket, 5e8 elements,
# is ~1 GB in 16-bit: too much on a 16 GB card), and never below h² (HF Trainer's "auto").
BUCKET_MEMORY_FRACTION = 0.01
# ZeRO-1/2 keep reduce_bucket_size-element gradient buffers: 2 with overlap_comm (we enable it
# for stage 2 and 3, like HF's templates), 1 without. They exist only while the backward runs:
# DeepSpeed 0.19.8 allocates them at the first gradient of each backward (setup_buckets,
# runtime/zero/stage_1_and_2.py:3256-3280) and drops them in the backward's epilogue
# (_release_ipg_buffers, stage_1_and_2.py:924-931, called at :1061). ZeRO-3 allocates its one
# bucket once, at initialization, and keeps it (runtime/zero/stage3.py:779-784).
IPG_BUFFERS_OVERLAP = 2
# ZeRO-3 prefetch bucket and parameter persistence threshold as HF Trainer's "auto" sets them.
ZERO3_PREFETCH_PER_HIDDEN_SQ = 0.9
ZERO3_PERSISTENCE_PER_HIDDEN = 10
# ZeRO-3 fp32 gradient buffer = the largest optimizer sub-group; DeepSpeed's default sub_group_size
# (1e9 elements = 4 GB fp32) is large, we write 1e8.
ZERO3_SUB_GROUP_ELEMENTS = int(1e8)
# ZeRO-0: after the backward DeepSpeed's engine all-reduces gradients through flat copies of up to
# MEMORY_OPT_ALLREDUCE_SIZE = 5e8 elements (engine.py buffered_allreduce_fallback), on one GPU too.
DS_ALLREDUCE_BUCKET_ELEMENTS = int(5e8)

# ----------------------------------------------------------------------------------------------
# Fixed costs on the GPU
# ----------------------------------------------------------------------------------------------
# CUDA context + cuBLAS/cuDNN workspaces of one torch process (CUDA 12 lazy loading: ~0.3-0.5 GiB).
CUDA_CONTEXT_BYTES = int(0.5 * GiB)
# NCCL communicator buffers when there is more than one GPU.
NCCL_BYTES = int(0.5 * GiB)
# Attention masks and packed documents (_mask_bytes): the two tensors k and v.
KV_TENSORS = 2
# The caching allocator never packs tensors perfectly: keep 10% of the tensor peak free.
ALLOCATOR_HEADROOM_FRACTION = 0.10
DEFAULT_MAX_MICRO_BATCH = 64


@dataclass(frozen=True)
class Job:
    """What the user wants to train: sequence length and the global batch (in sequences)."""

    seq_len: int
    global_batch: int | None = None  # None: as large a micro-batch as fits, no accumulation
    loss_chunk_tokens: int | None = None  # rows per loss chunk; None = ptlm.model.loss's default
    max_micro_batch: int = DEFAULT_MAX_MICRO_BATCH  # search cap when global_batch is None
    # The training loop keeps the model outputs (full logits) alive through backward (HF example
    # scripts); ptlm's loop does not. Only matters without the chunked loss.
    keep_outputs: bool = False
    # Each packed document attends only to itself, through a (B, T, T) mask (ptlm.model.packing,
    # --packing documents); False: one causal sequence per block (plain HF, --packing stream).
    documents: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.seq_len, int) or self.seq_len < 1:
            raise PtlmError(f"sequence length must be a positive integer, got {self.seq_len!r} "
                            "(e.g. --seq-len 1024)")
        if self.global_batch is not None and self.global_batch < 1:
            raise PtlmError(f"global batch must be >= 1 sequence, got {self.global_batch} "
                            "(e.g. --global-batch 16, or leave it out)")
        if self.loss_chunk_tokens is not None and self.loss_chunk_tokens < 1:
            raise PtlmError(f"loss chunk must be >= 1 token, got {self.loss_chunk_tokens}")
        if self.max_micro_batch < 1:
            raise PtlmError(f"max micro-batch must be >= 1, got {self.max_micro_batch}")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DsBuffers:
    """Bucket and threshold sizes (elements) written into the DeepSpeed config."""

    reduce_bucket_size: int
    allgather_bucket_size: int
    prefetch_bucket_size: int  # ZeRO-3
    param_persistence_threshold: int  # ZeRO-3
    max_live_parameters: int  # ZeRO-3
    sub_group_size: int  # ZeRO-3

    def to_dict(self) -> dict:
        return asdict(self)


def ds_buffers(model: ModelFacts, hw: HardwareFacts, setting: Setting) -> DsBuffers:
    weight_bytes = PRECISION_BYTES[setting.precision]
    by_memory = int(hw.gpu_memory_bytes * BUCKET_MEMORY_FRACTION / weight_bytes)
    bucket = max(model.hidden ** 2, min(by_memory, DS_DEFAULT_BUCKET_ELEMENTS, model.parameters))
    prefetch = int(ZERO3_PREFETCH_PER_HIDDEN_SQ * model.hidden ** 2)
    return DsBuffers(
        reduce_bucket_size=bucket, allgather_bucket_size=bucket, prefetch_bucket_size=prefetch,
        param_persistence_threshold=ZERO3_PERSISTENCE_PER_HIDDEN * model.hidden,
        # the module being computed (at most the largest layer) plus what is prefetched
        max_live_parameters=model.largest_layer_params + prefetch,
        sub_group_size=ZERO3_SUB_GROUP_ELEMENTS)


@dataclass(frozen=True)
class MemoryBreakdown:
    """Bytes per GPU (and per node on the host) for one setting; derived totals are properties."""

    parameters: int
    gradients: int
    optimizer_states: int
    ds_buffers: int
    activations: int  # stored for the backward (checkpointed or not)
    loss: int  # logits / loss temporaries at their peak
    layer_backward: int  # one layer's backward: recomputed activations (checkpointing),
    #                      grads of its activations, and the LM head's grad (held until the end)
    fp32_grads: int  # fp32 gradients the optimizer steps on (built at the step)
    flatten_copies: int  # short-lived copies while building them / all-reducing (step only)
    cuda_context: int
    host_model_states: int  # per node: max(model load, offloaded states) × buffer factor
    host_overhead: int  # per node: the training processes themselves
    # Gradients live through the forward: ZeRO-3 keeps a persistent gradient partition buffer, and
    # accumulation keeps param.grad between micro-steps. Otherwise DeepSpeed sets them to None
    # after each step and they grow during the backward while the activations shrink.
    grads_persist: bool = True
    # DeepSpeed's gradient buckets live through the whole step (ZeRO-3) or only while the
    # backward runs (ZeRO-1/2; see IPG_BUFFERS_OVERLAP).
    ds_buffers_persist: bool = True
    # At the end of the backward, beyond what persists: the gradients not yet counted, the
    # backward-only buckets and the transients of that moment (see _backward_end).
    backward_end: int = 0
    # ZeRO-1/2 with optimizer offload: the device buffer every gradient goes to the host
    # through, the size of the largest parameter, kept for the run (stage_1_and_2.py:659).
    offload_staging: int = 0

    @property
    def model_states(self) -> int:
        """What DeepSpeed's estimate_zero*_model_states_mem_needs counts on the GPU."""
        return (self.parameters + self.gradients + self.optimizer_states + self.fp32_grads
                + self.offload_staging)

    @property
    def forward_backward_peak(self) -> int:
        """The larger of two moments. Early: at the loss / in the first layers' backward, with
        every activation stored. Late: the end of the backward (no activations left), where the
        gradients are complete, DeepSpeed's buckets are full and it reduces them, and the tied
        embedding's two gradients are summed (`backward_end`)."""
        persistent = (self.parameters + self.optimizer_states + self._persistent_buffers
                      + self.offload_staging)
        if self.grads_persist:
            persistent += self.gradients
        in_backward = self.layer_backward + (self.ds_buffers - self._persistent_buffers)
        early = persistent + self.activations + max(self.loss, in_backward)
        return max(early, persistent + self.backward_end)

    @property
    def step_peak(self) -> int:
        return self.model_states + self.flatten_copies + self._persistent_buffers

    @property
    def _persistent_buffers(self) -> int:
        return self.ds_buffers if self.ds_buffers_persist else 0

    @property
    def peak_tensor_bytes(self) -> int:
        return max(self.forward_backward_peak, self.step_peak)

    @property
    def peak_phase(self) -> str:
        return "forward/backward" if self.forward_backward_peak >= self.step_peak else "optimizer step"

    @property
    def allocator_headroom(self) -> int:
        return int(self.peak_tensor_bytes * ALLOCATOR_HEADROOM_FRACTION)

    @property
    def needed_bytes(self) -> int:
        """What must fit in the GPU's memory left after the CUDA context."""
        return self.peak_tensor_bytes + self.allocator_headroom

    @property
    def gpu_total(self) -> int:
        return self.needed_bytes + self.cuda_context

    @property
    def host_total(self) -> int:
        return self.host_model_states + self.host_overhead

    def to_dict(self) -> dict:
        d = asdict(self)
        for name in ("model_states", "forward_backward_peak", "step_peak", "peak_tensor_bytes",
                     "peak_phase", "allocator_headroom", "needed_bytes", "gpu_total", "host_total"):
            d[name] = getattr(self, name)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "MemoryBreakdown":
        # fields added later have defaults, so plans saved before them still load
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


def usable_gpu_bytes(hw: HardwareFacts) -> int:
    """GPU memory left for tensors after the CUDA context (and NCCL with several GPUs)."""
    return hw.gpu_memory_bytes - gpu_fixed_bytes(hw)


def gpu_fixed_bytes(hw: HardwareFacts) -> int:
    return CUDA_CONTEXT_BYTES + (NCCL_BYTES if hw.world > 1 else 0)


def estimate(model: ModelFacts, hw: HardwareFacts, job: Job, setting: Setting) -> MemoryBreakdown:
    world = max(hw.world, 1)
    buffers = ds_buffers(model, hw, setting)
    states = _model_states(model, setting, world, buffers)
    tokens = setting.micro_batch * job.seq_len
    host_states = _host_model_states(model, setting, world, hw.gpus_per_node or 1)
    # ZeRO-3's gradient partition buffer is allocated once (stage3.py:791-795) and kept (on the
    # host with optimizer offload). ZeRO-2's (grads_in_partition) is made during the backward
    # (stage_1_and_2.py:2184-2195) and dropped with the buckets (:930); the step frees the
    # partition it was flattened into (averaged_gradients = None, :3131).
    grads_persist = setting.zero == 3 or accumulates(job, world, setting.micro_batch)
    masks = _mask_bytes(model, setting, job)
    if job.documents and model.documents_activations is not None:  # measured with the mask
        model = replace(model, activations=model.documents_activations)
    return MemoryBreakdown(
        parameters=states.parameters, gradients=states.gradients,
        optimizer_states=states.optimizer_states,
        ds_buffers=_ds_buffer_bytes(setting, buffers),
        activations=_stored_activations(model, setting, job.seq_len, tokens, hw.device_type)
        + masks.stored,
        loss=_loss_bytes(model, setting, job, tokens, hw.device_type),
        layer_backward=_layer_backward(model, setting, job.seq_len, tokens, grads_persist,
                                       hw.device_type)
        + states.backward_grads + masks.in_layer_backward,
        fp32_grads=states.fp32_grads, flatten_copies=states.flatten_copies,
        cuda_context=gpu_fixed_bytes(hw),
        host_model_states=host_states,
        host_overhead=(hw.gpus_per_node or 1) * HOST_PROCESS_BYTES,
        grads_persist=grads_persist, ds_buffers_persist=setting.zero == 3,
        backward_end=_backward_end(model, setting, world, buffers, states, grads_persist),
        offload_staging=states.offload_staging)


def accumulates(job: Job, world: int, micro_batch: int) -> bool:
    """Whether this micro-batch needs gradient accumulation to reach the job's global batch."""
    return job.global_batch is not None and micro_batch * world < job.global_batch


@dataclass(frozen=True)
class _States:
    parameters: int
    gradients: int
    optimizer_states: int
    fp32_grads: int = 0
    flatten_copies: int = 0
    backward_grads: int = 0  # only while the backward runs
    offload_staging: int = 0


def _optimizer_bytes_per_param(model: ModelFacts, setting: Setting, flat: bool) -> float:
    """Adam moments per parameter; `flat`: DeepSpeed hands the optimizer big flat fp32 tensors."""
    if setting.optimizer == "adamw":
        return ADAMW_STATE_BYTES
    if flat:
        return ADAMW8BIT_STATE_BYTES
    small = model.vector_params / model.parameters
    return small * ADAMW_STATE_BYTES + (1 - small) * ADAMW8BIT_STATE_BYTES


def _model_states(model: ModelFacts, s: Setting, world: int, buffers: DsBuffers) -> _States:
    psi, w = model.parameters, PRECISION_BYTES[s.precision]
    # DeepSpeed wraps the optimizer (fp32 master + fp32 grads) for 16-bit training and for ZeRO.
    wrapped = s.precision != "fp32" or s.zero >= 1
    master = MASTER_WEIGHT_BYTES if wrapped else 0
    # ZeRO-1/2/3 give the optimizer flat partitions; ZeRO-0 keeps one tensor per parameter.
    moments = _optimizer_bytes_per_param(model, s, flat=s.zero >= 1)
    shard = world if s.zero >= 1 else 1
    offloaded = s.offload != "none"
    optimizer = 0 if offloaded else int((master + moments) * psi / shard)
    if s.zero == 3:
        return _zero3_states(model, s, world, buffers, optimizer)
    params = psi * w
    grads = psi * w // world if (s.zero == 2 and not offloaded) else psi * w
    if offloaded:  # the optimizer steps on the host
        # ZeRO-1 keeps its 16-bit grads on the device until it reduces after the backward (through
        # accumulation too); ZeRO-2 hands each bucket to the host as it fills (accumulating there,
        # async_accumulate_grad_in_cpu_via_gpu). Both go through one kept device buffer of the
        # largest parameter's size (temp_grad_buffer_for_gpu_offload, stage_1_and_2.py:659;
        # measured at both stages).
        return _States(params, grads if s.zero == 1 else 0, optimizer,
                       offload_staging=w * model.largest_layer_params)
    fp32_grads = FP32_GRAD_BYTES * psi // shard if wrapped else 0
    if s.zero == 0:
        # The all-reduce bucket copy comes before the fp32 grads exist: only its excess counts.
        bucket = w * min(psi, DS_ALLREDUCE_BUCKET_ELEMENTS)
        return _States(params, grads, optimizer, fp32_grads, max(0, bucket - fp32_grads))
    flatten = ZERO12_EXTRA_HALF_GRAD_COPIES * w * psi // shard
    return _States(params, grads, optimizer, fp32_grads, flatten)


def _zero3_states(model: ModelFacts, s: Setting, world: int, buffers: DsBuffers,
                  optimizer: int) -> _States:
    psi, w = model.parameters, PRECISION_BYTES[s.precision]
    # Gathered working set: live parameters (current module + prefetch) and the small params
    # that stay unpartitioned (below the persistence threshold: biases, norms).
    working = w * (buffers.max_live_parameters + model.vector_params)
    params = working + (0 if s.offload == "parameters" else psi * w // world)
    # Kept: the 16-bit grad partition (grad_partitions_flat_buffer, stage3.py:791; on the host
    # with optimizer offload). In the backward only: the gathered layer's 16-bit grads before
    # their reduce-scatter. In the step only: the fp32 grad of one sub-group (stage3.py:1338).
    if s.offload != "none":
        return _States(params, 0, optimizer, backward_grads=w * model.largest_layer_params)
    return _States(params, psi * w // world, optimizer,
                   fp32_grads=FP32_GRAD_BYTES * min(psi // world, buffers.sub_group_size),
                   backward_grads=w * model.largest_layer_params)


def _backward_end(model: ModelFacts, s: Setting, world: int, buffers: DsBuffers, states: _States,
                  grads_persist: bool) -> int:
    """Bytes at the end of the backward beyond params, optimizer states and what persists.

    Measured on the real engine (bench/bench_zero_memory.py; docs/benchmarks.md, full-loss rows):
    - the gradients: ZeRO-0/1 keep every param.grad until the step / the epilogue's reduction;
      ZeRO-2 fills its partition (grads_in_partition) as buckets are reduced; ZeRO-3's partition
      persists (counted already); with offload the device keeps only the staging buffer;
    - ZeRO-1/2's buckets (backward-only, IPG_BUFFERS_OVERLAP);
    - a transient, the larger of:
      * the tied embedding: autograd holds the LM head's grad from the first op of the backward
        and adds the embedding's own dense grad to it at the very end: two (V x h) 16-bit grads
        plus their sum, which at ZeRO-2/3 is copied into a bucket (at ZeRO-0/1 the sum is the
        param.grad counted above). Untied, only ZeRO-2/3 copy the embedding grad.
      * DeepSpeed's reduction of a full bucket: ZeRO-3 flattens it and reduce-scatters through a
        second buffer of its size (stage3.py __avg_scatter_grads -> reduce_scatter_coalesced,
        :2102-2118); with optimizer offload the second is the norm of the largest param's grad
        partition, taken in fp64 (_constant_buffered_norm2, stage3.py:1960, in chunks of 250 M
        elements) before it goes to the host.
      * ZeRO-1/2 with optimizer offload: the norm of each parameter's slice in this rank's
        partition, taken in fp64 (set_norm_for_param_grad_in_gpu, stage_1_and_2.py:1873-1886,
        `.to(get_norm_dtype())`: fp64 wherever the device has it, CUDA included). The largest
        slice is the largest parameter, cut to one rank's partition: 8 bytes each (on rank 0 of
        an OPT, whose embedding comes first). Its 16-bit grad is alive too: ZeRO-1 keeps every
        grad until it reduces after the backward; ZeRO-2 copies grads into its buckets, except a
        parameter larger than a bucket, reduced from its own grad.
    """
    w = PRECISION_BYTES[s.precision]
    psi, head = model.parameters, model.vocab * model.hidden
    offloaded = s.offload != "none"
    largest = model.largest_layer_params
    grads = 0
    if not grads_persist:
        grads = {0: psi * w, 1: psi * w, 2: psi * w // world}.get(s.zero, 0)
    if offloaded and s.zero == 2:
        grads = w * largest if largest > buffers.reduce_bucket_size else 0
    buckets = 0 if s.zero == 3 else _ds_buffer_bytes(s, buffers)
    if offloaded and s.zero == 1 and largest <= buffers.reduce_bucket_size:
        # ZeRO-1 reduces after the backward, moving each grad into its bucket (the original is
        # freed): together they are the 16-bit grads counted above. Only a parameter larger than
        # the bucket is reduced from its own grad, next to the bucket (measured both ways).
        buckets = 0
    copied_sum = 1 if s.zero >= 2 else 0
    tied = (2 if model.tied_embeddings else 0) * head * w + copied_sum * head * w
    if s.zero == 3:
        bucket = w * buffers.reduce_bucket_size
        norm = GRAD_NORM_BYTES * min(-(-largest // world), ZERO3_NORM_CHUNK_ELEMENTS)
        reduction = bucket + (norm if offloaded else bucket)
    elif offloaded:
        reduction = GRAD_NORM_BYTES * min(largest, -(-psi // world))
    else:
        reduction = 0
    return grads + buckets + max(tied, reduction)


def _host_model_states(model: ModelFacts, s: Setting, world: int, gpus_per_node: int) -> int:
    """Per node: max(loading, offloaded states) × DeepSpeed's buffer factor."""
    psi = model.parameters
    # ZeRO-3 builds the model partitioned (zero.Init), so loading holds one layer at a time.
    load_params = model.largest_layer_params if s.zero == 3 else psi
    load = gpus_per_node * load_params * PRECISION_BYTES[s.precision]
    offloaded = 0
    if s.offload != "none":
        w = PRECISION_BYTES[s.precision]
        per_param = MASTER_WEIGHT_BYTES + _optimizer_bytes_per_param(model, s, True) + FP32_GRAD_BYTES
        if s.zero == 3:
            per_param += w  # the 16-bit grad partition lives on the host too
        if s.offload == "parameters":
            per_param += w
        offloaded = int(per_param * psi / world) * gpus_per_node
    return int(max(load, offloaded) * HOST_BUFFER_FACTOR)


def _ds_buffer_bytes(s: Setting, buffers: DsBuffers) -> int:
    w = PRECISION_BYTES[s.precision]
    if s.zero == 0:
        return 0
    if s.zero == 3:
        return w * buffers.reduce_bucket_size
    count = IPG_BUFFERS_OVERLAP if s.zero == 2 else 1
    return count * w * buffers.reduce_bucket_size


def _activation_bytes(s: Setting) -> int:
    return PRECISION_BYTES[s.precision]


def _dropout_mask_bytes(s: Setting, device_type: str) -> int:
    return DROPOUT_MASK_BYTES[device_type] or _activation_bytes(s)


def _layer_activations(model: ModelFacts, s: Setting, device_type: str = "cuda") -> float:
    """Bytes one decoder layer saves for its backward, per token."""
    a, h = _activation_bytes(s), model.hidden
    kv = model.kv_heads / model.heads
    hidden_tensors = NORM_SAVED_TENSORS_PER_LAYER + (1 + 2 * kv) + ATTN_OUTPUT_SAVED_TENSORS
    if model.rotary:
        hidden_tensors += ROPE_SAVED_TENSORS_PER_QK * (1 + kv)
    if model.gated_mlp:
        ffn_tensors = GATED_FFN_SAVED_TENSORS
    else:
        ffn_tensors = FFN_SAVED_TENSORS.get(model.hidden_act, FFN_SAVED_TENSORS_DEFAULT)
    per_token = a * (hidden_tensors * h + ffn_tensors * model.ffn)
    if model.residual_dropout > 0:
        per_token += DROPOUTS_PER_LAYER * _dropout_mask_bytes(s, device_type) * h
    if model.rms_norm and a < FP32_BYTES:
        per_token += RMSNORM_FP32_TENSORS_PER_LAYER * FP32_BYTES * h
    return per_token


def _stored_activations(model: ModelFacts, s: Setting, seq_len: int, tokens: int,
                        device_type: str) -> int:
    a = _activation_bytes(s)
    if model.activations is not None:  # measured for this architecture (ptlm.model.profile)
        per_layer = model.activations.for_precision(s.precision).saved_bytes(seq_len,
                                                                              s.checkpointing)
    elif s.checkpointing:
        per_layer = CHECKPOINT_SAVED_TENSORS_PER_LAYER * a * model.hidden
    else:
        per_layer = _layer_activations(model, s, device_type)
    head = HEAD_SAVED_TENSORS * a * model.hidden
    return int(tokens * (model.layers * per_layer + head))


@dataclass(frozen=True)
class _MaskBytes:
    stored: int  # alive from the forward through the backward
    in_layer_backward: int  # only while one checkpointed layer recomputes and runs its backward


def _mask_bytes(model: ModelFacts, s: Setting, job: Job) -> _MaskBytes:
    """The attention masks a step keeps, and what packed documents add (measured on real
    tensors and on ptlm's fake-traced step, tests/test_memory.py). Each mask is (B, 1, T, T),
    additive in the activation dtype, built once per kind of attention layer and kept by every
    layer of that kind for its backward: ptlm's own ("mask") and transformers' alike
    (ptlm.model.masks: never the bool mask SDPA would copy in each layer). With packed
    documents every kind needs one (model.attention_masks); as one stream only the windowed
    kinds do (sliding-window, chunked: model.windowed_masks), full attention running SDPA's
    causal kernels without a mask. Given a mask, transformers also repeats k and v to every
    query head (SDPA's grouped-query path takes no mask), and each layer keeps the repeated
    copies: a measured profile (documents_activations) has that part already. Flash-attention's
    variable-length path needs none of this (not modelled: plans assume SDPA)."""
    a, b, t = _activation_bytes(s), s.micro_batch, job.seq_len
    mask = b * t * t * a
    if not job.documents or model.packing_mechanism is None:
        return _MaskBytes(model.windowed_masks * mask, 0)
    shared = model.attention_masks * mask
    if model.documents_activations is not None:
        return _MaskBytes(shared, 0)
    per_layer = (KV_TENSORS * b * t * max(model.heads - model.kv_heads, 0)
                 * model.attention_head_dim * a)
    if s.checkpointing:
        return _MaskBytes(shared, per_layer)
    return _MaskBytes(shared + model.layers * per_layer, 0)


def loss_chunk_rows(model: ModelFacts, job: Job) -> int:
    if job.loss_chunk_tokens is not None:
        return job.loss_chunk_tokens
    return max(1, LOSS_LOGITS_CHUNK_BYTES // (FP32_BYTES * model.vocab))


def _layer_backward(model: ModelFacts, s: Setting, seq_len: int, tokens: int,
                    grads_persist: bool, device_type: str) -> int:
    a, h = _activation_bytes(s), model.hidden
    if model.activations is not None:  # measured: recomputation included when checkpointing
        per_token = model.activations.for_precision(s.precision).backward_bytes(seq_len,
                                                                                s.checkpointing)
    else:
        per_token = a * (LAYER_GRAD_FFN_TENSORS * model.ffn + (LAYER_GRAD_HIDDEN_TENSORS
                                                               + RESIDUAL_GRAD_TENSORS) * h)
        if s.checkpointing:
            per_token += _layer_activations(model, s, device_type)
    # The LM head's weight grad arrives first; with tied embeddings autograd holds it until the
    # embedding's own grad is added at the very end. Counted here unless all grads are counted.
    head_grad = 0 if grads_persist else model.vocab * h * PRECISION_BYTES[s.precision]
    return int(tokens * per_token) + head_grad


def _loss_bytes(model: ModelFacts, s: Setting, job: Job, tokens: int, device_type: str) -> int:
    a = _activation_bytes(s)
    if not s.chunked_loss:
        held = HELD_OUTPUT_LOGITS_COPIES * a if job.keep_outputs else 0
        held += SOFTCAP_SAVED_COPIES * a if model.softcapped_logits else 0
        return tokens * model.vocab * (FULL_LOSS_FP32_COPIES * FP32_BYTES + held)
    half = CHUNK_LOSS_HALF_COPIES * a if a < FP32_BYTES else 0
    rows = min(tokens, loss_chunk_rows(model, job))
    chunk = rows * model.vocab * (CHUNK_LOSS_FP32_COPIES * FP32_BYTES + half)
    head = model.vocab * model.hidden
    mixed_add = CHUNK_LOSS_MIXED_ADD_FP32_COPIES[device_type] * FP32_BYTES if half else 0
    head_grads = head * (CHUNK_LOSS_HEAD_GRAD_FP32_BYTES + half + mixed_add)
    return chunk + head_grads + tokens * model.hidden * a
