"""The sparse FF layer's training activation, ``h = relu((x W1) * mask)``, in one fused pass (chapter 3).

:meth:`SparseFF.forward <sparse_tutorial.layers.sparse_ff.SparseFF.forward>` in training computes, for every token
and every unit, the in-block softmax of the controller's scores, on hard calls a sampled choice per block, the
mask multiply and the ReLU; backward walks the same full-size tensors again. Written with PyTorch operations, each
of these is a separate pass over a ``(tokens, d_ff)`` tensor, and on a CPU those passes, not the matrix products,
make the sparse training step slower than the dense one. This module does the same arithmetic in one pass forward
and one pass backward per block of units, with Numba (Python syntax, compiled on first use, no C compiler needed).

The maths, per block of ``N`` units with pre-activations ``a``, scores ``s`` and ``p = softmax(s)``:

* soft call: ``h = relu(a * p)``; backward ``da = g p [a > 0]``, ``dp = g a [a > 0]``;
* hard call: the chosen unit ``c`` (a sample of ``softmax(s / noise_scale)`` by inverting its CDF at a uniform
  ``u``; the argmax when ``noise_scale = 0``) gets ``h_c = relu(a_c)`` (times ``p_c`` with ``scale_by_prob``), the
  others 0; the straight-through gradient reaches ``p`` at ``c`` only, because the mask sits before the ReLU;
* both: ``ds = p * (dp - sum(p * dp))`` (the softmax's backward).

The PyTorch path of ``SparseFF`` stays the readable reference and the fallback (no Numba, another dtype, or
``layer.train_path = "pytorch"``); ``tests/test_masked_relu.py`` checks that both agree.
"""
from __future__ import annotations

import math

import torch

__all__ = ["available", "masked_relu"]

try:                                                   # optional: without Numba the layer uses its PyTorch path
    import numba
    import numpy as np
except ImportError:                                    # pragma: no cover - exercised by monkeypatching in tests
    numba = None


def available(t: torch.Tensor) -> bool:
    """Whether the fused path can run on ``t``: Numba importable, and ``t`` float32 on the CPU."""
    return numba is not None and t.dtype == torch.float32 and t.device.type == "cpu"


if numba is not None:
    @numba.njit(parallel=True, fastmath=False, cache=True)
    def _forward(a, s, u, hard, scale, inv_t, h, choice):           # pragma: no cover - compiled
        rows, n = a.shape                                            # rows = tokens * blocks, n = block size
        for r in numba.prange(rows):
            m = s[r, 0]
            for j in range(1, n):
                m = max(m, s[r, j])
            if not hard:                                             # soft: relu(a * softmax(s))
                z = 0.0
                for j in range(n):
                    z += math.exp(s[r, j] - m)
                for j in range(n):
                    v = a[r, j] * (math.exp(s[r, j] - m) / z)
                    h[r, j] = v if v > 0.0 else 0.0
                continue
            c = 0
            if inv_t == 0.0:                                         # plain argmax (first maximum, as torch)
                for j in range(1, n):
                    if s[r, j] > s[r, c]:
                        c = j
            else:                                                    # inverse CDF of softmax(s / noise_scale)
                z = 0.0
                for j in range(n):
                    z += math.exp((s[r, j] - m) * inv_t)
                acc, c = 0.0, n - 1
                for j in range(n):
                    acc += math.exp((s[r, j] - m) * inv_t) / z
                    if acc >= u[r]:
                        c = j
                        break
            choice[r] = c
            w = 1.0
            if scale:                                                # scale_by_prob: times p_c
                z = 0.0
                for j in range(n):
                    z += math.exp(s[r, j] - m)
                w = math.exp(s[r, c] - m) / z
            for j in range(n):
                h[r, j] = 0.0
            v = a[r, c] * w
            h[r, c] = v if v > 0.0 else 0.0

    @numba.njit(parallel=True, fastmath=False, cache=True)
    def _backward(g, a, s, hard, scale, choice, da, ds):             # pragma: no cover - compiled
        rows, n = a.shape
        for r in numba.prange(rows):
            m = s[r, 0]
            for j in range(1, n):
                m = max(m, s[r, j])
            z = 0.0
            for j in range(n):
                z += math.exp(s[r, j] - m)
            if not hard:
                dot = 0.0                                            # sum_j p_j dp_j
                for j in range(n):
                    p = math.exp(s[r, j] - m) / z
                    on = a[r, j] * p > 0.0
                    da[r, j] = g[r, j] * p if on else 0.0
                    dp = g[r, j] * a[r, j] if on else 0.0
                    ds[r, j] = dp                                    # kept for the second pass
                    dot += p * dp
                for j in range(n):
                    ds[r, j] = math.exp(s[r, j] - m) / z * (ds[r, j] - dot)
                continue
            c = choice[r]
            pc = math.exp(s[r, c] - m) / z
            w = pc if scale else 1.0
            on = a[r, c] * w > 0.0
            for j in range(n):
                da[r, j] = 0.0
            da[r, c] = g[r, c] * w if on else 0.0
            dpc = g[r, c] * a[r, c] if on else 0.0                   # gradient reaching p_c (straight-through)
            for j in range(n):
                p = math.exp(s[r, j] - m) / z
                ds[r, j] = p * ((dpc if j == c else 0.0) - pc * dpc)


