"""The paper's sparse feed-forward layer and its controllers (chapters 2, 3 and 5).

Notation (the paper's): ``d = d_model``, ``d_ff`` hidden units, split into ``n_blocks = d_ff / N`` blocks
of ``N = block_size`` units. Exactly one unit per block is active for each token, so a token uses
``n_blocks`` of the ``d_ff`` units. (Some follow-up projects call the *number of blocks* "N"; this book
does not.)

``SparseFF`` follows the reference implementation (trax ``SparseFF``):

* controller ``logits = x C1 C2 + c`` (low rank ``d_lowrank``, bias on the output only), per-block softmax;
* training: Gumbel-perturbed argmax (noise x 0.1), straight-through one-hot, hard mask on 30% of calls and
  the soft mask otherwise; the mask multiplies ``x W1`` *before* the ReLU; no first-layer bias; dense compute,
  written as a mask (the fused ``train_path``, where :mod:`.sparse_ff_kernel` applies, computes a hard call's
  chosen units only, and a soft call's mask and ReLU in one pass each way);
* eval: one-hot of the argmax, same dense formula;
* :meth:`SparseFF.decode`: the real sparse computation, gathering only the selected rows of ``W1^T`` and ``W2``;
  in PyTorch (the readable reference) or, where it applies, in one fused call (:mod:`.sparse_ff_kernel`,
  chosen by ``decode_path``).

One departure from the reference, by default: the **initialisation**. ``W1``, ``W2`` and the controller start
with PyTorch's ``nn.Linear`` ranges (the controller's bias too, uniform in ``+-1/sqrt(d_lowrank)``), where the
reference draws Glorot-uniform matrices and near-zero biases. ``SparseFF(init="reference")`` gives the
reference's; chapter 3's "Closing the gap" measures both (``results/quality_gap.csv``).
"""
from __future__ import annotations

import math
import threading
import weakref

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .._checks import last_dim, positive_int, probability, real_number, same_dtype
from .base import DECODE_PATHS, FeedForward, PathSetting

__all__ = [
    "SparseFF",
    "DECODE_PATHS",
    "LowRankController",
    "FullRankController",
    "MLPController",
    "make_controller",
]


# --------------------------------------------------------------------------------------------------
# Controllers: map x (..., d_model) to one score per hidden unit (..., d_ff)
# --------------------------------------------------------------------------------------------------


class LowRankController(nn.Module):
    """The paper's controller: ``x C1 C2 + c`` with rank ``d_lowrank``; costs ``d*r + r*d_ff`` per token."""

    def __init__(self, d_model: int, d_ff: int, d_lowrank: int):
        super().__init__()
        self.c1 = nn.Linear(d_model, d_lowrank, bias=False)
        self.c2 = nn.Linear(d_lowrank, d_ff, bias=True)
        # Store C2's (d_ff, d_lowrank) weight column-major, i.e. as the contiguous (d_lowrank, d_ff) matrix: the
        # decoding matrix-vector product then streams d_ff-long rows (about twice as fast, cold, as d_ff short
        # rows of d_lowrank). Same shape and values; nn.Linear, optimizers and state dicts keep the layout.
        self.c2.weight = nn.Parameter(self.c2.weight.detach().t().contiguous().t())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.c1(x))  # (..., d_ff)


class FullRankController(nn.Module):
    """A full ``d_model x d_ff`` linear controller: as expensive as the dense FF's first layer."""

    def __init__(self, d_model: int, d_ff: int, d_lowrank: int | None = None):
        super().__init__()
        self.c = nn.Linear(d_model, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x)


class MLPController(nn.Module):
    """Linear -> ReLU -> Linear with biases (the design of an earlier small PyTorch project)."""

    def __init__(self, d_model: int, d_ff: int, d_lowrank: int):
        super().__init__()
        self.c1 = nn.Linear(d_model, d_lowrank)
        self.c2 = nn.Linear(d_lowrank, d_ff)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(F.relu(self.c1(x)))


#: the initialisations :class:`SparseFF` offers (see its ``init`` argument)
INITS = ("torch", "reference")


#: per layer: the kernel's views of its weights (see ``SparseFF._fused_weights``)
_FUSED_WEIGHTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _version(t: torch.Tensor) -> int:
    """``t``'s in-place version counter; -1 for a tensor made under ``torch.inference_mode`` (it keeps none)."""
    return -1 if t.is_inference() else t._version


def _kernel_module():
    """The fused kernel's module, imported on first use (it imports Numba, about half a second)."""
    from . import sparse_ff_kernel
    return sparse_ff_kernel


CONTROLLERS = {"lowrank": LowRankController, "full": FullRankController, "mlp": MLPController}


