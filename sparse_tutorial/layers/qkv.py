"""Sparse QKV attention: the paper's multiplicative layer and its "multiplicative + convolution" attention.

Notation (the paper's): ``d = d_model``, ``S`` modules of width ``M = d / S``. Shapes in comments: ``B`` batch,
``T`` new tokens in this call, ``P`` cached tokens.

* :class:`MultiplicativeDense` (the reference's ``FactoredDense``): ``u[s, m] = sum_i x_i D[s, i] E[i, m] + b``.
  ``D`` is ``S x d_in``, ``E`` is ``d_in x M``: ``S*d_in + d_in*M (+ d_out)`` parameters instead of
  ``d_in*d_out``; at ``S = M = sqrt(d)`` that is ``O(d^1.5)`` instead of ``O(d^2)``, and it can still express
  any permutation of its input (every output unit may pick any input unit through ``D`` and ``E``).
* :class:`ModuleConv`: a 2-D convolution over (length, modules) with ``M`` channels, causal in length and
  zero-padded over modules.
* :class:`ConvQKVAttention` (the reference's ``MultiplicativeConvCausalAttention``, the paper's sparse QKV):
  one shared multiplicative layer, then three convolutions (kernel 3 x 3 for Q and K, 3 x 1 for V); heads are
  the ``S`` modules (head size ``M``); **no output projection**. A decoding step reads the last ``length_kernel - 1``
  cached multiplicative outputs, so one new token costs a 3-position convolution, whatever the cache length.
* :class:`MultiplicativeAttention` (the reference's ``MultiplicativeCausalAttention``, the simple variant):
  ordinary multi-head attention (``n_heads`` heads) whose four dense layers Q, K, V and the output
  projection are each replaced by a multiplicative layer.

:func:`resolve_qkv_modules` picks ``S``; :mod:`.registry` builds these layers for a model config.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import positive_int, probability
from .attention import LayerCache, cached_attention, check_attention_input
from .base import PathSetting

__all__ = [
    "modules_near_sqrt",
    "MultiplicativeDense",
    "ModuleConv",
    "ConvQKVAttention",
    "MultiplicativeAttention",
    "resolve_qkv_modules",
    "dense_qkv_params",
    "multiplicative_dense_params",
    "multiplicative_qkv_params",
    "conv_qkv_params",
]


def resolve_qkv_modules(d_model: int, qkv_modules: int | None) -> int:
    """The number of modules ``S`` of the sparse QKV layers: ``qkv_modules``, or ``round(sqrt(d_model))``.

    ``S`` must divide ``d_model`` (each module has ``M = d_model / S`` units); otherwise a ValueError says so.
    """
    S = round(math.sqrt(d_model)) if qkv_modules is None else qkv_modules
    if isinstance(S, bool) or not isinstance(S, int) or S < 1:
        raise ValueError(f"qkv_modules must be a positive integer or None, got qkv_modules={qkv_modules!r}")
    if d_model % S:
        hint = " (None means round(sqrt(d_model)); pass qkv_modules explicitly)" if qkv_modules is None else ""
        raise ValueError(f"d_model must be divisible by qkv_modules, got d_model={d_model}, "
                         f"qkv_modules={S}{hint}")
    return S


# --------------------------------------------------------------------------------------------------
# Parameter-count formulas (checked against the real modules in tests/test_qkv.py)
# --------------------------------------------------------------------------------------------------


def dense_qkv_params(d_model: int) -> int:
    """Dense Q, K, V and output projections with biases: ``4 (d^2 + d)``."""
    return 4 * (d_model * d_model + d_model)


def multiplicative_dense_params(d_in: int, d_out: int, n_modules: int, bias: bool = True) -> int:
    """``S*d_in + d_in*M (+ d_out)`` with ``M = d_out / S``."""
    return n_modules * d_in + d_in * (d_out // n_modules) + (d_out if bias else 0)


def multiplicative_qkv_params(d_model: int, n_modules: int) -> int:
    """Four multiplicative layers (Q, K, V, output), each ``S*d + d*M + d``."""
    return 4 * multiplicative_dense_params(d_model, d_model, n_modules)


def conv_qkv_params(d_model: int, n_modules: int, length_kernel: int = 3, module_kernel: int = 3) -> int:
    """Shared multiplicative layer + convolutions for Q, K (``lk x mk``) and V (``lk x 1``), with biases."""
    M = d_model // n_modules
    conv = lambda mk: length_kernel * mk * M * M + M  # noqa: E731  (weights + bias of one convolution)
    return multiplicative_dense_params(d_model, d_model, n_modules) + 2 * conv(module_kernel) + conv(1)


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


def modules_near_sqrt(d_model: int) -> int:
    """The divisor of ``d_model`` closest to ``sqrt(d_model)`` (the smaller one on a tie): a valid ``S``."""
    positive_int("d_model", d_model)
    divisors = [s for s in range(1, d_model + 1) if d_model % s == 0]
    return min(divisors, key=lambda s: (abs(s - math.sqrt(d_model)), s))


class MultiplicativeDense(nn.Module):
    """A dense-like layer with ``S*d_in + d_in*M (+ d_out)`` weights: ``u[s, m] = sum_i x_i D[s,i] E[i,m] + b``.

    Each of the ``S`` modules gates the input with its own vector ``D[s]`` and projects it with the shared
    matrix ``E`` to ``M = d_out / S`` outputs. The output ``(..., d_out)`` is the ``(S, M)`` grid flattened
    (module-major); :meth:`forward_modules` returns it unflattened.

    Initialisation as the reference: ``D ~ Normal(0, 0.5^2)``, ``E`` Glorot-uniform, ``b = 0``.
    """

    def __init__(self, d_in: int, d_out: int, n_modules: int, bias: bool = True):
        super().__init__()
        self.d_in = positive_int("d_in", d_in)
        self.d_out = positive_int("d_out", d_out)
        self.n_modules = positive_int("n_modules", n_modules)
        if d_out % n_modules:
            raise ValueError(f"d_out must be divisible by n_modules, got d_out={d_out}, n_modules={n_modules}")
        self.d_module = d_out // n_modules
        self.D = nn.Parameter(torch.randn(n_modules, d_in) * 0.5)      # (S, d_in): per-module gates
        self.E = nn.Parameter(torch.empty(d_in, self.d_module))         # (d_in, M): shared projection
        nn.init.xavier_uniform_(self.E)
        self.bias = nn.Parameter(torch.zeros(d_out)) if bias else None  # (d_out,)

    def dense_weight(self) -> torch.Tensor:
        """The equivalent dense matrix ``W[i, s*M + m] = D[s, i] E[i, m]``, shape ``(d_in, d_out)``."""
        return (self.D.t().unsqueeze(-1) * self.E.unsqueeze(1)).reshape(self.d_in, self.d_out)

    def forward_modules(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_in) -> (..., S, M)``."""
        if x.dim() < 1 or x.shape[-1] != self.d_in:
            raise ValueError(f"x must have last dimension d_in={self.d_in}, got a tensor of shape {tuple(x.shape)}")
        rows = x.numel() // self.d_in
        # Both orders cost rows*d_in*d_out multiply-adds; the gated one also touches rows*S*d_in numbers, the
        # dense one d_in*d_out. Few rows (decoding): gate then project, never building the d_in x d_out matrix.
        if rows <= self.d_module:
            u = (x.unsqueeze(-2) * self.D) @ self.E                      # (..., S, d_in) @ (d_in, M) -> (..., S, M)
        else:
            u = (x @ self.dense_weight()).unflatten(-1, (self.n_modules, self.d_module))
        if self.bias is not None:
            u = u + self.bias.view(self.n_modules, self.d_module)
        return u

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_modules(x).flatten(-2)                      # (..., d_out)

    def extra_repr(self) -> str:
        return (f"d_in={self.d_in}, d_out={self.d_out}, n_modules={self.n_modules}, d_module={self.d_module}, "
                f"bias={self.bias is not None}")


