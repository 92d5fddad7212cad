"""Sparse QKV layers: shapes, parameter counts, argument errors, causality, and the permutation property."""
import pytest
import torch

from sparse_tutorial.layers import CausalSelfAttention, LayerCache, make_attention
from sparse_tutorial.layers.qkv import (
    ConvQKVAttention,
    ModuleConv,
    MultiplicativeAttention,
    MultiplicativeDense,
    conv_qkv_params,
    dense_qkv_params,
    multiplicative_dense_params,
    multiplicative_qkv_params,
    resolve_qkv_modules,
)
from sparse_tutorial.model import ModelConfig, TransformerLM
from sparse_tutorial.studies.qkv_study import attention_maps


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# -- MultiplicativeDense ---------------------------------------------------------------------------------


@pytest.mark.parametrize("lead", [(), (3,), (2, 5), (4, 40, 1)])
def test_multiplicative_dense_matches_its_formula_in_both_orders(lead):
    layer = MultiplicativeDense(12, 20, 5)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(*lead, 12)
    want = torch.einsum("...i,si,im->...sm", x, layer.D, layer.E) + layer.bias.view(5, 4)
    u = layer.forward_modules(x)
    assert u.shape == (*lead, 5, 4)
    torch.testing.assert_close(u, want, atol=1e-5, rtol=1e-5)
    assert layer(x).shape == (*lead, 20)
    torch.testing.assert_close(layer(x), want.flatten(-2), atol=1e-5, rtol=1e-5)  # module-major layout
    torch.testing.assert_close(x @ layer.dense_weight() + layer.bias, want.flatten(-2), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d_in,d_out,S,bias", [(16, 16, 4, True), (10, 12, 3, False), (1024, 1024, 16, True),
                                               (64, 32, 8, True)])
def test_multiplicative_dense_param_count(d_in, d_out, S, bias):
    layer = MultiplicativeDense(d_in, d_out, S, bias=bias)
    M = d_out // S
    assert n_params(layer) == multiplicative_dense_params(d_in, d_out, S, bias) == S * d_in + d_in * M + (d_out if bias else 0)


def test_multiplicative_dense_init_follows_the_reference():
    layer = MultiplicativeDense(256, 256, 16)
    assert abs(layer.D.std().item() - 0.5) < 0.02
    assert torch.all(layer.bias == 0)


@pytest.mark.parametrize("args,words", [((10, 12, 5), ["d_out=12", "n_modules=5"]),
                                        ((0, 12, 3), ["d_in=0"]),
                                        ((12, 12, 0), ["n_modules=0"]),
                                        ((12, 12, 2.0), ["n_modules=2.0"])])
def test_multiplicative_dense_bad_arguments(args, words):
    with pytest.raises(ValueError) as err:
        MultiplicativeDense(*args)
    for word in words:
        assert word in str(err.value)


def test_multiplicative_dense_rejects_wrong_input_width():
    with pytest.raises(ValueError, match="d_in=8"):
        MultiplicativeDense(8, 8, 2)(torch.randn(3, 7))


