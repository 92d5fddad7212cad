"""Timing on a shared CPU: warm-up, medians over repeats, interleaved comparisons, machine facts.

Timings are reported as medians (robust to a noisy neighbour) and compared as ratios measured in one run,
with the variants interleaved so a slow spell hurts all of them alike.
"""
from __future__ import annotations

import os
import platform
import statistics
import time
from typing import Callable

import torch

__all__ = ["time_call", "compare", "machine_info", "machine_summary", "measure_bandwidth", "quartiles", "spread"]


def quartiles(samples: list[float]) -> tuple[float, float, float]:
    """First quartile, median and third quartile of timing samples (one sample: itself three times)."""
    if not samples:
        raise ValueError("samples must not be empty")
    if len(samples) < 2:
        return samples[0], samples[0], samples[0]
    q = statistics.quantiles(samples, n=4, method="inclusive")
    return q[0], statistics.median(samples), q[2]


def spread(samples: list[float]) -> float:
    """The interquartile range of timing samples as a share of their median: 0.05 means the middle half of the
    repeats lay within 5% of the median's size. The tables print it beside each median."""
    q1, med, q3 = quartiles(samples)
    return (q3 - q1) / med if med > 0 else float("nan")


def time_call(fn: Callable[[], object], *, repeats: int = 20, warmup: int = 3, inner: int = 1) -> float:
    """Median wall time of ``fn()`` in seconds, after ``warmup`` untimed calls.

    ``inner`` calls are timed together and divided, for functions too quick for the clock.
    """
    if repeats < 1 or inner < 1 or warmup < 0:
        raise ValueError(f"repeats and inner must be >= 1 and warmup >= 0, got repeats={repeats}, "
                         f"inner={inner}, warmup={warmup}")
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            samples.append((time.perf_counter() - t0) / inner)
    return statistics.median(samples)


def compare(fns: dict[str, Callable[[], object]], *, repeats: int = 20, warmup: int = 3,
            inner: int = 1) -> dict[str, float]:
    """Median seconds per call of each function, the calls interleaved round-robin."""
    samples: dict[str, list[float]] = {name: [] for name in fns}
    with torch.inference_mode():
        for _ in range(warmup):
            for fn in fns.values():
                fn()
        for _ in range(repeats):
            for name, fn in fns.items():
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                samples[name].append((time.perf_counter() - t0) / inner)
    return {name: statistics.median(s) for name, s in samples.items()}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, object]:
    """What the timings of a chapter came from: CPU model, cores, threads torch uses, versions."""
    return {
        "cpu": _cpu_model(),
        "logical cores": os.cpu_count(),
        "torch threads": torch.get_num_threads(),
        "torch": torch.__version__.split("+")[0],
        "python": platform.python_version(),
        "os": f"{platform.system()} {platform.release()}",
    }


def machine_summary() -> str:
    """One line for a caption: ``'<cpu>, N cores, torch X with T threads'``."""
    m = machine_info()
    return f"{m['cpu']}, {m['logical cores']} logical cores, torch {m['torch']} with {m['torch threads']} threads"


def measure_bandwidth(size_mb: int = 256, repeats: int = 10) -> dict[str, float]:
    """Memory bandwidth in GB/s: a large copy (read + write) and a large sum (read only).

    ``size_mb`` should be far larger than the last-level cache.
    """
    if size_mb < 1:
        raise ValueError(f"size_mb must be >= 1, got size_mb={size_mb!r}")
    n = size_mb * (1 << 20) // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    t_copy = time_call(lambda: dst.copy_(src), repeats=repeats, warmup=2)
    t_sum = time_call(lambda: src.sum(), repeats=repeats, warmup=2)
    nbytes = n * 4
    return {"copy GB/s": 2 * nbytes / t_copy / 1e9, "read GB/s": nbytes / t_sum / 1e9}


# --------------------------------------------------------------------------------------------------
# Roofline measurements (chapter 1): cache size, peak matmul throughput, the dense FF against batch size
# --------------------------------------------------------------------------------------------------


