"""Causal-LM loss without the full (tokens x vocab) logits.

The plain Hugging Face path builds logits = lm_head(h) for every token, (B, T, V), upcasts them to
fp32 and hands them to cross_entropy, which keeps its own copies for backward. For OPT-125M at
16 x 1024 tokens that is ~6 GiB of loss temporaries against ~2 GiB of model states.

`ChunkedLMHeadLoss` walks the tokens in chunks. Per chunk it computes logits = h @ W^T (+ b),
the fp32 log-softmax, the summed NLL and -- in the same pass -- the gradients w.r.t. h, W and b,
then drops the chunk's logits. Only the gradients (the size of h and of W) survive to backward.

Why gradients in forward instead of recomputing per chunk in backward: the recompute costs one
more (tokens x hidden x vocab) matmul per step -- ~10% of the step's FLOPs for a 125M model with a
50k vocabulary -- while the memory it would save is small: grad(h) is needed at the start of
backward anyway and grad(W) becomes W.grad a moment later. The price: this backward may run once
only (no retain_graph double backward), the same contract as Liger's fused linear cross-entropy.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ptlm.errors import PtlmError
from ptlm.model.config import text_config
from ptlm.model.masks import additive_sdpa_masks

IGNORE_INDEX = -100  # Hugging Face's label for "no loss here" (padding, prompt tokens)
LOGITS_CHUNK_BYTES = 128 * 2**20  # fp32 logits per chunk; the chunk's peak is ~1.5-2x this
# Config fields of architectures that transform the logits after lm_head (soft-capping, scaling),
# which the chunked loss does not reproduce.
LOGIT_TRANSFORM_FIELDS = ("final_logit_softcapping", "logit_scale", "logits_scaling",
                          "output_multiplier_scale", "lm_head_multiplier")
SCALE_ROWS = 4096  # rows per fp32 temporary when scaling 16-bit gradients in backward
CHECK_TOKENS = 16  # tokens in the startup self-check of the chunked loss
CHECK_TOLERANCE = 1e-3  # relative; the check runs in the model's (maybe 16-bit) dtype


def default_chunk_size(vocab_size: int) -> int:
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


class ChunkedLMHeadLoss(torch.autograd.Function):
    """Summed NLL of `labels` under softmax(hidden @ weight^T + bias), chunk by chunk over tokens.

    hidden (N, H), weight (V, H), bias (V,) or None, labels (N,) already shifted, -100 = ignored.
    Returns a 0-dim fp32 tensor. Gradients of h, W, b are computed in forward and scaled in backward.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, chunk_size: int, ignore_index: int,
                needs_grad: bool):
        n_tokens = hidden.shape[0]
        loss_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grads = _GradBuffers(hidden, weight, bias) if needs_grad else None
        for start in range(0, n_tokens, chunk_size):
            end = min(start + chunk_size, n_tokens)
            loss_sum += _chunk(hidden[start:end], weight, bias, labels[start:end], ignore_index,
                               grads, start)
        ctx.grads = grads
        return loss_sum

    @staticmethod
    def backward(ctx, grad_loss):
        grads = ctx.grads
        if grads is None:
            raise RuntimeError("ChunkedLMHeadLoss: backward ran twice (retain_graph) or the loss was "
                               "built without gradients; it computes them once, in forward")
        ctx.grads = None  # free them as soon as autograd has taken them
        return (*grads.scaled(grad_loss), None, None, None, None)


class _GradBuffers:
    """Gradients accumulated over chunks: grad(h) in the head's dtype, grad(W) and grad(b) in fp32.

    grad(W) sums over every chunk, so it accumulates in fp32 (a 16-bit running sum would round
    once per chunk; one GEMM over all tokens, as in the HF path, rounds once). It costs 4 bytes
    per LM-head weight for the duration of the loss.
    """

    def __init__(self, hidden, weight, bias):
        self.hidden = torch.empty(hidden.shape, dtype=weight.dtype, device=hidden.device)  # (N, H)
        self.weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)  # (V, H)
        self.bias = None if bias is None else torch.zeros(bias.shape, dtype=torch.float32,
                                                           device=bias.device)  # (V,)
        self.hidden_dtype = hidden.dtype
        self.weight_dtype = weight.dtype

    def scaled(self, grad_loss):
        """(grad h, grad W, grad b) times d(out)/d(loss_sum), in the inputs' dtypes."""
        grad_hidden = _scale(self.hidden, grad_loss).to(self.hidden_dtype)
        grad_weight = _scale(self.weight, grad_loss).to(self.weight_dtype)
        grad_bias = None if self.bias is None else _scale(self.bias, grad_loss).to(self.weight_dtype)
        return grad_hidden, grad_weight, grad_bias


