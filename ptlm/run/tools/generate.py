"""`ptlm generate`: continue a prompt with a trained model, the qualitative check."""

from __future__ import annotations

import torch

from ptlm.errors import PtlmError
from ptlm.model.positions import check_length


def generate(model, tok, prompt: str, max_new_tokens: int, sample: bool = False,
             temperature: float = 0.8, top_p: float = 0.95) -> str:
    device = next(model.parameters()).device
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    if ids.numel() == 0:
        raise PtlmError("the prompt encodes to no token; give some text")
    if max_new_tokens < 1:
        raise PtlmError(f"--max-new-tokens {max_new_tokens}: must be >= 1")
    n = ids.shape[1]
    check_length(model.config, n + max_new_tokens,
                 f"the prompt ({n} tokens) + --max-new-tokens {max_new_tokens}", "the model",
                 lambda limit: f"give --max-new-tokens {max(limit - n, 0)} or less, or a shorter "
                               "prompt")
    kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else \
        dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, use_cache=True,
                             pad_token_id=tok.eos_token_id, **kwargs)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
