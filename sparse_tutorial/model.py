"""A small GPT-style decoder-only Transformer whose FF (and, from chapter 4, QKV) layers can be sparse.

Pre-LayerNorm blocks, learned positions, causal self-attention, weight-tied output head, in the style of
nanoGPT's ``model.py``. Shapes in comments: ``B`` batch, ``T`` new tokens in this call, ``P`` tokens
already in the cache, ``C = d_model``, ``H`` heads, ``hd = C / H``.

Inference runs with a cache (:class:`ModelCache`): the prompt is processed in one call ("prefill", the
dense-masked FF path), then each new token is one call of ``T = 1`` that uses the sparse ``decode`` path of
the FF layers. The rule that picks the path lives in :meth:`Block.feed_forward`.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from . import config as run_config
from .layers import DenseFF, SparseFF

__all__ = ["ModelConfig", "LayerCache", "ModelCache", "CausalSelfAttention", "Block", "TransformerLM",
           "cached_attention", "book_config", "seed_config", "resolve_qkv_modules"]

FF_KINDS = ("dense", "sparse")
QKV_KINDS = ("dense", "multiplicative", "conv")


@dataclass
class ModelConfig:
    vocab_size: int = 65
    context_length: int = 128
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 512
    dropout: float = 0.0
    ff: str = "dense"                # "dense" | "sparse"
    ff_block_size: int = 32          # units per block (the paper's N); d_ff / ff_block_size are active
    d_lowrank: int | None = None     # controller rank; None -> d_ff // ff_block_size
    controller: str = "lowrank"      # "lowrank" | "full" | "mlp" (chapter 2)
    qkv: str = "dense"               # "dense" | "multiplicative" | "conv" (chapter 4)
    qkv_modules: int | None = None   # S, the number of modules of the sparse QKV layers; None -> sqrt(d_model)

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_heads", "n_layers", "d_ff", "ff_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        if self.ff not in FF_KINDS:
            raise ValueError(f"ff must be one of {FF_KINDS}, got ff={self.ff!r}")
        if self.qkv not in QKV_KINDS:
            raise ValueError(f"qkv must be one of {QKV_KINDS}, got qkv={self.qkv!r}")
        if self.qkv in ("dense", "multiplicative") and self.d_model % self.n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={self.d_model}, "
                             f"n_heads={self.n_heads}")
        if self.qkv_modules is not None and (isinstance(self.qkv_modules, bool)
                                             or not isinstance(self.qkv_modules, int) or self.qkv_modules < 1):
            raise ValueError(f"qkv_modules must be a positive integer or None, got qkv_modules={self.qkv_modules!r}")
        if self.qkv != "dense":
            resolve_qkv_modules(self.d_model, self.qkv_modules)  # d_model % S == 0, or a clear error
        if self.ff == "sparse" and self.d_ff % self.ff_block_size:
            raise ValueError(f"d_ff must be divisible by ff_block_size, got d_ff={self.d_ff}, "
                             f"ff_block_size={self.ff_block_size}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout!r}")

    def to_dict(self) -> dict:
        return asdict(self)


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


def book_config(ff: str = "dense", **overrides) -> ModelConfig:
    """The book's Tiny Shakespeare model: trains in minutes on a laptop CPU (tiny in fast mode)."""
    base = run_config.pick(
        default=dict(context_length=128, d_model=128, n_heads=4, n_layers=4, d_ff=512, ff_block_size=32,
                     dropout=0.0),
        fast=dict(context_length=32, d_model=32, n_heads=2, n_layers=2, d_ff=128, ff_block_size=16,
                  dropout=0.0),
    )
    base.update(ff=ff, **overrides)
    return ModelConfig(**base)


