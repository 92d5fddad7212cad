"""``bench ff``: one FF layer, the dense forward against ``SparseFF.decode`` (cold cache), and by rows."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import pick
from ..layers.dense import DenseFF
from ..layers.registry import FF_KINDS, make_ff
from ..layers.sparse_ff import SparseFF
from ..measure.costs import bytes_limit_ratio, dense_ff_cost, sparse_ff_cost
from ..measure.timing import spread
from ..model import ModelConfig
from .harness import check_choice, free_memory, interleaved, machine_columns, positive, recording
from .paths import check_paths

__all__ = ["ff_layer", "ff_sweep", "ff_rows", "path_table", "ff_kinds"]


def ff_layer(d_model: int, d_ff: int, block_size: int, d_lowrank: int | None = None, *, batch: int = 1,
             repeats: int | None = None, warmup: int = 3, n_inputs: int = 8,
             cold_cache: bool = True, paths: Sequence[str] | str | None = None) -> dict[str, object]:
    """Seconds per call of a dense FF layer and of ``SparseFF.decode`` on ``batch`` tokens.

    ``n_inputs`` different random inputs are cycled, so the sparse layer gathers different rows from call
    to call, as in real decoding. ``limit ratio`` is dense bytes / sparse bytes of weights touched per token
    (:func:`sparse_tutorial.measure.costs.bytes_limit_ratio`): the speed-up a bandwidth-bound layer could reach.

    ``paths``: the decode paths timed (:mod:`.paths`; default the best available), all in the same round-robin.
    ``sparse s``, ``speed-up`` and ``share of limit`` are the first path's (named in ``path``); every path timed
    also gets ``<path> s`` and ``<path> speed-up``. ``max IQR / median`` is the largest spread of the repeats
    among the layers timed (:func:`~sparse_tutorial.measure.timing.spread`).
    """
    paths = check_paths(paths)
    for name, v in (("d_model", d_model), ("d_ff", d_ff), ("block_size", block_size), ("batch", batch),
                    ("n_inputs", n_inputs)):
        positive(name, v)
    repeats = pick(default=30, fast=8) if repeats is None else repeats
    dense = DenseFF(d_model, d_ff).eval()
    sparse = SparseFF(d_model, d_ff, block_size, d_lowrank).eval()      # validates block_size, d_lowrank
    xs = torch.randn(n_inputs, batch, d_model)                          # (n_inputs, B, d)

    def cycling(fn):
        state = {"i": 0}

        def call():
            state["i"] = (state["i"] + 1) % n_inputs
            return fn(xs[state["i"]])
        return call

    tiny_x = torch.randn(batch, 32)
    tiny_dense, tiny_sparse = DenseFF(32, 128).eval(), SparseFF(32, 128, 16).eval()
    primes = {"dense": lambda: tiny_dense(tiny_x)}
    fns = {"dense": cycling(dense)}
    for p in paths:
        primes[p] = lambda p=p: tiny_sparse.decode(tiny_x, path=p)
        fns[p] = cycling(lambda x, p=p: sparse.decode(x, path=p))
    with recording() as samples:
        t = interleaved(fns, repeats=repeats, warmup=warmup, cold_cache=cold_cache, primes=primes)
    limit = bytes_limit_ratio(d_model, d_ff, block_size, sparse.d_lowrank)
    speedup = t["dense"] / t[paths[0]]
    row = {"d_model": d_model, "d_ff": d_ff, "block_size": block_size, "d_lowrank": sparse.d_lowrank,
           "batch": batch, "path": paths[0], "dense s": t["dense"], "sparse s": t[paths[0]], "speed-up": speedup,
           "limit ratio": limit, "share of limit": speedup / limit,
           "dense MB": dense_ff_cost(d_model, d_ff).bytes() / 1e6,
           "sparse MB": sparse_ff_cost(d_model, d_ff, block_size, sparse.d_lowrank).bytes() / 1e6,
           "max IQR / median": max(spread(s) for s in samples.values())}
    for p in paths:
        row[f"{p} s"] = t[p]
        row[f"{p} speed-up"] = t["dense"] / t[p]
    return {**row, **machine_columns()}


def path_table(df: pd.DataFrame, gbps: float | None = None) -> pd.DataFrame:
    """:func:`ff_sweep`'s (or :func:`ff_layer`'s) rows as a narrow table, one column group per decode path timed:
    µs per token and speed-up over dense (``x``); then the bytes limit and, with the measured bandwidth
    ``gbps`` (GB/s), the µs the sparse layer's bytes need at that speed (what is left is fixed cost); last the
    largest spread of the row's timings (``IQR``: interquartile range over median)."""
    paths = [c[:-2] for c in df.columns if c.endswith(" s") and c not in ("dense s", "sparse s")]
    out = pd.DataFrame({"d_model": df["d_model"], "dense ms": df["dense s"] * 1e3})
    for p in paths:
        out[f"{p} µs"] = df[f"{p} s"] * 1e6
        out[f"{p} x"] = df[f"{p} speed-up"]
    out["limit x"] = df["limit ratio"]
    if gbps:
        out["bytes µs"] = df["sparse MB"] / gbps * 1e3
    if "max IQR / median" in df:
        out["IQR"] = df["max IQR / median"]
    return out


