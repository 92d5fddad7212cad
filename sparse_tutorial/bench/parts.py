"""``bench parts``: where the time of one block's decoding step goes, part by part, with the bytes of each.

For a block of the paper's shapes (:data:`~.block.BLOCK_SHAPES`), one token against a cache of ``cache_len``
positions, each part is timed on its own, cold cache, as the PyTorch operations the block runs: the sparse FF's
controller, its ``W1`` rows and its ``W2`` rows (and the fused kernel doing all three in one call), the dense FF,
the dense QKV projection, the multiplicative layer and the convolution of the sparse QKV, the attention over the
cache, the output projection. Beside each time, the bytes the part reads and the rate ``bytes / time``: a part
that reads near the machine's bandwidth is at its floor; one far below it pays fixed costs.
"""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F

from ..layers.attention import CausalSelfAttention
from ..layers.qkv import ConvQKVAttention
from ..layers.sparse_ff import SparseFF
from ..model import Block
from .block import BLOCK_VARIANTS, block_config
from .harness import check_choice, free_memory, interleaved, machine_columns, positive
from .paths import available_paths

__all__ = ["block_parts"]


def _ff_parts(ff, x: torch.Tensor) -> dict[str, tuple[object, float]]:
    """name -> (callable, bytes read) for the block's FF layer, one token ``x`` (1, d)."""
    f32 = 4
    if not isinstance(ff, SparseFF):
        nbytes = sum(p.numel() for p in ff.parameters()) * f32
        return {"dense FF": (lambda: ff(x), nbytes)}
    c = ff.controller
    v = x[0]
    idx = ff.selected(x)[0]                                         # (n_blocks,) the units this token picks
    act = torch.mv(ff.w1.index_select(0, idx), v).relu_()
    d, n = ff.d_model, ff.n_blocks
    parts = {
        "controller": (lambda: torch.addmv(c.c2.bias, c.c2.weight, torch.mv(c.c1.weight, v)),
                       (c.c1.weight.numel() + c.c2.weight.numel() + c.c2.bias.numel()) * f32),
        "W1 rows": (lambda: torch.mv(ff.w1.index_select(0, idx), v), n * d * f32),
        "W2 rows": (lambda: F.embedding_bag(idx.unsqueeze(0), ff.w2, per_sample_weights=act.unsqueeze(0),
                                            mode="sum"), (n + 1) * d * f32),
    }
    if "fused" in available_paths():
        parts["sparse FF, fused (all three)"] = (lambda: ff.decode(x, path="fused"),
                                                 sum(b for _, b in parts.values()))
    return parts


def _attention_parts(attn, x3: torch.Tensor, cache_len: int) -> dict[str, tuple[object, float]]:
    """name -> (callable, bytes read) for the block's attention, one token ``x3`` (1, 1, d)."""
    f32 = 4
    d = x3.shape[-1]
    if isinstance(attn, CausalSelfAttention):
        H = attn.n_heads
        q, k, v = (t.expand(1, H, 1, d // H).contiguous() for t in attn.heads(x3))
        y = torch.zeros(1, 1, d)
        parts = {"QKV projection": (lambda: attn.qkv(x3), attn.qkv.weight.numel() * f32),
                 "output projection": (lambda: attn.proj(y), attn.proj.weight.numel() * f32)}
    elif isinstance(attn, ConvQKVAttention):
        S, M, lk = attn.n_modules, attn.d_module, attn.length_kernel
        H = S
        q = torch.randn(1, S, 1, M)
        with torch.no_grad():
            w, b = attn._merged_conv()
        full = torch.randn(1, M, lk, S)
        parts = {"multiplicative layer": (lambda: attn.mult.forward_modules(x3),
                                          (attn.mult.D.numel() + attn.mult.E.numel()) * f32),
                 "convolution": (lambda: F.conv2d(full, w, b, padding=(0, w.shape[-1] // 2)), w.numel() * f32)}
    else:                                   # another attention kind: the whole layer, no breakdown
        return {"attention (whole)": (lambda: attn(x3), sum(p.numel() for p in attn.parameters()) * f32)}
    hd = d // H
    kc, vc = torch.randn(1, H, cache_len + 1, hd), torch.randn(1, H, cache_len + 1, hd)
    q = torch.randn(1, H, 1, hd)
    parts["attention over the cache"] = (lambda: F.scaled_dot_product_attention(q, kc, vc),
                                         2 * (cache_len + 1) * d * f32)
    return parts


def block_parts(shape: str = "800m", variants=tuple(BLOCK_VARIANTS), *, cache_len: int = 128,
                repeats: int | None = None, warmup: int = 2) -> pd.DataFrame:
    """Time and bytes of every part of one block's decoding step, per variant: ``part``, ``µs``, ``MB``,
    ``GB/s`` (bytes / time) and ``share`` (the part's time over the sum of the parts of its variant)."""
    check_choice("shape", shape, {"800m", "17b", "tiny"})
    positive("cache_len", cache_len)
    repeats = (7 if shape == "17b" else 20) if repeats is None else repeats
    rows = []
    def parts_of(shape_, variant, length):
        cfg = block_config(shape_, variant)
        block = Block(cfg).eval()
        x3 = torch.randn(1, 1, cfg.d_model)
        return block, {**_attention_parts(block.attn, x3, length), **_ff_parts(block.ff, x3[0])}

    for variant in variants:
        check_choice("variant", variant, BLOCK_VARIANTS)
        with torch.inference_mode():
            block, parts = parts_of(shape, variant, cache_len)
            # each part's tiny twin runs after the cache flush, as the layer before it would in a model: the
            # code path is warm again, the measured part's weights are still cold (see harness.interleaved)
            _, twins = parts_of("tiny", variant, 8)
            t = interleaved({k: f for k, (f, _) in parts.items()}, repeats=repeats, warmup=warmup,
                            cold_cache=True, primes={k: f for k, (f, _) in twins.items()})
        total = sum(v for k, v in t.items() if "all three" not in k)
        for k, (_, nbytes) in parts.items():
            rows.append({"shape": shape, "variant": variant, "part": k, "µs": t[k] * 1e6, "MB": nbytes / 1e6,
                         "GB/s": nbytes / t[k] / 1e9, "share": t[k] / total if "all three" not in k else None,
                         **machine_columns()})
        del block, parts
        free_memory()
    return pd.DataFrame(rows)
