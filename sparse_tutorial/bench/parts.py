"""``bench parts``: where the time of one block's decoding step goes, part by part, with the bytes of each;
``bench qkv``: the convolution QKV's whole decoding step on each path, by width.

For a block of the paper's shapes (:data:`~.block.BLOCK_SHAPES`), one token against a cache of ``cache_len``
positions, each part is timed on its own, cold cache, as the PyTorch operations the block runs: the sparse FF's
controller, its ``W1`` rows and its ``W2`` rows (and the fused kernel doing all three in one call), the dense FF,
the dense QKV projection, the multiplicative layer and the convolution of the sparse QKV, the attention over the
cache, the output projection. Beside each time, the bytes the part reads and the rate ``bytes / time``: a part
that reads near the machine's bandwidth is at its floor; one far below it pays fixed costs. The whole block's step
is timed in the same round, so the table also says what the parts leave out (``rest of the block``: the layer
norms, the residual additions, the writes into the cache, reshapes and the cost of each call).

Each part is also timed warm (its weights in the cache, called again and again): what its arithmetic and its
calls cost when nothing waits for memory. A part's **floor** is the slower of two limits, its bytes at the
machine's streaming bandwidth and its warm time; the block's floor is the sum over the parts it runs, one after
another. :func:`block_floors` sets each variant's measured time beside its floor, and the speed-up over dense
measured beside the speed-up the two floors allow.
"""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn.functional as F

from ..layers.attention import CausalSelfAttention, LayerCache
from ..layers.qkv import ConvQKVAttention, modules_near_sqrt
from ..layers.sparse_ff import SparseFF
from .block import BLOCK_VARIANTS, _BlockStep, block_bytes, block_config
from .harness import check_choice, free_memory, interleaved, machine_columns, positive
from .machine import bandwidth
from .paths import available_paths, check_paths

__all__ = ["block_parts", "block_floors", "qkv_step", "WHOLE", "REST"]


#: The sparse FF's and the sparse QKV's parts as PyTorch operations, and the fused kernel that does all three in
#: one call.
_FF_THREE, _FF_FUSED = ("controller", "W1 rows", "W2 rows"), "sparse FF, fused (all three)"
_QKV_THREE = ("multiplicative layer", "convolution", "attention over the cache")
_QKV_FUSED = "sparse QKV, fused (all three)"


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
        parts[_FF_FUSED] = (lambda: ff.decode(x, path="fused"),
                                                 sum(b for _, b in parts.values()))
    return parts


def _attention_parts(attn, x3: torch.Tensor, cache_len: int,
                     step: _BlockStep | None = None) -> dict[str, tuple[object, float]]:
    """name -> (callable, bytes read) for the block's attention, one token ``x3`` (1, 1, d). With the block's
    ``step``, a convolution QKV layer also gets its fused step on the block's own cache, where it applies."""
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
        with torch.no_grad():                                          # the weights the step reads
            if d >= attn.CONV_MATMUL_MIN_D_MODEL:                      # three products: no zeros in V's
                conv_numel = sum(w.numel() for w, _ in attn._step_matrices())
            else:                                                      # the merged kernel
                conv_numel = attn._merged_conv()[0].numel()
        full = torch.randn(1, M, lk, S)                                # one position and its left context
        parts = {"multiplicative layer": (lambda: attn.mult.forward_modules(x3),
                                          (attn.mult.D.numel() + attn.mult.E.numel()) * f32),
                 "convolution": (lambda: attn.merged_qkv(full), conv_numel * f32)}
    else:                                   # another attention kind: the whole layer, no breakdown
        return {"attention (whole)": (lambda: attn(x3), sum(p.numel() for p in attn.parameters()) * f32)}
    hd = d // H
    kc, vc = torch.randn(1, H, cache_len + 1, hd), torch.randn(1, H, cache_len + 1, hd)
    q = torch.randn(1, H, 1, hd)
    parts["attention over the cache"] = (lambda: F.scaled_dot_product_attention(q, kc, vc),
                                         2 * (cache_len + 1) * d * f32)
    if isinstance(attn, ConvQKVAttention) and step is not None and attn.fused_unavailable(x3) is None:
        def fused_qkv():
            step.reset_cache()
            return attn(x3, step.cache)
        parts[_QKV_FUSED] = (fused_qkv, sum(nbytes for _, nbytes in parts.values()))
    return parts


#: The rows :func:`block_parts` adds to each variant's parts: the block's whole step, and what the parts leave out.
WHOLE, REST = "whole block", "rest of the block"


