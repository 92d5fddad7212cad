"""A fused decoding step for :class:`~sparse_tutorial.layers.qkv.ConvQKVAttention` (chapter 5), written with Numba.

The PyTorch step of the paper's sparse QKV spells one new token in about a dozen calls per layer: the gated
product of the multiplicative layer, its bias, a permute, the write into the convolution's state, the three
convolutions (one merged ``conv2d``), a copy that makes Q, K and V contiguous, the writes into the key and value
cache, the attention over the cache, a transpose. At the book's widths every call costs more in fixed overhead
than in arithmetic. :func:`run` does the same arithmetic in **one call per token and layer**:

1. the multiplicative layer ``u[s, m] = b[s, m] + sum_i x_i D[s, i] E[i, m]``: per module, the gated input
   ``x * D[s]`` times ``E``;
2. ``u`` written into the convolution's state at the new position;
3. the three convolutions (Q and K ``lk x mk``, V ``lk x 1``, merged as in ``ConvQKVAttention._merged_conv``)
   over the last ``lk`` positions of that state, causal in length, zero-padded over modules; the output of each
   module is the ``3M`` numbers of its head: ``q``, ``k`` and ``v``;
4. ``k`` and ``v`` written into the key and value cache at the new position;
5. each head's attention over every cached position: scores, softmax (the maximum subtracted first), the
   weighted sum of the values.

The caller (``ConvQKVAttention``) makes room in the cache's buffers first, through the cache's own methods, so
growing and truncating the cache stay the PyTorch path's; the kernel only writes the new position.

Like :mod:`.sparse_ff_kernel` it is compiled with ``fastmath=False`` except the dot products of the attention,
whose additions may be regrouped into vector lanes (as BLAS does): results differ from PyTorch's only by
rounding. Each loop reads four rows per pass over its output row (four rows of ``E``, four input channels of
the convolution, four keys, four values), so a row of sums is loaded and stored once for four multiply-adds.
One thread: at the widths where the fused step pays, starting threads costs more than the work. Only float32 on
the CPU is compiled; the layer falls back to its PyTorch step otherwise, and without Numba.
"""
from __future__ import annotations

import math

import numpy as np

from . import sparse_ff_kernel
from .sparse_ff_kernel import _dot, _dot4   # the dot products, one and four rows at a time, compiled there

try:                                        # optional: without Numba the layer keeps its PyTorch step
    from numba import njit
    from numba.core.errors import NumbaError
except ImportError:                         # pragma: no cover - exercised by monkeypatching in the tests
    njit = None

__all__ = ["available", "unavailable_reason", "KernelUnavailable", "run", "KERNEL_SOURCE_FUNCTIONS"]

#: raised when the kernel cannot run here (the same exception as the sparse FF kernel's)
KernelUnavailable = sparse_ff_kernel.KernelUnavailable

#: why the kernel failed to compile in this process (then :func:`available` is False), or None
_COMPILE_ERROR: list[str] = []


def available() -> bool:
    """Whether the fused step can run here (Numba importable, and no failed compilation in this process)."""
    return sparse_ff_kernel.numba is not None and not _COMPILE_ERROR


def unavailable_reason() -> str | None:
    """Why :func:`available` is False, or None."""
    if sparse_ff_kernel.numba is None:
        return "numba is not installed (pip install numba)"
    return _COMPILE_ERROR[0] if _COMPILE_ERROR else None


# --------------------------------------------------------------------------------------------------
# The kernel: plain Python, compiled by Numba
# --------------------------------------------------------------------------------------------------


