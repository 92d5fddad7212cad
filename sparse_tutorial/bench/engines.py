"""``bench generate --engine pytorch lean torchscript onnxruntime compile``: the whole-model decoding of
:mod:`.whole_model` in eager PyTorch, by its lean step (:mod:`sparse_tutorial.lean_decode`), as TorchScript graphs
(``torch.jit.trace``), in ONNX Runtime and compiled by ``torch.compile`` (:mod:`sparse_tutorial.onnx_engine`),
side by side.

The same models (same seed, random weights) decode the same prompt greedily in every engine, round-robin.
Every step's logits in a graph engine are compared with eager PyTorch's, so a speed-up is never bought with a
wrong answer. Ratios are taken within one engine (``dense / variant``) and against the fastest dense model: if
another engine runs the dense model faster than eager PyTorch, that is the honest baseline.
"""
from __future__ import annotations

import statistics
from typing import Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from .. import onnx_engine
from ..layers.sparse_ff import SparseFF
from ..lean_decode import LeanDecoder
from ..measure.timing import spread
from ..model import TransformerLM
from .harness import check_choice, check_counts, clock, free_memory, machine_columns, positive
from .paths import check_paths, sparse_ff_layers, use_path
from .whole_model import MODEL_VARIANTS, Generation, all_variants, build_model, model_config, time_generations

__all__ = ["ENGINES", "DEFAULT_ENGINES", "engine_generate", "bytes_floor", "step_weight_bytes", "bytes_limits"]

#: the engines ``generate`` can time: eager PyTorch, its lean step (:class:`~sparse_tutorial.lean_decode.LeanDecoder`:
#: the same kernels, the per-call Python done once), TorchScript graphs (``torch.jit.trace``), ONNX Runtime, and
#: the graphs compiled by ``torch.compile`` (TorchInductor; needs a C++ compiler, and tens of seconds a model)
ENGINES = ("pytorch", "lean", "torchscript", "onnxruntime", "compile")

#: the engines :func:`engine_generate` times unless told otherwise (chapter 5's table): all but ``compile``,
#: whose compilation would take most of the chapter's time in CI
DEFAULT_ENGINES = ("pytorch", "lean", "torchscript", "onnxruntime")


class _GraphGeneration:
    """:class:`~.whole_model.Generation` with a graph engine's decoder (ONNX Runtime or TorchScript): greedy
    decoding, the per-token steps timed."""

    def __init__(self, decoder: onnx_engine.OnnxDecoder, prompt: torch.Tensor, new_tokens: int):
        self.decoder, self.prompt, self.new_tokens = decoder, prompt.numpy(), new_tokens
        self.per_token: list[float] = []
        self.logits: list[np.ndarray] = []           # the last generation's logits, prompt and every step

    def reset(self) -> None:
        """Forget the recorded times (after the warm-up)."""
        self.per_token.clear()

    def __call__(self):
        _, self.logits = self.decoder.generate(self.prompt, self.new_tokens + 1, clock=clock())
        self.per_token.append(statistics.fmean(self.decoder.per_token))


class _LeanGeneration(_GraphGeneration):
    """:class:`_GraphGeneration` with the lean step (:class:`~sparse_tutorial.lean_decode.LeanDecoder`) in PyTorch;
    the sparse layers take the model's decode paths (the fused kernels where they apply)."""

    def __init__(self, model: TransformerLM, prompt: torch.Tensor, new_tokens: int, path: str | None):
        super().__init__(LeanDecoder(model), prompt, new_tokens)
        self.model, self.prompt_t, self.path = model, prompt, path
        #: the path the sparse FF layers took (None: the model has none)
        self.step_path: str | None = None

    def __call__(self):
        if self.path is not None:
            use_path(self.model, self.path)
        _, logits = self.decoder.generate(self.prompt_t, self.new_tokens + 1, clock=clock())
        self.logits = logits
        self.per_token.append(statistics.fmean(self.decoder.per_token))
        layers = sparse_ff_layers(self.model)
        self.step_path = layers[0].last_decode_path if layers else None


