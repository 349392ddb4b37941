"""One resolver from a model spec (a built-in alias, a well-known hub name, a local folder or
config.json, or a hub name) to a transformers config. Every caller (plan, probe, train, prepare's
--model check) goes through `resolve_config`, so they agree on what a spec means and fail alike.

Only the config is read: no weights, and remote code is never trusted.
"""

from __future__ import annotations

from pathlib import Path

from ptlm.errors import PtlmError
from ptlm.hub import hub_unreachable, offline
from ptlm.plan.facts import KNOWN_CONFIGS, KNOWN_NAMES, ModelFacts, has_hand_activations

# Hub names whose config is in the built-in table: planning for them needs no network.
KNOWN_HUB_NAMES = {"facebook/opt-125m": "opt-125m", "facebook/opt-350m": "opt-350m",
                   "facebook/opt-1.3b": "opt-1.3b", "facebook/opt-6.7b": "opt-6.7b",
                   "facebook/opt-13b": "opt-13b", "openai-community/gpt2": "gpt2",
                   "openai-community/gpt2-medium": "gpt2-medium"}
# Config fields that hold the length of the position table, by architecture family.
MAX_POSITION_FIELDS = ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                       "seq_length", "max_seq_len")
# The sequence length a measured profile is fitted at when the caller names none (hand readers
# ignore it): the activation terms are exact there and extrapolated elsewhere.
DEFAULT_PROFILE_SEQ = 1024


def builtin_alias(spec: str) -> str | None:
    """The built-in table's key for `spec` (an alias or a well-known hub name), else None."""
    key = str(spec).lower()
    if key in KNOWN_CONFIGS:
        return key
    return KNOWN_HUB_NAMES.get(key)


def is_config_only_alias(spec: str) -> bool:
    """A ptlm alias (opt-125m, gpt2, ...) names a config without weights."""
    return str(spec).lower() in KNOWN_CONFIGS


def display_name(spec: str) -> str:
    alias = builtin_alias(spec)
    return KNOWN_NAMES[alias] if alias and str(spec).lower() in KNOWN_CONFIGS else str(spec)


def known_config(alias: str):
    """A transformers config object for a built-in alias (offline)."""
    from transformers import AutoConfig  # lazy: only model-reading commands pay for it

    kwargs = dict(KNOWN_CONFIGS[alias.lower()])
    return AutoConfig.for_model(kwargs.pop("model_type"), **kwargs)


def resolve_config(spec: str):
    """The transformers config for `spec`: built-in table first (offline), then a local folder or
    config.json, then the hub. Offline (HF_HUB_OFFLINE) or with the hub unreachable, only the
    local Hugging Face cache is tried, and a miss fails at once instead of after retries."""
    alias = builtin_alias(spec)
    if alias:
        return known_config(alias)
    from transformers import AutoConfig

    path = Path(spec).expanduser()
    source = str(path.parent) if path.name == "config.json" else str(spec)
    if not Path(source).exists():
        why = "the hub is off (HF_HUB_OFFLINE)" if offline() else hub_unreachable()
        if why is not None:
            try:
                return AutoConfig.from_pretrained(source, trust_remote_code=False,
                                                  local_files_only=True)
            except Exception:  # noqa: BLE001 - not in the local cache
                pass
            if not offline():
                why = f"the Hugging Face hub is unreachable ({why}); set HF_HUB_OFFLINE=1 when " \
                      "working without network"
            raise PtlmError(f"--model {spec}: not a local folder nor in the local Hugging Face "
                            f"cache, and {why}. Give a folder with config.json or a built-in "
                            f"alias: {', '.join(KNOWN_CONFIGS)}")
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types; the user needs one message
        if "does not recognize this architecture" in str(e):
            import transformers

            raise PtlmError(
                f"--model {spec}: its model_type is not an architecture transformers "
                f"{transformers.__version__} knows: if the model is newer, upgrade transformers "
                "(pip install -U transformers); ptlm does not run a model's own code "
                "(trust_remote_code)") from None
        raise PtlmError(
            f"--model {spec}: cannot read its config ({type(e).__name__}: {e}). Give a folder with "
            f"config.json, a hub name (needs network), or a built-in alias: "
            f"{', '.join(KNOWN_CONFIGS)}") from None


def text_config(config):
    """The language model's part of a config (a multimodal config nests it)."""
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def max_positions(config) -> int | None:
    """The longest sequence the model supports (its position table), or None if the config is silent."""
    text = text_config(config)
    for name in MAX_POSITION_FIELDS:
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def model_facts(spec: str, seq_len: int = DEFAULT_PROFILE_SEQ) -> ModelFacts:
    """The planner's facts for `spec` at `seq_len`: from its config alone (no weights), by a hand
    reader or measured on the meta device and under FakeTensorMode (ptlm.model.profile)."""
    config = resolve_config(spec)
    if has_hand_activations(config):  # OPT, GPT-2: formulas only, no trace
        return ModelFacts.from_config(config, name=display_name(spec))
    from ptlm.model.profile import facts_for  # the tracer: only for measured architectures

    return facts_for(config, display_name(spec), seq_len)
