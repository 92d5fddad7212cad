"""The closing page's table: each claim of the paper and of the earlier projects, against this build's numbers.

Every claim (:data:`CLAIMS`) names the chapter that measures it, where its number comes from (a chapter's run
record, :mod:`sparse_tutorial.studies.record`, or a committed results CSV) and the test that decides whether it
held. Nothing here measures or types a result: a claim whose number no chapter recorded in this build says so.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pandas as pd

from . import gap

__all__ = ["Claim", "CLAIMS", "claims_table", "study_gap", "read_study", "NOT_MEASURED"]

NOT_MEASURED = "not measured in this build"
#: The book's quality target (chapter 3): a sparse model within 2% of its dense twin's validation loss.
LOSS_TOLERANCE = 0.02


@dataclass(frozen=True)
class Claim:
    """``check(values, study) -> (measurement, held)``: ``values`` is the chapter's recorded values (or None),
    ``study`` the committed quality study's gap table (or None); ``held`` is True, False or None."""
    source: str
    claim: str
    chapter: str          # the chapter's document name, e.g. "01_dense_ff"
    criterion: str
    check: Callable[[dict | None, pd.DataFrame | None], tuple[str, bool | None]]


def _need(values: dict | None, *keys: str) -> bool:
    return values is not None and all(values.get(k) is not None for k in keys)


def _bytes_bound(v, _):
    if not _need(v, "batch1 measured / predicted"):
        return NOT_MEASURED, None
    r = v["batch1 measured / predicted"]
    return f"batch-1 time {r:.2f}x weight bytes / bandwidth", 0.8 <= r <= 3.0


def _ff_share(v, _):
    if not _need(v, "FF share min", "FF share max"):
        return NOT_MEASURED, None
    lo, hi = v["FF share min"], v["FF share max"]
    return f"{lo:.0%} to {hi:.0%} of a block's parameters", 0.6 <= lo and hi <= 0.7


def _controller_macs(v, _):
    if not _need(v, "800M dense / sparse MACs"):
        return NOT_MEASURED, None
    r = v["800M dense / sparse MACs"]
    return f"{r:.1f}x fewer multiply-adds (low-rank controller, d_lowrank 64)", round(r) >= 18


def _sampler(v, _):
    if not _need(v, "sampler max binomial std"):
        return NOT_MEASURED, None
    s = v["sampler max binomial std"]
    return f"largest gap to softmax(logits/0.1): {s:.1f} binomial std", s < 4


def _permutation(v, _):
    if not _need(v, "permutation mse", "permutation found"):
        return NOT_MEASURED, None
    return (f"held-out MSE {v['permutation mse']:.2g}; permutation recovered: {v['permutation found']}",
            bool(v["permutation found"]) and v["permutation mse"] < 1e-6)


def _qkv_params(v, _):
    if not _need(v, "qkv params d1024", "dense qkv params d1024", "formula matches"):
        return NOT_MEASURED, None
    ratio = v["dense qkv params d1024"] / v["qkv params d1024"]
    return (f"{int(v['qkv params d1024']):,} against {int(v['dense qkv params d1024']):,} ({ratio:.0f}x fewer); "
            f"module count = formula: {v['formula matches']}", bool(v["formula matches"]) and ratio > 20)


def _loss_ratio(key: str, what: str):
    def check(v, _):
        if not _need(v, key):
            return NOT_MEASURED, None
        r = v[key]
        return f"{what}: val loss {r - 1:+.1%} against dense", r <= 1 + LOSS_TOLERANCE
    return check


def _study_sparse(_, study):
    if study is None:
        return NOT_MEASURED, None
    gap = study_gap(study, "sparse")
    if gap is None:
        return NOT_MEASURED, None
    steps, pct = gap
    return (f"{pct:+.1f}% val loss against dense after {steps} steps (results/quality_gap.csv)",
            pct <= 100 * LOSS_TOLERANCE)


def _train_step(v, _):
    if not _need(v, "sparse FF step / dense step"):
        return NOT_MEASURED, None
    r = v["sparse FF step / dense step"]
    return f"a sparse-FF training step takes {r:.2f}x a dense one", r > 1


def _decode_kinds(v, _):
    if not _need(v, "batch-1 decode speed-up"):
        return NOT_MEASURED, None
    sp = v["batch-1 decode speed-up"]
    text = ", ".join(f"{k} {x:.2f}x" for k, x in sp.items())
    return f"batch-1 decode speed-up over dense with each kind's sparse path: {text}", all(x < 1 for x in sp.values())


def _dense_best(v, _):
    if not _need(v, "ranking by val loss"):
        return NOT_MEASURED, None
    ranking = v["ranking by val loss"]
    return f"ranked by val loss: {', '.join(ranking)}", ranking[0] == "dense"


