"""A fused matrix-vector product for the dense layers' decoding step (chapter 5), written with Numba.

At batch 1 a dense layer's decoding step is a matrix-vector product: every weight is read once and used for one
multiply-add, so the step can run no faster than the memory streams the weights. ``F.linear`` hands it to the
BLAS library PyTorch was built with, whose matrix-vector product is tuned for some processors more than others:
on the AMD EPYC that chapter 5 was last measured on it streamed a seed-size model's weights at about 10 GB/s,
where the machine reads about 26 GB/s. :func:`bind` gives the product written out, one row of the weight at a
time, with its dot product in vector lanes (``fastmath={"reassoc"}``, the additions regrouped as BLAS does; no
other approximation), rows shared between threads when the matrix is large enough
(:data:`~.sparse_ff_kernel.PARALLEL_MIN_BYTES`), and, for the FF's first product, the ReLU applied as each output
is written.

The dense kinds' lean steps (:meth:`DenseFF.step_function <sparse_tutorial.layers.dense.DenseFF.step_function>`
and :meth:`CausalSelfAttention.step_function <sparse_tutorial.layers.attention.CausalSelfAttention.step_function>`)
use it where it applies (their ``decode_path``; :func:`applies` says where it was measured to win), so the
dense baseline gets the same kind of help as the sparse layers' fused kernels and the ratios stay honest. It
needs Numba, float32 on the CPU and no autograd; anything else takes ``F.linear``, which is also the reference
the tests hold it to (within float rounding).

Between the attention's two products, :func:`bind_heads` writes the new key and value into the cache and runs each
head's softmax over it in one call (:func:`_cached_heads`), the heads shared out between threads where they read
at least :data:`HEADS_PARALLEL_MIN_BYTES`; the sparse QKV's lean step for wide layers calls it too.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from . import sparse_ff_kernel
from .qkv_kernel import _attend                # one head's softmax attention over the cache, compiled there

try:                                        # optional: without Numba the layers keep F.linear
    from numba import njit, prange
except ImportError:                         # pragma: no cover - exercised by monkeypatching in the tests
    njit = None

__all__ = ["available", "unavailable_reason", "applies", "bind", "products", "bind_heads", "MAX_ROWS", "MIN_BYTES",
           "MAX_ROW", "KERNEL_SOURCE_FUNCTIONS"]

available = sparse_ff_kernel.available
unavailable_reason = sparse_ff_kernel.unavailable_reason


def _matvec(w, b, x, relu, out):
    """``out[t, j] = b[j] + w[j] . x[t]`` for the ``B`` rows of ``x`` (B, d), ``w`` (R, d), ``b`` (R,); with
    ``relu`` each output is clipped at zero as it is written. The rows of ``w`` are shared out between the
    threads (``prange``); each row is read once for all ``B`` tokens."""
    R, d = w.shape
    B = x.shape[0]
    for j in prange(R):
        for t in range(B):
            acc = np.float32(0.0)
            for i in range(d):          # the one loop whose additions may be regrouped into vector lanes
                acc += w[j, i] * x[t, i]
            y = acc + b[j]
            out[t, j] = y if not relu or y > 0 else np.float32(0.0)


def _cached_heads(qkv, kbuf, vbuf, P, scores, out):
    """The attention of one new token per sequence at position ``P``: ``qkv`` (B, 3C) is the output of the
    Q, K, V product (Q, then K, then V, each ``H`` heads of ``hd`` units); its key and value are written into
    ``kbuf``, ``vbuf`` (B, H, capacity, hd) at ``P``, then each head attends over positions ``0..P``
    (``scores`` (H, capacity): room for ``P + 1`` numbers a head) and writes its ``hd`` outputs into ``out``
    (B, C). The heads are shared out between the threads (``prange``) in the threaded compilation."""
    B, H, _, hd = kbuf.shape
    C = H * hd
    for b in range(B):
        for h in prange(H):
            q0 = h * hd
            for m in range(hd):
                kbuf[b, h, P, m] = qkv[b, C + q0 + m]
                vbuf[b, h, P, m] = qkv[b, 2 * C + q0 + m]
            _attend(kbuf[b, h], vbuf[b, h], qkv[b, q0:q0 + hd], P + 1, scores[h], out[b, q0:q0 + hd])


#: the functions chapter 5 prints with ``inspect.getsource``
KERNEL_SOURCE_FUNCTIONS = (_matvec, _cached_heads)

if njit is not None:
    _matvec_serial = njit(fastmath={"reassoc"}, cache=True)(sparse_ff_kernel._renamed(_matvec, "_matvec_serial"))
    _matvec_parallel = njit(parallel=True, fastmath={"reassoc"}, cache=True)(_matvec)
    _cached_heads_serial = njit(fastmath=False, cache=True)(
        sparse_ff_kernel._renamed(_cached_heads, "_cached_heads_serial"))
    _cached_heads_parallel = njit(parallel=True, fastmath=False, cache=True)(_cached_heads)


#: :func:`bind_heads`'s call shares the heads out between threads (with more than one) where the keys and values
#: it reads take at least this many bytes: below it a thread pool's start costs more than the heads' arithmetic
#: saves. A probe on a 2-core AMD EPYC, warm, µs, one thread against two: 6 heads of 64 over 101 positions
#: (0.31 MB) 22.8 / 25.6, over 357 (1.1 MB) 56.8 / 45.4; 16 heads of 64 over 513 (4.2 MB) 181.8 / 114.4; the
#: 17B block's 64 heads of 144 over 129 (9.5 MB) 1254 / 270
HEADS_PARALLEL_MIN_BYTES = 1 << 19

#: the lean steps take the kernel for up to this many tokens a call (one per sequence); more rows are a
#: matrix-matrix product, which BLAS blocks for the caches and the kernel does not
MAX_ROWS = 8

#: ``"auto"`` takes the kernel for weights of at least this many bytes. The kernel wins where the weights stream
#: from memory, as a model's do when they do not fit the processor's caches; a small matrix stays in the caches
#: from one token to the next, and there BLAS's product is the faster one (one thread, warm, on the AMD EPYC of
#: chapter 5's last run, µs, F.linear against the kernel: 48 x 192 5.1 / 6.2, 384 x 1536 70.5 / 90.4; cold,
#: the seed-size model's 24 matrices in turn: 4494 / 2200)
MIN_BYTES = 1 << 19

#: ``"auto"`` takes the kernel for rows of at most this many weights (``in_features``). It reads one row at a
#: time; on long rows BLAS's product, which reads several at once, streams faster (one thread, cold, on the same
#: machine, GB/s, F.linear against the kernel, ``out x in``: 4096 x 1024 17.2 / 39.0, 1024 x 4096 21.2 / 25.3,
#: 1024 x 8192 23.3 / 16.4, 512 x 16384 22.6 / 15.9)
MAX_ROW = 4096


def applies(rows: int, *weights: torch.Tensor, path: str = "auto") -> str | None:
    """Why a lean step of ``rows`` tokens cannot take the kernel for these weights (None when it can): it
    needs Numba, float32 on the CPU, at most :data:`MAX_ROWS` rows, no autograd recording and, on ``path``
    ``"auto"``, weights of at least :data:`MIN_BYTES` each with rows of at most :data:`MAX_ROW` weights; on
    ``"pytorch"`` it never applies."""
    if path == "pytorch":
        return "decode_path='pytorch'"
    if not available():
        return unavailable_reason()
    for w in weights:
        if w.dtype != torch.float32 or not w.is_cpu:
            return f"the kernel is compiled for float32 on the CPU, got a weight of {w.dtype} on {w.device}"
    if rows > MAX_ROWS:
        return f"{rows} rows a call is above MAX_ROWS={MAX_ROWS} (a matrix product, BLAS's work)"
    if torch.is_grad_enabled() and any(w.requires_grad for w in weights):
        return "autograd is recording and the kernel has no backward (use torch.no_grad or inference mode)"
    if path == "auto":
        small = min(w.numel() * w.element_size() for w in weights)
        if small < MIN_BYTES:
            return f"a weight of {small} bytes is below MIN_BYTES={MIN_BYTES}: it stays in the caches, where BLAS wins"
        longest = max(w.shape[-1] for w in weights)
        if longest > MAX_ROW:
            return f"rows of {longest} weights are above MAX_ROW={MAX_ROW}: BLAS streams long rows faster"
    return None


def _array(t: torch.Tensor) -> np.ndarray:
    """A C-contiguous NumPy view of ``t`` (a copy only when ``t`` is not contiguous)."""
    a = t.detach().numpy()
    return a if a.flags.c_contiguous else np.ascontiguousarray(a)


def bind(weight: torch.Tensor, bias: torch.Tensor | None, relu: bool = False):
    """``f(x)``: ``F.linear(x, weight, bias)`` (then the ReLU, with ``relu``) of a ``(B, d)`` float32 input by
    the kernel, with the weight's NumPy view and the thread count worked out once: what a lean step holds. The
    view reads the weight as it is at each call (a non-contiguous weight is copied here, once); the caller has
    checked :func:`applies`. Raises :class:`~.sparse_ff_kernel.KernelUnavailable` here, not in a later step,
    when the kernel fails to compile on this machine."""
    w = _array(weight)                                                  # (R, d)
    b = _array(bias) if bias is not None else np.zeros(w.shape[0], dtype=np.float32)
    n = sparse_ff_kernel.kernel_threads(w.nbytes)
    call, kernels = sparse_ff_kernel._call, globals()

    def numpy_f(x: np.ndarray) -> np.ndarray:
        out = np.empty((x.shape[0], w.shape[0]), dtype=np.float32)     # (B, R)
        call(n, "_matvec", (w, b, x if x.flags.c_contiguous else np.ascontiguousarray(x), relu, out), kernels)
        return out

    def f(x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(numpy_f(x.detach().numpy()))
    f.numpy = numpy_f                   # the same on NumPy arrays (the lean step's NumPy stream)
    f(torch.zeros(1, w.shape[1]))       # compiled (or loaded from Numba's cache) now, not in the first step
    return f


def bind_heads(k_buf: torch.Tensor, v_buf: torch.Tensor):
    """``f(qkv, P)``: :func:`_cached_heads` on the cache's key and value buffers ``(B, H, capacity, hd)``, for
    ``qkv`` ``(B, 3C)`` float32 NumPy; returns the heads' outputs ``(B, C)``. The buffers are held as NumPy views,
    so the kernel writes into the cache itself (the caller keeps the cache's length). Compiled here (or loaded
    from Numba's cache), not in a later step; raises :class:`~.sparse_ff_kernel.KernelUnavailable` when the kernel
    cannot run here, and a ValueError unless both buffers are C-contiguous float32 of one shape."""
    if not available():
        raise sparse_ff_kernel.KernelUnavailable(unavailable_reason())
    if (k_buf.shape != v_buf.shape or k_buf.dim() != 4 or any(t.dtype != torch.float32 or not t.is_cpu
                                                              or not t.is_contiguous() for t in (k_buf, v_buf))):
        raise ValueError(f"k_buf and v_buf must be C-contiguous float32 CPU tensors of one (B, H, capacity, hd) "
                         f"shape, got {tuple(k_buf.shape)} {k_buf.dtype} and {tuple(v_buf.shape)} {v_buf.dtype}")
    k, v = k_buf.detach().numpy(), v_buf.detach().numpy()             # views: the kernel writes the cache
    B, H, capacity, hd = k.shape
    scores = np.empty((H, capacity), dtype=np.float32)
    call, kernels, threads = sparse_ff_kernel._call, globals(), sparse_ff_kernel.kernel_threads
    position_bytes = 2 * B * H * hd * 4                                # one position's keys and values

    def f(qkv: np.ndarray, P: int) -> np.ndarray:
        out = np.empty((B, H * hd), dtype=np.float32)                  # (B, C)
        call(threads((P + 1) * position_bytes, min_bytes=HEADS_PARALLEL_MIN_BYTES), "_cached_heads",
             (qkv if qkv.flags.c_contiguous else np.ascontiguousarray(qkv), k, v, P, scores, out), kernels)
        return out
    # compiled now, on buffers of the same types (not the cache's, which it would write)
    for n in {1, threads(HEADS_PARALLEL_MIN_BYTES, min_bytes=HEADS_PARALLEL_MIN_BYTES)}:
        call(n, "_cached_heads", (np.zeros((1, 3 * hd), np.float32), np.zeros((1, 1, 1, hd), np.float32),
                                  np.zeros((1, 1, 1, hd), np.float32), 0, np.empty((1, 1), np.float32),
                                  np.empty((1, hd), np.float32)), kernels)
    return f


def products(rows: int, path: str, *specs: tuple) -> tuple[tuple, str]:
    """A lean step's products for ``rows`` tokens a call, on ``path`` (a layer's ``decode_path``): each spec
    ``(weight, bias, relu)`` becomes ``f(x)`` = ``F.linear(x, weight, bias)`` (then the ReLU, with ``relu``).
    All by the kernel where :func:`applies` finds nothing against it and it compiles here, else all by
    ``F.linear``; on ``"fused"`` a ValueError saying why instead. Returns the functions and the path taken
    (``"fused"`` or ``"pytorch"``, for the layer's ``last_decode_path``)."""
    why_not = applies(rows, *(w for w, _, _ in specs), path=path)
    if why_not is None:
        try:
            return tuple(bind(w, b, relu) for w, b, relu in specs), "fused"
        except sparse_ff_kernel.KernelUnavailable as e:                  # no compiler here
            why_not = str(e)
    if path == "fused":
        raise ValueError(f"decode_path='fused' does not apply to this step: {why_not}")
    return tuple(_pytorch_product(w, b, relu) for w, b, relu in specs), "pytorch"


def _pytorch_product(weight: torch.Tensor, bias: torch.Tensor | None, relu: bool):
    """``F.linear`` (then the ReLU, with ``relu``), the reference and the fallback of :func:`bind`."""
    if relu:
        return lambda x: F.relu(F.linear(x, weight, bias))
    return lambda x: F.linear(x, weight, bias)