def make_controller(kind: str, d_model: int, d_ff: int, d_lowrank: int) -> nn.Module:
    """Build a controller by name: ``"lowrank"`` (the paper's), ``"full"`` or ``"mlp"``."""
    if kind not in CONTROLLERS:
        raise ValueError(f"controller must be one of {sorted(CONTROLLERS)}, got controller={kind!r}")
    return CONTROLLERS[kind](d_model, d_ff, d_lowrank)


# --------------------------------------------------------------------------------------------------
# Sparse FF
# --------------------------------------------------------------------------------------------------


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``hard``; backward hands the gradient to ``soft`` (the straight-through estimator).

    Same values and gradients as ``hard + soft - soft.detach()``, without two full-size tensor passes.
    """

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
        return hard

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


class _FusedMask(torch.autograd.Function):
    """A soft training call's ``relu(h * p)``, ``p`` the in-block softmax of ``logits``, forward and backward in one
    pass each (:func:`.sparse_ff_kernel.mask_forward` and ``mask_backward``) instead of PyTorch's softmax, product
    and ReLU and their gradients. ``h`` and ``logits`` are ``(R, N)``: one row per block of each token."""

    @staticmethod
    def forward(ctx, h, logits):
        p = F.softmax(logits, dim=-1)                                  # (R, N) the in-block softmax
        ctx.save_for_backward(p, h)
        return _kernel_module().mask_forward(p, h)                     # (R, N)

    @staticmethod
    def backward(ctx, grad):
        p, h = ctx.saved_tensors
        return _kernel_module().mask_backward(grad.contiguous(), p, h)


class _HardTraining(torch.autograd.Function):
    """A hard training call of the whole layer (after the controller), touching only the chosen units
    (:func:`.sparse_ff_kernel.hard_forward` and ``hard_backward``): ``x`` ``(T, d)`` and ``logits``
    ``(T n_blocks, N)`` -> ``y`` ``(T, d)``, the dense path's ``relu((x W1) * mask) W2 + b2`` without its zero
    terms, with the same values and gradients (``tests/test_fused_train.py``). ``chosen`` ``(T n_blocks,)``, or
    ``u`` and ``power`` for the kernel's sampler (:func:`.sparse_ff_kernel.sample`) to draw it."""

    @staticmethod
    def forward(ctx, x, logits, w1, w2, b2, chosen, u, power, scale_by_prob):
        kernel = _kernel_module()
        p = F.softmax(logits, dim=-1)                                  # (R, N) the in-block softmax
        if chosen is None:
            chosen = kernel.sample(p, u, power)                        # (R,)
        y, h_sel = kernel.hard_forward(x, w1, w2, b2, p, chosen, scale_by_prob)
        ctx.save_for_backward(x, w1, w2, p, chosen, h_sel)
        ctx.scale_by_prob = scale_by_prob
        return y

    @staticmethod
    def backward(ctx, grad):
        x, w1, w2, p, chosen, h_sel = ctx.saved_tensors
        grad_x, grad_w1, grad_w2, grad_logits = _kernel_module().hard_backward(
            grad.contiguous(), x, w1, w2, p, chosen, h_sel, ctx.scale_by_prob)
        return grad_x, grad_logits, grad_w1, grad_w2, grad.sum(0), None, None, None, None


class _HardMask(torch.autograd.Function):
    """A hard training call's mask and ReLU on the dense first product, for small blocks: ``h`` and ``logits``
    ``(R, N)`` -> ``act`` ``(R, N)``, zero but at each row's chosen unit (:func:`.sparse_ff_kernel.hard_mask_forward`
    and ``hard_mask_backward``), with the values and gradients of :meth:`SparseFF.mask`'s hard path. ``chosen``
    ``(R,)``, or ``u`` and ``power`` for the kernel's sampler to draw it, as :class:`_HardTraining`."""

    @staticmethod
    def forward(ctx, h, logits, chosen, u, power, scale_by_prob):
        kernel = _kernel_module()
        p = kernel.softmax_rows(logits)                                # (R, N) the in-block softmax
        if chosen is None:
            chosen = kernel.sample(p, u, power)                        # (R,)
        ctx.save_for_backward(p, h, chosen)
        ctx.scale_by_prob = scale_by_prob
        return kernel.hard_mask_forward(p, h, chosen, scale_by_prob)  # (R, N)

    @staticmethod
    def backward(ctx, grad):
        p, h, chosen = ctx.saved_tensors
        grad_h, grad_logits = _kernel_module().hard_mask_backward(grad.contiguous(), p, h, chosen,
                                                                  ctx.scale_by_prob)
        return grad_h, grad_logits, None, None, None, None


