"""The fused training kernels of ``SparseFF`` (``sparse_ff_kernel.mask_forward``, ``sample``, ``mask_backward``):
the same values, gradients and random draws as the PyTorch path (``SparseFF.mask`` and the ReLU), and a clean
fallback where they do not apply."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sparse_tutorial.layers import sparse_ff_kernel as kernel
from sparse_tutorial.layers.sparse_ff import SparseFF
from sparse_tutorial.model import ModelConfig, TransformerLM

pytestmark = pytest.mark.skipif(not kernel.available(), reason="numba is not installed: the fused path is off")

TOL = dict(atol=1e-5, rtol=1e-5)


def twins(d_model, n_blocks, block_size, seed=0, **kw):
    """A training-mode layer on the fused path and an equal copy on the PyTorch path."""
    torch.manual_seed(seed)
    fused = SparseFF(d_model, n_blocks * block_size, block_size, **kw).train()
    with torch.no_grad():                                   # scores that are not all alike
        fused.controller.c2.bias.normal_()
    reference = copy.deepcopy(fused)
    fused.train_path, reference.train_path = "fused", "pytorch"
    return fused, reference


def step(layer, x, grad, seed):
    """One training call and its backward from the random state ``seed``: output, grads, the next random number."""
    x = x.detach().clone().requires_grad_()
    layer.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    y = layer(x)
    y.backward(grad)
    after = torch.rand(())                                  # the paths must draw the same numbers
    return y.detach(), x.grad, {n: p.grad for n, p in layer.named_parameters()}, after


def assert_same_step(fused, reference, x, seed=0):
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed + 1))
    y1, gx1, gp1, r1 = step(fused, x, grad, seed)
    y2, gx2, gp2, r2 = step(reference, x, grad, seed)
    assert fused.last_train_path == "fused" and reference.last_train_path == "pytorch"
    assert fused.last_mask_hard == reference.last_mask_hard
    torch.testing.assert_close(y1, y2, **TOL)
    torch.testing.assert_close(gx1, gx2, **TOL)
    for name in gp2:
        torch.testing.assert_close(gp1[name], gp2[name], **TOL, msg=f"gradient of {name}")
    assert r1 == r2


shapes = st.fixed_dictionaries({
    "d_model": st.integers(1, 40),
    "n_blocks": st.integers(1, 10),
    "block_size": st.integers(1, 16),
    "lead": st.sampled_from([(1,), (3,), (2, 5), (4, 33)]),
    "hard_prob": st.sampled_from([0.0, 1.0, 0.5]),
    # 0: the argmax; 0.3: a power the kernel's sampler does not compile (SparseFF._sample draws)
    "noise_scale": st.sampled_from([0.0, 0.3]),
    "scale_by_prob": st.booleans(),
    "seed": st.integers(0, 2**16),
})


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(s=shapes)
def test_fused_training_call_equals_the_pytorch_path(s):
    fused, reference = twins(s["d_model"], s["n_blocks"], s["block_size"], s["seed"], hard_prob=s["hard_prob"],
                             noise_scale=s["noise_scale"], scale_by_prob=s["scale_by_prob"])
    x = torch.randn(*s["lead"], s["d_model"], generator=torch.Generator().manual_seed(s["seed"]))
    assert_same_step(fused, reference, x, s["seed"])


@pytest.mark.parametrize("block_size", [2, 8])
@pytest.mark.parametrize("scale_by_prob", [False, True])
@pytest.mark.parametrize("noise_scale", [0.1, 0.25])
def test_the_kernels_sampler_gives_the_pytorch_paths_step(noise_scale, scale_by_prob, block_size):
    """1 / noise_scale whole (10, 4): the kernel's own sampler draws, from the same uniform numbers (blocks of
    2: the dense products with the fused hard mask; of 8: the chosen units' kernel)."""
    assert kernel.sample_power(noise_scale) is not None
    fused, reference = twins(24, 6, block_size, hard_prob=1.0, noise_scale=noise_scale,
                             scale_by_prob=scale_by_prob)
    assert_same_step(fused, reference, torch.randn(3, 5, 24), seed=3)


@pytest.mark.parametrize("block_size", [1, 2, SparseFF.HARD_KERNEL_MIN_BLOCK - 1, SparseFF.HARD_KERNEL_MIN_BLOCK,
                                        32])
