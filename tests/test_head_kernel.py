"""The lean step's last call (layers/head_kernel.py): the final layer norm and the tied head's product, as
F.linear(F.layer_norm(x)) within float32 rounding, taken by the lean decoder where it applies and not elsewhere."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from test_onnx_engine import tiny

from sparse_tutorial.layers import head_kernel
from sparse_tutorial.lean_decode import LeanDecoder

needs_numba = pytest.mark.skipif(not head_kernel.available(), reason="the kernel needs Numba")


def _norm(C: int, g: torch.Generator, eps: float) -> torch.nn.LayerNorm:
    ln = torch.nn.LayerNorm(C, eps=eps)
    with torch.no_grad():
        ln.weight.copy_(torch.randn(C, generator=g))
        ln.bias.copy_(torch.randn(C, generator=g))
    return ln


@needs_numba
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 6), C=st.integers(1, 300), vocab=st.integers(1, 80), shift=st.floats(-4, 4),
       scale=st.floats(0.1, 10), eps=st.floats(1e-6, 0.5), seed=st.integers(0, 2 ** 16))
def test_the_kernel_is_the_final_norm_and_the_head_within_float32_rounding(rows, C, vocab, shift, scale, eps, seed):
    g = torch.Generator().manual_seed(seed)
    ln, head = _norm(C, g, eps), torch.randn(vocab, C, generator=g)
    x = torch.randn(rows, C, generator=g) * scale + shift
    with torch.no_grad():
        ref = F.linear(F.layer_norm(x, (C,), ln.weight, ln.bias, eps), head).numpy()
        # the same in float64: the kernel's error against it is float32 rounding, as PyTorch's is
        exact = F.linear(F.layer_norm(x.double(), (C,), ln.weight.double(), ln.bias.double(), eps),
                         head.double()).numpy()
    xs = x.numpy().copy()
    out = head_kernel.bind(ln, head, rows)(xs)
    assert out.shape == (rows, vocab) and out.dtype == np.float32
    np.testing.assert_array_equal(xs, x.numpy())                  # the stream is read, not written
    # float32 rounding, bounded: each normalised number h = (x - mean) rstd w + b errs by a few units of
    # roundoff U of |x - mean| rstd, of |mean| rstd (the mean rounded to float32), of 1 (rstd rounded), times
    # |w|, and of |b|; a dot product of C terms adds (C + 2) U of sum |head| |h|. Generous constants, the
    # same bound for PyTorch's own result.
    U = 2.0 ** -24
    xd = x.double().numpy()
    mean = xd.mean(1, keepdims=True)
    rstd = 1 / np.sqrt(xd.var(1, keepdims=True) + eps)
    w, b = ln.weight.detach().double().numpy(), ln.bias.detach().double().numpy()
    h = (xd - mean) * rstd * w + b
    err_h = 8 * U * ((np.abs(xd - mean) + np.abs(mean)) * rstd + 1) * np.abs(w) + 4 * U * np.abs(b)
    H = np.abs(head.double().numpy())
    bound = (err_h + (C + 2) * U * np.abs(h)) @ H.T + 1e-30
    assert np.all(np.abs(out - exact) <= bound)
    assert np.all(np.abs(ref - exact) <= bound)                   # the bound holds PyTorch's own result too


@needs_numba
def test_bad_input_gets_a_clear_error_and_the_kernel_reads_only_its_rows():
    g = torch.Generator().manual_seed(0)
    ln, head = _norm(8, g, 1e-5), torch.randn(5, 8, generator=g)
    f = head_kernel.bind(ln, head, 2)
    with pytest.raises(ValueError, match=r"x must be a float32 array of shape \(2, 8\), got float32 \(3, 8\)"):
        f(np.zeros((3, 8), dtype=np.float32))
    with pytest.raises(ValueError, match=r"x must be a float32 array of shape \(2, 8\), got float64 \(2, 8\)"):
        f(np.zeros((2, 8)))
    with pytest.raises(ValueError, match=r"head_weight must be a \(V, 8\) matrix, got shape \(5, 7\)"):
        head_kernel.bind(ln, torch.randn(5, 7), 2)
    with pytest.raises(ValueError, match="compiled for float32 on the CPU, got head_weight of torch.float64"):
        head_kernel.bind(ln, head.double(), 2)
    with pytest.raises(ValueError, match="rows must be a positive integer, got rows=0"):
        head_kernel.bind(ln, head, 0)
    with pytest.raises(ValueError, match="ln must be an nn.LayerNorm over the last axis with a weight and a bias"):
        head_kernel.bind(torch.nn.LayerNorm(8, elementwise_affine=False), head, 2)


def test_without_the_kernel_the_lean_step_keeps_pytorchs_head(monkeypatch):
    monkeypatch.setattr(head_kernel, "available", lambda: False)
    with pytest.raises(head_kernel.KernelUnavailable):
        head_kernel.bind(torch.nn.LayerNorm(4), torch.randn(3, 4), 1)
    decoder = LeanDecoder(tiny())
    decoder.prefill(torch.zeros(1, 3, dtype=torch.long))
    assert decoder.stream == "numpy" and decoder._numpy_glue is None


@needs_numba
@pytest.mark.parametrize("kinds, taken", [(dict(), True), (dict(ff="sparse", loss_modules=4), False)])
def test_the_lean_decoder_takes_the_kernel_for_a_tied_linear_head_only(kinds, taken):
    decoder = LeanDecoder(tiny(**kinds))
    decoder.prefill(torch.zeros(2, 3, dtype=torch.long))
    assert (decoder._numpy_glue is not None) == taken
    assert LeanDecoder(tiny(**kinds), stream="pytorch")._numpy_glue is None