class ModuleConv(nn.Module):
    """2-D convolution over (length, modules) with ``M`` channels: causal in length, zero-padded over modules.

    Input and output are channels-first ``(B, M, L, S)``; the input must already carry the
    ``length_kernel - 1`` positions of left context (zeros at the start of a sequence, the cached multiplicative
    outputs when decoding), so ``L = T + length_kernel - 1`` in and ``T`` out.
    """

    def __init__(self, d_module: int, length_kernel: int = 3, module_kernel: int = 3):
        super().__init__()
        positive_int("d_module", d_module)
        positive_int("length_kernel", length_kernel)
        positive_int("module_kernel", module_kernel)
        if module_kernel % 2 != 1:
            raise ValueError(f"module_kernel must be odd (same padding over modules), got module_kernel={module_kernel}")
        self.length_kernel, self.module_kernel = length_kernel, module_kernel
        self.conv = nn.Conv2d(d_module, d_module, (length_kernel, module_kernel), padding=(0, module_kernel // 2))
        nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.conv(u)  # (B, M, T + lk - 1, S) -> (B, M, T, S)


class ConvQKVAttention(nn.Module):
    """The paper's sparse QKV: shared multiplicative layer -> 3 convolutions -> attention with ``S`` heads.

    ``forward(x (B, T, C), cache) -> (B, T, C)``. No output projection (the reference's default). With a cache,
    ``cache.state["conv_context"]`` is the last ``length_kernel - 1`` multiplicative outputs ``(B, M, lk-1, S)``, the
    window a new token's convolution reads; ``cache.state["conv_inputs"]`` keeps them for every cached position, so
    :meth:`LayerCache.truncate` rolls the convolution back together with the keys and values.

    A cached call of one new token per sequence takes, where :meth:`fused_unavailable` finds nothing against it,
    the fused step of :mod:`.qkv_kernel`: the same arithmetic in one compiled call (``decode_path``). The lean
    decoder's step (:meth:`step_function`) of a layer wider than :attr:`FUSED_MAX_D_MODEL` keeps the products in
    BLAS and runs the attention over the cache in Numba (:meth:`_wide_step`).
    """

    #: the fused decoding step (:mod:`.qkv_kernel`) applies to layers up to this ``d_model``. Its loops beat the
    #: PyTorch step's dozen calls where the arithmetic is small and lose where it is large, where PyTorch's
    #: products run in BLAS: ``python -m sparse_tutorial.bench qkv`` (one thread, cold cache, 128 cached positions,
    #: a quiet 2-core Intel Xeon) gave 1.24x at d 384, 1.06x at d 1024 and 0.86x at d 2048.
    FUSED_MAX_D_MODEL = 1024
    #: from this ``d_model`` up, a decoding step's convolution (one position) runs as matrix products
    #: (:meth:`merged_qkv`), below it as oneDNN's convolution. One thread, cold cache, a quiet 2-core Intel Xeon,
    #: the merged convolution against the products, µs: d 4096 (S 32) 392 vs 451, d 6144 (S 48) 468 vs 555,
    #: d 8192 (S 64) 1208 vs 605, d 9216 (S 64, the 17B block) 1331 vs 669, d 12288 (S 96) 1316 vs 826.
    CONV_MATMUL_MIN_D_MODEL = 8192

    def __init__(self, d_model: int, n_modules: int, length_kernel: int = 3, dropout: float = 0.0,
                 decode_path: str = "auto"):
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.n_modules = positive_int("n_modules", n_modules)
        if d_model % n_modules:
            raise ValueError(f"d_model must be divisible by n_modules, got d_model={d_model}, n_modules={n_modules}")
        self.d_module = M = d_model // n_modules
        self.length_kernel = positive_int("length_kernel", length_kernel)
        self.mult = MultiplicativeDense(d_model, d_model, n_modules)       # shared by Q, K and V
        self.conv_q = ModuleConv(M, length_kernel, module_kernel=3)
        self.conv_k = ModuleConv(M, length_kernel, module_kernel=3)
        self.conv_v = ModuleConv(M, length_kernel, module_kernel=1)
        self.dropout = probability("dropout", dropout)
        self.resid_dropout = nn.Dropout(self.dropout)
        self.decode_path = decode_path
        #: which step the last cached call took: "fused", "pytorch" or (the lean step of a wide layer) "wide";
        #: None before the first
        self.last_decode_path: str | None = None

    decode_path = PathSetting(
        """How a cached call computes: ``"auto"`` (the fused step of :mod:`.qkv_kernel` where
        :meth:`fused_unavailable` finds nothing against it, else PyTorch), ``"pytorch"`` or ``"fused"`` (a
        ValueError saying why when it does not apply); see :data:`~.base.DECODE_PATHS`.""")

    def _conv_input(self, x: torch.Tensor, cache: LayerCache | None) -> torch.Tensor:
        """Multiplicative outputs of the new tokens with their left context: ``(B, M, lk - 1 + T, S)``."""
        B = x.shape[0]
        u = self.mult.forward_modules(x).permute(0, 3, 1, 2)               # (B, T, S, M) -> (B, M, T, S)
        ctx = self.length_kernel - 1
        if ctx == 0:
            return u
        if cache is None:
            return torch.cat([u.new_zeros(B, self.d_module, ctx, self.n_modules), u], dim=2)  # causal zeros
        # Every cached position's output is kept (B*d numbers a position, half of what its keys and values take),
        # so LayerCache.truncate rolls the convolution back with the keys; a call reads only the last ctx of them.
        P = cache.length
        seen = cache.extend_state("conv_inputs", u)                        # (B, M, P + T, S): position at dim -2
        full = seen[:, :, max(0, P - ctx):]
        if P < ctx:                                                        # start of the sequence: causal zeros
            full = torch.cat([u.new_zeros(B, self.d_module, ctx - P, self.n_modules), full], dim=2)
        cache.state["conv_context"] = seen[:, :, -ctx:]                    # the last lk - 1 outputs (a view)
        return full

    def heads(self, x: torch.Tensor, cache: LayerCache | None = None) -> tuple[torch.Tensor, ...]:
        """Q, K, V for the new tokens, each ``(B, S, T, M)`` (heads = modules); updates the conv state."""
        check_attention_input(x, self.d_model)
        full = self._conv_input(x, cache)
        if not torch.is_grad_enabled():                                    # inference: one convolution, not three
            return self.merged_qkv(full)
        # (B, M, T, S) -> (B, S, T, M); contiguous, or attention's matmuls run on strided memory (many times slower)
        return tuple(conv(full).permute(0, 3, 2, 1).contiguous() for conv in (self.conv_q, self.conv_k, self.conv_v))

    def merged_qkv(self, full: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Q, K, V ``(B, S, T, M)`` from the multiplicative outputs with their left context ``full``
        ``(B, M, lk - 1 + T, S)``, by the merged convolution (:meth:`_merged_conv`); no autograd needed.

        One new position (``T = 1``, a decoding step) in a layer of at least :attr:`CONV_MATMUL_MIN_D_MODEL`
        takes :meth:`_step_products` instead: the same sums as matrix products.
        """
        B, M, L, S = full.shape
        T = L - (self.length_kernel - 1)
        if T == 1 and self.d_model >= self.CONV_MATMUL_MIN_D_MODEL:
            return self._step_products(full)
        w, b = self._merged_conv()                                         # (3M, M, lk, mk), (3M,)
        y = F.conv2d(full, w, b, padding=(0, w.shape[-1] // 2))            # (B, 3M, T, S)
        # (B, 3, M, T, S) -> (3, B, S, T, M): one copy makes Q, K and V contiguous
        return y.view(B, 3, M, T, S).permute(1, 0, 4, 3, 2).contiguous().unbind(0)

    def _step_products(self, full: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """:meth:`merged_qkv` of one position as three matrix products: ``(B, M, lk, S)`` -> Q, K, V ``(B, S, 1, M)``.

        Each module's output is its window of the input (``M`` channels x ``lk`` positions x ``mk`` modules,
        zero-padded at the edges) times the ``(M lk mk, M)`` matrix of a convolution's filters. Q and K read the
        window of ``mk`` modules; V, whose kernel spans one module, reads only its own module's ``M x lk``
        numbers, so none of the merged kernel's zeros are multiplied. At the widest layers BLAS runs these
        products faster than oneDNN runs the convolution (:attr:`CONV_MATMUL_MIN_D_MODEL`).
        """
        (wq, bq), (wk, bk), (wv, bv) = self._step_matrices()
        B, M, lk, S = full.shape
        half = self.conv_q.conv.weight.shape[-1] // 2
        padded = F.pad(full, (half, half))                                 # (B, M, lk, S + 2 half)
        # (B, M, lk, S, mk) -> (B, S, M, lk, mk) -> (B S, M lk mk): each module's window, one copy
        windows = padded.unfold(3, 2 * half + 1, 1).permute(0, 3, 1, 2, 4).reshape(B * S, -1)
        own = full.permute(0, 3, 1, 2).reshape(B * S, M * lk)              # (B S, M lk): V's window
        return tuple(torch.addmm(b, cols, w).view(B, S, 1, M)
                     for cols, w, b in ((windows, wq, bq), (windows, wk, bk), (own, wv, bv)))

    def _step_matrices(self) -> tuple[tuple[torch.Tensor, torch.Tensor], ...]:
        """Each convolution's filters as a ``(M lk mk, M)`` matrix with its bias, for :meth:`_step_products`:
        made again when :meth:`_merged_conv` is (a weight changed)."""
        w, _ = self._merged_conv()
        cached = self.__dict__.get("_step_mats")
        if cached is None or cached[0] is not w:
            mats = tuple((c.conv.weight.detach().reshape(self.d_module, -1).t().contiguous(), c.conv.bias.detach())
                         for c in (self.conv_q, self.conv_k, self.conv_v))
            cached = (w, mats)
            if not torch.compiler.is_compiling():
                self.__dict__["_step_mats"] = cached
        return cached[1]

    def _merged_conv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The Q, K and V convolutions as one: weight ``(3M, M, lk, mk)`` (V's ``lk x 1`` kernel zero-padded to
        ``mk`` modules), bias ``(3M,)``. Rebuilt only when a weight changes (training, loading)."""
        convs = [c.conv for c in (self.conv_q, self.conv_k, self.conv_v)]
        weights = [t for c in convs for t in (c.weight, c.bias)]
        # Tensors made under torch.inference_mode() have no version counter, and a traced graph (torch.export,
        # the ONNX export) has no data pointers: then nothing is cached (rebuilt).
        untracked = torch.compiler.is_compiling() or any(t.is_inference() for t in weights)
        key = None if untracked else tuple((t.data_ptr(), t._version) for t in weights)
        cached = getattr(self, "_merged", None)
        if key is None or cached is None or cached[0] != key:
            mk = max(c.weight.shape[-1] for c in convs)
            w = torch.cat([F.pad(c.weight, ((mk - c.weight.shape[-1]) // 2,) * 2) for c in convs]).detach()
            b = torch.cat([c.bias for c in convs]).detach()
            cached = (key, w, b)
            if not torch.compiler.is_compiling():                          # a traced graph keeps no attribute
                self._merged = cached
        return cached[1], cached[2]

    def fused_unavailable(self, x: torch.Tensor, any_width: bool = False) -> str | None:
        """Why a cached call on ``x`` cannot take the fused step (None when it can): it needs Numba, one new
        token per sequence, float32 on the CPU, no autograd, no dropout, ``length_kernel`` at least 2 (the
        kernel reads the convolution's state) and ``d_model`` up to :attr:`FUSED_MAX_D_MODEL` (not checked with
        ``any_width``: the wide lean step's conditions, :meth:`_wide_step`)."""
        if not _kernel_module().available():
            return _kernel_module().unavailable_reason()
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return "a traced graph (torch.export, the ONNX export, torch.jit.trace) runs the PyTorch step"
        if x.shape[1] != 1:
            return f"{x.shape[1]} new tokens in one call; the kernel decodes one at a time"
        if self.d_model > self.FUSED_MAX_D_MODEL and not any_width:
            return f"d_model={self.d_model} is above FUSED_MAX_D_MODEL={self.FUSED_MAX_D_MODEL}"
        if self.length_kernel < 2:
            return "length_kernel=1 keeps no convolution state"
        if x.dtype != torch.float32 or not x.is_cpu or self.mult.E.dtype != torch.float32:
            return f"the kernel is compiled for float32 on the CPU, x is {x.dtype} on {x.device}"
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return "autograd is recording and the kernel has no backward (use torch.no_grad or inference mode)"
        if self.training and self.dropout > 0:
            return "training with dropout"
        return None

    def _fused_weights(self) -> tuple:
        """The kernel's arrays, as :func:`.qkv_kernel.prepare` makes them from the multiplicative layer and the
        merged convolution. Kept between calls (outside the module's attributes, so not
        pickled) and made again when a weight is replaced or changed in place (its address or version changes);
        weights made under ``torch.inference_mode`` keep no version, so theirs are made at every call. The
        weights are read from the modules' own dictionaries: ``nn.Module`` attribute look-ups cost about a
        microsecond each, and this runs once per layer and token."""
        mods = self._modules
        tensors = [mods["mult"]._parameters[n] for n in ("D", "E", "bias")]
        for name in ("conv_q", "conv_k", "conv_v"):
            conv = mods[name]._modules["conv"]._parameters
            tensors += (conv["weight"], conv["bias"])
        key = None if any(t.is_inference() for t in tensors) else tuple((t.data_ptr(), t._version) for t in tensors)
        cached = self.__dict__.get("_fused_arrays")
        if key is None or cached is None or cached[0] != key:
            w, b = self._merged_conv()
            D, E, bias = tensors[:3]
            arrays = _kernel_module().prepare(*(t.detach().numpy() for t in (
                D, E, bias.view(self.n_modules, self.d_module), w, b)))
            cached = (key, arrays)
            self.__dict__["_fused_arrays"] = cached
        return cached[1]

    def _fused_step(self, x: torch.Tensor, cache: LayerCache) -> torch.Tensor:
        """One new token per sequence in one call of :func:`.qkv_kernel.run`: ``(B, 1, C) -> (B, 1, C)``."""
        B, S, M = x.shape[0], self.n_modules, self.d_module
        weights = self._fused_weights()
        P = cache.length
        if not cache.claim(1, x, ("conv_inputs",)):
            # No room for the new position: made by the cache's own methods, as in the PyTorch step (the kernel
            # then writes the values there)
            cache.extend_state("conv_inputs", x.new_empty(B, M, 1, S))    # (B, M, P + 1, S)
            cache.append(x.new_empty(B, S, 1, M), x.new_empty(B, S, 1, M))
        conv_in = cache.state["conv_inputs"]                               # (B, M, capacity, S)
        cache.state["conv_context"] = conv_in[:, :, max(0, P + 2 - self.length_kernel):P + 1]
        k_buf, v_buf = cache.buffers()                                     # (B, S, capacity, M)
        xs = x.detach().reshape(B, self.d_model).numpy()
        if not xs.flags.c_contiguous:
            xs = xs.copy()
        y = _kernel_module().run(xs, weights, conv_in.numpy(), k_buf.numpy(), v_buf.numpy(), P)
        self.__dict__["last_decode_path"] = "fused"                       # nn.Module.__setattr__ costs microseconds
        return torch.from_numpy(y).view(B, 1, self.d_model)               # (B, S, M) -> (B, 1, C)

    def step_function(self, cache: LayerCache):
        """The fused decoding step with every look-up done once: ``step(h, P)`` takes the normalised input of one
        new token per sequence, ``h`` ``(B, C)`` float32, at position ``P``, writes its convolution input, key and
        value into ``cache``'s buffers and returns the attention's output ``(B, C)``. Used by
        :class:`~sparse_tutorial.lean_decode.LeanDecoder`, which reserves the cache's room first (the buffers are
        held, not looked up). None where the fused step does not apply (then the caller runs the module).
        ``step.numpy`` is the same on NumPy arrays (the lean step's NumPy stream)."""
        why_not = self.fused_unavailable(torch.empty(1, 1, self.d_model), any_width=True)
        if why_not is not None or self.decode_path == "pytorch" or torch.is_grad_enabled():
            return None
        if self.d_model > self.FUSED_MAX_D_MODEL:
            return self._wide_step(cache)
        weights, run, lk, C = self._fused_weights(), _kernel_module().run, self.length_kernel, self.d_model
        conv_in = cache.state["conv_inputs"]                                   # (B, M, capacity, S)
        k_buf, v_buf = cache.buffers()                                         # (B, S, capacity, M)
        arrays = conv_in.numpy(), k_buf.numpy(), v_buf.numpy()
        self.__dict__["last_decode_path"] = "fused"

        def numpy_step(h: np.ndarray, P: int) -> np.ndarray:
            y = run(h, weights, *arrays, P)                                    # (B, S, M)
            cache._length = P + 1
            cache.state["conv_context"] = conv_in[:, :, max(0, P + 2 - lk):P + 1]
            return y.reshape(h.shape[0], C)                                    # (B, C)

        def step(h: torch.Tensor, P: int) -> torch.Tensor:
            return torch.from_numpy(numpy_step(h.numpy(), P))
        step.numpy = numpy_step                                                # for a NumPy stream
        return step

    def _wide_step(self, cache: LayerCache):
        """:meth:`step_function`'s step for a layer wider than :attr:`FUSED_MAX_D_MODEL`, where BLAS runs the
        products faster than the fused kernel's loops (the 17B block: the multiplicative layer alone is
        ``S d M`` = 85 M multiply-adds a token). The products are the PyTorch step's (:meth:`_step_products`),
        each written into a buffer kept between steps; the new input into the convolution's state and every
        module's windows are one compiled pass (:func:`.qkv_kernel._wide_windows`), with the filter rows in the
        windows' order; the rest is one call of the dense attention's kernel
        (:func:`~.matvec_kernel.bind_heads`): the new key and value written into the cache and each head's
        softmax attention over it, in place of two copies and ``F.scaled_dot_product_attention``, whose fixed
        cost at one query is most of its time. None where that kernel cannot run here."""
        from . import matvec_kernel                                        # imports Numba: on first use
        conv_in = cache.state["conv_inputs"]                               # (B, M, capacity, S)
        try:
            heads = matvec_kernel.bind_heads(*cache.buffers())             # (B, 3C) -> (B, C); writes k, v
        except matvec_kernel.sparse_ff_kernel.KernelUnavailable:
            return None
        B, M, _, S = conv_in.shape
        C, lk, mult = self.d_model, self.length_kernel, self.mult
        half = self.conv_q.conv.weight.shape[-1] // 2                      # Q's and K's kernel: mk = 2 half + 1
        D, E = mult.D.detach(), mult.E.detach()                            # (S, C), (C, M)
        bias = (torch.zeros(S, M) if mult.bias is None else mult.bias.detach().view(S, M)).repeat(B, 1)
        mk = 2 * half + 1
        (wq, bq), (wk, bk), (wv, bv) = self._step_matrices()               # (M lk mk, M) and (M lk, M), (M,)
        # Each module's window over the last lk inputs, (channel, position), V's input; and for Q and K the
        # windows of the mk modules around it one after the other, zero-padded by `half` modules each side:
        # gathered from the state in one compiled pass (qkv_kernel._wide_windows), where PyTorch's strided
        # copies cost one call each.
        own = torch.empty(B * S, M * lk)                                   # (B S, M lk)
        windows = torch.empty(B * S, mk * M * lk)                          # (B S, mk M lk)
        # the filters' rows in the windows' (module, channel, position) order: (M lk mk, M) -> (mk M lk, M)
        wq, wk = (w.view(M, lk, mk, M).permute(2, 0, 1, 3).reshape(mk * M * lk, M) for w in (wq, wk))
        gated = torch.empty(B, S, C)
        u = torch.empty(B * S, M)
        qkv = torch.empty(3, B * S, M)                                     # Q, K, V of every module
        gather = _kernel_module()._wide_windows
        arrays = u.numpy(), conv_in.numpy(), windows.numpy(), own.numpy()
        scratch = np.zeros((B, M, lk, S), dtype=np.float32)                # compiled now, on buffers of its own
        gather(arrays[0], scratch, lk - 1, lk, half, np.empty_like(arrays[2]), np.empty_like(arrays[3]))
        self.__dict__["last_decode_path"] = "wide"

        def numpy_step(h: np.ndarray, P: int) -> np.ndarray:
            x = torch.from_numpy(h)                                        # (B, C)
            torch.mul(x.view(B, 1, C), D, out=gated)                       # (B, S, C): x * D[s]
            torch.addmm(bias, gated.view(B * S, C), E, out=u)              # (B S, M): the multiplicative layer
            gather(arrays[0], arrays[1], P, lk, half, arrays[2], arrays[3])  # u into the state; the windows
            for i, (cols, w, b) in enumerate(((windows, wq, bq), (windows, wk, bk), (own, wv, bv))):
                torch.addmm(b, cols, w, out=qkv[i])
            rows = qkv.view(3, B, C).transpose(0, 1)                       # (B, 3, C): as the kernel reads them
            y = heads((rows if B == 1 else rows.contiguous()).reshape(B, 3 * C).numpy(), P)   # (B, C)
            cache._length = P + 1
            cache.state["conv_context"] = conv_in[:, :, max(0, P + 2 - lk):P + 1]
            return y

        def step(h: torch.Tensor, P: int) -> torch.Tensor:
            return torch.from_numpy(numpy_step(h.numpy(), P))
        step.numpy = numpy_step                                            # for a NumPy stream
        return step

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = check_attention_input(x, self.d_model)
        if cache is not None and self.decode_path != "pytorch":
            why_not = self.fused_unavailable(x)
            if why_not is None:
                P = cache.length
                try:
                    return self._fused_step(x, cache)
                except _kernel_module().KernelUnavailable as e:           # it failed to compile on this machine
                    cache.truncate(P)                                      # forget the position it claimed
                    why_not = str(e)
            if self.decode_path == "fused":
                raise ValueError(f"decode_path='fused' does not apply to this call: {why_not}")
        if cache is not None:
            self.__dict__["last_decode_path"] = "pytorch"
        q, k, v = self.heads(x, cache)                                     # 3 x (B, S, T, M)
        y = cached_attention(q, k, v, cache, self.dropout if self.training else 0.0)  # (B, S, T, M)
        return self.resid_dropout(y.transpose(1, 2).reshape(B, T, C))      # no output projection

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_modules={self.n_modules}, d_module={self.d_module}, "
                f"length_kernel={self.length_kernel}"
                + (f", decode_path={self.decode_path!r}" if self.decode_path != "auto" else ""))


def _kernel_module():
    """The fused step's module, imported on first use (it imports Numba, about half a second)."""
    from . import qkv_kernel
    return qkv_kernel


class MultiplicativeAttention(nn.Module):
    """Multi-head attention whose Q, K, V and output projections are four :class:`MultiplicativeDense` layers.

    The reference's ``MultiplicativeCausalAttention``: ``n_heads`` heads as in dense attention, ``S`` modules
    per layer (usually ``S = n_heads``), ``4 (S*d + d*M + d)`` parameters.
    """

    def __init__(self, d_model: int, n_heads: int, n_modules: int, dropout: float = 0.0):
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.n_heads = positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}")
        self.q, self.k, self.v, self.proj = (MultiplicativeDense(d_model, d_model, n_modules) for _ in range(4))
        self.dropout = probability("dropout", dropout)
        self.resid_dropout = nn.Dropout(self.dropout)

    def heads(self, x: torch.Tensor, cache: LayerCache | None = None) -> tuple[torch.Tensor, ...]:
        """Q, K, V, each ``(B, H, T, hd)``."""
        B, T, C = check_attention_input(x, self.d_model)
        return tuple(layer(x).view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2)
                     for layer in (self.q, self.k, self.v))

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = check_attention_input(x, self.d_model)
        q, k, v = self.heads(x)
        y = cached_attention(q, k, v, cache, self.dropout if self.training else 0.0)  # (B, H, T, hd)
        return self.resid_dropout(self.proj(y.transpose(1, 2).reshape(B, T, C)))
