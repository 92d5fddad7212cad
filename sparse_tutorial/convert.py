"""Turn a trained dense-FF model into a sparse-FF one, instead of training the sparse model from scratch (chapter 3).

A dense FF layer has ``d_ff`` units; a sparse one keeps one unit in each block of ``N``. :func:`dense_to_sparse`
makes the blocks and the controller from what the dense model has learned, in three steps per layer:

1. **Record** the FF inputs ``h`` (after the block's LayerNorm) and the units' pre-activations
   ``a = h W1^T + b1`` on ``n_tokens`` training tokens.
2. **Group** the units into blocks of ``N`` that rarely fire together (:func:`group_units`). A block keeps one
   unit per token, so two units that are often positive for the same token should sit in different blocks; this
   is the opposite of the grouping a mixture of experts wants (MoEfication puts co-firing units in one expert).
3. **Fit the controller** (:func:`fit_controller`): the low-rank map ``h -> c + h C1 C2`` closest, in least
   squares, to the pre-activations, so the argmax of each block starts at the unit the dense layer would have
   used most. The rows of ``W1^T`` and ``W2`` are copied in block order; the dense layer's first bias ``b1`` has no
   place in the paper's layer (it has none) and is dropped, which the fine-tuning then absorbs.

Everything else (embeddings, attention, LayerNorms, the head) is copied. The converted model is then trained
further with the sparse layer's own recipe; the quality study compares that with training the sparse model from
scratch for the same total number of steps.
"""
from __future__ import annotations

import torch

from .data import TextData
from .layers.dense import DenseFF
from .layers.sparse_ff import LowRankController, SparseFF
from .model import ModelConfig, TransformerLM

__all__ = ["group_units", "fit_controller", "ff_activations", "dense_to_sparse"]


def group_units(active: torch.Tensor, block_size: int) -> torch.Tensor:
    """A permutation of the ``d_ff`` units, block after block, that keeps co-firing units apart.

    ``active`` ``(n, d_ff)``: whether each unit fired (pre-activation > 0) on each of ``n`` tokens. Greedy, most
    often active unit first: each unit goes to the block, among those with room, whose members fire together with
    it least often (ties: the emptier block, then the first). Returns ``order`` ``(d_ff,)``: block ``j`` is
    ``order[j N : (j + 1) N]``.
    """
    d_ff = active.shape[1]
    if block_size < 1 or d_ff % block_size:
        raise ValueError(f"block_size must divide d_ff={d_ff}, got block_size={block_size}")
    a = active.to(torch.float64)
    co = a.t() @ a / max(1, a.shape[0])                                  # (d_ff, d_ff) co-firing frequencies
    n_blocks = d_ff // block_size
    load = torch.zeros(n_blocks, d_ff, dtype=torch.float64)              # co-firing of each block with each unit
    members: list[list[int]] = [[] for _ in range(n_blocks)]
    for u in co.diagonal().argsort(descending=True, stable=True).tolist():
        room = [b for b in range(n_blocks) if len(members[b]) < block_size]
        b = min(room, key=lambda j: (float(load[j, u]), len(members[j]), j))
        members[b].append(u)
        load[b] += co[u]
    return torch.tensor([u for block in members for u in block])


def fit_controller(h: torch.Tensor, a: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rank-``rank`` least squares ``a ~ c + h C1 C2`` (reduced-rank regression).

    ``h`` ``(n, d)``, ``a`` ``(n, d_ff)``. Solves the full-rank least squares, then keeps the top ``rank``
    directions of its fitted values. Returns ``C1`` ``(d, rank)``, ``C2`` ``(rank, d_ff)`` and ``c`` ``(d_ff,)``.
    """
    h_mean, a_mean = h.mean(0), a.mean(0)
    hc, ac = (h - h_mean).double(), (a - a_mean).double()
    w = torch.linalg.lstsq(hc, ac).solution                              # (d, d_ff)
    _, _, vh = torch.linalg.svd(hc @ w, full_matrices=False)             # directions of the fitted values
    v = vh[:rank].t()                                                    # (d_ff, rank)
    c1, c2 = (w @ v).float(), v.t().float()                              # W ~ (W V) V^T
    c = (a_mean.double() - h_mean.double() @ (w @ v @ v.t())).float()
    return c1, c2, c


@torch.no_grad()
def ff_activations(model: TransformerLM, data: TextData, n_tokens: int, *, seed: int = 0
                   ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Per block: the FF inputs ``h`` ``(n, d)`` (the block's second LayerNorm's output) and, for a dense FF, its
    units' pre-activations ``a = h W1^T + b1`` ``(n, d_ff)`` (None for another kind), on about ``n_tokens``
    training tokens (random windows, ``seed``)."""
    ctx = model.cfg.context_length
    g = torch.Generator().manual_seed(seed)
    x, _ = data.get_batch("train", max(1, -(-n_tokens // ctx)), ctx, generator=g)
    model.eval()
    records: list = []
    hooks = [b.ln2.register_forward_hook(lambda m, inp, out: records.append(out.reshape(-1, out.shape[-1])))
             for b in model.blocks]
    try:
        model(x)
    finally:
        for hk in hooks:
            hk.remove()
    return [(h, b.ff.w1(h) if isinstance(b.ff, DenseFF) else None) for h, b in zip(records, model.blocks)]


@torch.no_grad()
def dense_to_sparse(model: TransformerLM, data: TextData, block_size: int, *, n_tokens: int = 8192,
                    **sparse_overrides) -> TransformerLM:
    """A sparse-FF copy of the trained dense-FF ``model``: blocks from :func:`group_units`, the controller from
    :func:`fit_controller`, every other weight copied. ``sparse_overrides`` go to the new :class:`ModelConfig`
    (for example ``ff_hard_prob``)."""
    if not all(isinstance(b.ff, DenseFF) for b in model.blocks):
        raise ValueError("model must have dense FF layers (ModelConfig.ff='dense')")
    cfg = ModelConfig(**{**model.cfg.to_dict(), "ff": "sparse", "ff_block_size": block_size, **sparse_overrides})
    sparse = TransformerLM(cfg)
    missing, unexpected = sparse.load_state_dict(
        {k: v for k, v in model.state_dict().items() if ".ff." not in k}, strict=False)
    assert not unexpected and all(".ff." in k for k in missing), (missing, unexpected)
    for (h, a), old, new in zip(ff_activations(model, data, n_tokens), model.blocks, sparse.blocks):
        ff: SparseFF = new.ff
        order = group_units(a > 0, block_size)
        ff.w1.copy_(old.ff.w1.weight[order])                             # (d_ff, d): rows of W1^T, block order
        ff.w2.copy_(old.ff.w2.weight.t()[order])                         # (d_ff, d): rows of W2
        ff.b2.copy_(old.ff.w2.bias)
        if isinstance(ff.controller, LowRankController):
            c1, c2, c = fit_controller(h, a[:, order], ff.d_lowrank)
            ff.controller.c1.weight.copy_(c1.t())
            ff.controller.c2.weight.copy_(c2.t())
            ff.controller.c2.bias.copy_(c)
    return sparse
