"""Mixture of Experts: a router sends each token to ``top_k`` of ``n_experts`` small dense FF layers (chapter 6).

The relative the paper's layer is most often compared with. Notation: ``E = n_experts``, each expert a dense FF
``d_model -> d_e -> d_model`` with ``d_e = d_ff / E``, so the layer stores about as many weights as a dense FF of
width ``d_ff`` (plus a ``d_model x E`` router) and a token reads ``top_k / E`` of them.

* router ``logits = x W_r`` ``(..., E)``, ``p = softmax(logits)``; in training, optionally ``+ router_noise * N(0, 1)``
  on the logits (noisy top-k gating);
* each token goes to its ``top_k`` experts with gates ``p`` of those experts, renormalised to sum to one when
  ``top_k > 1`` (with ``top_k = 1`` the gate is the raw probability, as in the Switch Transformer, so the
  router still gets a gradient);
* ``y = sum_chosen gate_e * FF_e(x)``;
* the Switch load-balancing loss ``E * sum_e f_e P_e`` (``f_e``: share of tokens whose first choice is ``e``,
  ``P_e``: mean router probability of ``e``) is kept in :attr:`MoEFF.aux_loss` after each training call, scaled
  by ``aux_weight``; :func:`~sparse_tutorial.train.train_lm` adds it to the loss.

**Capacity.** Accelerator implementations give every expert a fixed buffer of ``capacity_factor * tokens / E``
slots, so shapes stay static, and drop the tokens that overflow it. On a CPU nothing needs static shapes, so this
layer has no capacity limit and drops no token: every token is computed by all of its ``top_k`` experts, in
training and at inference alike (which keeps training, evaluation and decoding the same function).

Compute is sparse in every mode: the tokens are grouped by expert and each expert runs on its own tokens only.
:meth:`MoEFF.decode` adds a fast path for one token (``top_k`` matrix-vector products, no grouping).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import last_dim, positive_int, probability
from .base import FeedForward

__all__ = ["MoEFF"]


class MoEFF(FeedForward):
    """Mixture of ``n_experts`` dense FF experts of width ``d_ff / n_experts``; each token uses ``top_k``.

    Args:
        d_model: width of the residual stream.
        d_ff: total hidden units of all experts; must be a multiple of ``n_experts``.
        n_experts: number of experts ``E``.
        top_k: experts per token (1 = Switch routing).
        dropout: dropout on the output.
        router_noise: standard deviation of the Gaussian noise added to the router logits in training (0: none).
        aux_weight: weight of the load-balancing loss left in :attr:`aux_loss` after each training call.
    """

    #: the one-token fast path of :meth:`decode` is cheaper than grouping tokens by expert
    has_sparse_decode = True

    def __init__(self, d_model: int, d_ff: int, n_experts: int = 4, top_k: int = 1, dropout: float = 0.0, *,
                 router_noise: float = 0.0, aux_weight: float = 0.01):
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        positive_int("d_ff", d_ff)
        positive_int("n_experts", n_experts)
        positive_int("top_k", top_k)
        if d_ff % n_experts:
            raise ValueError(f"d_ff must be divisible by n_experts, got d_ff={d_ff}, n_experts={n_experts}")
        if top_k > n_experts:
            raise ValueError(f"top_k must be at most n_experts={n_experts}, got top_k={top_k}")
        for name, value in (("router_noise", router_noise), ("aux_weight", aux_weight)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0 or math.isinf(value):
                raise ValueError(f"{name} must be a finite number >= 0, got {name}={value!r}")
        self.d_ff, self.n_experts, self.top_k = d_ff, n_experts, top_k
        self.d_expert = d_ff // n_experts
        self.router_noise, self.aux_weight = float(router_noise), float(aux_weight)
        E, de, d = n_experts, self.d_expert, d_model
        self.router = nn.Linear(d, E, bias=False)
        self.w1 = nn.Parameter(torch.empty(E, de, d))    # expert e's W1^T: one row of d weights per hidden unit
        self.b1 = nn.Parameter(torch.zeros(E, de))
        self.w2 = nn.Parameter(torch.empty(E, de, d))    # expert e's W2: one row of d weights per hidden unit
        self.b2 = nn.Parameter(torch.zeros(E, d))
        self.dropout = nn.Dropout(probability("dropout", dropout))
        #: the scaled load-balancing loss of the last training call (None in eval mode)
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Each expert as nn.Linear(d_model, d_e) and nn.Linear(d_e, d_model) would start.
        nn.init.uniform_(self.w1, -1 / math.sqrt(self.d_model), 1 / math.sqrt(self.d_model))
        nn.init.uniform_(self.w2, -1 / math.sqrt(self.d_expert), 1 / math.sqrt(self.d_expert))
        nn.init.zeros_(self.b1)
        nn.init.zeros_(self.b2)

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_ff={self.d_ff}, n_experts={self.n_experts}, top_k={self.top_k}, "
                f"d_expert={self.d_expert}, router_noise={self.router_noise}")

    def active_params_per_token(self) -> int:
        """The router, and the weights and biases of ``top_k`` experts."""
        per_expert = 2 * self.d_expert * self.d_model + self.d_expert + self.d_model
        return self.router.weight.numel() + self.top_k * per_expert

    # -- routing ------------------------------------------------------------------------------------
    def route(self, xf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For tokens ``xf`` ``(B, d)``: router probabilities ``(B, E)``, chosen experts and gates ``(B, top_k)``."""
        logits = F.linear(xf, self.router.weight)                       # (B, E)
        if self.training and self.router_noise > 0:
            logits = logits + self.router_noise * torch.randn_like(logits)
        probs = F.softmax(logits, dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)                 # (B, top_k) each, best first
        if self.top_k > 1:
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return probs, experts, gates

    def _balance_loss(self, probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """Switch's ``E * sum_e f_e P_e``: 1 when the tokens are spread evenly, up to ``E`` when all go to one."""
        first = F.one_hot(experts[:, 0], self.n_experts).to(probs.dtype)   # (B, E)
        return self.n_experts * (first.mean(0) * probs.mean(0)).sum()

    # -- compute --------------------------------------------------------------------------------------
    def _expert(self, e: int, xe: torch.Tensor) -> torch.Tensor:
        """Expert ``e`` on its tokens ``xe`` ``(n, d)``: ``relu(xe W1_e + b1_e) W2_e + b2_e`` ``(n, d)``."""
        h = F.relu(torch.addmm(self.b1[e], xe, self.w1[e].t()))         # (n, d_e)
        return torch.addmm(self.b2[e], h, self.w2[e])                   # (n, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Group the tokens by expert, run each expert on its own tokens, add the gated outputs. ``(..., d)``."""
        last_dim("x", x, self.d_model)
        xf = x.reshape(-1, self.d_model)                                # (B, d)
        probs, experts, gates = self.route(xf)
        self.aux_loss = self.aux_weight * self._balance_loss(probs, experts) if self.training else None
        y = torch.zeros_like(xf)
        flat_expert = experts.flatten()                                 # (B * top_k,)
        flat_token = torch.arange(xf.shape[0], device=x.device).repeat_interleave(self.top_k)
        flat_gate = gates.flatten()
        for e in range(self.n_experts):
            pick = (flat_expert == e).nonzero().squeeze(-1)             # this expert's (token, slot) pairs
            if pick.numel() == 0:
                continue
            tokens = flat_token[pick]
            out = self._expert(e, xf[tokens]) * flat_gate[pick].unsqueeze(-1)   # (n, d)
            y = y.index_add(0, tokens, out)
        return self.dropout(y).view(x.shape)

    def decode(self, x: torch.Tensor) -> torch.Tensor:
        """The inference path: one token is ``top_k`` expert products, more tokens go through :meth:`forward`."""
        last_dim("x", x, self.d_model)
        xf = x.reshape(-1, self.d_model)
        if xf.shape[0] != 1:
            return self.forward(x)
        _, experts, gates = self.route(xf)
        v = xf[0]
        y = None
        for e, g in zip(experts[0].tolist(), gates[0]):
            h = torch.addmv(self.b1[e], self.w1[e], v).relu_()          # (d_e,)
            out = torch.addmv(self.b2[e], self.w2[e].t(), h).mul_(g)    # (d,)
            y = out if y is None else y.add_(out)
        return y.view(x.shape)
