"""The fused sparse FF decoding kernel (layers/sparse_ff_kernel.py) computes what ``SparseFF.decode`` computes in
PyTorch, and the layer falls back to PyTorch, with the same result, wherever the kernel does not apply.

Every comparison is float32 within 1e-5. The kernel sums in another order than PyTorch, so on an exact tie of two
scores in a block (never seen with random weights) the two could pick different units; the tests check the
kernel's choice against PyTorch's scores first, so such a case would show as what it is.
"""
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_tutorial.layers import sparse_ff_kernel as kernel
from sparse_tutorial.layers.sparse_ff import DECODE_PATHS, SparseFF
from sparse_tutorial.model import ModelConfig, TransformerLM

pytestmark = pytest.mark.skipif(not kernel.available(), reason="numba is not installed: the fused path is off")

TOL = dict(atol=1e-5, rtol=1e-5)


def make_layer(d_model, n_blocks, block_size, d_lowrank, scale_by_prob=False, seed=0):
    torch.manual_seed(seed)
    layer = SparseFF(d_model, n_blocks * block_size, block_size, d_lowrank, scale_by_prob=scale_by_prob).eval()
    with torch.no_grad():                                   # a controller bias that is not zero, distinct scores
        layer.controller.c2.bias.normal_()
        layer.b2.normal_()
    return layer


def kernel_call(layer, x, **kw):
    c = layer.controller
    return kernel.fused_decode(x.reshape(-1, layer.d_model), c.c1.weight, c.c2.weight.t(), c.c2.bias, layer.w1,
                               layer.w2, layer.b2, layer.block_size, layer.scale_by_prob, **kw)


def assert_same_choice(layer, x, chosen):
    """The kernel's unit in every block is PyTorch's argmax, or ties with it within 1e-5 of PyTorch's scores."""
    logits = layer.block_logits(x.reshape(-1, layer.d_model))                     # (B, n_blocks, N)
    picked = logits.gather(-1, (chosen - layer.block_offset).unsqueeze(-1)).squeeze(-1)
    assert torch.all(picked >= logits.amax(-1) - 1e-5)
    assert torch.equal(chosen, layer.selected(x.reshape(-1, layer.d_model))), "a near-tie: see the docstring"


