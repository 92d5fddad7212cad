"""How sparse FF layers pick their units: usage statistics, pictures and the controller experiments of chapter 2.

* :func:`ff_inputs` captures what a model's FF layers see; :func:`unit_counts` counts how often each unit is
  chosen; :func:`usage_stats` turns counts into the numbers chapter 2 reports (units used, dead units,
  entropy of the in-block choice, load of the busiest unit).
* :func:`plot_selection_heatmap`, :func:`plot_usage_histogram`, :func:`plot_active_units` and
  :func:`plot_decode_cost` draw the chapter's figures.
* :class:`Variant` and :func:`compare_variants` train the same small model with different controllers and
  selection tricks (hard/soft mix, Gumbel noise) and tabulate loss and unit usage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure

from .. import config as run_config
from .._checks import real_number
from ..data import TextData
from ..layers.sparse_ff import SparseFF
from ..measure.costs import sparse_ff_breakdown
from ..model import ModelConfig, TransformerLM
from ..train import TrainConfig, train_lm

__all__ = [
    "sparse_layers", "ff_inputs", "unit_counts", "usage_stats", "set_selection",
    "plot_selection_heatmap", "plot_usage_histogram", "plot_active_units", "plot_decode_cost",
    "Variant", "study_config", "study_train_config", "usage_of_model", "compare_variants",
]


# --------------------------------------------------------------------------------------------------
# What the FF layers see and choose
# --------------------------------------------------------------------------------------------------


def sparse_layers(model: torch.nn.Module) -> list[SparseFF]:
    """The model's :class:`SparseFF` layers, first block first."""
    return [m for m in model.modules() if isinstance(m, SparseFF)]


@torch.no_grad()
def ff_inputs(model: TransformerLM, idx: torch.Tensor) -> list[torch.Tensor]:
    """The input of every block's FF layer (the LayerNorm-ed residual stream) for tokens ``idx`` ``(B, T)``.

    Returns one ``(B, T, d_model)`` tensor per block. Runs the model in eval mode (deterministic masks).
    """
    captured: list[torch.Tensor] = []
    hooks = [block.ln2.register_forward_hook(lambda mod, inp, out: captured.append(out.detach()))
             for block in model.blocks]
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return captured


@torch.no_grad()
def unit_counts(ff: SparseFF, x: torch.Tensor) -> torch.Tensor:
    """How many of the tokens in ``x`` ``(..., d_model)`` pick each unit at eval: a ``(d_ff,)`` int tensor."""
    idx = ff.selected(x).flatten()                                   # (tokens * n_blocks,)
    return torch.bincount(idx, minlength=ff.d_ff)


def usage_stats(counts: torch.Tensor, block_size: int) -> dict[str, float]:
    """Summaries of unit usage from the counts of :func:`unit_counts` (one layer or several concatenated).

    * ``units used``: fraction of units picked at least once; ``dead units``: how many never are;
    * ``entropy (bits)``: mean over blocks of the entropy of the in-block choice; ``log2(block_size)``
      when every unit of a block is picked equally often, 0 when one unit takes all tokens;
    * ``normalised entropy``: the same divided by ``log2(block_size)`` (1 = perfect balance);
    * ``max load``: share of its block's tokens taken by the busiest unit, times ``block_size``
      (1 = balanced, ``block_size`` = one unit takes everything).
    """
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    if counts.numel() % block_size:
        raise ValueError(f"counts has {counts.numel()} entries, not a multiple of block_size={block_size}")
    blocks = counts.view(-1, block_size)                              # (blocks, block_size)
    totals = blocks.sum(-1, keepdim=True)
    if (totals == 0).any():
        raise ValueError("every block needs at least one counted token; pass counts of a non-empty input")
    share = blocks / totals
    entropy = -(share * torch.log2(share.clamp_min(1e-300))).sum(-1)  # (blocks,)
    return {
        "units used": float((counts > 0).double().mean()),
        "dead units": int((counts == 0).sum()),
        "entropy (bits)": float(entropy.mean()),
        "normalised entropy": float(entropy.mean() / math.log2(block_size)) if block_size > 1 else 1.0,
        "max load": float((share.max(-1).values * block_size).mean()),
    }


