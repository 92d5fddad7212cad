"""The chapter's targets against what a run measured (the table at the end of chapter 5)."""
from __future__ import annotations

import pandas as pd

from .block import paper_speedup

__all__ = ["target_table"]


def _block_speedup(df, variant):
    """The best speed-up of ``variant`` in one or more :func:`.block.block_decode` tables (every path and step
    timed; each row's speed-up is against the dense block of its own run)."""
    if df is None:
        return None
    return float(df.loc[df["variant"] == variant, "speed-up"].max())


def _gen_value(df, variant, batch, column):
    if df is None:
        return None
    sel = df[(df["variant"] == variant) & (df["batch"] == batch)]
    return None if sel.empty else float(sel[column].iloc[0])


def _best_engine(df, variant):
    if df is None:
        return None
    sel = df[df["variant"] == variant]
    return None if sel.empty else float(sel["speed-up vs fastest dense"].max())


def target_table(*, ff: dict | None = None, block_800m: pd.DataFrame | None = None,
                 block_17b: pd.DataFrame | None = None, generate: pd.DataFrame | None = None,
                 train: pd.DataFrame | None = None, engines: pd.DataFrame | None = None,
                 floor: pd.DataFrame | None = None) -> pd.DataFrame:
    """The chapter's targets against what this run measured: ``target``, ``measured``, ``met``.

    Arguments are the results of :func:`ff_layer` (d_model 4096, d_ff 16384, N 64, rank 128),
    :func:`block_decode` at "800m" and "17b" (one table, or several concatenated: a block target takes the best
    row, e.g. of the eager and the lean step), :func:`generate_bench` at the seed's size (batch 1 and 64,
    100-token prompt), :func:`train_step`, :func:`.engines.engine_generate` (eager PyTorch, TorchScript and ONNX
    Runtime, batch 1) and its :func:`.engines.bytes_floor`; a missing one shows as "not run". The engine rows take
    the best engine: a variant's best time against the fastest dense model, the fastest dense model against its
    floor.
    """
    paper = lambda shape, v: f"paper's block times: {paper_speedup(shape, v):.2f}x"  # noqa: E731  (one source)
    inv = lambda v: None if v is None else 1.0 / v  # noqa: E731  (speed-up -> time ratio)
    rows = [
        ("FF layer 4096 x 16384, N 64, rank 128: share of the bytes limit", ">=", 0.9,
         None if ff is None else float(ff["share of limit"])),
        (f"800M block: sparse FF + QKV speed-up ({paper('800m', 'sparse FF + QKV')})", ">=", 4.0,
         _block_speedup(block_800m, "sparse FF + QKV")),
        (f"800M block: sparse FF speed-up ({paper('800m', 'sparse FF')})", ">=", 2.0,
         _block_speedup(block_800m, "sparse FF")),
        (f"17B block: sparse FF + QKV speed-up ({paper('17b', 'sparse FF + QKV')})", ">=", 60.0,
         _block_speedup(block_17b, "sparse FF + QKV")),
        ("seed size, decode per token, batch 1: sparse FF speed-up", ">=", 1.5,
         _gen_value(generate, "sparse FF", 1, "decode speed-up (dense / variant)")),
        ("seed size, decode per token, batch 1: sparse FF + QKV speed-up", ">=", 2.0,
         _gen_value(generate, "sparse FF + QKV", 1, "decode speed-up (dense / variant)")),
        ("seed size, prefill: sparse FF time / dense time", "<=", 1.1,
         _gen_value(generate, "sparse FF", 1, "prefill ratio (variant / dense)")),
        ("seed size, decode at batch 64: sparse FF time / dense time", "<=", 1.1,
         inv(_gen_value(generate, "sparse FF", 64, "decode speed-up (dense / variant)"))),
        ("seed size, batch 1, the best engine: sparse FF speed-up against the fastest dense", ">=", 2.5,
         _best_engine(engines, "sparse FF")),
        ("seed size, batch 1, the best engine: sparse FF + QKV speed-up against the fastest dense", ">=", 3.5,
         _best_engine(engines, "sparse FF + QKV")),
        ("seed size, batch 1: the fastest dense model's time per token / its bytes floor", "<=", 1.5,
         None if floor is None or floor.empty else float(floor["time / floor"].min())),
        ("training step: sparse time / dense time", "<=", 1.15,
         None if train is None else float(train["sparse / dense"].iloc[0])),
    ]
    out = []
    for name, op, goal, value in rows:
        met = "not run" if value is None else ("yes" if (value >= goal if op == ">=" else value <= goal) else "NO")
        out.append({"target": name, "goal": f"{op} {goal:g}",
                    "measured": "not run" if value is None else f"{value:.2f}", "met": met})
    return pd.DataFrame(out)
