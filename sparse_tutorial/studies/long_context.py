"""Chapter 7's measurements and figures: long sequences on a CPU.

* :func:`memory_by_depth`: the activation bytes a training step keeps (:mod:`~sparse_tutorial.measure.memory`),
  ordinary against reversible streams, at growing depth; :func:`memory_by_length` the same at growing length;
* :func:`memory_figure`, :func:`attention_figure` (one sequence length, the chapter's slider),
  :func:`attention_scaling_figure`, :func:`decode_figure`;
* :func:`LONG_RUNS` and :func:`train_config_long`: the models the chapter trains at a longer context;
* the sentences the chapter prints from its numbers (:func:`crossover_sentence`, :func:`decode_sentences`).
"""
from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import torch
from matplotlib.figure import Figure

from .. import config as run_config
from ..layers.qkv import modules_near_sqrt
from ..measure.memory import saved_activation_bytes
from ..model import ModelConfig, TransformerLM, book_config, terraformer_config
from ..train import TrainConfig, book_train_config
from .plots import COLORS, PALETTE

__all__ = ["memory_by_depth", "memory_by_length", "memory_figure", "attention_figure", "attention_scaling_figure",
           "decode_figure", "crossover_sentence", "decode_sentences", "LONG_RUNS", "long_run_config",
           "train_config_long"]



def _memory(cfg: ModelConfig, batch: int) -> int:
    torch.manual_seed(0)
    model = TransformerLM(cfg).train()
    idx = torch.randint(0, cfg.vocab_size, (batch, cfg.context_length))
    return saved_activation_bytes(model, idx, idx)


def memory_by_depth(depths, *, batch: int = 8, **model) -> pd.DataFrame:
    """Activation MB kept for backward by the book's model (``model`` overrides, e.g. ``ff="sparse"``) at every
    depth, with ordinary and reversible streams, and each one's ratio to its shallowest model."""
    rows = []
    for n in depths:
        plain = _memory(book_config(**{**model, "n_layers": n}), batch)
        rev = _memory(book_config(**{**model, "n_layers": n, "reversible": True}), batch)
        rows.append({"layers": n, "ordinary MB": plain / 1e6, "reversible MB": rev / 1e6})
    out = pd.DataFrame(rows)
    out["ordinary / shallowest"] = out["ordinary MB"] / out["ordinary MB"].iloc[0]
    out["reversible / shallowest"] = out["reversible MB"] / out["reversible MB"].iloc[0]
    return out


def memory_by_length(lengths, *, batch: int = 1, **model) -> pd.DataFrame:
    """Activation MB kept for backward by the book's model at every context length, ordinary and reversible."""
    rows = []
    for T in lengths:
        base = {**model, "context_length": T}
        rows.append({"T": T, "ordinary MB": _memory(book_config(**base), batch) / 1e6,
                     "reversible MB": _memory(book_config(**{**base, "reversible": True}), batch) / 1e6})
    return pd.DataFrame(rows)


def memory_figure(depth: pd.DataFrame) -> Figure:
    """Activation memory against depth, ordinary and reversible (:func:`memory_by_depth`)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6), layout="constrained")
    ax.plot(depth["layers"], depth["ordinary MB"], "o-", color=COLORS["dense"], label="ordinary residual stream")
    ax.plot(depth["layers"], depth["reversible MB"], "s-", color=COLORS["sparse"], label="reversible streams")
    ax.set(xlabel="layers", ylabel="activations kept for backward (MB)", ylim=(0, None),
           title="Training memory against depth")
    ax.set_xticks(list(depth["layers"]))
    ax.legend()
    return fig


def attention_scaling_figure(att: pd.DataFrame) -> Figure:
    """Time of one attention layer against ``T``, full and LSH (``bench.attention_lengths`` rows), log axes."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6), layout="constrained")
    ax.plot(att["T"], att["full ms"], "o-", color=COLORS["dense"], label="full causal attention")
    ax.plot(att["T"], att["LSH ms"], "s-", color=COLORS["sparse"], label="LSH attention")
    ax.set(xscale="log", yscale="log", xlabel="sequence length T (tokens)", ylabel="forward pass (ms)",
           title="One attention layer, batch 1")
    ax.set_xticks(list(att["T"]), [str(t) for t in att["T"]])
    ax.legend()
    return fig


