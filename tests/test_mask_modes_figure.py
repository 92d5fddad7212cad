"""plots.mask_modes_figure: the three masks of one token, drawn without changing the layer."""
import matplotlib
import pytest
import torch

matplotlib.use("Agg")

from sparse_tutorial.layers import SparseFF
from sparse_tutorial.studies.plots import mask_modes_figure


def test_three_panels_one_hot_hard_and_eval_and_the_layer_untouched():
    torch.manual_seed(0)
    ff = SparseFF(16, 64, 8).eval()
    x = torch.randn(1, 16)
    fig = mask_modes_figure(ff, x, block=2)
    bars = [[p.get_height() for p in ax.patches] for ax in fig.axes]
    assert [len(b) for b in bars] == [8, 8, 8]
    assert abs(sum(bars[0]) - 1) < 1e-5                       # soft: a distribution over the block
    assert sorted(bars[1])[-1] == 1 and sum(bars[1]) == 1      # hard: one-hot
    assert bars[2].index(1.0) == int(torch.argmax(ff.block_logits(x)[0, 2]))   # eval: the argmax
    assert not ff.training and ff.hard_prob == 0.3
    matplotlib.pyplot.close(fig)


def test_more_than_one_token_is_refused():
    with pytest.raises(ValueError, match="one token"):
        mask_modes_figure(SparseFF(16, 64, 8), torch.randn(2, 16))
