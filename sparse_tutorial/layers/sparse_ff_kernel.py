"""Fused kernels for :class:`~sparse_tutorial.layers.sparse_ff.SparseFF`, written with Numba: one decoding step
(chapter 5), and the mask of a training call (chapter 3, at the end of this docstring).

:meth:`SparseFF.decode <sparse_tutorial.layers.sparse_ff.SparseFF.decode>` spells the sparse computation in about
eleven PyTorch calls per token, and copies the selected rows of ``W1^T`` into a buffer before it multiplies them.
:func:`fused_decode` does the same arithmetic in **one call per token and layer**:

1. the controller's low-rank product ``h = C1 x`` (``d_lowrank`` dot products, four rows of ``C1`` at a time);
2. the scores ``logits = h C2 + c`` of every unit, and the argmax in every block;
3. for every block, the dot product of the selected row of ``W1^T`` with ``x``, read once in place, the ReLU,
   (with ``scale_by_prob``) the chosen unit's in-block probability, and that multiple of the selected row of
   ``W2`` added into the output;
4. with several threads the blocks are split into one contiguous range per thread; each thread adds its rows
   into its own partial output, padded apart so that no two threads write one cache line (no false sharing),
   and the partial outputs are summed at the end.

The kernel is plain Python that Numba compiles to machine code the first time it runs (``cache=True`` keeps the
compiled code on disk for the next process). It is compiled with ``fastmath=False``: no approximate functions,
no assumptions about infinities or NaN, every sum in the order the source states, except inside the dot
products (:func:`_dot4` and its kin), whose additions the compiler may regroup into vector lanes, as BLAS
does. The result differs from PyTorch's only by rounding. Only float32 on the CPU is compiled; :class:`SparseFF`
falls back to its PyTorch ``decode`` for anything else, and when Numba is not installed.

No unit is skipped when its ReLU is zero: the kernel reads the ``W2`` row of every selected unit, as the bytes
that chapter 5's limit counts. (Skipping them would make the benchmark's random weights, where about half the
selected units are negative, look cheaper than a trained layer whose chosen units may mostly fire.)

**Training** (used by ``SparseFF.forward`` in training mode through its ``train_path``). Written as a mask, a
training call costs the dense layer's two products and about a dozen memory-bound PyTorch passes over the
``(tokens, d_ff)`` scores. A hard call (:func:`hard_forward`, :func:`hard_backward`) needs only the chosen unit of
each block: every other unit is zero after the mask and its ReLU passes no gradient, so the kernels do, per token
and block, one dot product with a row of ``W1^T`` and one row of ``W2`` forward, and the same few rows backward
(one block per thread there: each block owns its rows of the weights' gradients). :func:`sample` draws the hard
choice from ``p ** (1 / noise_scale)``, normalised, which equals ``softmax(scores / noise_scale)`` without a
second softmax; it is compiled for each whole power (10 for the reference's 0.1), so the power is a few
multiplications, and its sums may run in vector lanes (a choice is a draw, not a sum to reproduce bit for bit).
A soft call keeps the dense products; :func:`mask_forward` and :func:`mask_backward` do its mask, ReLU and their
gradients in one pass each. So does a hard call with small blocks (``SparseFF.HARD_KERNEL_MIN_BLOCK``), where a large
share of the units is chosen and one BLAS product over all of them beats a dot product per chosen row:
:func:`softmax_rows` (PyTorch's softmax pays a set-up per row, costly for rows of two units), then
:func:`hard_mask_forward` and :func:`hard_mask_backward`. These write the chosen unit of each row at an address
computed from its index, into zeros, rather than test every unit against it: with random choices that test is a
branch the processor guesses wrong half the time with blocks of two (a probe, 1M rows of two, one thread, 2-core
AMD EPYC: the forward pass took 11.2 ms with the test, 1.3-1.5 ms without).
"""
from __future__ import annotations

import types

import numpy as np
import torch

try:                                        # optional: without Numba the layer keeps its PyTorch decode
    import numba
    from numba import njit, prange
except ImportError:                         # pragma: no cover - exercised by monkeypatching in the tests
    numba = None

__all__ = ["available", "unavailable_reason", "KernelUnavailable", "prepare", "run", "fused_decode", "kernel_threads",
           "PARALLEL_MIN_BYTES", "KERNEL_SOURCE_FUNCTIONS", "mask_forward", "mask_backward", "sample",
           "sample_power", "MAX_POWER", "PARALLEL_MIN_ENTRIES", "TRAIN_SOURCE_FUNCTIONS", "hard_forward",
           "hard_backward", "hard_mask_forward", "hard_mask_backward",
           "softmax_rows"]

#: below this many bytes of weights read per token the kernel runs on one thread whatever the thread count:
#: starting and joining the other threads costs more than the rows it would share out
PARALLEL_MIN_BYTES = 1 << 20

#: padding, in float32 numbers (one 64-byte cache line), between the threads' partial outputs
_PAD = 16


#: why the kernel failed to compile in this process (then :func:`available` is False), or None
_COMPILE_ERROR: list[str] = []


class KernelUnavailable(RuntimeError):
    """The kernel cannot run here (no Numba, or it failed to compile); the caller falls back to PyTorch."""


def available() -> bool:
    """Whether the fused kernel can run here (Numba importable, and no failed compilation in this process)."""
    return numba is not None and not _COMPILE_ERROR


