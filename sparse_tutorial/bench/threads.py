"""``bench threads``: one thread against two (or any counts), dense and sparse, with the spread over repeats.

The same FF layer and block as ``bench ff`` and ``bench block``, timed at every thread count, all on **wall
time** (one thread's CPU time would not compare with several threads'). For every measurement the median and
the quartiles of the repeats: two thread counts differ only where their spreads do not overlap.
"""
from __future__ import annotations

from typing import Sequence

import pandas as pd

from ..measure.timing import quartiles
from .block import block_decode
from .ff import ff_layer
from .harness import clock_name, machine_columns, num_threads, positive, recording, wall_clock
from .paths import check_paths

__all__ = ["threads_compare", "threads_verdicts", "threads_table"]


def threads_compare(counts: Sequence[int] = (1, 2), *, ff_shape: Sequence[int | None] = (4096, 16384, 64, 128),
                    block_shape: str | None = "800m", repeats: int | None = None,
                    paths: Sequence[str] | str | None = None) -> pd.DataFrame:
    """Median and quartiles (ms, wall time) of the FF layer ``ff_shape`` (``d_model, d_ff, N, d_lowrank``; dense
    and each decode path) and of the block ``block_shape`` (each variant and path), at each thread count.

    ``speed-up`` is dense / variant at the same thread count; ``vs 1 thread`` is the median at the first count
    over this one (above 1: more threads were faster).
    """
    counts = [positive("threads", n) for n in counts]
    if not counts:
        raise ValueError("counts must not be empty")
    paths = check_paths(paths)
    rows = []
    for n in counts:
        with num_threads(n), wall_clock():
            clock = clock_name()
            if ff_shape is not None:
                with recording() as rec:
                    ff_layer(*ff_shape, repeats=repeats, paths=paths)
                for key, s in rec.items():
                    rows.append({"measure": f"FF {ff_shape[0]} x {ff_shape[1]}",
                                 "variant": "dense" if key == "dense" else "sparse FF",
                                 "path": None if key == "dense" else key, "threads": n, "clock": clock,
                                 "samples": s})
            if block_shape is not None:
                with recording() as rec:
                    block_decode(block_shape, repeats=repeats, paths=paths, progress=False)
                for (variant, path), s in rec.items():
                    rows.append({"measure": f"block {block_shape}", "variant": variant, "path": path,
                                 "threads": n, "clock": clock, "samples": s})
    out = []
    for r in rows:
        q1, med, q3 = quartiles(r.pop("samples"))
        out.append({**r, "median ms": med * 1e3, "q1 ms": q1 * 1e3, "q3 ms": q3 * 1e3,
                    "spread %": 100 * (q3 - q1) / med})
    df = pd.DataFrame(out)
    key = ["measure", "variant", "path"]
    dense = df[df["variant"] == "dense"].set_index(["measure", "threads"])["median ms"]
    df["speed-up"] = [dense[(m, n)] / t for m, n, t in zip(df["measure"], df["threads"], df["median ms"])]
    first = df[df["threads"] == counts[0]].set_index(key)["median ms"]
    df["vs 1 thread" if counts[0] == 1 else f"vs {counts[0]} threads"] = [
        first[k] / t for k, t in zip(map(tuple, df[key].astype(object).values), df["median ms"])]
    df["cpu"] = machine_columns()["cpu"]
    return df


def threads_verdicts(df: pd.DataFrame) -> list[str]:
    """One sentence per measurement and variant: which thread count was faster, and whether the quartile
    ranges overlap (then the run does not tell them apart)."""
    out = []
    for (m, v, p), part in df.groupby(["measure", "variant", "path"], dropna=False, sort=False):
        part = part.sort_values("median ms")
        best, rest = part.iloc[0], part.iloc[1:]
        name = f"{m}, {v}" + (f" ({p} path)" if isinstance(p, str) else "")
        if rest.empty:
            continue
        other = rest.iloc[0]
        apart = best["q3 ms"] < other["q1 ms"]
        out.append(f"{name}: {int(best['threads'])} thread(s) {best['median ms']:.3g} ms against "
                   f"{other['median ms']:.3g} ms with {int(other['threads'])}"
                   + ("" if apart else " (the quartile ranges overlap: not told apart)") + ".")
    return out


def threads_table(df: pd.DataFrame) -> pd.DataFrame:
    """:func:`threads_compare`'s rows as a narrow table: one row per measurement, variant and path, the median
    (ms) and the spread (quartile range, % of the median) for every thread count side by side."""
    d = df.assign(path=df["path"].fillna("-"))
    out = d.pivot_table(index=["measure", "variant", "path"], columns="threads",
                        values=["median ms", "spread %"], sort=False)
    out.columns = [f"{n} thr {'ms' if v == 'median ms' else 'spread %'}" for v, n in out.columns]
    order = [f"{n} thr {k}" for n in sorted(df["threads"].unique()) for k in ("ms", "spread %")]
    return out[order]
