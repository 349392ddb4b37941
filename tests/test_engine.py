"""One engine builder (ptlm.run.engine) for training and `ptlm probe`; rank 0's plan on every rank;
ZeRO-3's partitioned parameters seen at their real shapes (weight decay, vocabulary check)."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import pytest
import torch

from bench.common import run_bounded
from ptlm.errors import PtlmError
from ptlm.plan import probe_cache
from ptlm.run.machine.distributed import free_port, shutdown
from tests.support import ROOT
from tests.support import losses, tiny_model, train

PADDED_VOCAB = 1032  # the demo data's tokenizer has 1024 ids: a padded table, as OPT's 50,272


# ------------------------------------------------------------------ rank 0 decides the plan

def _plan_on_rank(rank: int, port: int, data: str, out: str, model: str, tmp: str) -> None:
    """One of two gloo ranks whose machines differ: rank 1 sees twice rank 0's host RAM
    and a probe cache of its own that says only micro-batch 1 fits."""
    import dataclasses

    from ptlm.commands import probe as probe_cmd
    from ptlm.run.machine import hardware
    from ptlm.run import preflight
    from ptlm.run.config import RunConfig

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")
    os.environ[probe_cache.CACHE_ENV] = os.path.join(tmp, f"cache{rank}")
    real = hardware.detect()
    host = real.host_memory_bytes if rank == 0 else real.host_memory_bytes * 2
    hardware.detect = lambda: dataclasses.replace(real, host_memory_bytes=host)
    cfg = RunConfig.from_flat({"model": model, "data": data, "out": out, "from_scratch": True,
                               "global_batch": 16})
    from ptlm.data.reader import PackedDataset

    source = preflight.model_source(model, True, PackedDataset(data, "train"))
    if rank == 1:  # this rank's own probe cache: micro-batch 1 is the largest that fits
        mine = preflight.plan_for(model, source.config, 64, 16, cfg.forced, 2, False)
        hw = mine.hardware
        probe_cache.write_cache(probe_cache.cache_key(model, hw.gpu_name, hw.gpu_memory_bytes,
                                                      64, mine.setting, 2, documents=True),
                                {"largest_micro_batch": 1})
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2)
    try:
        trained = preflight.resolve_plan(cfg, source.config, 64, 2, False)
        args = argparse.Namespace(model=model, global_batch=16, precision=None, zero=None,
                                  offload=None, checkpointing=None, optimizer=None,
                                  chunked_loss=None, micro_batch=None, packing="documents")
        probed = probe_cmd.probe_plan(args, source, 64, 2, False)

        def fail():
            assert rank == 0, "only rank 0 decides"
            raise PtlmError("no plan fits")

        with pytest.raises(PtlmError, match="no plan fits"):  # on every rank: none waits forever
            preflight.rank0_plan(fail)
    finally:
        # the product's teardown: every rank past its last collective, then the groups destroyed
        # (left to interpreter exit, gloo's threads can abort the process: exit -6)
        shutdown()
    with open(os.path.join(tmp, f"rank{rank}.json"), "w") as f:
        json.dump({"train": trained.to_dict(), "probe": probed.to_dict()}, f)


def test_every_rank_uses_rank0s_plan(tmp_path, demo_dataset):
    model = tiny_model(tmp_path / "m")
    port = free_port()
    ctx = torch.multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_plan_on_rank, args=(r, port, str(demo_dataset),
                                                     str(tmp_path / "out"), str(model),
                                                     str(tmp_path)))
             for r in range(2)]
    for p in procs:
        p.start()
    deadline = time.time() + 240
    while any(p.is_alive() for p in procs) and time.time() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            break  # one rank failed: the other would wait for it in a collective
        time.sleep(0.2)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0]
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2))
    assert rank1 == rank0
    assert rank0["train"]["micro_batch"] > 1  # rank 1's own cache would have said 1
    assert rank1["probe"]["hardware"] == rank0["probe"]["hardware"]


# ------------------------------------------------------------------ ZeRO-3 against ZeRO-0

DECAY_RUN = ["--global-batch", 8, "--max-steps", 12, "--epochs", 5, "--schedule", "constant",
             "--warmup-steps", 0, "--eval-max-blocks", 2]


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny OPT with weights on disk (every run starts from the same ones) and a padded
    vocabulary: 1032 rows for the demo data's 1024 ids."""
    from transformers import AutoConfig, AutoModelForCausalLM

    root = tmp_path_factory.mktemp("weights")
    config = AutoConfig.from_pretrained(tiny_model(root / "config"))
    config.vocab_size = PADDED_VOCAB
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "opt")
    return root / "opt"


