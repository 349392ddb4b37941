"""The training run end to end: real DeepSpeed engines on CPU ranks (DS_ACCELERATOR=cpu), real
HF models built from tiny configs, real Arrow data. Runs are subprocesses, as users launch them."""

from __future__ import annotations

import glob
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bench.matrix_reference import hf_val_perplexity
from ptlm.errors import PtlmError
from ptlm.run.machine import faults
from ptlm.run.machine.distributed import free_port
from tests.support import ROOT, losses, records, tiny_model, train


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {"opt": tiny_model(root / "opt"), "gpt2": tiny_model(root / "gpt2", "gpt2"),
            "opt_dropout": tiny_model(root / "optd", dropout=0.1)}


@pytest.fixture(scope="module")
def one_rank_opt(tmp_path_factory, demo_dataset, models):
    out = tmp_path_factory.mktemp("run") / "one"
    train(demo_dataset, out, models["opt"], "--global-batch", 8, "--micro-batch", 8)
    return out


def check_finished_run(out, data):
    evals = records(out, "eval")
    assert evals[0]["step"] == 0 and evals[0]["tag"] == "initial"
    assert [e["tag"] for e in evals].count("epoch") == 1
    steps = losses(out)
    assert steps[-1] < steps[0] - 0.3, "the loss did not fall"
    summary = json.loads((out / "summary.json").read_text())
    run = summary["run"]
    assert run["final_val_ppl"] < run["initial_val_ppl"]
    report = (out / "report.md").read_text()
    assert "| seq len | epochs |" in report and "| epoch | steps | train loss |" in report
    # the export loads in plain transformers and reproduces the run's final val perplexity
    ppl = hf_val_perplexity(out / "hf_model", data)  # each document piece alone
    assert ppl == pytest.approx(run["final_val_ppl"], rel=1e-4)
    cfg = json.loads((out / "hf_model" / "config.json").read_text())
    assert cfg["use_cache"] is True
    assert (out / "hf_model" / "model.safetensors").exists()
    assert (out / "hf_model" / "tokenizer.json").exists()


def test_one_rank_trains_evaluates_exports_and_reports(one_rank_opt, demo_dataset):
    check_finished_run(one_rank_opt, demo_dataset)
    assert (one_rank_opt / "loss.png").exists()
    plan = json.loads((one_rank_opt / "plan.json").read_text())
    ds = json.loads((one_rank_opt / "ds_config.json").read_text())
    assert plan["global_batch"] == 8 and ds["train_batch_size"] == 8
    assert "auto" not in json.dumps(ds)


def test_two_ranks_zero3_match_one_rank_step_by_step(tmp_path, demo_dataset, models):
    """A saved model (weights on disk) loaded partitioned by ZeRO-3 (zero.Init through
    HfDeepSpeedConfig) trains exactly like the same model on one rank."""
    from transformers import AutoConfig, AutoModelForCausalLM

    weights = tmp_path / "weights"
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(models["opt"])).save_pretrained(
        weights)
    one, out = tmp_path / "one", tmp_path / "z3"
    train(demo_dataset, one, weights, "--global-batch", 8, "--micro-batch", 8, scratch=False)
    train(demo_dataset, out, weights, "--global-batch", 8, "--micro-batch", 2, "--zero", 3,
          ranks=2, scratch=False)
    check_finished_run(out, demo_dataset)
    assert losses(out) == pytest.approx(losses(one), rel=1e-4)
    assert all(r["micro_batch"] == 2 for r in records(out, "train"))  # 2 x 2 ranks x accum 2


def test_two_ranks_zero2_gpt2(tmp_path, demo_dataset, models):
    one, two = tmp_path / "one", tmp_path / "two"
    port = free_port()
    train(demo_dataset, one, models["gpt2"], "--global-batch", 8, "--micro-batch", 8)
    train(demo_dataset, two, models["gpt2"], "--global-batch", 8, "--micro-batch", 4,
          "--zero", 2, ranks=2, port=port)
    check_finished_run(two, demo_dataset)
    assert losses(two) == pytest.approx(losses(one), rel=1e-4)
    # DeepSpeed's CPU backend made a ~66 MiB shared-memory segment per rank: none is left behind
    if os.path.isdir("/dev/shm"):
        assert not glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{port}_*")


@pytest.mark.slow
@pytest.mark.parametrize("zero, arch", [(0, "opt"), (2, "opt"), (0, "gpt2"), (3, "gpt2")])
def test_two_ranks_other_stages(tmp_path, demo_dataset, models, zero, arch):
    out = tmp_path / "run"
    train(demo_dataset, out, models[arch], "--global-batch", 8, "--micro-batch", 4,
          "--zero", zero, ranks=2)
    check_finished_run(out, demo_dataset)


