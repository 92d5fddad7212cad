"""LSH self-attention, after the Reformer: each query attends to a few recent keys that hash to its bucket.

Shapes in comments: ``B`` batch, ``T`` new tokens in this call, ``P`` tokens already in the cache, ``S = P + T``,
``C = d_model``, ``H`` heads, ``hd = C / H``, ``R`` hash rounds (``n_hashes``), ``w`` the window.

**What hashing buys.** Dense attention scores every query against every earlier key: ``T^2`` numbers a head.
Softmax weights are dominated by the few keys most similar to the query, so the Reformer only scores keys
that are *likely* similar: a random rotation ``R`` of the key, followed by ``argmax([xR, -xR])``, puts
vectors at a small angle into the same bucket with high probability (locality-sensitive hashing). Sorting the
positions by bucket makes every bucket a contiguous run; cutting the sorted sequence into chunks of ``w``
and letting each chunk attend to itself and the previous chunk costs ``T * 2w`` scores per round, so
``O(T * w * n_hashes)`` memory and time instead of ``O(T^2)``. Several rounds with independent rotations
lower the chance that a similar key is missed by all of them.

**Why shared QK.** Hashing the queries and the keys separately would put a query and "its" key into
different buckets even when their dot product is large. The Reformer uses one projection for both: the key
is the query, L2-normalised per head, so a query and the keys it should find hash alike.

**The definition this layer computes.** In round ``r`` the query at position ``t`` attends to itself and to the
most recent ``window`` earlier positions (``< t``) whose key has its bucket in that round. The keys attended
are the *union* over the rounds (a key found by two rounds counts once); the scores are ``q . k / sqrt(hd)``
over that union, a softmax, times the values. Every key a query sees lies in its past, and which ones it sees
depends only on the past (the buckets of earlier keys and their order), so the output at ``t`` does not change
when tokens are appended: the layer is causal and prefix-consistent, and cached decoding gives exactly the
full forward's outputs.

**Fixed rotations.** The Reformer draws fresh rotations at every call. Here they are drawn once, from a
generator with a fixed seed, and kept as a buffer: a checkpoint stores them, and a decoding step hashes a new
key exactly as the forward that produced the cache did (there is nothing random to replay).

**The efficient forward** (:func:`lsh_attention`). Per round, positions are stably sorted by (bucket,
position); inside a bucket the positions are contiguous and in order, so "the most recent ``window``
same-bucket keys" are the sorted slots ``j - window .. j - 1`` of the same bucket, all inside the query's
chunk or the previous one. A pair found by several rounds would be counted several times when the rounds'
results are combined; as the Reformer does, each score is lowered by ``log(count)`` (``count`` = the rounds
that attend that pair) and the rounds' partial softmaxes are combined with their log-sum-exps, which gives the
softmax over the union exactly. Cached decoding (:meth:`LSHSelfAttention.forward` with a cache) computes the
same definition directly: a decoding step gathers the at most ``n_hashes * (window + 1)`` keys it attends, and
several new tokens after a cache use a mask over the cached and new keys (small ``T``).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .._checks import positive_int, probability
from .attention import LayerCache, check_attention_input

__all__ = ["LSHSelfAttention", "lsh_buckets", "lsh_attention", "ROTATION_SEED"]

#: seed of the generator that draws the fixed random rotations
ROTATION_SEED = 0


def lsh_buckets(k: torch.Tensor, rotations: torch.Tensor) -> torch.Tensor:
    """Bucket of every key in every round: ``argmax([kR, -kR])``.

    k: ``(B, H, T, hd)``; rotations: ``(H, R, hd, n_buckets / 2)``. Returns ``(B, H, R, T)`` integers in
    ``[0, n_buckets)``.
    """
    proj = torch.einsum("bhtd,hrdn->bhrtn", k, rotations.to(k.dtype))       # (B, H, R, T, n_buckets/2)
    return torch.cat([proj, -proj], dim=-1).argmax(dim=-1)


def _rank_in_bucket(buckets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort positions by (bucket, position) per round; return the order and each position's rank in its bucket.

    buckets: ``(..., T)``. Returns ``order`` ``(..., T)`` (the position in each sorted slot) and ``rank``
    ``(..., T)`` (by position: how many earlier positions share its bucket in that round).
    """
    T = buckets.shape[-1]
    pos = torch.arange(T, device=buckets.device)
    order = (buckets * T + pos).argsort(dim=-1)                             # keys are distinct: the sort is stable
    sorted_b = buckets.gather(-1, order)
    slot = pos.expand_as(order)
    first = torch.ones_like(sorted_b, dtype=torch.bool)                     # slot opens a bucket's run
    first[..., 1:] = sorted_b[..., 1:] != sorted_b[..., :-1]
    start = torch.where(first, slot, torch.zeros_like(slot)).cummax(dim=-1).values  # first slot of the run
    rank = torch.empty_like(order).scatter_(-1, order, slot - start)         # sorted slot -> position
    return order, rank


