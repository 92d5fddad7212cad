"""Chapter 4's experiments on sparse QKV: parameter sweeps, the permutation fit, matched model sizes, timing, figures.

The layers themselves live in :mod:`sparse_tutorial.layers.qkv`; this module measures and draws them. Every figure
function returns a matplotlib ``Figure`` (so :func:`sparse_tutorial.studies.interactive.slider_figure` can use it).
"""
from __future__ import annotations

import math
from dataclasses import replace

import matplotlib.pyplot as plt
import pandas as pd
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from tqdm.auto import tqdm

from .._checks import positive_int
from ..layers.attention import CausalSelfAttention
from ..layers.qkv import (
    ConvQKVAttention,
    MultiplicativeAttention,
    MultiplicativeDense,
    conv_qkv_params,
    dense_qkv_params,
    modules_near_sqrt,
    multiplicative_qkv_params,
)
from ..model import ModelConfig, TransformerLM
from .plots import COLORS

__all__ = [
    "attention_maps",
    "modules_near_sqrt",
    "qkv_macs",
    "qkv_param_sweep",
    "conv_param_breakdown",
    "fit_permutation",
    "count_params",
    "matching_d_ff",
    "param_scaling_figure",
    "permutation_fit_figure",
    "loss_curves_figure",
    "modules_figure",
    "attention_head_figure",
]

QKV_COLORS = {"dense": COLORS["dense"], "multiplicative": "#55A868", "conv": COLORS["sparse"]}


def qkv_macs(d_model: int, n_modules: int, kind: str) -> int:
    """Multiply-adds per token of the Q, K, V (and output) projections, attention scores excluded.

    Dense: four ``d x d`` matrices. Multiplicative: each layer is ``S`` gated copies of ``x`` times a
    ``d x M`` matrix, still ``d^2`` multiply-adds: the saving is in *parameters* (memory), not arithmetic.
    Conv: one multiplicative layer (``d^2``) and convolutions of ``(9 + 9 + 3) M^2`` per module.
    """
    M = d_model // n_modules
    if kind == "dense":
        return 4 * d_model * d_model
    if kind == "multiplicative":
        return 4 * d_model * d_model
    if kind == "conv":
        return d_model * d_model + n_modules * (9 + 9 + 3) * M * M
    raise ValueError(f"kind must be 'dense', 'multiplicative' or 'conv', got kind={kind!r}")


def count_params(module_or_cfg) -> int:
    """Parameters of a module, or of the model a :class:`ModelConfig` describes (built on the meta device)."""
    if isinstance(module_or_cfg, ModelConfig):
        with torch.device("meta"):
            module_or_cfg = TransformerLM(module_or_cfg)
    return sum(p.numel() for p in module_or_cfg.parameters())


def qkv_param_sweep(d_values, *, count_up_to: int = 16384) -> pd.DataFrame:
    """Per-layer parameters of dense, multiplicative and conv QKV at ``S = modules_near_sqrt(d)``.

    Up to ``count_up_to`` the counts come from real modules (on the meta device: no memory is used);
    beyond, from the formulas (which the tests check against the modules).
    """
    rows = []
    for d in d_values:
        S = modules_near_sqrt(d)
        if d <= count_up_to:
            with torch.device("meta"):
                counts = dict(dense=count_params(CausalSelfAttention(d, S)),
                              multiplicative=count_params(MultiplicativeAttention(d, S, S)),
                              conv=count_params(ConvQKVAttention(d, S)))
            source = "modules"
        else:
            counts = dict(dense=dense_qkv_params(d), multiplicative=multiplicative_qkv_params(d, S),
                          conv=conv_qkv_params(d, S))
            source = "formula"
        rows.append(dict(d_model=d, S=S, M=d // S, **counts, dense_over_conv=counts["dense"] / counts["conv"],
                         source=source))
    return pd.DataFrame(rows)


