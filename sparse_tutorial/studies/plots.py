"""Shared figure style and the book's recurring plots (parameter splits, rooflines, time per token).

Every function returns a matplotlib ``Figure`` (so :func:`sparse_tutorial.studies.interactive.slider_figure` can
render it) and takes plain numbers or pandas DataFrames, never a model.
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

__all__ = ["COLORS", "PALETTE", "style", "param_split_figure", "roofline_figure", "per_token_figure", "batch_panel"]

#: One colour per concept, the same in every chapter.
#: colours for a series of lines or bars, in order (the first two are COLORS' dense and sparse)
PALETTE = ["#DD8452", "#4C72B0", "#55A868", "#8172B3", "#C44E52", "#937860"]

COLORS = {
    "attention": "#4C72B0",
    "ff": "#DD8452",
    "layernorm": "#55A868",
    "controller": "#8172B3",
    "measured": "#C44E52",
    "model": "#333333",
    "dense": "#DD8452",
    "sparse": "#4C72B0",
}


def style() -> None:
    """The book's matplotlib defaults: readable sizes, light grid, no top/right spines."""
    plt.rcParams.update({
        "figure.dpi": 100, "savefig.dpi": 100, "font.size": 10, "axes.titlesize": 11,
        "axes.grid": True, "grid.alpha": 0.3, "axes.spines.top": False, "axes.spines.right": False,
        "legend.frameon": False,
    })


def param_split_figure(table, title: str = "Where one block's parameters live") -> Figure:
    """Horizontal stacked bars: the share of attention, FF and LayerNorm parameters, one bar per model.

    ``table`` is :func:`sparse_tutorial.measure.params.param_table`'s DataFrame.
    """
    parts = [("attention (QKVO)", "attention", "attention (Q, K, V, O)"), ("FF", "ff", "feed-forward"),
             ("LayerNorm", "layernorm", "LayerNorm")]
    shares = {col: table[col] / table["block total"] for col, _, _ in parts}
    fig, ax = plt.subplots(figsize=(7.5, 0.55 * len(table) + 1.4))
    left = np.zeros(len(table))
    labels = [f"{name}\n(d_model {d})" for name, d in zip(table.index, table["d_model"])]
    for col, key, label in parts:
        vals = shares[col].to_numpy()
        ax.barh(labels, vals, left=left, color=COLORS[key], label=label)
        for i, v in enumerate(vals):
            if v > 0.06:
                ax.text(left[i] + v / 2, i, f"{v:.0%}", ha="center", va="center", color="white", fontsize=9)
        left += vals
    ax.set_xlim(0, 1)
    ax.invert_yaxis()
    ax.set_xlabel("share of the block's parameters")
    ax.set_title(title)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25 if len(table) < 4 else -0.15), ncol=3)
    ax.grid(axis="y", visible=False)
    fig.tight_layout()
    return fig


def _roofline(ax, peak_gflops: float, bandwidth_gbs: float, x_range) -> None:
    xs = np.logspace(np.log10(x_range[0]), np.log10(x_range[1]), 200)
    ax.loglog(xs, np.minimum(peak_gflops, bandwidth_gbs * xs), color=COLORS["model"], lw=2,
              label="roofline: min(peak, bandwidth x intensity)")
    ridge = peak_gflops / bandwidth_gbs
    ax.axvline(ridge, color=COLORS["model"], ls=":", lw=1)
    ax.text(ridge * 1.08, 0.04, f"ridge point\n{ridge:.1f} FLOP/byte", transform=ax.get_xaxis_transform(),
            fontsize=8)
    ax.set_xlabel("arithmetic intensity (FLOP per byte moved)")
    ax.set_ylabel("attainable GFLOP/s")


