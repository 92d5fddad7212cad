"""Helper package of the book "Sparse is Enough, hands-on": layers, data, models, training and timing.

Every notebook imports from here; nothing a chapter needs is written twice.
"""
from .config import FAST, pick, run_size
from .layers import DenseFF, SparseFF

__all__ = ["DenseFF", "SparseFF", "FAST", "pick", "run_size"]
__version__ = "0.1.0"
