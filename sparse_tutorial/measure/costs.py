"""Back-of-the-envelope costs: multiply-adds and bytes of weights a layer touches for one token.

These are the "limit" numbers the measured timings are compared with. At batch 1 a CPU spends most of a
decode step reading weights, so the bytes ratio is the best speed-up sparsity can give.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class FFCost:
    """Per-token cost of one FF layer at decode (batch 1)."""

    macs: int            # multiply-adds
    weight_params: int   # weight and bias values read

    def bytes(self, bytes_per_param: int = 4) -> int:
        return self.weight_params * bytes_per_param


def dense_ff_cost(d_model: int, d_ff: int) -> FFCost:
    """``relu(x W1 + b1) W2 + b2``: every weight is read once."""
    return FFCost(macs=2 * d_model * d_ff, weight_params=2 * d_model * d_ff + d_ff + d_model)


def controller_cost(d_model: int, d_ff: int, d_lowrank: int, kind: str = "lowrank") -> FFCost:
    """The controller scores all ``d_ff`` units, whatever the sparsity."""
    if kind == "lowrank":
        return FFCost(macs=d_model * d_lowrank + d_lowrank * d_ff,
                      weight_params=d_model * d_lowrank + d_lowrank * d_ff + d_ff)
    if kind == "mlp":
        return FFCost(macs=d_model * d_lowrank + d_lowrank * d_ff,
                      weight_params=d_model * d_lowrank + d_lowrank + d_lowrank * d_ff + d_ff)
    if kind == "full":
        return FFCost(macs=d_model * d_ff, weight_params=d_model * d_ff + d_ff)
    raise ValueError(f"kind must be 'lowrank', 'mlp' or 'full', got kind={kind!r}")


def sparse_ff_cost(d_model: int, d_ff: int, block_size: int, d_lowrank: int | None = None,
                   controller: str = "lowrank") -> FFCost:
    """Controller plus the gathered rows: ``n_blocks`` rows of ``W1^T`` and of ``W2``."""
    if d_ff % block_size:
        raise ValueError(f"d_ff must be divisible by block_size, got d_ff={d_ff}, block_size={block_size}")
    n_blocks = d_ff // block_size
    d_lowrank = n_blocks if d_lowrank is None else d_lowrank
    ctrl = controller_cost(d_model, d_ff, d_lowrank, controller)
    gathered = 2 * d_model * n_blocks
    return FFCost(macs=ctrl.macs + gathered, weight_params=ctrl.weight_params + gathered + d_model)


def sparse_ff_breakdown(d_model: int, d_ff: int, block_size: int, d_lowrank: int | None = None,
                        controller: str = "lowrank") -> dict[str, int]:
    """Multiply-adds per token split into controller and gathered weights, with the dense cost beside."""
    n_blocks = d_ff // block_size
    d_lowrank = n_blocks if d_lowrank is None else d_lowrank
    return {
        "controller": controller_cost(d_model, d_ff, d_lowrank, controller).macs,
        "gathered W1/W2 rows": 2 * d_model * n_blocks,
        "dense FF": dense_ff_cost(d_model, d_ff).macs,
    }


def bytes_limit_ratio(d_model: int, d_ff: int, block_size: int, d_lowrank: int | None = None) -> float:
    """Dense bytes / sparse bytes at batch 1: the speed-up a weight-bandwidth-bound decode can reach."""
    return dense_ff_cost(d_model, d_ff).bytes() / sparse_ff_cost(d_model, d_ff, block_size, d_lowrank).bytes()
