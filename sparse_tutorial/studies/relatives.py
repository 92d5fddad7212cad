"""Chapter 6: the paper's controller FF beside its relatives, Mixture of Experts and Product-Key Memory.

What the chapter calls: the kinds it compares (:data:`KINDS`), the table of who selects what
(:func:`design_table`), the stored-against-read figure, the quality table of the trained models, the decode
figure of one batch size (the chapter's slider), and the earlier project's findings checked against this run
(:func:`seed_findings`).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
from matplotlib.figure import Figure

from ..model import ModelConfig, TransformerLM
from .plots import COLORS, PALETTE


__all__ = ["KINDS", "DESIGNS", "design_table", "plot_stored_vs_read", "quality_table", "decode_figure",
           "layer_width_figure", "layer_width_verdicts", "seed_findings"]

#: label -> ModelConfig overrides of the chapter's five models (all at the book's size)
KINDS: dict[str, dict] = {
    "dense": dict(ff="dense"),
    "controller FF": dict(ff="sparse"),
    "MoE top-1": dict(ff="moe", moe_top_k=1),
    "MoE top-2": dict(ff="moe", moe_top_k=2),
    "PKM": dict(ff="pkm"),
}

#: ``ModelConfig.ff`` -> (who selects, what is selected)
DESIGNS = {
    "dense": ("nobody", "every unit"),
    "sparse": ("a low-rank controller, per block", "one unit in each block of N"),
    "moe": ("a softmax router", "top_k whole experts (small dense FFs)"),
    "pkm": ("a query against two half-key tables", "top_k memory slots per head"),
}


def design_table(cfgs: dict[str, ModelConfig]) -> pd.DataFrame:
    """One row per model: who selects, what, the FF layer's parameters and how many of them a token reads."""
    rows = {}
    for label, cfg in cfgs.items():
        ff = TransformerLM(cfg).blocks[0].ff
        who, what = DESIGNS.get(cfg.ff, ("?", "?"))
        stored, read = ff.num_params(), ff.active_params_per_token()
        rows[label] = {"who selects": who, "what is selected": what, "FF parameters (one layer)": stored,
                       "read per token": read, "share read": f"{read / stored:.1%}"}
    return pd.DataFrame.from_dict(rows, orient="index")


def plot_stored_vs_read(table: pd.DataFrame, *, title: str = "") -> Figure:
    """Bars: parameters one FF layer stores and reads per token, for each model of :func:`design_table`."""
    fig, ax = plt.subplots(figsize=(7, 3.4), layout="constrained")
    x = range(len(table))
    ax.bar([i - 0.2 for i in x], table["FF parameters (one layer)"], width=0.4, label="stored", color=COLORS["dense"])
    ax.bar([i + 0.2 for i in x], table["read per token"], width=0.4, label="read per token", color=COLORS["sparse"])
    ax.set_xticks(list(x), table.index)
    ax.set_yscale("log")
    ax.set_ylabel("parameters of one FF layer")
    ax.set_title(title)
    ax.legend()
    return fig