def block_parts(shape: str = "800m", variants=tuple(BLOCK_VARIANTS), *, cache_len: int = 128,
                repeats: int | None = None, warmup: int = 2, bandwidth_gbs: float | None = None) -> pd.DataFrame:
    """Time and bytes of every part of one block's decoding step, per variant: ``part``, ``µs`` (cold cache),
    ``MB``, ``GB/s`` (bytes / time), ``share`` (the part's time over the whole block's), ``warm µs`` (the part
    called again and again, its weights in the cache) and ``floor µs``: the slower of ``MB`` at
    ``bandwidth GB/s`` (the argument ``bandwidth_gbs``; default: measured here, :func:`~.machine.bandwidth`'s
    ``sum (read)``) and ``warm µs``. Both are medians of noisy timings, so a part can now and then measure faster
    than its floor.

    Each variant also gets two rows: ``whole block`` (the block's own step, timed in the same round as its
    parts; ``MB``: :func:`~.block.block_bytes`) and ``rest of the block``, the whole block less the parts the
    block runs (its sparse FF and sparse QKV on the paths the block took: a fused kernel, else its PyTorch parts): the
    layer norms, residual additions, cache writes, reshapes and the cost of each call. Those parts and the rest
    have shares that add up to 1; the others' share is empty. A negative rest means the parts, each timed cold on
    its own, took longer than the block does with all of them in one step. The whole block's ``floor µs`` is the
    sum of the floors of the parts it runs (the rest has none: its bytes are few and its calls could be fused
    away).
    """
    check_choice("shape", shape, {"800m", "17b", "tiny"})
    positive("cache_len", cache_len)
    if bandwidth_gbs is None:
        bandwidth_gbs = float(bandwidth().set_index("measure").loc["sum (read)", "GB/s"])
    elif isinstance(bandwidth_gbs, bool) or not isinstance(bandwidth_gbs, (int, float)) or not bandwidth_gbs > 0:
        raise ValueError(f"bandwidth_gbs must be a positive number of GB/s, got bandwidth_gbs={bandwidth_gbs!r}")
    repeats = (7 if shape == "17b" else 20) if repeats is None else repeats
    rows = []
    def parts_of(shape_, variant, length):
        step = _BlockStep(block_config(shape_, variant), length)          # the block, its cache filled
        x3 = torch.randn(1, 1, step.block.ln1.normalized_shape[0])       # one token (B=1, T=1, C)
        parts = {**_attention_parts(step.block.attn, x3, length, step), **_ff_parts(step.block.ff, x3[0])}
        return step, parts

    for variant in variants:
        check_choice("variant", variant, BLOCK_VARIANTS)
        # built outside inference mode, as a model is: weights made under it keep no version counter, so the
        # layers could not keep what they derive from them (the merged convolution) and would rebuild it per call
        with torch.no_grad():
            step, parts = parts_of(shape, variant, cache_len)
            # each part's tiny twin runs after the cache flush, as the layer before it would in a model: the
            # code path is warm again, the measured part's weights are still cold (see harness.interleaved)
            twin, twins = parts_of("tiny", variant, 8)
        with torch.inference_mode():
            t = interleaved({**{k: f for k, (f, _) in parts.items()}, WHOLE: step}, repeats=repeats,
                            warmup=warmup, cold_cache=True,
                            primes={**{k: f for k, (f, _) in twins.items()}, WHOLE: twin})
            # warm: each part in a loop of its own (called round-robin, the others' bytes would evict its own)
            warm = {k: interleaved({k: f}, repeats=repeats, warmup=warmup)[k] for k, (f, _) in parts.items()}
        # the parts the block ran: its sparse FF and sparse QKV each as the fused kernel or as the PyTorch parts
        # (the whole block is the last call of each round, so last_decode_path is the path the block took)
        left_out = set()
        for layer, three, fused in ((step.block.ff, _FF_THREE, _FF_FUSED), (step.block.attn, _QKV_THREE, _QKV_FUSED)):
            if fused in parts:
                left_out.update(three if getattr(layer, "last_decode_path", None) == "fused" else (fused,))
        run = [k for k in parts if k not in left_out]
        whole = t[WHOLE]
        sizes = {k: (t[k], nbytes) for k, (_, nbytes) in parts.items()}
        sizes[WHOLE] = (whole, block_bytes(shape, variant, cache_len)["total"] * 1e6)
        sizes[REST] = (whole - sum(t[k] for k in run), float("nan"))   # calls and small ops, not a stream
        # each part's floor: its bytes at the streaming bandwidth, or its warm time, whichever is slower
        floor = {k: max(nbytes / (bandwidth_gbs * 1e9), warm[k]) for k, (_, nbytes) in parts.items()}
        floor[WHOLE] = sum(floor[k] for k in run)
        for k, (seconds, nbytes) in sizes.items():
            rows.append({"shape": shape, "variant": variant, "part": k, "µs": seconds * 1e6, "MB": nbytes / 1e6,
                         "GB/s": nbytes / seconds / 1e9 if seconds > 0 else float("nan"),
                         "share": seconds / whole if k in run or k == REST else None,
                         "warm µs": warm[k] * 1e6 if k in warm else float("nan"),
                         "floor µs": floor[k] * 1e6 if k in floor else float("nan"),
                         "bandwidth GB/s": bandwidth_gbs, **machine_columns()})
        del step, parts
        free_memory()
    return pd.DataFrame(rows)