def unavailable_reason() -> str | None:
    """Why :func:`available` is False, or None."""
    if numba is None:
        return "numba is not installed (pip install numba)"
    return _COMPILE_ERROR[0] if _COMPILE_ERROR else None


# --------------------------------------------------------------------------------------------------
# The kernel: plain Python, compiled by Numba
# --------------------------------------------------------------------------------------------------


def _dot4(a0, a1, a2, a3, b, n):
    """The four dot products ``a_k[:n] . b[:n]`` in one pass over ``b``, float32.

    Several rows at a time: the memory system then fetches several streams at
    once, where one row alone leaves it waiting (measured cold on rows of 4096
    weights: 9 GB/s one row at a time, 15 GB/s four at a time). The one place
    where the compiler may regroup additions (``fastmath={"reassoc"}``): each
    sum then runs in vector lanes, as in BLAS; in the source's strict order
    every addition waits for the previous one (measured four times slower).
    """
    s0 = s1 = s2 = s3 = np.float32(0.0)
    for i in range(n):
        s0 += a0[i] * b[i]
        s1 += a1[i] * b[i]
        s2 += a2[i] * b[i]
        s3 += a3[i] * b[i]
    return s0, s1, s2, s3


def _dot8(a0, a1, a2, a3, a4, a5, a6, a7, b, n):
    """Eight dot products in one pass over ``b``, as :func:`_dot4`."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = np.float32(0.0)
    for i in range(n):
        s0 += a0[i] * b[i]
        s1 += a1[i] * b[i]
        s2 += a2[i] * b[i]
        s3 += a3[i] * b[i]
        s4 += a4[i] * b[i]
        s5 += a5[i] * b[i]
        s6 += a6[i] * b[i]
        s7 += a7[i] * b[i]
    return s0, s1, s2, s3, s4, s5, s6, s7


def _dot(a, b, n):
    """``a[:n] . b[:n]`` in float32, with the same regrouping as :func:`_dot4`."""
    s = np.float32(0.0)
    for i in range(n):
        s += a[i] * b[i]
    return s


def _scores(h, c2t, c2b, u0, width, logits):
    """Step 2 for units ``u0 .. u0 + width``: ``logits = c + h C2``, for every
    token. Eight rows of ``C2^T`` at a time, each read once for all tokens."""
    B, r = h.shape
    for t in range(B):
        logits[t] = c2b[u0:u0 + width]
    j = 0
    while j + 8 <= r:
        # row views: indices from 0 let the loops use vector registers
        c0, c1, c2, c3 = (c2t[j, u0:u0 + width], c2t[j + 1, u0:u0 + width],
                          c2t[j + 2, u0:u0 + width], c2t[j + 3, u0:u0 + width])
        c4, c5, c6, c7 = (c2t[j + 4, u0:u0 + width], c2t[j + 5, u0:u0 + width],
                          c2t[j + 6, u0:u0 + width], c2t[j + 7, u0:u0 + width])
        for t in range(B):
            h0, h1, h2, h3 = h[t, j], h[t, j + 1], h[t, j + 2], h[t, j + 3]
            h4, h5, h6, h7 = h[t, j + 4], h[t, j + 5], h[t, j + 6], h[t, j + 7]
            s = logits[t]
            for i in range(width):
                s[i] += (((h0 * c0[i] + h1 * c1[i]) + (h2 * c2[i] + h3 * c3[i]))
                         + ((h4 * c4[i] + h5 * c5[i]) + (h6 * c6[i] + h7 * c7[i])))
        j += 8
    while j < r:
        c0 = c2t[j, u0:u0 + width]
        for t in range(B):
            s = logits[t]
            for i in range(width):
                s[i] += h[t, j] * c0[i]
        j += 1


def _w1_dots(w1, units, x, act):
    """Step 3: ``act[q] = W1^T[units[q]] . x``, the rows read in place, eight
    at a time (then four, then one)."""
    n, d = units.shape[0], x.shape[0]
    q = 0
    while q + 8 <= n:
        u = units[q:q + 8]
        (act[q], act[q + 1], act[q + 2], act[q + 3], act[q + 4], act[q + 5],
         act[q + 6], act[q + 7]) = _dot8(w1[u[0]], w1[u[1]], w1[u[2]], w1[u[3]],
                                         w1[u[4]], w1[u[5]], w1[u[6]], w1[u[7]],
                                         x, d)
        q += 8
    while q + 4 <= n:
        u = units[q:q + 4]
        act[q], act[q + 1], act[q + 2], act[q + 3] = _dot4(
            w1[u[0]], w1[u[1]], w1[u[2]], w1[u[3]], x, d)
        q += 4
    while q < n:
        act[q] = _dot(w1[units[q]], x, d)
        q += 1


def _add_w2_rows(w2, units, act, acc):
    """Step 4: ``acc += sum_q act[q] W2[units[q]]``, eight rows at a time."""
    n, d = units.shape[0], acc.shape[0]
    q = 0
    while q + 8 <= n:
        u = units[q:q + 8]
        r0, r1, r2, r3 = w2[u[0]], w2[u[1]], w2[u[2]], w2[u[3]]
        r4, r5, r6, r7 = w2[u[4]], w2[u[5]], w2[u[6]], w2[u[7]]
        a0, a1, a2, a3 = act[q], act[q + 1], act[q + 2], act[q + 3]
        a4, a5, a6, a7 = act[q + 4], act[q + 5], act[q + 6], act[q + 7]
        for i in range(d):
            acc[i] += (((a0 * r0[i] + a1 * r1[i]) + (a2 * r2[i] + a3 * r3[i]))
                       + ((a4 * r4[i] + a5 * r5[i]) + (a6 * r6[i] + a7 * r7[i])))
        q += 8
    while q < n:
        r0, a0 = w2[units[q]], act[q]
        for i in range(d):
            acc[i] += a0 * r0[i]
        q += 1


def _decode_kernel(x, c1, c2t, c2b, w1, w2, b2, block_size, scale_by_prob,
                   n_chunks, out, chosen):
    """One decoding step of a sparse FF layer for ``B`` tokens ``x`` (B, d).

    Controller ``c1`` (r, d), ``c2t`` (r, d_ff) (``C2`` transposed), ``c2b``
    (d_ff,); ``w1`` (d_ff, d) is ``W1^T`` and ``w2`` (d_ff, d) is ``W2``, one
    row per unit; ``b2`` (d,). Writes ``out`` (B, d) and ``chosen`` (B, n_blocks),
    the unit of every block. The blocks go in ``n_chunks`` ranges, one a thread.
    """
    B, d = x.shape
    r = c1.shape[0]
    n_blocks = w1.shape[0] // block_size
    # 1. the controller's low-rank product h = x C1^T (B, r); rows of C1 shared
    #    out between the threads, four at a time
    h = np.empty((B, r), dtype=np.float32)
    for g in prange((r + 3) // 4):
        j = 4 * g
        for t in range(B):
            if j + 4 <= r:
                h[t, j], h[t, j + 1], h[t, j + 2], h[t, j + 3] = _dot4(
                    c1[j], c1[j + 1], c1[j + 2], c1[j + 3], x[t], d)
            else:
                for jj in range(j, r):
                    h[t, jj] = _dot(c1[jj], x[t], d)
    # 2-4. one range of blocks per thread; each thread adds its W2 rows into
    #    its own partial output, one cache line apart from the next thread's
    per_chunk = (n_blocks + n_chunks - 1) // n_chunks
    stride = (d + _PAD - 1) // _PAD * _PAD + _PAD
    partial = np.zeros((n_chunks, B, stride), dtype=np.float32)
    for c in prange(n_chunks):
        first = c * per_chunk
        nb = min(n_blocks, first + per_chunk) - first
        if nb <= 0:
            continue
        u0, width = first * block_size, nb * block_size
        logits = np.empty((B, width), dtype=np.float32)
        _scores(h, c2t, c2b, u0, width, logits)              # 2. the scores
        units = np.empty(nb, dtype=np.int64)
        act = np.empty(nb, dtype=np.float32)
        for t in range(B):
            s = logits[t]
            for q in range(nb):          # 2. each block's argmax (first on ties)
                k = 0
                for i in range(1, block_size):
                    if s[q * block_size + i] > s[q * block_size + k]:
                        k = i
                units[q] = u0 + q * block_size + k
                chosen[t, first + q] = units[q]
            _w1_dots(w1, units, x[t], act)                   # 3. W1 rows . x
            for q in range(nb):
                a = max(act[q], np.float32(0.0))             # the ReLU
                if scale_by_prob:        # times p_k = 1 / sum_i exp(l_i - l_k)
                    best = s[units[q] - u0]
                    z = np.float32(0.0)
                    for i in range(q * block_size, (q + 1) * block_size):
                        z += np.exp(s[i] - best)
                    a = a / z
                act[q] = a
            _add_w2_rows(w2, units, act, partial[c, t, :d])  # 4. act x W2 rows
    for t in range(B):                   # the partial outputs summed, plus b2
        for i in range(d):
            s = b2[i]
            for c in range(n_chunks):
                s += partial[c, t, i]
            out[t, i] = s


#: the functions chapter 5 prints with ``inspect.getsource``
KERNEL_SOURCE_FUNCTIONS = (_decode_kernel, _add_w2_rows)


# --------------------------------------------------------------------------------------------------
# Training: the mask, the ReLU and their backward in one pass over the scores (chapter 3)
# --------------------------------------------------------------------------------------------------


def _mask_forward(p, h, act):
    """A soft training call's ``act = relu(h * p)`` for ``R`` rows (one block of
    one token each) of ``N`` units, all ``(R, N)``: ``p`` is the in-block
    softmax of the scores, the mask of a soft call."""
    R, N = p.shape
    for r in prange(R):
        pr, hr, ar = p[r], h[r], act[r]
        for j in range(N):
            a = hr[j] * pr[j]
            ar[j] = a if a > 0 else np.float32(0.0)


def _mask_backward(g, p, h, grad_h, grad_logits):
    """The gradients of :func:`_mask_forward`'s ``act`` given ``g = d loss /
    d act``: ``grad_h`` and ``grad_logits``, all ``(R, N)``, as PyTorch's
    autograd computes them for ``relu(h * p)``: the ReLU passes where its
    input is positive, then the softmax's ``p * (g_p - sum(g_p * p))``."""
    R, N = p.shape
    for r in prange(R):
        pr, hr, gr = p[r], h[r], g[r]
        ghr, glr = grad_h[r], grad_logits[r]
        t = np.float32(0.0)
        for j in range(N):
            live = hr[j] * pr[j] > 0
            ghr[j] = gr[j] * pr[j] if live else np.float32(0.0)
            glr[j] = gr[j] * hr[j] if live else np.float32(0.0)  # g_p for now
            t += glr[j] * pr[j]
        for j in range(N):
            glr[j] = pr[j] * (glr[j] - t)