def set_selection(model: torch.nn.Module, *, hard_prob: float | None = None,
                  noise_scale: float | None = None) -> None:
    """Change the training-time selection of every :class:`SparseFF` in ``model`` (chapter 2's ablations)."""
    if hard_prob is not None:
        hard_prob = real_number("hard_prob", hard_prob, 0.0, 1.0)
    if noise_scale is not None:
        noise_scale = real_number("noise_scale", noise_scale, 0.0)
    for ff in sparse_layers(model):
        if hard_prob is not None:
            ff.hard_prob = float(hard_prob)
        if noise_scale is not None:
            ff.noise_scale = float(noise_scale)


# --------------------------------------------------------------------------------------------------
# Pictures
# --------------------------------------------------------------------------------------------------


def plot_selection_heatmap(ff: SparseFF, x: torch.Tensor, *, ax=None, labels: list[str] | None = None,
                           title: str = "Unit picked in each block") -> Figure:
    """Tokens (columns) x blocks (rows); the colour is the in-block index of the active unit.

    ``x``: ``(T, d_model)`` inputs of one sequence. ``labels``: optional token labels (e.g. characters).
    """
    with torch.no_grad():
        choice = ff.selected(x) - ff.block_offset                       # (T, n_blocks) in 0..N-1
    fig, ax = _fig_ax(ax, (10, 3.2))
    im = ax.imshow(choice.T.numpy(), aspect="auto", cmap="viridis", vmin=0, vmax=ff.block_size - 1,
                   interpolation="nearest")
    ax.set_xlabel("token position")
    ax.set_ylabel("block")
    ax.set_title(title)
    if labels is not None:
        ax.set_xticks(range(len(labels)))
        ax.set_xticklabels([repr(c)[1:-1] if c.strip() else "␣" for c in labels], fontsize=7)
    fig.colorbar(im, ax=ax, label="unit index within its block")
    return fig


