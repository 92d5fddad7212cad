"""``bench block``: one Transformer block decoding one token with a cache, in the paper's four variants."""
from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import pick
from ..layers.attention import LayerCache
from ..model import Block, ModelConfig
from ..measure.timing import spread
from .harness import check_choice, free_memory, interleaved, machine_columns, positive, recording
from .paths import check_paths, sparse_ff_layers, use_path

__all__ = ["BLOCK_SHAPES", "BLOCK_VARIANTS", "STEPS", "PAPER_BLOCK_MS", "paper_speedup", "block_config", "block_decode",
           "main_rows", "path_table", "block_bytes", "bytes_table",
           "bytes_verdicts"]


#: The paper's decode benchmark shapes (plus a tiny one for tests). ``d_ff_qkv``: the wider FF the paper uses
#: with sparse QKV to keep the parameter count; ``qkv_modules``: S.
BLOCK_SHAPES = {
    "800m": dict(d_model=1024, n_heads=16, d_ff=4096, d_ff_qkv=6144, block_size=64, d_lowrank=None,
                 qkv_modules=16),
    "17b": dict(d_model=9216, n_heads=96, d_ff=40960, d_ff_qkv=65536, block_size=256, d_lowrank=32,
                qkv_modules=64),
    "tiny": dict(d_model=64, n_heads=4, d_ff=256, d_ff_qkv=384, block_size=16, d_lowrank=None, qkv_modules=8),
}
#: The four columns of the paper's decoding table: label -> (``ModelConfig.ff``, ``ModelConfig.qkv``), kinds of
#: :mod:`sparse_tutorial.layers.registry`.
BLOCK_VARIANTS = {"dense": ("dense", "dense"), "sparse FF": ("sparse", "dense"), "sparse QKV": ("dense", "conv"),
                  "sparse FF + QKV": ("sparse", "conv")}
#: The paper's reported per-decoder-block times (ms, CPU, batch 1): quoted, not measured here.
PAPER_BLOCK_MS = {
    "800m": {"dense": 5.9, "sparse FF": 3.1, "sparse QKV": 6.2, "sparse FF + QKV": 1.9},
    "17b": {"dense": 581.0, "sparse FF": 259.0, "sparse QKV": 554.0, "sparse FF + QKV": 14.0},
}


def paper_speedup(shape: str, variant: str) -> float:
    """The paper's speed-up of ``variant`` over dense, computed from its per-block times (:data:`PAPER_BLOCK_MS`).

    The one source of the paper's ratios in the benchmark's tables and the chapter's targets (the paper's text
    rounds some differently, e.g. 3.05x where its times give 5.9 / 1.9 = 3.11x). NaN where it reports none.
    """
    paper = PAPER_BLOCK_MS.get(shape, {})
    return paper["dense"] / paper[variant] if "dense" in paper and variant in paper else float("nan")


def block_config(shape: str, variant: str) -> ModelConfig:
    """The :class:`ModelConfig` of one block of ``shape`` ("800m", "17b", "tiny") in one of the four variants.

    With sparse QKV the FF is widened to ``d_ff_qkv`` (the paper keeps the parameter count that way); the
    sparse QKV is the multiplicative + convolution attention with ``S = qkv_modules``.
    """
    check_choice("shape", shape, BLOCK_SHAPES)
    check_choice("variant", variant, BLOCK_VARIANTS)
    s = BLOCK_SHAPES[shape]
    ff, qkv = BLOCK_VARIANTS[variant]
    sparse_qkv = qkv != "dense"
    return ModelConfig(vocab_size=2, context_length=1024, d_model=s["d_model"], n_heads=s["n_heads"],
                       n_layers=1, d_ff=s["d_ff_qkv"] if sparse_qkv else s["d_ff"], dropout=0.0,
                       ff=ff, ff_block_size=s["block_size"], d_lowrank=s["d_lowrank"], qkv=qkv,
                       qkv_modules=s["qkv_modules"] if sparse_qkv else None)


#: how a block's decoding step runs: ``eager`` calls the block (its modules, as the model's forward does),
#: ``lean`` its bound step (:meth:`Block.step_function`) on the stream the lean decoder would run it on: the
#: NumPy stream (``step.numpy``) where the block offers it, else the PyTorch one
STEPS = ("eager", "lean")


