"""The contract every registered layer kind keeps, run over the registry: a kind is tested the day it is added.

FF kinds (:data:`FF_KINDS`): ``decode`` equals the eval-mode ``forward`` for any leading shape; the model takes
the decode path exactly when the kind says it is cheaper; parameter counts are consistent; bad arguments raise
a ValueError that names them. Attention kinds (:data:`QKV_KINDS`): a cached call per piece equals the full
forward at every position; bad arguments raise a ValueError that names them. Whole models of every pair of
kinds are checked against step-by-step decoding in ``tests/test_cached_decoding.py``.
"""
from types import SimpleNamespace

import pytest
import torch

from sparse_tutorial.layers import FF_KINDS, QKV_KINDS, FeedForward, LayerCache, SelfAttention
from sparse_tutorial.model import Block, ModelConfig

D_MODEL = 32


def config(ff: str = "dense", qkv: str = "dense", **kw) -> ModelConfig:
    base = dict(vocab_size=29, context_length=24, d_model=D_MODEL, n_heads=4, n_layers=1, d_ff=64, ff_block_size=8,
                qkv_modules=4, ff=ff, qkv=qkv)
    base.update(kw)
    return ModelConfig(**base)


def perturbed(module: torch.nn.Module) -> torch.nn.Module:
    """``module`` in eval mode with every weight moved off its initial value (biases start at zero)."""
    torch.manual_seed(0)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return module.eval()


def bad(cfg: ModelConfig, **fields) -> SimpleNamespace:
    """The config's fields with some replaced, unchecked: what a factory would pass on to the layer."""
    return SimpleNamespace(**{**cfg.to_dict(), **fields})


# --------------------------------------------------------------------------------------------------
# FF kinds
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=sorted(FF_KINDS))
def ff_kind(request):
    return request.param


def test_ff_kind_implements_the_interface(ff_kind):
    layer = FF_KINDS[ff_kind](config(ff_kind))
    assert isinstance(layer, FeedForward)
    assert isinstance(type(layer).has_sparse_decode, bool)
    assert layer.d_model == D_MODEL
    assert layer.num_params() == sum(p.numel() for p in layer.parameters())
    assert 0 < layer.active_params_per_token() <= layer.num_params()


@pytest.mark.parametrize("lead", [(), (1,), (1, 1), (5,), (2, 3), (3, 20)])   # 60 rows: beyond any block size
def test_ff_decode_equals_eval_forward(ff_kind, lead):
    layer = perturbed(FF_KINDS[ff_kind](config(ff_kind)))
    x = torch.randn(*lead, D_MODEL)
    with torch.no_grad():
        want = layer(x)
        got = layer.decode(x)
    assert got.shape == want.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_block_takes_the_decode_path_exactly_when_the_kind_has_one(ff_kind, monkeypatch):
    block = perturbed(Block(config(ff_kind)))
    calls = []
    original = block.ff.decode
    monkeypatch.setattr(block.ff, "decode", lambda x: calls.append(x.shape) or original(x))
    x = torch.randn(2, 3, D_MODEL)
    with torch.no_grad():
        block.feed_forward(x)                          # eval, 6 rows <= the default limit
        block.sparse_decode_max_rows = 5
        block.feed_forward(x)                          # 6 rows > 5: forward
        block.train()
        block.sparse_decode_max_rows = 1 << 30
        block.feed_forward(x)                          # never in training
    assert calls == ([(2, 3, D_MODEL)] if block.ff.has_sparse_decode else [])


def test_ff_bad_input_names_the_width(ff_kind):
    layer = FF_KINDS[ff_kind](config(ff_kind)).eval()
    for call in (layer, layer.decode):
        with pytest.raises(ValueError, match=f"d_model={D_MODEL}"):
            call(torch.randn(2, D_MODEL + 1))


@pytest.mark.parametrize("field,value", [("d_model", 0), ("d_ff", 0), ("dropout", 1.0)])
def test_ff_bad_argument_is_named(ff_kind, field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        FF_KINDS[ff_kind](bad(config(ff_kind), **{field: value}))


# --------------------------------------------------------------------------------------------------
# Attention kinds
# --------------------------------------------------------------------------------------------------


@pytest.fixture(params=sorted(QKV_KINDS))
def qkv_kind(request):
    return request.param


def test_attention_kind_implements_the_interface(qkv_kind):
    assert isinstance(QKV_KINDS[qkv_kind](config(qkv=qkv_kind)), SelfAttention)


@pytest.mark.parametrize("pieces", [[12], [1] * 12, [5, 1, 1, 3, 2], [2, 7, 1, 2]])
def test_cached_attention_equals_full_forward_at_every_position(qkv_kind, pieces):
    attn = perturbed(QKV_KINDS[qkv_kind](config(qkv=qkv_kind)))
    x = torch.randn(2, sum(pieces), D_MODEL)
    cache, outs, start = LayerCache(), [], 0
    with torch.no_grad():
        full = attn(x, None)
        for n in pieces:
            outs.append(attn(x[:, start:start + n], cache))
            start += n
    assert cache.length == x.shape[1]
    err = (torch.cat(outs, dim=1) - full).abs().amax(dim=(0, 2))      # per position
    assert torch.all(err < 1e-5), f"max |cached - full| per position: {err.tolist()}"


def test_attention_bad_input_is_named(qkv_kind):
    attn = QKV_KINDS[qkv_kind](config(qkv=qkv_kind)).eval()
    for x in (torch.randn(2, 3, D_MODEL + 1), torch.randn(3, D_MODEL)):
        with pytest.raises(ValueError, match=r"x must be a \(batch, time, d_model=32\) tensor"):
            attn(x, None)


@pytest.mark.parametrize("field,value", [("d_model", 0), ("dropout", 1.0)])
def test_attention_bad_argument_is_named(qkv_kind, field, value):
    with pytest.raises(ValueError, match=f"{field}={value}"):
        QKV_KINDS[qkv_kind](bad(config(qkv=qkv_kind), **{field: value}))


def test_unknown_kinds_are_refused_with_the_registered_ones():
    with pytest.raises(ValueError, match=r"ff must be one of \[.*'sparse'.*\], got ff='bogus'"):
        config(ff="bogus")
    with pytest.raises(ValueError, match=r"qkv must be one of \[.*'conv'.*\], got qkv='reformer'"):
        config(qkv="reformer")