def quality_table(models: dict[str, TransformerLM], runs: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Parameters, FF parameters read per token, final losses and training seconds per step, ranked by val loss."""
    rows = {}
    for label, model in models.items():
        run = runs[label]
        rows[label] = {"parameters": model.num_params(),
                       "FF read per token (all layers)": sum(b.ff.active_params_per_token() for b in model.blocks),
                       "final train loss": run["train_loss"].iloc[-1], "final val loss": run["val_loss"].iloc[-1],
                       "s per training step": run["sec_per_step"].median()}
    table = pd.DataFrame.from_dict(rows, orient="index").sort_values("final val loss")
    table.insert(0, "rank", range(1, len(table) + 1))
    return table


def decode_figure(df: pd.DataFrame, batch: int) -> Figure:
    """Per-token decode time of every variant at one batch size (``generate_bench`` rows), dense dashed."""
    part = df[df.batch == batch]
    fig, ax = plt.subplots(figsize=(6.5, 3.2), layout="constrained")
    ax.barh(part.variant, part["decode µs per token"], color=PALETTE[:len(part)])
    dense = part[part.variant == "dense"]["decode µs per token"]
    if len(dense):
        ax.axvline(dense.iloc[0], color="k", ls="--", lw=1, label="dense")
        ax.legend(loc="lower right")
    ax.invert_yaxis()
    ax.set_xlabel("decode time per token (µs), whole model with the cache")
    ax.set_title(f"batch {batch}")
    return fig


def layer_width_figure(df: pd.DataFrame) -> Figure:
    """One FF layer of each kind decoding one token against width (``bench.ff_kinds`` rows): the measured speed-up
    over dense (solid) and the speed-up its bytes allow (dotted, same colour), on log axes."""
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    kinds = [k for k in dict.fromkeys(df["kind"]) if k != "dense"]
    for color, kind in zip(PALETTE, kinds):
        part = df[df["kind"] == kind]
        ax.plot(part["d_model"], part["speed-up"], "o-", color=color, label=f"{kind}: measured")
        ax.plot(part["d_model"], part["bytes x"], ":", color=color, label=f"{kind}: bytes allow")
    ax.axhline(1.0, color="k", lw=1, ls="--", label="dense")
    ax.set(xscale="log", yscale="log", xlabel="d_model (d_ff = 4 d_model)",
           ylabel="speed-up over the dense layer", title="One FF layer, one token, cold cache")
    ax.set_xticks(sorted(df["d_model"].unique()), [str(d) for d in sorted(df["d_model"].unique())])
    ax.legend(fontsize=8, ncols=2)
    return fig


def layer_width_verdicts(df: pd.DataFrame) -> list[str]:
    """Per kind: from which width its layer decodes faster than dense in this run, and its share of what its bytes
    allow at the widest width (sentences from the numbers of ``bench.ff_kinds``)."""
    out = []
    widest = df["d_model"].max()
    for kind, part in df[df["kind"] != "dense"].groupby("kind", sort=False):
        faster = part[part["speed-up"] > 1.0]["d_model"]
        top = part[part["d_model"] == widest].iloc[0]
        start = (f"faster than dense from d_model {int(faster.min())}" if len(faster)
                 else "not faster than dense at any width measured")
        out.append(f"{kind}: {start}; at d_model {int(widest)} {top['speed-up']:.2f}x, "
                   f"{top['speed-up'] / top['bytes x']:.2f} of the {top['bytes x']:.1f}x its bytes allow.")
    return out


def seed_findings(quality: pd.DataFrame, decode: pd.DataFrame) -> list[str]:
    """The earlier project's three findings, each followed by what this run measured (sentences from the numbers)."""
    one = decode[decode.batch == decode.batch.min()].set_index("variant")
    speed = one["decode speed-up (dense / variant)"].drop("dense", errors="ignore")
    faster = [v for v, s in speed.items() if s > 1]
    slower = [v for v, s in speed.items() if s <= 1]
    best = quality.index[0]
    dense_rank = int(quality.loc["dense", "rank"]) if "dense" in quality.index else None
    beats_dense = [k for k in quality.index if dense_rank and quality.loc[k, "rank"] < dense_rank]
    return [
        f"'Every sparse layer was slower than the dense FF' (on a GPU, computed densely). Here, decoding one token at "
        f"batch {int(decode.batch.min())} on this CPU with each kind's sparse path: faster than dense: "
        f"{', '.join(f'{v} ({speed[v]:.2f}x)' for v in faster) or 'none'}; not faster: "
        f"{', '.join(f'{v} ({speed[v]:.2f}x)' for v in slower) or 'none'}.",
        f"'Dense was best on language-model loss.' Here the lowest validation loss is {best}'s "
        f"({quality.loc[best, 'final val loss']:.4f}); dense ranks {dense_rank} of {len(quality)}.",
        f"'In the right configurations a sparse layer did better than a dense FF of the same size.' Here the kinds "
        f"with a lower validation loss than dense are: {', '.join(beats_dense) or 'none'} (one seed, one run: "
        f"differences of a few hundredths are within the noise chapter 3's study measures).",
    ]
