"""What `ptlm probe` learned, kept for the planner: the search for the largest micro-batch that
fits (a pure function of a `fits` predicate) and the cache of its results, keyed by model, GPU,
seq_len, world size and setting. Training reads the cache so that it never plans a micro-batch
above what the probe saw fit on this GPU."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

CACHE_ENV = "PTLM_CACHE"


def largest_fitting(fits: Callable[[int], bool], options: list[int], start: int) -> int:
    """The largest option (ascending list) for which fits() holds, 0 if none; assumes memory
    grows with the micro-batch. Starts at the planned `start`, walks up while it fits, down
    while it does not, so a correct plan costs two trials."""
    options = sorted(options)
    i = options.index(start) if start in options else len(options) - 1
    if fits(options[i]):
        while i + 1 < len(options) and fits(options[i + 1]):
            i += 1
        return options[i]
    while i > 0:
        i -= 1
        if fits(options[i]):
            return options[i]
    return 0


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


# ------------------------------------------------------------------------------ cache

def cache_path() -> Path:
    root = Path(os.environ.get(CACHE_ENV, Path.home() / ".cache" / "ptlm"))
    return root / "probe.json"


def cache_key(model: str, gpu_name: str, gpu_memory: int, seq_len: int, setting, world: int,
              documents: bool = False) -> str:
    """documents: probed with document-aware packing's mask (a key of its own; the keys of
    stream packing are those written before packing existed)."""
    knobs = {k: v for k, v in setting.to_dict().items() if k != "micro_batch"}
    key = {"model": model, "gpu": gpu_name, "gpu_memory": gpu_memory, "seq_len": seq_len,
           "world": world, "setting": knobs}
    if documents:
        key["packing"] = "documents"
    return json.dumps(key, sort_keys=True)


def read_cache() -> dict:
    path = cache_path()
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except json.JSONDecodeError:
        log.warning("ignoring the unreadable probe cache %s", path)
        return {}


def write_cache(key: str, result: dict) -> None:
    path = cache_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    data = read_cache()
    data[key] = result
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def cached_largest(key: str) -> int | None:
    entry = read_cache().get(key)
    return entry["largest_micro_batch"] if entry else None


