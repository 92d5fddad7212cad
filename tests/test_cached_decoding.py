"""Cached, step-by-step decoding gives the logits of a full forward, for every registered FF kind and QKV kind."""
import itertools

import pytest
import torch

from sparse_tutorial.layers import FF_KINDS, QKV_KINDS
from sparse_tutorial.model import ModelConfig, TransformerLM

KINDS = list(itertools.product(sorted(FF_KINDS), sorted(QKV_KINDS)))   # every registered pair


def make_model(ff: str, qkv: str, context_length: int = 16) -> TransformerLM:
    cfg = ModelConfig(vocab_size=29, context_length=context_length, d_model=32, n_heads=4, n_layers=2, d_ff=64,
                      ff=ff, ff_block_size=8, qkv=qkv, qkv_modules=4)
    torch.manual_seed(0)
    model = TransformerLM(cfg)
    with torch.no_grad():  # move every weight off its initial value (biases start at zero)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


@torch.no_grad()
def cached_logits(model: TransformerLM, idx: torch.Tensor, prefill: int) -> torch.Tensor:
    cache = model.new_cache()
    outs = [model(idx[:, :prefill], cache=cache)[0]]
    for t in range(prefill, idx.shape[1]):
        outs.append(model(idx[:, t:t + 1], cache=cache)[0])
    assert cache.length == idx.shape[1]
    return torch.cat(outs, dim=1)  # (B, T, vocab)


@pytest.mark.parametrize("ff,qkv", KINDS)
@pytest.mark.parametrize("batch,prefill,max_rows", [(1, 1, 1), (1, 6, 1), (3, 1, 1), (3, 4, 1), (3, 4, 10_000)])
def test_cached_steps_equal_full_forward(ff, qkv, batch, prefill, max_rows):
    model = make_model(ff, qkv)
    model.sparse_decode_max_rows = max_rows  # large: the batched sparse decode path also runs the prefill
    idx = torch.randint(0, 29, (batch, 16))
    with torch.no_grad():
        full, _ = model(idx)
    step = cached_logits(model, idx, prefill)
    assert step.shape == full.shape
    err = (step - full).abs().amax(dim=(0, 2))  # per position
    assert torch.all(err < 1e-4), f"max |cached - full| per position: {err.tolist()}"


@pytest.mark.parametrize("ff,qkv", KINDS)
@pytest.mark.parametrize("max_rows,prefill_uses_decode", [(1, False), (None, True)])
def test_sparse_decode_path_is_used_for_single_tokens(ff, qkv, max_rows, prefill_uses_decode, monkeypatch):
    """The step calls of kinds with a cheaper decode path (SparseFF) go through it (otherwise the test above would
    not test it).

    With ``sparse_decode_max_rows = 1`` the prompt (3 tokens) takes the dense-masked path and only the
    single-token steps decode sparsely; with the default rule (chapter 5) the prompt decodes sparsely too.
    """
    model = make_model(ff, qkv)
    if max_rows is not None:
        model.sparse_decode_max_rows = max_rows
    calls = []
    for block in model.blocks:
        original = block.ff.decode
        monkeypatch.setattr(block.ff, "decode", lambda x, f=original: calls.append(x.shape) or f(x))
    cached_logits(model, torch.randint(0, 29, (1, 6)), prefill=3)
    per_layer = 3 + (1 if prefill_uses_decode else 0)
    sparse = model.blocks[0].ff.has_sparse_decode
    if ff in ("dense", "sparse"):                                      # the book's two kinds say what they are
        assert sparse == (ff == "sparse")
    assert len(calls) == (per_layer * model.cfg.n_layers if sparse else 0)
    if sparse:
        assert sorted({shape[1] for shape in calls}) == ([1, 3] if prefill_uses_decode else [1])


@pytest.mark.parametrize("ff,qkv", KINDS)
def test_greedy_generate_with_and_without_cache_agree_past_the_context(ff, qkv):
    model = make_model(ff, qkv, context_length=12)
    prompt = torch.randint(0, 29, (2, 5))
    fast = model.generate(prompt, 30, greedy=True, use_cache=True)      # slides the window 23 times
    slow = model.generate(prompt, 30, greedy=True, use_cache=False)
    assert fast.shape == (2, 35)
    assert torch.equal(fast, slow)


@pytest.mark.parametrize("qkv", ["dense", "conv"])
def test_sampled_generate_with_and_without_cache_agree(qkv):
    model = make_model("sparse", qkv, context_length=12)
    prompt = torch.randint(0, 29, (2, 3))
    a = model.generate(prompt, 20, temperature=0.8, top_k=10, generator=torch.Generator().manual_seed(1))
    b = model.generate(prompt, 20, temperature=0.8, top_k=10, use_cache=False,
                       generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b)


@pytest.mark.parametrize("ff,qkv", KINDS)
def test_logits_after_a_truncate_equal_the_full_forward(ff, qkv):
    """Decode past position 6, roll the cache back to 6, decode other tokens: as if the first ones never came."""
    model = make_model(ff, qkv)
    torch.manual_seed(1)
    idx = torch.randint(0, 29, (2, 12))
    other = torch.randint(0, 29, (2, 6))
    with torch.no_grad():
        cache = model.new_cache()
        model(idx, cache=cache)                                  # 12 positions cached
        for layer in cache.layers:
            layer.truncate(6)
        steps = [model(other[:, t:t + 1], cache=cache)[0] for t in range(other.shape[1])]
        expected, _ = model(torch.cat([idx[:, :6], other], dim=1))
    torch.testing.assert_close(torch.cat(steps, dim=1), expected[:, 6:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("qkv", sorted(QKV_KINDS))
def test_a_model_built_under_inference_mode_runs(qkv):
    with torch.inference_mode():
        model = make_model("sparse", qkv).eval()
        idx = torch.randint(0, 29, (1, 5))
        out = model.generate(idx, 3, greedy=True)
        logits, _ = model(idx)
    assert out.shape == (1, 8) and torch.isfinite(logits).all()
