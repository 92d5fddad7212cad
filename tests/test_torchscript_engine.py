"""The decoding step traced with torch.jit.trace (sparse_tutorial.onnx_engine.trace_decoder)."""
import contextlib

import numpy as np
import pytest
import torch

from test_onnx_engine import pytorch_steps, tiny     # the same tiny models and eager reference as the ONNX tests

from sparse_tutorial import onnx_engine
from sparse_tutorial.layers import sparse_ff_kernel


@pytest.mark.parametrize("kinds, batch, prompt_len", [
    (dict(ff="dense"), 1, 5), (dict(ff="sparse"), 1, 5), (dict(ff="sparse", qkv="conv", qkv_modules=4), 1, 5),
    (dict(ff="sparse", qkv="conv", qkv_modules=4), 2, 9), (dict(ff="sparse"), 1, 2),
    (dict(ff="sparse", ff_scale_by_prob=True, qkv="multiplicative", qkv_modules=4), 1, 7)])
def test_the_traced_graphs_decode_token_by_token_as_eager_pytorch(kinds, batch, prompt_len):
    model = tiny(**kinds)
    decoder = onnx_engine.trace_decoder(model, batch=batch)
    prompt = torch.randint(0, 40, (batch, prompt_len))                   # not the traced example's 4 tokens
    tokens, logits = decoder.generate(prompt.numpy(), 14)
    ref_tokens, ref_logits = pytorch_steps(model, prompt, 14)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert len(logits) == len(ref_logits) == 14
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert np.abs(a - b).max() < 1e-4, f"step {step}"
    assert len(decoder.per_token) == 13 and min(decoder.per_token) > 0


def test_the_trace_leaves_decode_paths_and_threads_as_it_found_them():
    model = tiny(ff="sparse")
    model.blocks[1].ff.decode_path = "pytorch"
    decoder = onnx_engine.trace_decoder(model, threads=1)
    assert [b.ff.decode_path for b in model.blocks] == ["auto", "pytorch"]
    before = torch.get_num_threads()
    decoder.generate(np.zeros((1, 4), np.int64), 3)
    assert torch.get_num_threads() == before


@pytest.mark.skipif(not sparse_ff_kernel.available(), reason="the fused kernel needs Numba")
def test_a_trace_through_the_fused_kernel_would_freeze_its_output(monkeypatch):
    """Why the trace runs the PyTorch path: Numba's result is no traced operation, so a trace through the kernel
    keeps the example's output (and its shape) as a constant: it fails on another prompt, or decodes wrongly."""
    monkeypatch.setattr(onnx_engine, "_pytorch_paths", lambda model: contextlib.nullcontext())
    model = tiny(ff="sparse")
    decoder = onnx_engine.trace_decoder(model)
    prompt = torch.randint(0, 40, (1, 5))
    _, ref = pytorch_steps(model, prompt, 8)
    try:
        _, logits = decoder.generate(prompt.numpy(), 8)
    except RuntimeError as e:
        assert "invalid for input of size" in str(e)                     # the example's shape, frozen
        return
    assert max(np.abs(a - b).max() for a, b in zip(logits, ref)) > 1e-3


@pytest.mark.parametrize("kw, field", [(dict(qkv="lsh"), "qkv"), (dict(reversible=True), "reversible"),
                                       (dict(sru_dim=4), "sru_dim")])
def test_an_unsupported_model_is_refused_by_name(kw, field):
    with pytest.raises(ValueError, match=field):
        onnx_engine.trace_decoder(tiny(**kw))


@pytest.mark.parametrize("kw", [dict(batch=0), dict(batch=True), dict(threads=0), dict(threads=1.5)])
def test_bad_arguments_name_themselves(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        onnx_engine.trace_decoder(tiny(), **kw)


def test_a_prompt_too_long_for_the_context_or_too_short_for_the_step_is_refused():
    decoder = onnx_engine.trace_decoder(tiny())
    with pytest.raises(ValueError, match="context_length=32"):
        decoder.generate(np.zeros((1, 30), np.int64), 5)
    with pytest.raises(ValueError, match="time >= 2"):
        decoder.generate(np.zeros((1, 1), np.int64), 5)