def _hard_forward(x, w1, w2, b2, p, chosen, block_size, scale_by_prob, y, h_sel):
    """A hard training call's whole layer, touching only the chosen units:
    ``y[t] = b2 + sum_b relu(h * s) W2[u]`` with ``h = x[t] . W1^T[u]`` for the
    chosen unit ``u`` of each block ``b`` (``s`` its ``p`` with
    ``scale_by_prob``, else 1). The dense path's other units are exactly zero
    after the mask, so this is the same sum without them. ``h_sel`` keeps
    each ``h`` for the backward pass. One token per iteration: no two
    iterations write one row of ``y``."""
    T, d = x.shape
    n_blocks = w1.shape[0] // block_size
    for t in prange(T):
        yt, xt = y[t], x[t]
        for i in range(d):
            yt[i] = b2[i]
        for b in range(n_blocks):
            r = t * n_blocks + b
            c = chosen[r]
            u = b * block_size + c
            h = _dot(w1[u], xt, d)
            h_sel[r] = h
            a = h * p[r, c] if scale_by_prob else h
            if a > 0:                    # the ReLU; a zero adds nothing
                w2u = w2[u]
                for i in range(d):
                    yt[i] += a * w2u[i]


def _hard_backward(g, x, w1, w2, p, chosen, h_sel, block_size, scale_by_prob,
                   grad_x, grad_w1, grad_w2, grad_logits, grad_h):
    """The gradients of :func:`_hard_forward` given ``g = d loss / d y``
    ``(T, d)``: ``grad_w1`` and ``grad_w2`` (zeros on entry; only the chosen
    rows change), ``grad_logits`` ``(T n_blocks, N)`` as
    :func:`_mask_backward`'s hard rows, and ``grad_x``. First one block per
    iteration (each block owns its rows of ``W1^T`` and ``W2``), then one
    token per iteration for ``grad_x``. ``grad_h`` ``(T n_blocks,)`` is
    scratch: each chosen unit's gradient at ``h``."""
    T, d = x.shape
    n_blocks = w1.shape[0] // block_size
    for b in prange(n_blocks):
        for t in range(T):
            r = t * n_blocks + b
            c = chosen[r]
            u = b * block_size + c
            pr, glr = p[r], grad_logits[r]
            s = pr[c] if scale_by_prob else np.float32(1.0)
            h = h_sel[r]
            gm = np.float32(0.0)
            grad_h[r] = np.float32(0.0)
            if h * s > 0:                # the ReLU passed: gradients flow
                gt = g[t]
                ga = _dot(w2[u], gt, d)              # d loss / d act
                a = h * s
                gw2, gw1, xt = grad_w2[u], grad_w1[u], x[t]
                gh = ga * s
                for i in range(d):
                    gw2[i] += a * gt[i]
                    gw1[i] += gh * xt[i]
                grad_h[r] = gh
                gm = ga * h                          # d loss / d mask[c]
            tt = np.float32(0.0) - gm * pr[c]
            for j in range(block_size):
                glr[j] = pr[j] * tt
            glr[c] = pr[c] * (gm + tt)
    for t in prange(T):
        gxt = grad_x[t]
        for i in range(d):
            gxt[i] = np.float32(0.0)
        for b in range(n_blocks):
            r = t * n_blocks + b
            gh = grad_h[r]
            if gh != 0:
                w1u = w1[b * block_size + chosen[r]]
                for i in range(d):
                    gxt[i] += gh * w1u[i]


