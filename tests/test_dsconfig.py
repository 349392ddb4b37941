"""DeepSpeed configs: complete ones from plans, templates filled, conflicts refused, and
DeepSpeed's own config parser accepting the results."""

from __future__ import annotations

import json

import pytest

from ptlm.errors import PtlmError
from ptlm.model.config import model_facts
from ptlm.plan import dsconfig
from ptlm.plan.facts import KNOWN_GPUS, GiB, HardwareFacts
from ptlm.plan.memory import Job
from ptlm.plan.planner import plan

OPT125 = model_facts("opt-125m")
OPT13 = model_facts("opt-1.3b")
ALL_TEMPLATES = ["zero0.json", "zero1.json", "zero2.json", "zero2_offload.json", "zero3.json",
                 "zero3_offload.json"]


def one_gpu(gpu="A100-40GB"):
    return HardwareFacts.from_spec(KNOWN_GPUS[gpu], 1, host_memory_bytes=512 * GiB)


def plan_for(**forced):
    return plan(OPT125, one_gpu(), Job(1024, 16), forced=forced)


SETTINGS = [
    dict(zero=0, precision="bf16"),
    dict(zero=0, precision="fp16"),
    dict(zero=0, precision="fp32"),
    dict(zero=1, precision="bf16"),
    dict(zero=1, offload="optimizer"),
    dict(zero=2, precision="bf16"),
    dict(zero=2, offload="optimizer"),
    dict(zero=2, optimizer="adamw8bit"),
    dict(zero=3, precision="bf16"),
    dict(zero=3, offload="optimizer"),
    dict(zero=3, offload="parameters"),
]


def has_auto(node) -> bool:
    if isinstance(node, dict):
        return any(has_auto(v) for v in node.values())
    if isinstance(node, list):
        return any(has_auto(v) for v in node)
    return node == "auto"


def deepspeed_accepts(config: dict):
    from deepspeed.runtime.config import DeepSpeedConfig

    return DeepSpeedConfig(json.loads(json.dumps(config)))