def _scale(t: torch.Tensor, grad_loss: torch.Tensor) -> torch.Tensor:
    """t *= grad_loss in place (the buffers are used once, see ChunkedLMHeadLoss.backward).

    16-bit tensors are scaled in fp32, a slice at a time: a 16-bit in-place multiply would first
    round grad_loss (1/tokens, times fp16's loss scale, which may not even fit in fp16) and bias
    every gradient by the same factor; this way each element is rounded once, as in the HF path.
    """
    if t.dtype == torch.float32:
        return t.mul_(grad_loss)
    for part in t.split(SCALE_ROWS):
        part.copy_(part.float() * grad_loss)
    return t


def _chunk(h, weight, bias, labels, ignore_index: int, grads: _GradBuffers | None, start: int):
    """Summed NLL of one chunk of C tokens; adds the chunk's gradients into `grads`."""
    h = h.to(weight.dtype)
    logits = F.linear(h, weight, bias)  # (C, V) in the model's dtype, as the HF head computes it
    logits = logits.float()  # (C, V) fp32 -- a no-op for fp32 models
    valid = labels != ignore_index  # (C,)
    target = torch.where(valid, labels, 0)[:, None]  # (C, 1), ignored rows point at class 0
    # In-place log-softmax pieces on the one fp32 buffer: no logsumexp temporaries of size (C, V).
    logits.sub_(logits.amax(dim=-1, keepdim=True))  # (C, V) shifted, max 0
    target_logit = logits.gather(1, target).squeeze(1)  # (C,)
    sum_exp = logits.exp_().sum(dim=-1)  # logits now hold exp(shifted), (C,)
    nll = (sum_exp.log() - target_logit) * valid  # (C,)
    if grads is not None:
        _chunk_grads(h, weight, logits, sum_exp, target, valid, grads, start)
    return nll.sum()


def _chunk_grads(h, weight, exp_logits, sum_exp, target, valid, grads: _GradBuffers, start: int):
    # d(NLL)/d(logits) = softmax - onehot(target), zero on ignored rows.
    probs = exp_logits.div_(sum_exp[:, None])  # (C, V) softmax, in place
    probs.scatter_add_(1, target, -valid[:, None].to(probs.dtype))  # softmax - onehot
    probs.mul_(valid[:, None])
    if grads.bias is not None:
        grads.bias += probs.sum(dim=0)
    # Same cast as the HF path: autograd casts the fp32 logits' grad to the head's dtype.
    dlogits = probs.to(weight.dtype)  # (C, V); the same buffer for fp32 models
    torch.mm(dlogits, weight, out=grads.hidden[start:start + h.shape[0]])  # (C, H)
    if weight.dtype == torch.float32:
        grads.weight.addmm_(dlogits.T, h)  # (V, H), no temporary
    else:
        grads.weight.add_(dlogits.T @ h)  # (V, H): fp32 += one 16-bit GEMM per chunk


def lm_head_loss(hidden: torch.Tensor, lm_head: nn.Linear, labels: torch.Tensor,
                 chunk_size: int | None = None, ignore_index: int = IGNORE_INDEX):
    """(sum of NLL, number of counted tokens) for next-token prediction, with HF's label shift.

    hidden: (B, T, H) final hidden states (after the final layer norm). labels: (B, T), unshifted;
    position t is scored on labels[t + 1], the last position on nothing.

    The loss runs as `lm_head`'s forward so that module hooks see it: DeepSpeed ZeRO-3 gathers the
    partitioned head weight in its pre-forward hook (and FSDP does the same).
    """
    shift_labels = F.pad(labels[:, 1:], (0, 1), value=ignore_index).reshape(-1)  # (B*T,)
    flat = hidden.reshape(-1, hidden.shape[-1])  # (B*T, H)
    chunk = chunk_size or default_chunk_size(lm_head.out_features)  # weight may be a ZeRO-3 shard
    if chunk < 1:
        raise PtlmError(f"chunk size must be >= 1, got {chunk}")
    needs_grad = torch.is_grad_enabled() and (flat.requires_grad or lm_head.weight.requires_grad)

    def head_forward(_input):
        return ChunkedLMHeadLoss.apply(flat, lm_head.weight, lm_head.bias, shift_labels, chunk,
                                       ignore_index, needs_grad)

    loss_sum = _call_as_forward(lm_head, head_forward, flat)
    n_tokens = (shift_labels != ignore_index).sum()
    return loss_sum, n_tokens


