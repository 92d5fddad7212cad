"""Chapter 5's measurements, as functions (the notebook calls them) and as a command that prints tables.

    python -m sparse_tutorial.bench bandwidth
    python -m sparse_tutorial.bench ff --d-model 4096 --d-ff 16384 --block-size 64 --d-lowrank 128
    python -m sparse_tutorial.bench ff --d-model 256 512 1024 2048 4096        # a width sweep, d_ff = 4 d_model
    python -m sparse_tutorial.bench block --shape 800m 17b
    python -m sparse_tutorial.bench generate --batch-sizes 1 8 64
    python -m sparse_tutorial.bench crossover                                  # where the gather path stops paying
    python -m sparse_tutorial.bench train
    python -m sparse_tutorial.bench quant

Add ``--json`` for one JSON object on stdout instead of the table, ``--threads N`` to set torch's thread
count (default 1, the setting of chapter 5; with two threads on a two-core machine that also runs other
programs, a batch-1 decoding step measured many times slower). Every command also writes its table as ``_build/bench/<command>.csv`` (``--out-dir`` to change).

Method, the same everywhere:

* warm-up calls first, then the median over ``repeats`` timed calls;
* the variants of one comparison live in the same process and are called round-robin (dense, sparse,
  dense, sparse, ...), so a noisy neighbour slows all of them alike; ratios come from one run;
* single layers and blocks are timed **with a cold cache**: before every timed call a buffer of four times
  the last-level cache is read, evicting the weights. A decoding model reads each layer's weights once per
  token and the other layers evict them before the next token, so a layer that fits in the cache must not be
  timed from the cache. Whole models are timed as they are (their own layers do the evicting);
* with one torch thread the clock is the thread's **CPU time** (``time.thread_time``), otherwise wall time.
  On a machine shared with other programs the operating system pauses our thread for theirs; wall time then
  grows with the length of a call (a 400 ms call is always interrupted, a 50 µs one rarely), which distorts
  ratios. A single thread's CPU time counts only the time it ran, memory stalls included;
* the machine (CPU model, torch threads, clock) goes into every result.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from .config import pick
from .costs import bytes_limit_ratio, dense_ff_cost, sparse_ff_cost
from .layers import DenseFF, SparseFF
from .model import Block, LayerCache, ModelConfig, TransformerLM, seed_config
from .timing import last_level_cache_bytes, machine_info

__all__ = [
    "BLOCK_SHAPES", "BLOCK_VARIANTS", "PAPER_BLOCK_MS", "MODEL_VARIANTS", "DEFAULT_CSV_DIR",
    "num_threads", "clock", "clock_name", "interleaved", "bandwidth", "ff_layer", "ff_sweep", "ff_rows", "block_config", "block_decode",
    "model_config", "generate_bench", "forward_tokens", "crossover", "train_step", "quant_bench",
    "write_csv", "target_table", "main",
]

#: Where the command writes its CSV tables (relative to the working directory).
DEFAULT_CSV_DIR = Path("_build") / "bench"


# --------------------------------------------------------------------------------------------------
# Timing machinery
# --------------------------------------------------------------------------------------------------


@contextmanager
def num_threads(n: int | None):
    """Run the body with ``torch.set_num_threads(n)`` (``None``: leave torch's setting), then restore it."""
    if n is None:
        yield
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"threads must be a positive integer or None, got threads={n!r}")
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def clock() -> Callable[[], float]:
    """The timer of every measurement: thread CPU time with one torch thread, else wall time (see above)."""
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def clock_name() -> str:
    return "thread CPU time" if torch.get_num_threads() == 1 else "wall time"


