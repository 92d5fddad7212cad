"""The fused decoding step of the convolution QKV attention (layers/qkv_kernel.py) computes what the layer's
PyTorch step computes, writes the same cache, and the layer falls back to PyTorch wherever the step does not apply.

Every comparison is float32 within 1e-5.
"""
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_tutorial.bench.paths import use_path
from sparse_tutorial.layers import qkv_kernel, sparse_ff_kernel
from sparse_tutorial.layers.attention import LayerCache
from sparse_tutorial.layers.qkv import ConvQKVAttention
from sparse_tutorial.model import ModelConfig, TransformerLM

pytestmark = pytest.mark.skipif(not qkv_kernel.available(), reason="numba is not installed: the fused path is off")

TOL = dict(atol=1e-5, rtol=1e-5)


def make_layer(n_modules, d_module, length_kernel=3, seed=0):
    torch.manual_seed(seed)
    layer = ConvQKVAttention(n_modules * d_module, n_modules, length_kernel).eval()
    with torch.no_grad():                                  # biases that are not zero
        for p in (layer.mult.bias, layer.conv_q.conv.bias, layer.conv_k.conv.bias, layer.conv_v.conv.bias):
            p.normal_()
    return layer


def decode(layer, x, prompt, path):
    """The outputs of a prompt of ``prompt`` tokens (none: the first step starts the cache), then one token a
    call, on ``path``; with the cache."""
    layer.decode_path = "pytorch" if path == "pytorch" else "auto"     # a prompt is no single-token step
    cache, outs = LayerCache(), []
    if prompt:
        outs.append(layer(x[:, :prompt], cache))
    layer.decode_path = path
    for t in range(prompt, x.shape[1]):
        outs.append(layer(x[:, t:t + 1], cache))
        assert layer.last_decode_path == ("fused" if path == "fused" else "pytorch")
    return torch.cat(outs, 1), cache


def assert_same_cache(a: LayerCache, b: LayerCache):
    assert a.length == b.length
    torch.testing.assert_close(a.k, b.k, **TOL)
    torch.testing.assert_close(a.v, b.v, **TOL)
    n = a.length
    torch.testing.assert_close(a.state["conv_inputs"][:, :, :n], b.state["conv_inputs"][:, :, :n], **TOL)
    torch.testing.assert_close(a.state["conv_context"], b.state["conv_context"], **TOL)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_modules=st.integers(1, 9), d_module=st.integers(1, 13), length_kernel=st.integers(2, 4),
       batch=st.integers(1, 3), prompt=st.integers(0, 6), steps=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_the_fused_step_equals_the_pytorch_step_and_the_full_forward(n_modules, d_module, length_kernel, batch,
                                                                     prompt, steps, seed):
    layer = make_layer(n_modules, d_module, length_kernel, seed)
    x = torch.randn(batch, prompt + steps, layer.d_model)
    with torch.inference_mode():
        fused, fc = decode(layer, x, prompt, "fused")
        ref, rc = decode(layer, x, prompt, "pytorch")
        full = layer(x)
    torch.testing.assert_close(fused, ref, **TOL)
    torch.testing.assert_close(fused, full, **TOL)
    assert_same_cache(fc, rc)


def test_a_truncated_cache_decodes_again_as_pytorch():
    layer = make_layer(4, 6)
    x = torch.randn(2, 12, layer.d_model)
    with torch.no_grad():
        caches = {}
        for path in ("fused", "pytorch"):
            _, caches[path] = decode(layer, x, 5, path)
            caches[path].truncate(7)                        # roll back, then decode other tokens
            layer.decode_path = path
            y = torch.cat([layer(x[:, t:t + 1].flip(-1), caches[path]) for t in range(7, 12)], 1)
            caches[path + " out"] = y
    torch.testing.assert_close(caches["fused out"], caches["pytorch out"], **TOL)
    assert_same_cache(caches["fused"], caches["pytorch"])


def test_non_contiguous_input_and_a_cache_filled_by_the_other_path():
    layer = make_layer(3, 8)
    x = torch.randn(1, 10, 2 * layer.d_model)[..., ::2]                # strided last dimension
    assert not x.is_contiguous()
    with torch.no_grad():
        ref, _ = decode(layer, x, 4, "pytorch")
        layer.decode_path = "pytorch"
        cache = LayerCache()
        outs = [layer(x[:, :4], cache)]
        assert layer.last_decode_path == "pytorch"
        layer.decode_path = "fused"                                    # the PyTorch prompt's cache, fused steps
        outs += [layer(x[:, t:t + 1], cache) for t in range(4, 10)]
    torch.testing.assert_close(torch.cat(outs, 1), ref, **TOL)


@pytest.mark.parametrize("case, why", [
    ("prompt", "new tokens in one call"), ("grad", "autograd"), ("wide", "FUSED_MAX_D_MODEL"),
    ("kernel 1", "length_kernel=1"), ("float64", "float32"), ("dropout", "dropout")])