def test_a_hard_call_takes_the_mask_kernel_for_small_blocks(monkeypatch, block_size):
    """Below HARD_KERNEL_MIN_BLOCK units per block a hard call keeps the dense products and fuses its mask
    (hard_mask_forward); from there on it computes the chosen units only (hard_forward)."""
    calls = []

    def spy(name):
        real = getattr(kernel, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return real(*args, **kwargs)
        return wrapper
    for name in ("hard_forward", "hard_mask_forward"):
        monkeypatch.setattr(kernel, name, spy(name))
    fused, reference = twins(16, 3, block_size, hard_prob=1.0)
    assert_same_step(fused, reference, torch.randn(4, 16), seed=1)
    small = block_size < SparseFF.HARD_KERNEL_MIN_BLOCK
    assert calls == ["hard_mask_forward" if small else "hard_forward"]


@settings(max_examples=30, deadline=None)
@given(rows=st.integers(1, 300), n=st.integers(1, 40), spread=st.floats(0.1, 30.0), seed=st.integers(0, 2**16),
       threaded=st.booleans())
def test_softmax_rows_equals_pytorchs_softmax(rows, n, spread, seed, threaded):
    logits = torch.randn(rows, n, generator=torch.Generator().manual_seed(seed)) * spread
    torch.testing.assert_close(kernel.softmax_rows(logits, threads=2 if threaded else 1),
                               torch.softmax(logits, -1), atol=1e-6, rtol=1e-5)


@settings(max_examples=40, deadline=None)
@given(rows=st.integers(1, 300), n=st.integers(1, 40), power=st.integers(1, kernel.MAX_POWER),
       spread=st.floats(0.1, 8.0), seed=st.integers(0, 2**16), threaded=st.booleans())
def test_sampler_picks_the_unit_whose_cumulative_probability_reaches_u(rows, n, power, spread, seed, threaded):
    """Against float64 arithmetic: the chosen unit c has cdf[c-1] < u <= cdf[c], up to 1e-9 (the kernel sums
    float64 numbers, so only a u within rounding of a boundary could go either way)."""
    g = torch.Generator().manual_seed(seed)
    p = torch.softmax(torch.randn(rows, n, generator=g) * spread, -1)
    u = torch.rand(rows, generator=g)
    chosen = kernel.sample(p, u, power, threads=2 if threaded else 1).numpy()
    q = p.double().numpy() ** power
    cdf = np.cumsum(q, axis=1) / q.sum(axis=1, keepdims=True)
    below = np.where(chosen > 0, cdf[np.arange(rows), np.maximum(chosen - 1, 0)], 0.0)
    at = cdf[np.arange(rows), chosen]
    uu = u.double().numpy()
    assert np.all((below < uu + 1e-9) & (uu <= at + 1e-9))


def test_the_sampler_follows_the_reference_distribution():
    """Many draws of one row: the share of each unit is softmax(logits / noise_scale)'s, within 4 sigma."""
    logits = torch.tensor([[0.0, 0.05, 0.1, -0.1, 0.02]])
    p = torch.softmax(logits, -1).expand(200_000, 5).contiguous()
    chosen = kernel.sample(p, torch.rand(200_000, generator=torch.Generator().manual_seed(0)), 10)
    share = torch.bincount(chosen, minlength=5).double() / 200_000
    expected = torch.softmax(logits[0].double() / 0.1, -1)
    sigma = (expected * (1 - expected) / 200_000).sqrt()
    assert torch.all((share - expected).abs() < 4 * sigma + 1e-12), (share, expected)


@pytest.mark.parametrize("block_size", [32, 2])     # the chosen units' kernels; the mask's
def test_a_threaded_call_equals_the_one_thread_call(block_size):
    """Calls large enough (PARALLEL_MIN_ENTRIES) for the threaded compilations: the same step as one thread."""
    fused, _ = twins(32, 16, block_size, hard_prob=1.0)
    x = torch.randn(8, 64, 32)
    assert x.shape[0] * x.shape[1] * 16 * block_size >= kernel.PARALLEL_MIN_ENTRIES
    grad = torch.randn(8, 64, 32, generator=torch.Generator().manual_seed(0))
    threads = torch.get_num_threads()
    outs = []
    for n in (1, 2):
        torch.set_num_threads(n)
        try:
            outs.append(step(fused, x, grad, seed=5))
        finally:
            torch.set_num_threads(threads)
    torch.testing.assert_close(outs[0][0], outs[1][0], **TOL)
    torch.testing.assert_close(outs[0][1], outs[1][1], **TOL)
    for name in outs[0][2]:
        torch.testing.assert_close(outs[0][2][name], outs[1][2][name], **TOL, msg=f"gradient of {name}")


def test_non_contiguous_input():
    fused, reference = twins(12, 4, 4, hard_prob=1.0, noise_scale=0.0)
    x = torch.randn(12, 6).t()                              # (6, 12), strided
    assert not x.is_contiguous()
    assert_same_step(fused, reference, x)


def test_eval_mode_and_decode_are_untouched():
    fused, reference = twins(16, 4, 4)
    x = torch.randn(3, 16)
    fused.eval(), reference.eval()
    with torch.no_grad():
        torch.testing.assert_close(fused(x), reference(x), **TOL)
        torch.testing.assert_close(fused.decode(x), reference(x), **TOL)


def test_a_model_trains_the_same_on_both_paths():
    """Three AdamW steps of a small sparse model (the book's recipe, always hard, no noise so that the choice
    does not hang on rounding): the same losses on both paths."""
    losses = {}
    for path in ("fused", "pytorch"):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=20, context_length=16, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                          ff="sparse", ff_block_size=8, ff_hard_prob=1.0, ff_noise_scale=0.0)
        model = TransformerLM(cfg).train()
        for layer in model.modules():
            if isinstance(layer, SparseFF):
                layer.train_path = path
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        x = torch.randint(0, 20, (4, 16), generator=torch.Generator().manual_seed(1))
        out = []
        for _ in range(3):
            _, loss = model(x, x)
            opt.zero_grad()
            loss.backward()
            opt.step()
            out.append(loss.item())
        losses[path] = out
    assert losses["fused"] == pytest.approx(losses["pytorch"], rel=1e-5)


