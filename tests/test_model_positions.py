"""ptlm.model.positions: one rule for a length above a model's positions. The rule is checked
against what plain transformers does with such a length: a model whose forward fails past its
positions (a learned table) is refused, one whose forward runs (rotary, no table) is warned."""

from __future__ import annotations

import logging
import subprocess
import sys

import pytest
import torch
import transformers

from ptlm.errors import PtlmError
from ptlm.model.positions import check_length, learned_position_table
from tests.families import FAMILIES
from tests.support import DEMO_CORPUS, ROOT, tiny_gpt2, tiny_opt

POSITIONS = 32
LONGER = POSITIONS + 8


def short(name: str):
    """The family's small config with POSITIONS positions."""
    if name == "opt":
        return tiny_opt(positions=POSITIONS)
    if name == "gpt2":
        return tiny_gpt2(positions=POSITIONS)
    config = FAMILIES[name]()
    config.max_position_embeddings = POSITIONS
    return config


def plain_forward_runs(config, length: int) -> bool:
    """The reference: does plain HF run a forward of `length` tokens?"""
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    try:
        with torch.no_grad():
            model(torch.randint(0, 100, (1, length)))
        return True
    except (IndexError, RuntimeError):
        return False


@pytest.mark.parametrize("name", ["opt", "gpt2", "llama", "qwen3", "gpt_neox"])
def test_refused_exactly_where_plain_transformers_cannot_run(name, caplog):
    config = short(name)
    runs = plain_forward_runs(config, LONGER)
    assert learned_position_table(config) == (not runs)
    with caplog.at_level(logging.WARNING, logger="ptlm.model.positions"):
        if runs:
            check_length(config, LONGER, f"--seq-len {LONGER}", "model m", lambda n: "fix")
            assert f"--seq-len {LONGER} is above the {POSITIONS} positions of model m" in \
                caplog.text and "rope scaling" in caplog.text
        else:
            with pytest.raises(PtlmError, match=rf"--seq-len {LONGER} is above the {POSITIONS} "
                                                rf"positions of model m .*; use {POSITIONS}"):
                check_length(config, LONGER, f"--seq-len {LONGER}", "model m",
                             lambda n: f"use {n}")
    caplog.clear()
    check_length(config, POSITIONS, "--seq-len 32", "model m", lambda n: "fix")  # at the limit
    assert not caplog.text


def test_a_learned_and_a_rotary_family_are_both_among_the_cases():
    """The parametrized rule test sees both outcomes (else it could not fail either way)."""
    assert plain_forward_runs(short("llama"), LONGER)
    assert not plain_forward_runs(short("opt"), LONGER)


def test_prepare_warns_for_a_rotary_model_and_refuses_a_learned_table(tmp_path, demo_tokenizer):
    """`ptlm prepare --model`: past a rotary model's positions the data is written with a
    warning; past OPT's learned table nothing is written."""
    for name, ok in (("llama", True), ("opt", False)):
        model = tmp_path / name
        short(name).save_pretrained(model)
        out = tmp_path / f"out-{name}"
        r = subprocess.run([sys.executable, "-m", "ptlm", "prepare", str(DEMO_CORPUS),
                            "--tokenizer", str(demo_tokenizer), "--seq-len", str(LONGER),
                            "--model", str(model), "--out", str(out)],
                           cwd=ROOT, capture_output=True, text=True, timeout=300)
        message = f"--seq-len {LONGER} is above the {POSITIONS} positions of model {model}"
        assert message in r.stderr, r.stderr[-2000:]
        assert (r.returncode == 0) == ok and (out / "manifest.json").exists() == ok, r.stderr
