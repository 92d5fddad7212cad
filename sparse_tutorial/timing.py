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

__all__ = ["time_call", "compare", "machine_info", "machine_summary", "measure_bandwidth"]


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