def test_without_numba_the_pytorch_path_runs(monkeypatch):
    fused, reference = twins(16, 4, 4, hard_prob=1.0)
    fused.train_path = "auto"
    monkeypatch.setattr(kernel, "numba", None)
    assert fused.fused_train_unavailable(torch.randn(2, 16)) == "numba is not installed (pip install numba)"
    x = torch.randn(2, 16)
    y1, *_ = step(fused, x, torch.ones(2, 16), seed=0)
    y2, *_ = step(reference, x, torch.ones(2, 16), seed=0)
    assert fused.last_train_path == "pytorch"
    torch.testing.assert_close(y1, y2, **TOL)
    fused.train_path = "fused"
    with pytest.raises(ValueError, match="train_path='fused' does not apply to this call: numba is not installed"):
        fused(x)


def test_float64_falls_back_and_fused_says_why():
    fused, _ = twins(16, 4, 4)
    fused.double()
    x = torch.randn(2, 16, dtype=torch.float64)
    fused.train_path = "auto"
    fused(x)
    assert fused.last_train_path == "pytorch"
    fused.train_path = "fused"
    with pytest.raises(ValueError, match="compiled for float32 on the CPU, x is torch.float64"):
        fused(x)


def test_a_kernel_that_fails_to_compile_falls_back(monkeypatch):
    import numba

    def broken(*args):
        raise numba.core.errors.TypingError("planted compile failure")

    for name in ("_mask_forward", "_hard_forward", "_softmax_shift", "_hard_mask_forward"):
        monkeypatch.setattr(kernel, name + "_serial", broken)
        monkeypatch.setattr(kernel, name + "_parallel", broken)
    # the soft kernels, then the hard ones: the chosen units' kernel (blocks of 8), the mask's (blocks of 4)
    for hard_prob, block_size in ((0.0, 4), (1.0, 8), (1.0, 4)):
        monkeypatch.setattr(kernel, "_COMPILE_ERROR", [])
        fused, _ = twins(16, 4, block_size, hard_prob=hard_prob)
        fused.train_path = "auto"
        fused(torch.randn(2, 16))
        assert fused.last_train_path == "pytorch"
        assert "did not compile" in fused.fused_train_unavailable(torch.randn(2, 16))


def test_bad_train_paths_are_refused():
    layer = SparseFF(8, 16, 4)
    assert layer.train_path == "auto"
    with pytest.raises(ValueError, match="train_path must be one of .* got train_path='numba'"):
        layer.train_path = "numba"


def test_sample_power():
    assert kernel.sample_power(0.1) == 10
    assert kernel.sample_power(0.25) == 4
    assert kernel.sample_power(1.0) == 1
    assert kernel.sample_power(0.3) is None
    assert kernel.sample_power(0.0) is None
    assert kernel.sample_power(1 / (kernel.MAX_POWER + 1)) is None
