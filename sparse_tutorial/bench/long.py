"""``bench attention`` and ``bench long``: long sequences (chapter 7).

* :func:`attention_lengths`: one attention layer on ``T`` tokens, full causal attention against LSH attention, at
  growing ``T``: the time of a forward pass and the bytes of scores each computes;
* :func:`long_decode`: whole models decoding one token after a prompt of ``P`` tokens, at growing ``P``: the
  book's dense model, chapter 5's sparse FF + QKV model, the same with LSH attention alone, and the
  Terraformer-style model (:func:`~sparse_tutorial.model.terraformer_config`).

Both time with the harness of the other commands (interleaved, medians, thread CPU time on one thread) and
report the spread of the repeats.
"""
from __future__ import annotations

import statistics
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import pick
from ..layers.attention import CausalSelfAttention
from ..layers.lsh import LSHSelfAttention
from ..layers.qkv import modules_near_sqrt
from ..measure.timing import spread
from ..model import ModelConfig, TransformerLM, book_config, terraformer_config
from .harness import check_choice, free_memory, interleaved, machine_columns, positive, recording
from .whole_model import Generation, time_generations

__all__ = ["LONG_VARIANTS", "long_config", "attention_lengths", "long_decode"]

#: chapter 7's models: label -> overrides of the book's model (the Terraformer-style one is its own preset)
LONG_VARIANTS: dict[str, dict] = {
    "dense": dict(ff="dense"),
    "sparse FF + QKV": dict(ff="sparse", qkv="conv"),            # S: the divisor of d_model nearest sqrt(d_model)
    "LSH attention": dict(ff="dense", qkv="lsh"),
    "Terraformer": dict(terraformer=True),
}


def long_config(variant: str, *, d_model: int = 128, n_layers: int = 4, context_length: int = 4352,
                vocab_size: int = 65) -> ModelConfig:
    """The book's model (``d_model`` 128, 4 layers, ``d_ff = 4 d_model``, ``N`` 32) with a long context, as one of
    :data:`LONG_VARIANTS`."""
    check_choice("variant", variant, LONG_VARIANTS)
    size = dict(d_model=positive("d_model", d_model), n_heads=max(1, d_model // 32), d_ff=4 * d_model,
                n_layers=positive("n_layers", n_layers), context_length=positive("context_length", context_length),
                vocab_size=vocab_size, ff_block_size=32, dropout=0.0)
    kw = dict(LONG_VARIANTS[variant])
    if kw.pop("terraformer", False):                 # SRU width and S at the book's values whatever the run size
        return terraformer_config(**size, sru_dim=32, loss_modules=4)
    if kw.get("qkv") == "conv":
        kw["qkv_modules"] = modules_near_sqrt(d_model)
    return book_config(**{**size, **kw})


def attention_lengths(lengths: Sequence[int], *, d_model: int = 128, n_heads: int = 4, window: int = 32,
                      n_hashes: int = 2, n_buckets: int = 8, repeats: int | None = None,
                      progress: bool = True) -> pd.DataFrame:
    """One attention layer's forward pass (no gradient, batch 1) on ``T`` tokens for every ``T`` in ``lengths``:
    full causal attention (``scaled_dot_product_attention``) against LSH attention.

    Columns: ``T``, ``full ms``, ``LSH ms``, ``LSH speed-up`` (full / LSH), ``full scores MB`` (the ``H T (T+1) / 2``
    causal scores full attention computes), ``LSH scores MB`` (``H x hashes x T x 2 window``: each query against its
    chunk and the one before, per round), ``IQR`` (the largest spread of the two).
    """
    lengths = [positive("length", t) for t in lengths]
    if not lengths:
        raise ValueError("lengths must not be empty")
    repeats = pick(default=5, fast=2) if repeats is None else repeats
    torch.manual_seed(0)
    full = CausalSelfAttention(d_model, n_heads).eval()
    lsh = LSHSelfAttention(d_model, n_heads, n_hashes=n_hashes, n_buckets=n_buckets, window=window).eval()
    rows = []
    for T in tqdm(lengths, desc="attention by length", disable=not progress):
        x = torch.randn(1, T, d_model)
        with recording() as samples:
            t = interleaved({"full": lambda: full(x), "lsh": lambda: lsh(x)}, repeats=repeats, warmup=1)
        rows.append({"T": T, "full ms": t["full"] * 1e3, "LSH ms": t["lsh"] * 1e3,
                     "LSH speed-up": t["full"] / t["lsh"],
                     "full scores MB": 4 * n_heads * T * (T + 1) / 2 / 1e6,
                     "LSH scores MB": 4 * n_heads * n_hashes * T * 2 * window / 1e6,
                     "IQR": max(spread(s) for s in samples.values()), **machine_columns()})
        free_memory()
    return pd.DataFrame(rows)


def long_decode(context_lengths: Sequence[int], variants: Sequence[str] = tuple(LONG_VARIANTS), *,
                d_model: int = 128, n_layers: int = 4, new_tokens: int | None = None, repeats: int | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Greedy decoding at batch 1 after a prompt of ``P`` tokens, for every ``P`` in ``context_lengths``: the
    prefill time and the time per new token of each variant (fresh random weights; speed does not depend on
    training), the variants called round-robin.

    Columns: ``P``, ``variant``, ``prefill ms``, ``ms per token``, ``speed-up`` (dense / variant, per token),
    ``IQR`` (spread of the per-token times), ``params``.
    """
    lengths = [positive("context length", p) for p in context_lengths]
    if not lengths:
        raise ValueError("context_lengths must not be empty")
    variants = list(variants)
    for v in variants:
        check_choice("variant", v, LONG_VARIANTS)
    new_tokens = pick(default=8, fast=3) if new_tokens is None else positive("new_tokens", new_tokens)
    repeats = pick(default=3, fast=2) if repeats is None else repeats
    ctx = max(lengths) + new_tokens + 1
    torch.manual_seed(0)
    models = {v: TransformerLM(long_config(v, d_model=d_model, n_layers=n_layers, context_length=ctx)).eval()
              for v in variants}
    rows = []
    for P in tqdm(lengths, desc="decoding after a long prompt", disable=not progress):
        prompt = torch.randint(0, 65, (1, P))
        runs = {v: Generation(m, prompt, new_tokens) for v, m in models.items()}
        time_generations(runs, repeats=repeats)
        med = {v: (statistics.median(r.prefill), statistics.median(r.per_token)) for v, r in runs.items()}
        for v, (pre, tok) in med.items():
            rows.append({"P": P, "variant": v, "prefill ms": pre * 1e3, "ms per token": tok * 1e3,
                         "speed-up": med["dense"][1] / tok if "dense" in med else float("nan"),
                         "IQR": spread(runs[v].per_token), "params": models[v].num_params(),
                         **machine_columns()})
        free_memory()
    del models
    free_memory()
    return pd.DataFrame(rows)
