"""The run config split by concern: flags generated from the dataclass fields, YAML under flags,
actionable errors for bad values, the typed Forced knobs."""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field, fields

import pytest

from ptlm.commands import train as train_cmd
from ptlm.commands.flags import add_dataclass_arguments, dataclass_values
from ptlm.errors import PtlmError
from ptlm.plan.setting import Forced, Setting
from ptlm.run.config import Optimization, RunConfig, opt, option_owners


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ptlm train")
    train_cmd.add_arguments(p)
    return p


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "manifest.json").write_text("{}")  # RunConfig only checks that it is there
    return d


def config_from(argv, yaml_text=None, tmp_path=None) -> RunConfig:
    if yaml_text is not None:
        path = tmp_path / "run.yaml"
        path.write_text(yaml_text)
        argv = ["--config", str(path), *argv]
    return train_cmd.from_args(parser().parse_args([str(a) for a in argv]))


def flags_of(p: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in p._actions for s in a.option_strings}


# ------------------------------------------------------------------ flags from the fields

def test_every_option_has_one_flag_with_help():
    flags = flags_of(parser())
    owners = option_owners()
    assert {"lr", "epochs", "keep_last", "zero", "model", "out", "log_every"} <= set(owners)
    for name in owners:
        action = flags.get("--" + name.replace("_", "-"))
        assert action is not None, f"no flag for {name}"
        assert action.dest == name and action.help and action.default is None
    generated = {a.dest for a in parser()._actions} - {"help", "config", "local_rank"}
    assert generated == set(owners)


def test_flag_types_follow_the_annotations(data, tmp_path):
    cfg = config_from(["--model", "x", "--data", data, "--out", tmp_path / "o", "--betas", "0.8",
                       "0.9", "--no-export", "--from-scratch", "--zero", "2",
                       "--checkpointing", "on", "--chunked-loss", "off", "--global-batch", "8",
                       "--schedule", "linear"])
    assert cfg.optim.betas == (0.8, 0.9) and cfg.optim.global_batch == 8
    assert cfg.ckpt.export is False and cfg.what.from_scratch is True
    assert cfg.forced == Forced(zero=2, checkpointing=True, chunked_loss=False)
    assert cfg.sched.schedule == "linear" and cfg.out == tmp_path / "o"
    with pytest.raises(SystemExit):
        parser().parse_args(["--schedule", "steep"])
    with pytest.raises(SystemExit):
        parser().parse_args(["--checkpointing", "maybe"])


@dataclass
class MoreOptimization(Optimization):
    """optimization, one knob more"""

    momentum: float = opt(0.5, "a knob nobody wrote a flag for")


@dataclass(kw_only=True)
class BiggerRun(RunConfig):
    optim: MoreOptimization = field(default_factory=MoreOptimization)
    new_top: int = opt(3, "a new top-level option")


def test_a_new_field_gets_a_flag_without_other_code():
    p = argparse.ArgumentParser()
    add_dataclass_arguments(p, BiggerRun)
    flags = flags_of(p)
    assert "a knob nobody wrote a flag for" in flags["--momentum"].help
    assert "--new-top" in flags and "--lr" in flags
    args = p.parse_args(["--momentum", "0.7", "--new-top", "4", "--lr", "0.1"])
    assert dataclass_values(args, BiggerRun) == {"momentum": 0.7, "new_top": 4, "lr": 0.1}


def test_a_field_without_help_is_refused():
    @dataclass
    class NoHelp:
        x: int = 1

    with pytest.raises(TypeError, match="no help text"):
        add_dataclass_arguments(argparse.ArgumentParser(), NoHelp)


# ------------------------------------------------------------------ YAML and flags

def test_yaml_gives_defaults_and_flags_win(data, tmp_path):
    yaml_text = (f"model: m\ndata: {data}\nout: {tmp_path / 'o'}\nlr: 0.01\nepochs: 3\n"
                 "zero: 2\ncheckpointing: on\nbetas: [0.8, 0.99]\nexport: false\n")
    cfg = config_from(["--lr", "0.5", "--checkpointing", "off", "--keep-last", "5"], yaml_text,
                      tmp_path)
    assert cfg.optim.lr == 0.5 and cfg.sched.epochs == 3  # flag won, YAML kept
    assert cfg.forced.zero == 2 and cfg.forced.checkpointing is False
    assert cfg.optim.betas == (0.8, 0.99) and cfg.ckpt.export is False
    assert cfg.ckpt.keep_last == 5 and cfg.what.model == "m"
    assert cfg.sched.schedule == "cosine"  # neither: the dataclass default


def test_unknown_yaml_key_is_an_error(data, tmp_path):
    with pytest.raises(PtlmError, match=r"unknown keys \['modle'\]"):
        config_from([], f"modle: x\ndata: {data}\nout: o\n", tmp_path)
    with pytest.raises(PtlmError, match=r"unknown keys \['forced'\]"):  # keys are flat
        config_from([], f"model: x\ndata: {data}\nout: o\nforced: {{zero: 2}}\n", tmp_path)
    with pytest.raises(PtlmError, match="expected a mapping"):
        config_from([], "- lr\n", tmp_path)