def _threads() -> None:
    """Numba uses as many threads as PyTorch. Starting Numba's OpenMP pool resets the process's OpenMP thread
    count, which PyTorch reads too, so PyTorch's count is put back afterwards."""
    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


class _MaskedReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, s, u, hard: bool, scale: bool, noise_scale: float):
        a2, s2 = a.detach().contiguous(), s.detach().contiguous()
        rows, n = a2.shape[0] * a2.shape[1], a2.shape[2]
        h = torch.empty_like(a2)
        choice = torch.zeros(rows, dtype=torch.int64)
        _threads()
        _forward(a2.view(rows, n).numpy(), s2.view(rows, n).numpy(), u.reshape(rows).double().numpy(), hard,
                 scale, 0.0 if noise_scale == 0 else 1.0 / noise_scale, h.view(rows, n).numpy(), choice.numpy())
        ctx.save_for_backward(a2, s2, choice)
        ctx.hard, ctx.scale = hard, scale
        return h

    @staticmethod
    def backward(ctx, g):
        a, s, choice = ctx.saved_tensors
        rows, n = a.shape[0] * a.shape[1], a.shape[2]
        g = g.contiguous()
        da, ds = torch.empty_like(a), torch.empty_like(s)
        _threads()
        _backward(g.view(rows, n).numpy(), a.view(rows, n).numpy(), s.view(rows, n).numpy(), ctx.hard, ctx.scale,
                  choice.numpy(), da.view(rows, n).numpy(), ds.view(rows, n).numpy())
        return da, ds, None, None, None, None


def masked_relu(a: torch.Tensor, s: torch.Tensor, *, hard: bool, u: torch.Tensor | None = None,
                noise_scale: float = 0.1, scale_by_prob: bool = False) -> torch.Tensor:
    """``relu(a * mask)`` with the mask built from scores ``s``, in one pass each way.

    Args:
        a: pre-activations ``x W1``, ``(tokens, n_blocks, N)``, float32.
        s: the controller's scores, same shape.
        hard: the hard (sampled one-hot, straight-through) mask, else the soft mask ``softmax(s)``.
        u: uniform numbers ``(tokens, n_blocks)`` (or with a trailing 1) for the hard choice.
        noise_scale: the sampling temperature of the hard choice; 0 is the argmax.
        scale_by_prob: multiply the chosen unit by its probability (hard calls).

    Returns ``h`` of the shape of ``a``; gradients flow to ``a`` and ``s``.
    """
    if a.shape != s.shape or a.dim() != 3:
        raise ValueError(f"a and s must have the same (tokens, n_blocks, N) shape, got a={tuple(a.shape)}, "
                         f"s={tuple(s.shape)}")
    if not available(a) or s.dtype != a.dtype:
        raise ValueError(f"the fused path needs Numba and float32 CPU tensors, got a.dtype={a.dtype}, "
                         f"s.dtype={s.dtype}, device={a.device}; use SparseFF's PyTorch path")
    if u is None:
        u = torch.zeros(a.shape[:2])
    if u.numel() != a.shape[0] * a.shape[1]:
        raise ValueError(f"u must hold one number per (token, block), got u.shape={tuple(u.shape)} for "
                         f"a.shape={tuple(a.shape)}")
    return _MaskedReLU.apply(a, s, u, bool(hard), bool(scale_by_prob), float(noise_scale))