def _ratio_check(key: str, what: str, held: Callable[[float], bool]):
    def check(v, _):
        if not _need(v, key):
            return NOT_MEASURED, None
        return f"{what} {v[key]:.2f}x", held(v[key])
    return check


CLAIMS: list[Claim] = [
    Claim("paper", "Single-token decoding is bound by the bytes of weights it reads", "01_dense_ff",
          "batch-1 FF time within 0.8-3x of weight bytes / bandwidth", _bytes_bound),
    Claim("paper", "The FF layer holds about two thirds of a block (d_ff = 4 d_model)", "01_dense_ff",
          "60-70% in every shape", _ff_share),
    Claim("paper", "A low-rank controller keeps the 800M sparse FF about 18x cheaper per token", "02_controller",
          "at least 18x fewer multiply-adds (rounded)", _controller_macs),
    Claim("paper", "Gumbel noise at temperature 0.1 samples from softmax(logits / 0.1)", "02_controller",
          "under 4 binomial std from the softmax", _sampler),
    Claim("paper", "The multiplicative layer can express any permutation", "04_sparse_qkv",
          "fit recovers the permutation, MSE below 1e-6", _permutation),
    Claim("paper", "Sparse QKV needs O(d^1.5) parameters (about 25x fewer at d = 1024)", "04_sparse_qkv",
          "the module's count equals the formula and is over 20x below dense", _qkv_params),
    Claim("paper", "Sparse FF + sparse QKV match dense quality at equal parameters", "04_sparse_qkv",
          "val loss within 2% of dense", _loss_ratio("sparse FF+QKV val / dense val", "sparse FF + QKV")),
    Claim("paper", "Sparse FF matches dense quality (this build's chapter 3 run)", "03_training_sparse_ff",
          "val loss within 2% of dense", _loss_ratio("LM sparse val / dense val", "sparse FF")),
    Claim("paper", "Sparse FF matches dense quality (the quality study, default size)", "03_training_sparse_ff",
          "val loss within 2% of dense", _study_sparse),
    Claim("paper", "Sparse FF speeds up decoding of a 800M-shape block (1.9x in the paper)", "05_decoding_on_cpu",
          "speed-up above 1", _ratio_check("800M sparse FF speed-up", "800M block, sparse FF:", lambda x: x > 1)),
    Claim("paper", "Sparse FF + QKV speed up an 800M-shape block 3.05x", "05_decoding_on_cpu",
          "speed-up of at least 3.05x", _ratio_check("800M sparse FF + QKV speed-up", "800M block, sparse FF + QKV:",
                                                  lambda x: x >= 3.05)),
    Claim("paper", "Reversible layers keep activation memory from growing with depth", "07_terraformer",
          "at most 1.5x the 2-layer memory at 12 layers",
          _ratio_check("reversible memory ratio", "12 layers / 2 layers, reversible:", lambda x: x <= 1.5)),
    Claim("paper", "The Terraformer decodes long contexts faster than dense (37x at 17B)", "07_terraformer",
          "Terraformer-style model faster than dense per token after 4,096 tokens (fewer in the fast build)",
          _ratio_check("Terraformer decode speed-up", "book-size model, speed-up per token:", lambda x: x > 1)),
    Claim("earlier project", "A sparse-FF training step costs more than a dense one (+18%)", "04_sparse_qkv",
          "sparse step / dense step above 1", _train_step),
    Claim("earlier project", "Every sparse FF variant is slower than dense", "06_moe_and_pkm",
          "every kind below 1x at batch 1", _decode_kinds),
    Claim("earlier project", "The dense FF reaches the best language-model loss", "06_moe_and_pkm",
          "dense ranks first by val loss", _dense_best),
]


def study_gap(study: pd.DataFrame, lever: str) -> tuple[int, float] | None:
    """``(steps, gap %)`` of ``lever`` at the largest number of steps the quality study recorded for it."""
    rows = study[(study.lever == lever) & study["gap %"].notna()]
    if rows.empty:
        return None
    last = rows.sort_values("steps").iloc[-1]
    return int(last.steps), float(last["gap %"])


def claims_table(records: dict[str, dict], study: pd.DataFrame | None = None,
                 claims: list[Claim] = CLAIMS) -> pd.DataFrame:
    """One row per claim: the claim, our measurement, the chapter, the criterion and whether it held."""
    rows = []
    for c in claims:
        doc = records.get(c.chapter)
        measured, held = c.check(None if doc is None else doc["values"], study)
        rows.append({"source": c.source, "claim": c.claim, "measured in this build": measured,
                     "chapter": c.chapter, "held if": c.criterion,
                     "held": {True: "yes", False: "no", None: "not measured"}[held]})
    return pd.DataFrame(rows)


def read_study(path: str | Path) -> pd.DataFrame | None:
    """The committed quality study's gap table, or None when the CSV is missing."""
    path = Path(path)
    if not path.is_file():
        return None
    rows, _ = gap.read_study(path)
    return gap.gap_table(rows)