def _softmax_shift(logits, p):
    """The first pass of the in-block softmax: ``p = logits - max`` along each
    row, ``(R, N)`` (:func:`softmax_rows` then takes ``exp`` in PyTorch's
    vector lanes, and :func:`_softmax_scale` divides by the sums). PyTorch's
    own softmax is fast for long rows but pays a set-up per row, which for
    rows of two or four units costs more than the rest of a training call's
    mask; Numba's ``exp`` runs one number at a time."""
    R, N = logits.shape
    for r in prange(R):
        lr, pr = logits[r], p[r]
        m = lr[0]
        for j in range(1, N):
            m = max(m, lr[j])
        for j in range(N):
            pr[j] = lr[j] - m


def _softmax_scale(e):
    """The last pass of the in-block softmax: each row of ``e = exp(logits -
    max)`` divided by its sum, in place."""
    R, N = e.shape
    for r in prange(R):
        er = e[r]
        total = np.float32(0.0)
        for j in range(N):
            total += er[j]
        for j in range(N):
            er[j] = er[j] / total


def _hard_mask_forward(p, h, chosen, scale_by_prob, act):
    """A hard training call's mask and ReLU on the dense first product, for
    small blocks (see ``SparseFF.HARD_KERNEL_MIN_BLOCK``): ``act`` (zeros on
    entry) gets ``relu(h * s)`` at the chosen unit ``c`` of each row (``s``
    the unit's ``p`` with ``scale_by_prob``, else 1); ``p``, ``h``, ``act``
    ``(R, N)``, ``chosen`` ``(R,)``. The values of :func:`_hard_forward`'s
    ``h * s`` before the second product. One store per row, at an address
    computed from ``c``: a loop over the row that tests ``j == c`` would be a
    branch the processor guesses wrong half the time with blocks of two."""
    R, N = p.shape
    pf, hf, af = p.ravel(), h.ravel(), act.ravel()
    for r in prange(R):
        k = r * N + chosen[r]
        a = hf[k] * pf[k] if scale_by_prob else hf[k]
        af[k] = a if a > 0 else np.float32(0.0)


