"""The conv QKV attention layer opened up (chapter 4): an explicit-loop version and a diagram of its shapes.

:func:`conv_qkv_by_hand` recomputes ``ConvQKVAttention``'s output for one sequence with plain Python loops over
positions, modules and kernel taps: the multiplicative layer, the three causal convolutions, one softmax per
head, no output projection. It is slow and only for small layers; the tests and the chapter check that it
agrees with the module. :func:`shape_diagram` draws the layer's tensors with the shapes of a real layer.
"""
from __future__ import annotations

import math

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from matplotlib.patches import FancyArrowPatch, Rectangle

from ..layers.qkv import ConvQKVAttention
from .plots import COLORS

__all__ = ["conv_qkv_by_hand", "shape_diagram"]


@torch.no_grad()
def conv_qkv_by_hand(layer: ConvQKVAttention, x: torch.Tensor) -> torch.Tensor:
    """``layer``'s output for one sequence ``x`` of shape ``(T, d)``, computed with explicit loops: ``(T, d)``."""
    T, d = x.shape
    S, M, lk = layer.n_modules, layer.d_module, layer.length_kernel
    D, E, bias = layer.mult.D, layer.mult.E, layer.mult.bias
    # 1. The multiplicative layer: u[t, s, m] = sum_i x[t, i] D[s, i] E[i, m] + b[s, m]
    u = torch.zeros(T, S, M)
    for t in range(T):
        for s in range(S):
            for m in range(M):
                u[t, s, m] = (x[t] * D[s] * E[:, m]).sum() + (0 if bias is None else bias[s * M + m])

    # 2. A causal convolution over (length, modules): position t reads t - lk + 1 .. t (nothing before 0),
    #    module s reads its neighbours s - mk//2 .. s + mk//2 (nothing outside 0 .. S-1).
    def conv(module, t: int, s: int) -> torch.Tensor:
        w, b = module.conv.weight, module.conv.bias          # (M out, M in, lk, mk), (M,)
        mk = w.shape[-1]
        out = b.clone()
        for i in range(lk):
            for j in range(mk):
                tt, ss = t - (lk - 1) + i, s + j - mk // 2
                if tt >= 0 and 0 <= ss < S:
                    out += w[:, :, i, j] @ u[tt, ss]
        return out

    q, k, v = (torch.stack([torch.stack([conv(c, t, s) for t in range(T)]) for s in range(S)])
               for c in (layer.conv_q, layer.conv_k, layer.conv_v))       # each (S, T, M)
    # 3. One head per module: causal softmax attention of size M; 4. heads side by side, no output projection.
    y = torch.zeros(T, d)
    for s in range(S):
        for t in range(T):
            scores = torch.tensor([q[s, t] @ k[s, j] / math.sqrt(M) for j in range(t + 1)])
            p = torch.softmax(scores, dim=0)
            y[t, s * M:(s + 1) * M] = sum(p[j] * v[s, j] for j in range(t + 1))
    return y


def _box(ax, x, y, w, h, text, color, note=""):
    ax.add_patch(Rectangle((x, y), w, h, facecolor=color, edgecolor="black", lw=0.8, alpha=0.35))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9)
    if note:
        ax.text(x + w / 2, y - 0.12, note, ha="center", va="top", fontsize=7.5, color="0.25")


def _arrow(ax, x0, y0, x1, y1, label=""):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle="-|>", mutation_scale=10, lw=0.9))
    if label:
        ax.text((x0 + x1) / 2, (y0 + y1) / 2 + 0.08, label, ha="center", va="bottom", fontsize=7.5)


def shape_diagram(layer: ConvQKVAttention, T: int = 8, t: int | None = None, s: int | None = None) -> Figure:
    """The layer's data flow with its real shapes (left) and the ``(T, S)`` image with the kernels that make
    position ``t``, module ``s`` of Q/K and of V (right; by default near the last position and the
    middle module)."""
    S, M, d, lk = layer.n_modules, layer.d_module, layer.d_model, layer.length_kernel
    t, s = T - 2 if t is None else t, S // 2 if s is None else s
    mk = layer.conv_q.conv.weight.shape[-1]
    fig, (ax, img) = plt.subplots(1, 2, figsize=(11, 4.2), width_ratios=[2.4, 1], layout="constrained")
    ax.set(xlim=(0, 10.8), ylim=(0, 4.2)), ax.axis("off")
    _box(ax, 0.1, 1.7, 1.3, 0.8, f"x\n(B, T, {d})", COLORS["dense"], "input")
    _box(ax, 1.9, 1.7, 2.0, 0.8, f"multiplicative\nD ({S}, {d})\nE ({d}, {M})", COLORS["controller"],
         f"{S * d + d * M + d:,} parameters")
    _box(ax, 4.3, 1.7, 1.8, 0.8, f"u (B, T, S, M)\nS={S}, M={M}", COLORS["dense"], "image T x S, M channels")
    for row, (name, kernel) in enumerate([("Q", f"{lk}x{mk}"), ("K", f"{lk}x{mk}"), ("V", f"{lk}x1")]):
        y = 3.1 - 1.2 * row
        _box(ax, 6.6, y, 1.4, 0.7, f"conv {name}\n{kernel}, {M}->{M}", COLORS["sparse"], "causal in T")
        _arrow(ax, 6.1, 2.1, 6.6, y + 0.35)
        _arrow(ax, 8.0, y + 0.35, 8.5, 2.1)
    _box(ax, 8.5, 1.7, 2.2, 0.8, f"{S} heads of size {M}\n-> (B, T, {d})", COLORS["dense"],
         "no output projection")
    _arrow(ax, 1.4, 2.1, 1.9, 2.1)
    _arrow(ax, 3.9, 2.1, 4.3, 2.1)
    ax.set_title(f"ConvQKVAttention(d_model={d}, n_modules={S}): shapes of one layer", fontsize=10)

    img.set(xlim=(-0.5, S - 0.5), ylim=(T - 0.5, -0.5), xlabel="module s", ylabel="position t",
            xticks=range(S), yticks=range(T))
    img.set_title("the kernels behind (t, s)", fontsize=10)
    for tt in range(T):
        for ss in range(S):
            img.add_patch(Rectangle((ss - 0.5, tt - 0.5), 1, 1, facecolor="white", edgecolor="0.8", lw=0.5))
    img.add_patch(Rectangle((s - mk // 2 - 0.5, t - lk + 0.5), mk, lk, facecolor=COLORS["sparse"], alpha=0.35,
                            edgecolor="black", label=f"Q, K: {lk}x{mk}"))
    img.add_patch(Rectangle((s - 0.45, t - lk + 0.55), 0.9, lk - 0.1, facecolor="none", edgecolor="black",
                            lw=1.6, ls="--", label=f"V: {lk}x1"))
    img.plot([s], [t], "o", color="black")
    img.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2, fontsize=8, frameon=False)
    return fig
