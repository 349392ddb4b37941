"""Byte units and the one size parser every command uses ("16GiB", "40GB", "512MiB")."""

from __future__ import annotations

import re

from ptlm.errors import PtlmError

GB = 10**9
GiB = 2**30

_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([KMGT]?)(I?)(B?)\s*$", re.IGNORECASE)
_SIZE_POWER = {"": 0, "K": 1, "M": 2, "G": 3, "T": 4}


def parse_size(text: str) -> int:
    """Bytes from "16GiB", "40GB", "512MiB", "1.5T", "16G", or a plain byte count.

    GB/MB/... are decimal (10^9), GiB/MiB/... binary (2^30). A bare letter ("16G") means binary,
    as in `free -g`/`nvidia-smi`'s MiB figures.
    """
    m = _SIZE_RE.match(str(text))
    if not m or (m.group(3) and not m.group(2)):
        raise PtlmError(f"cannot read size {text!r}: use e.g. 16GiB, 40GB or 512MiB")
    number, unit, binary, byte = m.group(1), m.group(2).upper(), m.group(3), m.group(4)
    base = 1024 if (binary or not byte) else 1000
    return int(float(number) * base ** _SIZE_POWER[unit])