class _CacheFlusher:
    """Reads a buffer of ``4 x`` the last-level cache (at least 32 MB), evicting whatever was cached."""

    def __init__(self):
        llc = last_level_cache_bytes() or (32 << 20)
        self.buf = torch.ones(max(4 * llc, 32 << 20) // 4)

    def __call__(self) -> None:
        self.buf.sum()


def _check_counts(repeats: int, warmup: int) -> None:
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {name}={value!r}")


def interleaved(fns: dict[str, Callable[[], object]], *, repeats: int, warmup: int = 2,
                cold_cache: bool = False, primes: dict[str, Callable[[], object]] | None = None,
                progress: str | None = None) -> dict[str, float]:
    """Median seconds per call of each function, called round-robin, ``warmup`` untimed rounds first.

    With ``cold_cache`` the last-level cache is flushed (untimed) before every timed call. The flush also
    evicts what a real model keeps warm: the interpreter's and PyTorch's own data, touched by every layer.
    ``primes[name]``, a small twin of the measured layer (same code, tiny weights), is therefore called after
    the flush and before the timed call, as the previous layer of a real model would have been: the code path is
    warm again, the measured layer's weights are still cold.
    """
    _check_counts(repeats, warmup)
    flush = _CacheFlusher() if cold_cache else None
    samples: dict[str, list[float]] = {name: [] for name in fns}
    now = clock()
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in tqdm(range(repeats), desc=progress, disable=progress is None, leave=False):
            for name, fn in fns.items():
                if flush is not None:
                    flush()
                if primes and name in primes:
                    primes[name]()
                t0 = now()
                fn()
                samples[name].append(now() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def _machine_columns() -> dict[str, object]:
    m = machine_info()
    return {"cpu": m["cpu"], "threads": m["torch threads"], "clock": clock_name()}


def write_csv(df: pd.DataFrame, name: str, out_dir: str | Path | None = None) -> Path:
    """Write ``df`` to ``<out_dir>/<name>.csv`` atomically (temp file + rename); create the folder."""
    folder = Path(DEFAULT_CSV_DIR if out_dir is None else out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.csv"
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as f:
            df.to_csv(f, index=False)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    return value


def _free() -> None:
    gc.collect()


# --------------------------------------------------------------------------------------------------
# bandwidth
# --------------------------------------------------------------------------------------------------


def bandwidth(size_mb: int | None = None, repeats: int | None = None) -> pd.DataFrame:
    """The machine's memory bandwidth (GB/s) for a large copy (read + write) and a large sum (read only)."""
    size_mb = pick(default=512, fast=128) if size_mb is None else _positive("size_mb", size_mb)
    repeats = pick(default=10, fast=5) if repeats is None else _positive("repeats", repeats)
    n = size_mb * (1 << 20) // 4
    src = torch.ones(n)
    dst = torch.empty_like(src)
    t = interleaved({"copy": lambda: dst.copy_(src), "sum": lambda: src.sum()}, repeats=repeats, warmup=2)
    rows = [{"measure": "copy (read + write)", "GB/s": 2 * 4 * n / t["copy"] / 1e9, "MB": size_mb},
            {"measure": "sum (read)", "GB/s": 4 * n / t["sum"] / 1e9, "MB": size_mb}]
    return pd.DataFrame([{**r, **_machine_columns()} for r in rows])


# --------------------------------------------------------------------------------------------------
# ff: one FF layer, dense forward against SparseFF.decode
# --------------------------------------------------------------------------------------------------


def ff_layer(d_model: int, d_ff: int, block_size: int, d_lowrank: int | None = None, *, batch: int = 1,
             repeats: int | None = None, warmup: int = 3, n_inputs: int = 8,
             cold_cache: bool = True) -> dict[str, object]:
    """Seconds per call of a dense FF layer and of ``SparseFF.decode`` on ``batch`` tokens.

    ``n_inputs`` different random inputs are cycled, so the sparse layer gathers different rows from call
    to call, as in real decoding. ``limit ratio`` is dense bytes / sparse bytes of weights touched per token
    (:func:`sparse_tutorial.costs.bytes_limit_ratio`): the speed-up a bandwidth-bound layer could reach.
    """
    for name, v in (("d_model", d_model), ("d_ff", d_ff), ("block_size", block_size), ("batch", batch),
                    ("n_inputs", n_inputs)):
        _positive(name, v)
    repeats = pick(default=30, fast=8) if repeats is None else repeats
    dense = DenseFF(d_model, d_ff).eval()
    sparse = SparseFF(d_model, d_ff, block_size, d_lowrank).eval()      # validates block_size, d_lowrank
    xs = torch.randn(n_inputs, batch, d_model)                          # (n_inputs, B, d)

    def cycling(fn):
        state = {"i": 0}

        def call():
            state["i"] = (state["i"] + 1) % n_inputs
            return fn(xs[state["i"]])
        return call

    tiny_x = torch.randn(batch, 32)
    tiny_dense, tiny_sparse = DenseFF(32, 128).eval(), SparseFF(32, 128, 16).eval()
    primes = {"dense": lambda: tiny_dense(tiny_x), "sparse": lambda: tiny_sparse.decode(tiny_x)}
    t = interleaved({"dense": cycling(dense), "sparse": cycling(sparse.decode)}, repeats=repeats,
                    warmup=warmup, cold_cache=cold_cache, primes=primes)
    limit = bytes_limit_ratio(d_model, d_ff, block_size, sparse.d_lowrank)
    speedup = t["dense"] / t["sparse"]
    return {"d_model": d_model, "d_ff": d_ff, "block_size": block_size, "d_lowrank": sparse.d_lowrank,
            "batch": batch, "dense s": t["dense"], "sparse s": t["sparse"], "speed-up": speedup,
            "limit ratio": limit, "share of limit": speedup / limit,
            "dense MB": dense_ff_cost(d_model, d_ff).bytes() / 1e6,
            "sparse MB": sparse_ff_cost(d_model, d_ff, block_size, sparse.d_lowrank).bytes() / 1e6,
            **_machine_columns()}


def ff_sweep(widths: Sequence[int], *, ff_ratio: int = 4, block_size: int = 64,
             d_lowrank: int | None = None, batch: int = 1, repeats: int | None = None,
             cold_cache: bool = True, progress: bool = True) -> pd.DataFrame:
    """:func:`ff_layer` for every ``d_model`` in ``widths`` with ``d_ff = ff_ratio * d_model``."""
    widths = list(widths)
    if not widths:
        raise ValueError("widths must not be empty")
    rows = []
    for d in tqdm(widths, desc="FF layer widths", disable=not progress):
        rows.append(ff_layer(d, ff_ratio * d, block_size, d_lowrank, batch=batch, repeats=repeats,
                             cold_cache=cold_cache))
        _free()
    return pd.DataFrame(rows)


def ff_rows(d_model: int, rows: Sequence[int], *, ff_ratio: int = 4, block_size: int = 64,
            d_lowrank: int | None = None, repeats: int | None = None, warmup: int = 2,
            progress: bool = True) -> pd.DataFrame:
    """One FF layer on ``rows`` tokens at once: dense, sparse dense-masked (``forward``) and ``SparseFF.decode``
    (gathers up to ``block_size`` rows, beyond that one dense first-layer product and a gathered ``W2``).
    Warm cache (the rows of a batch share the weights)."""
    rows = [_positive("rows", r) for r in rows]
    if not rows:
        raise ValueError("rows must not be empty")
    repeats = pick(default=15, fast=5) if repeats is None else repeats
    d_ff = ff_ratio * _positive("d_model", d_model)
    dense = DenseFF(d_model, d_ff).eval()
    sparse = SparseFF(d_model, d_ff, block_size, d_lowrank).eval()
    out = []
    for r in tqdm(rows, desc=f"FF {d_model}: rows", disable=not progress):
        x = torch.randn(r, d_model)
        t = interleaved({"dense": lambda: dense(x), "masked": lambda: sparse(x),
                         "decode": lambda: sparse.decode(x)}, repeats=repeats, warmup=warmup)
        out.append({"d_model": d_model, "d_ff": d_ff, "block_size": block_size, "rows": r,
                    "dense ms": t["dense"] * 1e3, "masked ms": t["masked"] * 1e3, "decode ms": t["decode"] * 1e3,
                    "decode / masked": t["decode"] / t["masked"], "decode / dense": t["decode"] / t["dense"],
                    "masked / dense": t["masked"] / t["dense"], **_machine_columns()})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------------
# block: one Transformer block decoding one token with a cache, the paper's four variants
# --------------------------------------------------------------------------------------------------

#: The paper's decode benchmark shapes (plus a tiny one for tests). ``d_ff_qkv``: the wider FF the paper uses
#: with sparse QKV to keep the parameter count; ``qkv_modules``: S.
BLOCK_SHAPES = {
    "800m": dict(d_model=1024, n_heads=16, d_ff=4096, d_ff_qkv=6144, block_size=64, d_lowrank=None,
                 qkv_modules=16),
    "17b": dict(d_model=9216, n_heads=96, d_ff=40960, d_ff_qkv=65536, block_size=256, d_lowrank=32,
                qkv_modules=64),
    "tiny": dict(d_model=64, n_heads=4, d_ff=256, d_ff_qkv=384, block_size=16, d_lowrank=None, qkv_modules=8),
}
#: The four columns of the paper's decoding table.
BLOCK_VARIANTS = ("dense", "sparse FF", "sparse QKV", "sparse FF + QKV")
#: The paper's reported per-decoder-block times (ms, CPU, batch 1): quoted, not measured here.
PAPER_BLOCK_MS = {
    "800m": {"dense": 5.9, "sparse FF": 3.1, "sparse QKV": 6.2, "sparse FF + QKV": 1.9},
    "17b": {"dense": 581.0, "sparse FF": 259.0, "sparse QKV": 554.0, "sparse FF + QKV": 14.0},
}


def _check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {name}={value!r}")


def block_config(shape: str, variant: str) -> ModelConfig:
    """The :class:`ModelConfig` of one block of ``shape`` ("800m", "17b", "tiny") in one of the four variants.

    With sparse QKV the FF is widened to ``d_ff_qkv`` (the paper keeps the parameter count that way); the
    sparse QKV is the multiplicative + convolution attention with ``S = qkv_modules``.
    """
    _check_choice("shape", shape, BLOCK_SHAPES)
    _check_choice("variant", variant, BLOCK_VARIANTS)
    s = BLOCK_SHAPES[shape]
    sparse_ff, sparse_qkv = "FF" in variant, "QKV" in variant
    return ModelConfig(vocab_size=2, context_length=1024, d_model=s["d_model"], n_heads=s["n_heads"],
                       n_layers=1, d_ff=s["d_ff_qkv"] if sparse_qkv else s["d_ff"], dropout=0.0,
                       ff="sparse" if sparse_ff else "dense", ff_block_size=s["block_size"],
                       d_lowrank=s["d_lowrank"], qkv="conv" if sparse_qkv else "dense",
                       qkv_modules=s["qkv_modules"] if sparse_qkv else None)


class _BlockStep:
    """One block decoding one token against a cache of ``cache_len`` positions, the cache reset each call."""

    def __init__(self, cfg: ModelConfig, cache_len: int, n_inputs: int = 8):
        self.block = Block(cfg).eval()
        with torch.inference_mode():                # fill the cache by prefilling random positions
            self.cache = LayerCache()
            self.block(torch.randn(1, cache_len, cfg.d_model), self.cache)
            self.saved_state = dict(self.cache.state)
            self.block(torch.randn(1, 1, cfg.d_model), self.cache)    # one step, so the buffers have room
        self.cache.truncate(cache_len)
        self.cache_len = cache_len
        self.xs = torch.randn(n_inputs, 1, 1, cfg.d_model)              # (n_inputs, B=1, T=1, C)
        self.i = 0
        self.params = sum(p.numel() for p in self.block.parameters())

    def __call__(self):
        c = self.cache
        c.truncate(self.cache_len)                  # the new position is written in place, as in real decoding
        c.state = dict(self.saved_state)
        self.i = (self.i + 1) % len(self.xs)
        return self.block(self.xs[self.i], c)


def block_decode(shape: str = "800m", variants: Sequence[str] = BLOCK_VARIANTS, *, cache_len: int = 128,
                 repeats: int | None = None, warmup: int = 2, interleave_limit_gb: float = 1.0,
                 progress: bool = True) -> pd.DataFrame:
    """Time one block decoding one token (batch 1, a KV cache of ``cache_len`` positions) per variant.

    Weights are random (the cost does not depend on their values). When all variants together are under
    ``interleave_limit_gb`` they are built at once and timed interleaved; otherwise (the 17B shape, about
    5 GB per variant) each is built, timed and freed before the next. Cold cache before every call.
    Columns include the paper's reported per-block time and ratio beside the measured ones.
    """
    _check_choice("shape", shape, BLOCK_SHAPES)
    variants = list(variants)
    if not variants:
        raise ValueError("variants must not be empty")
    for v in variants:
        _check_choice("variant", v, BLOCK_VARIANTS)
    _positive("cache_len", cache_len)
    if repeats is None:
        repeats = pick(default=30, fast=8) if shape != "17b" else pick(default=7, fast=3)
    s = BLOCK_SHAPES[shape]
    approx_gb = 4 * (4 * s["d_model"] ** 2 + 2 * s["d_model"] * s["d_ff_qkv"]) / 1e9 * len(variants)
    times, params = {}, {}
    if approx_gb <= interleave_limit_gb:
        steps = {v: _BlockStep(block_config(shape, v), cache_len) for v in variants}
        primes = {v: _BlockStep(block_config("tiny", v), 8) for v in variants}
        times = interleaved(steps, repeats=repeats, warmup=warmup, cold_cache=True, primes=primes,
                            progress=f"block {shape}" if progress else None)
        params = {v: st.params for v, st in steps.items()}
        mode = "interleaved"
        del steps
    else:
        mode = "one variant at a time"
        for v in tqdm(variants, desc=f"block {shape}", disable=not progress):
            step = _BlockStep(block_config(shape, v), cache_len)
            times[v] = interleaved({v: step}, repeats=repeats, warmup=warmup, cold_cache=True,
                                   primes={v: _BlockStep(block_config("tiny", v), 8)})[v]
            params[v] = step.params
            del step
            _free()
    _free()
    base = times.get("dense")
    paper = PAPER_BLOCK_MS.get(shape, {})
    rows = []
    for v in variants:
        cfg = block_config(shape, v)
        row = {"shape": shape, "variant": v, "d_ff": cfg.d_ff, "params (M)": params[v] / 1e6,
               "ms per token": times[v] * 1e3,
               "speed-up": base / times[v] if base else float("nan"),
               "paper ms": paper.get(v, float("nan")),
               "paper speed-up": paper["dense"] / paper[v] if v in paper else float("nan"),
               "timing": mode, "cache_len": cache_len}
        rows.append({**row, **_machine_columns()})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# generate: a whole model, greedy decoding with the cache
# --------------------------------------------------------------------------------------------------

#: The model variants of the whole-model measurements.
MODEL_VARIANTS = ("dense", "sparse FF", "sparse FF + QKV")


def model_config(variant: str, d_model: int = 384, n_layers: int = 6, *, context_length: int = 256,
                 qkv_modules: int = 16, block_size: int = 64, sparse_decode_max_rows: int | None = None
                 ) -> ModelConfig:
    """The seed project's model shape (``d_model 384``, 6 layers, ``d_ff = 4 d_model``, ``N = 64``, context 256)
    at any width, in one of :data:`MODEL_VARIANTS`. Heads of 64 units; sparse QKV with ``S = qkv_modules``."""
    _check_choice("variant", variant, MODEL_VARIANTS)
    _positive("d_model", d_model)
    if d_model % 64:
        raise ValueError(f"d_model must be a multiple of 64 (heads of 64 units), got d_model={d_model}")
    return seed_config(ff="sparse" if "FF" in variant else "dense", d_model=d_model, n_heads=d_model // 64,
                       n_layers=_positive("n_layers", n_layers), d_ff=4 * d_model, ff_block_size=block_size,
                       context_length=_positive("context_length", context_length), dropout=0.0,
                       qkv="conv" if "QKV" in variant else "dense",
                       qkv_modules=qkv_modules if "QKV" in variant else None)


def _build_model(variant: str, d_model: int, n_layers: int, context_length: int, qkv_modules: int,
                 max_rows: int | None) -> TransformerLM:
    model = TransformerLM(model_config(variant, d_model, n_layers, context_length=context_length,
                                       qkv_modules=qkv_modules)).eval()
    if max_rows is not None:
        model.sparse_decode_max_rows = max_rows
    return model


class _Generation:
    """Greedy decoding with the cache, the prefill and the per-token steps timed apart."""

    def __init__(self, model: TransformerLM, prompt: torch.Tensor, new_tokens: int):
        self.model, self.prompt, self.new_tokens = model, prompt, new_tokens
        self.prefill: list[float] = []
        self.per_token: list[float] = []

    def __call__(self):
        m, now = self.model, clock()
        cache = m.new_cache()
        t0 = now()
        logits, _ = m(self.prompt, cache=cache)                          # prefill: (B, P, vocab)
        nxt = logits[:, -1].argmax(-1, keepdim=True)                     # (B, 1)
        t1 = now()
        for _ in range(self.new_tokens):
            logits, _ = m(nxt, cache=cache)                              # one new token per sequence
            nxt = logits[:, -1].argmax(-1, keepdim=True)
        t2 = now()
        self.prefill.append(t1 - t0)
        self.per_token.append((t2 - t1) / max(1, self.new_tokens))


def generate_bench(batch_sizes: Sequence[int] | None = None, *, d_model: int = 384, n_layers: int = 6,
                   prompt_len: int | None = None, new_tokens: int | None = None, variants: Sequence[str] = MODEL_VARIANTS,
                   context_length: int = 256, qkv_modules: int = 16, sparse_decode_max_rows: int | None = None,
                   repeats: int | None = None, warmup: int = 1, progress: bool = True) -> pd.DataFrame:
    """Prefill time of a ``prompt_len``-token prompt and per-token greedy decode time, per batch size.

    The variants are built once (random weights) and run round-robin for every batch size. The decode path of
    the sparse FF follows the models' rule (:meth:`Block.feed_forward`, ``sparse_decode_max_rows``; pass a
    value to override it). Ratios are ``dense / variant``: above 1 the variant is faster.
    """
    batch_sizes = pick(default=[1, 8, 64], fast=[1, 8]) if batch_sizes is None else batch_sizes
    batch_sizes = [_positive("batch size", b) for b in batch_sizes]
    if not batch_sizes:
        raise ValueError("batch_sizes must not be empty")
    prompt_len = pick(default=100, fast=32) if prompt_len is None else prompt_len
    new_tokens = pick(default=20, fast=8) if new_tokens is None else new_tokens
    variants = list(variants)
    for v in variants:
        _check_choice("variant", v, MODEL_VARIANTS)
    _positive("prompt_len", prompt_len)
    _positive("new_tokens", new_tokens)
    if prompt_len + new_tokens > context_length:
        raise ValueError(f"prompt_len + new_tokens must fit in context_length={context_length}, got "
                         f"prompt_len={prompt_len}, new_tokens={new_tokens}")
    _check_counts(1 if repeats is None else repeats, warmup)
    repeats = pick(default=5, fast=2) if repeats is None else repeats
    torch.manual_seed(0)
    models = {v: _build_model(v, d_model, n_layers, context_length, qkv_modules, sparse_decode_max_rows)
              for v in variants}
    rows = []
    for B in tqdm(batch_sizes, desc=f"generate d_model {d_model}", disable=not progress):
        prompt = torch.randint(0, models[variants[0]].cfg.vocab_size, (B, prompt_len))
        runs = {v: _Generation(m, prompt, new_tokens) for v, m in models.items()}
        with torch.inference_mode():
            for _ in range(warmup):
                for r in runs.values():
                    r()
            for r in runs.values():
                r.prefill.clear()
                r.per_token.clear()
            for _ in range(repeats):
                for r in runs.values():
                    r()
        med = {v: (statistics.median(r.prefill), statistics.median(r.per_token)) for v, r in runs.items()}
        for v in variants:
            pre, tok = med[v]
            row = {"d_model": d_model, "n_layers": n_layers, "batch": B, "prompt_len": prompt_len,
                   "variant": v, "prefill ms": pre * 1e3, "decode ms per step": tok * 1e3,
                   "decode µs per token": tok * 1e6 / B}
            if "dense" in med:
                row["prefill ratio (variant / dense)"] = pre / med["dense"][0]
                row["decode speed-up (dense / variant)"] = med["dense"][1] / tok
            rows.append({**row, **_machine_columns()})
    del models
    _free()
    return pd.DataFrame(rows)


def forward_tokens(widths: Sequence[int] = (384, 768, 1536), tokens: Sequence[int] = (1, 100), *,
                   n_layers: int = 6, repeats: int | None = None, warmup: int = 2,
                   progress: bool = True) -> pd.DataFrame:
    """The seed project's measurement, redone: one whole-model forward on ``T`` tokens, **no cache**.

    Dense against sparse FF for every width and token count, interleaved. The sparse model runs its FF
    layers through ``SparseFF.decode`` (the default rule of :meth:`Block.feed_forward`)."""
    widths, tokens = list(widths), [_positive("tokens", t) for t in tokens]
    if not widths or not tokens:
        raise ValueError("widths and tokens must not be empty")
    repeats = pick(default=10, fast=3) if repeats is None else repeats
    rows = []
    for d in tqdm(widths, desc="forward, no cache", disable=not progress):
        torch.manual_seed(0)
        models = {v: _build_model(v, d, n_layers, 256, 16, None) for v in ("dense", "sparse FF")}
        for T in tokens:
            idx = torch.randint(0, 65, (1, T))
            t = interleaved({v: (lambda m=m: m(idx)) for v, m in models.items()}, repeats=repeats, warmup=warmup)
            rows.append({"d_model": d, "tokens": T, "dense ms": t["dense"] * 1e3,
                         "sparse ms": t["sparse FF"] * 1e3, "dense / sparse": t["dense"] / t["sparse FF"],
                         **_machine_columns()})
        del models
        _free()
    return pd.DataFrame(rows)


def crossover(batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), *, d_model: int = 384, n_layers: int = 6,
              cache_len: int = 100, repeats: int | None = None, warmup: int = 2,
              progress: bool = True) -> pd.DataFrame:
    """One decode step of the whole model for ``B`` sequences: the sparse FF through ``SparseFF.decode`` against
    its dense-masked path (and the dense model), to place ``Block.sparse_decode_max_rows``.

    Columns: ms per step of each, and ``decode / masked`` (below 1: the decode path is cheaper at that batch).
    """
    batch_sizes = [_positive("batch size", b) for b in batch_sizes]
    if not batch_sizes:
        raise ValueError("batch_sizes must not be empty")
    repeats = pick(default=15, fast=4) if repeats is None else repeats
    torch.manual_seed(0)
    dense = _build_model("dense", d_model, n_layers, 256, 16, None)
    sparse = _build_model("sparse FF", d_model, n_layers, 256, 16, None)
    rows = []
    for B in tqdm(batch_sizes, desc="gather vs masked", disable=not progress):
        prompt = torch.randint(0, 65, (B, cache_len))
        steps = {}
        for name, model, max_rows in (("dense", dense, None), ("decode", sparse, 1 << 30), ("masked", sparse, 0)):
            steps[name] = _CachedStep(model, prompt, max_rows)
        t = interleaved(steps, repeats=repeats, warmup=warmup)
        rows.append({"d_model": d_model, "batch": B, "dense ms": t["dense"] * 1e3,
                     "sparse decode ms": t["decode"] * 1e3, "sparse masked ms": t["masked"] * 1e3,
                     "decode / masked": t["decode"] / t["masked"], **_machine_columns()})
    return pd.DataFrame(rows)


class _CachedStep:
    """One decode step of ``model`` for ``B`` sequences after a prefilled prompt; the cache is reset each call."""

    def __init__(self, model: TransformerLM, prompt: torch.Tensor, max_rows: int | None):
        self.model, self.max_rows = model, max_rows
        self.cache = model.new_cache()
        self.tok = torch.randint(0, model.cfg.vocab_size, (prompt.shape[0], 1))
        with torch.inference_mode():
            model(prompt, cache=self.cache)
            saved = [dict(lc.state) for lc in self.cache.layers]
            model(self.tok, cache=self.cache)                          # one step, so the buffers have room
        self.prompt_len = prompt.shape[1]
        self.saved = saved

    def __call__(self):
        for lc, st in zip(self.cache.layers, self.saved):
            lc.truncate(self.prompt_len)            # the new position is written in place, as in real decoding
            lc.state = dict(st)
        if self.max_rows is not None:
            self.model.sparse_decode_max_rows = self.max_rows
        return self.model(self.tok, cache=self.cache)


# --------------------------------------------------------------------------------------------------
# train: one training step, dense against sparse
# --------------------------------------------------------------------------------------------------


def train_step(d_model: int = 128, n_layers: int = 4, *, batch_size: int = 32, context_length: int = 128,
               block_size: int = 32, repeats: int | None = None, warmup: int = 2,
               progress: bool = True) -> pd.DataFrame:
    """Seconds per training step (forward, backward, gradient clipping, AdamW) of a dense and a sparse FF
    model of the book's shape (``d_ff = 4 d_model``), on random tokens, interleaved."""
    for name, v in (("d_model", d_model), ("n_layers", n_layers), ("batch_size", batch_size),
                    ("context_length", context_length), ("block_size", block_size)):
        _positive(name, v)
    repeats = pick(default=10, fast=3) if repeats is None else repeats
    _check_counts(repeats, warmup)
    torch.manual_seed(0)
    x = torch.randint(0, 65, (batch_size, context_length))
    y = torch.randint(0, 65, (batch_size, context_length))
    steps = {}
    for ff in ("dense", "sparse"):
        cfg = ModelConfig(vocab_size=65, context_length=context_length, d_model=d_model,
                          n_heads=max(1, d_model // 32), n_layers=n_layers, d_ff=4 * d_model, dropout=0.0,
                          ff=ff, ff_block_size=block_size)
        model = TransformerLM(cfg).train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

        def step(model=model, opt=opt):
            _, loss = model(x, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
        steps[ff] = step
    samples, now = {k: [] for k in steps}, clock()
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    for _ in tqdm(range(repeats), desc="train steps", disable=not progress, leave=False):
        for k, fn in steps.items():
            t0 = now()
            fn()
            samples[k].append(now() - t0)
    med = {k: statistics.median(s) for k, s in samples.items()}
    return pd.DataFrame([{"d_model": d_model, "n_layers": n_layers, "batch_size": batch_size,
                          "context_length": context_length, "dense s per step": med["dense"],
                          "sparse s per step": med["sparse"], "sparse / dense": med["sparse"] / med["dense"],
                          **_machine_columns()}])


# --------------------------------------------------------------------------------------------------
# quant: int8 weights against sparsity
# --------------------------------------------------------------------------------------------------


def quant_bench(batch_sizes: Sequence[int] = (1,), *, d_model: int = 384, n_layers: int = 6,
                prompt_len: int = 100, new_tokens: int = 20, repeats: int | None = None,
                progress: bool = True) -> pd.DataFrame:
    """Per-token decode time of the dense model, its int8 version, sparse FF, and sparse FF with int8
    (see :mod:`sparse_tutorial.quantize`), greedy with the cache; ratios against the float32 dense model."""
    from .quantize import quantize_int8

    repeats = pick(default=5, fast=2) if repeats is None else repeats
    torch.manual_seed(0)
    dense = _build_model("dense", d_model, n_layers, 256, 16, None)
    sparse = _build_model("sparse FF", d_model, n_layers, 256, 16, None)
    models = {"dense": dense, "dense int8": quantize_int8(dense), "sparse FF": sparse,
              "sparse FF int8": quantize_int8(sparse)}
    rows = []
    for B in tqdm(list(batch_sizes), desc="int8 vs sparse", disable=not progress):
        prompt = torch.randint(0, 65, (_positive("batch size", B), prompt_len))
        runs = {k: _Generation(m, prompt, new_tokens) for k, m in models.items()}
        with torch.inference_mode():
            for r in runs.values():
                r()
                r.prefill.clear()
                r.per_token.clear()
            for _ in range(repeats):
                for r in runs.values():
                    r()
        base = statistics.median(runs["dense"].per_token)
        for k, r in runs.items():
            tok = statistics.median(r.per_token)
            rows.append({"d_model": d_model, "batch": B, "variant": k,
                         "prefill ms": statistics.median(r.prefill) * 1e3, "decode ms per step": tok * 1e3,
                         "decode speed-up (dense / variant)": base / tok, **_machine_columns()})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------------------------------
# The chapter's targets
# --------------------------------------------------------------------------------------------------


def _block_speedup(df, variant):
    if df is None:
        return None
    return float(df.loc[df["variant"] == variant, "speed-up"].iloc[0])


def _gen_value(df, variant, batch, column):
    if df is None:
        return None
    sel = df[(df["variant"] == variant) & (df["batch"] == batch)]
    return None if sel.empty else float(sel[column].iloc[0])


def target_table(*, ff: dict | None = None, block_800m: pd.DataFrame | None = None,
                 block_17b: pd.DataFrame | None = None, generate: pd.DataFrame | None = None,
                 train: pd.DataFrame | None = None) -> pd.DataFrame:
    """The chapter's targets against what this run measured: ``target``, ``measured``, ``met``.

    Arguments are the results of :func:`ff_layer` (d_model 4096, d_ff 16384, N 64, rank 128),
    :func:`block_decode` at "800m" and "17b", :func:`generate_bench` at the seed's size (batch 1 and 64,
    100-token prompt) and :func:`train_step`; a missing one shows as "not run".
    """
    inv = lambda v: None if v is None else 1.0 / v  # noqa: E731  (speed-up -> time ratio)
    rows = [
        ("FF layer 4096 x 16384, N 64, rank 128: share of the bytes limit", ">=", 0.9,
         None if ff is None else float(ff["share of limit"])),
        ("800M block: sparse FF + QKV speed-up (paper 3.05x)", ">=", 4.0,
         _block_speedup(block_800m, "sparse FF + QKV")),
        ("800M block: sparse FF speed-up (paper 1.9x)", ">=", 2.0, _block_speedup(block_800m, "sparse FF")),
        ("17B block: sparse FF + QKV speed-up (paper 42.5x)", ">=", 60.0,
         _block_speedup(block_17b, "sparse FF + QKV")),
        ("seed size, decode per token, batch 1: sparse FF speed-up", ">=", 1.5,
         _gen_value(generate, "sparse FF", 1, "decode speed-up (dense / variant)")),
        ("seed size, decode per token, batch 1: sparse FF + QKV speed-up", ">=", 2.0,
         _gen_value(generate, "sparse FF + QKV", 1, "decode speed-up (dense / variant)")),
        ("seed size, prefill: sparse FF time / dense time", "<=", 1.1,
         _gen_value(generate, "sparse FF", 1, "prefill ratio (variant / dense)")),
        ("seed size, decode at batch 64: sparse FF time / dense time", "<=", 1.1,
         inv(_gen_value(generate, "sparse FF", 64, "decode speed-up (dense / variant)"))),
        ("training step: sparse time / dense time", "<=", 1.15,
         None if train is None else float(train["sparse / dense"].iloc[0])),
    ]
    out = []
    for name, op, goal, value in rows:
        met = "not run" if value is None else ("yes" if (value >= goal if op == ">=" else value <= goal) else "NO")
        out.append({"target": name, "goal": f"{op} {goal:g}",
                    "measured": "not run" if value is None else f"{value:.2f}", "met": met})
    return pd.DataFrame(out)


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparse_tutorial.bench",
                                description="Reproduce chapter 5's measurements (tables; --json for JSON).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    common.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, as chapter 5: at batch 1 a token is a chain of small "
                             "operations, and with more threads each waits for the slowest thread, which on a "
                             "machine shared with other programs dominates; one thread is also timed by its own "
                             "CPU time, see the module docstring)")
    common.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    common.add_argument("--out-dir", default=str(DEFAULT_CSV_DIR), help="folder for the CSV table")
    common.add_argument("--no-csv", action="store_true", help="do not write the CSV table")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("bandwidth", parents=[common], help="memory bandwidth (GB/s)")
    s.add_argument("--size-mb", type=int, default=None)

    s = sub.add_parser("ff", parents=[common], help="one FF layer: dense forward vs SparseFF.decode")
    s.add_argument("--d-model", type=int, nargs="+", default=[pick(default=4096, fast=512)])
    s.add_argument("--d-ff", type=int, nargs="+", default=None, help="default: 4 x d-model")
    s.add_argument("--block-size", type=int, default=64)
    s.add_argument("--d-lowrank", type=int, default=None, help="default: d_ff / block-size")
    s.add_argument("--batch", type=int, default=1)

    s = sub.add_parser("block", parents=[common], help="one Transformer block, the paper's four variants")
    s.add_argument("--shape", nargs="+", default=["800m"], choices=sorted(BLOCK_SHAPES))
    s.add_argument("--variants", nargs="+", default=list(BLOCK_VARIANTS), choices=BLOCK_VARIANTS)
    s.add_argument("--cache-len", type=int, default=128)

    s = sub.add_parser("generate", parents=[common], help="whole model: prefill and per-token decode")
    s.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 64 (fast: 1 8)")
    s.add_argument("--d-model", type=int, default=384)
    s.add_argument("--n-layers", type=int, default=6)
    s.add_argument("--prompt-len", type=int, default=None, help="default: 100 (fast: 32)")
    s.add_argument("--new-tokens", type=int, default=None, help="default: 20 (fast: 8)")
    s.add_argument("--variants", nargs="+", default=list(MODEL_VARIANTS), choices=MODEL_VARIANTS)
    s.add_argument("--sparse-decode-max-rows", type=int, default=None)

    s = sub.add_parser("crossover", parents=[common], help="decode vs dense-masked sparse FF, by batch size")
    s.add_argument("--batch-sizes", type=int, nargs="+", default=pick(default=[1, 4, 16, 64, 128, 256],
                                                                       fast=[1, 16, 64]))
    s.add_argument("--d-model", type=int, default=384)
    s.add_argument("--n-layers", type=int, default=6)

    s = sub.add_parser("train", parents=[common], help="seconds per training step, dense vs sparse")
    s.add_argument("--d-model", type=int, default=pick(default=128, fast=64))
    s.add_argument("--n-layers", type=int, default=pick(default=4, fast=2))
    s.add_argument("--batch-size", type=int, default=pick(default=32, fast=8))
    s.add_argument("--context-length", type=int, default=pick(default=128, fast=64))

    s = sub.add_parser("quant", parents=[common], help="int8 weights vs sparse FF, per-token decode")
    s.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    s.add_argument("--d-model", type=int, default=384)
    s.add_argument("--n-layers", type=int, default=6)
    return p


def _run(args) -> pd.DataFrame:
    c = args.command
    if c == "bandwidth":
        return bandwidth(args.size_mb, args.repeats)
    if c == "ff":
        d_ffs = args.d_ff or [4 * d for d in args.d_model]
        if len(d_ffs) == 1 and len(args.d_model) > 1:
            d_ffs = d_ffs * len(args.d_model)
        if len(d_ffs) != len(args.d_model):
            raise ValueError(f"--d-ff takes one value or one per --d-model, got d_ff={d_ffs} for "
                             f"d_model={args.d_model}")
        rows = [ff_layer(d, f, args.block_size, args.d_lowrank, batch=args.batch, repeats=args.repeats)
                for d, f in zip(args.d_model, d_ffs)]
        return pd.DataFrame(rows)
    if c == "block":
        return pd.concat([block_decode(s, args.variants, cache_len=args.cache_len, repeats=args.repeats,
                                       progress=False) for s in args.shape], ignore_index=True)
    if c == "generate":
        return generate_bench(args.batch_sizes, d_model=args.d_model, n_layers=args.n_layers,
                              prompt_len=args.prompt_len, new_tokens=args.new_tokens, variants=args.variants,
                              sparse_decode_max_rows=args.sparse_decode_max_rows, repeats=args.repeats,
                              progress=False)
    if c == "crossover":
        return crossover(args.batch_sizes, d_model=args.d_model, n_layers=args.n_layers, repeats=args.repeats,
                         progress=False)
    if c == "train":
        return train_step(args.d_model, args.n_layers, batch_size=args.batch_size,
                          context_length=args.context_length, repeats=args.repeats, progress=False)
    if c == "quant":
        return quant_bench(args.batch_sizes, d_model=args.d_model, n_layers=args.n_layers, repeats=args.repeats,
                           progress=False)
    raise ValueError(f"unknown command {c!r}")  # argparse prevents this


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sparse_tutorial.bench``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        with num_threads(args.threads):
            t0 = time.perf_counter()
            df = _run(args)
            elapsed = time.perf_counter() - t0
            machine = {**machine_info(), "clock": clock_name()}
    except ValueError as e:
        parser.error(str(e))                                  # exit status 2 with the message on stderr
    csv = None if args.no_csv else str(write_csv(df, args.command, args.out_dir))
    if args.json:
        print(json.dumps({"command": args.command, "machine": machine, "seconds": elapsed, "csv": csv,
                          "rows": json.loads(df.to_json(orient="records"))}))
    else:
        shown = df.drop(columns=[c for c in ("cpu", "threads", "clock") if c in df.columns])
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format",
                               "{:.4g}".format):
            print(f"{args.command}: {machine['cpu']}, {machine['logical cores']} logical cores, torch "
                  f"{machine['torch']} with {machine['torch threads']} threads, timed by {machine['clock']} "
                  f"({elapsed:.1f} s)")
            print(shown.to_string(index=False))
            if csv:
                print(f"written: {csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
