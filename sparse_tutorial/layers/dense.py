"""The dense baseline: the Transformer's position-wise feed-forward layer (chapter 1).

``FF(x) = relu(x W1 + b1) W2 + b2`` with ``W1: d_model x d_ff`` and ``W2: d_ff x d_model``. Every token reads
every weight, which is what the sparse kinds of the later chapters avoid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import last_dim, positive_int, probability
from .base import FeedForward

__all__ = ["DenseFF"]


class DenseFF(FeedForward):
    """``relu(x W1 + b1) W2 + b2``: the Transformer's position-wise feed-forward layer."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0):
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.d_ff = positive_int("d_ff", d_ff)
        self.w1 = nn.Linear(d_model, d_ff)  # weight (d_ff, d_model)
        self.w2 = nn.Linear(d_ff, d_model)  # weight (d_model, d_ff)
        self.dropout = nn.Dropout(probability("dropout", dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last_dim("x", x, self.d_model)
        return self.dropout(self.w2(F.relu(self.w1(x))))  # (..., d_model)

    # decode: the interface's default, forward itself (a dense layer has no cheaper path)

    def step_function(self, rows: int = 1):
        """:meth:`forward` on ``(B, d_model)`` with the weights looked up once (no dropout: inference); the
        module's own calls for layers that are not plain ``nn.Linear`` (int8 ones)."""
        if type(self.w1) is not nn.Linear or type(self.w2) is not nn.Linear:
            return self.decode
        w1, b1, w2, b2 = self.w1.weight, self.w1.bias, self.w2.weight, self.w2.bias
        return lambda x: F.linear(F.relu(F.linear(x, w1, b1)), w2, b2)  # (B, d_model)

    def active_params_per_token(self) -> int:
        """Every weight and bias: ``2 d d_ff + d_ff + d``."""
        return self.num_params()

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}"
