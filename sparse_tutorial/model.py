"""A small GPT-style decoder-only Transformer whose FF (and, from chapter 4, QKV) layers can be sparse.

Pre-LayerNorm blocks, learned positions, causal self-attention, weight-tied output head, in the style of
nanoGPT's ``model.py``. Shapes in comments: ``B`` batch, ``T`` new tokens in this call, ``P`` tokens
already in the cache, ``C = d_model``, ``H`` heads, ``hd = C / H``.

Inference runs with a cache (:class:`ModelCache`): the prompt is processed in one call ("prefill"), then each
new token is one call of ``T = 1``. By default every eval-mode call, the prefill included, uses the sparse
``decode`` path of the FF layers (chapter 5 measures it below the dense-masked path at every size); the rule
that picks the path lives in :meth:`Block.feed_forward` (``sparse_decode_max_rows``).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import config as run_config
from ._checks import real_number
from .layers.attention import LayerCache
from .layers.qkv import MultiplicativeDense
from .layers.registry import make_attention, make_ff
from .layers.reversible import ReversibleStack, reversible_forward
from .layers.sparse_ff import CONTROLLERS
from .layers.sru import SRUBranch

__all__ = ["ModelConfig", "ModelCache", "Block", "TransformerLM", "BOOK_RECIPE", "book_config", "seed_config",
           "terraformer_config"]


@dataclass
class ModelConfig:
    vocab_size: int = 65
    context_length: int = 128
    d_model: int = 128
    n_heads: int = 4
    n_layers: int = 4
    d_ff: int = 512
    dropout: float = 0.0
    ff: str = "dense"                # a kind of layers.registry.FF_KINDS, e.g. "dense", "sparse"
    ff_block_size: int = 32          # units per block (the paper's N); d_ff / ff_block_size are active
    d_lowrank: int | None = None     # controller rank; None -> d_ff // ff_block_size
    controller: str = "lowrank"      # "lowrank" | "full" | "mlp" (chapter 2)
    ff_hard_prob: float = 0.3        # share of training calls with the hard mask (the reference's 0.3)
    ff_noise_scale: float = 0.1      # Gumbel noise multiplier of the training choice (the reference's 0.1)
    ff_init: str = "torch"           # "torch" | "reference" (SparseFF's init; chapter 3, "Closing the gap")
    ff_scale_by_prob: bool = False   # scale each chosen unit by its probability (reference's multiply_by_...)
    moe_experts: int = 4             # ff="moe": experts, each of width d_ff / moe_experts (chapter 6)
    moe_top_k: int = 1               # ff="moe": experts per token
    pkm_top_k: int = 8               # ff="pkm": memory slots read per head (the memory has isqrt(2 d_ff)^2 slots)
    pkm_heads: int = 2               # ff="pkm": query heads
    qkv: str = "dense"               # a kind of layers.registry.QKV_KINDS, e.g. "conv" (chapter 4)
    qkv_modules: int | None = None   # S, the number of modules of the sparse QKV layers; None -> sqrt(d_model)
    lsh_hashes: int = 2              # qkv="lsh": hash rounds (chapter 7)
    lsh_buckets: int = 8             # qkv="lsh": buckets per round (even: random rotations give +-projections)
    lsh_window: int = 32             # qkv="lsh": a query sees at most this many earlier keys of its bucket per round
    reversible: bool = False         # reversible residual streams: activations rebuilt in backward (chapter 7)
    sru_dim: int | None = None       # width of the SRU branch added to every FF output; None: no branch (chapter 7)
    loss_modules: int | None = None  # S of a multiplicative output layer (the "sparse loss"); None: tied dense head

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "d_model", "n_heads", "n_layers", "d_ff", "ff_block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        if self.qkv_modules is not None and (isinstance(self.qkv_modules, bool)
                                             or not isinstance(self.qkv_modules, int) or self.qkv_modules < 1):
            raise ValueError(f"qkv_modules must be a positive integer or None, got qkv_modules={self.qkv_modules!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got dropout={self.dropout!r}")
        # Checked here too, not only by the sparse FF: a dense-FF config must not carry a value no layer accepts.
        if self.d_lowrank is not None and (isinstance(self.d_lowrank, bool) or not isinstance(self.d_lowrank, int)
                                           or self.d_lowrank < 1):
            raise ValueError(f"d_lowrank must be a positive integer or None (d_ff // ff_block_size), "
                             f"got d_lowrank={self.d_lowrank!r}")
        if not isinstance(self.reversible, bool):
            raise ValueError(f"reversible must be True or False, got reversible={self.reversible!r}")
        if self.reversible and self.ff == "moe":
            raise ValueError("reversible=True cannot train ff='moe': its load-balancing loss needs the forward "
                             "pass's graph, which a reversible stack does not keep; use another ff kind")
        for name in ("sru_dim", "loss_modules"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None, got {name}={value!r}")
        if self.loss_modules is not None and self.loss_modules > self.vocab_size:
            raise ValueError(f"loss_modules must be at most vocab_size={self.vocab_size}, "
                             f"got loss_modules={self.loss_modules}")
        if not isinstance(self.controller, str) or self.controller not in CONTROLLERS:
            raise ValueError(f"controller must be one of {sorted(CONTROLLERS)}, got controller={self.controller!r}")
        # Each layer kind checks its own arguments when it is built (layers.registry). Building one FF and one
        # attention layer on the meta device (shapes only: no memory, no random numbers) runs those checks
        # now, so a bad config fails here, with the name of the field, and not halfway through a model.
        with torch.device("meta"):
            make_ff(self)
            make_attention(self)

    def to_dict(self) -> dict:
        return asdict(self)


#: The book's training recipe for sparse FF layers, where it departs from the reference code's defaults: the hard
#: (one-hot) mask on every training call, where the reference mixes 30% hard calls with 70% soft ones. Training
#: then computes what evaluation computes. Chapter 3's "Closing the gap" prints the recorded comparison
#: (``python -m sparse_tutorial.studies quality``, levers "sparse" and "always hard"): the hard mask on every call
#: came closer to dense at every length recorded (one seed each, by 1.5 points at 400 steps, 0.6 at 1500).
BOOK_RECIPE = dict(ff_hard_prob=1.0)


def book_config(ff: str = "dense", **overrides) -> ModelConfig:
    """The book's Tiny Shakespeare model: trains in minutes on a laptop CPU (tiny in fast mode).

    Sparse FF layers train with :data:`BOOK_RECIPE` (the hard mask on every call); pass ``ff_hard_prob=0.3``
    for the reference's mix."""
    base = run_config.pick(
        default=dict(context_length=128, d_model=128, n_heads=4, n_layers=4, d_ff=512, ff_block_size=32,
                     dropout=0.0),
        fast=dict(context_length=32, d_model=32, n_heads=2, n_layers=2, d_ff=128, ff_block_size=16,
                  dropout=0.0),
    )
    base.update(ff=ff, **BOOK_RECIPE)
    base.update(overrides)
    return ModelConfig(**base)


