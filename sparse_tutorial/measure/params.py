"""Where a Transformer's parameters live, and what a dense FF layer costs at batch size ``B``.

Two kinds of accounting, both from shapes alone:

* **parameters** of one pre-LayerNorm block (attention Q, K, V, O; the FF layer; two LayerNorms) and of a
  whole :class:`~sparse_tutorial.model.TransformerLM`, by formula, checked against real modules by
  :func:`count_block_params` / :func:`count_model_params` (and in ``tests/test_params.py``);
* **work and traffic** of the dense FF for ``B`` tokens at once: FLOPs, bytes of weights and of
  activations, and their ratio, the *arithmetic intensity* a roofline plot puts on its x-axis.

Formulas (``d = d_model``, biases included, as in ``nn.Linear``):

    attention  = 4 d^2 + 4 d          (Q, K, V and output projections)
    FF         = 2 d d_ff + d_ff + d  (W1, b1, W2, b2)
    LayerNorm  = 2 d each, two per block
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .._checks import positive_int
from .costs import dense_ff_cost

__all__ = [
    "BlockShape", "BlockParams", "PAPER_800M", "PAPER_17B",
    "attention_params", "ff_params", "layernorm_params", "block_params", "model_params",
    "count_block_params", "count_model_params", "shape_of", "param_table",
    "ff_flops", "ff_bytes", "ff_intensity", "roofline_seconds",
]


@dataclass(frozen=True)
class BlockShape:
    """The shape of one Transformer block: enough to count its parameters."""

    name: str
    d_model: int
    d_ff: int
    n_heads: int

    def __post_init__(self):
        for field_name in ("d_model", "d_ff", "n_heads"):
            positive_int(field_name, getattr(self, field_name))
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={self.d_model}, "
                             f"n_heads={self.n_heads}")


#: The paper's 800M model (C4): the decoder-block shape of its dense baseline.
PAPER_800M = BlockShape("paper 800M", d_model=1024, d_ff=4096, n_heads=16)
#: The paper's 17B shape, the one its decoding benchmark times.
PAPER_17B = BlockShape("paper 17B", d_model=9216, d_ff=40960, n_heads=96)


@dataclass(frozen=True)
class BlockParams:
    """Parameters of one block, split by where they live."""

    attention: int   # Q, K, V, O weights and biases
    ff: int          # W1, b1, W2, b2
    layernorm: int   # the block's two LayerNorms

    @property
    def total(self) -> int:
        return self.attention + self.ff + self.layernorm

    @property
    def ff_share(self) -> float:
        """Fraction of the block's parameters in the FF layer."""
        return self.ff / self.total


def attention_params(d_model: int) -> int:
    """Dense multi-head attention: Q, K, V and output projections, ``d x d`` each, with biases.

    The number of heads does not change it: heads split ``d`` into slices.
    """
    d = positive_int("d_model", d_model)
    return 4 * d * d + 4 * d


def ff_params(d_model: int, d_ff: int) -> int:
    """``relu(x W1 + b1) W2 + b2``: ``2 d d_ff + d_ff + d``."""
    positive_int("d_model", d_model)
    positive_int("d_ff", d_ff)
    return dense_ff_cost(d_model, d_ff).weight_params


def layernorm_params(d_model: int) -> int:
    """One LayerNorm: a gain and a bias per feature."""
    return 2 * positive_int("d_model", d_model)


def block_params(d_model: int, d_ff: int) -> BlockParams:
    """One pre-LayerNorm block (dense attention, dense FF) by formula."""
    return BlockParams(attention=attention_params(d_model), ff=ff_params(d_model, d_ff),
                       layernorm=2 * layernorm_params(d_model))


def model_params(cfg) -> dict[str, int]:
    """A dense :class:`~sparse_tutorial.model.TransformerLM` by formula (the output head is tied).

    Returns ``{"embeddings", "blocks", "final LayerNorm", "total"}``.
    """
    if cfg.ff != "dense" or cfg.qkv != "dense":
        raise ValueError(f"model_params counts dense models only, got ff={cfg.ff!r}, qkv={cfg.qkv!r}")
    emb = (cfg.vocab_size + cfg.context_length) * cfg.d_model
    blocks = cfg.n_layers * block_params(cfg.d_model, cfg.d_ff).total
    final_ln = layernorm_params(cfg.d_model)
    return {"embeddings": emb, "blocks": blocks, "final LayerNorm": final_ln,
            "total": emb + blocks + final_ln}


