"""The data layer: sources -> tokenizer -> packing -> Arrow shards + manifest (`prepare`), and the
reader that training streams them with. It knows no model and no plan.

`ptlm.data.prepare` never imports torch; `PackedDataset` / `PackedLoader` (torch) load on first use.
"""

from __future__ import annotations

__all__ = ["PackedDataset", "PackedLoader"]


def __getattr__(name: str):
    if name in __all__:  # lazy, so that `import ptlm.data.prepare` does not import torch
        from ptlm.data import reader

        return getattr(reader, name)
    raise AttributeError(f"module 'ptlm.data' has no attribute {name!r}")
