"""The run record: the few numbers each chapter saves for the closing page, "The paper's claims, measured".

A chapter calls :func:`save` with the values it measured (``record.save("01_dense_ff", {...})``); the closing page
reads them back with :func:`load_all` and checks each claim against them. One JSON file per chapter, in
``<cache folder>/book_record/`` (``$SPARSE_TUTORIAL_CACHE``, which ``make test`` points at a fresh folder per
build), stamped with the run size, the machine and the time, so the page can say where each number came from and
leave out a record made at another run size.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path

from .. import config
from ..measure import timing

__all__ = ["record_dir", "save", "load", "load_all"]


def record_dir() -> Path:
    """``<cache folder>/book_record``."""
    return config.cache_dir() / "book_record"


def _plain(value):
    """A JSON-safe copy of ``value`` (numpy and torch scalars become floats or ints; NaN becomes None)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, (bool, str)) or value is None:
        return value
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return None if math.isnan(value) else value
    raise TypeError(f"record values must be numbers, strings, lists or dicts, got {type(value).__name__}")


def save(chapter: str, values: dict) -> Path:
    """Write ``values`` as chapter ``chapter``'s record (replacing an older one, atomically); return the path."""
    if not chapter or "/" in chapter:
        raise ValueError(f"chapter must be a plain name such as '01_dense_ff', got {chapter!r}")
    folder = record_dir()
    folder.mkdir(parents=True, exist_ok=True)
    doc = {"chapter": chapter, "run size": config.run_size(), "machine": timing.machine_summary(),
           "time": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "values": _plain(values)}
    fd, tmp = tempfile.mkstemp(dir=folder, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(doc, f, indent=1)
    path = folder / f"{chapter}.json"
    os.replace(tmp, path)
    return path


def load(chapter: str, run_size: str | None = None) -> dict | None:
    """Chapter ``chapter``'s record, or None when it has none (or only one of another run size)."""
    path = record_dir() / f"{chapter}.json"
    if not path.is_file():
        return None
    doc = json.loads(path.read_text(encoding="utf-8"))
    if doc.get("run size") != (config.run_size() if run_size is None else run_size):
        return None
    return doc


def load_all(run_size: str | None = None) -> dict[str, dict]:
    """Every chapter's record of this run size, by chapter."""
    folder = record_dir()
    found = (load(p.stem, run_size) for p in sorted(folder.glob("*.json"))) if folder.is_dir() else ()
    return {doc["chapter"]: doc for doc in found if doc is not None}
