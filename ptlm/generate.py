"""`ptlm generate`: continue a prompt with a trained model, the qualitative check."""

from __future__ import annotations

from pathlib import Path

import torch

from ptlm.errors import PtlmError


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF folder (e.g. RUN/hf_model) or hub name")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokenizer", help="default: the model folder's tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)


def generate(model, tok, prompt: str, max_new_tokens: int, sample: bool = False,
             temperature: float = 0.8, top_p: float = 0.95) -> str:
    device = next(model.parameters()).device
    ids = tok(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)
    if ids.numel() == 0:
        raise PtlmError("the prompt encodes to no token; give some text")
    kwargs = dict(do_sample=True, temperature=temperature, top_p=top_p) if sample else \
        dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, use_cache=True,
                             pad_token_id=tok.eos_token_id, **kwargs)
    return tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run(args) -> int:
    from transformers import AutoTokenizer

    from ptlm.model import load_model

    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise PtlmError("--temperature must be > 0 and --top-p in (0, 1]")
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_model(args.model, precision="fp32").to(device).eval()
    tok_src = args.tokenizer or args.model
    if not args.tokenizer and Path(args.model).is_dir() and \
            not (Path(args.model) / "tokenizer.json").exists():
        raise PtlmError(f"{args.model} has no tokenizer; pass --tokenizer (e.g. DATA/tokenizer)")
    tok = AutoTokenizer.from_pretrained(tok_src)
    text = generate(model, tok, args.prompt, args.max_new_tokens, args.sample,
                    args.temperature, args.top_p)
    print(args.prompt + text)
    return 0