def roofline_figure(peak_gflops: float, bandwidth_gbs: float, points=None, highlight=None,
                    title: str = "Roofline of this CPU, with the dense FF at each batch size") -> Figure:
    """The roofline ``min(peak, bandwidth * I)`` on log-log axes, with measured points.

    ``points``: a DataFrame with columns ``batch``, ``FLOP/byte`` and ``GFLOP/s`` (from
    :func:`sparse_tutorial.measure.timing.dense_ff_batch_sweep`); ``highlight``: a batch size to ring.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw_roofline_axes(ax, peak_gflops, bandwidth_gbs, points, highlight)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _draw_roofline_axes(ax, peak_gflops, bandwidth_gbs, points, highlight) -> None:
    lo, hi = 0.1, 10 * peak_gflops / bandwidth_gbs
    if points is not None and len(points):
        lo = min(lo, points["FLOP/byte"].min() / 2)
        hi = max(hi, points["FLOP/byte"].max() * 2)
    _roofline(ax, peak_gflops, bandwidth_gbs, (lo, hi))
    if points is not None and len(points):
        ax.loglog(points["FLOP/byte"], points["GFLOP/s"], "o-", color=COLORS["measured"], ms=5,
                  label="dense FF, measured")
        for b, xi, yi in zip(points["batch"], points["FLOP/byte"], points["GFLOP/s"]):
            ax.annotate(f"B={b}", (xi, yi), xytext=(4, -11), textcoords="offset points", fontsize=7)
        if highlight is not None:
            row = points[points["batch"] == highlight]
            if len(row):
                ax.plot(row["FLOP/byte"], row["GFLOP/s"], "o", ms=14, mfc="none", mec=COLORS["measured"], mew=2)
    ax.legend(loc="upper left", fontsize=8)


def per_token_figure(sweep, predicted=None, highlight=None,
                     title: str = "Dense FF: time per token against batch size") -> Figure:
    """Measured µs per token against batch size (log-log), with the roofline's prediction if given.

    ``predicted``: a sequence of predicted µs per token, one per row of ``sweep``.
    """
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw_per_token_axes(ax, sweep, predicted, highlight)
    ax.set_title(title)
    fig.tight_layout()
    return fig


def _draw_per_token_axes(ax, sweep, predicted, highlight) -> None:
    ax.loglog(sweep["batch"], sweep["µs per token"], "o-", color=COLORS["measured"], label="measured")
    if predicted is not None:
        ax.loglog(sweep["batch"], predicted, "--", color=COLORS["model"],
                  label="roofline prediction: max(bytes/bandwidth, FLOPs/peak) / B")
    if highlight is not None:
        row = sweep[sweep["batch"] == highlight]
        if len(row):
            ax.plot(row["batch"], row["µs per token"], "o", ms=14, mfc="none", mec=COLORS["measured"], mew=2)
    ax.set_xscale("log", base=2)
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.xaxis.set_major_formatter(plain)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(plain)
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch size B (tokens per call)")
    ax.set_ylabel("time per token (µs)")
    ax.legend(fontsize=8)


def batch_panel(sweep, peak_gflops: float, bandwidth_gbs: float, predicted, batch: int) -> Figure:
    """Two panels for one batch size: where it sits on the roofline, and its time per token."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(11.5, 4.3))
    _draw_roofline_axes(a, peak_gflops, bandwidth_gbs, sweep, batch)
    a.set_title("Roofline position")
    _draw_per_token_axes(b, sweep, predicted, batch)
    b.set_title("Time per token")
    batches = list(sweep["batch"])
    if batch not in batches:
        raise ValueError(f"batch={batch!r} is not one of the measured batch sizes {batches}")
    pos = batches.index(batch)
    row = sweep.iloc[pos]
    pred = float(np.asarray(predicted)[pos])
    bound = "memory-bound" if row["FLOP/byte"] < peak_gflops / bandwidth_gbs else "compute-bound"
    fig.suptitle(f"B = {batch}: {row['FLOP/byte']:.1f} FLOP/byte ({bound} side of the ridge); "
                 f"measured {row['µs per token']:.0f} µs/token, roofline predicts {pred:.0f} µs/token")
    fig.tight_layout()
    return fig


def mask_modes_figure(ff, x, block: int = 0, seed: int = 4, title: str = "") -> Figure:
    """One token's mask over the units of one block of a ``SparseFF`` in its three modes: the soft mask
    ``p = softmax(logits)``, a hard training sample (temperature 0.1) and the evaluation argmax.

    ``x`` is one token, shape ``(1, d_model)``. The layer's mode and ``hard_prob`` are restored afterwards.
    """
    import torch

    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"x must be one token of shape (1, d_model), got {tuple(x.shape)}")
    was_training, hard_prob = ff.training, ff.hard_prob
    try:
        with torch.no_grad():
            soft = torch.softmax(ff.block_logits(x), -1)[0, block]
            ff.train()
            ff.hard_prob = 1.0
            torch.manual_seed(seed)
            hard = ff.mask(x)[0, block]
            evalm = ff.eval().mask(x)[0, block]
    finally:
        ff.train(was_training)
        ff.hard_prob = hard_prob
    n = ff.block_size
    fig, axes = plt.subplots(1, 3, figsize=(11, 2.6), sharey=True, layout="constrained")
    panels = [(f"soft mask p ({1 - hard_prob:.0%} of training calls)", soft),
              (f"hard mask: a sample, T = 0.1 ({hard_prob:.0%})", hard), ("evaluation: argmax", evalm)]
    for ax, (name, m) in zip(axes, panels):
        ax.bar(range(n), m.float().numpy(), color=COLORS["controller"])
        ax.set(title=name, xlabel=f"unit within block {block} (N = {n})")
    axes[0].set_ylabel("mask value")
    if title:
        fig.suptitle(title)
    return fig
