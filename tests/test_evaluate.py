import json
import math
import os
import subprocess
import sys

import pytest
import torch

from ptlm.data.reader import PackedDataset
from ptlm.run.evaluate import evaluate_blocks, evaluate_text, model_forward
from tests.support import ROOT


def _saved(folder, config, demo_dataset):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    for f in (demo_dataset / "tokenizer").iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, demo_dataset):
    from transformers import OPTConfig

    return _saved(tmp_path_factory.mktemp("m"), OPTConfig(
        vocab_size=1024, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=2,
        max_position_embeddings=128, word_embed_proj_dim=32), demo_dataset)


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory, demo_dataset, model_dir):
    """OPT (an explicit mask), GPT-2 and a Llama (position_ids): the three ways the issue names."""
    from transformers import GPT2Config, LlamaConfig

    return {"opt": model_dir,
            "gpt2": _saved(tmp_path_factory.mktemp("gpt2"), GPT2Config(
                vocab_size=1024, n_embd=32, n_layer=2, n_head=2, n_positions=128), demo_dataset),
            "llama": _saved(tmp_path_factory.mktemp("llama"), LlamaConfig(
                vocab_size=1024, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128),
                demo_dataset)}


def hf_nll(model, ids, labels):
    """Plain transformers: the model's own mean loss, times the number of scored tokens."""
    out = model(input_ids=ids, labels=labels)
    n = int((labels[:, 1:] != -100).sum())
    return out.loss.item() * n, n


@pytest.mark.parametrize("family, packing", [("opt", "documents"), ("opt", "stream"),
                                             ("gpt2", "documents"), ("llama", "documents")])
def test_blocks_equal_plain_hf_and_do_not_depend_on_ranks(family_dirs, demo_dataset, family,
                                                          packing):
    """documents: each document piece run alone through plain transformers (positions from 0);
    stream: each block whole. Either way, as ptlm eval scores them, on 1 and 3 "ranks"."""
    from transformers import AutoModelForCausalLM

    from bench.matrix_reference import block_pieces, pieces_nll

    model = AutoModelForCausalLM.from_pretrained(family_dirs[family]).eval()
    ds = PackedDataset(demo_dataset, "val", packing=packing)
    nll = n = 0
    with torch.no_grad():
        for i, pieces in enumerate(block_pieces(demo_dataset, "val", packing)):
            a, b = pieces_nll(model, ds[i], pieces)
            nll, n = nll + float(a), n + b
    if packing == "documents":  # the val split's blocks do hold several documents
        assert n < len(ds) * (ds.seq_len - 1)
    ours = evaluate_blocks(model_forward(model, packing=packing), ds, micro_batch=3)
    assert ours.tokens == n
    assert ours.loss == pytest.approx(nll / n, rel=1e-5)
    # three "ranks" (slices summed by hand, as all_reduce would): the same sums
    parts = [evaluate_blocks(model_forward(model, packing=packing), ds, 2, rank=r, world_size=3)
             for r in range(3)]
    assert sum(p.tokens for p in parts) == n
    assert sum(p.loss * p.tokens for p in parts) == pytest.approx(nll, rel=1e-5)


def test_sliding_window_equals_the_hf_guide(model_dir):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    ids = torch.randint(0, 1024, (300,), generator=torch.Generator().manual_seed(0))
    max_length, stride = 128, 50
    # the HF perplexity guide's loop, written out
    nll = n = prev_end = 0
    with torch.no_grad():
        for begin in range(0, ids.numel(), stride):
            end = min(begin + max_length, ids.numel())
            trg = end - prev_end
            x = ids[begin:end][None]
            y = x.clone()
            y[:, :-trg] = -100
            a, b = hf_nll(model, x, y)
            nll, n, prev_end = nll + a, n + b, end
            if end == ids.numel():
                break
    ours = evaluate_text(model, ids, max_length, stride)
    assert ours.tokens == n == ids.numel() - 1
    assert ours.loss == pytest.approx(nll / n, rel=1e-5)


def cli(*args):
    return subprocess.run([sys.executable, "-m", "ptlm.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_eval_and_generate_commands(model_dir, demo_dataset, tmp_path):
    r = cli("eval", "--model", model_dir, "--data", demo_dataset, "--json")
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["tokens"] > 0 and res["ppl"] == pytest.approx(math.exp(res["loss"]))
    text = tmp_path / "t.txt"
    text.write_text("A cidade acorda cedo e o rio corre para o mar. " * 10, encoding="utf-8")
    r = cli("eval", "--model", model_dir, "--text", text, "--max-length", 32, "--stride", 16)
    assert r.returncode == 0 and "perplexity" in r.stdout, r.stderr
    r = cli("generate", "--model", model_dir, "--prompt", "A cidade", "--max-new-tokens", 5)
    assert r.returncode == 0 and r.stdout.startswith("A cidade"), r.stderr
    r = cli("generate", "--model", model_dir, "--prompt", "A cidade", "--sample", "--top-p", 2)
    assert r.returncode == 2 and "--top-p" in r.stderr
