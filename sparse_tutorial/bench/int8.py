"""``bench quant``: int8 weights against sparsity, per-token decode of the seed-size model."""
from __future__ import annotations

import statistics
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import pick
from ..measure.quantize import quantize_int8
from .harness import machine_columns, positive
from .whole_model import Generation, build_model, time_generations

__all__ = ["quant_bench"]


def quant_bench(batch_sizes: Sequence[int] = (1,), *, d_model: int = 384, n_layers: int = 6,
                prompt_len: int = 100, new_tokens: int = 20, repeats: int | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Per-token decode time of the dense model, its int8 version, sparse FF, and sparse FF with int8
    (see :mod:`sparse_tutorial.measure.quantize`), greedy with the cache; ratios against the float32 dense model."""
    repeats = pick(default=5, fast=2) if repeats is None else repeats
    torch.manual_seed(0)
    dense = build_model("dense", d_model, n_layers, 256, 16, None)
    sparse = build_model("sparse FF", d_model, n_layers, 256, 16, None)
    models = {"dense": dense, "dense int8": quantize_int8(dense), "sparse FF": sparse,
              "sparse FF int8": quantize_int8(sparse)}
    rows = []
    for B in tqdm(list(batch_sizes), desc="int8 vs sparse", disable=not progress):
        prompt = torch.randint(0, 65, (positive("batch size", B), prompt_len))
        runs = {k: Generation(m, prompt, new_tokens) for k, m in models.items()}
        time_generations(runs, repeats=repeats)
        base = statistics.median(runs["dense"].per_token)
        for k, r in runs.items():
            tok = statistics.median(r.per_token)
            rows.append({"d_model": d_model, "batch": B, "variant": k,
                         "prefill ms": statistics.median(r.prefill) * 1e3, "decode ms per step": tok * 1e3,
                         "decode speed-up (dense / variant)": base / tok, **machine_columns()})
    return pd.DataFrame(rows)