def _hard_mask_backward(g, p, h, chosen, scale_by_prob, grad_h, grad_logits,
                        at_chosen):
    """The gradients of :func:`_hard_mask_forward`'s ``act`` given ``g = d loss
    / d act``, all ``(R, N)``: ``grad_h`` (zeros on entry) at the chosen unit,
    where the ReLU passed, and ``grad_logits`` through the in-block softmax,
    as :func:`_hard_backward`'s rows, but for the chosen unit's own term
    ``p[c] * d loss / d mask[c]``, left in ``at_chosen`` ``(R,)`` for
    :func:`_add_at_chosen` (a store to the chosen entry after the row's loop
    was lost in Numba's threaded compilation, so it runs as a loop of its
    own)."""
    R, N = p.shape
    pf, hf, gf, ghf = p.ravel(), h.ravel(), g.ravel(), grad_h.ravel()
    for r in prange(R):
        k = r * N + chosen[r]
        s = pf[k] if scale_by_prob else np.float32(1.0)
        hc, gc = hf[k], gf[k]
        # 1 where the ReLU passed (gradients flow), else 0: a product, where
        # `x if live else 0` compiles to a branch, guessed wrong half the time
        # (the same numbers for a finite g; an infinite one makes NaN here
        # where PyTorch writes 0, and NaN in the W2 gradient either way)
        live = np.float32(hc * s > 0)
        ghf[k] = gc * s * live
        gm = gc * hc * live              # d loss / d mask[c]
        tt = np.float32(0.0) - gm * pf[k]
        pr, glr = p[r], grad_logits[r]
        for j in range(N):
            glr[j] = pr[j] * tt
        at_chosen[r] = pf[k] * gm


def _add_at_chosen(grad_logits, chosen, at_chosen):
    """``grad_logits[r, chosen[r]] += at_chosen[r]`` for every row: the last
    term of :func:`_hard_mask_backward`."""
    R, N = grad_logits.shape
    gl = grad_logits.ravel()
    for r in prange(R):
        gl[r * N + chosen[r]] += at_chosen[r]


def _power(q):
    """``q ** k``: :func:`_sampler` compiles :func:`_sample_source` with one of these for each whole ``k``."""
    raise NotImplementedError("compiled per power by _sampler")


def _sample_source(p, u, chosen):
    """The hard choice of every row, drawn from ``softmax(scores /
    noise_scale)``, which is ``p ** k`` normalised for ``k = 1 / noise_scale``:
    the first unit whose cumulative sum reaches ``u[r]`` times the total, as
    ``SparseFF._sample``. ``_power`` (``q ** k`` for a whole ``k``) is
    compiled for each ``k``, so it is a few multiplications, in float64
    (``p ** 10`` of a small ``p`` is far below float32's range)."""
    R, N = p.shape
    for r in prange(R):
        pr = p[r]
        total = 0.0
        for j in range(N):
            total += _power(np.float64(pr[j]))
        target = np.float64(u[r]) * total
        # the first unit whose cumulative sum reaches the target (the last at
        # most): the count of the sums before it, without a branch to guess
        c, cum = 0, 0.0
        for j in range(N - 1):
            cum += _power(np.float64(pr[j]))
            c += cum < target
        chosen[r] = c


#: the functions chapter 3 prints with ``inspect.getsource``
TRAIN_SOURCE_FUNCTIONS = (_sample_source, _hard_forward, _hard_backward, _mask_forward, _mask_backward,
                          _softmax_shift, _softmax_scale, _hard_mask_forward, _hard_mask_backward, _add_at_chosen)


def _renamed(fn, name):
    """``fn`` under another name: Numba's disk cache is named after the function, so the one-thread and the
    threaded compilations of one source need two names not to overwrite each other's cache."""
    g = types.FunctionType(fn.__code__, fn.__globals__, name, fn.__defaults__, fn.__closure__)
    g.__qualname__ = name
    g.__doc__ = fn.__doc__
    return g


if numba is not None:
    _dot = njit(fastmath={"reassoc"}, cache=True)(_dot)
    _dot4 = njit(fastmath={"reassoc"}, cache=True)(_dot4)
    _dot8 = njit(fastmath={"reassoc"}, cache=True)(_dot8)
    _scores = njit(fastmath=False, cache=True)(_scores)
    _w1_dots = njit(fastmath=False, cache=True)(_w1_dots)
    _add_w2_rows = njit(fastmath=False, cache=True)(_add_w2_rows)
    #: one thread: no thread pool at all (the step runs on the calling thread, so its CPU time is the step's)
    _kernel_serial = njit(fastmath=False, cache=True)(_renamed(_decode_kernel, "_decode_kernel_serial"))
    #: several threads: the ``prange`` loops are shared out
    _kernel_parallel = njit(parallel=True, fastmath=False, cache=True)(_decode_kernel)
    _mask_forward_serial = njit(fastmath=False, cache=True)(_renamed(_mask_forward, "_mask_forward_serial"))
    _mask_forward_parallel = njit(parallel=True, fastmath=False, cache=True)(_mask_forward)
    _mask_backward_serial = njit(fastmath=False, cache=True)(_renamed(_mask_backward, "_mask_backward_serial"))
    _mask_backward_parallel = njit(parallel=True, fastmath=False, cache=True)(_mask_backward)
    _hard_forward_serial = njit(fastmath=False, cache=True)(_renamed(_hard_forward, "_hard_forward_serial"))
    _hard_forward_parallel = njit(parallel=True, fastmath=False, cache=True)(_hard_forward)
    _hard_backward_serial = njit(fastmath=False, cache=True)(_renamed(_hard_backward, "_hard_backward_serial"))
    _hard_backward_parallel = njit(parallel=True, fastmath=False, cache=True)(_hard_backward)
    _softmax_shift_serial = njit(fastmath=False, cache=True)(_renamed(_softmax_shift, "_softmax_shift_serial"))
    _softmax_shift_parallel = njit(parallel=True, fastmath=False, cache=True)(_softmax_shift)
    _softmax_scale_serial = njit(fastmath=False, cache=True)(_renamed(_softmax_scale, "_softmax_scale_serial"))
    _softmax_scale_parallel = njit(parallel=True, fastmath=False, cache=True)(_softmax_scale)
    _hard_mask_forward_serial = njit(fastmath=False, cache=True)(
        _renamed(_hard_mask_forward, "_hard_mask_forward_serial"))
    _hard_mask_forward_parallel = njit(parallel=True, fastmath=False, cache=True)(_hard_mask_forward)
    _hard_mask_backward_serial = njit(fastmath=False, cache=True)(
        _renamed(_hard_mask_backward, "_hard_mask_backward_serial"))
    _hard_mask_backward_parallel = njit(parallel=True, fastmath=False, cache=True)(_hard_mask_backward)
    _add_at_chosen_serial = njit(fastmath=False, cache=True)(_renamed(_add_at_chosen, "_add_at_chosen_serial"))
    _add_at_chosen_parallel = njit(parallel=True, fastmath=False, cache=True)(_add_at_chosen)


# --------------------------------------------------------------------------------------------------
# The call from PyTorch
# --------------------------------------------------------------------------------------------------


def kernel_threads(bytes_per_token: int, threads: int | None = None, min_bytes: int | None = None) -> int:
    """The threads a kernel uses: torch's thread count (or ``threads``), at most Numba's pool, and one when a
    step reads under ``min_bytes`` (default :data:`PARALLEL_MIN_BYTES`)."""
    n = torch.get_num_threads() if threads is None else threads
    if numba is not None:
        n = min(n, numba.config.NUMBA_NUM_THREADS)
    return 1 if n <= 1 or bytes_per_token < (PARALLEL_MIN_BYTES if min_bytes is None else min_bytes) else n


def _array(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous NumPy view of ``t`` (a copy only when ``t`` is not contiguous)."""
    a = t.detach().numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def prepare(c1: torch.Tensor, c2t: torch.Tensor, c2b: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor,
            b2: torch.Tensor) -> tuple:
    """The layer's weights as the NumPy views :func:`run` takes (float32, CPU; no copy of contiguous weights).

    ``c1`` ``(r, d)``, ``c2t`` ``(r, d_ff)`` (``C2`` transposed), ``c2b`` ``(d_ff,)``, ``w1`` and ``w2``
    ``(d_ff, d)``, ``b2`` ``(d,)``: see :func:`_decode_kernel`. A caller may keep the result between calls.
    """
    return tuple(_array(t) for t in (c1, c2t, c2b, w1, w2, b2))


def run(x: np.ndarray, weights: tuple, block_size: int, scale_by_prob: bool = False, threads: int | None = None,
        chunks: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The fused step on NumPy arrays: ``x`` ``(B, d)`` float32 C-contiguous and :func:`prepare`'s ``weights``
    -> ``(out (B, d), chosen (B, n_blocks))``.

    ``threads`` defaults to torch's thread count (:func:`kernel_threads`); ``chunks`` splits the blocks into
    that many ranges instead of one per thread (the tests' uneven splits).
    """
    if not available():
        raise KernelUnavailable(unavailable_reason())
    c1, c2t, c2b, w1, w2, b2 = weights
    B, d = x.shape
    d_ff, r = w1.shape[0], c1.shape[0]
    n_blocks = d_ff // block_size
    n = kernel_threads(4 * (r * (d + d_ff) + 2 * n_blocks * d), threads)
    out = np.empty((B, d), dtype=np.float32)
    chosen = np.empty((B, n_blocks), dtype=np.int64)
    n_chunks = n if chunks is None else chunks
    _call(n, "_kernel", (x, c1, c2t, c2b, w1, w2, b2, block_size, scale_by_prob, n_chunks, out, chosen))
    return out, chosen


def _call(n: int, name: str, args: tuple, kernels: dict | None = None) -> None:
    """Run the one-thread compilation of kernel ``name`` (``n == 1``) or the threaded one on ``n`` threads,
    looked up as ``name + "_serial"`` or ``name + "_parallel"`` in ``kernels`` (default: this module's; the
    other kernel modules pass their own ``globals()``); a compiler that fails on this machine is recorded and
    raised as :class:`KernelUnavailable`."""
    kernels = globals() if kernels is None else kernels
    try:
        if n == 1:
            kernels[name + "_serial"](*args)
            return
        torch_threads = torch.get_num_threads()
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)
        kernels[name + "_parallel"](*args)
        if torch.get_num_threads() != torch_threads:
            # Numba's OpenMP pool, started by its first threaded call, sets the OpenMP thread count of the
            # process, which is also PyTorch's: put PyTorch's back
            torch.set_num_threads(torch_threads)
    except numba.core.errors.NumbaError as e:    # a compiler that fails on this machine: say so, fall back
        first_line = (str(e).splitlines() or [""])[0]
        _COMPILE_ERROR.append(f"the kernel did not compile here ({type(e).__name__}: {first_line})")
        raise KernelUnavailable(_COMPILE_ERROR[0]) from e


