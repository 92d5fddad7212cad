"""The timing machinery every measurement of the benchmark shares (the method is in the package docstring).

Round-robin calls with warm-up and medians (:func:`interleaved`), the clock (:func:`clock`), torch's thread count
(:func:`num_threads`), the cold-cache flush, the machine columns of every table and the CSV writer.
"""
from __future__ import annotations

import gc
import os
import statistics
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..measure.timing import last_level_cache_bytes, machine_info

__all__ = ["DEFAULT_CSV_DIR", "num_threads", "clock", "clock_name", "wall_clock", "recording", "interleaved",
           "write_csv", "positive",
           "check_counts", "check_choice", "machine_columns", "free_memory"]

DEFAULT_CSV_DIR = Path("_build") / "bench"



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


_FORCED_WALL = []       # non-empty inside wall_clock()
_RECORDERS: list[dict] = []


@contextmanager
def wall_clock():
    """Time with wall time whatever the thread count (to compare one thread with several on one clock)."""
    _FORCED_WALL.append(True)
    try:
        yield
    finally:
        _FORCED_WALL.pop()


@contextmanager
def recording():
    """Collect every sample :func:`interleaved` takes in the body: ``{name: [seconds, ...]}`` (for spreads)."""
    rec: dict = {}
    _RECORDERS.append(rec)
    try:
        yield rec
    finally:
        _RECORDERS.remove(rec)


def clock() -> Callable[[], float]:
    """The timer of every measurement: thread CPU time with one torch thread, else wall time (see above)."""
    if _FORCED_WALL:
        return time.perf_counter
    return time.thread_time if torch.get_num_threads() == 1 else time.perf_counter


def clock_name() -> str:
    if _FORCED_WALL:
        return "wall time"
    return "thread CPU time" if torch.get_num_threads() == 1 else "wall time"


class _CacheFlusher:
    """Reads a buffer of ``4 x`` the last-level cache (at least 32 MB), evicting whatever was cached."""

    def __init__(self):
        llc = last_level_cache_bytes() or (32 << 20)
        self.buf = torch.ones(max(4 * llc, 32 << 20) // 4)

    def __call__(self) -> None:
        self.buf.sum()


def check_counts(repeats: int, warmup: int) -> None:
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
    check_counts(repeats, warmup)
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
    for rec in _RECORDERS:
        rec.update(samples)
    return {name: statistics.median(s) for name, s in samples.items()}


def machine_columns() -> dict[str, object]:
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


def positive(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
    return value


def free_memory() -> None:
    gc.collect()




def check_choice(name: str, value, choices) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {name}={value!r}")
