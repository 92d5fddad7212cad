"""The lean decoding step's last call, written with Numba: the final layer norm and the tied output head.

After its last block a decoding step normalises the stream and multiplies it by the output head (the token
embedding, tied): a few hundred numbers against a ``(vocab, C)`` matrix at the seed's width. In PyTorch these are
two calls (``F.layer_norm``, ``F.linear``), and a call's fixed cost is not the few microseconds that a warm loop
of calls shows: the blocks before them stream megabytes of weights, which empties the processor's caches of the
library's own code and data. :func:`bind` gives both in **one call** of a compiled loop.

The norm is the textbook one, ``(x - mean) / sqrt(var + eps) * weight + bias`` with the biased variance: mean and
variance summed in float64 and rounded to float32, then PyTorch's order of float32 operations, its last
multiply-add fused as PyTorch's CPU kernel fuses it. The head's dot products may regroup their additions into
vector lanes, as BLAS does. The logits differ from ``F.linear(F.layer_norm(x))`` only by float32 rounding (the
tests hold them to it). This is the step's last operation, so a rounding difference here reaches the logits
once and goes no further; the blocks' own layer norms stay PyTorch's, where a difference would be carried
through every later layer and token. Without Numba, or where it fails to compile, the lean step keeps PyTorch's
two calls.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from . import sparse_ff_kernel

try:                                        # optional: without Numba the lean step keeps PyTorch's calls
    from numba import njit
    from numba.core.errors import NumbaError
except ImportError:                         # pragma: no cover - exercised by monkeypatching in the tests
    njit = None

__all__ = ["available", "unavailable_reason", "KernelUnavailable", "bind", "KERNEL_SOURCE_FUNCTIONS"]

available = sparse_ff_kernel.available
unavailable_reason = sparse_ff_kernel.unavailable_reason
KernelUnavailable = sparse_ff_kernel.KernelUnavailable


def _layer_norm_head(x, weight, bias, eps, h, head, out):
    """``h[t] = (x[t] - mean) / sqrt(var + eps) * weight + bias`` for each row ``t`` of ``x`` (B, C), then
    ``out[t, j] = head[j] . h[t]`` for the ``V`` rows of ``head`` (V, C)."""
    B, C = x.shape
    for t in range(B):
        s = 0.0
        for i in range(C):
            s += x[t, i]
        mean = s / C
        v = 0.0
        for i in range(C):
            d = x[t, i] - mean
            v += d * d
        m = np.float32(mean)                                    # then float32, in PyTorch's order
        rstd = np.float32(1.0) / np.sqrt(np.float32(v / C) + np.float32(eps))
        for i in range(C):
            h[t, i] = (x[t, i] - m) * rstd * weight[i] + bias[i]
        for j in range(head.shape[0]):
            acc = np.float32(0.0)
            for i in range(C):          # the one loop whose additions may be regrouped into vector lanes
                acc += head[j, i] * h[t, i]
            out[t, j] = acc


#: the function chapter 5 prints with ``inspect.getsource``
KERNEL_SOURCE_FUNCTIONS = (_layer_norm_head,)

if njit is not None:
    # "contract": a multiply followed by an add may be one fused instruction, as in PyTorch's CPU kernel
    _layer_norm_head = njit(fastmath={"contract", "reassoc"}, cache=True)(_layer_norm_head)


def bind(ln: nn.LayerNorm, head_weight: torch.Tensor, rows: int):
    """``f(x)``: ``F.linear(F.layer_norm(x), head_weight)`` of ``x`` ``(rows, C)`` float32 NumPy, in one call;
    returns a new ``(rows, V)`` array. ``ln`` is the final layer norm (weight and bias over the last axis),
    ``head_weight`` a bias-free output head ``(V, C)`` (the tied embedding), both float32 on the CPU; their NumPy
    views are held (in-place changes are seen, replaced weights are not). Compiled here (or loaded from
    Numba's cache), not in a later step. Raises :class:`KernelUnavailable` when the kernel cannot run here, and a
    ValueError for weights it does not cover."""
    if not available():
        raise KernelUnavailable(unavailable_reason())
    if not isinstance(ln, nn.LayerNorm) or len(ln.normalized_shape) != 1 or ln.weight is None or ln.bias is None:
        raise ValueError(f"ln must be an nn.LayerNorm over the last axis with a weight and a bias, got {ln!r}")
    C = ln.normalized_shape[0]
    for name, t in (("ln.weight", ln.weight), ("head_weight", head_weight)):
        if t.dtype != torch.float32 or not t.is_cpu:
            raise ValueError(f"the kernel is compiled for float32 on the CPU, got {name} of {t.dtype} on {t.device}")
    if head_weight.dim() != 2 or head_weight.shape[1] != C:
        raise ValueError(f"head_weight must be a (V, {C}) matrix, got shape {tuple(head_weight.shape)}")
    if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
        raise ValueError(f"rows must be a positive integer, got rows={rows!r}")
    weight, bias, eps = ln.weight.detach().numpy(), ln.bias.detach().numpy(), float(ln.eps)
    head = sparse_ff_kernel._array(head_weight)                         # (V, C)
    h = np.empty((rows, C), dtype=np.float32)                           # the normalised rows

    def f(x: np.ndarray) -> np.ndarray:
        if x.shape != h.shape or x.dtype != np.float32:   # the loops do not check bounds: h holds `rows` rows
            raise ValueError(f"x must be a float32 array of shape {h.shape}, got {x.dtype} {x.shape}")
        out = np.empty((rows, head.shape[0]), dtype=np.float32)        # (B, V)
        _layer_norm_head(x, weight, bias, eps, h, head, out)
        return out
    try:
        f(np.zeros((rows, C), dtype=np.float32))
    except NumbaError as e:                                             # no working compiler here: say so once
        sparse_ff_kernel._COMPILE_ERROR.append(f"the kernel did not compile here ({type(e).__name__}: "
                                               f"{(str(e).splitlines() or [''])[0]})")
        raise KernelUnavailable(sparse_ff_kernel._COMPILE_ERROR[0]) from e
    return f