def _pytorch_logits(model, prompt: torch.Tensor, new_tokens: int) -> list[np.ndarray]:
    """PyTorch's logits at the last position after the prompt and after each greedy step (with the cache)."""
    cache, out = model.new_cache(), []
    with torch.inference_mode():
        logits, _ = model(prompt, cache=cache)
        for step in range(new_tokens + 1):
            out.append(logits[:, -1].numpy())
            if step < new_tokens:
                logits, _ = model(logits[:, -1].argmax(-1, keepdim=True), cache=cache)
    return out


def engine_generate(variants: Sequence[str] = tuple(MODEL_VARIANTS), *, engines: Sequence[str] = DEFAULT_ENGINES,
                    batch: int = 1, d_model: int = 384, n_layers: int = 6, prompt_len: int = 100,
                    new_tokens: int = 20, context_length: int = 256, qkv_modules: int = 16,
                    repeats: int = 5, warmup: int = 1, progress: bool = True,
                    path: str | None = None) -> pd.DataFrame:
    """Per-token greedy decode time of each variant in each engine, with the check against PyTorch.

    Columns: ``decode µs per token`` (median over ``repeats`` generations of the mean step), its
    ``decode IQR / median``, ``speed-up (dense / variant)`` within the engine, ``speed-up vs fastest dense``
    (the fastest dense engine's time over this row's), and ``max |logit diff|`` against PyTorch over the prompt and
    every step (0 for PyTorch itself). In PyTorch and its lean step the sparse FF layers decode by ``path``
    (:mod:`.paths`; default the best available); the graphs of ``torchscript``, ``onnxruntime`` and ``compile`` trace the PyTorch
    reference (:meth:`SparseFF.decode`).
    """
    path = check_paths(path)[0]
    variants, engines = list(variants), list(engines)
    for v in variants:
        check_choice("variant", v, all_variants())
    if not engines or len(set(engines)) != len(engines):
        raise ValueError(f"engines must be a non-empty list without repeats, got engines={engines}")
    for e in engines:
        check_choice("engine", e, ENGINES)
    if "onnxruntime" in engines and not onnx_engine.available():
        raise ValueError(f"engine='onnxruntime' is not available here: {onnx_engine.unavailable_reason()}")
    for name, value in (("batch", batch), ("prompt_len", prompt_len), ("new_tokens", new_tokens)):
        positive(name, value)
    if prompt_len + new_tokens + 1 > context_length:
        raise ValueError(f"prompt_len + new_tokens + 1 must fit in context_length={context_length}, got "
                         f"prompt_len={prompt_len}, new_tokens={new_tokens}")
    check_counts(repeats, warmup)
    torch.manual_seed(0)
    models = {v: build_model(v, d_model, n_layers, context_length, qkv_modules, None) for v in variants}
    prompt = torch.randint(0, models[variants[0]].cfg.vocab_size, (batch, prompt_len))
    runs, errors = {}, {}
    graphs = {"torchscript": onnx_engine.trace_decoder, "onnxruntime": onnx_engine.export_decoder,
              "compile": onnx_engine.compile_decoder}
    for v, m in tqdm(models.items(), desc="export", disable=not progress or engines == ["pytorch"]):
        own_path = path if sparse_ff_layers(m) else None
        ref = None                                  # PyTorch's logits, for every other engine's check
        for e in engines:
            if e == "pytorch":
                runs[(v, e)], errors[(v, e)] = Generation(m, prompt, new_tokens, own_path), 0.0
                continue
            if e == "lean":
                run = _LeanGeneration(m, prompt, new_tokens, own_path)
            else:
                run = _GraphGeneration(graphs[e](m, batch=batch, threads=torch.get_num_threads()), prompt,
                                       new_tokens)
            runs[(v, e)] = run
            run()
            ref = _pytorch_logits(m, prompt, new_tokens) if ref is None else ref
            errors[(v, e)] = max(float(np.abs(a - b).max()) for a, b in zip(run.logits, ref))
    time_generations(runs, repeats=repeats, warmup=warmup, desc="decode" if progress else None)
    med = {k: statistics.median(r.per_token) for k, r in runs.items()}
    dense = {e: med[("dense", e)] for e in engines if ("dense", e) in med}
    rows = []
    for (v, e), t in med.items():
        row = {"variant": v, "engine": e, "batch": batch, "d_model": d_model, "n_layers": n_layers,
               "context_length": context_length, "prompt_len": prompt_len, "new_tokens": new_tokens,
               "decode µs per token": t * 1e6 / batch, "decode IQR / median": spread(runs[(v, e)].per_token),
               "max |logit diff|": errors[(v, e)],
               "step path": getattr(runs[(v, e)], "step_path", None)}         # the sparse FF's, in PyTorch
        if e in dense:
            row["speed-up (dense / variant)"] = dense[e] / t
        if dense:
            row["speed-up vs fastest dense"] = min(dense.values()) / t
        rows.append({**row, **machine_columns()})
    del models, runs
    free_memory()
    return pd.DataFrame(rows)