def test_local_rank_from_the_launcher_is_accepted(data, tmp_path):
    cfg = config_from(["--model", "x", "--data", data, "--out", tmp_path, "--local_rank", "1"])
    assert cfg.what.model == "x"


# ------------------------------------------------------------------ bad values

@pytest.mark.parametrize("extra, message", [
    ({"lr": "abc"}, "--lr 'abc': expected a number"),
    ({"lr": 0}, "--lr must be > 0"),
    ({"epochs": 0}, "--epochs must be >= 1"),
    ({"epochs": 1.5}, "--epochs 1.5: expected a whole number"),
    ({"betas": [0.9]}, "--betas"),
    ({"schedule": "steep"}, "--schedule 'steep' must be one of cosine, linear, constant"),
    ({"warmup_ratio": 1}, r"--warmup-ratio must be in \[0, 1\)"),
    ({"keep_last": 0}, "--keep-last must be >= 1"),
    ({"export": "no"}, "--export 'no': expected true or false"),
    ({"zero": 5}, "--zero 5 is not one of 0, 1, 2, 3"),
    ({"checkpointing": "maybe"}, "--checkpointing 'maybe': give on or off"),
    ({"micro_batch": 0}, "--micro-batch must be >= 1"),
    ({"resume": "no/such/folder"}, "give auto, none, or a checkpoint folder"),
    ({"plan": "no-such-plan.json"}, "give 'auto' or a plan JSON file"),
    ({"log_every": 0}, "--log-every must be >= 1"),
])
def test_bad_values_name_the_flag_and_the_fix(data, tmp_path, extra, message):
    with pytest.raises(PtlmError, match=message):
        RunConfig.from_flat({"model": "x", "data": data, "out": tmp_path, **extra})


def test_required_options_and_unprepared_data(tmp_path, data):
    with pytest.raises(PtlmError, match=r"--model is required \(on the command line or in"):
        RunConfig.from_flat({"data": data, "out": tmp_path})
    with pytest.raises(PtlmError, match="prepare the data first"):
        RunConfig.from_flat({"model": "x", "data": tmp_path / "none", "out": tmp_path})
    # value errors come before the data check: the first thing to fix is named first
    with pytest.raises(PtlmError, match="--epochs"):
        RunConfig.from_flat({"model": "x", "data": tmp_path / "none", "out": tmp_path,
                             "epochs": 0})


# ------------------------------------------------------------------ round trips

def test_forced_round_trip_and_only_set_knobs():
    f = Forced(precision="fp16", zero=2, checkpointing="off", micro_batch=3)
    assert f.to_dict() == {"precision": "fp16", "zero": 2, "checkpointing": False,
                           "micro_batch": 3}
    assert Forced.from_dict(f.to_dict()) == f
    assert Forced().to_dict() == {}
    Setting(**{**Setting().to_dict(), **f.to_dict()})  # the knobs are Setting's own
    assert {x.name for x in fields(Forced)} == {x.name for x in fields(Setting)}
    with pytest.raises(PtlmError, match="unknown setting knobs"):
        Forced.from_dict({"zero_stage": 2})


def test_run_config_round_trips_and_saves_nested(data, tmp_path):
    cfg = RunConfig.from_flat({"model": "x", "data": data, "out": tmp_path, "lr": 0.01,
                               "zero": 1, "max_steps": 7})
    assert RunConfig.from_flat(cfg.flat()) == cfg
    saved = json.loads(json.dumps(cfg.to_dict()))  # JSON-ready: paths as strings
    assert saved["optim"]["lr"] == 0.01 and saved["sched"]["max_steps"] == 7
    assert saved["forced"]["zero"] == 1 and saved["corpus"]["data"] == str(data)
    assert saved["out"] == str(tmp_path)


def test_one_default_per_optimizer_hyper_parameter():
    """The run's defaults (what training uses) are the plan's, the probe's (OptimizerHyper()) and
    the optimizer builder's: `ptlm plan --write-ds-config` without --lr writes the run's."""
    import inspect

    from ptlm.commands import plan as plan_cmd
    from ptlm.model.optim import build_optimizer
    from ptlm.plan.dsconfig import OptimizerHyper

    run = Optimization()
    # the values training has always used (GPT-3/Llama-style AdamW), written out here
    assert (run.lr, run.betas, run.eps, run.weight_decay, run.grad_clip) == \
        (1e-4, (0.9, 0.95), 1e-8, 0.1, 1.0)
    hyper = OptimizerHyper()
    assert (hyper.lr, hyper.betas, hyper.eps, hyper.weight_decay, hyper.gradient_clipping) == \
        (run.lr, run.betas, run.eps, run.weight_decay, run.grad_clip)
    parser = argparse.ArgumentParser()
    plan_cmd.add_arguments(parser)
    plan_args = parser.parse_args(["--model", "opt-125m", "--seq-len", "64"])
    assert (plan_args.lr, plan_args.weight_decay) == (run.lr, run.weight_decay)
    builder = inspect.signature(build_optimizer).parameters
    assert (builder["betas"].default, builder["eps"].default,
            builder["weight_decay"].default) == (run.betas, run.eps, run.weight_decay)