def test_where_the_step_does_not_apply_auto_takes_pytorch_and_fused_says_why(case, why):
    n_modules, d_module, lk = (32, 40, 3) if case == "wide" else (4, 6, 1 if case == "kernel 1" else 3)
    layer = make_layer(n_modules, d_module, lk)
    x = torch.randn(1, 3 if case == "prompt" else 1, layer.d_model)
    if case == "float64":
        layer, x = layer.double(), x.double()
    if case == "dropout":
        layer = ConvQKVAttention(layer.d_model, n_modules, dropout=0.1).train()
    grad = torch.enable_grad() if case == "grad" else torch.no_grad()
    with grad:
        layer.decode_path = "auto"
        layer(x, LayerCache())
        assert layer.last_decode_path == "pytorch"
        layer.decode_path = "fused"
        with pytest.raises(ValueError, match=why):
            layer(x, LayerCache())


def test_without_numba_the_layer_falls_back_with_the_same_result(monkeypatch):
    layer = make_layer(4, 6)
    x = torch.randn(1, 8, layer.d_model)
    with torch.no_grad():
        ref, _ = decode(layer, x, 3, "pytorch")
        monkeypatch.setattr(qkv_kernel.sparse_ff_kernel, "numba", None)
        assert "pip install numba" in qkv_kernel.unavailable_reason()
        layer.decode_path = "auto"
        cache = LayerCache()
        y = torch.cat([layer(x[:, :3], cache)] + [layer(x[:, t:t + 1], cache) for t in range(3, 8)], 1)
        assert layer.last_decode_path == "pytorch"
    torch.testing.assert_close(y, ref, **TOL)


def test_a_weight_changed_in_place_is_seen_by_the_next_step():
    layer = make_layer(4, 6)
    x = torch.randn(1, 6, layer.d_model)
    with torch.no_grad():
        decode(layer, x, 3, "fused")
        layer.mult.E.mul_(2.0)
        layer.conv_k.conv.weight.add_(0.5)
        fused, _ = decode(layer, x, 3, "fused")
        ref, _ = decode(layer, x, 3, "pytorch")
    torch.testing.assert_close(fused, ref, **TOL)


def test_the_bench_switches_both_kernels_and_a_model_decodes_the_same_on_both_paths():
    torch.manual_seed(0)
    model = TransformerLM(ModelConfig(vocab_size=30, context_length=32, d_model=48, n_heads=2, n_layers=2,
                                      d_ff=96, ff="sparse", ff_block_size=8, qkv="conv", qkv_modules=4)).eval()
    prompt = torch.randint(0, 30, (1, 6))
    out = {}
    for path in ("pytorch", "fused"):
        use_path(model, path)
        assert {b.attn.decode_path for b in model.blocks} == {"pytorch" if path == "pytorch" else "auto"}
        out[path] = model.generate(prompt, 12, greedy=True)
        assert {b.attn.last_decode_path for b in model.blocks} == {path}
    assert torch.equal(out["fused"], out["pytorch"])


def test_the_qkv_bench_times_every_path_at_every_width():
    from sparse_tutorial.bench import qkv_step
    from sparse_tutorial.layers.qkv import modules_near_sqrt

    df = qkv_step([32, 96], cache_len=8, repeats=2, warmup=1)
    assert list(df["d_model"]) == [32, 32, 96, 96]
    assert list(df["S"]) == [modules_near_sqrt(d) for d in (32, 32, 96, 96)]
    assert list(df["path"]) == list(df["step taken"]) == ["fused", "pytorch"] * 2
    assert (df["µs per step"] > 0).all()
    for d, part in df.groupby("d_model"):
        t = part.set_index("path")["µs per step"]
        assert part.set_index("path")["speed-up vs pytorch"]["fused"] == pytest.approx(t["pytorch"] / t["fused"])
    assert df["auto takes fused"].all()
    with pytest.raises(ValueError, match="path"):
        qkv_step([32], paths=["gpu"], repeats=1)


def test_a_kernel_that_fails_to_compile_leaves_the_cache_as_the_pytorch_step_wants_it(monkeypatch):
    layer = make_layer(4, 6)
    x = torch.randn(1, 7, layer.d_model)
    with torch.no_grad():
        ref, rc = decode(layer, x, 3, "pytorch")

        def fail(*args):
            raise qkv_kernel.KernelUnavailable("planted: no compiler")
        monkeypatch.setattr(qkv_kernel, "run", fail)
        layer.decode_path = "auto"
        cache = LayerCache()
        y = torch.cat([layer(x[:, :3], cache)] + [layer(x[:, t:t + 1], cache) for t in range(3, 7)], 1)
        assert layer.last_decode_path == "pytorch"
    torch.testing.assert_close(y, ref, **TOL)
    assert_same_cache(cache, rc)