def _numel(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def count_block_params(block: nn.Module) -> BlockParams:
    """Count the parameters of a real :class:`~sparse_tutorial.model.Block` instance, by sub-module."""
    for attr in ("attn", "ff", "ln1", "ln2"):
        if not hasattr(block, attr):
            raise ValueError(f"block must be a sparse_tutorial.model.Block (no attribute {attr!r}), "
                             f"got {type(block).__name__}")
    return BlockParams(attention=_numel(block.attn), ff=_numel(block.ff),
                       layernorm=_numel(block.ln1) + _numel(block.ln2))


def count_model_params(model: nn.Module) -> dict[str, int]:
    """Count a real :class:`~sparse_tutorial.model.TransformerLM`, in the keys of :func:`model_params`."""
    emb = model.tok_emb.weight.numel() + model.pos_emb.weight.numel()
    blocks = sum(_numel(b) for b in model.blocks)
    final_ln = _numel(model.ln_f)
    total = model.num_params()   # parameters() yields the tied head weight once
    return {"embeddings": emb, "blocks": blocks, "final LayerNorm": final_ln, "total": total}


def shape_of(cfg, name: str) -> BlockShape:
    """The :class:`BlockShape` of a :class:`~sparse_tutorial.model.ModelConfig`."""
    return BlockShape(name, d_model=cfg.d_model, d_ff=cfg.d_ff, n_heads=cfg.n_heads)


def param_table(shapes, bytes_per_param: int = 4):
    """A pandas DataFrame, one row per :class:`BlockShape`: the parameter split of one block.

    Columns: d_model, d_ff, heads, attention (QKVO), FF, LayerNorm, block total, FF share,
    block MB (float32 bytes a batch-1 decoding step reads for this block).
    """
    import pandas as pd

    rows = []
    for s in shapes:
        if not isinstance(s, BlockShape):
            raise ValueError(f"shapes must hold BlockShape values, got {s!r}")
        p = block_params(s.d_model, s.d_ff)
        rows.append({"model": s.name, "d_model": s.d_model, "d_ff": s.d_ff, "heads": s.n_heads,
                     "attention (QKVO)": p.attention, "FF": p.ff, "LayerNorm": p.layernorm,
                     "block total": p.total, "FF share": p.ff_share,
                     "block MB": p.total * bytes_per_param / 1e6})
    return pd.DataFrame(rows).set_index("model")


# --------------------------------------------------------------------------------------------------
# The dense FF at batch size B: FLOPs, bytes, arithmetic intensity
# --------------------------------------------------------------------------------------------------


def ff_flops(d_model: int, d_ff: int, batch: int) -> int:
    """FLOPs of a dense FF call on ``batch`` tokens: two matmuls (2 FLOPs per multiply-add), biases, ReLU."""
    d, f, b = positive_int("d_model", d_model), positive_int("d_ff", d_ff), positive_int("batch", batch)
    return b * (2 * (2 * d * f) + f + d + f)


def ff_bytes(d_model: int, d_ff: int, batch: int, bytes_per_value: int = 4) -> dict[str, int]:
    """Bytes a dense FF call moves at least once: every weight, plus the activations of ``batch`` tokens.

    Activations: read ``x`` (d), write and read back the hidden ``h`` (2 d_ff), write ``y`` (d).
    Returns ``{"weights", "activations", "total"}``.
    """
    d, f, b = positive_int("d_model", d_model), positive_int("d_ff", d_ff), positive_int("batch", batch)
    positive_int("bytes_per_value", bytes_per_value)
    weights = ff_params(d, f) * bytes_per_value
    activations = b * (2 * d + 2 * f) * bytes_per_value
    return {"weights": weights, "activations": activations, "total": weights + activations}


def ff_intensity(d_model: int, d_ff: int, batch: int, bytes_per_value: int = 4) -> float:
    """Arithmetic intensity (FLOP per byte) of a dense FF call on ``batch`` tokens.

    At batch 1 it is about 2 FLOP per 4-byte weight, 0.5 FLOP/byte; it grows about linearly with the batch
    until the activations' bytes start to matter.
    """
    return ff_flops(d_model, d_ff, batch) / ff_bytes(d_model, d_ff, batch, bytes_per_value)["total"]


def roofline_seconds(flops: float, nbytes: float, peak_gflops: float, bandwidth_gbs: float) -> float:
    """The roofline model's time for a kernel: the slower of moving its bytes and doing its FLOPs.

    ``max(nbytes / bandwidth, flops / peak)``; a lower bound a real kernel approaches, never beats (unless
    its bytes come from a cache faster than the measured bandwidth).
    """
    if not peak_gflops > 0 or not bandwidth_gbs > 0:
        raise ValueError(f"peak_gflops and bandwidth_gbs must be > 0, got peak_gflops={peak_gflops!r}, "
                         f"bandwidth_gbs={bandwidth_gbs!r}")
    if flops < 0 or nbytes < 0:
        raise ValueError(f"flops and nbytes must be >= 0, got flops={flops!r}, nbytes={nbytes!r}")
    return max(nbytes / (bandwidth_gbs * 1e9), flops / (peak_gflops * 1e9))