class _BlockStep:
    """One block decoding one token against a cache of ``cache_len`` positions, the cache reset each call;
    ``step`` one of :data:`STEPS`."""

    def __init__(self, cfg: ModelConfig, cache_len: int, n_inputs: int = 8, step: str = "eager"):
        self.block = Block(cfg).eval()
        with torch.inference_mode():                # fill the cache by prefilling random positions
            self.cache = LayerCache()
            self.block(torch.randn(1, cache_len, cfg.d_model), self.cache)
            self.block(torch.randn(1, 1, cfg.d_model), self.cache)    # one step, so the buffers have room
            if step == "lean":                      # the lean step holds the buffers: they must not move
                self.cache.reserve(cache_len + 1, tuple(n for n in ("conv_inputs",) if n in self.cache.state))
            # the state after that step: its per-position buffers (the convolution's inputs) have room too, as
            # in real decoding, where a buffer grows by doubling and a step rarely copies the history
            self.saved_state = dict(self.cache.state)
        self.cache.truncate(cache_len)
        self.cache_len = cache_len
        self.xs = torch.randn(n_inputs, 1, 1, cfg.d_model)              # (n_inputs, B=1, T=1, C)
        self.i = 0
        self.params = sum(p.numel() for p in self.block.parameters())
        self.step = step
        #: the decode path set last (:class:`_OnPath`), and the lean step bound for each path
        self.path: str | None = None
        self._lean: dict = {}
        #: the stream the last lean call ran on, "numpy" or "pytorch" (None before it; eager steps have none)
        self.stream: str | None = None

        self.has_sparse_ff = bool(sparse_ff_layers(self.block))

    def reset_cache(self) -> None:
        """Back to the filled cache, so the next step writes the same position again."""
        self.cache.truncate(self.cache_len)         # the new position is written in place, as in real decoding
        self.cache.state = dict(self.saved_state)

    def __call__(self):
        self.reset_cache()
        self.i = (self.i + 1) % len(self.xs)
        if self.step == "eager":
            return self.block(self.xs[self.i], self.cache)
        fn = self._lean.get(self.path)
        if fn is None:                              # bound once per path (the warm-up calls), then reused
            fn = self._lean[self.path] = self.block.step_function(self.cache, 1)
        x = self.xs[self.i].view(1, -1)                                 # (1, C)
        if fn.numpy is None:
            self.stream = "pytorch"
            return fn(x, self.cache_len)
        self.stream = "numpy"
        stream = x.numpy().copy()                   # the NumPy stream, updated in place: a fresh copy each call
        return torch.from_numpy(fn.numpy(stream, self.cache_len))


class _OnPath:
    """A :class:`_BlockStep` whose sparse FF decodes by ``path`` (one block, timed on several paths)."""

    def __init__(self, step: _BlockStep, path: str):
        self.step, self.path = step, path
        self.ff = sparse_ff_layers(step.block)[0]
        #: the path the block's sparse FF took in the last call
        self.taken: str | None = None

    def __call__(self):
        if self.step.path != self.path:             # walking the modules costs microseconds: only on a change
            use_path(self.step.block, self.path)
            self.step.path = self.path
        out = self.step()
        self.taken = self.ff.last_decode_path
        return out


def _timed_steps(step: _BlockStep, variant: str, paths: list[str]) -> dict[tuple[str, str | None], object]:
    """(variant, path) -> callable: one per path for a block with a sparse FF, else one with path None."""
    if not step.has_sparse_ff:
        return {(variant, None): step}
    return {(variant, p): _OnPath(step, p) for p in paths}


