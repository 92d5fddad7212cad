"""Reversible residual layers: training memory that does not grow with depth (chapter 7).

A Transformer keeps, for the backward pass, the inputs of every sublayer: activation memory grows with depth and
length. A reversible stack (Gomez et al. 2017; Reformer; Terraformer) runs two streams ``(a, b)``, both starting
as the embedded tokens. Each sublayer ``F`` (an attention, or a feed-forward) does

    (a, b) -> (b, a + F(b))

so its inputs can be rebuilt from its outputs: given ``(p, q) = (b, a + F(b))``, ``b = p`` and ``a = q - F(p)``.
:class:`ReversibleStack` therefore saves only the last pair of streams. In the backward pass it walks the
sublayers from the last to the first, rebuilds each one's input, runs ``F`` again with gradients on, and passes
the gradients down: about one extra forward pass of compute, for memory that no longer depends on the depth.

``F`` must compute the same thing the second time. Its random choices (dropout, and the sparse FF's hard/soft
draw and sampled units, all drawn from PyTorch's generator) are replayed: the generator's state before each
sublayer is kept in the forward pass and restored before the recomputation, as the reference does.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

__all__ = ["ReversibleStack", "reversible_forward"]

Sublayer = Callable[[torch.Tensor], torch.Tensor]


def reversible_forward(sublayers: Sequence[Sublayer], a: torch.Tensor, b: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """The two streams through every sublayer, with ordinary autograd (every input kept): the reference the
    memory-saving :class:`ReversibleStack` is tested against, and the path for inference."""
    for f in sublayers:
        a, b = b, a + f(b)
    return a, b


class _Reversible(torch.autograd.Function):
    """Forward without a graph; backward rebuilds each sublayer's input from its output."""

    @staticmethod
    def forward(ctx, a, b, stack, *params):
        states = []
        with torch.no_grad():
            for f in stack.sublayers:
                states.append(torch.get_rng_state())                      # replayed in backward
                a, b = b, a + f(b)
        ctx.stack, ctx.states = stack, states
        ctx.save_for_backward(a.detach(), b.detach())                     # the only activations kept
        return a, b

    @staticmethod
    def backward(ctx, grad_a, grad_b):
        stack = ctx.stack
        p, q = ctx.saved_tensors
        grads = {id(t): None for t in stack.params}
        for f, state in zip(reversed(stack.sublayers), reversed(ctx.states)):
            # the sublayer's outputs are (p, q) = (b, a + F(b)), with gradients (grad_a, grad_b)
            b = p.detach().requires_grad_(True)
            with torch.enable_grad(), torch.random.fork_rng(devices=[]):
                torch.set_rng_state(state)                                # the same random choices as before
                fb = f(b)
            a = (q - fb).detach()                                         # the rebuilt input
            used = [t for t in f.params if t.requires_grad]
            g_b, *g_params = torch.autograd.grad(fb, [b, *used], grad_b, allow_unused=True)
            for t, g in zip(used, g_params):
                if g is not None:
                    grads[id(t)] = g if grads[id(t)] is None else grads[id(t)] + g
            # a enters q directly (gradient grad_b); b is p and also enters q through F
            grad_a, grad_b = grad_b, grad_a + (g_b if g_b is not None else 0)
            p, q = a, b.detach()
        return (grad_a, grad_b, None, *[grads[id(t)] for t in stack.params])


class ReversibleStack:
    """Runs ``sublayers`` reversibly on two streams.

    Each sublayer is a callable ``(B, T, C) -> (B, T, C)`` with a ``params`` attribute listing the parameters it
    uses. ``stack(a, b)`` returns the two output streams. With gradients enabled it keeps only them (and one
    generator state per sublayer) for the backward pass; without (inference) it is :func:`reversible_forward`.
    """

    def __init__(self, sublayers: Sequence[Sublayer]):
        self.sublayers = list(sublayers)
        for f in self.sublayers:
            if not hasattr(f, "params"):
                raise ValueError("each sublayer must list the parameters it uses in a `params` attribute")
        seen, self.params = set(), []
        for f in self.sublayers:
            for t in f.params:
                if t.requires_grad and id(t) not in seen:
                    seen.add(id(t))
                    self.params.append(t)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if not torch.is_grad_enabled():
            return reversible_forward(self.sublayers, a, b)
        return _Reversible.apply(a, b, self, *self.params)