def lsh_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, buckets: torch.Tensor, window: int,
                  dropout_p: float = 0.0, stats: dict | None = None) -> torch.Tensor:
    """Causal LSH attention of a whole sequence in ``O(T * window * R)`` memory (see the module docstring).

    q, k, v: ``(B, H, T, hd)``; buckets: ``(B, H, R, T)`` (:func:`lsh_buckets` of ``k``). Returns ``(B, H, T, hd)``.
    ``stats``, when given, receives ``score_shape``: the shape of the score tensor built, ``(B, H, R, T/w, w, 2w)``.
    """
    B, H, T, hd = q.shape
    R, w = buckets.shape[2], window
    n_chunks = -(-T // w)
    pad = n_chunks * w - T                                                   # slots past the end of the sequence
    order, rank = _rank_in_bucket(buckets)                                   # (B, H, R, T) each

    def sort(x: torch.Tensor, fill) -> torch.Tensor:
        """``x`` ``(B, H, T, X)`` in each round's sorted order, ``w`` slots of ``fill`` in front and ``pad`` behind:
        ``(B, H, R, w + T + pad, X)``."""
        idx = order.unsqueeze(-1).expand(-1, -1, -1, -1, x.shape[-1])
        x = x.unsqueeze(2).expand(-1, -1, R, -1, -1).gather(3, idx)
        return F.pad(x, (0, 0, w, pad), value=fill)

    def chunks(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Padded sorted ``(B, H, R, w + n_chunks w, X)`` -> queries' chunks ``(..., n_chunks, w, X)`` and the keys
        each chunk sees, the previous chunk then its own ``(..., n_chunks, 2w, X)``."""
        x = x.unflatten(3, (n_chunks + 1, w))
        return x[:, :, :, 1:], torch.cat([x[:, :, :, :-1], x[:, :, :, 1:]], dim=-2)

    # Every round's bucket and rank of each position, in each round's sorted order: the round's own (for the mask)
    # and all rounds' (to count the rounds that attend a pair). Padding slots get bucket -1: they match no key.
    info = torch.stack([buckets, rank], dim=-1).transpose(2, 3).flatten(-2)   # (B, H, T, 2R): b_0, rank_0, b_1, ...
    info_q, info_k = chunks(sort(info, -1))                                  # (B, H, R, nc, w|2w, 2R)
    qc, _ = chunks(sort(q, 0.0))                                             # (B, H, R, nc, w, hd)
    _, kc = chunks(sort(k, 0.0))                                             # (B, H, R, nc, 2w, hd)
    _, vc = chunks(sort(v, 0.0))

    scores = (qc @ kc.transpose(-1, -2)) / math.sqrt(hd)                     # (B, H, R, nc, w, 2w)
    if stats is not None:
        stats["score_shape"] = tuple(scores.shape)

    def attended(r: int) -> torch.Tensor:
        """Pairs that round ``r`` attends: same bucket, key at most ``w`` ranks before the query (or the query)."""
        same = info_q[..., 2 * r, None] == info_k[..., None, :, 2 * r]      # (B, H, R, nc, w, 2w)
        back = info_q[..., 2 * r + 1, None] - info_k[..., None, :, 2 * r + 1]
        return same & (info_q[..., 2 * r, None] >= 0) & (back >= 0) & (back <= w)

    found = [attended(r) for r in range(R)]
    count = sum(f.to(scores.dtype) for f in found)                           # rounds that attend each pair
    own = torch.stack([found[r][:, :, r] for r in range(R)], dim=2)         # the pairs each round itself found
    scores = (scores - count.clamp(min=1).log()).masked_fill(~own, torch.finfo(scores.dtype).min)
    lse = scores.logsumexp(dim=-1, keepdim=True)                             # (B, H, R, nc, w, 1)
    p = F.dropout((scores - lse).exp(), dropout_p) if dropout_p else (scores - lse).exp()
    out = (p @ vc).flatten(3, 4)[:, :, :, :T]                                # (B, H, R, T, hd) in sorted order
    lse = lse.flatten(3, 5)[:, :, :, :T]                                     # (B, H, R, T)

    # Back to positions (slot of position t = its sorted index), then the rounds combined by their weights.
    slot = torch.empty_like(order).scatter_(-1, order, torch.arange(T, device=q.device).expand_as(order))
    out = out.gather(3, slot.unsqueeze(-1).expand(-1, -1, -1, -1, hd))
    lse = lse.gather(3, slot)
    weight = (lse - lse.logsumexp(dim=2, keepdim=True)).exp()                # (B, H, R, T): round's share of the sum
    return (weight.unsqueeze(-1) * out).sum(dim=2)                           # (B, H, T, hd)


def _cached_mask(buckets: torch.Tensor, past: int, window: int) -> torch.Tensor:
    """Which of the ``S`` keys each of the ``T`` new queries attends, by the definition, directly.

    buckets: ``(B, H, S, R)`` of every position so far (the new ones last). Returns ``(B, H, T, S)`` booleans.
    """
    S = buckets.shape[-2]
    T = S - past
    causal = torch.ones(T, S, dtype=torch.bool, device=buckets.device).tril(diagonal=past)   # (T, S)
    same = (buckets[:, :, past:, None, :] == buckets[:, :, None, :, :]) & causal[:, :, None]  # (B, H, T, S, R)
    seen = same.cumsum(dim=-2)                                              # same-bucket keys in [0, j]
    between = seen[..., -1:, :] - seen                                       # ... in (j, t]: the rank difference
    return (same & (between <= window)).any(dim=-1)


def _recent_index(buckets: torch.Tensor, n_buckets: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each bucket's most recent ``window + 1`` positions, for decoding in a time that does not grow with ``S``.

    buckets: ``(B, H, S, R)`` of every cached position. Returns ``recent`` ``(B, H, R, n_buckets, window + 1)``
    (positions, -1 where a bucket has fewer; position ``p`` of a bucket sits in slot ``rank(p) % (window + 1)``)
    and ``count`` ``(B, H, R, n_buckets)`` (positions per bucket so far).
    """
    B, H, S, R = buckets.shape
    w1 = window + 1
    b = buckets.transpose(2, 3)                                              # (B, H, R, S)
    _, rank = _rank_in_bucket(b)                                             # (B, H, R, S)
    count = torch.zeros(B, H, R, n_buckets, dtype=torch.long, device=b.device).scatter_add_(
        -1, b, torch.ones_like(b))
    last = rank >= count.gather(-1, b) - w1                                  # among its bucket's newest w + 1
    recent = torch.full((B, H, R, n_buckets * w1), -1, dtype=torch.long, device=b.device)
    pos = torch.arange(S, device=b.device).expand_as(b)
    slot = torch.where(last, b * w1 + rank % w1, n_buckets * w1)             # the others go to a spare slot
    recent = F.pad(recent, (0, 1)).scatter_(-1, slot, pos)[..., :-1]
    return recent.view(B, H, R, n_buckets, w1), count


def _step_keys(recent: torch.Tensor, count: torch.Tensor, new: torch.Tensor, position: int
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Add one new position (buckets ``new`` ``(B, H, R)``) to the index and return the keys it attends.

    In each round the query sees the most recent ``window + 1`` positions of its bucket, itself included; the
    rounds' lists are merged and a key found twice is kept once. Returns ``index`` ``(B, H, K)`` (sorted positions)
    and ``keep`` ``(B, H, K)`` (False: none or a repeat), ``K = R (window + 1)``: the same work after 100 tokens
    as after 100,000. ``recent`` and ``count`` are updated in place.
    """
    w1 = recent.shape[-1]
    slot = count.gather(-1, new.unsqueeze(-1)) % w1                          # (B, H, R, 1)
    flat = recent.flatten(-2)                                                # (B, H, R, n_buckets * w1), a view
    flat.scatter_(-1, new.unsqueeze(-1) * w1 + slot, position)
    count.scatter_add_(-1, new.unsqueeze(-1), torch.ones_like(slot))
    mine = recent.gather(3, new[..., None, None].expand(-1, -1, -1, 1, w1))  # (B, H, R, 1, w1)
    index = mine.flatten(2).sort(dim=-1).values                             # (B, H, R * w1)
    keep = index >= 0
    keep[..., 1:] &= index[..., 1:] != index[..., :-1]
    return index.clamp(min=0), keep


class LSHSelfAttention(nn.Module):
    """Causal LSH self-attention with shared QK (see the module docstring for the definition).

    One projection gives the queries (the keys are the queries L2-normalised per head), one the values, and an
    output projection follows. ``rotations`` ``(H, n_hashes, hd, n_buckets / 2)`` is a persistent buffer of
    fixed random rotations. With a cache, ``cache.state["lsh_buckets"]`` ``(B, H, P, n_hashes)`` keeps every
    cached position's buckets beside its key and value (rolled back with them by :meth:`LayerCache.truncate`).
    ``last_score_shape`` is the shape of the score tensor of the last full forward (the chapter prints it).
    """

    def __init__(self, d_model: int, n_heads: int, n_hashes: int = 2, n_buckets: int = 8, window: int = 32,
                 dropout: float = 0.0):
        super().__init__()
        self.d_model = positive_int("d_model", d_model)
        self.n_heads = positive_int("n_heads", n_heads)
        if d_model % n_heads:
            raise ValueError(f"d_model must be divisible by n_heads, got d_model={d_model}, n_heads={n_heads}")
        self.n_hashes = positive_int("n_hashes", n_hashes)
        self.n_buckets = self.even_buckets("n_buckets", n_buckets)
        self.window = positive_int("window", window)
        self.dropout = probability("dropout", dropout)
        self.head_dim = hd = d_model // n_heads
        self.qv = nn.Linear(d_model, 2 * d_model)      # weight (2C, C): queries (= unnormalised keys) and values
        self.proj = nn.Linear(d_model, d_model)
        self.resid_dropout = nn.Dropout(self.dropout)
        # Drawn on the CPU from a seeded generator (the same numbers on every machine), then moved to where the
        # weights are: the meta device when a config is checked, a GPU when the model is built there.
        g = torch.Generator().manual_seed(ROTATION_SEED)
        rotations = torch.randn(n_heads, n_hashes, hd, n_buckets // 2, generator=g, device="cpu")
        self.register_buffer("rotations", rotations.to(self.qv.weight.device))
        self.last_score_shape: tuple[int, ...] | None = None

    @staticmethod
    def even_buckets(name: str, value) -> int:
        """``value`` when it is an even integer >= 2 (rotations give ``n/2`` projections and their negatives)."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 2 or value % 2:
            raise ValueError(f"{name} must be an even integer >= 2, got {name}={value!r}")
        return value

    def heads(self, x: torch.Tensor, cache: LayerCache | None = None) -> tuple[torch.Tensor, ...]:
        """Q, K, V for the new tokens, each ``(B, H, T, hd)``; K is Q normalised per head."""
        B, T, C = check_attention_input(x, self.d_model)
        q, v = (t.view(B, T, self.n_heads, self.head_dim).transpose(1, 2) for t in self.qv(x).split(C, dim=-1))
        return q, F.normalize(q, dim=-1), v

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, T, C = check_attention_input(x, self.d_model)
        q, k, v = self.heads(x)                                              # 3 x (B, H, T, hd)
        buckets = lsh_buckets(k, self.rotations)                             # (B, H, R, T)
        dropout_p = self.dropout if self.training else 0.0
        past = 0 if cache is None else cache.length
        if cache is not None:
            every = cache.extend_state("lsh_buckets", buckets.transpose(2, 3))  # (B, H, P+T, R)
            k_all, v_all = cache.append(k, v)                                # (B, H, P+T, hd)
        if past == 0:                                                        # a whole sequence: sorted chunks
            stats: dict = {}
            y = lsh_attention(q, k, v, buckets, self.window, dropout_p, stats)
            self.last_score_shape = stats["score_shape"]
            if cache is not None:                                            # a prefill: index it for decoding
                cache.state["lsh_recent"], cache.state["lsh_count"] = _recent_index(every, self.n_buckets,
                                                                                    self.window)
                cache.state["lsh_index_length"] = T
        elif T == 1:                                                         # a decoding step: gather its keys
            st = cache.state
            if st.get("lsh_index_length") != past:                           # (re)build after a prefill or truncate
                st["lsh_recent"], st["lsh_count"] = _recent_index(every[:, :, :past], self.n_buckets, self.window)
            index, keep = _step_keys(st["lsh_recent"], st["lsh_count"], buckets[..., 0], past)  # (B, H, K)
            st["lsh_index_length"] = past + 1
            at = index.unsqueeze(-1).expand(-1, -1, -1, self.head_dim)
            y = F.scaled_dot_product_attention(q, k_all.gather(2, at), v_all.gather(2, at),
                                               attn_mask=keep.unsqueeze(2), dropout_p=dropout_p)
        else:                                                                # new tokens after a cache: a mask
            mask = _cached_mask(every, past, self.window)                    # (B, H, T, P+T)
            y = F.scaled_dot_product_attention(q, k_all, v_all, attn_mask=mask, dropout_p=dropout_p)
        y = y.transpose(1, 2).reshape(B, T, C)
        return self.resid_dropout(self.proj(y))

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, n_heads={self.n_heads}, n_hashes={self.n_hashes}, "
                f"n_buckets={self.n_buckets}, window={self.window}")