@pytest.fixture(scope="module")
def zero3_decay(tmp_path_factory, demo_dataset, weights):
    out = tmp_path_factory.mktemp("z3") / "run"
    train(demo_dataset, out, weights, *DECAY_RUN, "--weight-decay", 0.5, "--zero", 3,
          "--micro-batch", 2, ranks=2, scratch=False)
    return out


def exported(out) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(out / "hf_model" / "model.safetensors")


def distance(a: dict, b: dict) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_zero3_decays_the_matrices_as_zero0_does(tmp_path, demo_dataset, weights, zero3_decay):
    """Weight decay 0.5 for 12 steps from the same weights: the ZeRO-3 export (2 ranks) ends
    where ZeRO-0 ends, not where a run without weight decay ends."""
    zero0, nodecay = tmp_path / "z0", tmp_path / "nowd"
    train(demo_dataset, zero0, weights, *DECAY_RUN, "--weight-decay", 0.5, "--micro-batch", 8,
          scratch=False)
    train(demo_dataset, nodecay, weights, *DECAY_RUN, "--weight-decay", 0, "--micro-batch", 8,
          scratch=False)
    z3, z0, nowd = exported(zero3_decay), exported(zero0), exported(nodecay)
    assert set(z3) == set(z0)
    assert losses(zero3_decay) == pytest.approx(losses(zero0), rel=1e-4)
    assert distance(nowd, z0) > 1e-3  # what weight decay moves in 12 steps (6e-3 here)
    assert distance(z3, z0) < 1e-4  # (8e-6 here; a ZeRO-3 run without decay on matrices: 3e-2)


def test_zero3_keeps_a_padded_vocabulary(zero3_decay):
    """1032 rows for data of 1024 ids: never resized (un-partitioned, shrunk) under ZeRO-3."""
    from transformers import AutoConfig

    assert exported(zero3_decay)["model.decoder.embed_tokens.weight"].shape[0] == PADDED_VOCAB
    assert AutoConfig.from_pretrained(zero3_decay / "hf_model").vocab_size == PADDED_VOCAB
    assert json.loads((zero3_decay / "engine.json").read_text())["embedding_rows"] == PADDED_VOCAB


# ------------------------------------------------------------------ the probe's engine