class SparseFF(FeedForward):
    """Sparse feed-forward layer: one active unit in each block of ``block_size`` units.

    Args:
        d_model: width of the residual stream.
        d_ff: number of hidden units; must be a multiple of ``block_size``.
        block_size: units per block (the paper's ``N``); ``d_ff / block_size`` units are active per token.
        d_lowrank: controller rank; defaults to ``d_ff // block_size`` like the reference code.
        dropout: dropout on the output.
        controller: ``"lowrank"`` (the paper's), ``"full"`` or ``"mlp"``; see chapter 2.
        noise_scale: Gumbel noise multiplier in training (the reference's temperature, 0.1).
        hard_prob: probability that a training call uses the hard straight-through mask (0.3). A training loop
            may change it between steps (:class:`~sparse_tutorial.train.TrainConfig` can anneal it to 1).
        init: ``"torch"`` (PyTorch's ``nn.Linear`` ranges for ``W1``, ``W2`` and the controller, the book's
            first default) or ``"reference"`` (the reference code's: Glorot-uniform ``W1``, ``W2``, ``C1``,
            ``C2``; controller bias and ``b2`` drawn from Normal(0, 1e-6)). Chapter 3's "Closing the gap"
            measures both.
        scale_by_prob: the reference's ``multiply_by_controller_output`` option (off in its configs): the
            selected unit of each block is scaled by its in-block probability ``p`` in hard training calls, in
            eval and in :meth:`decode`, as a Switch-style router scales its expert. The value of a hard call
            then matches a soft call's weighting, and the controller gets a gradient through the product.
        decode_path: how :meth:`decode` computes: ``"auto"`` (the fused kernel of :mod:`.sparse_ff_kernel` where
            it applies, else PyTorch), ``"pytorch"`` or ``"fused"``; see :data:`DECODE_PATHS`. An attribute too.

    Parameters are stored so the decode path reads contiguous memory: ``w1`` is ``W1^T`` with one row of
    ``d_model`` weights per hidden unit, ``w2`` is ``W2`` with one row per hidden unit.
    """

    #: :meth:`decode` reads only the selected rows: the cheaper inference path of the interface
    has_sparse_decode = True

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        block_size: int,
        d_lowrank: int | None = None,
        dropout: float = 0.0,
        *,
        controller: str = "lowrank",
        noise_scale: float = 0.1,
        hard_prob: float = 0.3,
        init: str = "torch",
        scale_by_prob: bool = False,
        decode_path: str = "auto",
    ):
        super().__init__()
        positive_int("d_model", d_model)
        positive_int("d_ff", d_ff)
        positive_int("block_size", block_size)
        if d_ff % block_size != 0:
            raise ValueError(
                f"d_ff must be divisible by block_size, got d_ff={d_ff}, block_size={block_size} "
                f"(remainder {d_ff % block_size})"
            )
        if d_lowrank is None:
            d_lowrank = d_ff // block_size
        if isinstance(d_lowrank, bool) or not isinstance(d_lowrank, int) or d_lowrank < 1:
            raise ValueError(f"d_lowrank must be an integer >= 1, got d_lowrank={d_lowrank!r}")
        hard_prob = real_number("hard_prob", hard_prob, 0.0, 1.0)    # NaN or a string: a named ValueError
        noise_scale = real_number("noise_scale", noise_scale, 0.0)

        if not isinstance(scale_by_prob, bool):
            raise ValueError(f"scale_by_prob must be True or False, got scale_by_prob={scale_by_prob!r}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got init={init!r}")
        self.d_model, self.d_ff, self.block_size, self.d_lowrank = d_model, d_ff, block_size, d_lowrank
        self.init, self.scale_by_prob = init, scale_by_prob
        self.n_blocks = d_ff // block_size
        self.noise_scale, self.hard_prob = float(noise_scale), float(hard_prob)
        self.controller_kind = controller

        self.controller = make_controller(controller, d_model, d_ff, d_lowrank)
        # W1^T: one contiguous row of d_model weights per hidden unit; no first-layer bias (as the reference).
        self.w1 = nn.Parameter(torch.empty(d_ff, d_model))
        # W2: one contiguous row of d_model weights per hidden unit.
        self.w2 = nn.Parameter(torch.empty(d_ff, d_model))
        self.b2 = nn.Parameter(torch.zeros(d_model))
        self.dropout = nn.Dropout(probability("dropout", dropout))
        # Unit i of block b has flat index b * block_size + i; decode adds this offset to the in-block argmax.
        self.register_buffer("block_offset", torch.arange(self.n_blocks) * block_size, persistent=False)
        #: whether the last training call used the hard mask (for tests and chapter 2's experiments)
        self.last_mask_hard: bool | None = None
        self.decode_path = decode_path
        #: the path the last :meth:`decode` call took, ``"fused"`` or ``"pytorch"`` (None before the first)
        self.last_decode_path: str | None = None
        self.train_path = "auto"
        #: the path the last training call took, ``"fused"`` or ``"pytorch"`` (None before the first)
        self.last_train_path: str | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.init == "reference":
            # The reference code's: Glorot-uniform matrices, (almost) zero biases. The controller's scores then
            # start near zero, so every unit of a block starts with about the same probability.
            for w in (self.w1, self.w2):
                nn.init.xavier_uniform_(w)
            for name, param in self.controller.named_parameters():
                if param.dim() >= 2:
                    nn.init.xavier_uniform_(param)
                else:
                    nn.init.normal_(param, std=1e-6)
            nn.init.normal_(self.b2, std=1e-6)
            return
        # Same ranges as nn.Linear(d_model, d_ff) and nn.Linear(d_ff, d_model); the controller keeps nn.Linear's.
        nn.init.uniform_(self.w1, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w2, -1 / math.sqrt(self.d_ff), 1 / math.sqrt(self.d_ff))
        nn.init.zeros_(self.b2)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, d_ff={self.d_ff}, block_size={self.block_size}, "
            f"n_blocks={self.n_blocks}, d_lowrank={self.d_lowrank}, controller={self.controller_kind!r}, "
            f"hard_prob={self.hard_prob}, noise_scale={self.noise_scale}, init={self.init!r}"
            + (", scale_by_prob=True" if self.scale_by_prob else "")
            + (f", decode_path={self.decode_path!r}" if self.decode_path != "auto" else "")
        )

    def active_params_per_token(self) -> int:
        """The whole controller (it scores every unit), the selected rows of ``W1^T`` and ``W2``, and ``b2``."""
        controller = sum(p.numel() for p in self.controller.parameters())
        return controller + 2 * self.n_blocks * self.d_model + self.d_model

    # -- selection ---------------------------------------------------------------------------------
    def block_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Controller scores reshaped per block: ``(..., n_blocks, block_size)``."""
        last_dim("x", x, self.d_model)
        same_dtype("x", x, self.w1)
        return self.controller(x).unflatten(-1, (self.n_blocks, self.block_size))

    def selected(self, x: torch.Tensor) -> torch.Tensor:
        """Flat indices (into ``0..d_ff-1``) of the active unit of every block: ``(..., n_blocks)``."""
        return self.block_logits(x).argmax(dim=-1) + self.block_offset

    def mask(self, x: torch.Tensor) -> torch.Tensor:
        """The mask this call applies, ``(..., n_blocks, block_size)``; random in training mode."""
        logits = self.block_logits(x)
        if not self.training:
            self.last_mask_hard = None
            hard = F.one_hot(logits.argmax(dim=-1), self.block_size).to(x.dtype)
            return hard * F.softmax(logits, dim=-1) if self.scale_by_prob else hard
        use_hard = bool(torch.rand(()) < self.hard_prob)  # one draw per call, as the reference
        self.last_mask_hard = use_hard
        p = F.softmax(logits, dim=-1)                                  # soft mask, in-block softmax
        if not use_hard:
            return p
        choice = self._sample(logits.detach())                         # (..., n_blocks)
        # the one-hot mask written straight into a float tensor (F.one_hot makes int64, then a copy)
        hard = torch.zeros_like(p).scatter_(-1, choice.unsqueeze(-1), 1.0)
        if self.scale_by_prob:                  # value: p at the chosen unit; gradient: through that p
            return hard * p
        return _StraightThrough.apply(hard, p)  # value: one-hot; gradient: through the in-block softmax

    def _sample(self, logits: torch.Tensor) -> torch.Tensor:
        """The reference's ``argmax(log p + noise_scale * Gumbel)``, drawn without the Gumbel noise.

        The Gumbel-max trick says that argmax is a sample from ``softmax(logits / noise_scale)``; drawing
        that sample by inverting the in-block CDF with one uniform number per block gives the same
        distribution for ``block_size`` times fewer random numbers (the noise dominated the training
        step's cost on a CPU). ``noise_scale = 0`` is the plain argmax.
        """
        if self.noise_scale == 0:
            return logits.argmax(dim=-1)
        q = F.softmax(logits / self.noise_scale, dim=-1)               # (..., n_blocks, block_size)
        upper = torch.ones(self.block_size, self.block_size, dtype=q.dtype, device=q.device).triu()
        cdf = q @ upper                                  # cdf[..., j] = q[..., :j+1].sum(): a cumsum as one matmul
        u = torch.rand(cdf.shape[:-1] + (1,), dtype=cdf.dtype, device=cdf.device)
        # the first unit whose cdf reaches u (the count of cdf < u, without a bool tensor and its int64 sum)
        return torch.searchsorted(cdf, u).squeeze(-1).clamp_max_(self.block_size - 1)

    # -- the dense-compute path (training and eval) -------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Dense compute with a mask: ``relu((x W1) * mask) W2 + b2``. Shapes ``(..., d_model)``.

        A training call takes the fused kernels where they apply (see :attr:`train_path`): a hard call computes
        only the chosen units, a soft call its mask and ReLU in one pass; the same values, gradients and random
        draws as the code below.
        """
        if self.training and self.train_path != "pytorch":
            why_not = self.fused_train_unavailable(x)
            if why_not is None:
                try:
                    return self._fused_forward(x)
                except _kernel_module().KernelUnavailable as e:   # it failed to compile on this machine
                    why_not = str(e)                           # (this call then draws its numbers again)
            if self.train_path == "fused":
                raise ValueError(f"train_path='fused' does not apply to this call: {why_not}")
        if self.training:
            self.__dict__["last_train_path"] = "pytorch"
        m = self.mask(x)                                               # (..., n_blocks, block_size)
        h = F.linear(x, self.w1).unflatten(-1, (self.n_blocks, self.block_size))
        h = F.relu(h * m).flatten(-2)                                  # (..., d_ff)
        return self.dropout(h @ self.w2 + self.b2)                     # (..., d_model)

    train_path = PathSetting(
        """How a training call computes: one of :data:`DECODE_PATHS`. ``"auto"`` (the default) takes the fused
        kernels of :mod:`.sparse_ff_kernel` where :meth:`fused_train_unavailable` finds nothing against them (a
        hard call: ``hard_forward``/``hard_backward``, the chosen units only; a soft call: ``mask_forward``/
        ``mask_backward``), ``"pytorch"`` always :meth:`mask` and the code of :meth:`forward`, ``"fused"`` always
        the kernels (a ValueError saying why when they do not apply).""")

    def fused_train_unavailable(self, x: torch.Tensor) -> str | None:
        """Why a training call on ``x`` cannot take the fused kernels, or None when it can: they need Numba,
        float32 on the CPU, and eager PyTorch (not a traced or compiled graph)."""
        kernel = _kernel_module()
        if not kernel.available():
            return kernel.unavailable_reason()
        if x.dtype != torch.float32 or not x.is_cpu or self.w1.dtype != torch.float32 or not self.w1.is_cpu:
            return f"the kernel is compiled for float32 on the CPU, x is {x.dtype} on {x.device}"
        if torch.compiler.is_compiling() or torch.jit.is_tracing():
            return "a traced or compiled graph cannot call the kernel"
        return None

    #: a hard training call with blocks of fewer units than this keeps the dense products and fuses only its mask
    #: (:class:`_HardMask`): with ``1 / N`` of the units chosen, the chosen-units kernel's row-by-row dot products
    #: (:class:`_HardTraining`) do more work than a BLAS product over all of them. A probe of
    #: ``bench.train_step`` at the default size (controller rank 16, 2 threads, 2-core AMD EPYC), model step /
    #: dense step, mask kernels against chosen units: N 4 1.32 vs 1.63, N 8 1.26 vs 1.02, N 16 1.21 vs 0.97
    HARD_KERNEL_MIN_BLOCK = 8

    def _fused_forward(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`forward` in training mode on the fused kernels: a hard call by :class:`_HardTraining` (the chosen
        units only; with blocks under :attr:`HARD_KERNEL_MIN_BLOCK`, the dense products and :class:`_HardMask`), a
        soft one by :class:`_FusedMask`. It draws the same random numbers as :meth:`mask`, in the
        same order: the hard-or-soft coin, then one uniform number per block for the hard choice (drawn by the
        kernel's sampler when ``1 / noise_scale`` is whole, else by :meth:`_sample`)."""
        logits = self.block_logits(x)                                  # (..., n_blocks, block_size)
        use_hard = bool(torch.rand(()) < self.hard_prob)               # as mask(): one draw per call
        self.last_mask_hard = use_hard
        self.__dict__["last_train_path"] = "fused"
        rows = logits.reshape(-1, self.block_size)                     # (R, N): one block of one token each
        if use_hard:
            chosen = u = None
            power = _kernel_module().sample_power(self.noise_scale)
            if power is None:                                          # no noise, or a power not compiled
                chosen = self._sample(logits.detach()).view(-1)       # (R,)
            else:                                                      # as _sample(): one number per block
                u = torch.rand(logits.shape[:-1], dtype=logits.dtype, device=logits.device).view(-1)
            if self.block_size >= self.HARD_KERNEL_MIN_BLOCK:          # the chosen units only
                y = _HardTraining.apply(x.reshape(-1, self.d_model), rows, self.w1, self.w2, self.b2, chosen, u,
                                        power, self.scale_by_prob)     # (T, d)
                return self.dropout(y.view(*x.shape[:-1], self.d_model))
        h = F.linear(x, self.w1)                                       # (..., d_ff): the dense products
        if use_hard:                                                   # small blocks
            act = _HardMask.apply(h.view(-1, self.block_size), rows, chosen, u, power, self.scale_by_prob)
        else:
            act = _FusedMask.apply(h.view(-1, self.block_size), rows)  # (R, N)
        return self.dropout(act.view(h.shape) @ self.w2 + self.b2)     # (..., d_model)

    # -- the sparse path ----------------------------------------------------------------------------
    #: most tokens per call the fused kernel takes (it gathers rows for every token); more go through PyTorch,
    #: whose first layer turns dense beyond ``block_size`` tokens
    FUSED_MAX_ROWS = 16

    decode_path = PathSetting("""How :meth:`decode` computes by default: one of :data:`DECODE_PATHS`.""")

    def fused_unavailable(self, x: torch.Tensor | None = None) -> str | None:
        """Why the fused kernel cannot decode ``x`` (or, without ``x``, this layer), or None when it can.

        It needs Numba, the low-rank controller of plain ``nn.Linear`` layers (not ``"full"``, ``"mlp"`` or int8
        layers), float32 weights and input on the CPU, at most :attr:`FUSED_MAX_ROWS` tokens, and no gradient to
        record (the kernel is invisible to autograd: call it under ``torch.no_grad()`` or inference mode).
        """
        return self._fused_check(x)[0]

    def _fused_check(self, x: torch.Tensor | None) -> tuple[str | None, tuple | None]:
        """(:meth:`fused_unavailable`, the kernel's views of the weights when it is None)."""
        kernel = _kernel_module()
        if not kernel.available():
            return kernel.unavailable_reason(), None
        why_not, weights = self._fused_weights()
        if why_not is not None or x is None:
            return why_not, weights
        if x.dtype != torch.float32 or not x.is_cpu:
            return f"the kernel is compiled for float32 on the CPU, x is {x.dtype} on {x.device}", None
        rows = x.numel() // self.d_model
        if rows > self.FUSED_MAX_ROWS:
            return f"{rows} tokens in one call, more than FUSED_MAX_ROWS={self.FUSED_MAX_ROWS}", None
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self.parameters())):
            return "autograd is recording and the kernel has no backward (use torch.no_grad or inference mode)", None
        return None, weights

    def _fused_weights(self) -> tuple[str | None, tuple | None]:
        """(why the layer's weights do not suit the kernel or None, the kernel's NumPy views of them).

        Kept between calls (outside the module, so copies and pickles of the layer carry none) and made again
        when a weight is replaced, moved, converted or changed in place (its address, dtype or version changes;
        a view needs nothing new then, but a weight stored in another layout is copied for the kernel). The
        weights are read from the modules' own dictionaries: ``nn.Module`` attribute look-ups cost about a
        microsecond each, and this runs once per layer and token.
        """
        ctrl = self._modules["controller"]
        c1 = ctrl._modules.get("c1") if type(ctrl) is LowRankController else None
        c2 = ctrl._modules.get("c2") if type(ctrl) is LowRankController else None
        low_rank = type(c1) is nn.Linear and type(c2) is nn.Linear
        weights = ((c1._parameters["weight"], c2._parameters["weight"], c2._parameters["bias"],
                    self._parameters["w1"], self._parameters["w2"], self._parameters["b2"]) if low_rank else ())
        key = (low_rank,) + tuple((w.data_ptr(), w.dtype, _version(w)) for w in weights)
        cached = _FUSED_WEIGHTS.get(self)
        if cached is not None and cached[0] == key:
            return cached[1], cached[2]
        why_not, arrays = None, None
        if not low_rank:
            why_not = (f"the kernel computes the low-rank controller of nn.Linear layers only, this layer has "
                       f"controller={self.controller_kind!r} ({type(ctrl).__name__})")
        else:
            for w in weights:
                if w.dtype != torch.float32 or not w.is_cpu:
                    why_not = f"the kernel is compiled for float32 on the CPU, the weights are {w.dtype} on {w.device}"
                    break
        if why_not is None:
            c1w, c2w, c2b, w1, w2, b2 = weights
            arrays = _kernel_module().prepare(c1w, c2w.t(), c2b, w1, w2, b2)
        _FUSED_WEIGHTS[self] = (key, why_not, arrays)
        return why_not, arrays

    def _fused_decode(self, x: torch.Tensor, weights: tuple) -> torch.Tensor:
        """:meth:`decode` in one call of the kernel (:func:`.sparse_ff_kernel.run`), ``weights`` from
        :meth:`_fused_check`."""
        xf = x.detach().reshape(-1, self.d_model).numpy()              # (B, d); a copy only if x is strided
        if not xf.flags.c_contiguous:
            xf = xf.copy()
        out, _ = _kernel_module().run(xf, weights, self.block_size, self.scale_by_prob)
        self.__dict__["last_decode_path"] = "fused"                   # nn.Module.__setattr__ costs microseconds
        return torch.from_numpy(out).view(*x.shape[:-1], self.d_model)

    def step_function(self, rows: int = 1):
        """:meth:`decode` on ``(rows, d_model)`` float32 as one call of the fused kernel, with the weights and the
        checks done once; :meth:`decode` itself where the kernel does not apply to this layer or to ``rows``
        tokens (more than :attr:`FUSED_MAX_ROWS`), or :attr:`decode_path` is ``"pytorch"``. Inference only.
        The fused step's ``step.numpy`` is the same on NumPy arrays (the lean step's NumPy stream)."""
        why_not, weights = self._fused_check(None)
        if why_not is not None or self.decode_path == "pytorch" or rows > self.FUSED_MAX_ROWS:
            return self.decode
        run, block_size, scale = _kernel_module().run, self.block_size, self.scale_by_prob
        self.__dict__["last_decode_path"] = "fused"

        def numpy_step(x: np.ndarray) -> np.ndarray:
            return run(x, weights, block_size, scale)[0]                       # (B, d), C-contiguous

        def step(x: torch.Tensor) -> torch.Tensor:
            return torch.from_numpy(numpy_step(x.numpy()))                     # (B, d)
        step.numpy = numpy_step                                                # for a NumPy stream
        return step

    def decode(self, x: torch.Tensor, path: str | None = None) -> torch.Tensor:
        """The sparse computation: touch only the ``n_blocks`` selected rows of ``W1^T`` and ``W2``.

        Equals the eval-mode :meth:`forward` (within float rounding) for any leading shape. It is the
        inference path; it does not apply dropout and is not meant for training.

        ``path`` (default: the layer's :attr:`decode_path`) picks the implementation: ``"fused"``, one call of the
        kernel in :mod:`.sparse_ff_kernel`, where :meth:`fused_unavailable` finds nothing against it (``"auto"``
        then takes it; ``"fused"`` raises a ValueError that says why); otherwise ``"pytorch"``, the code below.
        :attr:`last_decode_path` records which one ran.

        The PyTorch path, the readable reference, is written for speed at batch 1, where every call pays a
        fixed cost per PyTorch operation: one token takes eleven matrix-vector and indexing calls (no
        ``nn.Linear`` wrappers, in-place where possible). Up to ``block_size`` tokens both matrices are gathered; beyond, the first layer is one dense product
        and only ``W2`` is gathered (chapter 5 measures both against the dense-masked :meth:`forward`).
        """
        if x.dim() < 1 or x.shape[-1] != self.d_model or x.dtype != self.w1.dtype:
            last_dim("x", x, self.d_model)                             # raises the clear error
            same_dtype("x", x, self.w1)
        if path is None:
            path = self.decode_path
        elif path not in DECODE_PATHS:
            raise ValueError(f"path must be one of {DECODE_PATHS} or None, got path={path!r}")
        if path != "pytorch":
            why_not, weights = self._fused_check(x)
            if why_not is None:
                try:
                    return self._fused_decode(x, weights)
                except _kernel_module().KernelUnavailable as e:   # it failed to compile on this machine
                    why_not = str(e)
            if path == "fused":
                raise ValueError(f"path='fused' does not apply to this call: {why_not}")
        self.__dict__["last_decode_path"] = "pytorch"
        lead = x.shape[:-1]
        xf = x.reshape(-1, self.d_model)                               # (B, d)
        # One token: matrix-vector products (fewest calls in eager PyTorch). A traced graph (torch.export, the
        # ONNX export) takes the general path below, whose matrix-matrix products other engines run faster.
        if xf.shape[0] == 1 and not torch.compiler.is_compiling():
            v = xf[0]                                                  # (d,)
            ctrl = self.controller
            if isinstance(ctrl, LowRankController) and type(ctrl.c1) is nn.Linear and type(ctrl.c2) is nn.Linear:
                logits = torch.addmv(ctrl.c2.bias, ctrl.c2.weight, torch.mv(ctrl.c1.weight, v))  # (d_ff,)
            else:                                                      # other controllers, or int8 layers
                logits = ctrl(xf)[0]
            idx = logits.view(self.n_blocks, self.block_size).argmax(-1).add_(self.block_offset)  # (n_blocks,)
            act = self._w1_dots(idx, v).relu_()                        # (n_blocks,)  selected W1 columns
            if self.scale_by_prob:                                     # times each chosen unit's probability
                act.mul_(self._chosen_prob(logits.view(self.n_blocks, self.block_size), idx))
            if self.n_blocks * self.d_model < (1 << 19):               # small: copy the rows, one product
                y = torch.addmv(self.b2, self.w2.index_select(0, idx).t(), act)  # (d,) b2 + sum_j act_j W2[k_j]
            else:                                                      # large: accumulate rows in place, no copy
                y = F.embedding_bag(idx.unsqueeze(0), self.w2, per_sample_weights=act.unsqueeze(0),
                                    mode="sum")[0].add_(self.b2)      # (d,)
            return y.view(*lead, self.d_model)
        logits = self.block_logits(xf)                                 # (B, n_blocks, block_size)
        idx = logits.argmax(dim=-1) + self.block_offset                # (B, n_blocks)
        if xf.shape[0] <= self.block_size:                             # few tokens: gather both matrices
            w1_rows = F.embedding(idx, self.w1)                        # (B, n_blocks, d)
            act = torch.bmm(w1_rows, xf.unsqueeze(-1)).squeeze(-1).relu_()  # (B, n_blocks)
        else:
            # Beyond N tokens the gathered W1 rows (B x n_blocks of them) outnumber the d_ff rows of W1: one
            # dense product is cheaper, then keep each block's selected unit. W2 is still gathered, doing
            # 1/N of the dense second layer's work.
            act = F.linear(xf, self.w1).gather(1, idx).relu_()        # (B, d_ff) -> (B, n_blocks)
        if self.scale_by_prob:
            act = act * self._chosen_prob(logits, idx)
        if torch.compiler.is_compiling():
            # ONNX has no embedding_bag (the exporter writes a loop over the tokens): gather, one batched product
            y = torch.bmm(act.unsqueeze(1), F.embedding(idx, self.w2)).squeeze(1)  # (B, d)
        else:
            y = F.embedding_bag(idx, self.w2, per_sample_weights=act, mode="sum")  # (B, d)
        return y.add_(self.b2).reshape(*lead, self.d_model)

    def _chosen_prob(self, logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """In-block softmax probability of each chosen unit: logits ``(..., n_blocks, block_size)``, flat ``idx``
        ``(..., n_blocks)`` -> ``(..., n_blocks)``."""
        chosen = (idx - self.block_offset).unsqueeze(-1)               # index within the block
        return (logits.gather(-1, chosen).squeeze(-1) - logits.logsumexp(-1)).exp()

    #: bytes of gathered ``W1`` rows held at once by :meth:`_w1_dots` (stays in the cache)
    GATHER_CHUNK_BYTES = 1 << 20

    def _w1_dots(self, idx: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``W1^T[idx] @ v`` for one token: the ``(n,)`` dot products of the selected rows with ``v`` ``(d,)``.

        The rows are gathered at most ``GATHER_CHUNK_BYTES`` at a time into a buffer reused from call to call,
        so the copy stays in the cache instead of going out to memory and back (measured about 10-20% faster
        than one ``index_select`` of all rows when the weights are cold). Each thread has its own buffer, so
        threads may decode with one layer at the same time.
        """
        if torch.is_grad_enabled() and (self.w1.requires_grad or v.requires_grad):
            return torch.mv(self.w1.index_select(0, idx), v)          # autograd cannot record out= calls
        n, d = idx.shape[0], self.d_model
        rows = max(1, min(n, self.GATHER_CHUNK_BYTES // (d * self.w1.element_size())))
        buffers = self.__dict__.setdefault("_w1_rows", {})            # thread id -> (rows, d) scratch
        buf = buffers.get(threading.get_ident())
        if buf is None or buf.shape != (rows, d) or buf.dtype != self.w1.dtype or buf.device != self.w1.device:
            buf = buffers[threading.get_ident()] = self.w1.new_empty(rows, d)   # scratch, not a parameter
        if rows == n:
            return torch.mv(torch.index_select(self.w1, 0, idx, out=buf), v)
        out = v.new_empty(n)
        for s in range(0, n, rows):
            e = min(n, s + rows)
            torch.mv(torch.index_select(self.w1, 0, idx[s:e], out=buf[:e - s]), v, out=out[s:e])
        return out

