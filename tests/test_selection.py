"""Unit-usage statistics, the sampling of the hard mask, and chapter 2's experiment helpers."""
import math
from dataclasses import replace

import matplotlib
import pandas as pd
import pytest
import torch

matplotlib.use("Agg")

from sparse_tutorial.layers import SparseFF
from sparse_tutorial.model import ModelConfig, TransformerLM
from sparse_tutorial.studies.selection import (Variant, compare_variants, ff_inputs, plot_active_units, plot_decode_cost,
                                       plot_selection_heatmap, plot_usage_histogram, set_selection,
                                       sparse_layers, unit_counts, usage_stats)
from sparse_tutorial.train import TrainConfig

from test_train import toy_data


def test_usage_stats_balanced_and_collapsed():
    balanced = usage_stats(torch.full((8,), 5), block_size=4)
    assert balanced["units used"] == 1.0 and balanced["dead units"] == 0
    assert balanced["entropy (bits)"] == pytest.approx(2.0)
    assert balanced["normalised entropy"] == pytest.approx(1.0)
    assert balanced["max load"] == pytest.approx(1.0)
    collapsed = usage_stats(torch.tensor([9, 0, 0, 0, 0, 3, 3, 0]), block_size=4)
    assert collapsed["dead units"] == 5 and collapsed["units used"] == pytest.approx(3 / 8)
    assert collapsed["entropy (bits)"] == pytest.approx(0.5)          # blocks: 0 bits and 1 bit
    assert collapsed["max load"] == pytest.approx((4 * 1.0 + 4 * 0.5) / 2)


def test_usage_stats_refuses_bad_counts():
    with pytest.raises(ValueError, match="block_size=4"):
        usage_stats(torch.ones(6), 4)
    with pytest.raises(ValueError, match="at least one"):
        usage_stats(torch.zeros(8), 4)


def test_unit_counts_count_one_unit_per_block_per_token():
    ff = SparseFF(16, 64, 8).eval()
    x = torch.randn(3, 5, 16)
    counts = unit_counts(ff, x)
    assert counts.shape == (64,) and counts.sum() == 15 * 8
    assert (counts.view(8, 8).sum(-1) == 15).all()


def test_hard_choice_follows_softmax_of_logits_over_noise_scale():
    """The hard mask is a draw from softmax(logits / noise_scale), as Gumbel-max with that noise."""
    torch.manual_seed(0)
    ff = SparseFF(4, 8, 8, hard_prob=1.0, noise_scale=1.0).train()
    with torch.no_grad():
        ff.controller.c2.weight.zero_()
        ff.controller.c2.bias.copy_(torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 0.0, 1.5, -3.0]))
    n = 40000
    m = ff.mask(torch.zeros(n, 4))
    freq = m.detach().reshape(n, 8).mean(0)
    expected = torch.softmax(ff.controller.c2.bias.detach(), -1)
    # 6 binomial standard deviations at n = 40000
    tol = 6 * torch.sqrt(expected * (1 - expected) / n) + 1e-4
    assert ((freq - expected).abs() < tol).all(), (freq, expected)
    assert torch.equal(m.detach().sum(-1), torch.ones(n, 1))


def test_small_noise_scale_nearly_always_picks_the_argmax():
    ff = SparseFF(4, 8, 8, hard_prob=1.0, noise_scale=0.1).train()
    with torch.no_grad():
        ff.controller.c2.weight.zero_()
        ff.controller.c2.bias.copy_(torch.tensor([1.0, 0.5, 0, 0, 0, 0, 0, 0]))
    m = ff.mask(torch.zeros(20000, 4)).detach().reshape(-1, 8).mean(0)
    # softmax([10, 5, 0...]) puts 0.9929 on unit 0
    assert m[0] == pytest.approx(torch.softmax(torch.tensor([10.0, 5, 0, 0, 0, 0, 0, 0]), -1)[0].item(), abs=0.005)


def test_straight_through_gradient_equals_the_soft_gradient():
    """With the hard mask, the gradient reaching the controller is the soft mask's gradient at that mask value."""
    torch.manual_seed(0)
    ff = SparseFF(6, 12, 4, hard_prob=1.0).train()
    x = torch.randn(5, 6)
    torch.manual_seed(1)
    m = ff.mask(x)
    assert ff.last_mask_hard
    g = torch.randn_like(m)
    bias = ff.controller.c2.bias
    (grad_st,) = torch.autograd.grad((m * g).sum(), bias)
    (grad_soft,) = torch.autograd.grad((torch.softmax(ff.block_logits(x), -1) * g).sum(), bias)
    torch.testing.assert_close(grad_st, grad_soft)


def test_set_selection_and_errors():
    model = TransformerLM(ModelConfig(vocab_size=7, context_length=8, d_model=8, n_heads=2, n_layers=2, d_ff=16,
                                      ff_block_size=4, ff="sparse"))
    set_selection(model, hard_prob=1.0, noise_scale=0.0)
    assert len(sparse_layers(model)) == 2
    assert all(ff.hard_prob == 1.0 and ff.noise_scale == 0.0 for ff in sparse_layers(model))
    with pytest.raises(ValueError, match="hard_prob=1.5"):
        set_selection(model, hard_prob=1.5)
    with pytest.raises(ValueError, match="noise_scale=-1"):
        set_selection(model, noise_scale=-1)