def seed_config(ff: str = "dense", **overrides) -> ModelConfig:
    """The earlier PyTorch project's model: d_model 384, 6 heads, 6 layers, context 256, d_ff 1536, N = 64."""
    base = dict(context_length=256, d_model=384, n_heads=6, n_layers=6, d_ff=1536, ff_block_size=64,
                dropout=0.2, ff=ff)
    base.update(overrides)
    return ModelConfig(**base)


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


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

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Add the keys and values of ``T`` new positions ``(B, H, T, hd)``; return all of them ``(B, H, P+T, hd)``."""
        P, T = self._length, k.shape[-2]
        n = P + T
        if torch.is_grad_enabled() and (k.requires_grad or v.requires_grad):
            # Autograd: no in-place writes into tensors an earlier call may have saved for backward.
            k_all = k if P == 0 else torch.cat([self.k, k], dim=-2)
            v_all = v if P == 0 else torch.cat([self.v, v], dim=-2)
            self._k, self._v, self._length = k_all, v_all, n
            return k_all, v_all
        buf = self._k
        if (buf is None or P == 0 or n > buf.shape[-2] or buf.shape[:2] != k.shape[:2]
                or buf.shape[-1] != k.shape[-1] or buf.dtype != k.dtype or buf.device != k.device
                or self._v is None or self._v.shape[-2] != buf.shape[-2]):
            capacity = max(n, 2 * P)                                   # room for as many new positions as old
            new_k = k.new_empty(k.shape[:2] + (capacity, k.shape[-1]))
            new_v = v.new_empty(v.shape[:2] + (capacity, v.shape[-1]))
            if P:
                new_k[:, :, :P].copy_(self._k[:, :, :P])
                new_v[:, :, :P].copy_(self._v[:, :, :P])
            self._k, self._v = new_k, new_v
        self._k[:, :, P:n].copy_(k)
        self._v[:, :, P:n].copy_(v)
        self._length = n
        return self._k[:, :, :n], self._v[:, :, :n]


class ModelCache:
    """One :class:`LayerCache` per block, plus the number of positions processed so far."""

    def __init__(self, n_layers: int):
        self.layers = [LayerCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def reset(self) -> None:
        self.layers = [LayerCache() for _ in self.layers]


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


# --------------------------------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------------------------------


class CausalSelfAttention(nn.Module):
    """Standard multi-head attention: dense Q, K, V projections and an output projection."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.d_model = cfg.n_heads, cfg.d_model
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model)
        self.dropout = cfg.dropout
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def heads(self, x: torch.Tensor, cache: LayerCache | None = None) -> tuple[torch.Tensor, ...]:
        """Q, K, V for the new tokens, each ``(B, H, T, hd)``."""
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=-1)                                  # 3 x (B, T, C)
        return tuple(t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.heads(x)
        y = cached_attention(q, k, v, cache, self.dropout if self.training else 0.0)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))


def make_attention(cfg: ModelConfig) -> nn.Module:
    """The attention layer the config asks for; the sparse QKV kinds live in :mod:`sparse_tutorial.qkv`."""
    if cfg.qkv == "dense":
        return CausalSelfAttention(cfg)
    from .qkv import make_sparse_attention  # chapter 4

    return make_sparse_attention(cfg)


