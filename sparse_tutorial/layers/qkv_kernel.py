"""A fused decoding step for :class:`~sparse_tutorial.layers.qkv.ConvQKVAttention` (chapter 5), written with Numba.

The PyTorch step of the paper's sparse QKV spells one new token in about a dozen calls per layer: the gated
product of the multiplicative layer, its bias, a permute, the write into the convolution's state, the three
convolutions (one merged ``conv2d``), a copy that makes Q, K and V contiguous, the writes into the key and value
cache, the attention over the cache, a transpose. At the book's widths every call costs more in fixed overhead
than in arithmetic. :func:`run` does the same arithmetic in **one call per token and layer**:

1. the multiplicative layer ``u[s, m] = b[s, m] + sum_i x_i D[s, i] E[i, m]``: per module, the gated input
   ``x * D[s]`` against each row of ``E`` transposed;
2. ``u`` written into the convolution's state at the new position;
3. the three convolutions (Q and K ``lk x mk``, V ``lk x 1``, merged as in ``ConvQKVAttention._merged_conv``)
   over the last ``lk`` positions of that state, causal in length, zero-padded over modules; the output of each
   module is the ``3M`` numbers of its head: ``q``, ``k`` and ``v``, each its window against one row of filters;
4. ``k`` and ``v`` written into the key and value cache at the new position;
5. each head's attention over every cached position: scores, softmax (the maximum subtracted first), the
   weighted sum of the values.

The caller (``ConvQKVAttention``) makes room in the cache's buffers first, through the cache's own methods, so
growing and truncating the cache stay the PyTorch path's; the kernel only writes the new position.

Like :mod:`.sparse_ff_kernel` it is compiled with ``fastmath=False`` except the dot products, whose additions
may be regrouped into vector lanes (as BLAS does): results differ from PyTorch's only by rounding. Steps 1 and 3
are written as dot products along rows padded to :data:`LANES` numbers (:func:`prepare`), four rows per call:
loops over the output's few numbers (24 per module at the seed's width) leave the vector lanes idle. The
attention reads four keys per pass over the query and four values per pass over the output. With several
threads the modules are shared out (each module's product, convolution and head), above
:data:`PARALLEL_MIN_BYTES` read per token. Only float32 on the CPU is compiled; the layer falls back to its
PyTorch step otherwise, and without Numba.
"""
from __future__ import annotations

import math

import numpy as np

from . import sparse_ff_kernel
from .sparse_ff_kernel import _dot, _dot4   # the dot products, one and four rows at a time, compiled there

try:                                        # optional: without Numba the layer keeps its PyTorch step
    from numba import njit, prange
except ImportError:                         # pragma: no cover - exercised by monkeypatching in the tests
    njit, prange = None, range

__all__ = ["available", "unavailable_reason", "KernelUnavailable", "prepare", "run", "LANES", "PARALLEL_MIN_BYTES",
           "KERNEL_SOURCE_FUNCTIONS"]

#: raised when the kernel cannot run here (the same exception as the sparse FF kernel's)
KernelUnavailable = sparse_ff_kernel.KernelUnavailable

#: the compiled dot products (:func:`.sparse_ff_kernel._dot4`) run 32 numbers per pass on an AVX2 processor
#: (eight vector lanes, four passes interleaved) and the rest one at a time: a row of 24 or 216 numbers runs
#: mostly or wholly one number at a time. :func:`prepare` pads every row to a multiple of this, with zeros.
#: A probe at the seed's width (d 384, S 16, M 24, one thread, 2-core AMD EPYC): the multiplicative layer
#: 16.4 -> 7.5 us, the convolutions 20.5 -> 13.6 us against loops over the output's 24 and 72 numbers.
LANES = 32

#: below this many bytes read per token (weights, keys and values) the step runs on one thread. On a 2-core AMD
#: EPYC with 2 threads: a probe of the step alone at the seed's width (d 384, 110 cached positions, about
#: 450 KB) gave 44 us on one thread and 37 us on two, though the whole model's decoding showed no difference
#: (``bench generate``, 635 against 636 us per token); the 800M block's lean step (d 1024) went from 0.56 and
#: 0.69 ms to 0.50 and 0.51 ms in two rounds (``bench block --shape 800m``)
PARALLEL_MIN_BYTES = 1 << 18

#: whether the fused step can run here, and why not: the sparse FF kernel's (Numba importable, and no kernel of
#: the package failed to compile in this process)
available = sparse_ff_kernel.available
unavailable_reason = sparse_ff_kernel.unavailable_reason


# --------------------------------------------------------------------------------------------------
# The kernel: plain Python, compiled by Numba
# --------------------------------------------------------------------------------------------------