def conv_param_breakdown(d_model: int, n_modules: int) -> dict[str, int]:
    """Where the conv QKV layer's parameters live, from a real module: gates D, projection E, bias, convs."""
    with torch.device("meta"):
        attn = ConvQKVAttention(d_model, n_modules)
    return {"gates D (S·d)": attn.mult.D.numel(), "projection E (d·M)": attn.mult.E.numel(),
            "bias (d)": attn.mult.bias.numel(), "conv Q (9M²+M)": count_params(attn.conv_q),
            "conv K (9M²+M)": count_params(attn.conv_k), "conv V (3M²+M)": count_params(attn.conv_v)}


# --------------------------------------------------------------------------------------------------
# The permutation experiment
# --------------------------------------------------------------------------------------------------


def fit_permutation(d: int, n_modules: int, *, steps: int = 500, batch_size: int = 64, lr: float = 0.02,
                    seed: int = 0, progress: bool = True) -> tuple[MultiplicativeDense, torch.Tensor, pd.DataFrame]:
    """Fit a ``MultiplicativeDense(d, d, S)`` to ``y = x[perm]`` for a random permutation with Adam.

    Returns ``(layer, perm, history)``; the history has columns ``step`` and ``mse`` (mean squared error on a
    fixed held-out batch of 1,000 Gaussian inputs).
    """
    positive_int("steps", steps)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(d, generator=g)
    layer = MultiplicativeDense(d, d, n_modules)
    opt = torch.optim.Adam(layer.parameters(), lr=lr)
    x_test = torch.randn(1000, d, generator=g)
    rows = []
    for step in tqdm(range(steps + 1), desc=f"fit a permutation (d={d}, S={n_modules})", disable=not progress):
        if step % max(1, steps // 100) == 0 or step == steps:
            with torch.no_grad():
                rows.append(dict(step=step, mse=torch.mean((layer(x_test) - x_test[:, perm]) ** 2).item()))
        if step == steps:
            break
        x = torch.randn(batch_size, d, generator=g)
        loss = torch.mean((layer(x) - x[:, perm]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return layer, perm, pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# Equal-size models
# --------------------------------------------------------------------------------------------------


def matching_d_ff(target_params: int, cfg: ModelConfig, *, max_factor: int = 4) -> int:
    """The ``d_ff`` (a multiple of ``cfg.ff_block_size``) whose model is closest to ``target_params`` parameters.

    Every other field of ``cfg`` stays; candidates go up to ``max_factor * cfg.d_ff``.
    """
    step = cfg.ff_block_size
    candidates = range(step, max_factor * cfg.d_ff + step, step)
    return min(candidates, key=lambda d_ff: (abs(count_params(replace(cfg, d_ff=d_ff)) - target_params), d_ff))


# --------------------------------------------------------------------------------------------------
# Figures
# --------------------------------------------------------------------------------------------------


def param_scaling_figure(sweep: pd.DataFrame) -> Figure:
    """Per-layer parameters against ``d_model`` (log-log), with ``d^2`` and ``d^1.5`` guides."""
    fig, ax = plt.subplots(figsize=(7, 4.2))
    d = sweep["d_model"].to_numpy(dtype=float)
    for kind, label in [("dense", "dense Q, K, V, O"), ("multiplicative", "multiplicative Q, K, V, O"),
                        ("conv", "multiplicative + conv (sparse QKV)")]:
        ax.plot(d, sweep[kind], "o-", color=QKV_COLORS[kind], label=label)
    formula = sweep["source"] == "formula"
    if formula.any():
        ax.plot(d[formula.to_numpy()], sweep.loc[formula, "conv"], "o", mfc="white", color=QKV_COLORS["conv"],
                label="(open markers: formula, not built)")
        for kind in ("dense", "multiplicative"):
            ax.plot(d[formula.to_numpy()], sweep.loc[formula, kind], "o", mfc="white", color=QKV_COLORS[kind])
    ax.plot(d, 4 * d ** 2, ":", color="grey", label=r"$4d^2$")
    ax.plot(d, 2 * d ** 1.5, "--", color="grey", label=r"$2d^{1.5}$")
    ax.set(xscale="log", yscale="log", xlabel="d_model", ylabel="parameters per attention layer",
           title="Attention-layer parameters at S ≈ √d_model")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def permutation_fit_figure(history: pd.DataFrame, d: int, n_modules: int) -> Figure:
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    ax.plot(history["step"], history["mse"], color=QKV_COLORS["multiplicative"])
    ax.set(yscale="log", xlabel="Adam step", ylabel="mean squared error (held-out inputs)",
           title=f"A multiplicative layer learns a random permutation (d={d}, S={n_modules})")
    fig.tight_layout()
    return fig


def loss_curves_figure(histories: dict[str, pd.DataFrame]) -> Figure:
    """Validation loss against training step, one line per model."""
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, h in histories.items():
        ax.plot(h["step"], h["val_loss"], "o-", ms=3, label=name)
    ax.set(xlabel="training step", ylabel="validation loss (nats per character)",
           title="Tiny Shakespeare: validation loss during training")
    ax.legend()
    fig.tight_layout()
    return fig


def modules_figure(d_model: int, n_modules: int, choices) -> Figure:
    """Left: per-layer parameters of the three QKV kinds against ``S``; right: the conv layer's parts at ``S``."""
    choices = list(choices)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 3.8), gridspec_kw=dict(width_ratios=[1.1, 1]))
    counts = {"dense": [dense_qkv_params(d_model)] * len(choices),
              "multiplicative": [multiplicative_qkv_params(d_model, s) for s in choices],
              "conv": [conv_qkv_params(d_model, s) for s in choices]}
    for kind, ys in counts.items():
        ax.plot(choices, ys, "o-", color=QKV_COLORS[kind], label=kind)
    ax.axvline(n_modules, color="black", lw=1)
    ax.set(xscale="log", yscale="log", xlabel="modules S (log scale)", ylabel="parameters per attention layer",
           title=f"d_model = {d_model}: conv QKV has {conv_qkv_params(d_model, n_modules):,} at S = {n_modules}")
    ax.set_xticks(choices, [str(s) for s in choices])
    ax.minorticks_off()
    ax.legend(fontsize=8)
    parts = conv_param_breakdown(d_model, n_modules)
    bx.barh(list(parts), list(parts.values()), color=QKV_COLORS["conv"])
    bx.invert_yaxis()
    bx.set(xlabel="parameters", title=f"conv QKV at S = {n_modules}, M = {d_model // n_modules}")
    fig.tight_layout()
    return fig


def attention_head_figure(probs: torch.Tensor, head: int, text: str, title: str) -> Figure:
    """Heat map of one head's attention probabilities ``probs[head]`` ``(T, T)`` over the characters ``text``."""
    fig, ax = plt.subplots(figsize=(5.6, 5.2))
    im = ax.imshow(probs[head].numpy(), cmap="viridis", vmin=0, vmax=1)
    labels = [repr(c)[1:-1] if c.strip() else "␣" if c == " " else "⏎" for c in text]
    ax.set_xticks(range(len(text)), labels, fontsize=7)
    ax.set_yticks(range(len(text)), labels, fontsize=7)
    ax.grid(False)
    ax.set(xlabel="key (earlier character)", ylabel="query (current character)", title=f"{title}, head {head}")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="attention probability")
    fig.tight_layout()
    return fig


# --------------------------------------------------------------------------------------------------
# Looking inside a trained model
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def attention_maps(model, idx: torch.Tensor, layer: int = 0) -> torch.Tensor:
    """Attention probabilities of every head of block ``layer`` for the token ids ``idx`` ``(T,)`` or ``(1, T)``.

    Returns ``(H, T, T)`` (rows: queries, columns: keys; causal). Works for every QKV kind.
    """
    if not 0 <= layer < len(model.blocks):
        raise ValueError(f"layer must be in [0, {len(model.blocks)}), got layer={layer!r}")
    idx = idx.view(1, -1)
    was_training = model.training
    model.eval()
    T = idx.shape[1]
    x = model.tok_emb(idx) + model.pos_emb(torch.arange(T))
    for block in model.blocks[:layer]:
        x = block(x)
    q, k, _ = model.blocks[layer].attn.heads(model.blocks[layer].ln1(x))   # (1, H, T, hd)
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])              # (1, H, T, T)
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    probs = F.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)[0]
    model.train(was_training)
    return probs
