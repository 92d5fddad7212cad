"""The layer kinds a model can be built with: ``ModelConfig.ff`` names one of :data:`FF_KINDS`,
``ModelConfig.qkv`` one of :data:`QKV_KINDS`.

Each entry maps a name to a factory that builds the layer from a :class:`~sparse_tutorial.model.ModelConfig`.
The factory reads the config's fields and hands the layer plain arguments (``d_model``, ``d_ff``, ...), so no
layer, and not this module either, imports the model: a layer can be used on its own, as chapter 2 uses
:class:`SparseFF`. A factory checks the config fields only its kind uses, under the config's names
(``ff_block_size``, not the layer's ``block_size``); the layer checks the rest.

Adding a kind: write its module in this package (an FF kind implements :class:`~.base.FeedForward`, an
attention kind :class:`~.base.SelfAttention`) and add one line to the dict below. The model, cached decoding and
the contract tests (``tests/test_layer_contract.py``) find it here; nothing else changes.
"""
from __future__ import annotations

import math
from typing import Any, Callable

from torch import nn

from .._checks import positive_int
from .attention import CausalSelfAttention
from .base import FeedForward
from .dense import DenseFF
from .lsh import LSHSelfAttention
from .moe import MoEFF
from .pkm import ProductKeyMemory
from .qkv import ConvQKVAttention, MultiplicativeAttention, resolve_qkv_modules
from .sparse_ff import SparseFF

__all__ = ["FF_KINDS", "QKV_KINDS", "make_ff", "make_attention"]

#: A factory: the model config in (any object with its fields), a layer out.
Factory = Callable[[Any], nn.Module]


def _sparse_ff(cfg) -> SparseFF:
    if cfg.d_ff % cfg.ff_block_size:
        raise ValueError(f"d_ff must be divisible by ff_block_size, got d_ff={cfg.d_ff}, "
                         f"ff_block_size={cfg.ff_block_size}")
    return SparseFF(cfg.d_model, cfg.d_ff, cfg.ff_block_size, cfg.d_lowrank, cfg.dropout, controller=cfg.controller,
                    noise_scale=cfg.ff_noise_scale, hard_prob=cfg.ff_hard_prob, init=cfg.ff_init,
                    scale_by_prob=cfg.ff_scale_by_prob)


def _pkm(cfg) -> ProductKeyMemory:
    # n_keys ** 2 value rows of d_model weights ~ the 2 d_model d_ff weights of a dense FF of width d_ff
    n_keys = math.isqrt(2 * positive_int("d_ff", cfg.d_ff))
    return ProductKeyMemory(cfg.d_model, n_keys, top_k=min(cfg.pkm_top_k, n_keys), heads=cfg.pkm_heads,
                            dropout=cfg.dropout)


def _lsh(cfg) -> LSHSelfAttention:
    # the config's names in the messages (lsh_buckets=3), not the layer's (n_buckets=3)
    hashes, window = positive_int("lsh_hashes", cfg.lsh_hashes), positive_int("lsh_window", cfg.lsh_window)
    buckets = LSHSelfAttention.even_buckets("lsh_buckets", cfg.lsh_buckets)
    return LSHSelfAttention(cfg.d_model, cfg.n_heads, hashes, buckets, window, cfg.dropout)


#: ``ModelConfig.ff`` -> the feed-forward layer of every block (chapters 1-3, 5)
FF_KINDS: dict[str, Factory] = {
    "dense": lambda cfg: DenseFF(cfg.d_model, cfg.d_ff, cfg.dropout),
    "sparse": _sparse_ff,
    "moe": lambda cfg: MoEFF(cfg.d_model, cfg.d_ff, cfg.moe_experts, cfg.moe_top_k, cfg.dropout),   # chapter 6
    "pkm": _pkm,                                                                                      # chapter 6
}

#: ``ModelConfig.qkv`` -> the attention layer of every block (chapter 4); the sparse kinds use ``S`` modules
QKV_KINDS: dict[str, Factory] = {
    "dense": lambda cfg: CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.dropout),
    "multiplicative": lambda cfg: MultiplicativeAttention(
        cfg.d_model, cfg.n_heads, resolve_qkv_modules(cfg.d_model, cfg.qkv_modules), cfg.dropout),
    "conv": lambda cfg: ConvQKVAttention(
        cfg.d_model, resolve_qkv_modules(cfg.d_model, cfg.qkv_modules), length_kernel=3, dropout=cfg.dropout),
    "lsh": _lsh,                                                                                      # chapter 7
}


def _lookup(kinds: dict[str, Factory], field: str, name) -> Factory:
    if name not in kinds:
        raise ValueError(f"{field} must be one of {sorted(kinds)}, got {field}={name!r}")
    return kinds[name]


def make_ff(cfg) -> FeedForward:
    """The FF layer ``cfg.ff`` names, built from ``cfg``; a ValueError naming ``ff`` for an unknown kind."""
    return _lookup(FF_KINDS, "ff", cfg.ff)(cfg)


def make_attention(cfg) -> nn.Module:
    """The attention layer ``cfg.qkv`` names, built from ``cfg``; a ValueError naming ``qkv`` for an unknown kind."""
    return _lookup(QKV_KINDS, "qkv", cfg.qkv)(cfg)
