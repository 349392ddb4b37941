"""`ptlm plan` end to end through the CLI dispatcher, plus the shared Setting flags."""

from __future__ import annotations

import argparse
import json

import pytest
import torch
import transformers

from ptlm import cli
from ptlm.commands.flags import add_setting_arguments, forced_from_args
from ptlm.errors import PtlmError
from ptlm.plan.setting import Forced, Setting

T4_ARGS = ["--gpu", "T4", "--host-memory", "64GiB"]


def run_plan(capsys, *args):
    rc = cli.main(["plan", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_text_output_shows_choice_breakdown_and_why(capsys):
    rc, out, _ = run_plan(capsys, "--model", "opt-125m", "--seq-len", "1024", "--global-batch", "16",
                          *T4_ARGS)
    assert rc == 0
    assert "Chosen: fp16" in out  # no bf16 on a T4
    for label in ("parameters", "optimizer states", "activations", "loss / logits",
                  "CUDA context", "= total", "host RAM per node", "Why:"):
        assert label in out


def test_text_output_says_which_packing_it_planned_for(capsys):
    """The plan's memory depends on the packing (documents: a mask or its copies); the printed
    plan names it, as --json's job.documents does."""
    for packing in ("documents", "stream"):
        rc, out, _ = run_plan(capsys, "--model", "opt-125m", "--seq-len", "1024",
                              "--global-batch", "16", *T4_ARGS, "--packing", packing)
        assert rc == 0 and f"global batch 16, {packing} packing" in out.splitlines()[1], out
    _, out, _ = run_plan(capsys, "--model", "opt-125m", "--seq-len", "1024", *T4_ARGS)
    assert "documents packing" in out  # the default


def test_json_output(capsys):
    rc, out, _ = run_plan(capsys, "--model", "opt-125m", "--seq-len", "1024", "--global-batch", "16",
                          *T4_ARGS, "--json")
    assert rc == 0
    d = json.loads(out)
    assert d["micro_batch"] * d["grad_accum"] * d["world_size"] == d["global_batch"] == 16
    assert d["setting"]["micro_batch"] == d["micro_batch"]
    breakdown = d["chosen"]["memory"]
    assert d["peak_gpu_bytes"] == breakdown["gpu_total"] <= d["hardware"]["gpu_memory_bytes"]
    for key in ("parameters", "gradients", "optimizer_states", "activations", "loss"):
        assert key in breakdown
    Setting(**d["setting"])  # a valid Setting


def test_forced_flags_reach_the_plan(capsys):
    rc, out, _ = run_plan(capsys, "--model", "opt-125m", "--seq-len", "512", "--global-batch", "32",
                          "--gpu", "A100-40GB", "--gpus", "4", "--host-memory", "340GiB",
                          "--zero", "3", "--checkpointing", "on", "--chunked-loss", "off",
                          "--micro-batch", "2", "--json")
    assert rc == 0
    s = json.loads(out)["setting"]
    assert (s["zero"], s["checkpointing"], s["chunked_loss"], s["micro_batch"]) == (3, True, False, 2)


def test_model_that_cannot_fit_exits_with_a_message(capsys):
    rc, out, err = run_plan(capsys, "--model", "opt-13b", "--seq-len", "1024", "--global-batch", "16",
                            *T4_ARGS)
    assert rc == 2 and out == ""
    assert "does not fit" in err and "Options:" in err


def test_custom_gpu_by_memory(capsys):
    rc, out, _ = run_plan(capsys, "--model", "gpt2", "--seq-len", "1024", "--gpus", "2",
                          "--gpu-memory", "24GiB", "--no-bf16", "--host-memory", "64GiB", "--json")
    d = json.loads(out)
    assert rc == 0
    assert d["hardware"]["gpu_memory_bytes"] == 24 * 2**30 and d["world_size"] == 2
    assert d["setting"]["precision"] != "bf16"
    assert any("relative" in n for n in d["notes"])  # unknown GPU: throughput is relative


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_no_gpu_here_and_none_named(capsys):
    rc, _, err = run_plan(capsys, "--model", "opt-125m", "--seq-len", "1024")
    assert rc == 2 and "no CUDA GPU detected" in err and "--gpu T4" in err


def test_local_config_folder(capsys, tmp_path):
    transformers.OPTConfig(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4,
                           vocab_size=8192, max_position_embeddings=512,
                           word_embed_proj_dim=256).save_pretrained(tmp_path)
    rc, out, _ = run_plan(capsys, "--model", str(tmp_path), "--seq-len", "512", *T4_ARGS, "--json")
    assert rc == 0 and json.loads(out)["model"]["hidden"] == 256


def test_unknown_gpu_name(capsys):
    rc, _, err = run_plan(capsys, "--model", "opt-125m", "--seq-len", "1024", "--gpu", "GTX 480")
    assert rc == 2 and "unknown GPU" in err and "T4" in err


def test_write_ds_config(capsys, tmp_path):
    target = tmp_path / "sub" / "ds.json"
    rc, _, _ = run_plan(capsys, "--model", "opt-125m", "--seq-len", "1024", "--global-batch", "16",
                        *T4_ARGS, "--lr", "3e-4", "--write-ds-config", str(target))
    assert rc == 0
    config = json.loads(target.read_text())
    assert config["fp16"]["enabled"] is True and config["train_batch_size"] == 16
    assert config["optimizer"]["params"]["lr"] == 3e-4
    from deepspeed.runtime.config import DeepSpeedConfig

    DeepSpeedConfig(config)


def test_setting_flags_parse_to_setting_types():
    parser = argparse.ArgumentParser()
    add_setting_arguments(parser)
    args = parser.parse_args(["--precision", "fp16", "--zero", "2", "--offload", "optimizer",
                              "--checkpointing", "off", "--optimizer", "adamw",
                              "--chunked-loss", "on", "--micro-batch", "3"])
    forced = forced_from_args(args)
    assert isinstance(forced, Forced)
    assert forced.to_dict() == {"precision": "fp16", "zero": 2, "offload": "optimizer",
                                "checkpointing": False, "optimizer": "adamw", "chunked_loss": True,
                                "micro_batch": 3}
    Setting(**forced.to_dict())
    assert forced_from_args(parser.parse_args([])).to_dict() == {}
    with pytest.raises(SystemExit):
        parser.parse_args(["--zero", "4"])


@pytest.mark.parametrize("flag", ["--gpus", "--nodes"])
def test_zero_gpus_or_nodes_is_an_error_not_one(capsys, flag):
    rc, out, err = run_plan(capsys, "--model", "opt-125m", "--seq-len", "512", "--gpu", "T4",
                            flag, "0", "--host-memory", "64GiB")
    assert rc == 2 and out == ""
    assert f"{flag} 0" in err and f"give {flag} 1 or more" in err
    assert "Traceback" not in err


def test_setting_flags_keep_their_spelling_and_refuse_bad_values():
    parser = argparse.ArgumentParser()
    add_setting_arguments(parser)
    assert forced_from_args(parser.parse_args(["--checkpointing", "on"])).checkpointing is True
    for bad in (["--checkpointing", "yes"], ["--chunked-loss", "1"], ["--precision", "bf8"],
                ["--micro-batch", "x"]):
        with pytest.raises(SystemExit):
            parser.parse_args(bad)
    with pytest.raises(PtlmError, match="--micro-batch must be >= 1"):
        forced_from_args(parser.parse_args(["--micro-batch", "0"]))


def test_one_hardware_builder_for_the_flags_and_the_run(monkeypatch):
    """`ptlm plan`'s flags and the run's machine come from one builder (ptlm.run.machine.hardware.facts):
    the flags give the table's GPU; a run on this GPU-less machine plans for its CPU ranks, the
    host's memory split across the ranks of a node."""
    import psutil

    from ptlm.commands.flags import add_hardware_arguments, hardware_from_args
    from ptlm.plan.facts import KNOWN_GPUS, GiB, HardwareFacts
    from ptlm.run import preflight

    parser = argparse.ArgumentParser()
    add_hardware_arguments(parser)
    args = parser.parse_args(["--gpu", "T4", "--gpus", "2", "--nodes", "2", "--host-memory",
                              "64GiB"])
    assert hardware_from_args(args) == HardwareFacts.from_spec(KNOWN_GPUS["T4"], 2, 2, 64 * GiB)
    if torch.cuda.is_available():
        pytest.skip("the CPU-rank facts are for a machine without a GPU")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    monkeypatch.setattr(preflight, "_accelerator_bf16", lambda: True)
    cpu = preflight.hardware(4)  # 4 ranks, 2 per node
    host = psutil.virtual_memory().total
    assert (cpu.gpu_name, cpu.device_type, cpu.gpus_per_node, cpu.nodes) == ("cpu", "cpu", 2, 2)
    assert cpu.gpu_memory_bytes == host // 2 and cpu.host_memory_bytes == host and cpu.bf16
