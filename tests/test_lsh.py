"""LSH self-attention (chapter 7): the chunked forward computes the windowed-bucket definition exactly.

The reference below is the definition written the slow way, ``O(T^2)``: for each query and round, the query
itself and the ``window`` most recent earlier keys of its bucket; the union over rounds; a softmax over it.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_tutorial.layers import LayerCache, LSHSelfAttention
from sparse_tutorial.layers.lsh import lsh_attention, lsh_buckets
from sparse_tutorial.model import ModelConfig


def reference_mask(buckets: torch.Tensor, window: int) -> torch.Tensor:
    """``(B, H, T, T)`` booleans: which keys each query attends, by the definition (Python loops)."""
    B, H, R, T = buckets.shape
    mask = torch.zeros(B, H, T, T, dtype=torch.bool)
    for b in range(B):
        for h in range(H):
            for t in range(T):
                mask[b, h, t, t] = True
                for r in range(R):
                    same = [j for j in range(t) if buckets[b, h, r, j] == buckets[b, h, r, t]]
                    for j in same[-window:] if window else []:
                        mask[b, h, t, j] = True
    return mask


def reference_attention(q, k, v, buckets, window):
    """Softmax of ``q . k / sqrt(hd)`` over the reference mask, times the values."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~reference_mask(buckets, window), float("-inf"))
    return scores.softmax(dim=-1) @ v


def perturbed(layer: torch.nn.Module) -> torch.nn.Module:
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return layer.eval()


def layer(d_model=16, n_heads=2, **kw) -> LSHSelfAttention:
    torch.manual_seed(0)
    return perturbed(LSHSelfAttention(d_model, n_heads, **kw))


def test_one_bucket_and_a_wide_window_is_full_causal_attention():
    attn = layer(n_hashes=1, n_buckets=2, window=16)
    attn.rotations.zero_()                       # every projection 0: argmax picks bucket 0 for every key
    x = torch.randn(2, 13, 16)
    with torch.no_grad():
        got = attn(x)
        q, v = (t.view(2, 13, 2, 8).transpose(1, 2) for t in attn.qv(x).split(16, dim=-1))
        y = F.scaled_dot_product_attention(q, F.normalize(q, dim=-1), v, is_causal=True)
        want = attn.proj(y.transpose(1, 2).reshape(2, 13, 16))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@settings(max_examples=25, deadline=None)
@given(T=st.integers(1, 19), window=st.integers(1, 7), n_hashes=st.integers(1, 3), n_buckets=st.integers(1, 6),
       seed=st.integers(0, 2**16))