def test_ff_inputs_are_what_the_ff_layers_see():
    model = TransformerLM(ModelConfig(vocab_size=7, context_length=8, d_model=8, n_heads=2, n_layers=2, d_ff=16,
                                      ff_block_size=4, ff="sparse")).train()
    idx = torch.randint(0, 7, (2, 8))
    inputs = ff_inputs(model, idx)
    assert [t.shape for t in inputs] == [(2, 8, 8)] * 2
    assert model.training  # restored
    seen = []
    block = model.blocks[1]
    original = block.feed_forward  # catches the input whichever FF path (decode or dense-masked) the block takes
    block.feed_forward = lambda x: seen.append(x) or original(x)
    model.eval()
    model(idx)
    del block.feed_forward
    torch.testing.assert_close(seen[0], inputs[1])


def test_figures_draw():
    ff = SparseFF(8, 32, 8).eval()
    x = torch.randn(10, 8)
    for fig in (plot_selection_heatmap(ff, x, labels=list("abcdefghij")), plot_active_units(ff, x),
                plot_usage_histogram(unit_counts(ff, x), 8), plot_decode_cost(128, 512, 32)):
        assert fig.axes and fig.axes[0].get_title()
        matplotlib.pyplot.close(fig)


def test_compare_variants_table():
    data = toy_data()
    cfg = ModelConfig(vocab_size=len(data.vocab), context_length=16, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                      ff_block_size=8, ff="sparse")
    tc = TrainConfig(steps=3, batch_size=4, eval_every=3, eval_batches=1)
    table, hist, models = compare_variants([Variant("paper"), Variant("always hard", hard_prob=1.0),
                                    Variant("full", controller="full")], cfg, tc, data, progress=False)
    assert table["variant"].tolist() == ["paper", "always hard", "full"]
    assert set(hist) == set(models) == {"paper", "always hard", "full"}
    assert models["full"].blocks[0].ff.controller_kind == "full" and not models["paper"].training
    # controller params: low rank 16*4 + 4*32 + 32; full 16*32 + 32
    assert table["controller params"].tolist() == [224, 224, 544]
    assert ((table["units used after"] > 0) & (table["units used after"] <= 1)).all()
    assert math.isfinite(table["val loss"].sum())


def test_compare_variants_over_seeds_gives_means_and_ranges():
    data = toy_data()
    cfg = ModelConfig(vocab_size=len(data.vocab), context_length=16, d_model=16, n_heads=2, n_layers=1, d_ff=32,
                      ff_block_size=8, ff="sparse")
    tc = TrainConfig(steps=3, batch_size=4, eval_every=3, eval_batches=1)
    one, _, _ = compare_variants([Variant("paper")], cfg, replace(tc, seed=0), data, progress=False)
    two, hist, _ = compare_variants([Variant("paper")], cfg, replace(tc, seed=1), data, seeds=[0, 1],
                                    progress=False)
    row = two.iloc[0]
    assert row["seeds"] == 2 and len(row["val losses"]) == 2
    assert row["val losses"][0] == one["val loss"].iloc[0]          # seed 0 is the same run in both calls
    assert row["val loss"] == pytest.approx(sum(row["val losses"]) / 2)
    assert row["val min"] == min(row["val losses"]) and row["val max"] == max(row["val losses"])
    assert row["val min"] < row["val max"]                          # two seeds, two different runs
    for bad in ([], [0, 0], [0.5]):
        with pytest.raises(ValueError, match="seeds"):
            compare_variants([Variant("paper")], cfg, tc, data, seeds=bad, progress=False)


def test_variant_readings_judge_each_difference_against_the_seeds_range():
    from sparse_tutorial.studies.readings import variant_readings
    base = {"train loss": 1.0, "units used after": 0.5, "entropy after": 0.9, "seeds": 3}
    table = pd.DataFrame([
        {"variant": "recipe", "val loss": 2.00, "val min": 1.95, "val max": 2.05, **base},
        {"variant": "close", "val loss": 2.05, "val min": 2.00, "val max": 2.10, **base},
        {"variant": "far", "val loss": 2.50, "val min": 2.45, "val max": 2.55, **base},
    ])
    text = " ".join(variant_readings(table).split())
    assert "3 seeds" in text
    assert "beyond the seeds' spread: 'far'; within it (not told apart by this run): 'close'" in text
    one = variant_readings(table.drop(columns=["seeds", "val min", "val max"]))
    assert "one seed" in one and "within" not in one


@pytest.mark.parametrize("kw,needle", [(dict(noise_scale=float("nan")), "noise_scale=nan"),
                                       (dict(hard_prob=float("nan")), "hard_prob=nan"),
                                       (dict(noise_scale="0.1"), "noise_scale='0.1'"),
                                       (dict(hard_prob="all"), "hard_prob='all'")])
def test_set_selection_refuses_nan_and_strings(kw, needle):
    model = TransformerLM(ModelConfig(vocab_size=7, context_length=8, d_model=8, n_heads=2, n_layers=1, d_ff=16,
                                      ff_block_size=4, ff="sparse"))
    with pytest.raises(ValueError) as err:
        set_selection(model, **kw)
    assert needle in str(err.value)
    assert sparse_layers(model)[0].noise_scale == 0.1 and sparse_layers(model)[0].hard_prob == 0.3   # unchanged
