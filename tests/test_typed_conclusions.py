"""The book states no measured result as typed text: a conclusion drawn from a run is printed by a cell, from that
run's numbers ("in this run ..."), or worded so that it is true for any run.

The scan reads the prose the reader sees, every markdown cell of every notebook and every page under ``book/``
(code blocks and inline code left out), sentence by sentence, with two rules:

1. **Typed verdicts.** :data:`VERDICTS` are the assertive phrasings a typed conclusion takes ("is slower than",
   "not cheaper to train", "the saving grows with the width", "within run-to-run noise", "exactly the 169,152").
   A cell's printed sentence may say these; prose may not, unless the sentence predicts, asks or sets a target
   (:data:`HEDGED`: "should", "can", "whether", "if", "target", a question).
2. **Measured numbers.** A number with a unit of time, bandwidth or throughput, or a speed-up ("1.9x"), in prose
   must be attributed in the same sentence (to the paper, an earlier project, the reference code, a citation): a
   number this book measured belongs in a cell's output.

:data:`ALLOWED` lists the sentences that match and are fine, each with its reason. The planted tests show both
rules failing on typed conclusions.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

#: Assertive phrasings of a measured comparison (case-insensitive).
VERDICTS = {
    r"\b(is|are|was|were|runs?|ran|decodes?|trains?)\s+([\w%.,-]+\s+){0,2}(faster|slower|cheaper|costlier)\s+than\b":
        "a speed comparison stated as fact",
    r"\bnot (cheaper|faster|slower)\b": "a speed comparison stated as fact",
    r"\b(costs?|takes?) more per (epoch|step|token)\b": "a cost comparison stated as fact",
    r"\b(saving|gain|speed-up|gap)s? (grows?|shrinks?|falls?|rises?) with\b": "a trend stated as fact",
    r"\bthe larger the \w+, the (larger|smaller|faster|slower)\b": "a trend stated as fact",
    r"\bwithin (the )?(one run's |run-to-run )?noise\b": "a noise verdict without the spread measured",
    r"\b(is|are) close to\b[^.]*\b(bytes|bandwidth|limit|prediction)\b": "a closeness to a bound stated as fact",
    r"\bapproach(es)? the bytes limit\b": "a closeness to a bound stated as fact",
    r"\bexactly the [\d,]+\b": "a count stated as typed text",
    r"\b(is|are) the (cheaper|faster|better)\b": "a comparison stated as fact",
    r"\b(beat|beats|outperforms?)\b": "a comparison stated as fact",
    r"\bgains? little or loses?\b": "a comparison stated as fact",
    r"\bmeasures? it below\b": "a measured comparison stated as fact",
}
#: A measured quantity: a time, a bandwidth or throughput, or a ratio such as "1.9x".
MEASURED = re.compile(r"\b\d[\d,]*(\.\d+)?\s?(ms|µs|us|GB/s|GFLOP/s|s per step|seconds|minutes)\b"
                      r"|\b\d+(\.\d+)?x\b(?! ?\d)", re.IGNORECASE)
#: A clause that predicts, asks, sets a target or states a condition states no result (looked for in the 60
#: characters before a verdict, and a question mark ending the sentence).
HEDGED = re.compile(r"\b(should|would|could|can|cannot|might|may|whether|if|target|goal|predict\w*|expect\w*)\b|\?$",
                    re.IGNORECASE)
#: Words that attribute a number to another source in the same sentence.
ATTRIBUTED = re.compile(r"paper|report|reference|earlier|seed project|trax|\{cite\}|issue|target|goal",
                        re.IGNORECASE)

#: (path, words of the sentence) -> why it is fine.
ALLOWED: dict[tuple[str, str], str] = {
}


def prose(markdown: str) -> str:
    """The text a reader reads: fenced code blocks, inline code, math blocks and HTML comments removed."""
    markdown = re.sub(r"```.*?```|~~~.*?~~~", " ", markdown, flags=re.DOTALL)
    markdown = re.sub(r"\$\$.*?\$\$|<!--.*?-->", " ", markdown, flags=re.DOTALL)
    return re.sub(r"`[^`]*`", "CODE", markdown)


def sentences(text: str) -> list[str]:
    text = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?;:])\s+(?=[A-Z*({\[])|\s(?=[-*] \*\*)|\s(?=\d+\. )", text)
            if s.strip()]


def book_prose() -> dict[str, str]:
    """Each notebook's markdown cells (path#cell id) and each page under book/, as prose."""
    texts = {}
    for nb in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(nb.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] == "markdown":
                texts[f"{nb.relative_to(ROOT)}#{cell.get('id')}"] = prose("".join(cell["source"]))
    for page in sorted((ROOT / "book").glob("*.md")):
        texts[str(page.relative_to(ROOT))] = prose(page.read_text(encoding="utf-8"))
    return texts


