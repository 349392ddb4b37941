"""The one check of a length against a model's positions (training data, `ptlm prepare --model`,
`ptlm eval`, `ptlm generate`, the probe), with one rule, the planner's:

- a learned position table (OPT, GPT-2) is a hard limit: position N has no row, the run would
  fail at its first forward, so the length is refused with the fix named;
- rotary, ALiBi and position-free models (Llama, Qwen3, Gemma 3, ...) have no table: their
  max_position_embeddings is what they were trained to, a soft limit. Longer lengths run, with a
  warning (quality past it depends on the model's rope scaling).

Whether a table exists is read from the model built on the meta device (no weights, no memory),
the way the planner's facts read it: by what the model is, not by family name."""

from __future__ import annotations

import logging
from collections.abc import Callable

from ptlm.errors import PtlmError
from ptlm.model.config import max_positions

log = logging.getLogger(__name__)

_learned: dict[str, bool] = {}  # config JSON -> whether it has a learned position table


def learned_position_table(config) -> bool:
    """Whether models of `config` embed positions with a learned table (a hard length limit)."""
    # deferred: profile loads torch and transformers, and `ptlm prepare` imports this module
    from ptlm.model.profile import has_position_table, meta_model

    key = config.to_json_string(use_diff=False)
    if key not in _learned:
        model = meta_model(config)
        _learned[key] = has_position_table(model, model.get_input_embeddings())
    return _learned[key]


def check_length(config, length: int, what: str, name: str,
                 fix: Callable[[int], str]) -> None:
    """Refuse `length` above a learned position table, warn above a soft limit. The messages
    read "{what} is above the N positions of {name}": `what` names the length as the user gave
    it (e.g. "--seq-len 2048"), `name` the model ("model gpt2"); fix(N) says what to do when
    the limit is hard."""
    positions = max_positions(config)
    if positions is None or length <= positions:
        return
    problem = f"{what} is above the {positions} positions of {name}"
    if learned_position_table(config):
        raise PtlmError(f"{problem} (a learned position table: position {positions} has no row); "
                        + fix(positions))
    log.warning("%s: it has no learned position table (rotary, ALiBi or none), so this runs, but "
                "it was trained on at most %d positions; past them its quality depends on its "
                "rope scaling", problem, positions)
