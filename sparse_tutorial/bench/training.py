"""``bench train``: seconds per training step of a dense and a sparse FF model, interleaved."""
from __future__ import annotations

import statistics

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import pick
from ..model import ModelConfig, TransformerLM
from .harness import check_counts, clock, machine_columns, positive

__all__ = ["train_step"]


def train_step(d_model: int = 128, n_layers: int = 4, *, batch_size: int = 32, context_length: int = 128,
               block_size: int = 32, repeats: int | None = None, warmup: int = 2,
               progress: bool = True) -> pd.DataFrame:
    """Seconds per training step (forward, backward, gradient clipping, AdamW) of a dense and a sparse FF
    model of the book's shape (``d_ff = 4 d_model``), on random tokens, interleaved."""
    for name, v in (("d_model", d_model), ("n_layers", n_layers), ("batch_size", batch_size),
                    ("context_length", context_length), ("block_size", block_size)):
        positive(name, v)
    repeats = pick(default=10, fast=3) if repeats is None else repeats
    check_counts(repeats, warmup)
    torch.manual_seed(0)
    x = torch.randint(0, 65, (batch_size, context_length))
    y = torch.randint(0, 65, (batch_size, context_length))
    steps = {}
    for ff in ("dense", "sparse"):
        cfg = ModelConfig(vocab_size=65, context_length=context_length, d_model=d_model,
                          n_heads=max(1, d_model // 32), n_layers=n_layers, d_ff=4 * d_model, dropout=0.0,
                          ff=ff, ff_block_size=block_size)
        model = TransformerLM(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        steps[ff] = step
    samples, now = {k: [] for k in steps}, clock()
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    for _ in tqdm(range(repeats), desc="train steps", disable=not progress, leave=False):
        for k, fn in steps.items():
            t0 = now()
            fn()
            samples[k].append(now() - t0)
    med = {k: statistics.median(s) for k, s in samples.items()}
    return pd.DataFrame([{"d_model": d_model, "n_layers": n_layers, "batch_size": batch_size,
                          "context_length": context_length, "dense s per step": med["dense"],
                          "sparse s per step": med["sparse"], "sparse / dense": med["sparse"] / med["dense"],
                          **machine_columns()}])
