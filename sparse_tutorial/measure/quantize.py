"""int8 weights, the other way to read fewer bytes per token: what a reader would try instead of sparsity.

:func:`quantize_int8` applies PyTorch's dynamic quantization (``torch.ao.quantization.quantize_dynamic``,
{cite}`jacob2018quantization` style affine int8): every ``nn.Linear`` stores its weight as int8 (4x fewer
bytes than float32), and each call quantizes the activations on the fly and runs an int8 matrix product.

What it covers in this book's models: attention projections, the output head, and the sparse FF's
controller. The sparse FF's gathered rows (``SparseFF.w1``/``w2``) are plain parameters, not ``nn.Linear``
layers, so they stay float32; combining the two methods therefore quantizes everything *but* the gathered
rows (storing those as int8 too is an exercise of chapter 5).

``torch.ao.quantization`` is deprecated in favour of the separate ``torchao`` package, and says so with
warnings on every call. We checked ``torchao`` 0.18 on torch 2.14 CPU: it installs, but its int8 weight-only
layers were slower than float32 on the CPU without ``torch.compile``, and its import logs warnings too. The
built-in function works and is fast on CPUs (fbgemm/x86 kernels), so we use it and silence its deprecation
notices here, in one place.
"""
from __future__ import annotations

import copy
import warnings

import torch
from torch import nn

__all__ = ["quantize_int8", "weight_bytes"]


def quantize_int8(model: nn.Module) -> nn.Module:
    """An int8 copy of ``model`` (eval mode): every ``nn.Linear`` becomes a dynamically quantized linear.

    The original model is left untouched. Tied weights (the output head and the token embedding) are
    untied in the copy: the head becomes int8, the embedding stays float32.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model must be a torch.nn.Module, got model={type(model).__name__}")
    q = copy.deepcopy(model).eval()
    with warnings.catch_warnings():
        # torch.ao.quantization announces its move to torchao (DeprecationWarning) and the deprecation of
        # quantized tensor dtypes (UserWarning); both say nothing about this use, which works on torch <= 2.14.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.ao\..*")
        warnings.filterwarnings("ignore", message=r".*quantize_per_tensor.*")
        torch.ao.quantization.quantize_dynamic(q, {nn.Linear}, dtype=torch.qint8, inplace=True)
    return q


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's weights as stored: float parameters plus packed int8 linear weights."""
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    for m in model.modules():
        if isinstance(m, torch.ao.nn.quantized.dynamic.Linear):
            w, b = m.weight(), m.bias()                    # int8 weight (1 byte each), float bias
            total += w.numel() * w.element_size() + (0 if b is None else b.numel() * b.element_size())
    return total