shapes = st.fixed_dictionaries({
    "d_model": st.integers(1, 70),
    "n_blocks": st.integers(1, 12),
    "block_size": st.integers(1, 16),
    "d_lowrank": st.integers(1, 20),
    "lead": st.sampled_from([(1,), (2,), (3,), (1, 1), (2, 3), (SparseFF.FUSED_MAX_ROWS,), ()]),
    "scale_by_prob": st.booleans(),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=shapes)
def test_fused_equals_pytorch_decode_and_eval_forward(s):
    layer = make_layer(s["d_model"], s["n_blocks"], s["block_size"], s["d_lowrank"], s["scale_by_prob"], s["seed"])
    x = torch.randn(*s["lead"], s["d_model"])
    with torch.no_grad():
        got = layer.decode(x)
        assert layer.last_decode_path == "fused"
        reference = layer.decode(x, path="pytorch")
        assert layer.last_decode_path == "pytorch"
        forward = layer(x)
        _, chosen = kernel_call(layer, x, return_chosen=True)
        assert_same_choice(layer, x, chosen)
    assert got.shape == reference.shape == x.shape
    torch.testing.assert_close(got, reference, **TOL)
    torch.testing.assert_close(got, forward, **TOL)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(s=shapes, chunks=st.integers(1, 7), threaded=st.booleans())
def test_any_split_of_the_blocks_gives_the_same_output(s, chunks, threaded, monkeypatch):
    """Blocks shared out into 1..7 ranges, more ranges than blocks included (empty ranges), on one thread or on
    the thread pool: the per-range partial outputs add up to the same output."""
    monkeypatch.setattr(kernel, "PARALLEL_MIN_BYTES", 0)       # tiny layers on the pool too (same for every input)
    layer = make_layer(s["d_model"], s["n_blocks"], s["block_size"], s["d_lowrank"], s["scale_by_prob"], s["seed"])
    x = torch.randn(*s["lead"], s["d_model"]).reshape(-1, s["d_model"])
    with torch.no_grad():
        reference = layer.decode(x, path="pytorch")
        got = kernel_call(layer, x, threads=2 if threaded else 1, chunks=chunks)
    torch.testing.assert_close(got, reference, **TOL)


@pytest.mark.parametrize("n_blocks", [1, 3, 5, 7])
def test_blocks_not_divisible_by_the_thread_count(n_blocks, monkeypatch):
    """The pool's own split (one range per thread) with a block count the threads do not divide."""
    monkeypatch.setattr(kernel, "PARALLEL_MIN_BYTES", 0)
    layer = make_layer(24, n_blocks, 8, 5, seed=n_blocks)
    x = torch.randn(3, 24)
    with torch.no_grad():
        reference = layer.decode(x, path="pytorch")
        for threads in (2, 3):
            torch.testing.assert_close(kernel_call(layer, x, threads=threads), reference, **TOL)


def test_blocks_split_by_the_layer_across_two_threads(monkeypatch):
    """Through ``decode`` at two torch threads (the pool, when the machine has two), d_ff = 7 blocks of 9."""
    monkeypatch.setattr(kernel, "PARALLEL_MIN_BYTES", 0)
    layer = make_layer(40, 7, 9, 6)
    x = torch.randn(1, 40)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        with torch.no_grad():
            got = layer.decode(x)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert layer.last_decode_path == "fused"
    torch.testing.assert_close(got, layer.decode(x, path="pytorch").detach(), **TOL)


@pytest.mark.parametrize("make_x", [
    lambda d: torch.randn(d, 4).t(),                     # a transposed (4, d)
    lambda d: torch.randn(3, 2 * d)[:, ::2],             # every other column
    lambda d: torch.randn(2, 5, d)[:, 1:3],              # a slice in the middle dimension, (2, 2, d)
    lambda d: torch.randn(d).expand(2, d),               # stride 0
])
def test_non_contiguous_input(make_x):
    layer = make_layer(33, 6, 8, 7)
    x = make_x(33)
    assert not x.is_contiguous()
    with torch.no_grad():
        got = layer.decode(x)
        assert layer.last_decode_path == "fused"
        torch.testing.assert_close(got, layer.decode(x.contiguous(), path="pytorch"), **TOL)
        torch.testing.assert_close(got, layer(x), **TOL)


def test_batch_one_and_small_batches_at_a_realistic_width():
    layer = make_layer(256, 16, 64, 16)
    with torch.no_grad():
        for batch in (1, 2, 5, SparseFF.FUSED_MAX_ROWS):
            x = torch.randn(batch, 1, 256)
            got = layer.decode(x)
            assert layer.last_decode_path == "fused"
            torch.testing.assert_close(got, layer.decode(x, path="pytorch"), **TOL)


# -- which path runs -----------------------------------------------------------------------------------------


def check_fallback(layer, x, why):
    """``auto`` takes PyTorch with the reference's result; ``fused`` refuses with the reason."""
    assert why in layer.fused_unavailable(x)
    got = layer.decode(x)
    assert layer.last_decode_path == "pytorch"
    torch.testing.assert_close(got, layer.decode(x, path="pytorch"), **TOL)
    with pytest.raises(ValueError, match="path='fused' does not apply"):
        layer.decode(x, path="fused")


def test_without_numba_the_pytorch_path_runs(monkeypatch):
    layer = make_layer(16, 4, 4, 3)
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = layer.decode(x)
        assert layer.last_decode_path == "fused"
        monkeypatch.setattr(kernel, "numba", None)
        assert not kernel.available()
        check_fallback(layer, x, "numba is not installed")
        torch.testing.assert_close(layer.decode(x), expected, **TOL)


def test_float64_falls_back():
    layer = make_layer(16, 4, 4, 3).double()
    with torch.no_grad():
        check_fallback(layer, torch.randn(2, 16, dtype=torch.float64), "float32")


@pytest.mark.parametrize("controller", ["full", "mlp"])
def test_other_controllers_fall_back(controller):
    layer = SparseFF(16, 32, 4, 3, controller=controller).eval()
    with torch.no_grad():
        check_fallback(layer, torch.randn(1, 16), "low-rank controller")


def test_int8_layers_fall_back():
    from sparse_tutorial.measure.quantize import quantize_int8

    cfg = ModelConfig(vocab_size=11, context_length=8, d_model=32, n_heads=2, n_layers=1, d_ff=64, ff="sparse",
                      ff_block_size=8)
    q = quantize_int8(TransformerLM(cfg).eval())
    layer = q.blocks[0].ff
    with torch.no_grad():
        check_fallback(layer, torch.randn(1, 32), "low-rank controller")


def test_more_tokens_than_the_kernel_takes_fall_back():
    layer = make_layer(16, 4, 4, 3)
    with torch.no_grad():
        check_fallback(layer, torch.randn(SparseFF.FUSED_MAX_ROWS + 1, 16), "FUSED_MAX_ROWS")


def test_autograd_falls_back_and_keeps_its_gradient():
    layer = make_layer(16, 4, 4, 3)
    x = torch.randn(1, 16)
    assert "autograd" in layer.fused_unavailable(x)
    layer.decode(x).sum().backward()                   # the PyTorch path records the graph
    assert layer.last_decode_path == "pytorch" and layer.w1.grad is not None
    with torch.inference_mode():
        layer.decode(x)
    assert layer.last_decode_path == "fused"


def test_decode_path_pytorch_is_always_pytorch_and_bad_paths_are_refused():
    layer = make_layer(16, 4, 4, 3)
    x = torch.randn(1, 16)
    layer.decode_path = "pytorch"
    with torch.no_grad():
        layer.decode(x)
    assert layer.last_decode_path == "pytorch"
    assert "decode_path='pytorch'" in repr(layer)
    assert DECODE_PATHS == ("auto", "pytorch", "fused")
    with pytest.raises(ValueError, match="decode_path must be one of .* got decode_path='gpu'"):
        layer.decode_path = "gpu"
    with pytest.raises(ValueError, match="decode_path must be one of .* got decode_path='numba'"):
        SparseFF(16, 32, 4, decode_path="numba")
    with pytest.raises(ValueError, match="path must be one of .* got path='c'"):
        layer.decode(x, path="c")


def test_cached_generation_takes_the_fused_path_by_default():
    cfg = ModelConfig(vocab_size=29, context_length=24, d_model=32, n_heads=4, n_layers=2, d_ff=128, ff="sparse",
                      ff_block_size=8)
    torch.manual_seed(1)
    model = TransformerLM(cfg).eval()
    ffs = [b.ff for b in model.blocks]
    prompt = torch.randint(0, 29, (2, 5))
    steps = []
    original = SparseFF._fused_decode
    try:
        SparseFF._fused_decode = lambda self, x, w: steps.append(x.shape) or original(self, x, w)
        fused = model.generate(prompt, 8, greedy=True)
    finally:
        SparseFF._fused_decode = original
    assert all(ff.last_decode_path == "fused" for ff in ffs)
    assert len(steps) >= 2 * 7                          # every layer, every single-token step
    for ff in ffs:
        ff.decode_path = "pytorch"
    reference = model.generate(prompt, 8, greedy=True)
    assert all(ff.last_decode_path == "pytorch" for ff in ffs)
    assert torch.equal(fused, reference)


def test_a_threaded_call_leaves_torchs_thread_count_alone():
    """Numba's OpenMP pool, on its first threaded call, sets the process's OpenMP thread count, which is also
    PyTorch's. In a fresh process (the pool starts once per process): torch at 3 threads stays at 3."""
    code = (
        "import torch\n"
        "from sparse_tutorial.layers import sparse_ff_kernel as k\n"
        "from sparse_tutorial.layers.sparse_ff import SparseFF\n"
        "k.PARALLEL_MIN_BYTES = 0\n"
        "layer = SparseFF(16, 32, 4).eval()\n"
        "torch.set_num_threads(3)\n"
        "with torch.no_grad():\n"
        "    layer.decode(torch.randn(1, 16))\n"
        "assert layer.last_decode_path == 'fused'\n"
        "print(torch.get_num_threads())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split()[-1] == "3"


def test_the_kernel_sees_replaced_and_converted_weights():
    """The layer keeps the kernel's views of its weights between calls; they follow the weights when these are
    changed in place, replaced, or converted."""
    layer = make_layer(16, 4, 4, 3)
    x = torch.randn(1, 16)
    with torch.no_grad():
        layer.decode(x)
        layer.w2.mul_(2)                                            # in place: the same memory
        torch.testing.assert_close(layer.decode(x), layer.decode(x, path="pytorch"), **TOL)
        layer.w1 = torch.nn.Parameter(torch.randn_like(layer.w1))   # replaced: new memory
        layer.controller.c2.weight.data = torch.randn(layer.controller.c2.weight.shape)   # row-major
        got = layer.decode(x)
        assert layer.last_decode_path == "fused"
        torch.testing.assert_close(got, layer.decode(x, path="pytorch"), **TOL)
        layer.controller.c2.weight.mul_(-1)                         # in place, now a row-major C2: the kernel's
        torch.testing.assert_close(layer.decode(x), layer.decode(x, path="pytorch"), **TOL)  # copy is made again
        layer.double()                                              # converted: the kernel no longer applies
        check_fallback(layer, x.double(), "float32")


def test_a_layer_built_under_inference_mode_takes_the_fused_path():
    """Weights made under inference mode keep no version counter: the layer still decodes by the kernel."""
    with torch.inference_mode():
        layer = make_layer(16, 4, 4, 3)
        x = torch.randn(2, 16)
        got = layer.decode(x)
        assert layer.last_decode_path == "fused"
        torch.testing.assert_close(got, layer.decode(x, path="pytorch"), **TOL)


def test_a_kernel_that_fails_to_compile_falls_back_and_says_why(monkeypatch):
    """A machine whose compiler fails on the kernel: the layer decodes by PyTorch, and says why."""
    import numba

    def broken(*args):
        raise numba.core.errors.TypingError("planted compile failure")

    monkeypatch.setattr(kernel, "_COMPILE_ERROR", [])              # this process's record, restored after
    monkeypatch.setattr(kernel, "_kernel_serial", broken)
    layer = make_layer(16, 4, 4, 3)
    x = torch.randn(1, 16)
    with torch.no_grad():
        got = layer.decode(x)
        assert layer.last_decode_path == "pytorch"
        torch.testing.assert_close(got, layer.decode(x, path="pytorch"), **TOL)
        assert not kernel.available() and "did not compile" in kernel.unavailable_reason()
        check_fallback(layer, x, "did not compile here (TypingError")