def seed_config(ff: str = "dense", **overrides) -> ModelConfig:
    """The earlier PyTorch project's model: d_model 384, 6 heads, 6 layers, context 256, d_ff 1536, N = 64."""
    base = dict(context_length=256, d_model=384, n_heads=6, n_layers=6, d_ff=1536, ff_block_size=64,
                dropout=0.2, ff=ff)
    base.update(overrides)
    return ModelConfig(**base)


def terraformer_config(**overrides) -> ModelConfig:
    """Chapter 7's long-sequence model at the book's size: sparse FF, LSH attention, reversible streams, an SRU
    branch in every FF layer and a multiplicative output layer (the "sparse loss"). Overrides as
    :func:`book_config` (``vocab_size``, ``context_length``, ...)."""
    base = dict(ff="sparse", qkv="lsh", reversible=True,
                sru_dim=run_config.pick(default=32, fast=8), loss_modules=run_config.pick(default=4, fast=2))
    base.update(overrides)
    return book_config(**base)


# --------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------


class ModelCache:
    """One :class:`LayerCache` per block, plus the number of positions processed so far."""

    def __init__(self, n_layers: int):
        self.layers = [LayerCache() for _ in range(n_layers)]

    @property
    def length(self) -> int:
        return self.layers[0].length if self.layers else 0

    def reset(self) -> None:
        self.layers = [LayerCache() for _ in self.layers]


# --------------------------------------------------------------------------------------------------
# Blocks and the model
# --------------------------------------------------------------------------------------------------


