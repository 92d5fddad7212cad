"""The dense baseline: the Transformer's position-wise feed-forward layer (chapter 1).

``FF(x) = relu(x W1 + b1) W2 + b2`` with ``W1: d_model x d_ff`` and ``W2: d_ff x d_model``. Every token reads
every weight, which is what the sparse kinds of the later chapters avoid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import last_dim, positive_int, probability
from . import matvec_kernel
from .base import FeedForward, PathSetting

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
        #: which product the last :meth:`step_function` bound: "fused" or "pytorch" (None before the first)
        self.last_decode_path: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        last_dim("x", x, self.d_model)
        return self.dropout(self.w2(F.relu(self.w1(x))))  # (..., d_model)

    # decode: the interface's default, forward itself (a dense layer has no cheaper path)

    decode_path = PathSetting(
        """How the lean step (:meth:`step_function`) computes: ``"auto"`` (the two products by
        :mod:`.matvec_kernel` where :func:`~.matvec_kernel.applies` finds nothing against it, else
        ``F.linear``; :func:`~.matvec_kernel.products`), ``"pytorch"`` or ``"fused"`` (a ValueError saying why
        when the kernel does not apply); see :data:`~.base.DECODE_PATHS`. Training and the eager forward always
        use ``F.linear``.""")

    def step_function(self, rows: int = 1):
        """:meth:`forward` on ``(B, d_model)`` with the weights looked up once (no dropout: inference): the
        matrix-vector kernel of :mod:`.matvec_kernel` per :attr:`decode_path`, the ReLU fused into the first
        product; ``F.linear`` otherwise; the module's own calls for layers that are not plain ``nn.Linear``
        (int8 ones). :attr:`last_decode_path` says which was bound; with the kernel, ``step.numpy`` is the same
        on NumPy arrays (the lean step's NumPy stream)."""
        if type(self.w1) is not nn.Linear or type(self.w2) is not nn.Linear:
            return self.decode
        w1, b1, w2, b2 = self.w1.weight, self.w1.bias, self.w2.weight, self.w2.bias
        (first, second), taken = matvec_kernel.products(rows, self.decode_path, (w1, b1, True), (w2, b2, False))
        self.__dict__["last_decode_path"] = taken                       # nn.Module.__setattr__ costs microseconds

        def step(x: torch.Tensor) -> torch.Tensor:
            return second(first(x))                                     # (B, d_ff) -> (B, d_model)
        if taken == "fused":                                            # the same on NumPy arrays
            step.numpy = lambda x: second.numpy(first.numpy(x))
        return step

    def active_params_per_token(self) -> int:
        """Every weight and bias: ``2 d d_ff + d_ff + d``."""
        return self.num_params()

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}"
