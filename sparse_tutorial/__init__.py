"""Helper package of the book "Sparse is Enough, hands-on": layers, data, models, training and timing.

Every notebook imports from here; nothing a chapter needs is written twice. Four kinds of code:

* ``layers/``: the layers the book teaches, one concept per module, and the registry of kinds;
* the machinery, in this folder: ``model``, ``train``, ``checkpoint``, ``run``, ``data``, ``config``,
  ``image_model``;
* ``measure/`` (cost formulas, parameter counts, timing) and ``bench/`` (chapter 5's benchmark command);
* ``studies/``: the chapters' experiments and figures.

The README's module table says which chapter uses which module.
"""
from .config import FAST, pick, run_size
from .layers import DenseFF, SparseFF

__all__ = ["DenseFF", "SparseFF", "FAST", "pick", "run_size"]
__version__ = "0.1.0"
