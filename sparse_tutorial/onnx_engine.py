"""The same models in an outside engine: export the decoding step to ONNX and run it with ONNX Runtime.

A reader who deploys a small model on a CPU would not run eager PyTorch; they would export it. This module
exports two graphs of a :class:`~sparse_tutorial.model.TransformerLM`:

* the **prompt** graph: ``(idx (B, T)) -> (logits (B, T, vocab), state...)``, the prefill;
* the **step** graph: ``(idx (B, 1), state...) -> (logits (B, 1, vocab), state...)``, one new token.

The cache is explicit: every layer's keys and values ``(B, H, P, hd)``, and for chapter 4's convolution its
cached inputs ``(B, M, P, S)``, go in and come out as tensors (``P`` is a dynamic axis). Both graphs are the
model's own :meth:`~sparse_tutorial.model.TransformerLM.forward`, traced with a cache that concatenates
(:class:`StepCache`), so nothing here re-implements a layer. The sparse FF's argmax and row gathers are
ordinary ONNX operators (``ArgMax``, ``Gather``).

``onnx``, ``onnxscript`` and ``onnxruntime`` are optional: :func:`available` says whether they import, and
:func:`unavailable_reason` what to install.

:func:`trace_decoder` traces the same two graphs with ``torch.jit.trace`` instead (TorchScript), and PyTorch's
graph executor runs them: the model's Python (module calls, argument checks, the cache's bookkeeping) runs once,
at tracing, and not at every token. It needs nothing beyond PyTorch, and :class:`OnnxDecoder` drives both.
:func:`compile_decoder` compiles them with ``torch.compile`` (TorchInductor's generated C++), PyTorch's own way
to drop the Python; it needs a C++ compiler.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .layers.attention import LayerCache
from .model import ModelCache, TransformerLM

__all__ = ["available", "unavailable_reason", "StepCache", "state_names", "OnnxDecoder", "export_decoder",
           "trace_decoder", "compile_decoder", "compile_unavailable_reason"]

_MODULES = ("onnx", "onnxscript", "onnxruntime")
#: the attention kinds whose cache is keys, values and (for "conv") the convolution's inputs
_QKV_KINDS = ("dense", "multiplicative", "conv")


def available() -> bool:
    """True when ``onnx``, ``onnxscript`` and ``onnxruntime`` can be imported."""
    return unavailable_reason() is None


def unavailable_reason() -> str | None:
    """None where the engine can run, else a sentence naming what to install."""
    missing = [m for m in _MODULES if importlib.util.find_spec(m) is None]
    if missing:
        return f"{', '.join(missing)} not installed (pip install {' '.join(missing)})"
    return None


def _check_model(model: TransformerLM) -> None:
    cfg = model.cfg
    if cfg.qkv not in _QKV_KINDS:
        raise ValueError(f"the decoding graphs (ONNX, TorchScript) take qkv in {list(_QKV_KINDS)}, "
                         f"got qkv={cfg.qkv!r}")
    if cfg.reversible or cfg.sru_dim:
        raise ValueError(f"the decoding graphs (ONNX, TorchScript) take neither reversible streams nor the SRU "
                         f"branch, got "
                         f"reversible={cfg.reversible!r}, sru_dim={cfg.sru_dim!r}")


def state_names(model: TransformerLM) -> list[str]:
    """The names of the cache tensors, in the order the graphs take and return them: per layer ``k{i}``,
    ``v{i}`` and, for the convolution QKV, ``conv{i}``."""
    extra = ["conv"] if model.cfg.qkv == "conv" else []
    return [f"{name}{i}" for i in range(model.cfg.n_layers) for name in ["k", "v", *extra]]


class StepCache(LayerCache):
    """A layer's cache whose past arrives as tensors and whose new state leaves as tensors.

    :meth:`append` and :meth:`extend_state` concatenate (``torch.cat``) instead of writing into a buffer, so a
    traced graph has the cache as plain inputs and outputs. ``length`` is the past's length ``P``, a dynamic
    axis of the exported graph.
    """

    def __init__(self, k=None, v=None, conv=None):
        super().__init__()
        self.past_k, self.past_v = k, v                    # (B, H, P, hd); None: the prompt
        self.state = {} if conv is None else {"conv_inputs": conv}
        self.out_k = self.out_v = None

    @property
    def length(self) -> int:
        return 0 if self.past_k is None else self.past_k.shape[-2]

    def check_batch(self, batch: int) -> None:
        """Nothing to check: the graph's inputs fix the batch."""

    def append(self, k: torch.Tensor, v: torch.Tensor):
        """The keys and values of ``T`` new positions ``(B, H, T, hd)`` after the past ones."""
        if self.past_k is not None:
            k = torch.cat([self.past_k, k], dim=-2)        # (B, H, P + T, hd)
            v = torch.cat([self.past_v, v], dim=-2)
        else:                                              # the prompt's keys are views into one product:
            k, v = k.contiguous(), v.contiguous()          # every state that leaves a graph has one layout
        self.out_k, self.out_v = k, v
        return k, v

    def extend_state(self, name: str, new: torch.Tensor) -> torch.Tensor:
        """The convolution's cached inputs ``(B, M, P, S)`` followed by the new ones."""
        old = self.state.get(name)
        self.state[name] = new if old is None else torch.cat([old, new], dim=-2)
        return self.state[name]

    def outputs(self) -> list[torch.Tensor]:
        """The state after this call, in the order of :func:`state_names`."""
        extra = [self.state["conv_inputs"]] if "conv_inputs" in self.state else []
        return [self.out_k, self.out_v, *extra]