def last_level_cache_bytes() -> int | None:
    """Size in bytes of the largest CPU cache Linux reports (``/sys/devices/system/cpu``), or None."""
    from pathlib import Path

    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    best = None
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            raw = f.read_text().strip()
        except OSError:
            continue
        try:
            size = int(raw[:-1]) * units[raw[-1]] if raw[-1] in units else int(raw)
        except (ValueError, IndexError):
            continue
        best = size if best is None else max(best, size)
    return best


def measure_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    """Peak-ish float32 throughput in GFLOP/s: the median time of an ``n x n`` by ``n x n`` matmul."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 16:
        raise ValueError(f"n must be an integer >= 16, got n={n!r}")
    a, b = torch.randn(n, n), torch.randn(n, n)
    out = torch.empty(n, n)
    t = time_call(lambda: torch.mm(a, b, out=out), repeats=repeats, warmup=1)
    return 2 * n ** 3 / t / 1e9


def dense_ff_batch_sweep(d_model: int, d_ff: int, batch_sizes, *, repeats: int = 5, warmup: int = 1,
                         min_weight_bytes: int | None = None, progress: bool = True):
    """Time the dense FF on ``B`` tokens at once for every ``B`` in ``batch_sizes``; one row per batch size.

    A single layer small enough to stay in the CPU cache would be timed reading its weights from the
    cache, not from memory. A decoding model does not enjoy that: by the time a layer runs again, the other
    layers have evicted its weights. So the sweep chains ``n_layers`` distinct layers whose weights together
    take at least ``min_weight_bytes`` (default: 4x the last-level cache, at least 64 MB) and reports the time
    of one layer (total / n_layers). Batch sizes are interleaved within each repeat; medians over repeats.

    Columns: batch, n_layers, ms per call (one layer, all B tokens), µs per token, IQR / median (the spread of
    the repeats, :func:`spread`), GFLOP/s, FLOPs, weight bytes, total bytes, FLOP/byte (arithmetic intensity, see :mod:`sparse_tutorial.measure.params`).
    """
    import pandas as pd
    from tqdm.auto import tqdm

    from ..layers.dense import DenseFF
    from .params import ff_bytes, ff_flops

    batch_sizes = list(batch_sizes)
    if not batch_sizes:
        raise ValueError("batch_sizes must not be empty")
    for b in batch_sizes:
        if isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ValueError(f"batch_sizes must hold positive integers, got {b!r}")
    if repeats < 1 or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats}, warmup={warmup}")
    layer_bytes = ff_bytes(d_model, d_ff, 1)["weights"]
    if min_weight_bytes is None:
        min_weight_bytes = max(4 * (last_level_cache_bytes() or 0), 64 << 20)
    n_layers = max(1, -(-int(min_weight_bytes) // layer_bytes))   # ceil
    layers = [DenseFF(d_model, d_ff).eval() for _ in range(n_layers)]

    def chain(x):
        for layer in layers:   # every layer reads the same input: we time the layers, not a deep network
            layer(x)

    inputs = {b: torch.randn(b, d_model) for b in batch_sizes}      # (B, d_model)
    fns = {b: (lambda x=x: chain(x)) for b, x in inputs.items()}
    samples: dict[int, list[float]] = {b: [] for b in batch_sizes}
    for r in tqdm(range(repeats), desc=f"dense FF {d_model}x{d_ff}", disable=not progress):
        one = compare(fns, repeats=1, warmup=warmup if r == 0 else 0)
        for b, t in one.items():
            samples[b].append(t / n_layers)
    rows = []
    for b in batch_sizes:
        t = statistics.median(samples[b])
        flops, nbytes = ff_flops(d_model, d_ff, b), ff_bytes(d_model, d_ff, b)
        rows.append({"batch": b, "n_layers": n_layers, "ms per call": t * 1e3, "µs per token": t * 1e6 / b,
                     "IQR / median": spread(samples[b]), "GFLOP/s": flops / t / 1e9, "FLOPs": flops, "weight bytes": nbytes["weights"],
                     "total bytes": nbytes["total"], "FLOP/byte": flops / nbytes["total"]})
    return pd.DataFrame(rows)


__all__ += ["last_level_cache_bytes", "measure_matmul_gflops", "dense_ff_batch_sweep"]