def _multiplicative(x, d, e, bm, u):
    """Step 1: ``u[s] = bm[s] + sum_i (x_i D[s, i]) E[i]`` for one token ``x`` (d,). ``D`` (S, d), ``E`` (d, M):
    per module, the gated input times ``E``, four rows of ``E`` per pass over the module's ``M`` outputs."""
    S, M = bm.shape
    n = x.shape[0]
    g = np.empty(n, dtype=np.float32)
    for s in range(S):
        for i in range(n):
            g[i] = x[i] * d[s, i]
        us = u[s]
        for m in range(M):
            us[m] = bm[s, m]
        i = 0
        while i + 4 <= n:
            g0, g1, g2, g3 = g[i], g[i + 1], g[i + 2], g[i + 3]
            e0, e1, e2, e3 = e[i], e[i + 1], e[i + 2], e[i + 3]
            for m in range(M):
                us[m] += (g0 * e0[m] + g1 * e1[m]) + (g2 * e2[m] + g3 * e3[m])
            i += 4
        while i < n:
            c, row = g[i], e[i]
            for m in range(M):
                us[m] += c * row[m]
            i += 1


def _convolution(conv_in, P, wt, wb, qkv):
    """Step 3: ``qkv[s]``, the ``3M`` outputs of module ``s``: the convolution over positions ``P - lk + 1 .. P``
    (none before 0) and modules ``s - mk // 2 .. s + mk // 2`` (none outside ``0 .. S - 1``) of one sequence's
    state ``conv_in`` (M, capacity, S). ``wt`` (M, lk, mk, 3M): four input channels per pass over the outputs."""
    M, lk, mk, C3 = wt.shape
    S = conv_in.shape[2]
    half = mk // 2
    for s in range(S):
        acc = qkv[s]
        for c in range(C3):
            acc[c] = wb[c]
        for l in range(lk):
            pos = P - (lk - 1) + l
            if pos < 0:
                continue
            for kk in range(mk):
                s2 = s + kk - half
                if s2 < 0 or s2 >= S:
                    continue
                cin = 0
                while cin + 4 <= M:
                    x0, x1 = conv_in[cin, pos, s2], conv_in[cin + 1, pos, s2]
                    x2, x3 = conv_in[cin + 2, pos, s2], conv_in[cin + 3, pos, s2]
                    w0, w1, w2, w3 = wt[cin, l, kk], wt[cin + 1, l, kk], wt[cin + 2, l, kk], wt[cin + 3, l, kk]
                    for c in range(C3):
                        acc[c] += (x0 * w0[c] + x1 * w1[c]) + (x2 * w2[c] + x3 * w3[c])
                    cin += 4
                while cin < M:
                    xv, w = conv_in[cin, pos, s2], wt[cin, l, kk]
                    for c in range(C3):
                        acc[c] += xv * w[c]
                    cin += 1


def _attend(keys, values, q, n, scores, o):
    """Step 5 for one head: ``o = softmax(keys[:n] q / sqrt(M)) values[:n]``; ``keys``, ``values`` (capacity, M).
    Four keys per pass over the query, four values per pass over the output."""
    M = q.shape[0]
    scale = np.float32(1.0 / math.sqrt(M))
    j = 0
    while j + 4 <= n:
        scores[j], scores[j + 1], scores[j + 2], scores[j + 3] = _dot4(
            keys[j], keys[j + 1], keys[j + 2], keys[j + 3], q, M)
        j += 4
    while j < n:
        scores[j] = _dot(keys[j], q, M)
        j += 1
    best = np.float32(-np.inf)
    for j in range(n):
        scores[j] *= scale
        if scores[j] > best:
            best = scores[j]
    z = np.float32(0.0)
    for j in range(n):
        scores[j] = np.exp(scores[j] - best)                # the maximum subtracted: no overflow
        z += scores[j]
    inv = np.float32(1.0) / z
    for m in range(M):
        o[m] = 0.0
    j = 0
    while j + 4 <= n:
        p0, p1, p2, p3 = scores[j] * inv, scores[j + 1] * inv, scores[j + 2] * inv, scores[j + 3] * inv
        v0, v1, v2, v3 = values[j], values[j + 1], values[j + 2], values[j + 3]
        for m in range(M):
            o[m] += (p0 * v0[m] + p1 * v1[m]) + (p2 * v2[m] + p3 * v3[m])
        j += 4
    while j < n:
        p, v = scores[j] * inv, values[j]
        for m in range(M):
            o[m] += p * v[m]
        j += 1


