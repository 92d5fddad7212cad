"""Chapter 2's worked example, schematic and measured training tricks (sparse_tutorial.studies.selection)."""
import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from sparse_tutorial.layers import SparseFF
from sparse_tutorial.studies.selection import (choice_frequencies, gathered_rows, gradient_reach, hard_call_share,
                                               plot_choice_frequencies, selection_schematic, selection_table,
                                               worked_example)


def test_worked_example_is_small_integer_and_both_paths_agree():
    ff, x = worked_example()
    assert (ff.d_model, ff.d_ff, ff.block_size, ff.n_blocks) == (3, 8, 4, 2) and not ff.training
    for p in ff.parameters():
        assert torch.equal(p, p.round())
    table = selection_table(ff, x)
    assert table["score"].tolist() == [3, 1, 4, -2, -1, 5, 3, 1]
    assert table.index[table["chosen"]].tolist() == [2, 5]                # scattered, one per block
    rows = gathered_rows(ff, x)
    assert rows["unit k"].tolist() == [2, 5] and rows["act = relu"].tolist() == [2, 3]
    assert rows["W1ᵀ row k"].tolist() == ["[1, 1, 1]", "[2, 0, -1]"]
    with torch.no_grad():
        assert torch.equal(ff(x), ff.decode(x)) and ff.decode(x).tolist() == [[2, 3, 5]]


def test_selection_schematic_draws_a_real_layer():
    ff, x = worked_example()
    fig = selection_schematic(ff, x)
    assert len(fig.axes) == 5 and "[2, 5]" in fig._suptitle.get_text()
    matplotlib.pyplot.close(fig)
    big = SparseFF(16, 64, 8).eval()
    fig = selection_schematic(big, torch.randn(16))                         # not annotated, still drawn
    assert len(fig.axes) == 5
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="one token"):
        selection_schematic(big, torch.randn(2, 16))


def test_choice_frequencies_follow_the_softmax_target():
    ff = SparseFF(4, 16, 8)
    logits = torch.tensor([0.3, 0.1, 0.25, -0.2, 0.0, 0.05, 0.2, -0.1])
    freq = choice_frequencies(ff, logits, draws=20000)
    target = freq["softmax(logits / 0.1)"]
    tol = 6 * (target * (1 - target) / 20000) ** 0.5 + 1e-3
    for col in ("Gumbel-max", "layer's sampler"):
        assert ((freq[col] - target).abs() < tol).all(), col
        assert freq[col].sum() == pytest.approx(1.0)
    fig = plot_choice_frequencies(freq, draws=20000)
    matplotlib.pyplot.close(fig)
    with pytest.raises(ValueError, match="block_size=8"):
        choice_frequencies(ff, torch.zeros(4))


def test_gradient_reach_hard_call_reaches_every_score_but_only_chosen_rows():
    ff, x = worked_example()
    hard = gradient_reach(ff, x, hard=True)
    assert hard["mask"].tolist() == [0, 0, 1, 0, 0, 1, 0, 0]
    assert (hard["grad score"].abs() > 0).all()                      # every unit's score
    assert (hard["|grad W1ᵀ row|"] > 0).tolist() == [u in (2, 5) for u in range(8)]
    soft = gradient_reach(ff, x, hard=False)
    assert (soft["mask"] > 0).all()
    assert (soft["|grad W1ᵀ row|"] > 0).sum() > 2                   # the soft call trains more rows
    assert not ff.training and ff.hard_prob == 0.3                           # left as it was
    assert all(p.grad is None for p in ff.parameters())


def test_hard_call_share_counts_last_mask_hard():
    ff, x = worked_example()
    for p in (0.0, 1.0):
        ff.hard_prob = p
        assert hard_call_share(ff, x, calls=50)["share"] == p
    ff.hard_prob = 0.3
    r = hard_call_share(ff, x, calls=2000)
    assert abs(r["share"] - 0.3) < 5 * r["binomial std"] and not ff.training
