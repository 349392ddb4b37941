"""Document-aware packing in a real run (ptlm.run with a DeepSpeed engine): the step's loss is
that of each document piece run alone through plain transformers (bench/matrix_reference.py),
the way each model takes the documents is recorded, and a resume cannot switch the packing."""

from __future__ import annotations

import json

import pytest
import torch

from bench.matrix_reference import Recipe, reference_run
from tests.support import losses, tiny_model, train

STEPS = 4
FP32_TOLERANCE = 2e-4  # the setting matrix's fp32 bound on the loss (docs/benchmarks.md)
FIRST_STEP_TOLERANCE = 1e-5  # step 1's loss, before any update: only summation order differs


@pytest.fixture(scope="module")
def gpt2_init(tmp_path_factory):
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("gpt2")
    tiny_model(root / "config", "gpt2")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(root / "config")).save_pretrained(
        root / "init")
    return root / "init"


@pytest.mark.parametrize("packing", ["documents", "stream"])
def test_gpt2_step_losses_equal_the_reference_with_accumulation(packing, gpt2_init, tmp_path,
                                                                demo_dataset):
    """One rank, micro-batch 4 x accumulation 2: each step's loss is the token mean over the
    global batch of the pieces alone (documents) or of whole blocks (stream), as plain PyTorch
    trains them; and the two differ, so the comparison can fail."""
    out = tmp_path / packing
    train(demo_dataset, out, gpt2_init, "--global-batch", 8, "--micro-batch", 4, "--max-steps",
          STEPS, "--packing", packing, "--no-export", scratch=False)
    reference = reference_run(gpt2_init, demo_dataset, Recipe(global_batch=8, steps=STEPS,
                                                               packing=packing))["losses"]
    other = reference_run(gpt2_init, demo_dataset, Recipe(
        global_batch=8, steps=STEPS, packing="stream" if packing == "documents" else "documents"))
    assert losses(out)[0] == pytest.approx(reference[0], abs=FIRST_STEP_TOLERANCE)
    assert losses(out) == pytest.approx(reference, abs=FP32_TOLERANCE)
    assert max(abs(a - b) for a, b in zip(reference, other["losses"])) > 10 * FP32_TOLERANCE


def test_packing_is_recorded_and_a_resume_cannot_change_it(tmp_path, demo_dataset):
    model = tiny_model(tmp_path / "opt")
    out = tmp_path / "run"
    common = ["--global-batch", 8, "--micro-batch", 8, "--no-export"]
    train(demo_dataset, out, model, *common, "--max-steps", 2, "--save-every", 1)
    engine = json.loads((out / "engine.json").read_text())
    assert engine["packing"]["packing"] == "documents"
    assert engine["packing"]["mechanism"] == "mask"  # OPT's code ignores position_ids
    assert "block-causal mask" in engine["packing"]["path"]
    assert json.loads((out / "run_config.json").read_text())["corpus"]["packing"] == "documents"
    r = train(demo_dataset, out, model, *common, "--max-steps", 3, "--packing", "stream",
              check=False)
    assert r.returncode != 0
    assert "--packing stream: the checkpoint's run trained with --packing documents" in r.stderr
    assert "Traceback" not in r.stderr


def test_a_model_that_cannot_keep_documents_apart_is_refused_at_setup(tmp_path, demo_dataset):
    """LFM2's convolutions reach into the previous document: a documents run stops before step 1
    with one line that names --packing stream (which then trains)."""
    from transformers import AutoModelForCausalLM

    from tests.families import FAMILIES

    init = tmp_path / "lfm2"
    AutoModelForCausalLM.from_config(FAMILIES["lfm2"]()).save_pretrained(init)
    common = ["--global-batch", 8, "--micro-batch", 8, "--max-steps", 1, "--no-export"]
    r = train(demo_dataset, tmp_path / "run", init, *common, scratch=False, check=False)
    assert r.returncode != 0
    assert "--packing stream" in r.stderr and "Traceback" not in r.stderr
    train(demo_dataset, tmp_path / "run", init, *common, "--packing", "stream", scratch=False)