def test_multiplicative_layer_fits_a_permutation():
    """Any permutation is representable (D picks the module, E the unit); Adam finds one from random init."""
    torch.manual_seed(0)
    d, S = 16, 4
    perm = torch.randperm(d)
    layer = MultiplicativeDense(d, d, S)
    opt = torch.optim.Adam(layer.parameters(), lr=0.02)
    for _ in range(400):
        x = torch.randn(64, d)
        loss = torch.mean((layer(x) - x[:, perm]) ** 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
    x = torch.randn(1000, d)
    with torch.no_grad():
        err = torch.mean((layer(x) - x[:, perm]) ** 2).item()
    assert err < 1e-6, f"mean squared error {err:.2e} after 400 Adam steps"
    assert n_params(layer) < d * d + d  # fewer parameters than a dense layer


# -- Convolution and the attention layers ------------------------------------------------------------------


def test_module_conv_shapes_and_errors():
    conv = ModuleConv(6, length_kernel=3, module_kernel=3)
    assert conv(torch.randn(2, 6, 9, 5)).shape == (2, 6, 7, 5)  # T + 2 in, T out; modules kept
    with pytest.raises(ValueError, match="module_kernel=2"):
        ModuleConv(6, module_kernel=2)
    with pytest.raises(ValueError, match="length_kernel=0"):
        ModuleConv(6, length_kernel=0)


@pytest.mark.parametrize("d,S,expected", [(1024, 16, 169_152), (9216, 64, 2_362_032)])
def test_conv_qkv_param_count_matches_the_reference(d, S, expected):
    """Shared multiplicative layer (S*d + d*M + d) + Q, K convs (3*3*M*M + M) + V conv (3*1*M*M + M).

    169,152 at d=1024, S=16 (M=64) and 2.36 M at d=9216, S=64 (M=144), the paper's two widths: our counts from the
    reference implementation's layer shapes (the paper prints no such number), checked against the built module.
    """
    attn = ConvQKVAttention(d, S)
    assert n_params(attn) == conv_qkv_params(d, S) == expected


def test_multiplicative_and_dense_attention_param_counts():
    assert n_params(MultiplicativeAttention(64, 8, 8)) == multiplicative_qkv_params(64, 8) == 4 * (8 * 64 + 64 * 8 + 64)
    assert n_params(CausalSelfAttention(64, 8)) == dense_qkv_params(64) == 4 * (64 * 64 + 64)
    assert dense_qkv_params(1024) == 4_198_400


@pytest.mark.parametrize("kind,cls", [("conv", ConvQKVAttention), ("multiplicative", MultiplicativeAttention)])
def test_make_attention_shapes(kind, cls):
    cfg = ModelConfig(d_model=48, n_heads=4, qkv=kind, qkv_modules=6)
    attn = make_attention(cfg)
    assert isinstance(attn, cls)
    x = torch.randn(3, 7, 48)
    assert attn(x, None).shape == (3, 7, 48)
    q, k, v = attn.heads(x)
    heads = 6 if kind == "conv" else 4
    assert q.shape == k.shape == v.shape == (3, heads, 7, 48 // heads)


def test_default_modules_is_sqrt_d_model():
    assert resolve_qkv_modules(64, None) == 8
    assert ModelConfig(d_model=256, n_heads=4, qkv="conv").qkv_modules is None
    assert TransformerLM(ModelConfig(d_model=64, n_heads=4, n_layers=1, qkv="conv")).blocks[0].attn.n_modules == 8


@pytest.mark.parametrize("overrides,words", [
    (dict(d_model=128, qkv="conv"), ["d_model=128", "qkv_modules=11"]),       # round(sqrt(128)) = 11
    (dict(d_model=128, qkv="conv", qkv_modules=12), ["qkv_modules=12"]),
    (dict(d_model=128, qkv="multiplicative", qkv_modules=0), ["qkv_modules=0"]),
    (dict(d_model=60, n_heads=8, qkv="multiplicative", qkv_modules=6), ["n_heads=8"]),
])
def test_model_config_validates_sparse_qkv(overrides, words):
    with pytest.raises(ValueError) as err:
        ModelConfig(**overrides)
    for word in words:
        assert word in str(err.value)


def test_conv_attention_needs_no_n_heads_divisibility():
    cfg = ModelConfig(d_model=60, n_heads=8, qkv="conv", qkv_modules=6)  # heads are the 6 modules
    assert make_attention(cfg).n_modules == 6


@pytest.mark.parametrize("kind", ["conv", "multiplicative"])
def test_attention_is_causal(kind):
    attn = make_attention(ModelConfig(d_model=32, n_heads=4, qkv=kind, qkv_modules=4)).eval()
    x = torch.randn(2, 10, 32)
    x2 = x.clone()
    x2[:, 6] += torch.randn(2, 32)   # change token 6 only
    with torch.no_grad():
        y, y2 = attn(x), attn(x2)
    torch.testing.assert_close(y[:, :6], y2[:, :6], atol=0, rtol=0)
    assert (y[:, 6:] - y2[:, 6:]).abs().amax(dim=-1).min() > 1e-6  # the future does change


def test_conv_state_keeps_only_the_last_two_outputs():
    attn = ConvQKVAttention(32, 4).eval()
    cache = LayerCache()
    with torch.no_grad():
        attn(torch.randn(2, 9, 32), cache)
        assert cache.state["conv_context"].shape == (2, 8, 2, 4)   # (B, M, length_kernel - 1, S)
        for _ in range(3):
            attn(torch.randn(2, 1, 32), cache)
        assert cache.state["conv_context"].shape == (2, 8, 2, 4)
    assert cache.length == 12


def test_attention_maps_are_causal_distributions():
    model = TransformerLM(ModelConfig(d_model=32, n_heads=4, n_layers=2, qkv="conv", qkv_modules=4))
    probs = attention_maps(model, torch.randint(0, 65, (9,)), layer=1)
    assert probs.shape == (4, 9, 9)
    torch.testing.assert_close(probs.sum(-1), torch.ones(4, 9))
    assert torch.all(probs.triu(diagonal=1) == 0)
    with pytest.raises(ValueError, match="layer=2"):
        attention_maps(model, torch.randint(0, 65, (9,)), layer=2)


def test_merged_inference_conv_equals_the_three_convolutions_and_follows_weight_updates():
    """Inference runs Q, K, V as one merged convolution, cached; it must track every change of the weights."""
    attn = make_attention(ModelConfig(d_model=48, n_heads=4, qkv="conv", qkv_modules=6))
    x = torch.randn(2, 5, 48)
    for _ in range(2):
        with torch.enable_grad():
            separate = [t.detach() for t in attn.heads(x)]       # autograd on: the three convolutions
        with torch.no_grad():
            merged = attn.heads(x)                               # autograd off: the merged kernel
        for a, b in zip(separate, merged):
            torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
        with torch.no_grad():                                    # an optimizer step or load_state_dict
            for p in attn.parameters():
                p.add_(0.1 * torch.randn_like(p))


@pytest.mark.parametrize("products", [False, True], ids=["convolution", "matrix products"])
@pytest.mark.parametrize("batch,d,S,lk", [(1, 48, 6, 3), (3, 48, 6, 3), (2, 40, 8, 2), (2, 36, 4, 4)])
def test_merged_qkv_of_one_position_equals_the_three_convolutions(batch, d, S, lk, products):
    """A decoding step's merged convolution (one position and its left context) must give the three
    convolutions' Q, K, V, contiguous, for every batch, module count and kernel length; so must its matrix
    products, which wide layers take (the threshold lowered here to reach them at a small width)."""
    torch.manual_seed(0)
    attn = ConvQKVAttention(d, S, length_kernel=lk).eval()
    attn.CONV_MATMUL_MIN_D_MODEL = d if products else d + 1
    for conv in (attn.conv_q, attn.conv_k, attn.conv_v):         # biases are zero at init: make them count
        torch.nn.init.normal_(conv.conv.bias)
    full = torch.randn(batch, d // S, lk, S)                     # one new position and its lk - 1 left neighbours
    with torch.no_grad():
        merged = attn.merged_qkv(full)
        separate = [conv(full).permute(0, 3, 2, 1) for conv in (attn.conv_q, attn.conv_k, attn.conv_v)]
    for a, b in zip(merged, separate):
        assert a.shape == (batch, S, 1, d // S) and a.is_contiguous()
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_wide_layers_take_the_matrix_products_for_one_position_only(monkeypatch):
    """From CONV_MATMUL_MIN_D_MODEL up, one position takes _step_products; several positions (a prompt) and
    narrower layers keep the convolution."""
    calls = []
    original = ConvQKVAttention._step_products
    monkeypatch.setattr(ConvQKVAttention, "_step_products", lambda self, full: calls.append(full.shape)
                        or original(self, full))
    monkeypatch.setattr(ConvQKVAttention, "CONV_MATMUL_MIN_D_MODEL", 48)
    wide, narrow = ConvQKVAttention(48, 6).eval(), ConvQKVAttention(40, 8).eval()
    with torch.no_grad():
        wide.merged_qkv(torch.randn(1, 8, 3, 6))
        wide.merged_qkv(torch.randn(1, 8, 4, 6))                 # two positions: the convolution
        narrow.merged_qkv(torch.randn(1, 5, 3, 8))
    assert calls == [(1, 8, 3, 6)]


def test_matrix_products_follow_weight_updates():
    """The products' matrices are kept between calls; an in-place change of any convolution weight or bias
    (an optimizer step, load_state_dict) must reach them."""
    torch.manual_seed(0)
    attn = ConvQKVAttention(48, 6).eval()
    attn.CONV_MATMUL_MIN_D_MODEL = 0
    full = torch.randn(2, 8, 3, 6)
    for _ in range(3):
        with torch.no_grad():
            products = attn.merged_qkv(full)
            separate = [conv(full).permute(0, 3, 2, 1) for conv in (attn.conv_q, attn.conv_k, attn.conv_v)]
            for a, b in zip(products, separate):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
            for conv in (attn.conv_q, attn.conv_k, attn.conv_v):
                conv.conv.weight.add_(0.1 * torch.randn_like(conv.conv.weight))
                conv.conv.bias.add_(0.1)


def test_cached_decoding_through_the_matrix_products_equals_the_full_forward():
    """A model whose convolution QKV decodes through the matrix products (PyTorch step, threshold lowered)
    gives, token by token, the logits of the full forward."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=29, context_length=16, d_model=48, n_layers=2, n_heads=4, d_ff=96, qkv="conv",
                      qkv_modules=6)
    model = TransformerLM(cfg).eval()
    for block in model.blocks:
        block.attn.decode_path = "pytorch"
        block.attn.CONV_MATMUL_MIN_D_MODEL = 0
    idx = torch.randint(0, 29, (2, 9))
    with torch.no_grad():
        cache = model.new_cache()
        first, _ = model(idx[:, :4], cache=cache)
        steps = [model(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 9)]
        expected, _ = model(idx)
    torch.testing.assert_close(torch.cat([first] + steps, dim=1), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "multiplicative", "conv"])
@pytest.mark.parametrize("method", ["forward", "heads"])
def test_attention_input_of_the_wrong_rank_is_named(kind, method):
    attn = make_attention(ModelConfig(d_model=16, n_heads=2, qkv=kind, qkv_modules=4))
    with pytest.raises(ValueError, match=r"x must be a \(batch, time, d_model=16\) tensor, got .*\(5, 16\)"):
        getattr(attn, method)(torch.randn(5, 16))