def test_chunked_attention_equals_the_reference(T, window, n_hashes, n_buckets, seed):
    """Random buckets (few: long runs, many windows cut): T < window, T a multiple of it or not."""
    g = torch.Generator().manual_seed(seed)
    q, v = torch.randn(2, 2, T, 4, generator=g), torch.randn(2, 2, T, 4, generator=g)
    k = F.normalize(q, dim=-1)
    buckets = torch.randint(0, n_buckets, (2, 2, n_hashes, T), generator=g)
    got = lsh_attention(q, k, v, buckets, window)
    torch.testing.assert_close(got, reference_attention(q, k, v, buckets, window), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,window,n_hashes,n_buckets", [(5, 8, 2, 4), (16, 4, 2, 4), (23, 5, 3, 2), (30, 3, 1, 8)])
def test_layer_equals_the_reference_through_its_own_hashing(T, window, n_hashes, n_buckets):
    attn = layer(n_hashes=n_hashes, n_buckets=n_buckets, window=window)
    x = torch.randn(2, T, 16)
    with torch.no_grad():
        q, k, v = attn.heads(x)
        buckets = torch.stack([torch.cat([k @ R, -(k @ R)], dim=-1).argmax(dim=-1)          # (B, H, T) a round
                               for R in attn.rotations.unbind(1)], dim=2)                     # R: (H, hd, n/2)
        y = reference_attention(q, k, v, buckets, window)
        want = attn.proj(y.transpose(1, 2).reshape(2, T, 16))
        got = attn(x)
    assert len(buckets.unique()) > 1                                   # the hashing really splits the keys
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_earlier_outputs_do_not_change_when_tokens_are_appended():
    attn = layer(n_hashes=2, n_buckets=4, window=3)
    x = torch.randn(2, 20, 16)
    with torch.no_grad():
        full = attn(x)
        for t in (1, 3, 7, 12, 19):
            torch.testing.assert_close(attn(x[:, :t]), full[:, :t], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pieces", [[1] * 24, [5] + [1] * 19, [7, 3, 1, 9, 4]])
def test_cached_decoding_equals_the_full_forward_at_every_position(pieces):
    attn = layer(n_hashes=2, n_buckets=4, window=3)
    x = torch.randn(2, sum(pieces), 16)
    cache, outs, start = LayerCache(), [], 0
    with torch.no_grad():
        full = attn(x)
        for n in pieces:
            outs.append(attn(x[:, start:start + n], cache))
            start += n
    assert cache.length == x.shape[1]
    assert cache.state["lsh_buckets"].shape[:2] == (2, 2) and cache.state["lsh_buckets"].shape[-1] == 2  # (B, H, _, R)
    err = (torch.cat(outs, dim=1) - full).abs().amax(dim=(0, 2))
    assert torch.all(err < 1e-5), f"max |cached - full| per position: {err.tolist()}"


def test_scores_grow_with_t_times_window_not_t_squared():
    attn = LSHSelfAttention(16, 2, n_hashes=2, n_buckets=8, window=32)
    T = 4096
    with torch.no_grad():
        y = attn(torch.randn(1, T, 16))
    assert y.shape == (1, T, 16) and torch.isfinite(y).all()
    assert attn.last_score_shape == (1, 2, 2, T // 32, 32, 64)       # (B, H, R, chunks, w, 2w)
    assert math.prod(attn.last_score_shape) == 2 * 2 * T * 64         # 1 M numbers, where T^2 a head and round is 67 M


def test_rotations_are_fixed_and_kept_in_the_state_dict():
    a, b = LSHSelfAttention(16, 2), LSHSelfAttention(16, 2)
    assert "rotations" in a.state_dict() and a.rotations.shape == (2, 2, 8, 4)
    assert torch.equal(a.rotations, b.rotations)
    k = F.normalize(torch.randn(1, 2, 50, 8), dim=-1)
    assert lsh_buckets(k, a.rotations).shape == (1, 2, 2, 50)


def test_gradients_flow_and_training_dropout_changes_only_training():
    attn = LSHSelfAttention(16, 2, window=4, dropout=0.5)
    x = torch.randn(2, 9, 16, requires_grad=True)
    attn.train()
    attn(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    attn.eval()
    with torch.no_grad():
        torch.testing.assert_close(attn(x), attn(x))


@pytest.mark.parametrize("kw,needle", [
    (dict(n_buckets=3), "n_buckets=3"),
    (dict(n_buckets=0), "n_buckets=0"),
    (dict(window=0), "window=0"),
    (dict(n_hashes=0), "n_hashes=0"),
    (dict(d_model=15), "d_model=15, n_heads=2"),
])
def test_bad_arguments_are_named(kw, needle):
    args = dict(d_model=16, n_heads=2) | kw
    with pytest.raises(ValueError, match=needle):
        LSHSelfAttention(**args)


@pytest.mark.parametrize("field,value,needle", [
    ("lsh_buckets", 3, "lsh_buckets must be an even integer >= 2, got lsh_buckets=3"),
    ("lsh_window", 0, "lsh_window=0"),
    ("lsh_hashes", 0, "lsh_hashes=0"),
])
def test_bad_config_fields_are_named(field, value, needle):
    with pytest.raises(ValueError, match=needle):
        ModelConfig(d_model=16, n_heads=2, qkv="lsh", **{field: value})


def test_a_decoding_step_reads_a_fixed_number_of_keys_whatever_the_context():
    from sparse_tutorial.layers.lsh import _recent_index, _step_keys
    torch.manual_seed(0)
    for S in (50, 500):
        buckets = torch.randint(0, 4, (1, 2, S, 3))                         # (B, H, S, R)
        recent, count = _recent_index(buckets[:, :, :-1], 4, window=5)
        index, keep = _step_keys(recent, count, buckets[:, :, -1], S - 1)
        assert index.shape == (1, 2, 3 * 6)                                 # R (window + 1), not S
        # the rebuilt index of all S positions equals the one updated step by step
        again, n = _recent_index(buckets, 4, window=5)
        assert torch.equal(again.sort(-1).values, recent.sort(-1).values) and torch.equal(n, count)
