"""Comparing dense and sparse training runs: curves, summary tables, quality targets, generated samples.

Chapter 3 trains a dense and a sparse model with the same steps, batch, optimizer and seed and asks whether
the sparse one keeps the quality. Everything here takes histories (DataFrames) or numbers, so the chapter's
tables and figures are computed when the notebook runs.
"""
from __future__ import annotations

import textwrap
from dataclasses import dataclass

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure

from ..layers.sparse_ff import SparseFF
from .plots import COLORS

__all__ = ["plot_curves", "Target", "target_table", "sample_text", "samples_figure", "run_summary",
           "missed_target_remedies"]


def plot_curves(histories: dict[str, pd.DataFrame], x: str, ys: list[str], *, ax=None, xlabel: str | None = None,
                ylabel: str = "", title: str = "") -> Figure:
    """One line per run and column: ``histories[name][y]`` against ``histories[name][x]``.

    Solid lines for the first column of ``ys``, dashed for the next ones; one colour per run.
    """
    if ax is None:
        fig, ax = plt.subplots(figsize=(7, 3.6), layout="constrained")
    else:
        fig = ax.figure
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for i, (name, hist) in enumerate(histories.items()):
        color = COLORS.get(name, cycle[i % len(cycle)])
        for j, y in enumerate(ys):
            ax.plot(hist[x], hist[y], styles[j % len(styles)], color=color, marker="o", ms=3,
                    label=f"{name}: {y.replace('_', ' ')}")
    ax.set_xlabel(xlabel or x.replace("_", " "))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


@dataclass(frozen=True)
class Target:
    """A quality or speed target: ``measured <= limit`` (or ``>=`` when ``higher_is_better``)."""

    name: str
    measured: float
    limit: float
    higher_is_better: bool = False
    unit: str = ""

    @property
    def met(self) -> bool:
        return self.measured >= self.limit if self.higher_is_better else self.measured <= self.limit


def target_table(targets: list[Target]) -> pd.DataFrame:
    """The targets as a table: target, limit, measured, met yes/no."""
    return pd.DataFrame({
        "target": [t.name for t in targets],
        "limit": [f"{'>=' if t.higher_is_better else '<='} {t.limit:.4g}{t.unit}" for t in targets],
        "measured": [f"{t.measured:.4g}{t.unit}" for t in targets],
        "met": ["yes" if t.met else "NO" for t in targets],
    })


@torch.no_grad()
def sample_text(model, vocab, prompt: str, n_tokens: int, *, temperature: float = 0.8, top_k: int | None = None,
                seed: int = 0) -> str:
    """Generate ``n_tokens`` characters after ``prompt`` in eval mode with a seeded generator."""
    model.eval()
    idx = torch.tensor([vocab.encode(prompt)], dtype=torch.long)
    g = torch.Generator().manual_seed(seed)
    out = model.generate(idx, n_tokens, temperature=temperature, top_k=top_k, generator=g)
    return vocab.decode(out[0])


def samples_figure(texts: dict[str, str], *, title: str = "", width: int = 60) -> Figure:
    """Side-by-side text panels, one per model (for a slider over the sampling temperature)."""
    fig, axes = plt.subplots(1, len(texts), figsize=(5.2 * len(texts), 4.6), layout="constrained")
    axes = [axes] if len(texts) == 1 else list(axes)
    for ax, (name, text) in zip(axes, texts.items()):
        lines = []
        for para in text.splitlines():
            lines.extend(textwrap.wrap(para, width) or [""])
        ax.text(0.0, 1.0, "\n".join(lines[:22]), va="top", ha="left", family="monospace", fontsize=8,
                transform=ax.transAxes)
        ax.set_title(name)
        ax.axis("off")
    fig.suptitle(title)
    return fig


def run_summary(models: dict, runs: dict[str, pd.DataFrame], active: dict[str, int], *,
                metrics: dict[str, str], seconds: tuple[str, str]) -> pd.DataFrame:
    """One row per model: parameters, active FF units, the last value of each history column in ``metrics``
    (``column -> label``), and the median of ``seconds = (column, label)``."""
    col, label = seconds
    return pd.DataFrame.from_dict(orient="index", data={
        name: {"parameters": models[name].num_params(), "active FF units": active[name],
               **{lab: run[c].iloc[-1] for c, lab in metrics.items()}, label: run[col].median()}
        for name, run in runs.items()})


def missed_target_remedies(val: dict, acc: dict, step_ratio: float, *, block_size: int,
                           d_model: int) -> dict[int, str]:
    """What chapter 3 prints under each missed target (0: LM loss, 1: image accuracy, 2: step time),
    from the run's numbers: the gap, and the levers "Closing the gap" measures."""
    smaller = (f" or give each token more units with a smaller block size (book_config('sparse', "
               f"ff_block_size={block_size // 2}))" if block_size > 2 else "")
    if block_size < SparseFF.HARD_KERNEL_MIN_BLOCK:
        train_path = (f"With blocks of {block_size} units (fewer than SparseFF.HARD_KERNEL_MIN_BLOCK = "
                      f"{SparseFF.HARD_KERNEL_MIN_BLOCK}) the fused path (pip install numba) keeps the dense "
                      f"layer's products, since 1/{block_size} of the units is chosen, and fuses the softmax, "
                      f"the mask and the ReLU: the step costs the dense layer's plus the controller's and those "
                      f"passes. Larger blocks (book_config('sparse', ff_block_size=32, d_lowrank=None)) train "
                      f"on the chosen units only, faster than dense, at the cost in loss that 'Closing the gap' "
                      f"measures.")
    else:
        train_path = ("The fused path (pip install numba) computes only the chosen units of a hard call, and the "
                      "recipe makes every call hard (ff_hard_prob=1.0).")
    return {
        0: (f"The sparse model's validation loss is {val['sparse']:.4f} against {val['dense']:.4f} "
            f"({val['sparse'] / val['dense'] - 1:+.1%}). The earlier PyTorch project also found that its "
            f"sparse model needed more steps; train longer (book_train_config(steps=...)){smaller}. "
            f"The next section, 'Closing the gap', measures these levers and others one at a time."),
        1: (f"The sparse image network reaches {acc['sparse']:.2%} against {acc['dense']:.2%}. In this network "
            f"every image must pass through the units its controller picks (there is no residual path around "
            f"the FF layer, unlike in a Transformer block). 'The image network' below reads a recorded study "
            f"of the levers: smaller blocks, scaling by the probability, the hard-mask share."),
        2: (f"A sparse training step takes {step_ratio:.2f}x a dense one. Written as a mask (SparseFF's "
            f"PyTorch training path, taken without Numba or with train_path='pytorch'), training computes the "
            f"dense layer plus the controller, a softmax over all units and the mask multiply, full-size passes "
            f"over (tokens x d_ff) numbers; at d_model = {d_model} these passes are a large share of the FF "
            f"layer's time (their share falls as d_model grows). {train_path}"),
    }
