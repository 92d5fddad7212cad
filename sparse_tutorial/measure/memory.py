"""Training memory: the bytes of activations a training step keeps for its backward pass (chapter 7).

PyTorch keeps, for every operation that needs them, the tensors its backward pass will read. Those saved
tensors are the activation memory that grows with depth and length. :func:`saved_activation_bytes` counts them
exactly, with ``torch.autograd.graph.saved_tensors_hooks``: every tensor saved during the forward pass is seen
once, and tensors sharing memory (views of one storage) are counted once. Parameters are not activations and
are left out. The count is the same on every run and every machine, unlike the process's peak memory, which
also holds the allocator's caches.
"""
from __future__ import annotations

import torch

__all__ = ["saved_activation_bytes"]


def saved_activation_bytes(model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor) -> int:
    """Bytes of the distinct tensors the forward pass of ``model(idx, targets)`` saves for backward
    (parameters excluded). Runs the forward pass only (no backward), in the model's current mode."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in params and t.device.type != "meta":
            seen[ptr] = max(seen.get(ptr, 0), storage.nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, targets)
    return sum(seen.values())
