"""``bench bandwidth``: how fast this machine streams memory, the ceiling of every batch-1 decode."""
from __future__ import annotations

import pandas as pd
import torch

from ..config import pick
from .harness import interleaved, machine_columns, positive

__all__ = ["bandwidth"]


def bandwidth(size_mb: int | None = None, repeats: int | None = None) -> pd.DataFrame:
    """The machine's memory bandwidth (GB/s) for a large copy (read + write) and a large sum (read only)."""
    size_mb = pick(default=512, fast=128) if size_mb is None else positive("size_mb", size_mb)
    repeats = pick(default=10, fast=5) if repeats is None else positive("repeats", repeats)
    n = size_mb * (1 << 20) // 4
    src = torch.ones(n)
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src), "sum": lambda: src.sum()}, repeats=repeats, warmup=2)
    rows = [{"measure": "copy (read + write)", "GB/s": 2 * 4 * n / t["copy"] / 1e9, "MB": size_mb},
            {"measure": "sum (read)", "GB/s": 4 * n / t["sum"] / 1e9, "MB": size_mb}]
    return pd.DataFrame([{**r, **machine_columns()} for r in rows])
