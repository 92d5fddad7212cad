"""The dense layers' matrix-vector kernel (layers/matvec_kernel.py): the product F.linear computes, within the
rounding of a float32 sum, taken by the dense kinds' lean steps where it applies and never where it does not."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from test_onnx_engine import pytorch_steps

from sparse_tutorial.layers import matvec_kernel
from sparse_tutorial.layers.attention import CausalSelfAttention, LayerCache
from sparse_tutorial.layers.dense import DenseFF
from sparse_tutorial.lean_decode import LeanDecoder
from sparse_tutorial.model import TransformerLM, seed_config

needs_numba = pytest.mark.skipif(not matvec_kernel.available(), reason="the kernel needs Numba")
TOL = dict(atol=1e-5, rtol=1e-5)
U = 2.0 ** -24                                         # float32's unit roundoff


@needs_numba
@settings(max_examples=60, deadline=None)
@given(rows=st.integers(1, 70), d=st.integers(1, 300), batch=st.integers(1, matvec_kernel.MAX_ROWS),
       relu=st.booleans(), bias=st.booleans(), strided=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_the_kernel_is_the_product_within_a_float32_sums_rounding(rows, d, batch, relu, bias, strided, seed):
    g = torch.Generator().manual_seed(seed)
    w, b = torch.randn(rows, d, generator=g), torch.randn(rows, generator=g) if bias else None
    x = torch.randn(batch, 2 * d, generator=g)[:, ::2] if strided else torch.randn(batch, d, generator=g)
    assert x.is_contiguous() or strided
    with torch.no_grad():
        y = matvec_kernel.bind(w, b, relu=relu)(x)                                # (batch, rows)
    exact = x.double() @ w.double().t() + (b.double() if bias else 0)
    # the classical bound of a float32 dot product of d terms (any order of the additions), plus the bias's
    # addition and the rounding of the result
    bound = (d + 2) * U / (1 - (d + 2) * U) * ((x.double().abs() @ w.double().abs().t())
                                              + (b.double().abs() if bias else 0)) + 1e-30
    ref = exact.clamp_min(0) if relu else exact
    assert y.shape == (batch, rows) and y.dtype == torch.float32
    assert ((y.double() - ref).abs() <= bound).all()
    torch.testing.assert_close(y, F.relu(F.linear(x, w, b)) if relu else F.linear(x, w, b), **TOL)


def wide_ff(d=256, d_ff=1024):
    """A dense FF whose weights are above MIN_BYTES (so "auto" takes the kernel), biases not zero."""
    torch.manual_seed(0)
    ff = DenseFF(d, d_ff).eval()
    assert ff.w1.weight.numel() * 4 >= matvec_kernel.MIN_BYTES
    with torch.no_grad():
        ff.w1.bias.normal_()
        ff.w2.bias.normal_()
    return ff


def count_kernel_calls(monkeypatch) -> list:
    """Every call of the compiled kernel from here on, recorded (the products :func:`bind` gives make them)."""
    calls, call = [], matvec_kernel.sparse_ff_kernel._call

    def spy(n, name, args, kernels=None):
        calls.append(name)
        return call(n, name, args, kernels)
    monkeypatch.setattr(matvec_kernel.sparse_ff_kernel, "_call", spy)
    return calls


@needs_numba
@pytest.mark.parametrize("batch", [1, 3, matvec_kernel.MAX_ROWS])
def test_the_dense_ff_step_takes_the_kernel_and_equals_the_forward(batch, monkeypatch):
    ff, x = wide_ff(), torch.randn(batch, 256)
    calls = count_kernel_calls(monkeypatch)
    with torch.inference_mode():
        step = ff.step_function(batch)
        bound = len(calls)                                          # each product compiled once at binding
        fused = step(x)
        assert ff.last_decode_path == "fused" and calls[bound:] == ["_matvec", "_matvec"]
        ff.decode_path = "pytorch"
        reference = ff.step_function(batch)(x)
        assert ff.last_decode_path == "pytorch"
        torch.testing.assert_close(fused, ff(x), **TOL)
        torch.testing.assert_close(fused, reference, **TOL)


@needs_numba
def test_auto_leaves_small_weights_many_rows_and_autograd_to_f_linear():
    ff = wide_ff()
    with torch.inference_mode():
        ff.step_function(matvec_kernel.MAX_ROWS + 1)                # a prompt: BLAS's matrix product
    assert ff.last_decode_path == "pytorch"
    small = DenseFF(32, 128).eval()                                 # 16 KB: stays in the caches
    long_rows = DenseFF(32, matvec_kernel.MAX_ROW + 32).eval()      # W2's rows: longer than MAX_ROW
    with torch.inference_mode():
        assert "MAX_ROW" in matvec_kernel.applies(1, long_rows.w1.weight, long_rows.w2.weight)
        small.step_function(1)
        long_rows.step_function(1)
    assert small.last_decode_path == long_rows.last_decode_path == "pytorch"
    ff.step_function(1)                                             # autograd recording: no kernel
    assert ff.last_decode_path == "pytorch"
    ff.decode_path = "fused"
    with pytest.raises(ValueError, match="decode_path='fused' does not apply.*autograd"):
        ff.step_function(1)
    small.decode_path = "fused"                                     # asked for: any size
    with torch.inference_mode():
        x = torch.randn(2, 32)
        torch.testing.assert_close(small.step_function(2)(x), small(x), **TOL)
    assert small.last_decode_path == "fused"


def test_without_numba_the_steps_fall_back_to_f_linear(monkeypatch):
    ff, x = wide_ff(), torch.randn(2, 256)
    with torch.inference_mode():
        expected = ff(x)
    monkeypatch.setattr(matvec_kernel.sparse_ff_kernel, "numba", None)
    assert matvec_kernel.applies(1, ff.w1.weight) == "numba is not installed (pip install numba)"
    with torch.inference_mode():
        y = ff.step_function(2)(x)
    assert ff.last_decode_path == "pytorch"
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    ff.decode_path = "fused"
    with pytest.raises(ValueError, match="numba is not installed"):
        ff.step_function(2)


@needs_numba
def test_the_attention_step_takes_the_kernel_and_equals_the_module(monkeypatch):
    calls = count_kernel_calls(monkeypatch)
    torch.manual_seed(0)
    attn = CausalSelfAttention(384, 6).eval()                       # the seed model's: 1.7 MB and 0.6 MB
    x = torch.randn(2, 7, 384)
    with torch.inference_mode():
        ref_cache, step_cache = LayerCache(), LayerCache()
        ref = [attn(x[:, :4], ref_cache)[:, -1]]
        attn(x[:, :4], step_cache)
        step_cache.reserve(8)
        step = attn.step_function(step_cache)
        assert attn.last_decode_path == "fused"
        out = []
        for t in range(4, 7):
            ref.append(attn(x[:, t:t + 1], ref_cache)[:, 0])
            bound = len(calls)
            out.append(step(x[:, t], t))
            assert calls[bound:] == ["_matvec", "_matvec"]          # the two projections, by the kernel
    for a, b in zip(out, ref[1:]):
        torch.testing.assert_close(a, b, **TOL)
    torch.testing.assert_close(step_cache.k[:, :, :7], ref_cache.k, **TOL)


@needs_numba
@settings(max_examples=25, deadline=None)
@given(heads=st.integers(1, 6), hd=st.integers(1, 40), batch=st.integers(1, 3), prompt=st.integers(1, 9),
       seed=st.integers(0, 2 ** 16))
def test_the_numpy_attention_step_writes_the_cache_and_attends_as_the_module(heads, hd, batch, prompt, seed):
    with pytest.MonkeyPatch.context() as monkeypatch:               # one per example (hypothesis)
        attention_steps_as_the_module(heads, hd, batch, prompt, seed, count_kernel_calls(monkeypatch))


def attention_steps_as_the_module(heads, hd, batch, prompt, seed, calls):
    torch.manual_seed(seed)
    C, new = heads * hd, 4
    attn = CausalSelfAttention(C, heads).eval()
    attn.decode_path = "fused"                                      # any size: the kernel, as the wide layers
    x = torch.randn(batch, prompt + new, C)
    with torch.inference_mode():
        ref_cache, step_cache = LayerCache(), LayerCache()
        attn(x[:, :prompt], ref_cache)
        attn(x[:, :prompt], step_cache)
        step_cache.reserve(prompt + new)
        numpy_step = attn.step_function(step_cache).numpy
        for t in range(prompt, prompt + new):
            ref = attn(x[:, t:t + 1], ref_cache)[:, 0]                 # (B, C): SDPA over the cache
            bound = len(calls)
            y = numpy_step(x[:, t].contiguous().numpy(), t)            # (B, C)
            assert calls[bound:] == ["_matvec", "_cached_heads", "_matvec"]
            assert step_cache.length == t + 1
            torch.testing.assert_close(torch.from_numpy(y), ref, **TOL)
    torch.testing.assert_close(step_cache.k[:, :, :prompt + new], ref_cache.k, **TOL)
    torch.testing.assert_close(step_cache.v[:, :, :prompt + new], ref_cache.v, **TOL)


@needs_numba
@settings(max_examples=10, deadline=None)
@given(heads=st.integers(1, 6), hd=st.integers(1, 40), batch=st.integers(1, 3), prompt=st.integers(1, 9),
       seed=st.integers(0, 2 ** 16))
def test_the_heads_shared_out_between_two_threads_attend_as_the_module(heads, hd, batch, prompt, seed):
    if matvec_kernel.sparse_ff_kernel.kernel_threads(1, 2, min_bytes=0) < 2:
        pytest.skip("one thread here: Numba's pool has no second thread")
    threads, old = [], torch.get_num_threads()
    with pytest.MonkeyPatch.context() as monkeypatch:
        monkeypatch.setattr(matvec_kernel, "HEADS_PARALLEL_MIN_BYTES", 0)     # every call on both threads
        calls, call = count_kernel_calls(monkeypatch), matvec_kernel.sparse_ff_kernel._call

        def spy(n, name, args, kernels=None):
            if name == "_cached_heads":
                threads.append(n)
            return call(n, name, args, kernels)
        monkeypatch.setattr(matvec_kernel.sparse_ff_kernel, "_call", spy)
        torch.set_num_threads(2)
        try:
            attention_steps_as_the_module(heads, hd, batch, prompt, seed, calls)
        finally:
            torch.set_num_threads(old)
    assert threads[-4:] == [2] * 4                                 # the four steps (binding compiles both)


def test_the_attention_step_has_no_numpy_kernel_without_numba_or_on_the_pytorch_path(monkeypatch):
    attn = CausalSelfAttention(384, 6).eval()
    with torch.inference_mode():
        cache = LayerCache()
        attn(torch.randn(1, 3, 384), cache)
        cache.reserve(8)
        attn.decode_path = "pytorch"
        assert attn.step_function(cache).numpy is None
        monkeypatch.setattr(matvec_kernel.sparse_ff_kernel, "numba", None)
        attn.decode_path = "auto"
        assert attn.step_function(cache).numpy is None
        with pytest.raises(matvec_kernel.sparse_ff_kernel.KernelUnavailable, match="numba is not installed"):
            matvec_kernel.bind_heads(*cache.buffers())


@needs_numba
def test_bind_heads_refuses_buffers_it_cannot_write_in_place():
    k = torch.zeros(1, 2, 8, 4)
    with pytest.raises(ValueError, match="k_buf and v_buf must be C-contiguous float32"):
        matvec_kernel.bind_heads(k, torch.zeros(1, 2, 8, 4).transpose(2, 3).contiguous().transpose(2, 3))
    with pytest.raises(ValueError, match="got \\(1, 2, 8, 4\\) torch.float32 and \\(1, 2, 8, 4\\) torch.float64"):
        matvec_kernel.bind_heads(k, k.double())


@needs_numba
def test_the_seed_size_dense_model_decodes_through_the_kernel_as_its_own_forward():
    torch.manual_seed(0)
    model = TransformerLM(seed_config(ff="dense", vocab_size=65)).eval()
    prompt = torch.randint(0, 65, (1, 5))
    tokens, logits = LeanDecoder(model).generate(prompt, 6)
    kinds = [m for m in model.modules() if isinstance(m, (DenseFF, CausalSelfAttention))]
    assert {m.last_decode_path for m in kinds} == {"fused"}
    ref_tokens, ref = pytorch_steps(model, prompt, 6)
    np.testing.assert_array_equal(tokens.numpy(), ref_tokens)
    for a, b in zip(logits, ref):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