def _on_numpy(step):
    """A PyTorch sublayer step ``step(h, *args)`` on a NumPy input and output (views, no copy of ``h``)."""
    def numpy_step(h: np.ndarray, *args) -> np.ndarray:
        return step(torch.from_numpy(h), *args).numpy()
    return numpy_step


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: ``x + attn(ln(x))`` then ``x + ff(ln(x))``."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.d_model)
        self.attn = make_attention(cfg)
        self.ln2 = nn.LayerNorm(cfg.d_model)
        self.ff = make_ff(cfg)
        #: Terraformer's SRU branch, added to the FF output (``cfg.sru_dim``), or None
        self.sru = SRUBranch(cfg.d_model, cfg.sru_dim) if cfg.sru_dim else None
        #: in eval mode, calls with at most this many tokens (B*T) use the FF's cheaper ``decode`` path (kinds
        #: with ``has_sparse_decode``, e.g. SparseFF); more use its dense-masked ``forward``.
        #: Default: every call. Chapter 5 measures decode (which gathers both matrices up to N tokens and
        #: beyond that computes the first layer densely and gathers only W2) below the dense-masked path at
        #: every batch and prompt size; set 0 to force the dense-masked path.
        self.sparse_decode_max_rows = 1 << 30

    def feed_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pick the FF path by the number of tokens in the call (see chapter 5).

        Only kinds that declare a cheaper decode path (:attr:`FeedForward.has_sparse_decode
        <sparse_tutorial.layers.base.FeedForward.has_sparse_decode>`) take it, and only in eval mode.
        """
        rows = x.shape[0] * x.shape[1]
        if self.ff.has_sparse_decode and not self.training and rows <= self.sparse_decode_max_rows:
            return self.ff.decode(x)
        return self.ff(x)

    def attention_sublayer(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """What the block adds to the stream for attention: ``attn(ln1(x))``, ``(B, T, C)``."""
        return self.attn(self.ln1(x), cache)

    def ff_sublayer(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """What the block adds for the FF: ``ff(ln2(x))``, plus the SRU branch where there is one."""
        h = self.feed_forward(self.ln2(x))
        if self.sru is not None:
            h = h + self.sru(x, None if cache is None else cache.state)
        return h

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attention_sublayer(x, cache)       # (B, T, C)
        return x + self.ff_sublayer(x, cache)           # (B, T, C)

    def step_function(self, cache: LayerCache, batch: int):
        """This block's decoding step with every look-up done once (the lean step,
        :mod:`sparse_tutorial.lean_decode`): ``step(x, P)`` takes the stream of one new token per sequence, ``x``
        ``(batch, C)``, at position ``P`` and returns the block's output ``(batch, C)``. The attention and FF kinds
        bind their weights through their own ``step_function`` (a kind without one, or whose weights do not suit
        it, runs as a module on the same cache); the FF path follows :meth:`feed_forward`'s rule. The attention's
        step holds the cache's buffers: give the cache room first (:meth:`LayerCache.reserve`). Eval mode only.

        ``step.numpy`` is the same step on a NumPy stream, ``x`` ``(batch, C)`` float32, updated in place
        (:meth:`_numpy_step`), or None where the stream stays in PyTorch."""
        if self.training:
            raise ValueError("step_function is an inference path: call eval() first")
        attn, ff, sru = self.attn, self.ff, self.sru
        make = getattr(attn, "step_function", None)
        attn_step = None if make is None else make(cache)
        if attn_step is None:                           # the module, on the same cache
            def attn_step(h: torch.Tensor, P: int) -> torch.Tensor:
                return attn(h.view(batch, 1, -1), cache).view(batch, -1)
        if ff.has_sparse_decode and batch > self.sparse_decode_max_rows:
            ff_step = ff                                # the rule of feed_forward
        else:
            ff_step = ff.step_function(batch)           # decode (dense kinds: forward)
        n1 = self.ln1.normalized_shape, self.ln1.weight, self.ln1.bias, self.ln1.eps
        n2 = self.ln2.normalized_shape, self.ln2.weight, self.ln2.bias, self.ln2.eps

        def step(x: torch.Tensor, P: int) -> torch.Tensor:
            x = x + attn_step(F.layer_norm(x, *n1), P)  # (B, C)
            y = ff_step(F.layer_norm(x, *n2))           # (B, C)
            if sru is not None:                         # Terraformer's branch, as a module
                y = y + sru(x.view(batch, 1, -1), cache.state).view(batch, -1)
            return x + y
        step.numpy = None if sru is not None else self._numpy_step(attn_step, ff_step, batch)
        return step

    def _numpy_step(self, attn_step, ff_step, batch: int):
        """:meth:`step_function`'s step on a NumPy stream ``x`` ``(batch, C)`` float32, updated in place: each
        sublayer's NumPy step where it has one (``.numpy``: the fused kernels take and return NumPy arrays), else
        its PyTorch step on views of the same memory; the layer norms are PyTorch's own (``torch.layer_norm``,
        the same numbers as the module's), on a view of the stream. None unless the block's layer norms hold
        float32 weights on the CPU."""
        norms = self.ln1, self.ln2
        if any(ln.weight is None or ln.weight.dtype != torch.float32 or not ln.weight.is_cpu for ln in norms):
            return None
        attn_np = getattr(attn_step, "numpy", None) or _on_numpy(attn_step)
        ff_np = getattr(ff_step, "numpy", None) or _on_numpy(ff_step)
        n1, n2 = ((ln.normalized_shape, ln.weight, ln.bias, ln.eps, False) for ln in norms)
        layer_norm = torch.layer_norm                   # F.layer_norm without its Python checks

        def step(x: np.ndarray, P: int) -> np.ndarray:
            xt = torch.from_numpy(x)                    # the same memory
            np.add(x, attn_np(layer_norm(xt, *n1).numpy(), P), out=x)      # x += attn(ln1(x))
            np.add(x, ff_np(layer_norm(xt, *n2).numpy()), out=x)           # x += ff(ln2(x))
            return x
        return step


class _Sublayer:
    """One sublayer of a block as the reversible stack calls it: ``f(x)`` and the parameters it uses."""

    def __init__(self, fn, modules, cache):
        self.fn, self.cache = fn, cache
        self.params = [p for m in modules if m is not None for p in m.parameters()]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x, self.cache)


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
        if cfg.loss_modules:
            # the "sparse loss": a multiplicative layer (chapter 4) to the vocabulary, padded to a multiple of S
            padded = -(-cfg.vocab_size // cfg.loss_modules) * cfg.loss_modules
            self.head = MultiplicativeDense(cfg.d_model, padded, cfg.loss_modules)
        else:
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
        if cache is not None:
            cache.layers[0].check_batch(B)                              # before any layer writes into it
        x = self.tok_emb(idx) + self.pos_emb.weight[past:past + T]      # (B, T, C): positions past..past+T-1
        if self.training and self.cfg.dropout:
            x = self.drop(x)
        if self.cfg.reversible:
            x = self._reversible_blocks(x, cache)
        else:
            for i, block in enumerate(self.blocks):
                x = block(x, None if cache is None else cache.layers[i])
        logits = self.head(self.ln_f(x))[..., :self.cfg.vocab_size]    # (B, T, vocab)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten())
        return logits, loss

    def reversible_sublayers(self, cache: ModelCache | None = None) -> list[_Sublayer]:
        """The model's sublayers in order (each block's attention, then its FF), as the reversible stack runs them."""
        subs = []
        for i, block in enumerate(self.blocks):
            c = None if cache is None else cache.layers[i]
            subs.append(_Sublayer(block.attention_sublayer, [block.ln1, block.attn], c))
            subs.append(_Sublayer(block.ff_sublayer, [block.ln2, block.ff, block.sru], c))
        return subs

    def _reversible_blocks(self, x: torch.Tensor, cache: ModelCache | None) -> torch.Tensor:
        """Both streams start as ``x``; each sublayer adds to one and the streams swap; the output is their mean.
        Training keeps only the last streams (:class:`~sparse_tutorial.layers.reversible.ReversibleStack`);
        ``memory_saving = False`` runs the same computation with ordinary autograd (the tests compare the two)."""
        subs = self.reversible_sublayers(cache)
        if self.memory_saving and cache is None:
            a, b = ReversibleStack(subs)(x, x)
        else:
            a, b = reversible_forward(subs, x, x)
        return (a + b) / 2                                              # (B, T, C)

    #: with ``cfg.reversible``: rebuild activations in the backward pass (True) or keep them as usual (False)
    memory_saving: bool = True

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
        if not greedy:
            real_number("temperature", temperature, 0.0, low_open=True, hint=" (or use greedy=True)")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
            raise ValueError(f"top_k must be a positive integer (keep the k likeliest tokens) or None (all), "
                             f"got top_k={top_k!r}")
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
