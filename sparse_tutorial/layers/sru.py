"""The SRU branch of Terraformer: a small recurrence added to every FF output (chapter 7).

The reference (``ff_use_sru``) adds to each feed-forward layer's output a branch ``LayerNorm -> Dense(k) -> SRU(k)
-> Dense(d)`` with a small width ``k`` (32 at the paper's sizes). The Simple Recurrent Unit (Lei et al. 2018) keeps
one vector ``c`` of width ``k`` per sequence; for the inputs ``u_t`` (width ``k``) of the branch:

    x_t = W u_t,   f_t = sigmoid(W_f u_t + b_f),   r_t = sigmoid(W_r u_t + b_r)     (one product, 3k outputs)
    c_t = f_t * c_{t-1} + (1 - f_t) * x_t
    h_t = r_t * c_t + (1 - r_t) * u_t

Everything but the line for ``c_t`` is computed for all positions at once; ``c_t`` is a scan over the length,
cheap because it is elementwise on ``k`` numbers. Decoding keeps ``c`` in the layer's cache: O(1) state per
token, whatever the length, where attention's cache grows with every token.
"""
from __future__ import annotations

import torch
from torch import nn

from .._checks import last_dim, positive_int

__all__ = ["SRU", "SRUBranch", "sru_scan"]


def sru_scan(f: torch.Tensor, x: torch.Tensor, c0: torch.Tensor | None = None) -> torch.Tensor:
    """``c_t = f_t c_{t-1} + (1 - f_t) x_t`` for ``f, x`` ``(B, T, k)``, from ``c0`` ``(B, k)`` (zeros if None).

    Returns every ``c_t``, ``(B, T, k)``. A loop over ``T``: each step is two elementwise operations on
    ``B x k`` numbers.
    """
    c = torch.zeros_like(x[:, 0]) if c0 is None else c0                    # (B, k)
    out = []
    for t in range(x.shape[1]):
        c = torch.addcmul(x[:, t] - f[:, t] * x[:, t], f[:, t], c)        # f c + (1 - f) x
        out.append(c)
    return torch.stack(out, dim=1)                                        # (B, T, k)


class SRU(nn.Module):
    """The Simple Recurrent Unit of width ``k``: ``(B, T, k) -> (B, T, k)``, carrying ``c`` across calls."""

    def __init__(self, k: int):
        super().__init__()
        self.k = positive_int("k", k)
        self.proj = nn.Linear(k, 3 * k)          # x, f and r pre-activations in one product (bias: b_f, b_r)

    def forward(self, u: torch.Tensor, c0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``u`` ``(B, T, k)`` and the state ``c0`` ``(B, k)`` before it (None: zeros) -> ``(h, c_T)``."""
        x, f, r = self.proj(u).chunk(3, dim=-1)                           # (B, T, k) each
        c = sru_scan(torch.sigmoid(f), x, c0)                             # (B, T, k)
        r = torch.sigmoid(r)
        h = r * c + (1 - r) * u                                           # highway to the input
        return h, c[:, -1]


class SRUBranch(nn.Module):
    """``LayerNorm -> Linear(d, k) -> SRU(k) -> Linear(k, d)``, added by the block to its FF output.

    ``forward(x, state)``: ``x`` ``(B, T, d)``; ``state`` is a dict (the layer's ``LayerCache.state``) that
    keeps ``c`` between calls under the key ``"sru_c"``, or None (a whole sequence from ``c = 0``). The output is
    ``(B, T, d)``; a call on a whole sequence and calls on its pieces in order give the same outputs.
    """

    def __init__(self, d_model: int, k: int = 32):
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.ln = nn.LayerNorm(d_model)
        self.down = nn.Linear(d_model, positive_int("sru_dim", k))
        self.sru = SRU(k)
        self.up = nn.Linear(k, d_model)

    def forward(self, x: torch.Tensor, state: dict | None = None) -> torch.Tensor:
        last_dim("x", x, self.d_model)
        c0 = None if state is None else state.get("sru_c")
        if c0 is not None and c0.shape[0] != x.shape[0]:
            raise ValueError(f"the SRU state holds a batch of {c0.shape[0]} sequences, got a batch of {x.shape[0]}")
        h, c_last = self.sru(self.down(self.ln(x)), c0)                   # (B, T, k), (B, k)
        if state is not None:
            state["sru_c"] = c_last
        return self.up(h)                                                 # (B, T, d)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

