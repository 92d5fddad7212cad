"""The decode paths that the benchmark can time: PyTorch's reference or the fused kernels.

``pytorch`` is :meth:`SparseFF.decode <sparse_tutorial.layers.sparse_ff.SparseFF.decode>` and the convolution
QKV's step in PyTorch calls; ``fused`` is their one-call kernels (:mod:`sparse_tutorial.layers.sparse_ff_kernel`,
:mod:`sparse_tutorial.layers.qkv_kernel`, each where it applies). By default every command
times the best one this machine has (:func:`best_path`), and every table says which path it timed.
"""
from __future__ import annotations

from typing import Sequence

from torch import nn

from ..layers import sparse_ff_kernel
from ..layers.qkv import ConvQKVAttention
from ..layers.sparse_ff import SparseFF

__all__ = ["PATHS", "best_path", "available_paths", "check_paths", "sparse_ff_layers", "use_path"]

#: the paths a benchmark can time
PATHS = ("pytorch", "fused")


def best_path() -> str:
    """``"fused"`` where the kernel can run (Numba installed), else ``"pytorch"``."""
    return "fused" if sparse_ff_kernel.available() else "pytorch"


def available_paths() -> list[str]:
    """Every path that can run here, the best first (``["fused", "pytorch"]`` with Numba, else ``["pytorch"]``)."""
    best = best_path()
    return [best] + [p for p in PATHS if p != best and (p != "fused" or sparse_ff_kernel.available())]


def check_paths(paths: Sequence[str] | str | None) -> list[str]:
    """``paths`` as a list (``None``: ``[best_path()]``); a ValueError for an unknown path, a repeated one, or
    ``"fused"`` where the kernel cannot run."""
    if paths is None:
        return [best_path()]
    paths = [paths] if isinstance(paths, str) else list(paths)
    if not paths:
        raise ValueError("paths must not be empty")
    for p in paths:
        if p not in PATHS:
            raise ValueError(f"path must be one of {list(PATHS)}, got path={p!r}")
        if p == "fused" and not sparse_ff_kernel.available():
            raise ValueError(f"path='fused' is not available here: {sparse_ff_kernel.unavailable_reason()}")
    if len(set(paths)) != len(paths):
        raise ValueError(f"paths must not repeat, got paths={paths}")
    return paths


def sparse_ff_layers(module: nn.Module) -> list[SparseFF]:
    """Every :class:`SparseFF` in ``module`` (the paths only differ for these)."""
    return [m for m in module.modules() if isinstance(m, SparseFF)]


def use_path(module: nn.Module, path: str) -> None:
    """Make every sparse FF layer and every convolution QKV layer of ``module`` decode by ``path``: ``"pytorch"``,
    or ``"fused"`` (the layers' ``"auto"``: the kernel for every call it applies to, e.g. a decoding step of up to
    :attr:`SparseFF.FUSED_MAX_ROWS` tokens, PyTorch for the others, e.g. a long prompt)."""
    for layer in module.modules():
        if isinstance(layer, (SparseFF, ConvQKVAttention)):
            layer.decode_path = "pytorch" if path == "pytorch" else "auto"
