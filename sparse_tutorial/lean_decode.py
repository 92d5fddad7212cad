"""A lean decoding step: the whole model's per-token work with the Python of the eager step taken out.

At batch 1 a decoding step is a chain of small operations, and in eager PyTorch each module call also checks
its input, looks up its weights and picks a path: per block about a dozen calls whose fixed cost is as large as
the arithmetic of a sparse layer (chapter 5 measures it). :class:`LeanDecoder` does those look-ups once, after
the prompt, and then runs each new token as

* the token and position embeddings, added (``(B, C)``: one token per sequence, no time axis);
* per block, :meth:`Block.step_function <sparse_tutorial.model.Block.step_function>`:
  ``x + attn_step(layer_norm(x), P)`` and ``x + ff_step(layer_norm(x))``, where each layer kind's
  ``step_function`` (:meth:`FeedForward.step_function <sparse_tutorial.layers.base.FeedForward.step_function>`,
  and the attention kinds' ``step_function(cache)``) has bound its weights and, where a fused kernel exists, is
  one call of it;
* the final layer norm and the tied output head.

Where every block offers it (``step.numpy``: float32 on the CPU), the stream between the embeddings and the final
layer norm stays one NumPy array, updated in place: the fused kernels take and return NumPy arrays, so a sublayer
with a fused kernel costs no conversion, and each residual addition is a NumPy addition in place instead of a new
tensor. The blocks' layer norms stay PyTorch's own. On that stream the embeddings are added into a buffer held
between steps, and the final layer norm and the tied head are one compiled call
(:mod:`~sparse_tutorial.layers.head_kernel`, where Numba runs): after megabytes of weights have streamed through
the caches, each PyTorch call there first brings its own code and data back into them. The logits differ from the
PyTorch stream's by float32 rounding in that last call only. :attr:`LeanDecoder.stream` says which stream a
decoder runs; ``stream="pytorch"`` keeps the PyTorch one.

The cache is the model's own :class:`~sparse_tutorial.model.ModelCache`, given room for the whole context once
(:meth:`LayerCache.reserve <sparse_tutorial.layers.attention.LayerCache.reserve>`), so no step reallocates a
buffer. A layer kind without a ``step_function`` (LSH attention, int8 layers) is called as a module, on the same
cache: the decoder is never wrong for a kind it does not know, only less lean. The tests check every step's
logits against the model's own cached forward.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .model import TransformerLM

__all__ = ["LeanDecoder"]


class LeanDecoder:
    """Greedy or step-by-step decoding of ``model`` (eval mode) with the lean step.

    ``prefill(idx)`` runs the prompt through the model's own forward (one call, the cache filled), reserves the
    cache's room and binds every layer's step; ``step(idx)`` then decodes one new token per sequence. The steps
    read the weights as they were at :meth:`prefill`: call it again after changing them.

    ``stream``: ``"auto"`` keeps the stream in NumPy where every block can (see the module docstring),
    ``"numpy"`` insists (a ValueError at :meth:`prefill` where a block cannot), ``"pytorch"`` keeps PyTorch's.
    """

    STREAMS = ("auto", "numpy", "pytorch")

    def __init__(self, model: TransformerLM, stream: str = "auto"):
        if not isinstance(model, TransformerLM):
            raise ValueError(f"model must be a TransformerLM, got {type(model).__name__}")
        if model.cfg.reversible:
            raise ValueError("the lean step runs the blocks one after the other, not as reversible streams; got "
                             "reversible=True (decode such a model with its own forward)")
        if stream not in self.STREAMS:
            raise ValueError(f"stream must be one of {self.STREAMS}, got stream={stream!r}")
        self.model = model.eval()
        self.stream_setting = stream
        #: the stream the bound steps run on, ``"numpy"`` or ``"pytorch"`` (None before :meth:`prefill`)
        self.stream = None
        self.cache = None
        self._plan = None
        self._numpy_glue = None
        #: seconds of each step of the last :meth:`generate` given a clock
        self.per_token: list[float] = []

    def prefill(self, idx: torch.Tensor) -> torch.Tensor:
        """The prompt ``idx`` ``(B, T)`` through the model's forward with a new cache; returns its logits
        ``(B, T, vocab)`` and makes the decoder ready for :meth:`step`."""
        m, ctx = self.model, self.model.cfg.context_length
        with torch.inference_mode():
            self.cache = m.new_cache()
            logits, _ = m(idx, cache=self.cache)
            for block, layer in zip(m.blocks, self.cache.layers):
                if hasattr(block.attn, "step_function"):                # the kinds whose steps hold the buffers
                    layer.reserve(ctx, ("conv_inputs",) if "conv_inputs" in layer.state else ())
            B = idx.shape[0]
            self._plan = [block.step_function(layer, B) for block, layer in zip(m.blocks, self.cache.layers)]
            numpy_plan = [step.numpy for step in self._plan]
            if self.stream_setting == "numpy" and None in numpy_plan:
                raise ValueError("stream='numpy' does not apply to this model: its blocks' layer norms are not "
                                 "float32 on the CPU, or a block has an SRU branch (use stream='auto')")
            use_numpy = self.stream_setting != "pytorch" and None not in numpy_plan
            self._numpy_plan = numpy_plan if use_numpy else None
            self.stream = "numpy" if use_numpy else "pytorch"
            self._final = _norm(m.ln_f)
            head = m.head
            self._head = (lambda h: F.linear(h, head.weight)) if type(head) is nn.Linear else head
            self._emb = m.tok_emb.weight, m.pos_emb.weight                  # (vocab, C), (context, C)
            self._batch = B
            self._numpy_glue = self._bind_numpy_glue(B) if use_numpy else None
        return logits

    def _bind_numpy_glue(self, B: int):
        """The NumPy stream's first and last steps where Numba runs and the head is the tied ``nn.Linear``: the
        embeddings' NumPy views, a stream buffer, and the final layer norm and the head in one compiled call
        (:func:`~sparse_tutorial.layers.head_kernel.bind`). None otherwise (the step then keeps PyTorch's calls,
        on the same stream)."""
        from .layers import head_kernel                                     # imports Numba: on first use
        m = self.model
        tok, pos = m.tok_emb.weight, m.pos_emb.weight
        if type(m.head) is not nn.Linear or tok.dtype != torch.float32 or pos.dtype != torch.float32:
            return None
        try:
            head = head_kernel.bind(m.ln_f, m.head.weight, B)                 # (B, C) -> (B, vocab or more)
        except (head_kernel.KernelUnavailable, ValueError):
            return None
        stream = np.empty((B, tok.shape[1]), dtype=np.float32)             # (B, C), rewritten each step
        return tok.detach().numpy(), pos.detach().numpy(), stream, head

    def step(self, idx: torch.Tensor) -> torch.Tensor:
        """One new token per sequence, ``idx`` ``(B, 1)``, after the cache; returns the logits ``(B, 1, vocab)``."""
        if self._plan is None:
            raise ValueError("call prefill(prompt) before step()")
        cfg, P = self.model.cfg, self.cache.length
        if idx.shape != (self._batch, 1):
            raise ValueError(f"idx must be a (batch={self._batch}, 1) tensor of "
                             f"token ids, got shape {tuple(idx.shape)}")
        if P >= cfg.context_length:
            raise ValueError(f"the cache holds context_length={cfg.context_length} "
                             f"positions: no room for another token (prefill the "
                             f"last ones again to slide the window)")
        with torch.inference_mode():                         # a sublayer without a NumPy step calls PyTorch
            if self._numpy_glue is not None:                 # NumPy and compiled calls from end to end
                tok, pos, xs, head = self._numpy_glue
                np.add(tok[idx.numpy()[:, 0]], pos[P], out=xs)   # (B, C): the embeddings, into the stream
                for block_step in self._numpy_plan:
                    block_step(xs, P)
                return torch.from_numpy(head(xs))[:, None, :cfg.vocab_size]   # (B, 1, vocab)
            tok, pos = self._emb
            x = tok[idx[:, 0]] + pos[P]                      # (B, C), a new tensor
            if self._numpy_plan is not None:
                xs = x.numpy()                               # the same memory, updated in place
                for block_step in self._numpy_plan:
                    block_step(xs, P)
            else:
                for block_step in self._plan:
                    x = block_step(x, P)                     # (B, C)
            logits = self._head(F.layer_norm(x, *self._final))  # (B, vocab or more)
        return logits[:, None, :cfg.vocab_size]

    def generate(self, idx: torch.Tensor, max_new_tokens: int, clock=None) -> tuple[torch.Tensor, list]:
        """Greedy continuation of ``idx`` ``(B, T0)`` by ``max_new_tokens`` tokens within the context. Returns the
        tokens ``(B, T0 + new)`` and the last position's logits after the prompt and after each step (NumPy),
        as :meth:`OnnxDecoder.generate <sparse_tutorial.onnx_engine.OnnxDecoder.generate>`; with ``clock``, the
        time of each step (by ``clock``) in :attr:`per_token`."""
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an integer >= 0, got max_new_tokens={max_new_tokens!r}")
        if idx.dim() != 2 or idx.shape[1] + max_new_tokens > self.model.cfg.context_length:
            raise ValueError(f"idx must be a (batch, time) tensor and prompt length + max_new_tokens must fit in "
                             f"context_length={self.model.cfg.context_length}, got shape {tuple(idx.shape)} "
                             f"and max_new_tokens={max_new_tokens}")
        logits = self.prefill(idx)
        seen = [logits[:, -1].numpy()]
        self.per_token = []
        for i in range(max_new_tokens):
            nxt = logits[:, -1].argmax(-1, keepdim=True)                       # (B, 1)
            idx = torch.cat([idx, nxt], dim=1)
            if i < max_new_tokens - 1:                                          # the last token needs no step
                t0 = clock() if clock else 0.0
                logits = self.step(nxt)
                if clock:
                    self.per_token.append(clock() - t0)
                seen.append(logits[:, -1].numpy())
        return idx, seen


def _norm(ln: nn.LayerNorm) -> tuple:
    """``F.layer_norm``'s arguments after the input, looked up once."""
    return ln.normalized_shape, ln.weight, ln.bias, ln.eps