def ff_sweep(widths: Sequence[int], *, ff_ratio: int = 4, block_size: int = 64,
             d_lowrank: int | None = None, batch: int = 1, repeats: int | None = None,
             cold_cache: bool = True, progress: bool = True,
             paths: Sequence[str] | str | None = None) -> pd.DataFrame:
    """:func:`ff_layer` for every ``d_model`` in ``widths`` with ``d_ff = ff_ratio * d_model``."""
    widths = list(widths)
    if not widths:
        raise ValueError("widths must not be empty")
    paths = check_paths(paths)
    rows = []
    for d in tqdm(widths, desc="FF layer widths", disable=not progress):
        rows.append(ff_layer(d, ff_ratio * d, block_size, d_lowrank, batch=batch, repeats=repeats,
                             cold_cache=cold_cache, paths=paths))
        free_memory()
    return pd.DataFrame(rows)


def ff_rows(d_model: int, rows: Sequence[int], *, ff_ratio: int = 4, block_size: int = 64,
            d_lowrank: int | None = None, repeats: int | None = None, warmup: int = 2,
            progress: bool = True) -> pd.DataFrame:
    """One FF layer on ``rows`` tokens at once: dense, sparse dense-masked (``forward``) and ``SparseFF.decode``
    (gathers up to ``block_size`` rows, beyond that one dense first-layer product and a gathered ``W2``).
    Warm cache (the rows of a batch share the weights)."""
    rows = [positive("rows", r) for r in rows]
    if not rows:
        raise ValueError("rows must not be empty")
    repeats = pick(default=15, fast=5) if repeats is None else repeats
    d_ff = ff_ratio * positive("d_model", d_model)
    dense = DenseFF(d_model, d_ff).eval()
    sparse = SparseFF(d_model, d_ff, block_size, d_lowrank).eval()
    out = []
    for r in tqdm(rows, desc=f"FF {d_model}: rows", disable=not progress):
        x = torch.randn(r, d_model)
        t = interleaved({"dense": lambda: dense(x), "masked": lambda: sparse(x),
                         "decode": lambda: sparse.decode(x)}, repeats=repeats, warmup=warmup)
        out.append({"d_model": d_model, "d_ff": d_ff, "block_size": block_size, "rows": r,
                    "dense ms": t["dense"] * 1e3, "masked ms": t["masked"] * 1e3, "decode ms": t["decode"] * 1e3,
                    "decode / masked": t["decode"] / t["masked"], "decode / dense": t["decode"] / t["dense"],
                    "masked / dense": t["masked"] / t["dense"], "decode path": sparse.last_decode_path,
                    **machine_columns()})
    return pd.DataFrame(out)


def _kind_layer(kind: str, d_model: int, d_ff: int, block_size: int):
    """One FF layer of a registered kind, in eval mode, with the defaults a model of this width would give it."""
    cfg = ModelConfig(vocab_size=2, context_length=8, d_model=d_model, n_heads=1, n_layers=1, d_ff=d_ff,
                      dropout=0.0, ff=kind, ff_block_size=block_size)
    return make_ff(cfg).eval()


def ff_kinds(widths: Sequence[int], kinds: Sequence[str] | None = None, *, ff_ratio: int = 4, block_size: int = 64,
             repeats: int | None = None, warmup: int = 3, n_inputs: int = 8, progress: bool = True
             ) -> pd.DataFrame:
    """One FF layer of every registered kind decoding one token (``layer.decode``, batch 1, cold cache), for every
    ``d_model`` in ``widths`` with ``d_ff = ff_ratio * d_model``. Each kind takes the defaults a model of that width
    gives it (:func:`~sparse_tutorial.layers.registry.make_ff`): ``N = block_size`` for the controller FF, its
    experts for MoE, its keys for PKM.

    One row per (width, kind): ``µs``, ``speed-up`` (dense / kind), ``MB read`` (the weights ``decode`` reads for
    one token, ``active_params_per_token``, float32), ``bytes x`` (dense MB / kind MB: what bytes allow) and ``IQR``
    (the spread of the repeats). The kinds of one width are timed round-robin.
    """
    widths = [positive("d_model", d) for d in widths]
    if not widths:
        raise ValueError("widths must not be empty")
    kinds = ["dense", *[k for k in FF_KINDS if k != "dense"]] if kinds is None else list(kinds)
    for k in kinds:
        check_choice("kind", k, FF_KINDS)
    if "dense" not in kinds:
        kinds = ["dense", *kinds]                        # the baseline of every speed-up
    repeats = pick(default=30, fast=8) if repeats is None else repeats
    rows = []
    for d in tqdm(widths, desc="FF kinds by width", disable=not progress):
        torch.manual_seed(0)
        layers = {k: _kind_layer(k, d, ff_ratio * d, block_size) for k in kinds}
        twins = {k: _kind_layer(k, 32, 128, 16) for k in kinds}
        xs = torch.randn(n_inputs, 1, d)                                    # (n_inputs, B=1, d)
        tiny_x = torch.randn(1, 32)
        state = {"i": 0}

        def call(layer):
            state["i"] = (state["i"] + 1) % n_inputs
            return layer.decode(xs[state["i"]])
        fns = {k: (lambda layer=layer: call(layer)) for k, layer in layers.items()}
        primes = {k: (lambda t=t: t.decode(tiny_x)) for k, t in twins.items()}
        with recording() as samples:
            t = interleaved(fns, repeats=repeats, warmup=warmup, cold_cache=True, primes=primes)
        mb = {k: 4 * layer.active_params_per_token() / 1e6 for k, layer in layers.items()}
        for k in kinds:
            rows.append({"d_model": d, "d_ff": ff_ratio * d, "kind": k, "µs": t[k] * 1e6,
                         "speed-up": t["dense"] / t[k], "MB read": mb[k], "bytes x": mb["dense"] / mb[k],
                         "IQR": spread(samples[k]), "stored MB": 4 * layers[k].num_params() / 1e6,
                         **machine_columns()})
        del layers, twins
        free_memory()
    return pd.DataFrame(rows)
