"""What every attention kind shares: the key/value cache, the causal attention step, and dense attention.

Shapes in comments: ``B`` batch, ``T`` new tokens in this call, ``P`` tokens already in the cache,
``C = d_model``, ``H`` heads, ``hd = C / H``.

* :class:`LayerCache` keeps one layer's keys and values (and any extra state) between calls;
* :func:`cached_attention` is the causal attention of ``T`` new queries over the cached and new keys;
* :class:`CausalSelfAttention` is the standard multi-head attention of chapters 1 to 3; chapter 4's sparse
  QKV kinds (:mod:`.qkv`) reuse the first two.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import positive_int, probability
from . import matvec_kernel
from .base import PathSetting

__all__ = ["LayerCache", "cached_attention", "check_attention_input", "CausalSelfAttention"]


class LayerCache:
    """What one attention layer keeps between calls: keys, values and any extra state.

    ``k``, ``v``: ``(B, H, P, hd)`` or None before the first call. ``state`` holds layer-specific
    tensors (chapter 4's convolution keeps its last inputs there).

    The keys and values live in buffers with room for more positions: :meth:`append` writes the new ones in
    place and ``k``/``v`` are views of the filled part. A buffer that is full is replaced by one twice as long,
    so a decoding step copies only its own keys and values, not the whole history (``torch.cat`` would).
    """

    def __init__(self, k: torch.Tensor | None = None, v: torch.Tensor | None = None, state: dict | None = None):
        self._k = self._v = None          # (B, H, capacity, hd) buffers; positions [0, length) are filled
        self._length = 0
        self.k, self.v = k, v
        self.state = {} if state is None else state

    @property
    def k(self) -> torch.Tensor | None:
        return None if self._k is None else self._k[:, :, :self._length]

    @k.setter
    def k(self, value: torch.Tensor | None) -> None:
        self._k = value
        self._length = 0 if value is None else value.shape[-2]

    @property
    def v(self) -> torch.Tensor | None:
        return None if self._v is None else self._v[:, :, :self._length]

    @v.setter
    def v(self, value: torch.Tensor | None) -> None:
        self._v = value

    @property
    def length(self) -> int:
        return self._length

    def truncate(self, length: int) -> None:
        """Forget every position from ``length`` on (the buffers are kept and overwritten by later calls)."""
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= self._length:
            raise ValueError(f"length must be an integer in [0, {self._length}], got length={length!r}")
        self._length = length

    def check_batch(self, batch: int) -> None:
        """A ValueError when a call brings another batch size than the cached positions hold."""
        if self._length and self._k is not None and self._k.shape[0] != batch:
            raise ValueError(
                f"this cache holds {self._length} positions of a batch of {self._k.shape[0]} sequences, got a "
                f"batch of {batch}; use a new cache (model.new_cache() or LayerCache()) for another batch size"
            )

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the keys and values of ``T`` new positions ``(B, H, T, hd)``; return all of them ``(B, H, P+T, hd)``."""
        P, n = self._length, self._length + k.shape[-2]
        kb, vb = self._k, self._v
        if (P and kb is not None and n <= kb.shape[-2] and kb.shape[:-2] == k.shape[:-2] == vb.shape[:-2]
                and kb.shape[-1] == k.shape[-1] and kb.dtype == k.dtype and kb.device == k.device
                and not torch.is_grad_enabled()):
            # A decoding step: the buffers have room, so write the new positions in place (the checks of
            # _write_positions, which this skips, cost about as much as the copies at batch 1)
            kb[:, :, P:n].copy_(k)
            vb[:, :, P:n].copy_(v)
        else:
            self.check_batch(k.shape[0])
            self._k, self._v = _write_positions(kb, P, k), _write_positions(vb, P, v)
        self._length = n
        return self._k[:, :, :n], self._v[:, :, :n]

    def buffers(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The whole key and value buffers ``(B, H, capacity, hd)`` (positions ``[0, length)`` filled), for a
        kernel that writes the positions :meth:`claim` or :meth:`append` made room for."""
        return self._k, self._v

    def claim(self, T: int, like: torch.Tensor, state: tuple[str, ...] = ()) -> bool:
        """Add ``T`` positions without writing them, when the key and value buffers and the per-position
        ``state`` buffers named all have room for them and hold ``like``'s batch size and dtype: a kernel then
        writes the new positions in place. Returns False, changing nothing, when one does not (then
        :meth:`extend_state` and :meth:`append` make room)."""
        n, B = self._length + T, like.shape[0]
        for buf in (self._k, self._v, *(self.state.get(name) for name in state)):
            if buf is None or buf.shape[-2] < n or buf.shape[0] != B or buf.dtype != like.dtype:
                return False
        self._length = n
        return True

    def reserve(self, capacity: int, state: tuple[str, ...] = ()) -> None:
        """Give the key and value buffers, and the per-position ``state`` buffers named, room for ``capacity``
        positions (the filled ones copied), so that no later call up to ``capacity`` positions reallocates them:
        a decoder may then hold on to the buffers (:mod:`sparse_tutorial.lean_decode`). Needs a filled cache."""
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < max(1, self._length):
            raise ValueError(f"capacity must be an integer >= the {self._length} positions held (and >= 1), "
                             f"got capacity={capacity!r}")
        if self._k is None:
            raise ValueError("reserve needs a cache that holds positions: run the prompt through it first")
        P = self._length

        def grown(buf: torch.Tensor) -> torch.Tensor:
            if buf.shape[-2] >= capacity:
                return buf
            new = buf.new_empty(buf.shape[:-2] + (capacity, buf.shape[-1]))
            new[..., :P, :].copy_(buf[..., :P, :])
            return new

        self._k, self._v = grown(self._k), grown(self._v)
        for name in state:
            self.state[name] = grown(self.state[name])

    def extend_state(self, name: str, new: torch.Tensor) -> torch.Tensor:
        """Per-position state beside the keys: write ``new`` ``(..., T, X)`` at the positions this call adds.

        Returns the state of every position so far, ``(..., P + T, X)`` (``P`` = :attr:`length` before the call's
        :meth:`append`). Like the keys, it is rolled back by :meth:`truncate`: later calls overwrite the
        forgotten positions. Chapter 4's convolution keeps its inputs here.
        """
        self.check_batch(new.shape[0])
        P = self._length
        self.state[name] = _write_positions(self.state.get(name), P, new)
        return self.state[name][..., :P + new.shape[-2], :]


def _write_positions(buf: torch.Tensor | None, filled: int, new: torch.Tensor) -> torch.Tensor:
    """Write ``new`` ``(..., T, X)`` at positions ``[filled, filled + T)`` (dim -2) of ``buf``; return the buffer.

    A buffer that is missing, full or of another shape or dtype is replaced by one with room for as many new
    positions as old (its first ``filled`` positions copied). Under autograd nothing is written in place.
    """
    n = filled + new.shape[-2]
    if torch.is_grad_enabled() and new.requires_grad:
        # Autograd: no in-place writes into tensors an earlier call may have saved for backward.
        return new if filled == 0 else torch.cat([buf[..., :filled, :], new], dim=-2)
    if (buf is None or filled == 0 or n > buf.shape[-2] or buf.shape[:-2] != new.shape[:-2]
            or buf.shape[-1] != new.shape[-1] or buf.dtype != new.dtype or buf.device != new.device):
        grown = new.new_empty(new.shape[:-2] + (max(n, 2 * filled), new.shape[-1]))
        if filled:
            grown[..., :filled, :].copy_(buf[..., :filled, :])
        buf = grown
    buf[..., filled:n, :].copy_(new)
    return buf


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cache: LayerCache | None,
                     dropout_p: float = 0.0) -> torch.Tensor:
    """Causal attention of ``T`` new queries over the cached and the new keys.

    q, k, v: ``(B, H, T, hd)`` for the new positions; the cache (if any) is extended with k and v
    (:meth:`LayerCache.append`).
    Returns ``(B, H, T, hd)``.
    """
    past = 0
    if cache is not None:
        past = cache.length
        k, v = cache.append(k, v)                 # (B, H, P+T, hd), written in place into the cache's buffers
    T, S = q.shape[-2], k.shape[-2]
    if past == 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)
    if T == 1:  # one new token sees every cached position: no mask needed
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)
    allowed = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(diagonal=past)  # (T, P+T)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout_p)


def check_attention_input(x: torch.Tensor, d_model: int) -> tuple[int, int, int]:
    """``(B, T, C)`` of ``x``; a ValueError naming ``x`` unless it is a ``(batch, time, d_model)`` tensor."""
    if x.dim() != 3 or x.shape[-1] != d_model:
        raise ValueError(f"x must be a (batch, time, d_model={d_model}) tensor, got a tensor of shape {tuple(x.shape)}")
    return x.shape


class CausalSelfAttention(nn.Module):
    """Standard multi-head attention: dense Q, K, V projections and an output projection."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0):
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.n_heads = positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}")
        self.qkv = nn.Linear(d_model, 3 * d_model)     # weight (3C, C): Q, K and V in one product
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = probability("dropout", dropout)
        self.resid_dropout = nn.Dropout(self.dropout)
        #: which products the last :meth:`step_function` bound: "fused" or "pytorch" (None before the first)
        self.last_decode_path: str | None = None

    decode_path = PathSetting(
        """How the lean step (:meth:`step_function`) runs its two projections: ``"auto"`` (by
        :mod:`.matvec_kernel` where :func:`~.matvec_kernel.applies` finds nothing against it, else
        ``F.linear``; :func:`~.matvec_kernel.products`), ``"pytorch"`` or ``"fused"`` (a ValueError saying why
        when the kernel does not apply); see :data:`~.base.DECODE_PATHS`. The module's own calls always use
        ``F.linear``.""")

    def heads(self, x: torch.Tensor, cache: LayerCache | None = None) -> tuple[torch.Tensor, ...]:
        """Q, K, V for the new tokens, each ``(B, H, T, hd)``."""
        B, T, C = check_attention_input(x, self.d_model)
        return self._heads(x, B, T, C)

    def _heads(self, x: torch.Tensor, B: int, T: int, C: int) -> tuple[torch.Tensor, ...]:
        # One product, then views: (B, T, 3C) -> (B, T, 3, H, hd) -> (3, B, H, T, hd), split into Q, K, V. Two
        # view calls where splitting first and reshaping each head takes seven: at batch 1 a decoding step is a
        # chain of small calls, and each costs about as much as the arithmetic it starts.
        qkv = self.qkv(x).view(B, T, 3, self.n_heads, C // self.n_heads)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)                            # 3 x (B, H, T, hd)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = check_attention_input(x, self.d_model)
        q, k, v = self._heads(x, B, T, C)
        y = cached_attention(q, k, v, cache, self.dropout if self.training else 0.0)  # (B, H, T, hd)
        y = self.proj(y.transpose(1, 2).reshape(B, T, C))                     # (B, T, C)
        return self.resid_dropout(y) if self.training and self.dropout else y  # no call where it does nothing

    def step_function(self, cache: LayerCache):
        """This layer's decoding step with every look-up done once: ``step(h, P)`` takes the normalised input of one
        new token per sequence, ``h`` ``(B, C)``, at position ``P``, writes its key and value into ``cache``'s
        buffers and returns the attention's output ``(B, C)``. Used by :class:`~sparse_tutorial.lean_decode.LeanDecoder`,
        which reserves the cache's room first (the buffers are held, not looked up). None when the projections are
        not plain ``nn.Linear`` layers (int8 ones): then the caller runs the module."""
        if type(self.qkv) is not nn.Linear or type(self.proj) is not nn.Linear:
            return None
        C, H = self.d_model, self.n_heads
        k_buf, v_buf = cache.buffers()                  # (B, H, capacity, hd) each
        (in_proj, out_proj), taken = matvec_kernel.products(          # (B, C) -> (B, 3C), (B, C) -> (B, C)
            k_buf.shape[0], self.decode_path, (self.qkv.weight, self.qkv.bias, False),
            (self.proj.weight, self.proj.bias, False))
        self.__dict__["last_decode_path"] = taken

        def step(h: torch.Tensor, P: int) -> torch.Tensor:
            B = h.shape[0]
            qkv = in_proj(h).view(B, 3, H, 1, C // H)   # Q, K, V: (B, H, 1, hd)
            k_buf[:, :, P:P + 1].copy_(qkv[:, 1])       # the new key and value,
            v_buf[:, :, P:P + 1].copy_(qkv[:, 2])       # in place
            y = F.scaled_dot_product_attention(         # (B, H, 1, hd)
                qkv[:, 0], k_buf[:, :, :P + 1], v_buf[:, :, :P + 1])
            cache._length = P + 1
            return out_proj(y.view(B, C))               # (B, C)
        step.numpy = self._numpy_step(in_proj, out_proj, cache) if taken == "fused" else None
        return step

    @staticmethod
    def _numpy_step(in_proj, out_proj, cache: LayerCache):
        """:meth:`step_function`'s step on NumPy arrays where its products are the kernel's: the same
        arithmetic, the key and value writes and the attention over the cache in one call
        (:func:`~.matvec_kernel.bind_heads`) instead of two copies and ``F.scaled_dot_product_attention``.
        None where that kernel cannot run here (the caller then wraps the PyTorch step)."""
        try:
            heads = matvec_kernel.bind_heads(*cache.buffers())
        except matvec_kernel.sparse_ff_kernel.KernelUnavailable:
            return None
        qkv_product, out_product = in_proj.numpy, out_proj.numpy

        def numpy_step(h, P: int):
            y = heads(qkv_product(h), P)                # (B, 3C) -> (B, C): k, v written at P
            cache._length = P + 1
            return out_product(y)                       # (B, C)
        return numpy_step

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}"
