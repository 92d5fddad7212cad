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

from .plots import COLORS

__all__ = ["plot_curves", "Target", "target_table", "sample_text", "samples_figure"]


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
