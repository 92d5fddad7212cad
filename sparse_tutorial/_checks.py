"""Argument checks shared by the layers: every bad value raises a ValueError that names it."""
from __future__ import annotations

import math
import numbers

import torch


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    return value


def probability(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {name}={value!r}")
    return float(value)


def real_number(name: str, value, low: float = -math.inf, high: float = math.inf, *, low_open: bool = False,
                hint: str = "") -> float:
    """``value`` as a float when it is a real number (not a bool, a string or NaN) in ``[low, high]``.

    ``low_open`` excludes ``low`` itself; ``hint`` is appended to the message (what the value does).
    """
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
          and (low < value if low_open else low <= value) and value <= high)
    if not ok:
        if math.isinf(high):
            wanted = f"{'>' if low_open else '>='} {low:g}"
        else:
            wanted = f"in {'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"{name} must be a number {wanted}, got {name}={value!r}{hint}")
    return float(value)


def last_dim(name: str, x: torch.Tensor, expected: int) -> None:
    if x.dim() < 1 or x.shape[-1] != expected:
        raise ValueError(
            f"{name} must have last dimension d_model={expected}, got a tensor of shape {tuple(x.shape)}"
        )


def same_dtype(name: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """A ValueError naming ``name`` when ``x`` is not of the layer's weight dtype (PyTorch's own error names neither)."""
    if x.dtype != weight.dtype:
        raise ValueError(
            f"{name} has dtype {x.dtype} but the layer's weights are {weight.dtype}; convert the input "
            f"({name}.to({weight.dtype})) or the layer (layer.to({x.dtype}))"
        )
