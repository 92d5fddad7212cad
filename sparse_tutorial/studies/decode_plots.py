"""Chapter 5's figures: FF speed-up against width, the seed project's charts redone, where sparsity stops paying.

Every function takes the DataFrames of :mod:`sparse_tutorial.bench` and returns a matplotlib ``Figure``.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from .plots import COLORS, style

__all__ = ["ff_width_figure", "seed_charts_figure", "batch_figure", "SEED_REPORTED", "SEED_REPORTED_100_TOKENS"]

#: The seed project's reported dense/sparse time ratios (whole-model forward, no cache, untrained models):
#: quoted from its write-up, not measured here. 1 token: 0.89 at d_model 384, 1.20 at 768; 100 tokens: 0.70
#: down to 0.35 (sparse 1.4-2.9x slower).
SEED_REPORTED = pd.DataFrame([
    {"d_model": 384, "tokens": 1, "dense / sparse (seed)": 0.89},
    {"d_model": 768, "tokens": 1, "dense / sparse (seed)": 1.20},
])

#: The seed project's reported range of dense/sparse ratios for 100 tokens across its widths.
SEED_REPORTED_100_TOKENS = (0.35, 0.70)


def ff_width_figure(sweep: pd.DataFrame) -> Figure:
    """Measured speed-up of ``SparseFF.decode`` over the dense FF against ``d_model``, with the bytes limit."""
    style()
    fig, ax = plt.subplots(figsize=(7, 4))
    d = sweep["d_model"].to_numpy()
    ax.plot(d, sweep["limit ratio"], "--", color=COLORS["model"], label="limit: dense bytes / sparse bytes")
    ax.plot(d, sweep["speed-up"], "o-", color=COLORS["measured"], label="measured: dense time / sparse time")
    ax.axhline(1.0, color="grey", lw=1)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xticks(d, [str(v) for v in d])
    ax.set_xlabel("d_model (d_ff = 4 d_model)")
    ax.set_ylabel("speed-up at batch 1 (x, log scale)")
    ax.set_title("One FF layer, one token: sparse decode against dense")
    ax.legend()
    fig.tight_layout()
    return fig


def seed_charts_figure(tokens_df: pd.DataFrame) -> Figure:
    """The seed project's two charts redone: dense/sparse time ratio of a whole forward, 1 and 100 tokens."""
    style()
    counts = sorted(tokens_df["tokens"].unique())
    fig, axes = plt.subplots(1, len(counts), figsize=(5 * len(counts), 3.8), squeeze=False)
    for ax, t in zip(axes[0], counts):
        part = tokens_df[tokens_df["tokens"] == t]
        x = np.arange(len(part))
        ax.bar(x, part["dense / sparse"], color=COLORS["sparse"], label="this book (measured)")
        seed = SEED_REPORTED[SEED_REPORTED["tokens"] == t].set_index("d_model")["dense / sparse (seed)"]
        seed_vals = [seed.get(d, np.nan) for d in part["d_model"]]
        if not np.all(np.isnan(seed_vals)):
            ax.plot(x, seed_vals, "D", color=COLORS["dense"], label="seed project (reported)")
        if t == 100:
            lo, hi = SEED_REPORTED_100_TOKENS
            ax.axhspan(lo, hi, color=COLORS["dense"], alpha=0.15, label="seed project (reported range)")
        ax.axhline(1.0, color="grey", lw=1)
        ax.set_xticks(x, [str(d) for d in part["d_model"]])
        ax.set_xlabel("d_model")
        ax.set_ylabel("dense time / sparse time (x)")
        ax.set_title(f"whole forward on {t} token{'s' if t > 1 else ''}, no cache")
        ax.legend(loc="upper left")
    fig.tight_layout()
    return fig


def batch_figure(cross: pd.DataFrame, batch: int) -> Figure:
    """One decode step of the whole model against batch size; bars for ``batch``: dense, decode, masked."""
    style()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw={"width_ratios": [3, 2]})
    b = cross["batch"].to_numpy()
    ax1.plot(b, cross["dense ms"] / cross["sparse decode ms"], "o-", color=COLORS["sparse"],
             label="sparse FF, decode path")
    ax1.plot(b, cross["dense ms"] / cross["sparse masked ms"], "s--", color=COLORS["controller"],
             label="sparse FF, dense-masked path")
    ax1.axhline(1.0, color="grey", lw=1)
    ax1.axvline(batch, color=COLORS["measured"], lw=1.5, alpha=0.6)
    ax1.set_xscale("log", base=2)
    ax1.set_xticks(b, [str(v) for v in b])
    ax1.set_xlabel("sequences decoded together (batch size)")
    ax1.set_ylabel("speed-up over dense (x)")
    ax1.set_title("One decode step of the whole model")
    ax1.legend()
    row = cross[cross["batch"] == batch].iloc[0]
    names = ["dense", "sparse\ndecode", "sparse\nmasked"]
    vals = [row["dense ms"], row["sparse decode ms"], row["sparse masked ms"]]
    ax2.bar(names, vals, color=[COLORS["dense"], COLORS["sparse"], COLORS["controller"]])
    ax2.set_ylabel("ms per decode step")
    ax2.set_title(f"batch {batch}: {row['dense ms'] / min(vals[1:]):.2f}x with the better sparse path")
    fig.tight_layout()
    return fig