@pytest.mark.parametrize("forced", SETTINGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_build_is_complete_and_deepspeed_parses_it(forced):
    p = plan_for(**forced)
    config = dsconfig.build_ds_config(p)
    assert not has_auto(config)
    ds = deepspeed_accepts(config)
    s = p.setting
    assert ds.train_batch_size == p.global_batch == 16
    assert ds.train_micro_batch_size_per_gpu == p.micro_batch
    assert ds.gradient_accumulation_steps == p.grad_accum
    assert ds.zero_optimization_stage == s.zero
    assert ds.bfloat16_config.enabled == (s.precision == "bf16")
    assert ds.float16_config.enabled == (s.precision == "fp16")
    zero = ds.zero_config
    if s.zero >= 1:
        assert zero.reduce_bucket_size == p.ds_buffers.reduce_bucket_size
        device = zero.offload_optimizer.device if zero.offload_optimizer else "none"
        assert device == ("cpu" if s.offload != "none" else "none")
    if s.zero == 3:
        assert zero.offload_param.device == ("cpu" if s.offload == "parameters" else "none")
        assert zero.prefetch_bucket_size == p.ds_buffers.prefetch_bucket_size
        assert zero.max_live_parameters == p.ds_buffers.max_live_parameters
    assert config["optimizer"]["type"] == "AdamW"  # hyper-parameters; ptlm passes its optimizer
    assert config.get("zero_allow_untested_optimizer", False) == (s.optimizer == "adamw8bit")


def test_multi_gpu_batch_arithmetic():
    p = plan(OPT13, HardwareFacts.from_spec(KNOWN_GPUS["A100-40GB"], 8, host_memory_bytes=680 * GiB),
             Job(1024, 64))
    config = dsconfig.build_ds_config(p)
    assert (config["train_micro_batch_size_per_gpu"] * config["gradient_accumulation_steps"] * 8
            == config["train_batch_size"] == 64)


def test_hyper_parameters_are_written():
    hyper = dsconfig.OptimizerHyper(lr=3e-4, weight_decay=0.1, gradient_clipping=0.5)
    config = dsconfig.build_ds_config(plan_for(zero=0), hyper)
    assert config["optimizer"]["params"]["lr"] == 3e-4
    assert config["optimizer"]["params"]["weight_decay"] == 0.1
    assert config["gradient_clipping"] == 0.5


@pytest.mark.parametrize("name", ALL_TEMPLATES)
def test_templates_document_themselves_and_load_without_comments(name):
    raw = json.loads((dsconfig.TEMPLATES_DIR / name).read_text())
    assert len(raw.get("_comment", "")) > 40
    loaded = dsconfig.load_template(name)
    assert "_comment" not in loaded and has_auto(loaded)


@pytest.mark.parametrize("forced", SETTINGS, ids=lambda f: "-".join(f"{k}={v}" for k, v in f.items()))
def test_matching_template_fills_and_deepspeed_parses_it(forced):
    p = plan_for(**forced)
    template = dsconfig.load_template(dsconfig.template_name(p.setting))
    filled = dsconfig.fill_template(template, p)
    assert not has_auto(filled)
    complete = dsconfig.build_ds_config(p)
    for key in dsconfig.PLAN_OWNED:
        assert dsconfig._get(filled, key, None) in (dsconfig._get(complete, key, None), None)
    ds = deepspeed_accepts(filled)
    assert ds.zero_optimization_stage == p.setting.zero
    assert ds.train_micro_batch_size_per_gpu == p.micro_batch


@pytest.mark.parametrize("template, forced, match", [
    ("zero2.json", dict(zero=3), "zero_optimization.stage"),
    ("zero2.json", dict(zero=2, offload="optimizer"), "offload_optimizer.device"),
    ("zero2_offload.json", dict(zero=2, offload="none"), "offload_optimizer.device"),
    ("zero3.json", dict(zero=3, offload="parameters"), "offload"),
    ("zero0.json", dict(zero=0, precision="fp16"), None),
])
def test_template_conflicts_are_refused(template, forced, match):
    p = plan_for(**forced)
    if match is None:  # the control: the same call succeeds when template and plan agree
        assert dsconfig.fill_template(dsconfig.load_template(template), p)["fp16"]["enabled"]
        return
    with pytest.raises(PtlmError, match=match):
        dsconfig.fill_template(dsconfig.load_template(template), p)


def test_adamw8bit_plan_fills_a_template_and_allows_the_client_optimizer():
    p = plan_for(zero=2, optimizer="adamw8bit")
    filled = dsconfig.fill_template(dsconfig.load_template("zero2.json"), p)
    assert filled["zero_allow_untested_optimizer"] is True
    assert filled["optimizer"]["params"]["lr"] == dsconfig.OptimizerHyper().lr


def test_fixed_values_must_agree_with_the_plan():
    p = plan_for(zero=0, micro_batch=4)
    template = dsconfig.load_template("zero0.json")
    template["train_micro_batch_size_per_gpu"] = 8
    with pytest.raises(PtlmError, match="train_micro_batch_size_per_gpu = 8"):
        dsconfig.fill_template(template, p)
    template["train_micro_batch_size_per_gpu"] = 4  # agreeing is fine
    assert dsconfig.fill_template(template, p)["train_micro_batch_size_per_gpu"] == 4


def test_user_values_outside_the_plan_are_kept():
    p = plan_for(zero=2)
    template = dsconfig.load_template("zero2.json")
    template["zero_optimization"]["reduce_bucket_size"] = 12345
    template["comms_logger"] = {"enabled": True}
    filled = dsconfig.fill_template(template, p)
    assert filled["zero_optimization"]["reduce_bucket_size"] == 12345
    assert filled["comms_logger"] == {"enabled": True}


def test_auto_without_a_value_is_an_error():
    p = plan_for(zero=0)
    template = dsconfig.load_template("zero0.json")
    template["zero_optimization"]["stage3_prefetch_bucket_size"] = "auto"
    with pytest.raises(PtlmError, match="stage3_prefetch_bucket_size"):
        dsconfig.fill_template(template, p)


def test_template_for_every_setting_exists():
    for forced in SETTINGS:
        p = plan_for(**forced)
        assert (dsconfig.TEMPLATES_DIR / dsconfig.template_name(p.setting)).is_file()
