"""The lean decoding step (sparse_tutorial.lean_decode.LeanDecoder) against the model's own cached forward."""
import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from test_onnx_engine import pytorch_steps, tiny     # the same tiny models and eager reference as the ONNX tests

from sparse_tutorial.bench.paths import sparse_ff_layers
from sparse_tutorial.layers import head_kernel, sparse_ff_kernel
from sparse_tutorial.layers.attention import LayerCache
from sparse_tutorial.lean_decode import LeanDecoder
from sparse_tutorial.measure.quantize import quantize_int8


KINDS = [dict(ff="dense"), dict(ff="sparse"), dict(ff="sparse", qkv="conv", qkv_modules=4),
         dict(ff="sparse", qkv="multiplicative", qkv_modules=4), dict(ff="moe"), dict(ff="pkm"),
         dict(ff="sparse", qkv="lsh"), dict(ff="sparse", ff_scale_by_prob=True, d_lowrank=4),
         dict(ff="sparse", loss_modules=4), dict(ff="sparse", sru_dim=4)]


@pytest.mark.parametrize("kinds", KINDS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
@pytest.mark.parametrize("batch, prompt_len", [(1, 5), (3, 1)])
def test_the_lean_step_decodes_as_the_models_own_forward(kinds, batch, prompt_len):
    model = tiny(**kinds)
    prompt = torch.randint(0, 40, (batch, prompt_len))
    tokens, logits = LeanDecoder(model).generate(prompt, 20)
    ref_tokens, ref = pytorch_steps(model, prompt, 20)                # the model's own cached forward, greedy
    np.testing.assert_array_equal(tokens.numpy(), ref_tokens)
    assert tokens.shape == (batch, prompt_len + 20) and len(logits) == len(ref) == 20
    for step, (a, b) in enumerate(zip(logits, ref)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0, err_msg=f"step {step}")
    greedy = model.generate(prompt, 20, greedy=True)
    torch.testing.assert_close(tokens, greedy, rtol=0, atol=0)


@settings(max_examples=15, deadline=None)
@given(d_model=st.sampled_from([16, 32, 48]), n_heads=st.sampled_from([1, 2, 4]), block=st.sampled_from([4, 8, 16]),
       qkv=st.sampled_from(["dense", "conv"]), batch=st.integers(1, 4), prompt_len=st.integers(1, 6),
       seed=st.integers(0, 2 ** 16))
def test_the_lean_step_agrees_for_random_shapes(d_model, n_heads, block, qkv, batch, prompt_len, seed):
    model = tiny(d_model=d_model, n_heads=n_heads, d_ff=4 * d_model, ff_block_size=block, ff="sparse", qkv=qkv,
                 qkv_modules=4 if qkv == "conv" else None)
    torch.manual_seed(seed)
    with torch.no_grad():                                       # weights that make every block's choice matter
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    prompt = torch.randint(0, 40, (batch, prompt_len))
    tokens, logits = LeanDecoder(model).generate(prompt, 10)
    for a, b in zip(logits, pytorch_steps(model, prompt, 10)[1]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


@pytest.mark.skipif(not sparse_ff_kernel.available(), reason="the fused kernels need Numba")
def test_the_sparse_layers_take_their_fused_kernels_unless_told_not_to():
    model = tiny(ff="sparse", qkv="conv", qkv_modules=4)
    prompt = torch.randint(0, 40, (1, 4))
    _, fused = LeanDecoder(model).generate(prompt, 6)
    assert {m.last_decode_path for m in model.modules() if hasattr(m, "last_decode_path")} == {"fused"}
    for m in model.modules():
        if hasattr(m, "decode_path"):
            m.decode_path = "pytorch"
    _, reference = LeanDecoder(model).generate(prompt, 6)
    assert {layer.last_decode_path for layer in sparse_ff_layers(model)} == {"pytorch"}
    for a, b in zip(fused, reference):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_int8_layers_are_run_as_modules_and_agree():
    model = quantize_int8(tiny(ff="dense"))
    prompt = torch.randint(0, 40, (1, 4))
    tokens, logits = LeanDecoder(model).generate(prompt, 8)
    for a, b in zip(logits, pytorch_steps(model, prompt, 8)[1]):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_the_cache_is_the_models_own_and_can_go_on_in_eager_pytorch():
    model = tiny(ff="sparse", qkv="conv", qkv_modules=4)
    prompt = torch.randint(0, 40, (2, 3))
    decoder = LeanDecoder(model)
    with torch.inference_mode():
        ref_cache = model.new_cache()
        model(prompt, cache=ref_cache)
        ref1, _ = model(torch.tensor([[1], [2]]), cache=ref_cache)
        decoder.prefill(prompt)
        buffers = [layer.buffers()[0] for layer in decoder.cache.layers]
        lean = decoder.step(torch.tensor([[1], [2]]))
        assert decoder.cache.length == 4
        assert all(layer.buffers()[0] is b for layer, b in zip(decoder.cache.layers, buffers))  # no reallocation
        for a, b in zip(decoder.cache.layers, ref_cache.layers):                # the state a reader looks at
            torch.testing.assert_close(a.state["conv_context"], b.state["conv_context"], atol=1e-6, rtol=0)
        eager, _ = model(torch.tensor([[3], [4]]), cache=decoder.cache)                       # one more, eagerly
        ref2, _ = model(torch.tensor([[3], [4]]), cache=ref_cache)
    torch.testing.assert_close(lean, ref1, atol=1e-5, rtol=0)
    torch.testing.assert_close(eager, ref2, atol=1e-5, rtol=0)


@pytest.mark.parametrize("head", ["pytorch", "compiled"])
@pytest.mark.parametrize("kinds", KINDS, ids=lambda k: ",".join(f"{a}={b}" for a, b in k.items()))
def test_the_numpy_stream_agrees_with_the_pytorch_stream(kinds, head, monkeypatch):
    if head == "pytorch":           # without the compiled final norm and head the NumPy stream calls PyTorch's own
        monkeypatch.setattr(head_kernel, "available", lambda: False)
    model = tiny(**kinds)
    with torch.no_grad():                                       # layer norms that differ from each other
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    prompt = torch.randint(0, 40, (2, 3))
    on_numpy, on_pytorch = LeanDecoder(model), LeanDecoder(model, stream="pytorch")
    tokens, logits = on_numpy.generate(prompt, 12)
    ref_tokens, ref = on_pytorch.generate(prompt, 12)
    # float32 on the CPU: the NumPy stream, except where a block has Terraformer's SRU branch
    assert on_numpy.stream == ("pytorch" if "sru_dim" in kinds else "numpy")
    assert on_pytorch.stream == "pytorch"
    # the NumPy embeddings and the compiled final norm and head wherever the stream is NumPy, the head the tied
    # nn.Linear and the kernel available
    compiled = head == "compiled" and on_numpy.stream == "numpy" and "loss_modules" not in kinds
    assert (on_numpy._numpy_glue is not None) == compiled
    torch.testing.assert_close(tokens, ref_tokens, rtol=0, atol=0)
    for a, b in zip(logits, ref):
        if head == "pytorch":                                   # the same layer norms, the same kernels
            np.testing.assert_array_equal(a, b)
        else:                                                   # float32 rounding apart, in the last call only
            np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)


def test_the_stream_is_chosen_by_name():
    with pytest.raises(ValueError, match=r"stream must be one of \('auto', 'numpy', 'pytorch'\), got stream='np'"):
        LeanDecoder(tiny(), stream="np")
    with pytest.raises(ValueError, match="stream='numpy' does not apply"):
        LeanDecoder(tiny(ff="sparse", sru_dim=4), stream="numpy").prefill(torch.zeros(1, 3, dtype=torch.long))
    decoder = LeanDecoder(tiny(), stream="numpy")
    assert decoder.stream is None
    decoder.prefill(torch.zeros(1, 3, dtype=torch.long))
    assert decoder.stream == "numpy"


def test_misuse_is_refused_with_what_to_do():
    model = tiny()
    decoder = LeanDecoder(model)
    with pytest.raises(ValueError, match="prefill"):
        decoder.step(torch.zeros(1, 1, dtype=torch.long))
    decoder.prefill(torch.zeros(1, 31, dtype=torch.long))
    with pytest.raises(ValueError, match=r"idx must be a \(batch=1, 1\)"):
        decoder.step(torch.zeros(2, 1, dtype=torch.long))
    decoder.step(torch.zeros(1, 1, dtype=torch.long))                   # the 32nd position: the last one
    with pytest.raises(ValueError, match="context_length=32"):
        decoder.step(torch.zeros(1, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="max_new_tokens"):
        decoder.generate(torch.zeros(1, 4, dtype=torch.long), -1)
    with pytest.raises(ValueError, match="context_length=32"):
        decoder.generate(torch.zeros(1, 30, dtype=torch.long), 5)


def test_unsupported_models_are_refused_by_name():
    with pytest.raises(ValueError, match="reversible"):
        LeanDecoder(tiny(reversible=True))
    with pytest.raises(ValueError, match="TransformerLM"):
        LeanDecoder(torch.nn.Linear(2, 2))
    block = tiny().blocks[0].train()
    with pytest.raises(ValueError, match="eval"):
        block.step_function(LayerCache(), 1)


def test_reserve_grows_the_buffers_once_and_keeps_the_positions():
    cache = LayerCache()
    k = torch.randn(1, 2, 3, 4)
    cache.append(k, k + 1)
    cache.reserve(10)
    kb, vb = cache.buffers()
    assert kb.shape[-2] == vb.shape[-2] == 10 and cache.length == 3
    torch.testing.assert_close(cache.k, k)
    torch.testing.assert_close(cache.v, k + 1)
    for _ in range(7):
        with torch.inference_mode():
            cache.append(torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4))
    assert cache.buffers()[0] is kb
    for bad in (2, 0, 2.5, True):
        with pytest.raises(ValueError, match="capacity"):
            LayerCache(k, k).reserve(bad)
    with pytest.raises(ValueError, match="run the prompt"):
        LayerCache().reserve(4)