def attention_figure(att: pd.DataFrame, T: int) -> Figure:
    """At one length ``T``: time and score bytes of full and LSH attention side by side (the chapter's slider)."""
    r = att[att["T"] == T].iloc[0]
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 2.8), layout="constrained")
    labels, colors = ["full", "LSH"], [COLORS["dense"], COLORS["sparse"]]
    axes[0].barh(labels, [r["full ms"], r["LSH ms"]], color=colors)
    axes[0].set(xlabel="forward pass (ms)", title=f"T = {T}: time")
    axes[1].barh(labels, [r["full scores MB"], r["LSH scores MB"]], color=colors)
    axes[1].set(xlabel="attention scores (MB)", title="scores computed")
    for ax in axes:
        ax.invert_yaxis()
    return fig


def decode_figure(dec: pd.DataFrame) -> Figure:
    """Milliseconds per new token against the prompt length, one line per model (``bench.long_decode`` rows)."""
    fig, ax = plt.subplots(figsize=(6.5, 3.6), layout="constrained")
    for color, (v, part) in zip(PALETTE, dec.groupby("variant", sort=False)):
        ax.plot(part["P"], part["ms per token"], "o-", color=color, label=v)
    ax.set(xscale="log", yscale="log", xlabel="tokens already in the context (P)", ylabel="ms per new token",
           title="Decoding one token after a long prompt, batch 1")
    ax.set_xticks(sorted(dec["P"].unique()), [str(p) for p in sorted(dec["P"].unique())])
    ax.legend(fontsize=8)
    return fig


def crossover_sentence(att: pd.DataFrame) -> str:
    """From which measured length on LSH attention was faster than full attention, in this run."""
    faster = att[att["LSH speed-up"] > 1.0]
    if faster.empty:
        return (f"In this run LSH attention was not faster than full attention at any length measured (up to "
                f"T = {int(att['T'].max())}; {att['LSH speed-up'].iloc[-1]:.2f}x at the longest).")
    first = int(faster["T"].min())
    always = bool((att[att["T"] >= first]["LSH speed-up"] > 1.0).all())
    tail = "and at every longer length measured" if always else "but not at every longer length measured"
    return (f"In this run LSH attention was faster than full attention from T = {first} on, {tail} "
            f"({att['LSH speed-up'].iloc[-1]:.2f}x at T = {int(att['T'].iloc[-1])}).")


def decode_sentences(dec: pd.DataFrame) -> list[str]:
    """Per model, its per-token speed-up over dense at the shortest and the longest prompt, in this run."""
    lo, hi = dec["P"].min(), dec["P"].max()
    out = []
    for v, part in dec[dec["variant"] != "dense"].groupby("variant", sort=False):
        a = part[part["P"] == lo]["speed-up"].iloc[0]
        b = part[part["P"] == hi]["speed-up"].iloc[0]
        out.append(f"In this run, {v}: {a:.2f}x dense's speed per token after {lo} tokens, {b:.2f}x after {hi}.")
    return out


#: the models chapter 7 trains at a longer context: label -> overrides of the book's model
LONG_RUNS: dict[str, dict] = {
    "dense": dict(ff="dense"),
    "LSH attention": dict(ff="dense", qkv="lsh"),
    "dense + SRU branch": dict(ff="dense", sru_dim=32),
    "dense + sparse loss": dict(ff="dense", loss_modules=4),
    "sparse FF + QKV": dict(ff="sparse", qkv="conv", ff_hard_prob=1.0),
    "Terraformer": dict(terraformer=True),
}


def long_run_config(label: str, vocab_size: int) -> ModelConfig:
    """The model of :data:`LONG_RUNS` ``label`` at the chapter's longer context (512 tokens; 64 in fast mode)."""
    if label not in LONG_RUNS:
        raise ValueError(f"label must be one of {list(LONG_RUNS)}, got label={label!r}")
    kw = dict(LONG_RUNS[label])
    size = dict(vocab_size=vocab_size, context_length=run_config.pick(default=512, fast=64))
    if kw.pop("terraformer", False):
        return terraformer_config(**size)
    if "sru_dim" in kw:
        kw["sru_dim"] = run_config.pick(default=kw["sru_dim"], fast=8)
    if kw.get("qkv") == "conv":                       # S: the divisor of d_model nearest sqrt(d_model), chapter 4's
        kw["qkv_modules"] = modules_near_sqrt(book_config(**size).d_model)
    return book_config(**{**size, **kw})


def train_config_long(**overrides) -> TrainConfig:
    """The chapter's training at the longer context: the book's tokens per step (batch x context), fewer steps."""
    base = run_config.pick(default=dict(steps=600, batch_size=8, eval_every=100),
                           fast=dict(steps=20, batch_size=4, eval_every=10))
    return book_train_config(**{**base, **overrides})
