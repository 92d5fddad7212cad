"""Readings: the sentences and small tables a chapter prints from its run's numbers.

The book states no measured result as typed text (``tests/test_typed_conclusions.py``): where a chapter draws a
conclusion from a measurement, it prints it from the numbers of the run ("in this run ..."). The formatting lives
here, so the notebooks' code cells stay short; each function takes the chapter's own tables and returns text
(or a small table) and measures nothing itself.
"""
from __future__ import annotations

import textwrap

import pandas as pd

from ..measure.costs import bytes_limit_ratio, controller_cost, dense_ff_cost, sparse_ff_cost

__all__ = ["wrap", "ff_share", "batch_sweep", "batch1_prediction", "batch1_sentence", "bytes_limits", "variant_readings",
           "gradient_reach", "hard_share", "sampler_check", "permutation_fit", "qkv_training",
           "design_vs_decode"]

#: Printed lines are wrapped to this width: the rendered page's text column shows 77 characters of output.
WIDTH = 76


def wrap(*sentences: str) -> str:
    """Join ``sentences`` and wrap them to :data:`WIDTH` columns, one paragraph each."""
    return "\n".join(textwrap.fill(s, WIDTH) for s in sentences)


# --- chapter 1 ---------------------------------------------------------------------------------------------

def ff_share(table: pd.DataFrame) -> str:
    """The FF layer's share of a block's parameters across the shapes of ``params.param_table``."""
    big = table.loc["paper 17B"]
    return wrap(f"In every shape above the FF layer holds {table['FF share'].min():.0%} to "
                f"{table['FF share'].max():.0%} of a block's parameters. One 17B-shape block is "
                f"{big['block MB']:,.0f} MB of float32 weights, {big['FF'] * 4 / 1e6:,.0f} MB of them "
                f"in the FF layer.")


def batch_sweep(sweep: pd.DataFrame) -> str:
    """How per-token time moved with the batch in ``timing.dense_ff_batch_sweep``'s table."""
    t1 = sweep["µs per token"].iloc[0]
    best = sweep.loc[sweep["µs per token"].idxmin()]
    out = [f"In this run, at batch 1 the layer takes {t1:.0f} µs per token; the cheapest per-token time, "
           f"{best['µs per token']:.1f} µs, is at batch {int(best['batch'])}: "
           f"{t1 / best['µs per token']:.1f}x less per token."]
    if best["batch"] == 1:
        out.append("Per-token time did NOT fall with the batch on this run; on a busy machine, rerun "
                   "this chapter.")
    per_token = sweep["µs per token"].to_numpy()
    rises = [int(b) for b, prev, now in zip(sweep["batch"][1:], per_token[:-1], per_token[1:]) if now > prev]
    out.append(f"Per-token time went UP when the batch grew to {rises} on this run (see the note below "
               "the figure)." if rises else "Per-token time fell at every step of the batch on this run.")
    return wrap(*out)


def batch1_prediction(sweep: pd.DataFrame, bandwidth_gbs: float, peak_gflops: float) -> dict:
    """Batch 1 of the sweep against *weight bytes / bandwidth*: predicted and measured µs, and their ratio."""
    row = sweep.iloc[0]
    predicted = row["weight bytes"] / (bandwidth_gbs * 1e9) * 1e6
    compute = row["FLOPs"] / (peak_gflops * 1e9) * 1e6
    return {"MB": row["weight bytes"] / 1e6, "GB/s": bandwidth_gbs, "predicted µs": predicted,
            "measured µs": row["µs per token"], "measured / predicted": row["µs per token"] / predicted,
            "compute µs": compute, "read / compute": predicted / compute}


def batch1_sentence(p: dict) -> str:
    """:func:`batch1_prediction` as sentences: the formula, its value, the measurement."""
    return wrap(f"Prediction: {p['MB']:.1f} MB of weights / {p['GB/s']:.1f} GB/s = "
                f"{p['predicted µs']:.0f} µs. Measured in this run: {p['measured µs']:.0f} µs, "
                f"{p['measured / predicted']:.2f}x the prediction.",
                f"Doing the same FLOPs at the measured peak would take {p['compute µs']:.1f} µs: "
                f"reading the weights costs {p['read / compute']:.0f}x more than computing with them.")


