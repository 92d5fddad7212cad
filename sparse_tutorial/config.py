"""Run-size switch, data and cache locations: the one place the package reads its environment.

``SPARSE_TUTORIAL_FAST=1`` shrinks every model, dataset slice and step count so CI can execute the
whole book in minutes on two cores. Without it, the defaults are the reader's laptop run and what the
published book shows. Nothing else in the package (or in the notebooks) reads that variable: code
asks :data:`FAST` or calls :func:`pick`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

_FAST_VALUES = {"1", "true", "yes", "on"}
_SLOW_VALUES = {"", "0", "false", "no", "off"}


def _read_fast_flag() -> bool:
    raw = os.environ.get("SPARSE_TUTORIAL_FAST", "").strip().lower()
    if raw in _FAST_VALUES:
        return True
    if raw in _SLOW_VALUES:
        return False
    raise ValueError(
        f"SPARSE_TUTORIAL_FAST={raw!r} is not understood; use 1 (fast CI run) or 0 / unset (full run)"
    )


#: True when the book runs in its tiny CI configuration.
FAST: bool = _read_fast_flag()


def pick(default: T, fast: T) -> T:
    """Return ``fast`` in fast mode and ``default`` otherwise.

    >>> steps = pick(default=2000, fast=20)
    """
    return fast if FAST else default


def data_dir() -> Path | None:
    """The folder named by ``SPARSE_TUTORIAL_DATA``, or None when the variable is unset or empty."""
    raw = os.environ.get("SPARSE_TUTORIAL_DATA", "").strip()
    return Path(raw).expanduser() if raw else None


def cache_dir() -> Path:
    """Where downloads and checkpoints go: ``$SPARSE_TUTORIAL_CACHE`` or ``~/.cache/sparse_tutorial``."""
    raw = os.environ.get("SPARSE_TUTORIAL_CACHE", "").strip()
    path = Path(raw).expanduser() if raw else Path.home() / ".cache" / "sparse_tutorial"
    return path


def run_size() -> str:
    """A short label for tables and figure captions: ``"fast (CI)"`` or ``"default"``."""
    return "fast (CI)" if FAST else "default"