def typed_conclusions(texts: dict[str, str], allowed=ALLOWED) -> list[str]:
    found = []
    for where, text in texts.items():
        path = where.split("#")[0]
        for sentence in sentences(text):
            if any(p == path and words in sentence for p, words in allowed):
                continue
            for pattern, why in VERDICTS.items():
                m = re.search(pattern, sentence, flags=re.IGNORECASE)
                # hedged: a question, or a hedge word in the clause just before the verdict ("should decode ...")
                if m and not HEDGED.search(sentence[max(0, m.start() - 60):m.end()] + sentence[-1:]):
                    found.append(f"{where}: {why} ({m.group(0)!r}): {sentence[:200]}")
            if (m := MEASURED.search(sentence)) and not ATTRIBUTED.search(sentence):
                found.append(f"{where}: a measured number in prose ({m.group(0)!r}): {sentence[:200]}")
    return found


def test_no_typed_conclusions_in_the_book():
    found = typed_conclusions(book_prose())
    assert not found, ("print these from the run's numbers, or word them so they hold for any run:\n  "
                       + "\n  ".join(found))


def test_every_allowed_sentence_is_still_there():
    """An allow-list entry whose sentence is gone is removed, so the list cannot grow stale."""
    texts = book_prose()
    for (path, words), reason in ALLOWED.items():
        assert reason, (path, words)
        assert any(k.split("#")[0] == path and words in re.sub(r"\s+", " ", t) for k, t in texts.items()), \
            f"allowed sentence no longer in {path}: {words!r}"


@pytest.mark.parametrize("planted", [
    "At batch 1 the sparse model is 30% faster than the dense one.",
    "The sparse QKV layer is not cheaper to train either.",
    "A reader sees that the saving grows with the width.",
    "Differences of a few hundredths are within run-to-run noise.",
    "Our module has exactly the 169,152 parameters.",
    "int8 weights are the cheaper first step.",
    "int8 weights are the cheaper first step; whether they add to sparsity depends on what is left.",
    "Past N tokens a dense first layer and a gathered second layer beat the dense-masked computation.",
    "Batch 1 takes 356 µs on this machine.",
    "The sparse block decodes 2.8x as fast as the dense one.",
])
def test_a_planted_typed_conclusion_is_found(planted):
    text = {"notebooks/99_planted.ipynb#cell": prose(f"Some prose first. {planted} Then more prose.")}
    assert len(typed_conclusions(text)) >= 1


@pytest.mark.parametrize("fine", [
    "The paper reports 5.9 ms per block at 800M {cite}`jaszczur2021sparse`.",
    "Per-token time should fall as the batch grows; the figure shows what this run measured.",
    "The printout above says whether the sparse model was faster than dense in this run.",
    "The chapter's target: at batch 1, every sparse kind should decode faster than dense.",
    "Where does each approach the bytes limit of chapter 1?",
    "The deciding number is the machine's streaming bandwidth, which no implementation can beat.",
    "```python\nprint('sparse is 3x faster than dense')\n```",
])
def test_predictions_attributions_and_code_pass(fine):
    assert typed_conclusions({"book/page.md": prose(fine)}) == []
