"""Argument checks shared by the layers: every bad value raises a ValueError that names it."""
from __future__ import annotations

import torch


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    return value


def probability(name: str, value) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be a number in [0, 1), got {name}={value!r}")
    return float(value)


def last_dim(name: str, x: torch.Tensor, expected: int) -> None:
    if x.dim() < 1 or x.shape[-1] != expected:
        raise ValueError(
            f"{name} must have last dimension d_model={expected}, got a tensor of shape {tuple(x.shape)}"
        )