def block_decode(shape: str = "800m", variants: Sequence[str] = tuple(BLOCK_VARIANTS), *,
                 cache_len: int = 128, repeats: int | None = None, warmup: int = 2,
                 interleave_limit_gb: float = 1.0, progress: bool = True,
                 paths: Sequence[str] | str | None = None, step: str = "eager") -> pd.DataFrame:
    """Time one block decoding one token (batch 1, a KV cache of ``cache_len`` positions) per variant.

    Weights are random (the cost does not depend on their values). When all variants together are under
    ``interleave_limit_gb`` they are built at once and timed interleaved; otherwise (the 17B shape, about
    5 GB per variant) each is built, timed and freed before the next. Cold cache before every call.
    Columns include the paper's reported per-block time and ratio beside the measured ones.

    ``paths``: the sparse FF decode paths timed (:mod:`.paths`; default the best available). A variant with a
    sparse FF gets one row per path (same block, timed in the same round-robin), the others one row, path None.
    ``step``: ``"eager"`` calls the block as the model's forward does, ``"lean"`` its bound step
    (:meth:`Block.step_function`), every variant alike (:data:`STEPS`; the ``step`` column says which).
    """
    paths = check_paths(paths)
    check_choice("step", step, STEPS)
    check_choice("shape", shape, BLOCK_SHAPES)
    variants = list(variants)
    if not variants:
        raise ValueError("variants must not be empty")
    for v in variants:
        check_choice("variant", v, BLOCK_VARIANTS)
    positive("cache_len", cache_len)
    if repeats is None:
        repeats = pick(default=30, fast=8) if shape != "17b" else pick(default=7, fast=3)
    s = BLOCK_SHAPES[shape]
    approx_gb = 4 * (4 * s["d_model"] ** 2 + 2 * s["d_model"] * s["d_ff_qkv"]) / 1e9 * len(variants)
    times, params, taken, samples = {}, {}, {}, {}

    def timed_and_primes(v, block_step):
        fns = _timed_steps(block_step, v, paths)
        tiny = _BlockStep(block_config("tiny", v), 8, step=step)
        return fns, {key: _OnPath(tiny, key[1]) if key[1] else tiny for key in fns}

    if approx_gb <= interleave_limit_gb:
        fns, primes = {}, {}
        for v in variants:
            block_step = _BlockStep(block_config(shape, v), cache_len, step=step)
            params[v] = block_step.params
            f, p = timed_and_primes(v, block_step)
            fns.update(f)
            primes.update(p)
        with recording() as samples:
            times = interleaved(fns, repeats=repeats, warmup=warmup, cold_cache=True, primes=primes,
                                progress=f"block {shape}" if progress else None)
        taken = {k: getattr(f, "taken", None) for k, f in fns.items()}
        mode = "interleaved"
        del fns, primes
    else:
        mode = "one variant at a time"
        for v in tqdm(variants, desc=f"block {shape}", disable=not progress):
            block_step = _BlockStep(block_config(shape, v), cache_len, step=step)
            params[v] = block_step.params
            fns, primes = timed_and_primes(v, block_step)
            with recording() as rec:
                times.update(interleaved(fns, repeats=repeats, warmup=warmup, cold_cache=True, primes=primes))
            samples.update(rec)
            taken.update({k: getattr(f, "taken", None) for k, f in fns.items()})
            del block_step, fns, primes
            free_memory()
    free_memory()
    base = times.get(("dense", None))
    paper = PAPER_BLOCK_MS.get(shape, {})
    rows = []
    for (v, path), seconds in times.items():
        cfg = block_config(shape, v)
        row = {"shape": shape, "variant": v, "path": path, "step path": taken.get((v, path)), "d_ff": cfg.d_ff,
               "params (M)": params[v] / 1e6,
               "ms per token": seconds * 1e3, "IQR / median": spread(samples[(v, path)]),
               "speed-up": base / seconds if base else float("nan"),
               "paper ms": paper.get(v, float("nan")),
               "paper speed-up": paper_speedup(shape, v),
               "timing": mode, "cache_len": cache_len, "step": step}
        rows.append({**row, **machine_columns()})
    return pd.DataFrame(rows)


def main_rows(df: pd.DataFrame) -> pd.DataFrame:
    """The rows of a table with a ``path`` column that were timed on its first path (or on none): one row per
    variant, the table the functions give by default."""
    first = df["path"].dropna()
    keep = df["path"].isna() | (df["path"] == (first.iloc[0] if len(first) else None))
    return df[keep].reset_index(drop=True)