def bytes_floor(df: pd.DataFrame, read_gbps: float) -> pd.DataFrame:
    """Each engine's dense decode time per token against its bytes floor, from :func:`engine_generate`'s table.

    The floor is the time to read, at ``read_gbps`` (``bench bandwidth``'s "sum (read)"), what a dense step must
    read: every float32 weight once, and the keys and values cached so far (their mean over the timed steps).
    Columns: ``engine``, ``dense µs per token``, ``floor µs``, ``time / floor`` (1 is the limit).
    """
    if not read_gbps > 0:
        raise ValueError(f"read_gbps must be a positive number of GB/s, got read_gbps={read_gbps!r}")
    rows = []
    for _, r in df[df["variant"] == "dense"].iterrows():
        with torch.device("meta"):                                    # shapes only: nothing is allocated
            weights = 4 * TransformerLM(model_config("dense", int(r["d_model"]), int(r["n_layers"]),
                                                     context_length=int(r["context_length"]))).num_params()
        cached = r["prompt_len"] + (r["new_tokens"] + 1) / 2          # mean positions read per timed step
        kv = 4 * 2 * r["n_layers"] * cached * r["d_model"] * r["batch"]
        floor = (weights + kv) / (read_gbps * 1e9) / r["batch"]
        rows.append({"engine": r["engine"], "dense µs per token": r["decode µs per token"],
                     "MB read per step": (weights + kv) / 1e6, "floor µs": floor * 1e6,
                     "time / floor": r["decode µs per token"] / (floor * 1e6)})
    return pd.DataFrame(rows)


def step_weight_bytes(model: nn.Module) -> float:
    """Bytes of weights one decoding step reads: every parameter once (a tied one once), except the sparse FF's
    ``W1`` and ``W2``, of which a token reads one row in ``N`` (the unit each block selects)."""
    seen, total = set(), 0.0
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            share = 1 / module.block_size if isinstance(module, SparseFF) and name in ("w1", "w2") else 1
            total += p.numel() * p.element_size() * share
    return total


def bytes_limits(df: pd.DataFrame) -> pd.DataFrame:
    """What each variant's bytes allow, from :func:`engine_generate`'s table: the MB a decoding step reads (the
    weights, :func:`step_weight_bytes`, and the keys and values cached so far, their mean over the timed
    steps), ``bytes x`` (the dense model's MB over the variant's: the speed-up a step that reads its bytes as
    fast as the dense one would reach), the best ``measured x`` over the engines (against the fastest dense
    model) and its ``share of bytes limit``. One row per variant."""
    rows = []
    for v, part in df.groupby("variant", sort=False):
        r = part.iloc[0]
        with torch.device("meta"):                                    # shapes only: nothing is allocated
            model = TransformerLM(model_config(v, int(r["d_model"]), int(r["n_layers"]),
                                               context_length=int(r["context_length"])))
        cached = r["prompt_len"] + (r["new_tokens"] + 1) / 2          # mean positions read per timed step
        kv = sum(4 * 2 * cached * b.attn.d_model * r["batch"] for b in model.blocks)
        rows.append({"variant": v, "MB read per step": (step_weight_bytes(model) + kv) / 1e6,
                     "measured x": float(part["speed-up vs fastest dense"].max()),
                     "best engine": part.loc[part["speed-up vs fastest dense"].idxmax(), "engine"]})
    out = pd.DataFrame(rows).set_index("variant")
    out.insert(1, "bytes x", out.loc["dense", "MB read per step"] / out["MB read per step"]
               if "dense" in out.index else float("nan"))
    out["share of bytes limit"] = out["measured x"] / out["bytes x"]
    return out