class _Graph(nn.Module):
    """``forward(idx, *state) -> (logits, *new_state)``: the model's forward with a :class:`StepCache` per layer."""

    def __init__(self, model: TransformerLM, step: bool):
        super().__init__()
        self.model, self.step = model, step
        self.per_layer = 3 if model.cfg.qkv == "conv" else 2

    def forward(self, idx: torch.Tensor, *state: torch.Tensor):
        cache = ModelCache(0)
        n = self.per_layer
        cache.layers = [StepCache(*state[i * n:(i + 1) * n]) if self.step else StepCache()
                        for i in range(self.model.cfg.n_layers)]
        logits, _ = self.model(idx, cache=cache)
        return (logits, *[t for layer in cache.layers for t in layer.outputs()])


@dataclass
class OnnxDecoder:
    """Both graphs of one model in ONNX Runtime sessions (or :func:`trace_decoder`'s TorchScript graphs behind
    the same ``run`` call); :meth:`generate` decodes greedily with them."""

    prompt: object                      # onnxruntime.InferenceSession of the prompt graph
    step: object                        # onnxruntime.InferenceSession of the step graph
    names: list[str]                    # state_names(model)
    vocab_size: int
    context_length: int
    per_token: list[float] = field(default_factory=list)   # seconds of each step of the last generate()

    def prefill(self, idx) -> tuple:
        """Run the prompt ``idx`` (numpy int64 ``(B, T)``, ``T >= 2``); returns ``(logits, state)``."""
        if idx.ndim != 2 or idx.shape[1] < 2:
            raise ValueError(f"idx must be a (batch, time >= 2) array of token ids (the step graph needs two "
                             f"positions of past), got shape {tuple(idx.shape)}")
        out = self.prompt.run(None, {"idx": idx})
        return out[0], out[1:]

    def decode(self, idx, state) -> tuple:
        """One step: ``idx`` ``(B, 1)`` after the cache ``state``; returns ``(logits, state)``."""
        out = self.step.run(None, {"idx": idx, **dict(zip(self.names, state))})
        return out[0], out[1:]

    def generate(self, idx, max_new_tokens: int, clock=time.perf_counter):
        """Greedy continuation of ``idx`` (numpy int64 ``(B, T0)``) by ``max_new_tokens`` tokens, with the
        time of each step (by ``clock``) in :attr:`per_token`. Returns ``(tokens (B, T0 + new), [the last
        position's logits (B, vocab) after the prompt and after each step])``."""
        if idx.shape[1] + max_new_tokens > self.context_length:
            raise ValueError(f"prompt length + max_new_tokens must fit in context_length={self.context_length}, "
                             f"got {idx.shape[1]} + {max_new_tokens}")
        logits, state = self.prefill(idx)
        steps, self.per_token = [logits[:, -1]], []
        for i in range(max_new_tokens):
            nxt = steps[-1].argmax(-1)[:, None].astype(np.int64)        # (B, 1)
            idx = np.concatenate([idx, nxt], axis=1)
            if i < max_new_tokens - 1:                                  # the last token needs no step
                t0 = clock()
                logits, state = self.decode(nxt, state)
                self.per_token.append(clock() - t0)
                steps.append(logits[:, -1])
        return idx, steps


def _check_counts(batch, threads) -> None:
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive integer, got batch={batch!r}")
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads must be a positive integer, got threads={threads!r}")


@contextlib.contextmanager
def _pytorch_paths(model: nn.Module):
    """Every layer with a ``decode_path`` on its PyTorch path for the duration (a traced or exported graph
    cannot call Numba's kernel), then back."""
    saved = {m: m.decode_path for m in model.modules() if hasattr(m, "decode_path")}
    try:
        for m in saved:
            m.decode_path = "pytorch"
        yield
    finally:
        for m, p in saved.items():
            m.decode_path = p


