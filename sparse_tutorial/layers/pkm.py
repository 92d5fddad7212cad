"""Product-Key Memory: a large table of values read at a few slots chosen by product keys (chapter 6).

After Lample et al. (2019), "Large Memory Layers with Product Keys". The memory has ``n_keys ** 2`` slots, each
with a value vector of width ``d_model``. Slot ``(i, j)`` has the key ``[k1_i, k2_j]``, the concatenation of two
half-keys, so its score against a query ``q = [q1, q2]`` splits into ``q1 . k1_i + q2 . k2_j``. The best
``top_k`` slots are then among the pairs of the ``top_k`` best half-keys of each side: ``2 n_keys`` dot products
and a ``top_k x top_k`` search replace scoring all ``n_keys ** 2`` slots.

Per head ``h`` (``heads`` of them, each with its own query and half-keys; the values are shared):

* ``q = x W_q[h]`` ``(d_key,)``, split into halves ``q1, q2`` ``(d_key / 2,)``;
* ``s1 = K1[h] q1``, ``s2 = K2[h] q2`` ``(n_keys,)``; the ``top_k`` best of each;
* the ``top_k ** 2`` sums of a best ``s1`` and a best ``s2``; their ``top_k`` best are the chosen slots;
* ``w = softmax(chosen scores)``; ``y_h = sum w_s V[slot s]`` (an ``embedding_bag`` over the value table).

``y = sum_h y_h``. The layer is sparse in every mode: only ``heads * top_k`` value rows are read per token, in
training too, so it keeps the interface's default :meth:`decode` (its ``forward``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import last_dim, positive_int, probability
from .base import FeedForward

__all__ = ["ProductKeyMemory"]


class ProductKeyMemory(FeedForward):
    """A memory of ``n_keys ** 2`` value vectors; each token reads ``top_k`` of them per head.

    Args:
        d_model: width of the residual stream (and of every value vector).
        n_keys: half-keys per side; the memory has ``n_keys ** 2`` slots.
        top_k: slots read per head (and half-keys kept per side); at most ``n_keys``.
        heads: independent queries reading the same values.
        d_key: width of a query (two halves of ``d_key / 2``); must be even.
        dropout: dropout on the output.
    """

    def __init__(self, d_model: int, n_keys: int, top_k: int = 8, heads: int = 2, d_key: int = 32,
                 dropout: float = 0.0):
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        positive_int("n_keys", n_keys)
        positive_int("top_k", top_k)
        positive_int("heads", heads)
        positive_int("d_key", d_key)
        if top_k > n_keys:
            raise ValueError(f"top_k must be at most n_keys={n_keys}, got top_k={top_k}")
        if d_key % 2:
            raise ValueError(f"d_key must be even (two halves), got d_key={d_key}")
        self.n_keys, self.top_k, self.heads, self.d_key = n_keys, top_k, heads, d_key
        self.query = nn.Linear(d_model, heads * d_key, bias=False)
        # half-keys: (heads, n_keys, d_key / 2) for each side
        self.keys1 = nn.Parameter(torch.randn(heads, n_keys, d_key // 2) / math.sqrt(d_key // 2))
        self.keys2 = nn.Parameter(torch.randn(heads, n_keys, d_key // 2) / math.sqrt(d_key // 2))
        self.values = nn.Parameter(torch.randn(n_keys ** 2, d_model) / math.sqrt(d_model))  # (slots, d)
        self.dropout = nn.Dropout(probability("dropout", dropout))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, slots={self.n_keys ** 2} ({self.n_keys}^2), top_k={self.top_k}, "
                f"heads={self.heads}, d_key={self.d_key}")

    def active_params_per_token(self) -> int:
        """The query network, every half-key (all are scored), and ``heads * top_k`` value rows."""
        return (self.query.weight.numel() + self.keys1.numel() + self.keys2.numel()
                + self.heads * self.top_k * self.d_model)

    def slots(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For tokens ``xf`` ``(B, d)``: the chosen slots and their scores, each ``(B, heads, top_k)``."""
        B, k, n = xf.shape[0], self.top_k, self.n_keys
        q = self.query(xf).view(B, self.heads, 2, self.d_key // 2)             # (B, H, 2, d_key/2)
        s1 = torch.einsum("bhd,hnd->bhn", q[:, :, 0], self.keys1)              # (B, H, n_keys)
        s2 = torch.einsum("bhd,hnd->bhn", q[:, :, 1], self.keys2)
        v1, i1 = s1.topk(k, dim=-1)                                            # (B, H, k)
        v2, i2 = s2.topk(k, dim=-1)
        pair = (v1.unsqueeze(-1) + v2.unsqueeze(-2)).flatten(-2)               # (B, H, k*k) candidate scores
        scores, best = pair.topk(k, dim=-1)                                    # (B, H, k)
        slot = i1.gather(-1, best // k) * n + i2.gather(-1, best % k)          # flat slot index i * n + j
        return slot, scores

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last_dim("x", x, self.d_model)
        xf = x.reshape(-1, self.d_model)                                       # (B, d)
        slot, scores = self.slots(xf)                                          # (B, H, k)
        w = F.softmax(scores, dim=-1)
        B = xf.shape[0]
        # every head's k slots in one bag per token: sum_h sum_s w[h, s] V[slot[h, s]]
        y = F.embedding_bag(slot.reshape(B, -1), self.values, per_sample_weights=w.reshape(B, -1), mode="sum")
        return self.dropout(y).view(x.shape)                                   # (..., d)