def _wide_windows(u, conv_in, P, lk, half, windows, own):
    """The convolution's inputs of the wide step (``ConvQKVAttention._wide_step``), gathered in one pass: ``u``
    (B S, M), the multiplicative layer's outputs at position ``P``, written into the state ``conv_in``
    (B, M, capacity, S); then for each module ``s`` its window over positions ``P + 1 - lk .. P`` (zero before
    position 0), ``own`` (B S, M lk) in (channel, position) order, V's input; and ``windows`` (B S, mk M lk),
    the windows of modules ``s - half .. s + half`` one after the other (zero beyond the first and the last
    module), Q's and K's input."""
    B, M, _, S = conv_in.shape
    mk = 2 * half + 1
    for b in range(B):
        for s in range(S):
            for m in range(M):
                conv_in[b, m, P, s] = u[b * S + s, m]
        for m in range(M):
            for j in range(lk):
                p = P + 1 - lk + j
                for s in range(S):              # one position's row of the state: S numbers in a run
                    own[b * S + s, m * lk + j] = conv_in[b, m, p, s] if p >= 0 else np.float32(0.0)
        for s in range(S):
            for k in range(mk):
                t = s + k - half                # the neighbouring module whose window goes at offset k
                for i in range(M * lk):
                    windows[b * S + s, k * M * lk + i] = own[b * S + t, i] if 0 <= t < S else np.float32(0.0)


