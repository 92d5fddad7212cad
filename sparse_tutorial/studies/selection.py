"""How sparse FF layers pick their units: usage statistics, pictures and the controller experiments of chapter 2.

* :func:`ff_inputs` captures what a model's FF layers see; :func:`unit_counts` counts how often each unit is
  chosen; :func:`usage_stats` turns counts into the numbers chapter 2 reports (units used, dead units,
  entropy of the in-block choice, load of the busiest unit).
* :func:`plot_selection_heatmap`, :func:`plot_usage_histogram`, :func:`plot_active_units` and
  :func:`plot_decode_cost` draw the chapter's figures.
* :func:`worked_example`, :func:`selection_table`, :func:`gathered_rows` and :func:`selection_schematic` open one
  small layer up: the controller's scores, the unit picked in each block, the rows of ``W1^T`` and ``W2`` the
  decode path gathers, and the output.
* :func:`choice_frequencies`, :func:`gradient_reach` and :func:`hard_call_share` measure the training tricks:
  the sampled choice against ``softmax(logits / noise_scale)``, where the straight-through gradient goes, and
  the share of hard-mask calls.
* :class:`Variant` and :func:`compare_variants` train the same small model with different controllers and
  selection tricks (hard/soft mix, Gumbel noise) and tabulate loss and unit usage.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch
from matplotlib.figure import Figure
from matplotlib.patches import ConnectionPatch, Rectangle

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
    "worked_example", "selection_table", "gathered_rows", "selection_schematic", "choice_frequencies",
    "plot_choice_frequencies", "gradient_reach", "hard_call_share",
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
# One small layer, opened up (chapter 2's schematic and worked example)
# --------------------------------------------------------------------------------------------------

#: The worked example's weights: d_model 3, d_ff 8, N 4 (two blocks), d_lowrank 2, all small integers.
WORKED_EXAMPLE = {
    "x": [1, 2, -1],
    "c1": [[1, 1, 0], [0, 1, 1]],                                          # C1^T: (d_lowrank, d_model)
    "c2": [[1, 0], [0, 1], [1, 1], [-1, 1], [0, -1], [1, 2], [1, 0], [0, 0]],  # C2^T: (d_ff, d_lowrank)
    "c": [0, 0, 0, 0, 0, 0, 0, 1],                                          # controller bias (d_ff,)
    "w1": [[1, 0, 0], [0, 1, 0], [1, 1, 1], [0, 0, 1],                      # W1^T: one row per unit
           [1, -1, 0], [2, 0, -1], [0, 1, 1], [-1, 0, 0]],
    "w2": [[1, 1, 0], [0, -1, 1], [1, 0, 1], [-1, 0, 1],                    # W2: one row per unit
           [1, 0, 0], [0, 1, 1], [0, 0, -1], [1, -1, 0]],
    "b2": [0, 0, 0],
}


def worked_example() -> tuple[SparseFF, torch.Tensor]:
    """A real :class:`SparseFF` (d_model 3, d_ff 8, N 4: two blocks) with the integer weights of
    :data:`WORKED_EXAMPLE`, in eval mode, and its input token ``x`` ``(1, 3)``.

    Every number of the forward pass is a small integer, so it can be followed by hand.
    """
    w = {k: torch.tensor(v, dtype=torch.float32) for k, v in WORKED_EXAMPLE.items()}
    ff = SparseFF(3, 8, 4)
    with torch.no_grad():
        ff.controller.c1.weight.copy_(w["c1"])
        ff.controller.c2.weight.copy_(w["c2"])       # copy_ keeps the layer's own memory layout
        ff.controller.c2.bias.copy_(w["c"])
        ff.w1.copy_(w["w1"])
        ff.w2.copy_(w["w2"])
        ff.b2.copy_(w["b2"])
    return ff.eval(), w["x"].unsqueeze(0)


def _one_token(ff: SparseFF, x: torch.Tensor) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=ff.w1.dtype)
    if x.numel() != ff.d_model:
        raise ValueError(f"x must be one token of d_model={ff.d_model} values, got shape {tuple(x.shape)}")
    return x.reshape(1, ff.d_model)


def _fmt(v: float) -> str:
    return f"{v:.0f}" if float(v).is_integer() else f"{v:.2f}"


def _vec(t: torch.Tensor) -> str:
    return "[" + ", ".join(_fmt(v) for v in t.tolist()) + "]"


@torch.no_grad()
def selection_table(ff: SparseFF, x: torch.Tensor) -> pd.DataFrame:
    """One row per hidden unit for one token: its block, its index in the block, its controller score, and
    whether it is the argmax of its block (the unit the token uses at evaluation)."""
    x = _one_token(ff, x)
    scores = ff.controller(x)[0]                                        # (d_ff,)
    chosen = set(ff.selected(x)[0].tolist())
    return pd.DataFrame({
        "unit": range(ff.d_ff),
        "block": [u // ff.block_size for u in range(ff.d_ff)],
        "unit in block": [u % ff.block_size for u in range(ff.d_ff)],
        "score": scores.tolist(),
        "chosen": [u in chosen for u in range(ff.d_ff)],
    }).set_index("unit")


@torch.no_grad()
def gathered_rows(ff: SparseFF, x: torch.Tensor) -> pd.DataFrame:
    """The rows :meth:`SparseFF.decode` reads for one token: one per block, with its pre-activation
    ``W1^T[k] . x``, its activation ``relu(...)`` and its ``W2`` row."""
    x = _one_token(ff, x)
    idx = ff.selected(x)[0]                                             # (n_blocks,)
    pre = ff.w1[idx] @ x[0]                                             # (n_blocks,)
    return pd.DataFrame({
        "block": range(ff.n_blocks),
        "unit k": idx.tolist(),
        "W1ᵀ row k": [_vec(r) for r in ff.w1[idx]],
        "W1ᵀ[k] · x": pre.tolist(),
        "act = relu": pre.relu().tolist(),
        "W2 row k": [_vec(r) for r in ff.w2[idx]],
    }).set_index("block")


@torch.no_grad()
def selection_schematic(ff: SparseFF, x: torch.Tensor, *, title: str | None = None,
                        annotate: bool | None = None) -> Figure:
    """Per-block selection for one token, drawn from a real layer, one row per hidden unit in every panel.

    Panels: (1) the controller's scores with the argmax of each block framed; (2) ``W1^T`` with the gathered
    rows framed (the others faded); (3) the activations of the chosen units; (4) ``W2`` with the gathered rows;
    (5) the output ``y``. Black lines separate the blocks. ``annotate`` writes the numbers into the cells
    (default: when the layer is small enough to read them).
    """
    x = _one_token(ff, x)
    if annotate is None:
        annotate = ff.d_ff * ff.d_model <= 256
    scores = ff.controller(x)[0]                                        # (d_ff,)
    idx = ff.selected(x)[0].tolist()                                    # (n_blocks,)
    act = torch.zeros(ff.d_ff)
    act[idx] = (ff.w1[idx] @ x[0]).relu()
    y = ff.decode(x)[0]                                                 # (d_model,)
    fig = plt.figure(figsize=(11, max(3.0, 0.32 * ff.d_ff + 1.6)), layout="constrained")
    axes = fig.subplots(1, 5, width_ratios=[1.3, ff.d_model, 1.3, ff.d_model, 1.3])
    panels = [
        ("1. controller\nscores", scores.unsqueeze(1), "Purples"),
        (f"2. W1ᵀ, one row per unit\nrow · x, x = {_vec(x[0])}" if annotate else "2. W1ᵀ (rows: units)",
         ff.w1.detach(), "RdBu_r"),
        ("3. act =\nrelu(row · x)", act.unsqueeze(1), "Oranges"),
        ("4. W2, one row per unit", ff.w2.detach(), "RdBu_r"),
    ]
    unchosen = [u for u in range(ff.d_ff) if u not in idx]
    for i, (ax, (name, mat, cmap)) in enumerate(zip(axes, panels)):
        lim = float(mat.abs().max()) or 1.0
        vmin = -lim if cmap == "RdBu_r" else min(0.0, float(mat.min()))
        ax.imshow(mat.numpy(), cmap=cmap, vmin=vmin, vmax=lim, aspect="auto", interpolation="nearest")
        for u in unchosen:                                              # fade what the token does not read
            ax.add_patch(Rectangle((-0.5, u - 0.5), mat.shape[1], 1, color="white", alpha=0.65, lw=0))
        for u in idx:
            ax.add_patch(Rectangle((-0.5, u - 0.5), mat.shape[1], 1, fill=False, ec="tab:orange", lw=2.2))
        for b in range(1, ff.n_blocks):
            ax.axhline(b * ff.block_size - 0.5, color="black", lw=1.2)
        if annotate:
            for (r, c), v in np.ndenumerate(mat.numpy()):
                if i == 2 and r in unchosen:
                    continue
                dark = abs(v) > 0.6 * lim if cmap == "RdBu_r" else v - vmin > 0.6 * (lim - vmin)
                ax.text(c, r, _fmt(v), ha="center", va="center", fontsize=8,
                        color="white" if dark and r in idx else "black")
        ax.set_title(name, fontsize=9)
        ax.set_xticks(range(mat.shape[1]) if mat.shape[1] > 1 else [])
        ax.set_yticks(range(ff.d_ff) if ff.d_ff <= 32 else [])
        if i:
            ax.set_yticklabels([])
    axes[1].set_xlabel("input component")
    axes[3].set_xlabel("output component")
    axes[0].set_ylabel(f"hidden unit ({ff.n_blocks} blocks of N = {ff.block_size})")
    for a, b in ((0, 1), (2, 3)):                                       # chosen score -> its row -> W2 row
        for u in idx:
            fig.add_artist(ConnectionPatch((0.5, u), (-0.5, u), "data", "data", axesA=axes[a],
                                           axesB=axes[b], color="tab:orange", lw=1.2, arrowstyle="->"))
    ax = axes[4]
    ax.imshow(y.unsqueeze(1).numpy(), cmap="RdBu_r", vmin=-float(y.abs().max() or 1),
              vmax=float(y.abs().max() or 1), aspect="auto", interpolation="nearest")
    if annotate:
        for r, v in enumerate(y.tolist()):
            ax.text(0, r, _fmt(v), ha="center", va="center", fontsize=8)
    ax.set_title("5. output y =\nΣ act·W2 row + b2", fontsize=9)
    ax.set_xticks([])
    ax.set_yticks(range(ff.d_model) if ff.d_model <= 32 else [])
    ax.set_ylabel("output component")
    ax.yaxis.set_label_position("right")
    ax.yaxis.tick_right()
    fig.suptitle(title or f"One token through a sparse FF layer: units {idx} are read "
                 f"({ff.n_blocks} of {ff.d_ff})", fontsize=10)
    return fig


# --------------------------------------------------------------------------------------------------
# The training tricks, measured
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def choice_frequencies(ff: SparseFF, logits: torch.Tensor, draws: int = 20000, seed: int = 0) -> pd.DataFrame:
    """How often each unit of one block is chosen in ``draws`` training-mode draws, against the target.

    ``logits``: the ``(block_size,)`` controller scores of one block. Columns: ``softmax(logits / T)`` with
    ``T = ff.noise_scale`` (the distribution the Gumbel-max trick samples from); ``Gumbel-max`` (the
    reference's ``argmax(log p + T g)`` with standard Gumbel noise ``g``); ``layer's sampler`` (what
    :meth:`SparseFF._sample`, the layer's own draw, picks). Both draws use the same number of samples.
    """
    logits = torch.as_tensor(logits, dtype=torch.float32).flatten()
    if logits.numel() != ff.block_size:
        raise ValueError(f"logits must hold block_size={ff.block_size} scores, got {logits.numel()}")
    if ff.noise_scale <= 0:
        raise ValueError("choice_frequencies needs noise_scale > 0 (noise_scale 0 is the plain argmax)")
    torch.manual_seed(seed)
    u = torch.rand(draws, ff.block_size).clamp_(1e-12, 1 - 1e-7)
    gumbel = -torch.log(-torch.log(u))
    ref = (torch.log_softmax(logits, -1) + ff.noise_scale * gumbel).argmax(-1)
    own = ff._sample(logits.expand(draws, 1, ff.block_size))[:, 0]
    count = lambda c: (torch.bincount(c, minlength=ff.block_size) / draws).tolist()  # noqa: E731
    return pd.DataFrame({
        "unit": range(ff.block_size),
        "logit": logits.tolist(),
        f"softmax(logits / {ff.noise_scale:g})": torch.softmax(logits / ff.noise_scale, -1).tolist(),
        "Gumbel-max": count(ref),
        "layer's sampler": count(own),
    }).set_index("unit")


def plot_choice_frequencies(freq: pd.DataFrame, *, ax=None, draws: int | None = None) -> Figure:
    """Bars: the two samplers' frequencies; dots: the softmax target (a table of :func:`choice_frequencies`)."""
    target = [c for c in freq.columns if c.startswith("softmax")][0]
    fig, ax = _fig_ax(ax, (9, 3))
    x = np.arange(len(freq))
    ax.bar(x - 0.2, freq["Gumbel-max"], width=0.4, color="tab:grey", label="Gumbel-max draws (reference)")
    ax.bar(x + 0.2, freq["layer's sampler"], width=0.4, color="tab:purple", label="SparseFF._sample draws")
    ax.plot(x, freq[target], "o", color="black", ms=4, label=target)
    ax.set(xlabel="unit within the block", ylabel="share of draws",
           title="Which unit a training call picks" + (f" ({draws} draws each)" if draws else ""))
    ax.legend(fontsize=8)
    return fig


def gradient_reach(ff: SparseFF, x: torch.Tensor, *, hard: bool, seed: int = 0) -> pd.DataFrame:
    """Where one training call's gradient goes, per hidden unit, for one token and the loss ``y.sum()``.

    Columns: ``mask``, the mask value the forward pass used; ``grad score``, the gradient reaching the unit's
    controller score; the sizes (norms) of the gradients reaching its ``W1^T`` row and its ``W2`` row. ``hard=True`` forces the straight-through
    hard mask, ``False`` the soft mask. The layer's parameters and settings are left as they were.
    """
    x = _one_token(ff, x)
    was_training, hard_prob = ff.training, ff.hard_prob
    captured = {}

    def keep(module, inp, out):
        out.retain_grad()
        captured["scores"] = out

    hook = ff.controller.register_forward_hook(keep)
    try:
        ff.train()
        ff.hard_prob = 1.0 if hard else 0.0
        torch.manual_seed(seed)
        mask = ff.mask(x)                                               # the mask forward() will use
        for p in ff.parameters():
            p.grad = None
        torch.manual_seed(seed)
        ff(x).sum().backward()
        scores = captured["scores"]
        rows = {
            "block": [u // ff.block_size for u in range(ff.d_ff)],
            "mask": mask.detach().flatten().tolist(),
            "grad score": scores.grad[0].tolist(),
            "|grad W1ᵀ row|": ff.w1.grad.norm(dim=1).tolist(),
            "|grad W2 row|": ff.w2.grad.norm(dim=1).tolist(),
        }
    finally:
        hook.remove()
        ff.hard_prob = hard_prob
        ff.train(was_training)
        for p in ff.parameters():
            p.grad = None
    return pd.DataFrame(rows).rename_axis("unit")


@torch.no_grad()
def hard_call_share(ff: SparseFF, x: torch.Tensor, calls: int = 2000, seed: int = 0) -> dict[str, float]:
    """Run ``calls`` training-mode calls and count how many used the hard mask (``ff.last_mask_hard``).

    Returns the count, the share, the layer's ``hard_prob`` and the binomial standard deviation of the share.
    """
    was_training = ff.training
    ff.train()
    torch.manual_seed(seed)
    hard = 0
    try:
        for _ in range(calls):
            ff.mask(x)
            hard += bool(ff.last_mask_hard)
    finally:
        ff.train(was_training)
    p = ff.hard_prob
    return {"calls": calls, "hard calls": hard, "share": hard / calls, "hard_prob": p,
            "binomial std": math.sqrt(p * (1 - p) / calls)}


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
                     seeds: Sequence[int] | None = None, progress: bool = True
                     ) -> tuple[pd.DataFrame, dict[str, pd.DataFrame], dict[str, TransformerLM]]:
    """Train one model per variant and seed (the same data order, optimizer and initialisation for every variant
    of a seed); tabulate loss and unit usage.

    ``seeds`` (default ``(tc.seed,)``): each seed sets the initialisation and the batches. ``train loss`` and
    ``val loss`` are the means over the seeds, ``val min`` and ``val max`` their range (one seed: equal) and
    ``val losses`` the list. Usage columns, histories and models are the first seed's.

    Returns ``(table, histories, models)``: one table row per variant, each variant's training history and
    its trained model (in eval mode).
    """
    seeds = [tc.seed] if seeds is None else list(seeds)
    if not seeds or len(set(seeds)) != len(seeds) or not all(isinstance(s, int) and not isinstance(s, bool)
                                                             for s in seeds):
        raise ValueError(f"seeds must be distinct integers, at least one, got seeds={seeds!r}")
    rows, histories, models = [], {}, {}
    for v in variants:
        train_losses, val_losses = [], []
        for seed in seeds:
            run_tc = replace(tc, seed=seed)
            torch.manual_seed(seed)
            model = TransformerLM(ModelConfig(**{**cfg.to_dict(), "ff": "sparse", "controller": v.controller}))
            set_selection(model, hard_prob=v.hard_prob, noise_scale=v.noise_scale)
            if seed == seeds[0]:
                before = usage_stats(usage_of_model(model, data), cfg.ff_block_size)
            desc = v.name if len(seeds) == 1 else f"{v.name}, seed {seed}"
            hist = train_lm(model, data, run_tc, progress=progress, desc=desc)
            train_losses.append(float(hist["train_loss"].iloc[-1]))
            val_losses.append(float(hist["val_loss"].iloc[-1]))
            if seed == seeds[0]:
                after = usage_stats(usage_of_model(model, data), cfg.ff_block_size)
                histories[v.name], models[v.name] = hist, model
                sec = hist["sec_per_step"].mean()
        ctrl_params = sum(p.numel() for ff in sparse_layers(models[v.name]) for p in ff.controller.parameters())
        rows.append({
            "variant": v.name, "controller": v.controller, "hard_prob": v.hard_prob,
            "noise_scale": v.noise_scale, "controller params": ctrl_params,
            "train loss": float(np.mean(train_losses)), "val loss": float(np.mean(val_losses)),
            "val min": min(val_losses), "val max": max(val_losses), "val losses": val_losses, "seeds": len(seeds),
            "units used before": before["units used"], "units used after": after["units used"],
            "entropy after": after["normalised entropy"], "max load after": after["max load"],
            "sec/step": sec,
        })
    return pd.DataFrame(rows), histories, models
