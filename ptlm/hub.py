"""Hub names without a hub: one fast path for every command that reads a model or tokenizer by
hub name (`ptlm eval/generate --model`, `ptlm prepare --tokenizer`, eval's `--tokenizer`), as
`ptlm.model.config.resolve_config` already does for plan/train/probe.

Offline (HF_HUB_OFFLINE) or with the hub unreachable (one TCP connect, HUB_PROBE_TIMEOUT_S),
transformers would retry for 30-50 s before failing with its own two-line message. Here a hub
name that is in the local Hugging Face cache is loaded from it with the hub switched off for
this process (no retries), and one that is not fails at once, in one line, with the fix.
"""

from __future__ import annotations

import os
from pathlib import Path

from ptlm.errors import PtlmError
from ptlm.model.config import _offline, hub_unreachable

# A file each kind of repository has, looked up in the local cache.
CACHED_FILE = {"model": ("config.json",),
               "tokenizer": ("tokenizer.json", "tokenizer_config.json", "vocab.json")}


def _cached(name: str, kind: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    for filename in CACHED_FILE[kind]:
        try:
            if isinstance(try_to_load_from_cache(name, filename), str):
                return True
        except Exception:  # noqa: BLE001 - not a valid repo id: certainly not cached
            return False
    return False


def _hub_off_for_this_process() -> None:
    """Later transformers / huggingface_hub calls read only the local cache, without retries
    (huggingface_hub reads the variable when imported, so its constant is set too)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass


def require(flag: str, spec: str, kind: str = "model") -> None:
    """Before loading `spec` (a local folder or a hub name) for `flag`: nothing to do for a
    folder or a reachable hub; offline, a cached name loads from the cache and an uncached one
    is a one-line PtlmError naming the flag, the reason and the fix."""
    if Path(spec).expanduser().exists():
        return
    why = "the hub is off (HF_HUB_OFFLINE)" if _offline() else hub_unreachable()
    if why is None:
        return
    if _cached(spec, kind):
        _hub_off_for_this_process()
        return
    if not _offline():
        why = (f"the Hugging Face hub is unreachable ({why}); set HF_HUB_OFFLINE=1 when working "
               "without network")
    raise PtlmError(f"{flag} {spec}: not a local folder nor in the local Hugging Face cache, and "
                    f"{why}. Give a local folder (a model or tokenizer saved with "
                    "save_pretrained), or run once with network to fill the cache")