def test_kill_and_resume_is_exact_across_an_epoch_boundary(tmp_path, demo_dataset, models):
    model = models["opt_dropout"]  # dropout on: the RNG state must be restored too
    common = ["--global-batch", 16, "--micro-batch", 8, "--epochs", 2, "--no-export"]
    full, cut = tmp_path / "full", tmp_path / "cut"
    train(demo_dataset, full, model, *common)
    per_epoch = len(records(full, "train")) // 2
    kill_at = per_epoch + 3  # past the epoch boundary, 1 step after the last checkpoint
    r = train(demo_dataset, cut, model, *common, "--save-every", per_epoch + 2, check=False,
              env={faults.KILL_AFTER_STEP_ENV: str(kill_at)})
    assert r.returncode == -9, r.stderr[-2000:]
    assert len(losses(cut)) == kill_at
    train(demo_dataset, cut, model, *common)  # --resume auto is the default
    assert losses(cut) == losses(full)  # identical, step by step, on CPU fp32
    assert [r["step"] for r in records(cut, "train")] == list(range(1, 2 * per_epoch + 1))
    epochs = lambda out: [{k: v for k, v in e.items() if k != "time_s"}
                          for e in json.loads((out / "summary.json").read_text())["epochs"]]
    assert epochs(cut) == epochs(full) and len(epochs(full)) == 2


@pytest.mark.parametrize("zero", [0, 2])
def test_resume_on_fewer_ranks_continues_the_same_batches(tmp_path, demo_dataset, models,
                                                           one_rank_opt, zero):
    """2 ranks killed, resumed on 1 with the same global batch: the same losses as a 1-rank run.
    ZeRO-2's partitioned optimizer states go through DeepSpeed's universal checkpoint."""
    out = tmp_path / "two_then_one"
    r = train(demo_dataset, out, models["opt"], "--global-batch", 8, "--micro-batch", 4,
              "--zero", zero, "--save-every", 10, "--no-export", ranks=2, check=False,
              env={faults.KILL_AFTER_STEP_ENV: "12"})
    assert r.returncode != 0
    r = train(demo_dataset, out, models["opt"], "--global-batch", 8, "--micro-batch", 8,
              "--zero", zero)
    assert ("universal" in r.stderr) == (zero > 0)
    assert losses(out) == pytest.approx(losses(one_rank_opt), rel=1e-4)


def test_oom_backoff_keeps_the_global_batch(tmp_path, demo_dataset, models, one_rank_opt):
    out = tmp_path / "oom"
    train(demo_dataset, out, models["opt"], "--global-batch", 8, "--micro-batch", 4, "--zero",
          2, "--max-steps", 6, "--no-export", ranks=2, env={faults.OOM_ENV: "3"})
    backoff = records(out, "oom_backoff")
    assert backoff == [{"kind": "oom_backoff", "step": 2, "micro_batch": 2, "grad_accum": 2}]
    assert [r["micro_batch"] for r in records(out, "train")] == [4, 4, 2, 2, 2, 2]
    # the same blocks per step as the one-rank run: the same losses (until the LR schedules
    # differ: that run plans a whole epoch, this one 6 steps, so compare the warm-up-free start)
    assert losses(out)[:2] == pytest.approx(losses(one_rank_opt)[:2], rel=1e-4)


def test_overfit_docs_learns(tmp_path, demo_dataset, models):
    out = tmp_path / "overfit"
    train(demo_dataset, out, models["opt"], "--overfit-docs", 2, "--global-batch", 4,
          "--micro-batch", 4, "--epochs", 60, "--schedule", "constant", "--warmup-steps", 0,
          "--no-export")
    assert losses(out)[-1] < 0.5
    assert records(out, "eval")[-1]["val_loss"] < 0.5


# ------------------------------------------------------------------ bad inputs, before training

def make_cfg(data, out, model, **kw):
    from ptlm.run.config import RunConfig

    return RunConfig.from_flat(dict(model=str(model), data=data, out=out, from_scratch=True,
                                    **kw))


def test_seq_len_above_positions_fails_before_training(tmp_path, demo_dataset):
    from ptlm.data.reader import PackedDataset
    from ptlm.run.preflight import model_source

    model = tiny_model(tmp_path / "short", positions=32)  # the data's blocks are 64 tokens
    with pytest.raises(PtlmError, match="seq_len 64 is above the 32 positions"):
        model_source(str(model), True, PackedDataset(demo_dataset))


def test_tokenizer_mismatch_fails(tmp_path, demo_dataset, shared_gpt2_tokenizer):
    from ptlm.data.reader import PackedDataset
    from ptlm.run.preflight import check_tokenizer

    cfg = make_cfg(demo_dataset, tmp_path / "o", "opt-125m", tokenizer=str(shared_gpt2_tokenizer))
    with pytest.raises(PtlmError, match="is not the tokenizer"):
        check_tokenizer(cfg, PackedDataset(demo_dataset))
    check_tokenizer(make_cfg(demo_dataset, tmp_path / "o", "opt-125m",
                             tokenizer=str(demo_dataset / "tokenizer")), PackedDataset(demo_dataset))


