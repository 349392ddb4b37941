"""Hub names without a hub: one fast path for every command that reads a model or tokenizer by
hub name (`ptlm eval/generate --model`, `ptlm prepare --tokenizer`, eval's `--tokenizer`), as
`ptlm.model.config.resolve_config` already does for plan/train/probe (with `offline()` and
`hub_unreachable()` from here). A leaf: data (tokenizers) and model (configs) both ask it.

Offline (HF_HUB_OFFLINE) or with the hub unreachable (one TCP connect, HUB_PROBE_TIMEOUT_S),
transformers would retry for 30-50 s before failing with its own two-line message. Here a hub
name that is in the local Hugging Face cache is loaded from it with the hub switched off for
this process (no retries), and one that is not fails at once, in one line, with the fix.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlsplit

from ptlm.errors import PtlmError

OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
PROXY_ENV = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy")
# Without network, huggingface_hub retries for ~30 s before transformers gives up: one TCP
# connect to the hub, bounded by this, tells first.
HUB_PROBE_TIMEOUT_S = 3.0


# A file each kind of repository has, looked up in the local cache.
CACHED_FILE = {"model": ("config.json",),
               "tokenizer": ("tokenizer.json", "tokenizer_config.json", "vocab.json")}


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in OFFLINE_ENV)


def hub_unreachable(timeout: float = HUB_PROBE_TIMEOUT_S) -> str | None:
    """Why the hub (HF_ENDPOINT) cannot be reached, or None when it can (or behind a proxy,
    which a direct connect cannot judge)."""
    if any(os.environ.get(k) for k in PROXY_ENV):
        return None
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"{host}:{port}: {e.strerror or e}"
    return None


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
    why = "the hub is off (HF_HUB_OFFLINE)" if offline() else hub_unreachable()
    if why is None:
        return
    if _cached(spec, kind):
        _hub_off_for_this_process()
        return
    if not offline():
        why = (f"the Hugging Face hub is unreachable ({why}); set HF_HUB_OFFLINE=1 when working "
               "without network")
    raise PtlmError(f"{flag} {spec}: not a local folder nor in the local Hugging Face cache, and "
                    f"{why}. Give a local folder (a model or tokenizer saved with "
                    "save_pretrained), or run once with network to fill the cache")