def _conv_qkv_step(x, d, e, bm, wt, wb, conv_in, kbuf, vbuf, P, out):
    """One decoding step of the sparse QKV attention for ``B`` tokens ``x`` (B, d_model) at position ``P``.

    Multiplicative layer: ``d`` (S, d_model) its gates ``D``, ``e`` (d_model, M), ``bm`` (S, M) its bias.
    Convolutions: ``wt`` (M, lk, mk, 3M) the merged kernel with the output channels last, ``wb`` (3M,) its bias.
    Buffers, each with room for position ``P``: ``conv_in`` (B, M, capacity, S) the multiplicative outputs of
    every position, ``kbuf`` and ``vbuf`` (B, S, capacity, M) the keys and values. Writes position ``P`` of the
    three buffers and ``out`` (B, S, M), the attention's output of every head.
    """
    B = x.shape[0]
    S, M = bm.shape
    u = np.empty((S, M), dtype=np.float32)
    qkv = np.empty((S, 3 * M), dtype=np.float32)
    scores = np.empty(P + 1, dtype=np.float32)
    for b in range(B):
        _multiplicative(x[b], d, e, bm, u)                            # 1. the multiplicative layer
        for m in range(M):                                            # 2. the convolution's new input
            for s in range(S):
                conv_in[b, m, P, s] = u[s, m]
        _convolution(conv_in[b], P, wt, wb, qkv)                      # 3. q, k, v of every module
        for s in range(S):                                            # 4. k, v into the cache
            for m in range(M):
                kbuf[b, s, P, m] = qkv[s, M + m]
                vbuf[b, s, P, m] = qkv[s, 2 * M + m]
            _attend(kbuf[b, s], vbuf[b, s], qkv[s, :M], P + 1, scores, out[b, s])   # 5. attention


#: the functions chapter 5 prints with ``inspect.getsource``
KERNEL_SOURCE_FUNCTIONS = (_conv_qkv_step, _attend)

if njit is not None:
    _multiplicative = njit(fastmath=False, cache=True)(_multiplicative)
    _convolution = njit(fastmath=False, cache=True)(_convolution)
    _attend = njit(fastmath=False, cache=True)(_attend)
    _kernel = njit(fastmath=False, cache=True)(_conv_qkv_step)


# --------------------------------------------------------------------------------------------------
# The call from PyTorch
# --------------------------------------------------------------------------------------------------


def run(x: np.ndarray, weights: tuple, conv_in: np.ndarray, kbuf: np.ndarray, vbuf: np.ndarray,
        position: int) -> np.ndarray:
    """The fused step on NumPy arrays: ``x`` ``(B, d)`` float32 C-contiguous; ``weights`` = ``(d, e, bm, wt, wb)``
    as in :func:`_conv_qkv_step`; the three buffers C-contiguous, written in place at ``position``.

    Returns the attention's output ``(B, S, M)``. Raises :class:`KernelUnavailable` when the
    kernel cannot run here (the caller falls back to PyTorch).
    """
    if not available():
        raise KernelUnavailable(unavailable_reason())
    d, e, bm, wt, wb = weights
    out = np.empty((x.shape[0],) + bm.shape, dtype=np.float32)
    try:
        _kernel(x, d, e, bm, wt, wb, conv_in, kbuf, vbuf, position, out)
    except NumbaError as err:               # a compiler that fails on this machine: say so, fall back
        first_line = (str(err).splitlines() or [""])[0]
        _COMPILE_ERROR.append(f"the kernel did not compile here ({type(err).__name__}: {first_line})")
        raise KernelUnavailable(_COMPILE_ERROR[0]) from err
    return out
