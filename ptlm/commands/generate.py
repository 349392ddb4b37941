"""`ptlm generate`: continue a prompt with a trained model."""

from __future__ import annotations

from pathlib import Path

import torch

from ptlm import hub
from ptlm.errors import PtlmError
from ptlm.run.tools.generate import generate


def add_arguments(p) -> None:
    p.add_argument("--model", required=True, help="HF folder (e.g. RUN/hf_model) or hub name")
    p.add_argument("--prompt", required=True)
    p.add_argument("--tokenizer", help="default: the model folder's tokenizer")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=0.8)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)


def run(args) -> int:
    from transformers import AutoTokenizer

    from ptlm.model.load import load_model

    if args.temperature <= 0 or not 0 < args.top_p <= 1:
        raise PtlmError("--temperature must be > 0 and --top-p in (0, 1]")
    torch.manual_seed(args.seed)
    hub.require("--model", args.model)  # offline: at once, not after transformers' retries
    if args.tokenizer:
        hub.require("--tokenizer", args.tokenizer, "tokenizer")
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