def test_pretrained_model_with_a_smaller_vocab_is_refused_or_resized_when_allowed(tmp_path,
                                                                                 demo_dataset):
    """A 500-row model on 1024-token data: refused before step 1 (check_tokenizer); with
    --allow-new-tokenizer the embeddings are resized (tests/test_reliability.py has the rest)."""
    from transformers import OPTConfig, OPTForCausalLM

    from ptlm.data.reader import PackedDataset
    from ptlm.run.engine import setup_model
    from ptlm.run.preflight import check_tokenizer, model_source

    small = tmp_path / "small"
    OPTForCausalLM(OPTConfig(vocab_size=500, hidden_size=32, num_hidden_layers=1, ffn_dim=64,
                             num_attention_heads=2, max_position_embeddings=128,
                             word_embed_proj_dim=32)).save_pretrained(small)
    cfg = make_cfg(demo_dataset, tmp_path / "o", small)
    cfg.what.from_scratch = False
    data = PackedDataset(demo_dataset)
    with pytest.raises(PtlmError, match="1,024 tokens, the model .* has 500 embedding rows"):
        check_tokenizer(cfg, data)
    cfg.what.allow_new_tokenizer = True
    check_tokenizer(cfg, data)
    model = setup_model(model_source(str(small), False, data), "fp32", None)
    assert model.get_input_embeddings().weight.shape[0] >= 1024


def test_missing_data_and_bad_flags_fail_clearly(tmp_path, models):
    r = train(tmp_path / "nothing", tmp_path / "o", models["opt"], check=False)
    assert r.returncode == 2 and "prepare the data first" in r.stderr
    assert "Traceback" not in r.stderr
    with pytest.raises(PtlmError, match="--epochs must be >= 1"):
        make_cfg(tmp_path, tmp_path, "x", epochs=0)


def test_yaml_config_adamw8bit_and_linear_schedule(tmp_path, demo_dataset, models):
    """A YAML run config (flags win), bitsandbytes AdamW8bit as DeepSpeed's client optimizer."""
    out = tmp_path / "yaml"
    cfg = tmp_path / "run.yaml"
    cfg.write_text(f"model: {models['opt']}\ndata: {demo_dataset}\nout: {out}\n"
                   "from_scratch: true\nglobal_batch: 8\nmax_steps: 4\nschedule: linear\n"
                   "lr: 0.001\nexport: false\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu"}
    r = subprocess.run([sys.executable, "launch/train.py", "--config", str(cfg), "--optimizer",
                        "adamw8bit", "--lr", "0.002"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    saved = json.loads((out / "run_config.json").read_text())
    assert saved["sched"]["schedule"] == "linear" and saved["optim"]["lr"] == 0.002  # flag won
    assert saved["forced"]["optimizer"] == "adamw8bit" and saved["what"]["from_scratch"] is True
    assert json.loads((out / "plan.json").read_text())["setting"]["optimizer"] == "adamw8bit"
    assert len(losses(out)) == 4
    cfg.write_text("modle: x\n")
    r = subprocess.run([sys.executable, "launch/train.py", "--config", str(cfg)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "unknown keys ['modle']" in r.stderr


def test_ds_config_template_is_filled_from_the_plan_or_refused(tmp_path, demo_dataset, models):
    out = tmp_path / "tpl"
    train(demo_dataset, out, models["opt"], "--ds-config", "zero0.json", "--global-batch", 8,
          "--max-steps", 2, "--no-export")
    ds = json.loads((out / "ds_config.json").read_text())
    assert "auto" not in json.dumps(ds) and ds["train_batch_size"] == 8
    assert ds["zero_optimization"]["stage"] == 0
    # a template that contradicts the forced plan (ZeRO-3 template, --zero 2) stops before training
    r = train(demo_dataset, tmp_path / "bad", models["opt"], "--ds-config", "zero3.json",
              "--zero", 2, "--max-steps", 2, check=False)
    assert r.returncode == 2 and "zero_optimization.stage" in r.stderr
    assert not (tmp_path / "bad" / "metrics.jsonl").exists()


def test_grad_norm_of_loss_scaled_fp16_gradients_is_finite():
    """At ZeRO-0 ptlm reads the norm from the parameters' .grad itself; under fp16 they still carry
    the loss scale there (65,536 at the start), where an fp16 sum of squares overflows: the
    first fp16 ZeRO-0 step reported an infinite norm. Reference: the fp32 norm, then unscaled."""
    from torch import nn

    from ptlm.run.step import grad_norm

    torch.manual_seed(0)
    model = nn.Linear(64, 64).half()
    grads = [torch.randn(p.shape) * 0.05 * 65536 for p in model.parameters()]
    for p, g in zip(model.parameters(), grads):
        p.grad = g.half()
    want = math.sqrt(sum(float((g.half().float() ** 2).sum()) for g in grads))
    assert want > torch.finfo(torch.float16).max  # the case: beyond fp16's range
    assert grad_norm(model) == pytest.approx(want, rel=1e-5)
