"""Dense-to-sparse conversion (the quality study's lever 7)."""
import pytest
import torch

from sparse_tutorial.convert import dense_to_sparse, fit_controller, group_units
from sparse_tutorial.model import ModelConfig, TransformerLM

from test_train import toy_data


def test_group_units_is_a_permutation_that_separates_units_firing_together():
    torch.manual_seed(0)
    n, d_ff = 400, 8
    active = torch.rand(n, d_ff) < 0.1
    active[:, 1] = active[:, 0] = torch.rand(n) < 0.6                     # units 0 and 1 always fire together
    active[:, 3] = active[:, 2] = torch.rand(n) < 0.5                     # so do 2 and 3
    order = group_units(active, 4)
    assert sorted(order.tolist()) == list(range(d_ff))
    blocks = [set(order[i:i + 4].tolist()) for i in (0, 4)]
    assert all(not {0, 1} <= b and not {2, 3} <= b for b in blocks)
    with pytest.raises(ValueError, match="block_size"):
        group_units(active, 3)


def test_fit_controller_recovers_a_low_rank_map():
    torch.manual_seed(0)
    h = torch.randn(500, 6)
    true = torch.randn(6, 2) @ torch.randn(2, 10)                         # rank 2
    a = h @ true + torch.randn(10)
    c1, c2, c = fit_controller(h, a, rank=2)
    torch.testing.assert_close(c + h @ c1 @ c2, a, rtol=1e-4, atol=1e-4)
    assert c1.shape == (6, 2) and c2.shape == (2, 10)


def test_with_blocks_of_one_the_converted_model_is_the_dense_model_without_b1():
    data = toy_data()
    cfg = ModelConfig(vocab_size=len(data.vocab), context_length=16, d_model=16, n_heads=2, n_layers=2, d_ff=32)
    torch.manual_seed(0)
    dense = TransformerLM(cfg).eval()
    with torch.no_grad():
        for b in dense.blocks:
            b.ff.w1.bias.zero_()                                          # the sparse layer has no b1
    sparse = dense_to_sparse(dense, data, block_size=1, n_tokens=64, d_lowrank=4).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(sparse(idx)[0], dense(idx)[0], rtol=1e-5, atol=1e-5)
    assert sparse.cfg.ff == "sparse" and sparse.blocks[0].ff.block_size == 1


def test_at_full_rank_the_controller_scores_are_the_dense_pre_activations():
    from sparse_tutorial.convert import ff_activations
    data = toy_data()
    cfg = ModelConfig(vocab_size=len(data.vocab), context_length=16, d_model=16, n_heads=2, n_layers=1, d_ff=32)
    torch.manual_seed(0)
    dense = TransformerLM(cfg).eval()
    # rank d_model: the least-squares fit of the pre-activations (linear in h) is exact
    sparse = dense_to_sparse(dense, data, block_size=4, n_tokens=256, d_lowrank=16).eval()
    (h, pre), = ff_activations(dense, data, 256)
    (h_sparse, none), = ff_activations(sparse, data, 256)
    assert none is None and torch.equal(h, h_sparse)                      # the rest of the model is copied
    with torch.no_grad():
        scores = sparse.blocks[0].ff.controller(h)                        # (n, d_ff), units in block order
    torch.testing.assert_close(scores.sort(-1).values, pre.sort(-1).values, rtol=1e-3, atol=1e-3)
    with pytest.raises(ValueError, match="dense FF"):
        dense_to_sparse(sparse, data, block_size=4)
