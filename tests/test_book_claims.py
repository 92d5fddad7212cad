"""Sentences of the book that the code once contradicted: the text must agree with what the code does.

Each claim has a behaviour test (what the code does) and a scan of the book's text (pages, notebooks, the
package's docstrings) for the wording that said otherwise.
"""
import json
import re
from pathlib import Path

import pytest
import torch

from sparse_tutorial.layers import SparseFF
from sparse_tutorial.model import TransformerLM, book_config

ROOT = Path(__file__).resolve().parents[1]

#: wording that contradicts the code, with what the code does instead
CONTRADICTIONS = {
    r"process\w* (the|a) prompt densely": "every eval-mode call, the prefill included, goes through SparseFF.decode",
    r"sparse path only for single-token": "every eval-mode call, the prefill included, goes through SparseFF.decode",
    r"\(\"prefill\", the\s+dense-masked": "every eval-mode call, the prefill included, goes through SparseFF.decode",
    r"paper reports 169,152|169,152 parameters per layer the\s+paper reports|the paper's 169,152":
        "169,152 is our count from the reference's layer shapes, not a number the paper prints",
}


def book_texts() -> dict[str, str]:
    """Every page, every notebook's cells and every package module, by path."""
    texts = {str(p.relative_to(ROOT)): p.read_text(encoding="utf-8") for p in (ROOT / "book").glob("*.md")}
    for nb in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(nb.read_text(encoding="utf-8"))["cells"]
        texts[str(nb.relative_to(ROOT))] = "\n".join("".join(c["source"]) for c in cells)
    for py in (ROOT / "sparse_tutorial").rglob("*.py"):
        texts[str(py.relative_to(ROOT))] = py.read_text(encoding="utf-8")
    return texts


def contradictions(texts: dict[str, str]) -> list[str]:
    found = []
    for path, text in texts.items():
        for pattern, truth in CONTRADICTIONS.items():
            for m in re.finditer(pattern, text, flags=re.IGNORECASE):
                found.append(f"{path}: {m.group(0)!r} (the code: {truth})")
    return found


def test_no_page_contradicts_the_code():
    assert not contradictions(book_texts())


def test_the_scan_finds_the_old_wording():
    old = {"intro": "Process the prompt densely (the *prefill*), and use the\n  sparse path only for single-token decoding",
           "ch4": "Our module has exactly the 169,152 parameters per layer the\n  paper reports at d = 1024"}
    assert len(contradictions(old)) == 3


def test_prefill_goes_through_the_sparse_decode_path_by_default(monkeypatch):
    model = TransformerLM(book_config("sparse", vocab_size=20)).eval()
    rows = []
    original = SparseFF.decode
    monkeypatch.setattr(SparseFF, "decode", lambda self, x: rows.append(x.shape[:-1].numel()) or original(self, x))
    prompt = torch.randint(0, 20, (2, model.cfg.context_length))
    with torch.no_grad():
        model(prompt, cache=model.new_cache())            # the prefill of a full-context prompt
    assert rows == [prompt.numel()] * model.cfg.n_layers


def test_the_qkv_counts_the_book_prints_are_the_formulas():
    from sparse_tutorial.studies.qkv_study import conv_qkv_params
    assert conv_qkv_params(1024, 16) == 169_152
