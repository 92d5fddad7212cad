"""The explicit-loop conv QKV layer (chapter 4's by-hand check) agrees with ConvQKVAttention, and the diagram draws."""
import matplotlib
import pytest
import torch

from sparse_tutorial.layers.qkv import ConvQKVAttention
from sparse_tutorial.studies.conv_anatomy import conv_qkv_by_hand, shape_diagram

matplotlib.use("Agg")


def layer_with_biases(d, S, seed=0, length_kernel=3):
    torch.manual_seed(seed)
    layer = ConvQKVAttention(d, S, length_kernel=length_kernel)
    with torch.no_grad():
        for p in layer.parameters():
            if p.dim() == 1:        # the biases start at zero: make them count
                p.normal_()
    return layer


@pytest.mark.parametrize("d, S, T, lk", [(12, 3, 6, 3), (16, 4, 5, 3), (8, 2, 4, 2)])
@pytest.mark.parametrize("mode", ["train graph", "eval, merged conv"])
def test_by_hand_equals_the_module(d, S, T, lk, mode):
    layer = layer_with_biases(d, S, length_kernel=lk)
    x = torch.randn(T, d)
    if mode == "train graph":
        layer.train()                   # dropout is 0: the three convolutions of the autograd path
        y = layer(x[None])[0].detach()
    else:
        layer.eval()
        with torch.no_grad():           # the merged Q/K/V convolution of inference
            y = layer(x[None])[0]
    assert torch.allclose(conv_qkv_by_hand(layer, x), y, atol=1e-5)


def test_by_hand_sees_a_wrong_layer():
    """The check can fail: a layer whose V kernel reads the next position (not causal) disagrees."""
    layer = layer_with_biases(12, 3).eval()
    x = torch.randn(6, 12)
    with torch.no_grad():
        expected = conv_qkv_by_hand(layer, x)
        layer.conv_v.conv.weight[:, :, 0] += 1.0   # change the tap two positions back: the output moves
        moved = layer(x[None])[0]
    assert not torch.allclose(expected, moved, atol=1e-3)


def test_shape_diagram_shows_the_real_shapes():
    layer = ConvQKVAttention(64, 8)
    fig = shape_diagram(layer)
    texts = " ".join(t.get_text() for ax in fig.axes for t in ax.texts)
    assert "S=8, M=8" in texts and "D (8, 64)" in texts and "3x1" in texts
    assert f"{8 * 64 + 64 * 8 + 64:,} parameters" in texts
    matplotlib.pyplot.close(fig)