#: below this many mask entries per call the training kernels run on one thread
PARALLEL_MIN_ENTRIES = 1 << 14


def mask_forward(p: torch.Tensor, h: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """:func:`_mask_forward` on PyTorch tensors (float32, CPU): ``p``, ``h`` ``(R, N)`` -> ``act (R, N)``."""
    if not available():
        raise KernelUnavailable(unavailable_reason())
    act = np.empty(tuple(p.shape), dtype=np.float32)
    _call(_threads(p.numel(), threads), "_mask_forward", (_array(p), _array(h), act))
    return torch.from_numpy(act)


#: the largest ``1 / noise_scale`` :func:`sample` compiles a sampler for
MAX_POWER = 64

#: per whole power ``k``: the compiled one-thread and threaded samplers
_SAMPLERS: dict[int, tuple] = {}


def sample_power(noise_scale: float) -> int | None:
    """``1 / noise_scale`` when it is a whole number from 1 to :data:`MAX_POWER` (the kernel's sampler then
    applies; the reference's 0.1 gives 10), else None."""
    if noise_scale <= 0:
        return None
    k = 1.0 / noise_scale
    return int(round(k)) if abs(k - round(k)) < 1e-9 and 1 <= round(k) <= MAX_POWER else None


def _sampler(k: int, parallel: bool):
    """:func:`_sample_source` compiled with ``_power(q) = q ** k`` as a chain of multiplications."""
    if k not in _SAMPLERS:
        def _power(q):
            r, b = 1.0, q
            for bit in range(7):                # k < 128: its bits are constants here
                if (k >> bit) & 1:
                    r *= b
                b *= b
            return r
        glb = dict(_sample_source.__globals__, _power=njit(inline="always")(_power))
        fn = types.FunctionType(_sample_source.__code__, glb, "_sample_source")
        # the sums may run in vector lanes (as _dot4's); the choice is a draw, not a reduction to reproduce
        _SAMPLERS[k] = (njit(fastmath={"reassoc"})(fn), njit(parallel=True, fastmath={"reassoc"})(fn))
    return _SAMPLERS[k][1 if parallel else 0]


def sample(p: torch.Tensor, u: torch.Tensor, power: int, threads: int | None = None) -> torch.Tensor:
    """The hard choice of each row of ``p`` ``(R, N)`` for uniform numbers ``u`` ``(R,)`` and a whole
    ``power = 1 / noise_scale`` (:func:`sample_power`): ``(R,)`` indices within the rows."""
    if not available():
        raise KernelUnavailable(unavailable_reason())
    R, N = p.shape
    chosen = np.empty(R, dtype=np.int64)
    n = _threads(R * N, threads)
    try:
        fn = _sampler(power, n > 1)
        if n > 1 and numba.get_num_threads() != n:
            numba.set_num_threads(n)
        torch_threads = torch.get_num_threads()
        fn(_array(p), _array(u), chosen)
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)
    except numba.core.errors.NumbaError as e:
        first_line = (str(e).splitlines() or [""])[0]
        _COMPILE_ERROR.append(f"the kernel did not compile here ({type(e).__name__}: {first_line})")
        raise KernelUnavailable(_COMPILE_ERROR[0]) from e
    return torch.from_numpy(chosen)