def path_table(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`block_decode`'s rows as a narrow table: one row per variant, ms per token and speed-up over dense
    (``x``) for every path timed (a variant without a sparse FF has one time, shown under every path), the
    paper's speed-up, and the largest spread of the variant's timings (``IQR``: interquartile range over median)."""
    paths = list(dict.fromkeys(df["path"].dropna()))
    out = []
    for v, part in df.groupby("variant", sort=False):
        row = {"variant": v}
        for p in paths:
            hit = part[part["path"] == p] if part["path"].notna().any() else part
            row[f"{p} ms"] = float(hit["ms per token"].iloc[0])
            row[f"{p} x"] = float(hit["speed-up"].iloc[0])
        row["paper x"] = float(part["paper speed-up"].iloc[0])
        if "IQR / median" in part:
            row["IQR"] = float(part["IQR / median"].max())
        out.append(row)
    return pd.DataFrame(out).set_index("variant")


def block_bytes(shape: str, variant: str, cache_len: int = 128) -> dict[str, float]:
    """MB one block of ``shape`` reads to decode one token (batch 1, float32), part by part.

    Counted from the block's own parameters, built on PyTorch's ``meta`` device (shapes without memory, so the
    17B block costs nothing): ``attention`` (every attention weight: the QKV and output projections, or the
    multiplicative layer and the convolutions), ``FF`` (the dense FF's weights, or the sparse FF's selected rows:
    ``1/N`` of ``W1`` and ``W2``, plus ``b2``), ``controller`` (read in full: it scores every unit), ``KV cache``
    (the keys and values of ``cache_len`` cached positions and the new one) and ``layer norms``.
    """
    check_choice("shape", shape, BLOCK_SHAPES)
    check_choice("variant", variant, BLOCK_VARIANTS)
    positive("cache_len", cache_len)
    cfg = block_config(shape, variant)
    with torch.device("meta"):
        block = Block(cfg)
    counts = dict.fromkeys(["attention", "FF", "controller", "KV cache", "layer norms"], 0.0)
    for name, p in block.named_parameters():
        if name.startswith("attn."):
            counts["attention"] += p.numel()
        elif name.startswith("ff.controller."):
            counts["controller"] += p.numel()
        elif name in ("ff.w1", "ff.w2"):                 # the sparse FF's rows: one unit of every block of N
            counts["FF"] += p.numel() / cfg.ff_block_size
        elif name.startswith("ff."):
            counts["FF"] += p.numel()
        else:
            counts["layer norms"] += p.numel()
    counts["KV cache"] = 2 * (cache_len + 1) * cfg.d_model    # K and V of every position, the new one included
    mb = {k: 4 * v / 1e6 for k, v in counts.items()}
    mb["total"] = sum(mb.values())
    return mb


def bytes_table(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`block_decode`'s main rows (:func:`main_rows`) with each variant's bytes per token, part by part
    (:func:`block_bytes`, MB; the layer norms' few kB only in the total), the speed-up those bytes alone allow (``bytes x``: dense MB / variant MB), the
    measured speed-up and its share of the bytes limit."""
    rows = []
    for _, r in main_rows(df).iterrows():
        mb = block_bytes(r["shape"], r["variant"], int(r["cache_len"]))
        mb.pop("layer norms")                        # a few kB; counted in the total
        rows.append({"variant": r["variant"], **mb})
    out = pd.DataFrame(rows).set_index("variant").add_suffix(" MB")
    dense_mb = out.loc["dense", "total MB"] if "dense" in out.index else float("nan")
    out["bytes x"] = dense_mb / out["total MB"]
    out["measured x"] = main_rows(df).set_index("variant")["speed-up"]
    out["share of bytes limit"] = out["measured x"] / out["bytes x"]
    return out


def bytes_verdicts(df: pd.DataFrame, name: str) -> list[str]:
    """One sentence per sparse variant of a :func:`block_decode` run: the speed-up its bytes allow, the one
    measured, and its largest read (for the chapter to print under :func:`bytes_table`)."""
    t = bytes_table(df)
    parts = ["attention MB", "FF MB", "controller MB", "KV cache MB"]
    lines = []
    for v, r in t.drop(index="dense", errors="ignore").iterrows():
        top = r[parts].astype(float).idxmax()
        lines.append(f"{name} {v}: its bytes allow {r['bytes x']:.1f}x, it measured {r['measured x']:.2f}x "
                     f"({r['share of bytes limit']:.2f} of that); its largest read is the "
                     f"{top.removesuffix(' MB')} ({r[top]:.2f} of {r['total MB']:.2f} MB).")
    return lines
