"""The fused training activation of SparseFF (layers.masked_relu) against the PyTorch path it replaces."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_tutorial import SparseFF
from sparse_tutorial.layers import masked_relu as fused


def _step(ff, x, path, seed):
    """Output and every gradient of one training call along ``path``, with the random draws of ``seed``."""
    ff.train_path = path
    ff.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    torch.manual_seed(seed)
    y = ff(x)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    return y.detach(), x.grad, [p.grad for p in ff.parameters()], ff.last_mask_hard


@settings(max_examples=40, deadline=None)
@given(block_size=st.integers(1, 12), n_blocks=st.integers(1, 6), d_model=st.integers(1, 20),
       lead=st.lists(st.integers(1, 5), min_size=1, max_size=2), hard_prob=st.sampled_from([0.0, 0.5, 1.0]),
       noise=st.sampled_from([0.0, 0.1, 1.0]), scale=st.booleans(), seed=st.integers(0, 2**20))
def test_fused_training_call_equals_the_pytorch_path(block_size, n_blocks, d_model, lead, hard_prob, noise, scale,
                                                     seed):
    torch.manual_seed(seed)
    ff = SparseFF(d_model, block_size * n_blocks, block_size, hard_prob=hard_prob, noise_scale=noise,
                  scale_by_prob=scale).train()
    x = torch.randn(*lead, d_model)
    ref, got = _step(ff, x, "pytorch", seed), _step(ff, x, "auto", seed)
    assert got[3] == ref[3]                                          # same hard/soft draw
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    for g, r in zip(got[2], ref[2]):
        torch.testing.assert_close(g, r, atol=1e-5, rtol=1e-5)


def test_the_fused_path_is_taken_in_training_only(monkeypatch):
    calls = []
    real = fused.masked_relu
    monkeypatch.setattr(fused, "masked_relu", lambda *a, **k: calls.append(1) or real(*a, **k))
    ff = SparseFF(16, 64, 8)
    ff.train()(torch.randn(3, 16))
    assert calls == [1]
    ff.eval()(torch.randn(3, 16))
    ff.train_path = "pytorch"
    ff.train()(torch.randn(3, 16))
    assert calls == [1]


@pytest.mark.parametrize("why", ["no numba", "float64"])
def test_fallback_to_pytorch_gives_the_same_result(monkeypatch, why):
    torch.manual_seed(0)
    ff = SparseFF(16, 64, 8, hard_prob=0.5)
    x = torch.randn(4, 16)
    if why == "float64":
        ff, x = ff.double(), x.double()
    ref = _step(ff, x, "pytorch", 3)
    monkeypatch.setattr(fused, "masked_relu", lambda *a, **k: pytest.fail("the fused path ran"))
    if why == "no numba":
        monkeypatch.setattr(fused, "numba", None)
    assert not fused.available(x)
    got = _step(ff, x, "auto", 3)
    torch.testing.assert_close(got[0], ref[0])
    for g, r in zip(got[2], ref[2]):
        torch.testing.assert_close(g, r)


def test_bad_arguments_are_named():
    a = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"a=\(2, 3, 4\), s=\(2, 3, 5\)"):
        fused.masked_relu(a, torch.randn(2, 3, 5), hard=False)
    with pytest.raises(ValueError, match=r"u.shape=\(5,\)"):
        fused.masked_relu(a, torch.randn(2, 3, 4), hard=True, u=torch.rand(5))
    with pytest.raises(ValueError, match="float64"):
        fused.masked_relu(a.double(), a.double(), hard=False)
    ff = SparseFF(16, 64, 8)
    ff.train_path = "numba"
    with pytest.raises(ValueError, match="train_path='numba'"):
        ff(torch.randn(2, 16))


def test_the_fused_pass_leaves_pytorchs_thread_count_alone():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        SparseFF(16, 64, 8).train()(torch.randn(3, 16)).sum().backward()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