def hard_forward(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor, p: torch.Tensor,
                 chosen: torch.Tensor, scale_by_prob: bool,
                 threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_hard_forward` on PyTorch tensors (float32, CPU): ``x`` ``(T, d)``, the layer's ``w1``, ``w2``
    ``(d_ff, d)`` and ``b2``, ``p`` ``(T n_blocks, N)`` and the in-block ``chosen`` ``(T n_blocks,)`` ->
    ``(y (T, d), h_sel (T n_blocks,))``."""
    if not available():
        raise KernelUnavailable(unavailable_reason())
    T, d = x.shape
    y = np.empty((T, d), dtype=np.float32)
    h_sel = np.empty(p.shape[0], dtype=np.float32)
    _call(_threads(p.numel(), threads), "_hard_forward",
          (_array(x), _array(w1), _array(w2), _array(b2), _array(p), _array(chosen), p.shape[1], scale_by_prob,
           y, h_sel))
    return torch.from_numpy(y), torch.from_numpy(h_sel)


def hard_backward(g: torch.Tensor, x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, p: torch.Tensor,
                  chosen: torch.Tensor, h_sel: torch.Tensor, scale_by_prob: bool,
                  threads: int | None = None) -> tuple[torch.Tensor, ...]:
    """:func:`_hard_backward` on PyTorch tensors -> ``(grad_x, grad_w1, grad_w2, grad_logits)``."""
    T, d = x.shape
    grad_x = np.empty((T, d), dtype=np.float32)
    grad_w1 = np.zeros(tuple(w1.shape), dtype=np.float32)
    grad_w2 = np.zeros(tuple(w2.shape), dtype=np.float32)
    grad_logits = np.empty(tuple(p.shape), dtype=np.float32)
    grad_h = np.empty(p.shape[0], dtype=np.float32)
    _call(_threads(p.numel(), threads), "_hard_backward",
          (_array(g), _array(x), _array(w1), _array(w2), _array(p), _array(chosen), _array(h_sel), p.shape[1],
           scale_by_prob, grad_x, grad_w1, grad_w2, grad_logits, grad_h))
    return tuple(torch.from_numpy(a) for a in (grad_x, grad_w1, grad_w2, grad_logits))


def _threads(entries: int, threads: int | None) -> int:
    """The training kernels' threads: one below :data:`PARALLEL_MIN_ENTRIES` mask entries, else
    :func:`kernel_threads`'s."""
    return 1 if entries < PARALLEL_MIN_ENTRIES else kernel_threads(PARALLEL_MIN_BYTES, threads)


def mask_backward(g: torch.Tensor, p: torch.Tensor, h: torch.Tensor,
                  threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_mask_backward` on PyTorch tensors: ``g``, ``p``, ``h`` ``(R, N)`` -> ``(grad_h, grad_logits)``."""
    grad_h = np.empty(tuple(p.shape), dtype=np.float32)
    grad_logits = np.empty(tuple(p.shape), dtype=np.float32)
    _call(_threads(p.numel(), threads), "_mask_backward", (_array(g), _array(p), _array(h), grad_h, grad_logits))
    return torch.from_numpy(grad_h), torch.from_numpy(grad_logits)


def softmax_rows(logits: torch.Tensor, threads: int | None = None) -> torch.Tensor:
    """The in-block softmax on a PyTorch tensor (float32, CPU): ``logits`` ``(R, N)`` -> ``p`` ``(R, N)``, as
    ``F.softmax(logits, -1)`` computes it (``exp(l - max) / sum``): :func:`_softmax_shift`, PyTorch's ``exp``
    in place (in vector lanes; Numba's runs one number at a time here), :func:`_softmax_scale`."""
    if not available():
        raise KernelUnavailable(unavailable_reason())
    p = np.empty(tuple(logits.shape), dtype=np.float32)
    n = _threads(logits.numel(), threads)
    _call(n, "_softmax_shift", (_array(logits), p))
    torch.from_numpy(p).exp_()
    _call(n, "_softmax_scale", (p,))
    return torch.from_numpy(p)


def hard_mask_forward(p: torch.Tensor, h: torch.Tensor, chosen: torch.Tensor, scale_by_prob: bool,
                      threads: int | None = None) -> torch.Tensor:
    """:func:`_hard_mask_forward` on PyTorch tensors (float32, CPU): ``p``, ``h`` ``(R, N)`` and the in-block
    ``chosen`` ``(R,)`` -> ``act (R, N)``."""
    if not available():
        raise KernelUnavailable(unavailable_reason())
    act = np.zeros(tuple(p.shape), dtype=np.float32)
    _call(_threads(p.numel(), threads), "_hard_mask_forward",
          (_array(p), _array(h), _array(chosen), scale_by_prob, act))
    return torch.from_numpy(act)


def hard_mask_backward(g: torch.Tensor, p: torch.Tensor, h: torch.Tensor, chosen: torch.Tensor,
                       scale_by_prob: bool, threads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_hard_mask_backward` then :func:`_add_at_chosen` on PyTorch tensors -> ``(grad_h, grad_logits)``,
    both ``(R, N)``."""
    grad_h = np.zeros(tuple(p.shape), dtype=np.float32)
    grad_logits = np.empty(tuple(p.shape), dtype=np.float32)
    at_chosen = np.empty(p.shape[0], dtype=np.float32)
    n, c = _threads(p.numel(), threads), _array(chosen)
    _call(n, "_hard_mask_backward",
          (_array(g), _array(p), _array(h), c, scale_by_prob, grad_h, grad_logits, at_chosen))
    _call(n, "_add_at_chosen", (grad_logits, c, at_chosen))
    return torch.from_numpy(grad_h), torch.from_numpy(grad_logits)


def fused_decode(x: torch.Tensor, c1: torch.Tensor, c2t: torch.Tensor, c2b: torch.Tensor, w1: torch.Tensor,
                 w2: torch.Tensor, b2: torch.Tensor, block_size: int, scale_by_prob: bool = False,
                 threads: int | None = None, return_chosen: bool = False, chunks: int | None = None):
    """The fused decoding step on PyTorch tensors (float32, CPU): ``x`` ``(B, d)`` -> ``(B, d)``.

    The weights as in :func:`prepare`; ``threads`` and ``chunks`` as in :func:`run`. With ``return_chosen`` also
    the ``(B, n_blocks)`` flat indices of the chosen units. Arguments are not checked here;
    :meth:`SparseFF.decode` checks them (and keeps :func:`prepare`'s views between calls).
    """
    out, chosen = run(_array(x), prepare(c1, c2t, c2b, w1, w2, b2), block_size, bool(scale_by_prob), threads,
                      chunks)
    y = torch.from_numpy(out)
    return (y, torch.from_numpy(chosen)) if return_chosen else y