def _call_as_forward(module: nn.Module, forward, *args):
    """Run `forward` through `module.__call__`, so the module's hooks run around it."""
    shadowed = module.__dict__.get("forward")  # a wrapper someone else installed on the instance
    module.forward = forward  # an instance attribute shadows the class's forward
    try:
        return module(*args)
    finally:
        if shadowed is None:
            del module.forward
        else:
            module.forward = shadowed


def check_chunkable(model) -> nn.Linear:
    """The model's LM head if the chunked loss reproduces its logits, else a PtlmError."""
    if model.base_model is model:
        raise PtlmError(f"{type(model).__name__} has no separate base model to take hidden states "
                        "from: the chunked loss cannot run; train with chunked_loss off")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear):
        raise PtlmError(f"{type(model).__name__}'s LM head is {type(head).__name__}, not a plain "
                        "Linear layer: the chunked loss cannot replace it; train with chunked_loss off")
    config = text_config(model.config)
    for field in LOGIT_TRANSFORM_FIELDS:
        if getattr(config, field, None) not in (None, 1, 1.0):
            raise PtlmError(f"{type(model).__name__} transforms its logits after the LM head "
                            f"({field}={getattr(config, field)}), which the chunked loss does not "
                            "reproduce; train with chunked_loss off")
    return head


def causal_lm_loss(model, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, chunked: bool = True,
                   chunk_size: int | None = None, with_counts: bool = False,
                   packed: dict | None = None):
    """Mean next-token NLL over tokens whose (shifted) label is not -100.

    labels default to input_ids (continued pretraining). chunked=True runs the model's base (the
    decoder, final layer norm included) and the chunked head+loss; chunked=False is the plain HF
    path, model(input_ids, labels=...). with_counts=True returns (mean, sum, n_tokens), which
    evaluation needs to average over batches exactly. packed: the extra model inputs that make a
    packed block separate documents (ptlm.model.packing.model_inputs: position_ids, and a mask
    for models that need one); the labels then come with the boundaries already masked.

    A batch with no counted token gives mean 0 and zero gradients (HF gives nan), so a fully
    masked micro-batch cannot poison gradient accumulation.
    """
    labels = input_ids if labels is None else labels
    packed = packed or {}
    if "attention_mask" in packed:
        attention_mask = packed["attention_mask"]
    extra = {k: v for k, v in packed.items() if k != "attention_mask"}
    # a mask transformers builds (packed documents, sliding windows) is additive: one tensor for
    # all layers (ptlm.model.masks; SDPA would copy a bool one in each layer, kept for backward)
    with additive_sdpa_masks():
        if chunked:
            head = check_chunkable(model)
            out = model.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                   use_cache=False, **extra)
            hidden = out[0]  # (B, T, H) last hidden state, final norm applied
            loss_sum, n_tokens = lm_head_loss(hidden, head, labels, chunk_size)
            mean = loss_sum / n_tokens.clamp(min=1)
        else:
            n_tokens = (labels[:, 1:] != IGNORE_INDEX).sum()
            # num_items_in_batch switches HF to sum / count: the same mean, and 0 instead of nan.
            out = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels,
                        use_cache=False, num_items_in_batch=n_tokens.clamp(min=1), **extra)
            mean = out.loss
            loss_sum = mean.float() * n_tokens
    return (mean, loss_sum, n_tokens) if with_counts else mean


@torch.no_grad()
def check_chunked_loss(model, tolerance: float = CHECK_TOLERANCE) -> None:
    """Compare the chunked loss with the model's own on a few tokens; PtlmError if they differ.

    Cheap insurance for architectures we have not tested: any logit transform between the base
    model and lm_head that `check_chunkable` cannot see shows up as a different loss.
    """
    vocab = check_chunkable(model).out_features
    device = next(model.parameters()).device
    ids = torch.arange(CHECK_TOKENS, device=device)[None] * 7919 % vocab  # (1, CHECK_TOKENS)
    was_training = model.training
    model.eval()  # no dropout, so both paths see the same network
    try:
        chunked = causal_lm_loss(model, ids, chunked=True).item()
        reference = causal_lm_loss(model, ids, chunked=False).item()
    finally:
        model.train(was_training)
    if abs(chunked - reference) > tolerance * max(1.0, abs(reference)):
        raise PtlmError(f"the chunked loss ({chunked:.5f}) differs from {type(model).__name__}'s own "
                        f"({reference:.5f}): this architecture computes its logits in a way the "
                        "chunked loss does not reproduce; train with chunked_loss off")
