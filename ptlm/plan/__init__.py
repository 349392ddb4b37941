"""The planner: facts about a model and a machine in, a `Plan` out. Pure: no torch, no device,
no I/O beyond the probe cache's JSON. Modules: setting (the knobs), facts, memory (the memory
model), planner (search + cost model), dsconfig (the DeepSpeed config of a plan), probe_cache.
"""

from __future__ import annotations

from ptlm.plan.facts import HardwareFacts, ModelFacts
from ptlm.plan.memory import Job
from ptlm.plan.planner import Plan, plan
from ptlm.plan.setting import Setting

__all__ = ["HardwareFacts", "Job", "ModelFacts", "Plan", "Setting", "plan"]