def _examples(model: TransformerLM, batch: int) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """The example inputs both graphs are traced with: a 4-token prompt, and one token after its state."""
    prompt_idx = torch.zeros(batch, 4, dtype=torch.long)
    with torch.no_grad():
        _, *state = _Graph(model, step=False)(prompt_idx)              # a 4-token past for the step's example
    return prompt_idx, torch.zeros(batch, 1, dtype=torch.long), state


class _TracedSession:
    """A TorchScript graph behind ONNX Runtime's ``run(None, feeds)`` call: NumPy arrays in and out (no copies)."""

    def __init__(self, graph, names: list[str], threads: int):
        self.graph, self.names, self.threads = graph, names, threads

    def run(self, _outputs, feeds: dict) -> list[np.ndarray]:
        threads = torch.get_num_threads()
        if threads != self.threads:
            torch.set_num_threads(self.threads)
        try:
            with torch.inference_mode():
                out = self.graph(*(torch.from_numpy(feeds[n]) for n in self.names))
        finally:
            if threads != self.threads:
                torch.set_num_threads(threads)
        return [t.numpy() for t in out]


def trace_decoder(model: TransformerLM, *, batch: int = 1, threads: int = 1) -> OnnxDecoder:
    """``model``'s prompt and step graphs traced with ``torch.jit.trace`` (TorchScript), run by PyTorch.

    The graphs are the ones :func:`export_decoder` exports (same inputs, outputs and limits: a prompt of at
    least two tokens, a fixed ``batch``), recorded by running the model once on example inputs. A trace keeps the
    tensor operations and drops the Python around them, so the Python branches taken for the examples are
    fixed: a prompt of any length takes the prompt's branches, every step the one-token branches (as in
    decoding). ``threads``: PyTorch's threads while a graph runs. The sparse FF layers trace their PyTorch
    decode path (Numba's kernel is not a tensor operation a trace can record). PyTorch has deprecated
    TorchScript in favour of ``torch.compile`` and ``torch.export``; it still runs, and it is measured here as
    the cheapest way to drop the Python from a decoding step.
    """
    _check_model(model)
    _check_counts(batch, threads)
    model = model.eval()
    names, cfg = state_names(model), model.cfg
    with _pytorch_paths(model), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", torch.jit.TracerWarning)   # the Python branches are fixed on purpose
        warnings.simplefilter("ignore", FutureWarning)             # TorchScript's notice that it is deprecated
        prompt_idx, step_idx, state = _examples(model, batch)
        graphs = [torch.jit.trace(_Graph(model, step=False), (prompt_idx,), check_trace=False),
                  torch.jit.trace(_Graph(model, step=True), (step_idx, *state), check_trace=False)]
    sessions = [_TracedSession(g, feeds, threads) for g, feeds in zip(graphs, (["idx"], ["idx", *names]))]
    return OnnxDecoder(*sessions, names, cfg.vocab_size, cfg.context_length)


def compile_unavailable_reason() -> str | None:
    """Why :func:`compile_decoder` cannot run here (no C++ compiler on the ``PATH``), or None where it may.

    A compiler that is found can still fail on an unusual machine; :func:`compile_decoder` then says so."""
    if shutil.which("g++") is None and shutil.which("c++") is None:
        return "torch.compile's CPU code needs a C++ compiler and none is on the PATH (on Debian: apt-get install g++)"
    return None


