"""The interfaces every layer kind implements: :class:`FeedForward` and :class:`SelfAttention`.

The model (:class:`~sparse_tutorial.model.Block`), cached decoding, the benchmark and the contract tests
(``tests/test_layer_contract.py``) talk to layers only through these, so a new kind (a mixture of experts, a
product-key memory, ...) plugs in by implementing them and adding one line to :mod:`.registry`.
"""
from __future__ import annotations

import abc
from typing import ClassVar, Protocol, runtime_checkable

import torch
from torch import nn

__all__ = ["FeedForward", "SelfAttention", "DECODE_PATHS", "PathSetting"]

#: the decode implementations a layer with a fused kernel offers (its ``decode_path``): ``"auto"`` takes the fused
#: kernel where it applies and PyTorch otherwise, ``"pytorch"`` always the PyTorch reference, ``"fused"`` always the
#: kernel (a ValueError saying why when it does not apply)
DECODE_PATHS = ("auto", "pytorch", "fused")


class PathSetting:
    """A layer attribute that holds one of :data:`DECODE_PATHS` (a layer's ``decode_path``, ``train_path``):
    ``"auto"`` until set, a ValueError naming the attribute and the value for anything else. The value lives in
    the instance's ``__dict__`` under ``_<name>``, so layers pickled before the attribute existed read
    ``"auto"``. The class attribute's docstring is the owner's to write (``name = PathSetting("...")``)."""

    def __init__(self, doc: str = ""):
        self.__doc__ = doc

    def __set_name__(self, owner, name: str) -> None:
        self.name, self.key = name, "_" + name

    def __get__(self, obj, owner=None):
        return self if obj is None else obj.__dict__.get(self.key, "auto")

    def __set__(self, obj, value: str) -> None:
        if value not in DECODE_PATHS:
            raise ValueError(f"{self.name} must be one of {DECODE_PATHS}, got {self.name}={value!r}")
        obj.__dict__[self.key] = value


class FeedForward(abc.ABC, nn.Module):
    """A position-wise feed-forward layer: ``(..., d_model) -> (..., d_model)``, every token on its own.

    What a kind provides:

    * :meth:`forward`: training and evaluation (a sparse kind may compute densely under a mask here);
    * :meth:`decode`: the inference path. It must equal :meth:`forward` in eval mode, within float rounding,
      for any leading shape. Kinds without a cheaper path keep the default, which *is* :meth:`forward`;
    * :attr:`has_sparse_decode`: True when :meth:`decode` is cheaper than :meth:`forward` (it touches only
      the weights the token selects). :meth:`Block.feed_forward <sparse_tutorial.model.Block.feed_forward>`
      sends small eval-mode calls to :meth:`decode` exactly when this is True;
    * :meth:`num_params` (stored) and :meth:`active_params_per_token` (read for one token at decode), the two
      numbers the chapters print side by side.

    Attributes every kind sets: ``d_model`` (the width of its input and output).
    """

    #: whether :meth:`decode` is a cheaper path than :meth:`forward` (class attribute of each kind)
    has_sparse_decode: ClassVar[bool] = False
    d_model: int

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., d_model) -> (..., d_model)``; raises ValueError naming ``x`` on a wrong last dimension."""

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The inference path; here the same as :meth:`forward` (override it together with ``has_sparse_decode``)."""
        return self.forward(x)

    def step_function(self, rows: int = 1):
        """This layer's inference path for ``rows`` tokens, ``(rows, d_model) -> (rows, d_model)``, with what it
        looks up at every call (weights, checks) done once, for a decoder that calls it token after token
        (:class:`~sparse_tutorial.lean_decode.LeanDecoder`). It reads the weights as they are now: ask again after
        changing them. Here :meth:`decode` itself; kinds override it where the look-ups cost more than the work."""
        return self.decode

    def num_params(self) -> int:
        """Parameters stored by the layer."""
        return sum(p.numel() for p in self.parameters())

    @abc.abstractmethod
    def active_params_per_token(self) -> int:
        """Weights and biases :meth:`decode` reads for one token (all of them for a dense layer)."""


@runtime_checkable
class SelfAttention(Protocol):
    """A causal self-attention layer: ``forward(x (B, T, C), cache) -> (B, T, C)``.

    ``cache`` is a :class:`~sparse_tutorial.layers.attention.LayerCache` or None. With a cache, the ``T`` new
    tokens attend to the cached positions and to each other, and the cache is extended; a call on the whole
    sequence and calls on its pieces in order give the same outputs at every position.
    ``heads(x, cache)`` returns the queries, keys and values of the new tokens, each ``(B, H, T, hd)``
    (chapter 4 looks at the attention maps through it).
    """

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor: ...

    def heads(self, x: torch.Tensor, cache=None) -> tuple[torch.Tensor, ...]: ...