@pytest.mark.skipif(sparse_ff_kernel.numba is None or sparse_ff_kernel.numba.config.NUMBA_NUM_THREADS < 2,
                    reason="the threaded compilation needs a Numba pool of two threads")
@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(n_modules=st.integers(1, 9), d_module=st.integers(1, 13), length_kernel=st.integers(2, 4),
       batch=st.integers(1, 3), position=st.integers(0, 9), seed=st.integers(0, 2**16))
def test_the_threaded_step_equals_the_one_thread_step(monkeypatch, n_modules, d_module, length_kernel, batch,
                                                      position, seed):
    monkeypatch.setattr(qkv_kernel, "PARALLEL_MIN_BYTES", 0)            # threads at every width
    calls = []
    threaded = qkv_kernel._kernel_parallel
    monkeypatch.setattr(qkv_kernel, "_kernel_parallel", lambda *a: calls.append(1) or threaded(*a))
    layer = make_layer(n_modules, d_module, length_kernel, seed)
    weights = layer._fused_weights()
    g = np.random.default_rng(seed)
    S, M, C = n_modules, d_module, layer.d_model
    x = g.standard_normal((batch, C), dtype=np.float32)
    buffers = [g.standard_normal(shape, dtype=np.float32)
               for shape in ((batch, M, 12, S), (batch, S, 12, M), (batch, S, 12, M))]
    one = [b.copy() for b in buffers]
    two = [b.copy() for b in buffers]
    y1 = qkv_kernel.run(x, weights, *one, position, threads=1)
    assert not calls
    y2 = qkv_kernel.run(x, weights, *two, position, threads=2)
    assert calls == [1]
    np.testing.assert_array_equal(y1, y2)                                  # the same sums, module by module
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


def wide_steps(layer, x, prompt):
    """The layer's lean step (step_function) with the wide step forced (FUSED_MAX_D_MODEL below its width): the
    prompt by the module, then one token a call; returns the outputs, the cache and the step."""
    layer.FUSED_MAX_D_MODEL = 0                             # this layer is "wide": BLAS products + the heads kernel
    layer.decode_path = "auto"
    cache = LayerCache()
    outs = [layer(x[:, :prompt], cache)]
    cache.reserve(x.shape[1], ("conv_inputs",))            # as the lean decoder does: the buffers are held
    step = layer.step_function(cache)
    assert step is not None and layer.last_decode_path == "wide"
    for t in range(prompt, x.shape[1]):
        outs.append(step(x[:, t], cache.length).unsqueeze(1))
    return torch.cat(outs, 1), cache, step


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(n_modules=st.integers(1, 9), d_module=st.integers(1, 13), length_kernel=st.integers(2, 4),
       batch=st.integers(1, 3), prompt=st.integers(1, 6), steps=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_the_wide_step_equals_the_pytorch_step(n_modules, d_module, length_kernel, batch, prompt, steps, seed):
    layer = make_layer(n_modules, d_module, length_kernel, seed)
    x = torch.randn(batch, prompt + steps, layer.d_model)
    with torch.inference_mode():
        wide, wc, _ = wide_steps(layer, x, prompt)
        ref, rc = decode(layer, x, prompt, "pytorch")
    torch.testing.assert_close(wide, ref, **TOL)
    assert_same_cache(wc, rc)


def test_the_wide_step_is_the_17b_layers_and_none_without_numba(monkeypatch):
    layer = make_layer(3, 4)
    with torch.inference_mode():
        cache = LayerCache()
        layer(torch.randn(1, 4, layer.d_model), cache)
        cache.reserve(8, ("conv_inputs",))
        layer.step_function(cache)
        assert layer.last_decode_path == "fused"           # narrow: the fused kernel's step
        layer.FUSED_MAX_D_MODEL = 8
        layer.step_function(cache)
        assert layer.last_decode_path == "wide"
        layer.decode_path = "pytorch"
        assert layer.step_function(cache) is None
        layer.decode_path = "auto"
        monkeypatch.setattr(qkv_kernel.sparse_ff_kernel, "numba", None)
        assert layer.step_function(cache) is None


def test_the_wide_step_decodes_again_after_the_cache_is_rolled_back():
    layer = make_layer(4, 6, length_kernel=4)
    x = torch.randn(2, 10, layer.d_model)
    with torch.inference_mode():
        _, wc, step = wide_steps(layer, x, 1)               # positions 0..9, then back to position 1
        _, rc = decode(layer, x, 1, "pytorch")
        ys = {}
        for name, cache in (("wide", wc), ("pytorch", rc)):
            cache.truncate(1)
            ys[name] = [step(x[:, t].flip(-1), cache.length) if name == "wide"
                        else layer(x[:, t:t + 1].flip(-1), cache)[:, 0] for t in range(1, 5)]
    torch.testing.assert_close(torch.stack(ys["wide"]), torch.stack(ys["pytorch"]), **TOL)
    assert_same_cache(wc, rc)