def plot_usage_histogram(counts: torch.Tensor, block_size: int, *, ax=None,
                         title: str = "How often each unit is picked") -> Figure:
    """Bar per unit: the share of tokens that pick it; dashed lines separate blocks, the dotted line is 1/N."""
    counts = torch.as_tensor(counts, dtype=torch.float64).flatten()
    blocks = counts.view(-1, block_size)
    share = (blocks / blocks.sum(-1, keepdim=True)).flatten().numpy()
    stats = usage_stats(counts, block_size)
    fig, ax = _fig_ax(ax, (10, 3))
    ax.bar(np.arange(len(share)), share, width=1.0, color="tab:blue")
    for b in range(1, len(share) // block_size):
        ax.axvline(b * block_size - 0.5, color="grey", lw=0.5, ls="--")
    ax.axhline(1 / block_size, color="black", lw=1, ls=":", label=f"uniform, 1/N = 1/{block_size}")
    ax.set_xlim(-0.5, len(share) - 0.5)
    ax.set_xlabel("hidden unit")
    ax.set_ylabel("share of its block's tokens")
    ax.set_title(f"{title}\nentropy {stats['normalised entropy']:.2f} of the maximum, "
                 f"{stats['dead units']} dead units of {len(share)}")
    ax.legend(loc="upper right", fontsize=8)
    return fig


def plot_active_units(ff: SparseFF, x: torch.Tensor, *, ax=None, title: str | None = None) -> Figure:
    """Tokens (rows) x all ``d_ff`` units (columns): a dark cell is an active unit; lines mark the blocks."""
    with torch.no_grad():
        idx = ff.selected(x)                                            # (T, n_blocks)
    active = torch.zeros(x.shape[0], ff.d_ff)
    active.scatter_(1, idx, 1.0)
    fig, ax = _fig_ax(ax, (10, 3))
    ax.imshow(active.numpy(), aspect="auto", cmap="Greys", interpolation="nearest", vmin=0, vmax=1)
    if ff.n_blocks <= 64:
        for b in range(1, ff.n_blocks):
            ax.axvline(b * ff.block_size - 0.5, color="tab:orange", lw=0.4)
    ax.set_xlabel(f"hidden unit (d_ff = {ff.d_ff}; orange lines: block boundaries)")
    ax.set_ylabel("token")
    ax.set_title(title or f"block size N = {ff.block_size}: {ff.n_blocks} of {ff.d_ff} units active per token")
    return fig


def plot_decode_cost(d_model: int, d_ff: int, block_size: int, d_lowrank: int | None = None, *,
                     controller: str = "lowrank", ax=None, title: str | None = None) -> Figure:
    """Per-token multiply-adds of one FF layer at decode: controller + gathered rows against the dense layer."""
    parts = sparse_ff_breakdown(d_model, d_ff, block_size, d_lowrank, controller)
    ctrl, gathered, dense = parts["controller"], parts["gathered W1/W2 rows"], parts["dense FF"]
    fig, ax = _fig_ax(ax, (7, 2.4))
    ax.barh(["sparse FF"], [ctrl], color="tab:orange", label="controller")
    ax.barh(["sparse FF"], [gathered], left=[ctrl], color="tab:blue", label="gathered W1/W2 rows")
    ax.barh(["dense FF"], [dense], color="tab:grey", label="dense FF")
    ax.set_xlabel("multiply-adds per token")
    ax.set_xlim(0, dense * 1.05)
    ax.set_title(title or f"d_model={d_model}, d_ff={d_ff}, N={block_size}, d_lowrank={d_lowrank or d_ff // block_size}:"
                          f" sparse = {(ctrl + gathered) / dense:.1%} of dense, controller = "
                          f"{ctrl / (ctrl + gathered):.0%} of sparse", fontsize=9)
    ax.legend(loc="lower right", fontsize=8)
    return fig


def _fig_ax(ax, size):
    if ax is None:
        fig, ax = plt.subplots(figsize=size, layout="constrained")
        return fig, ax
    return ax.figure, ax


# --------------------------------------------------------------------------------------------------
# Controller and selection experiments
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One training recipe for the sparse FF selection."""

    name: str
    controller: str = "lowrank"
    hard_prob: float = 0.3
    noise_scale: float = 0.1


def study_config(**overrides) -> ModelConfig:
    """The small sparse-FF model chapter 2 trains many times (tiny in fast mode)."""
    base = run_config.pick(
        default=dict(context_length=64, d_model=64, n_heads=4, n_layers=2, d_ff=256, ff_block_size=16),
        fast=dict(context_length=32, d_model=32, n_heads=2, n_layers=1, d_ff=64, ff_block_size=8),
    )
    base.update(ff="sparse", **overrides)
    return ModelConfig(**base)


def study_train_config(**overrides) -> TrainConfig:
    """Short training runs for chapter 2's comparisons."""
    base = run_config.pick(
        default=dict(steps=400, batch_size=32, lr=3e-3, warmup_steps=30, eval_every=50, eval_batches=10),
        fast=dict(steps=25, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=5, eval_batches=2),
    )
    base.update(overrides)
    return TrainConfig(**base)


@torch.no_grad()
def usage_of_model(model: TransformerLM, data: TextData, *, batch_size: int = 8, seed: int = 0) -> torch.Tensor:
    """Unit counts of all sparse layers (concatenated) on ``batch_size`` validation windows."""
    g = torch.Generator().manual_seed(seed)
    x, _ = data.get_batch("val", batch_size, model.cfg.context_length, generator=g)
    inputs = ff_inputs(model, x)
    return torch.cat([unit_counts(ff, h) for ff, h in zip(sparse_layers(model), inputs)])


def compare_variants(variants: list[Variant], cfg: ModelConfig, tc: TrainConfig, data: TextData, *,
                     progress: bool = True) -> tuple[pd.DataFrame, dict[str, pd.DataFrame],
                                                     dict[str, TransformerLM]]:
    """Train one model per variant (same data order, optimizer and seed); tabulate loss and unit usage.

    Returns ``(table, histories, models)``: one table row per variant, each variant's training history and
    its trained model (in eval mode).
    """
    rows, histories, models = [], {}, {}
    for v in variants:
        torch.manual_seed(tc.seed)
        model = TransformerLM(ModelConfig(**{**cfg.to_dict(), "ff": "sparse", "controller": v.controller}))
        set_selection(model, hard_prob=v.hard_prob, noise_scale=v.noise_scale)
        before = usage_stats(usage_of_model(model, data), cfg.ff_block_size)
        hist = train_lm(model, data, tc, progress=progress, desc=v.name)
        after = usage_stats(usage_of_model(model, data), cfg.ff_block_size)
        ctrl_params = sum(p.numel() for ff in sparse_layers(model) for p in ff.controller.parameters())
        rows.append({
            "variant": v.name, "controller": v.controller, "hard_prob": v.hard_prob,
            "noise_scale": v.noise_scale, "controller params": ctrl_params,
            "train loss": hist["train_loss"].iloc[-1], "val loss": hist["val_loss"].iloc[-1],
            "units used before": before["units used"], "units used after": after["units used"],
            "entropy after": after["normalised entropy"], "max load after": after["max load"],
            "sec/step": hist["sec_per_step"].mean(),
        })
        histories[v.name] = hist
        models[v.name] = model
    return pd.DataFrame(rows), histories, models