def _padded(n: int) -> int:
    """``n`` rounded up to a multiple of :data:`LANES`."""
    return -(-n // LANES) * LANES


def prepare(D: np.ndarray, E: np.ndarray, bias: np.ndarray, w: np.ndarray, b: np.ndarray) -> tuple:
    """The kernel's weights from the layer's: ``D`` (S, d), ``E`` (d, M), ``bias`` (S, M), the merged convolution
    ``w`` (3M, M, lk, mk) (V's kernel zero-padded to ``mk`` modules) and its bias ``b`` (3M,), all float32.

    Every product of the step becomes a dot product along a row whose length is a multiple of :data:`LANES`,
    zero-padded: ``E`` transposed, ``(M, d')``; Q's and K's filters ``(2M, W')``, one row per output channel,
    its ``mk x M x lk`` window ordered module, channel, position; V's ``(M, V')``, its own module's ``M x lk``.
    Made once per weight (the layer keeps them), not per step.
    """
    S, d = D.shape
    C3, M, lk, mk = w.shape
    et = np.zeros((M, _padded(d)), dtype=np.float32)
    et[:, :d] = E.T
    wqk = np.zeros((2 * M, _padded(mk * M * lk)), dtype=np.float32)
    wqk[:, :mk * M * lk] = w[:2 * M].transpose(0, 3, 1, 2).reshape(2 * M, -1)   # (2M, mk, M, lk)
    wv = np.zeros((M, _padded(M * lk)), dtype=np.float32)
    wv[:, :M * lk] = w[2 * M:, :, :, mk // 2].reshape(M, -1)                     # (M, M, lk): V's own module
    return (np.ascontiguousarray(D, dtype=np.float32), et, np.ascontiguousarray(bias, dtype=np.float32),
            wqk, wv, np.ascontiguousarray(b, dtype=np.float32), lk, mk)


def _rows(out, w, v, n, bias):
    """``out[c] = bias[c] + w[c] . v`` for every row ``c`` of ``w``, over ``n`` numbers: four rows per call of
    the dot product."""
    C = w.shape[0]
    c = 0
    while c + 4 <= C:
        out[c], out[c + 1], out[c + 2], out[c + 3] = _dot4(w[c], w[c + 1], w[c + 2], w[c + 3], v, n)
        c += 4
    while c < C:
        out[c] = _dot(w[c], v, n)
        c += 1
    for c in range(C):
        out[c] += bias[c]


def _multiplicative(x, ds, et, bms, g, us):
    """Step 1 for module ``s``: ``u[s, m] = bm[s, m] + (x * D[s]) . E^T[m]`` for one token ``x`` (d,): the gated
    input ``g`` (zero-padded to the rows of ``et``, ``(M, d')``) against every row of ``E^T``. ``ds``, ``bms``,
    ``us``: row ``s`` of ``D``, of the bias and of ``u``."""
    for i in range(x.shape[0]):
        g[i] = x[i] * ds[i]
    _rows(us, et, g, et.shape[1], bms)


def _window(conv_in, P, lk, half, local):
    """The convolution's input for step 3: positions ``P - lk + 1 .. P`` (none before 0) of one sequence's state
    ``conv_in`` (M, capacity, S), copied once into ``local`` (rows, M, lk), module ``s`` at row ``s + half``, zeros
    around. Module ``s``'s window, ``mk = 2 half + 1`` modules wide, is then the ``mk`` rows from row ``s``:
    contiguous."""
    M, _, S = conv_in.shape
    for cin in range(M):
        for l in range(lk):
            pos = P - (lk - 1) + l
            if pos >= 0:
                row = conv_in[cin, pos]
                for s in range(S):
                    local[s + half, cin, l] = row[s]


def _convolution(flat, s, ML, half, wqk, wv, wb, qkvs):
    """Step 3 for module ``s``: ``qkvs``, its ``3M`` outputs, from :func:`_window`'s buffer ``flat`` (raveled;
    ``ML = M lk`` numbers a module). Q and K: the window of ``mk`` modules from row ``s`` against the rows of
    ``wqk``; V: module ``s``'s own row (``s + half``) against the rows of ``wv``. Padded reads past a window meet
    zero weights."""
    C2 = wqk.shape[0]
    _rows(qkvs[:C2], wqk, flat[s * ML:], wqk.shape[1], wb[:C2])                      # Q and K
    _rows(qkvs[C2:], wv, flat[(s + half) * ML:], wv.shape[1], wb[C2:])              # V


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


def _conv_qkv_step(x, d, et, bm, wqk, wv, wb, lk, mk, conv_in, kbuf, vbuf, P, out):
    """One decoding step of the sparse QKV attention for ``B`` tokens ``x`` (B, d_model) at position ``P``.

    Weights as :func:`prepare` makes them: the multiplicative layer's gates ``d`` (S, d_model), ``E^T`` padded
    ``et`` (M, d'), its bias ``bm`` (S, M); the convolutions' filters ``wqk`` (2M, W') and ``wv`` (M, V'), their
    bias ``wb`` (3M,), kernel ``lk x mk``. Buffers, each with room for position ``P``: ``conv_in``
    (B, M, capacity, S) the multiplicative outputs of every position, ``kbuf`` and ``vbuf`` (B, S, capacity, M)
    the keys and values. Writes position ``P`` of the three buffers and ``out`` (B, S, M), the attention's
    output of every head. The modules are shared out between threads (``prange``) in the threaded compilation.
    """
    B = x.shape[0]
    S, M = bm.shape
    u = np.empty((S, M), dtype=np.float32)
    g = np.zeros((S, et.shape[1]), dtype=np.float32)                 # each module's gated input, zero-padded
    qkv = np.empty((S, 3 * M), dtype=np.float32)
    scores = np.empty((S, P + 1), dtype=np.float32)
    ML, half = M * lk, mk // 2                                       # one module's row of the window
    rows = S - 1 + max(-(-wqk.shape[1] // ML), half - (-wv.shape[1] // ML))
    local = np.zeros((rows, M, lk), dtype=np.float32)                # zeros around the modules and before 0
    for b in range(B):
        for s in prange(S):
            _multiplicative(x[b], d[s], et, bm[s], g[s], u[s])        # 1. the multiplicative layer
            for m in range(M):                                        # 2. the convolution's new input
                conv_in[b, m, P, s] = u[s, m]
        _window(conv_in[b], P, lk, half, local)
        flat = local.ravel()
        for s in prange(S):
            _convolution(flat, s, ML, half, wqk, wv, wb, qkv[s])      # 3. q, k, v of module s
            for m in range(M):                                        # 4. k, v into the cache
                kbuf[b, s, P, m] = qkv[s, M + m]
                vbuf[b, s, P, m] = qkv[s, 2 * M + m]
            _attend(kbuf[b, s], vbuf[b, s], qkv[s, :M], P + 1, scores[s], out[b, s])   # 5. attention, head s


#: the functions chapter 5 prints with ``inspect.getsource``
KERNEL_SOURCE_FUNCTIONS = (_conv_qkv_step, _convolution, _attend)

if njit is not None:
    _rows = njit(fastmath=False, cache=True)(_rows)
    _multiplicative = njit(fastmath=False, cache=True)(_multiplicative)
    _window = njit(fastmath=False, cache=True)(_window)
    _convolution = njit(fastmath=False, cache=True)(_convolution)
    _attend = njit(fastmath=False, cache=True)(_attend)
    _wide_windows = njit(fastmath=False, cache=True)(_wide_windows)
    #: one thread: no thread pool at all
    _kernel_serial = njit(fastmath=False, cache=True)(sparse_ff_kernel._renamed(_conv_qkv_step, "_kernel_serial"))
    #: several threads: the modules shared out
    _kernel_parallel = njit(parallel=True, fastmath=False, cache=True)(_conv_qkv_step)


# --------------------------------------------------------------------------------------------------
# The call from PyTorch
# --------------------------------------------------------------------------------------------------


def run(x: np.ndarray, weights: tuple, conv_in: np.ndarray, kbuf: np.ndarray, vbuf: np.ndarray,
        position: int, threads: int | None = None) -> np.ndarray:
    """The fused step on NumPy arrays: ``x`` ``(B, d)`` float32 C-contiguous; ``weights`` as :func:`prepare` makes
    them; the three buffers C-contiguous, written in place at ``position``. ``threads`` defaults to torch's thread
    count, one where a step reads under :data:`PARALLEL_MIN_BYTES`.

    Returns the attention's output ``(B, S, M)``. Raises :class:`KernelUnavailable` when the
    kernel cannot run here (the caller falls back to PyTorch).
    """
    if not available():
        raise KernelUnavailable(unavailable_reason())
    out = np.empty((x.shape[0],) + weights[2].shape, dtype=np.float32)
    nbytes = sum(w.nbytes for w in weights[:6]) + 2 * kbuf[:, :, :position + 1].nbytes // max(1, x.shape[0])
    n = sparse_ff_kernel.kernel_threads(nbytes, threads, min_bytes=PARALLEL_MIN_BYTES)
    sparse_ff_kernel._call(n, "_kernel", (x, *weights, conv_in, kbuf, vbuf, position, out), globals())
    return out