def test_the_probe_builds_the_engine_training_builds(tmp_path, demo_dataset, weights,
                                                      zero3_decay):
    """`ptlm probe` on the run's data and flags: the same DeepSpeed config, the same model
    (parameter count and embedding rows under ZeRO-3), the same optimizer as the run's."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu",
           probe_cache.CACHE_ENV: str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    r = run_bounded([sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                     "--master_port", str(free_port()), "launch/probe.py", "--model",
                     str(weights), "--data", str(demo_dataset), "--global-batch", "8",
                     "--zero", "3", "--micro-batch", "2", "--lr", "3e-3", "--weight-decay",
                     "0.5", "--json"],
                    timeout=300, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    (entry,) = json.loads((tmp_path / "cache" / "probe.json").read_text()).values()
    trained = json.loads((zero3_decay / "engine.json").read_text())
    # the run's optimizer flags (--lr 3e-3 --weight-decay 0.5) given to the probe too: the
    # whole DeepSpeed config is one, optimizer block included
    assert trained["ds_config"]["optimizer"]["params"]["lr"] == 3e-3
    assert entry["engine"]["ds_config"] == json.loads((zero3_decay / "ds_config.json").read_text())
    assert entry["engine"] == trained
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(weights)  # plain HF, whole, on one process
    assert trained["parameters"] == sum(p.numel() for p in plain.parameters())
    assert trained["embedding_rows"] == PADDED_VOCAB


# ------------------------------------------------------------------ one DeepSpeed config

def test_the_written_deepspeed_config_is_the_one_the_engine_is_built_with(tmp_path,
                                                                           demo_dataset):
    """`ptlm plan --write-ds-config` writes the config a run with that plan (and the same
    optimizer flags) builds its DeepSpeed engine with: its ds_config.json and engine.json's."""
    model = tiny_model(tmp_path / "m")
    plan_file, written = tmp_path / "plan.json", tmp_path / "ds.json"
    r = subprocess.run([sys.executable, "-m", "ptlm", "plan", "--model", str(model), "--seq-len",
                        "64", "--global-batch", "8", "--gpus", "1", "--gpu-memory", "16GiB",
                        "--host-memory", "64GiB", "--precision", "fp32", "--zero", "2",
                        "--micro-batch", "4", "--lr", "3e-3", "--weight-decay", "0.05",
                        "--write-ds-config", str(written), "--json"],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    plan_file.write_text(r.stdout)
    out = tmp_path / "run"
    train(demo_dataset, out, model, "--plan", plan_file, "--weight-decay", 0.05, "--max-steps", 1,
          "--eval-max-blocks", 1, "--no-export")  # betas, eps, clipping: both sides' defaults
    config = json.loads(written.read_text())
    assert config["zero_optimization"]["stage"] == 2
    assert config["optimizer"]["params"]["lr"] == 3e-3
    assert json.loads((out / "ds_config.json").read_text()) == config
    assert json.loads((out / "engine.json").read_text())["ds_config"] == config


# ------------------------------------------------------------------ fp16 at ZeRO-0: the loss scale

FP16_ZERO0_SCRIPT = """
import json, sys, torch
from deepspeed.runtime.engine import DeepSpeedEngine
from transformers import AutoModelForCausalLM, OPTConfig
from ptlm.plan.dsconfig import OptimizerHyper
from ptlm.plan.setting import Forced
from ptlm.run.machine import distributed
from ptlm.run import preflight
from ptlm.run.engine import build_engine, gradient_scale

model_dir, behaviours = sys.argv[1], sys.argv[2].split(",")
config = OPTConfig(vocab_size=256, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                   num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32,
                   dropout=0.0, attention_dropout=0.0)
torch.manual_seed(0)
AutoModelForCausalLM.from_config(config).save_pretrained(model_dir)
distributed.init()  # one plain process: rank 0 of 1
plan = preflight.plan_for(model_dir, config, 32, 4, Forced(precision="fp16", zero=0,
                         offload="none", optimizer="adamw", chunked_loss=True,
                         checkpointing=False), 1, on_gpu=False, use_probe_cache=False)
ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))

# The reference: plain transformers in fp32 on the same (fp16-rounded) weights.
ref = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float16).float()
ref(input_ids=ids, labels=ids).loss.backward()

# The one seam: DeepSpeed's engine.backward as other DeepSpeed versions behave for the fp16
# ZeRO-0 wrapper. "installed": this DeepSpeed as it is (0.19: the loss is not scaled).
installed = DeepSpeedEngine.backward


def inline(self, loss, retain_graph=False, scale_wrt_gas=True):
    # DeepSpeed PR #8393 landed as an inline multiply by the wrapper's loss scale
    scale = self.optimizer.loss_scale
    return installed(self, loss.float() * scale, retain_graph, scale_wrt_gas) / scale


def via_wrapper(self, loss, retain_graph=False, scale_wrt_gas=True):
    # older DeepSpeed: the fp16 wrapper's own backward() scales the loss and backpropagates
    # (the flag: 0.19's forward hooks allow a backward only inside engine.backward)
    loss = loss / self.gradient_accumulation_steps() if scale_wrt_gas else loss
    self._running_engine_backward = True
    try:
        self.optimizer.backward(loss, retain_graph=retain_graph)
    finally:
        self._running_engine_backward = False
    if self.enable_backward_allreduce:
        self.allreduce_gradients()
    return loss


out = {}
for behaviour in behaviours:
    DeepSpeedEngine.backward = {"installed": installed, "inline": inline,
                                "wrapper": via_wrapper}[behaviour]
    built = build_engine(plan, preflight.ModelSource(spec=model_dir, config=config),
                         OptimizerHyper(lr=1e-3))
    mean, _, _ = built.engine(ids)
    built.engine.backward(mean)
    row = out[behaviour] = {"scale": gradient_scale(built.engine),
                            "wrapper": type(built.engine.optimizer).__name__}
    for name in ("model.decoder.layers.0.fc1.weight", "model.decoder.embed_tokens.weight"):
        got = dict(built.model.named_parameters())[name].grad.float()
        want = dict(ref.named_parameters())[name].grad
        row[name] = {"factor": float((got * want).sum() / (want * want).sum()),
                     "cos": float(torch.nn.functional.cosine_similarity(got.flatten(),
                                                                        want.flatten(), 0))}
print("RESULT", json.dumps(out))
distributed.shutdown()
"""

# How DeepSpeed's engine.backward may treat the fp16 ZeRO-0 wrapper's loss scale (see the script).
DEEPSPEED_BACKWARDS = ("installed", "inline", "wrapper")


def fp16_env() -> dict:
    """A test process's environment for fp16 on this CPU (see tests/cpu_fp16/sitecustomize.py)."""
    from bench.matrix_reference import cpu_fp16_supported

    path = str(ROOT) if cpu_fp16_supported() else os.pathsep.join(
        [str(ROOT / "tests" / "cpu_fp16"), str(ROOT)])
    env = {**os.environ, "PYTHONPATH": path, "PTLM_TEST_CPU_FP16": "1", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "MASTER_PORT": str(free_port())}
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(k, None)
    return env


def test_fp16_zero0_gradients_carry_the_loss_scale_once(tmp_path):
    """DeepSpeed's fp16 ZeRO-0 wrapper divides the gradients by its loss scale at step(), but
    DeepSpeed 0.19's engine.backward never multiplied the loss by it: the gradients arrived
    65,536x too small (and the small ones underflowed to zero in fp16). Measured against plain
    transformers' fp32 gradients on the same weights: they must carry the scale exactly once,
    with this DeepSpeed as installed and with engine.backward behaving as older DeepSpeed did
    (the wrapper's backward scales) or as DeepSpeed PR #8393 may land (an inline multiply).
    Unscaled the factor is 1; scaled twice, the scale squared."""
    r = subprocess.run([sys.executable, "-c", FP16_ZERO0_SCRIPT, str(tmp_path / "model"),
                        ",".join(DEEPSPEED_BACKWARDS)],
                       cwd=ROOT, env=fp16_env(), capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-4000:]
    out = json.loads(r.stdout.split("RESULT", 1)[1])
    assert set(out) == set(DEEPSPEED_BACKWARDS)
    for behaviour, row in out.items():
        assert row["wrapper"] in ("FP16_UnfusedOptimizer", "FP16_Optimizer")
        assert row["scale"] >= 2 ** 8  # a dynamic loss scale, not 1
        for name in ("model.decoder.layers.0.fc1.weight", "model.decoder.embed_tokens.weight"):
            assert row[name]["cos"] > 0.99, (behaviour, row)
            assert row[name]["factor"] == pytest.approx(row["scale"], rel=0.02), (behaviour, row)