def compile_decoder(model: TransformerLM, *, batch: int = 1, threads: int = 1) -> OnnxDecoder:
    """``model``'s prompt and step graphs compiled with ``torch.compile`` (TorchInductor), run by PyTorch.

    The graphs are the ones :func:`trace_decoder` traces (same inputs, outputs and limits), compiled with
    dynamic shapes, so one compilation serves every prompt length and every length of the cache. Inductor writes
    and compiles C++ for the CPU: it needs a C++ compiler (``g++``), and compiling both graphs takes tens of
    seconds on a 2-core machine. Both graphs are compiled here, on examples, so a machine without a working
    compiler fails at once, with a RuntimeError that says so. The graphs belong to a copy of ``model`` whose sparse
    FF layers keep their PyTorch decode path (Numba's kernel is not a tensor operation Inductor can compile), so
    the model itself is left as it was. ``threads``: PyTorch's threads while a graph runs.
    """
    _check_model(model)
    _check_counts(batch, threads)
    model = copy.deepcopy(model).eval()
    names, cfg = state_names(model), model.cfg
    for m in model.modules():
        if hasattr(m, "decode_path"):
            m.decode_path = "pytorch"
    # Every compiled graph runs the same Python function (_Graph.forward), and Dynamo keeps at most
    # recompile_limit graphs per function before it silently runs the rest uncompiled: two per model here
    dynamo = torch._dynamo.config                               # the name before PyTorch 2.6: cache_size_limit
    limit = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
    setattr(dynamo, limit, max(getattr(dynamo, limit), 64))
    graphs = [torch.compile(_Graph(model, step=False), dynamic=True),
              torch.compile(_Graph(model, step=True), dynamic=True)]
    sessions = [_TracedSession(g, feeds, threads) for g, feeds in zip(graphs, (["idx"], ["idx", *names]))]
    quiet = logging.getLogger("torch.utils.cpp_extension")      # its note that this machine has no CUDA
    level = quiet.level
    try:
        quiet.setLevel(logging.ERROR)
        prompt_idx, step_idx, state = _examples(model, batch)
        sessions[0].run(None, {"idx": prompt_idx.numpy()})
        sessions[1].run(None, {"idx": step_idx.numpy(), **{n: t.numpy() for n, t in zip(names, state)}})
    except Exception as e:    # Inductor raises its own kinds: a missing or failing compiler, an unsupported op
        first_line = (str(e).strip().splitlines() or [""])[0][:300]
        raise RuntimeError(f"torch.compile could not compile the decoding graphs here ({type(e).__name__}: "
                           f"{first_line}); it needs a working C++ compiler (on Debian: apt-get install g++)") from e
    finally:
        quiet.setLevel(level)
    return OnnxDecoder(*sessions, names, cfg.vocab_size, cfg.context_length)


def export_decoder(model: TransformerLM, *, batch: int = 1, threads: int = 1,
                   directory: str | Path | None = None) -> OnnxDecoder:
    """Export ``model``'s prompt and step graphs to ONNX and open them in ONNX Runtime on the CPU.

    ``batch``: the batch size the graphs take (fixed). ``threads``: ONNX Runtime's intra-op threads.
    ``directory``: where the ``.onnx`` files go (default: a temporary one). The sparse FF layers run their
    PyTorch decode path in the export (Numba's kernel is not an ONNX operator).
    """
    if not available():
        raise RuntimeError(f"the ONNX engine cannot run here: {unavailable_reason()}")
    import onnxruntime as ort

    _check_model(model)
    _check_counts(batch, threads)
    model = model.eval()
    directory = Path(tempfile.mkdtemp(prefix="sparse_tutorial_onnx_") if directory is None else directory)
    directory.mkdir(parents=True, exist_ok=True)
    names, cfg = state_names(model), model.cfg
    outputs = ["logits", *[f"new_{n}" for n in names]]                 # ONNX names must differ from inputs
    files = [directory / "prompt.onnx", directory / "step.onnx"]
    try:
        with _pytorch_paths(model), torch.no_grad():                    # Numba's kernel is no ONNX operator
            prompt_idx, step_idx, state = _examples(model, batch)
            tokens = torch.export.Dim("tokens", min=2, max=cfg.context_length)
            _export(_Graph(model, step=False), (prompt_idx,), files[0], ["idx"], outputs, ({1: tokens},))
            # P >= 2: the convolution's window (2 positions) lies in the past, as for every token after the prompt
            past = torch.export.Dim("past", min=2, max=cfg.context_length - 1)
            _export(_Graph(model, step=True), (step_idx, *state), files[1], ["idx", *names],
                    outputs, (None, tuple({2: past} for _ in names)))
    except BaseException:
        for f in files:                                                 # nothing half-written stays behind
            f.unlink(missing_ok=True)
        raise
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 3                                   # errors only, not notes on unused initializers
    sessions = [ort.InferenceSession(str(f), opts, providers=["CPUExecutionProvider"]) for f in files]
    return OnnxDecoder(*sessions, names, cfg.vocab_size, cfg.context_length)


@contextlib.contextmanager
def _quiet():
    """The exporter's notes (warnings and log lines about its own passes) off for the duration of an export."""
    loggers = [logging.getLogger(name) for name in ("onnxscript", "onnx_ir", "torch.onnx", "torch.export")]
    levels = [lg.level for lg in loggers]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _export(graph: nn.Module, args: tuple, path: Path, inputs: list[str], outputs: list[str], dynamic) -> None:
    with _quiet():
        torch.onnx.export(graph.eval(), args, str(path), input_names=inputs, output_names=outputs,
                          dynamic_shapes=dynamic, dynamo=True, optimize=True, verbose=False,
                          external_data=False)                   # one file per graph, weights inside