def block_floors(parts: pd.DataFrame) -> pd.DataFrame:
    """Each variant's whole block from :func:`block_parts`' table beside its floor, one row per shape and variant:
    ``µs`` (measured), ``floor µs`` (the sum of the floors of the parts the block runs), ``of floor``
    (measured over floor), ``speed-up`` (the same shape's dense block over this one, both measured) and
    ``speed-up at the floors`` (the dense block's floor over this one's: what the two could reach if every part
    ran at its limit), and ``furthest part`` with ``µs above floor``: the part the block runs whose time is
    furthest above its floor. The speed-ups are empty where the table has no dense block of that shape.
    """
    need = {"shape", "variant", "part", "µs", "floor µs"}
    if not isinstance(parts, pd.DataFrame) or not need <= set(parts.columns):
        raise ValueError(f"parts must be block_parts' table with columns {sorted(need)}, got "
                         f"{sorted(parts.columns) if isinstance(parts, pd.DataFrame) else type(parts).__name__}")
    whole = parts[parts["part"] == WHOLE].set_index(["shape", "variant"])[["µs", "floor µs"]]
    if whole.empty:
        raise ValueError("parts has no 'whole block' rows: pass the table block_parts returns")
    rows = []
    for (shape, variant), r in whole.iterrows():
        dense = whole.loc[(shape, "dense")] if (shape, "dense") in whole.index else None
        # the parts the block runs: those with a share (block_parts), less the rest of the block
        ran = parts[(parts["shape"] == shape) & (parts["variant"] == variant) & ~parts["part"].isin((WHOLE, REST))]
        if "share" in ran.columns:
            ran = ran[ran["share"].notna()]
        above = (ran["µs"] - ran["floor µs"]).reset_index(drop=True)
        worst = above.idxmax() if above.notna().any() else None
        rows.append({"shape": shape, "variant": variant, "µs": r["µs"], "floor µs": r["floor µs"],
                     "of floor": r["µs"] / r["floor µs"],
                     "speed-up": dense["µs"] / r["µs"] if dense is not None else float("nan"),
                     "speed-up at the floors": (dense["floor µs"] / r["floor µs"] if dense is not None
                                                else float("nan")),
                     "furthest part": ran["part"].iloc[worst] if worst is not None else None,
                     "µs above floor": above.iloc[worst] if worst is not None else float("nan")})
    return pd.DataFrame(rows)


class _QKVStep:
    """One convolution QKV layer decoding one token after ``cache_len`` cached positions, on ``path``."""

    def __init__(self, d_model: int, n_modules: int, cache_len: int, path: str):
        torch.manual_seed(0)
        self.layer = ConvQKVAttention(d_model, n_modules, decode_path="pytorch").eval()
        self.cache, self.cache_len = LayerCache(), cache_len
        self.xs = torch.randn(8, 1, 1, d_model)
        self.i = 0
        with torch.inference_mode():
            self.layer(torch.randn(1, cache_len, d_model), self.cache)       # the prompt: PyTorch's step
        self.layer.decode_path = "pytorch" if path == "pytorch" else "fused"
        self.layer.FUSED_MAX_D_MODEL = d_model                  # time the kernel beyond the width "auto" takes it

    def __call__(self):
        self.cache.truncate(self.cache_len)
        self.i = (self.i + 1) % len(self.xs)
        return self.layer(self.xs[self.i], self.cache)


def qkv_step(widths=(384, 1024, 2048), *, cache_len: int = 128, paths=None, repeats: int | None = None,
             warmup: int = 3) -> pd.DataFrame:
    """The convolution QKV layer's decoding step (one token, batch 1, ``cache_len`` cached positions) on each
    path, at each ``d_model`` in ``widths`` (``S`` the divisor nearest ``sqrt(d_model)``), cold cache.

    Columns: ``d_model``, ``S``, ``path``, ``µs per step``, ``speed-up vs pytorch`` and ``auto takes fused``
    (whether ``decode_path="auto"`` takes the kernel at this width: ``ConvQKVAttention.FUSED_MAX_D_MODEL``).
    The fused path is timed at every width, also beyond the one "auto" takes it at, to show where it stops
    paying.
    """
    paths = check_paths(paths if paths is not None else available_paths())   # default: every path here
    positive("cache_len", cache_len)
    repeats = 50 if repeats is None else repeats
    rows = []
    for d in widths:
        positive("d_model", d)
        S = modules_near_sqrt(d)
        steps = {p: _QKVStep(d, S, cache_len, p) for p in paths}
        twins = {p: _QKVStep(16, 4, 4, p) for p in paths}
        t = interleaved(steps, repeats=repeats, warmup=warmup, cold_cache=True, primes=twins)
        for p in paths:
            rows.append({"d_model": d, "S": S, "cache_len": cache_len, "path": p, "µs per step": t[p] * 1e6,
                         "speed-up vs pytorch": t["pytorch"] / t[p] if "pytorch" in t else None,
                         "auto takes fused": d <= ConvQKVAttention.FUSED_MAX_D_MODEL,
                         "step taken": steps[p].layer.last_decode_path, **machine_columns()})
    return pd.DataFrame(rows)