def bytes_limits(bandwidth_gbs: float, layers: list[tuple[str, int, int, int, int | None]]) -> pd.DataFrame:
    """Bytes read per token by a dense and a sparse FF layer, and the speed-up limit, one row per
    ``(name, d_model, d_ff, N, d_lowrank or None)``; times predicted from ``bandwidth_gbs``."""
    rows = []
    for name, d, f, n, r in layers:
        dense, sparse = dense_ff_cost(d, f), sparse_ff_cost(d, f, n, r)
        rows.append({"layer": name, "dense MB": dense.bytes() / 1e6, "sparse MB": sparse.bytes() / 1e6,
                     "limit (x)": bytes_limit_ratio(d, f, n, r),
                     "dense µs": dense.bytes() / (bandwidth_gbs * 1e9) * 1e6,
                     "sparse µs": sparse.bytes() / (bandwidth_gbs * 1e9) * 1e6,
                     "controller share": controller_cost(d, f, r or f // n).bytes() / sparse.bytes()})
    return pd.DataFrame(rows).set_index("layer")


# --- chapter 2 ---------------------------------------------------------------------------------------------

def variant_readings(table: pd.DataFrame) -> str:
    """Each ablation variant against the first row (the paper's recipe), with the train-val gap that shows a
    train/eval mismatch. With several seeds (``seeds`` > 1, :func:`~sparse_tutorial.studies.selection.
    compare_variants`), the losses are means and each difference is judged against the seeds' ranges: one smaller
    than the wider of the two ranges is within this run's noise. With one seed the sentences say so."""
    t = table.set_index("variant") if "variant" in table.columns else table
    ref_name, ref = t.index[0], t.iloc[0]
    n_seeds = int(ref["seeds"]) if "seeds" in t.columns else 1
    rng = (lambda r: r["val max"] - r["val min"]) if n_seeds > 1 else (lambda r: float("nan"))  # noqa: E731
    if n_seeds > 1:
        head = (f"In this run ({n_seeds} seeds per variant; losses are means, ranges are max - min over the "
                f"seeds), against {ref_name!r}: val loss {ref['val loss']:.3f} (range {rng(ref):.3f}), ")
    else:
        head = (f"In this run (one seed of a short run: a difference smaller than the spread between seeds "
                f"means nothing), against {ref_name!r}: val loss {ref['val loss']:.3f}, ")
    out = [head + f"units used {ref['units used after']:.0%}, in-block entropy {ref['entropy after']:.2f}."]
    within, beyond = [], []
    for name, row in t.iloc[1:].iterrows():
        gap = row["val loss"] - row["train loss"]
        diff = row["val loss"] - ref["val loss"]
        noise = ""
        if n_seeds > 1:
            bar = max(rng(row), rng(ref))
            (within if abs(diff) < bar else beyond).append(name)
            noise = f" (range {rng(row):.3f}: {'within' if abs(diff) < bar else 'beyond'} the seeds' spread)"
        out.append(f"- {name}: val loss {row['val loss']:.3f} ({diff:+.3f}){noise}; "
                   f"val - train {gap:+.3f} (recipe {ref['val loss'] - ref['train loss']:+.3f}); "
                   f"units used {row['units used after']:.0%}; entropy {row['entropy after']:.2f}.")
    best = t["val loss"].idxmin()
    out.append(f"Lowest validation loss in this run: {best!r} ({t['val loss'].min():.3f}); the spread of the "
               f"table's val losses is {t['val loss'].max() - t['val loss'].min():.3f} nats.")
    if n_seeds > 1:
        out.append(f"Differences from {ref_name!r} beyond the seeds' spread: "
                   f"{', '.join(repr(n) for n in beyond) or 'none'}; within it (not told apart by this run): "
                   f"{', '.join(repr(n) for n in within) or 'none'}.")
    return "\n".join(textwrap.fill(s, WIDTH, subsequent_indent="  ") for s in out)


def gradient_reach(reach: dict[str, pd.DataFrame], block_size: int, d_ff: int) -> str:
    """What a hard and a soft training call use in the forward pass, and where their gradients go."""
    out = []
    for kind, r in reach.items():
        per_block = r.groupby("block")
        used = per_block["mask"].apply(lambda m: int((m != 0).sum())).tolist()
        scored = per_block["grad score"].apply(lambda g: int((g != 0).sum())).tolist()
        w1_rows = int((r["|grad W1ᵀ row|"] > 0).sum())
        out.append(f"{kind} call: units used per block in the forward pass {used}; scores with a "
                   f"gradient per block {scored} of N = {block_size}; W1ᵀ rows with a gradient: "
                   f"{w1_rows} of {d_ff}.")
    return wrap(*out)


def hard_share(share: dict) -> str:
    """The measured share of hard calls against ``hard_prob``, in binomial standard deviations."""
    expected = share["hard_prob"] * share["calls"]
    return wrap(f"Formula: hard_prob x calls = {share['hard_prob']:.2f} x {share['calls']} = {expected:.0f} "
                f"hard calls, give or take {share['binomial std'] * share['calls']:.0f} (one binomial std).",
                f"Measured: {share['hard calls']} of {share['calls']} calls used the hard mask "
                f"({share['share']:.1%}), "
                f"{abs(share['share'] - share['hard_prob']) / share['binomial std']:.1f} binomial std away.")


def sampler_check(freq: pd.DataFrame, draws: int, p_at_t1: float) -> str:
    """How far each sampler's frequencies fall from ``softmax(logits / 0.1)``, in binomial std."""
    target = freq["softmax(logits / 0.1)"]
    std = (target * (1 - target) / draws) ** 0.5
    out = []
    for col in ("Gumbel-max", "layer's sampler"):
        err = (freq[col] - target).abs()
        out.append(f"{col}: largest gap to the softmax {err.max():.4f}, "
                   f"{(err / std.clip(lower=1e-12)).max():.1f} binomial std at most.")
    out.append(f"Most likely unit: p = {target.max():.3f} at T = 0.1; at T = 1 it would be {p_at_t1:.3f}.")
    return wrap(*out)


# --- chapter 4 ---------------------------------------------------------------------------------------------

def permutation_fit(history: pd.DataFrame, threshold: float = 1e-6) -> str:
    """The held-out error of the permutation fit, first and last."""
    final = history["mse"].iloc[-1]
    return wrap(f"Mean squared error on 1,000 held-out inputs: {history['mse'].iloc[0]:.3g} at the start, "
                f"{final:.3g} after {history['step'].iloc[-1]} steps "
                f"({'below' if final < threshold else 'NOT below'} {threshold:g}).")


def qkv_training(results: pd.DataFrame, steps: int, batch: int, context: int) -> str:
    """The sparse FF + sparse QKV model against dense: validation loss and the cost of a training step."""
    gap = results.loc["sparse FF + sparse QKV", "val loss"] - results.loc["dense", "val loss"]
    sec = results["s / step (here)"]
    ratio = sec["sparse FF + sparse QKV"] / sec["dense"]
    return wrap(f"{steps} training steps, batch {batch}, context {context}.",
                f"In this run, sparse FF + sparse QKV ends {abs(gap):.3f} nats "
                f"{'above' if gap > 0 else 'below'} the dense baseline's validation loss, and a training "
                f"step takes {ratio:.2f}x the dense model's time: it is "
                f"{'NOT cheaper' if ratio >= 1 else 'cheaper'} to train here.")


# --- chapter 6 ---------------------------------------------------------------------------------------------

def design_vs_decode(read_share: pd.Series, speedup: pd.Series) -> pd.DataFrame:
    """Each kind's speed-up limit from the weights it reads (dense reads 1) beside its measured speed-up."""
    limit = read_share.loc["dense"] / read_share
    return pd.DataFrame({"limit from weights read (x)": limit, "measured speed-up (x)": speedup}).dropna()
