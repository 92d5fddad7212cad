"""``bench train``: seconds per training step of a dense and a sparse FF model, interleaved."""
from __future__ import annotations

import statistics

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import pick
from ..model import BOOK_RECIPE, ModelConfig, TransformerLM
from .harness import check_counts, clock, machine_columns, positive
from .paths import check_paths, sparse_ff_layers

__all__ = ["train_step"]


def train_step(d_model: int = 128, n_layers: int = 4, *, batch_size: int = 32, context_length: int = 128,
               block_size: int = 32, d_lowrank: int | None = None,
               repeats: int | None = None, warmup: int = 2, paths=None, progress: bool = True) -> pd.DataFrame:
    """Seconds per training step (forward, backward, gradient clipping, AdamW) of a dense and a sparse FF
    model of the book's shape (``d_ff = 4 d_model``) and recipe (:data:`~sparse_tutorial.model.BOOK_RECIPE`), with
    blocks of ``block_size`` units and a controller of rank ``d_lowrank`` (None: the reference's ``d_ff /
    block_size``), on random tokens, interleaved.

    ``paths`` (default: the best here) picks how the sparse model's training calls compute the mask and the
    ReLU (:attr:`SparseFF.train_path <sparse_tutorial.layers.sparse_ff.SparseFF.train_path>`): ``"pytorch"``
    (``SparseFF.mask`` and the ReLU) or ``"fused"`` (the kernels of :mod:`sparse_tutorial.layers.sparse_ff_kernel`).
    With several paths, one sparse model per path (the same weights) is timed in the same rounds; the first
    fills the main columns, the others get columns of their own.
    """
    for name, v in (("d_model", d_model), ("n_layers", n_layers), ("batch_size", batch_size),
                    ("context_length", context_length), ("block_size", block_size)):
        positive(name, v)
    paths = check_paths(paths)
    repeats = pick(default=10, fast=3) if repeats is None else repeats
    check_counts(repeats, warmup)
    torch.manual_seed(0)
    x = torch.randint(0, 65, (batch_size, context_length))
    y = torch.randint(0, 65, (batch_size, context_length))
    steps = {}
    for name in ["dense"] + paths:
        ff = "dense" if name == "dense" else "sparse"
        cfg = ModelConfig(vocab_size=65, context_length=context_length, d_model=d_model,
                          n_heads=max(1, d_model // 32), n_layers=n_layers, d_ff=4 * d_model, dropout=0.0,
                          ff=ff, **{**BOOK_RECIPE, "ff_block_size": block_size, "d_lowrank": d_lowrank})
        torch.manual_seed(1)                                           # every sparse model: the same weights
        model = TransformerLM(cfg).train()
        for layer in sparse_ff_layers(model):
            layer.train_path = "auto" if name == "fused" else "pytorch"
            shape = {"block_size": layer.block_size, "d_lowrank": layer.d_lowrank}   # what is timed
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        steps[name] = step
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
    first = paths[0]
    row = {"d_model": d_model, "n_layers": n_layers, "batch_size": batch_size, "context_length": context_length,
           **shape, "path": first, "dense s per step": med["dense"], "sparse s per step": med[first],
           "sparse / dense": med[first] / med["dense"]}
    for p in paths[1:]:
        row[f"sparse ({p}) s per step"] = med[p]
        row[f"sparse ({p}) / dense"] = med[p] / med["dense"]
    return pd.DataFrame([{**row, **machine_columns()}])