def make_ff(cfg: ModelConfig) -> nn.Module:
    if cfg.ff == "dense":
        return DenseFF(cfg.d_model, cfg.d_ff, cfg.dropout)
    return SparseFF(cfg.d_model, cfg.d_ff, cfg.ff_block_size, cfg.d_lowrank, cfg.dropout,
                    controller=cfg.controller)


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + attn(ln(x))`` then ``x + ff(ln(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = make_attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = make_ff(cfg)
        #: in eval mode, calls with at most this many tokens (B*T) use SparseFF.decode; more use dense-masked.
        #: Default: every call. Chapter 5 measures decode (which gathers both matrices up to N tokens and
        #: beyond that computes the first layer densely and gathers only W2) below the dense-masked path at
        #: every batch and prompt size; set 0 to force the dense-masked path.
        self.sparse_decode_max_rows = 1 << 30

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pick the FF path by the number of tokens in the call (see chapter 5)."""
        rows = x.shape[0] * x.shape[1]
        if isinstance(self.ff, SparseFF) and not self.training and rows <= self.sparse_decode_max_rows:
            return self.ff.decode(x)
        return self.ff(x)

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)           # (B, T, C)
        return x + self.feed_forward(self.ln2(x))       # (B, T, C)


class TransformerLM(nn.Module):
    """Decoder-only language model. ``forward(idx, targets=None, cache=None) -> (logits, loss)``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.context_length, cfg.d_model)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.ln_f = nn.LayerNorm(cfg.d_model)
        self.head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.head.weight = self.tok_emb.weight  # weight tying
        nn.init.normal_(self.tok_emb.weight, std=0.02)
        nn.init.normal_(self.pos_emb.weight, std=0.02)

    # -- bookkeeping ---------------------------------------------------------------------------------
    def num_params(self) -> int:
        """Parameters, counting the tied embedding/head matrix once."""
        return sum(p.numel() for p in self.parameters())

    @property
    def sparse_decode_max_rows(self) -> int:
        return self.blocks[0].sparse_decode_max_rows

    @sparse_decode_max_rows.setter
    def sparse_decode_max_rows(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"sparse_decode_max_rows must be an integer >= 0, got {value!r}")
        for block in self.blocks:
            block.sparse_decode_max_rows = value

    def new_cache(self) -> ModelCache:
        return ModelCache(self.cfg.n_layers)

    # -- forward --------------------------------------------------------------------------------------
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                cache: ModelCache | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        if idx.dim() != 2:
            raise ValueError(f"idx must be a (batch, time) tensor of token ids, got shape {tuple(idx.shape)}")
        B, T = idx.shape
        past = 0 if cache is None else cache.length
        if past + T > self.cfg.context_length:
            raise ValueError(
                f"{past} cached + {T} new tokens exceed context_length={self.cfg.context_length}; "
                f"crop the input or let generate() slide the window"
            )
        pos = torch.arange(past, past + T, device=idx.device)
        x = self.drop(self.tok_emb(idx) + self.pos_emb(pos))           # (B, T, C)
        for i, block in enumerate(self.blocks):
            x = block(x, None if cache is None else cache.layers[i])
        logits = self.head(self.ln_f(x))                                # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    # -- generation -------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, greedy: bool = False, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Continue ``idx`` ``(B, T0)`` by ``max_new_tokens`` tokens; returns ``(B, T0 + max_new_tokens)``.

        With ``use_cache`` the prompt is processed once (prefill) and every new token is a single-token
        call that reuses cached keys/values and the sparse FF decode path. When the sequence outgrows
        ``context_length`` the window slides: the cache is rebuilt from the last ``context_length`` tokens,
        exactly what the uncached loop sees. Call ``model.eval()`` first for deterministic FF masks.
        """
        if idx.dim() != 2 or idx.shape[1] < 1:
            raise ValueError(f"idx must be a (batch, time>=1) tensor, got shape {tuple(idx.shape)}")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got max_new_tokens={max_new_tokens!r}")
        if not greedy and temperature <= 0:
            raise ValueError(f"temperature must be > 0 (or use greedy=True), got temperature={temperature!r}")
        ctx = self.cfg.context_length
        cache = self.new_cache() if use_cache else None
        for _ in range(max_new_tokens):
            if cache is None:
                logits, _ = self(idx[:, -ctx:])
            elif cache.length == 0 or cache.length >= ctx:
                cache.reset()                                           # prefill (or slide the window)
                logits, _ = self(idx[:, -ctx:], cache=cache)
            else:
                logits, _ = self(idx[:, -1:], cache=cache)              # one new token
            logits = logits[:, -1, :]                                   # (B, vocab)
            if greedy:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    v, _ = torch.topk(logits, min(top_k, logits.shape[-1]))
                    logits = logits.masked_fill(logits < v[:, [-1]], -math.inf)
                probs = F.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx
