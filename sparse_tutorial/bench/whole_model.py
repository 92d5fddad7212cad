"""``bench generate`` and ``bench crossover``: a whole model decoding with the cache (prefill, per-token
steps, the batch size where the gathered FF path stops paying), and one forward without a cache."""
from __future__ import annotations

import statistics
from typing import Sequence

import pandas as pd
import torch
from tqdm.auto import tqdm

from ..config import pick
from ..layers.registry import FF_KINDS
from ..measure.timing import spread
from ..model import ModelConfig, TransformerLM, seed_config
from .harness import check_choice, check_counts, clock, free_memory, interleaved, machine_columns, positive
from .paths import check_paths, sparse_ff_layers, use_path

__all__ = ["MODEL_VARIANTS", "all_variants", "model_config", "build_model", "Generation", "time_generations",
           "generate_bench", "forward_tokens", "crossover"]


#: The model variants of chapter 5's whole-model tables: label -> (``ModelConfig.ff``, ``ModelConfig.qkv``).
MODEL_VARIANTS = {"dense": ("dense", "dense"), "sparse FF": ("sparse", "dense"),
                  "sparse FF + QKV": ("sparse", "conv")}


def all_variants() -> dict[str, tuple[str, str]]:
    """:data:`MODEL_VARIANTS` and, for every other registered FF kind, ``"<kind> FF"`` with dense attention.

    A kind added to the registry is a variant of ``generate`` at once (``--variants dense "moe FF" "pkm FF"``).
    """
    extra = {f"{kind} FF": (kind, "dense") for kind in FF_KINDS if kind not in ("dense", "sparse")}
    return {**MODEL_VARIANTS, **extra}


def model_config(variant: str, d_model: int = 384, n_layers: int = 6, *, context_length: int = 256,
                 qkv_modules: int = 16, block_size: int = 64, sparse_decode_max_rows: int | None = None
                 ) -> ModelConfig:
    """The seed project's model shape (``d_model 384``, 6 layers, ``d_ff = 4 d_model``, ``N = 64``, context 256)
    at any width, in one of :data:`MODEL_VARIANTS`. Heads of 64 units; sparse QKV with ``S = qkv_modules``."""
    check_choice("variant", variant, all_variants())
    positive("d_model", d_model)
    if d_model % 64:
        raise ValueError(f"d_model must be a multiple of 64 (heads of 64 units), got d_model={d_model}")
    ff, qkv = all_variants()[variant]
    return seed_config(ff=ff, d_model=d_model, n_heads=d_model // 64,
                       n_layers=positive("n_layers", n_layers), d_ff=4 * d_model, ff_block_size=block_size,
                       context_length=positive("context_length", context_length), dropout=0.0,
                       qkv=qkv, qkv_modules=qkv_modules if qkv != "dense" else None)


def build_model(variant: str, d_model: int, n_layers: int, context_length: int, qkv_modules: int,
                max_rows: int | None) -> TransformerLM:
    """A fresh eval-mode model of :func:`model_config` (random weights), with ``sparse_decode_max_rows`` if given."""
    model = TransformerLM(model_config(variant, d_model, n_layers, context_length=context_length,
                                       qkv_modules=qkv_modules)).eval()
    if max_rows is not None:
        model.sparse_decode_max_rows = max_rows
    return model


class Generation:
    """Greedy decoding with the cache, the prefill and the per-token steps timed apart."""

    def __init__(self, model: TransformerLM, prompt: torch.Tensor, new_tokens: int, path: str | None = None):
        self.model, self.prompt, self.new_tokens, self.path = model, prompt, new_tokens, path
        self.prefill: list[float] = []
        self.per_token: list[float] = []
        #: the path the sparse FF layers took in the last decoding step (None: the model has none)
        self.step_path: str | None = None

    def reset(self) -> None:
        """Forget the recorded times (after the warm-up)."""
        self.prefill.clear()
        self.per_token.clear()

    def __call__(self):
        m, now = self.model, clock()
        if self.path is not None:
            use_path(m, self.path)
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
        layers = sparse_ff_layers(m)
        self.step_path = layers[0].last_decode_path if layers else None


def time_generations(runs: dict, *, repeats: int, warmup: int = 1, desc: str | None = None) -> None:
    """Call every generation of ``runs`` round-robin: ``warmup`` untimed rounds, then ``repeats`` recorded ones
    (each run keeps its own times; a run is any callable with ``reset()``, e.g. :class:`Generation`)."""
    with torch.inference_mode():
        for _ in range(warmup):
            for r in runs.values():
                r()
        for r in runs.values():
            r.reset()
        for _ in tqdm(range(repeats), desc=desc, disable=desc is None, leave=False):
            for r in runs.values():
                r()


def generate_bench(batch_sizes: Sequence[int] | None = None, *, d_model: int = 384, n_layers: int = 6,
                   prompt_len: int | None = None, new_tokens: int | None = None,
                   variants: Sequence[str] = tuple(MODEL_VARIANTS),
                   context_length: int = 256, qkv_modules: int = 16, sparse_decode_max_rows: int | None = None,
                   repeats: int | None = None, warmup: int = 1, progress: bool = True,
                   paths: Sequence[str] | str | None = None) -> pd.DataFrame:
    """Prefill time of a ``prompt_len``-token prompt and per-token greedy decode time, per batch size.

    The variants are built once (random weights) and run round-robin for every batch size. The decode path of
    the sparse FF follows the models' rule (:meth:`Block.feed_forward`, ``sparse_decode_max_rows``; pass a
    value to override it). Ratios are ``dense / variant``: above 1 the variant is faster.

    ``paths``: the sparse FF decode paths (:mod:`.paths`; default the best available). A variant with sparse FF
    layers gets one row per path, the others one row with path None. With ``"fused"`` the layers take the
    kernel for every call it applies to (the decoding steps up to ``SparseFF.FUSED_MAX_ROWS`` sequences) and
    PyTorch for the rest (the prompt); ``step path`` says which one the decoding steps took.
    """
    paths = check_paths(paths)
    batch_sizes = pick(default=[1, 8, 64], fast=[1, 8]) if batch_sizes is None else batch_sizes
    batch_sizes = [positive("batch size", b) for b in batch_sizes]
    if not batch_sizes:
        raise ValueError("batch_sizes must not be empty")
    prompt_len = pick(default=100, fast=32) if prompt_len is None else prompt_len
    new_tokens = pick(default=20, fast=8) if new_tokens is None else new_tokens
    variants = list(variants)
    for v in variants:
        check_choice("variant", v, all_variants())
    positive("prompt_len", prompt_len)
    positive("new_tokens", new_tokens)
    if prompt_len + new_tokens > context_length:
        raise ValueError(f"prompt_len + new_tokens must fit in context_length={context_length}, got "
                         f"prompt_len={prompt_len}, new_tokens={new_tokens}")
    check_counts(1 if repeats is None else repeats, warmup)
    repeats = pick(default=5, fast=2) if repeats is None else repeats
    torch.manual_seed(0)
    models = {v: build_model(v, d_model, n_layers, context_length, qkv_modules, sparse_decode_max_rows)
              for v in variants}
    rows = []
    for B in tqdm(batch_sizes, desc=f"generate d_model {d_model}", disable=not progress):
        prompt = torch.randint(0, models[variants[0]].cfg.vocab_size, (B, prompt_len))
        runs = {}
        for v, m in models.items():
            for p in (paths if sparse_ff_layers(m) else [None]):
                runs[(v, p)] = Generation(m, prompt, new_tokens, p)
        time_generations(runs, repeats=repeats, warmup=warmup)
        med = {k: (statistics.median(r.prefill), statistics.median(r.per_token)) for k, r in runs.items()}
        for (v, path), (pre, tok) in med.items():
            row = {"d_model": d_model, "n_layers": n_layers, "batch": B, "prompt_len": prompt_len,
                   "variant": v, "path": path, "step path": runs[(v, path)].step_path,
                   "prefill ms": pre * 1e3, "decode ms per step": tok * 1e3,
                   "decode µs per token": tok * 1e6 / B,
                   "decode IQR / median": spread(runs[(v, path)].per_token)}
            if ("dense", None) in med:
                row["prefill ratio (variant / dense)"] = pre / med[("dense", None)][0]
                row["decode speed-up (dense / variant)"] = med[("dense", None)][1] / tok
            rows.append({**row, **machine_columns()})
    del models
    free_memory()
    return pd.DataFrame(rows)


def forward_tokens(widths: Sequence[int] = (384, 768, 1536), tokens: Sequence[int] = (1, 100), *,
                   n_layers: int = 6, repeats: int | None = None, warmup: int = 2,
                   progress: bool = True) -> pd.DataFrame:
    """The seed project's measurement, redone: one whole-model forward on ``T`` tokens, **no cache**.

    Dense against sparse FF for every width and token count, interleaved. The sparse model runs its FF
    layers through ``SparseFF.decode`` (the default rule of :meth:`Block.feed_forward`)."""
    widths, tokens = list(widths), [positive("tokens", t) for t in tokens]
    if not widths or not tokens:
        raise ValueError("widths and tokens must not be empty")
    repeats = pick(default=10, fast=3) if repeats is None else repeats
    rows = []
    for d in tqdm(widths, desc="forward, no cache", disable=not progress):
        torch.manual_seed(0)
        models = {v: build_model(v, d, n_layers, 256, 16, None) for v in ("dense", "sparse FF")}
        for T in tokens:
            idx = torch.randint(0, 65, (1, T))
            t = interleaved({v: (lambda m=m: m(idx)) for v, m in models.items()}, repeats=repeats, warmup=warmup)
            rows.append({"d_model": d, "tokens": T, "dense ms": t["dense"] * 1e3,
                         "sparse ms": t["sparse FF"] * 1e3, "dense / sparse": t["dense"] / t["sparse FF"],
                         **machine_columns()})
        del models
        free_memory()
    return pd.DataFrame(rows)


def crossover(batch_sizes: Sequence[int] = (1, 2, 4, 8, 16, 32, 64), *, d_model: int = 384, n_layers: int = 6,
              cache_len: int = 100, repeats: int | None = None, warmup: int = 2,
              progress: bool = True) -> pd.DataFrame:
    """One decode step of the whole model for ``B`` sequences: the sparse FF through ``SparseFF.decode`` against
    its dense-masked path (and the dense model), to place ``Block.sparse_decode_max_rows``.

    Columns: ms per step of each, and ``decode / masked`` (below 1: the decode path is cheaper at that batch).
    """
    batch_sizes = [positive("batch size", b) for b in batch_sizes]
    if not batch_sizes:
        raise ValueError("batch_sizes must not be empty")
    repeats = pick(default=15, fast=4) if repeats is None else repeats
    torch.manual_seed(0)
    dense = build_model("dense", d_model, n_layers, 256, 16, None)
    sparse = build_model("sparse FF", d_model, n_layers, 256, 16, None)
    rows = []
    for B in tqdm(batch_sizes, desc="gather vs masked", disable=not progress):
        prompt = torch.randint(0, 65, (B, cache_len))
        steps = {}
        for name, model, max_rows in (("dense", dense, None), ("decode", sparse, 1 << 30), ("masked", sparse, 0)):
            steps[name] = _CachedStep(model, prompt, max_rows)
        t = interleaved(steps, repeats=repeats, warmup=warmup)
        rows.append({"d_model": d_model, "batch": B, "dense ms": t["dense"] * 1e3,
                     "sparse decode ms": t["decode"] * 1e3, "sparse masked ms": t["masked"] * 1e3,
                     "decode / masked": t["decode"] / t["masked"], **machine_columns()})
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
