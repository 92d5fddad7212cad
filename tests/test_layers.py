"""SparseFF and DenseFF: the decode path, the block structure, training behaviour and argument errors."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_tutorial import DenseFF, SparseFF
from sparse_tutorial.measure.costs import bytes_limit_ratio, dense_ff_cost, sparse_ff_cost


@st.composite
def sparse_ff_case(draw):
    block_size = draw(st.integers(1, 16))
    n_blocks = draw(st.integers(1, 12))
    d_model = draw(st.integers(1, 48))
    d_lowrank = draw(st.one_of(st.none(), st.integers(1, 16)))
    controller = draw(st.sampled_from(["lowrank", "full", "mlp"]))
    lead = draw(st.lists(st.integers(1, 4), min_size=0, max_size=3))
    seed = draw(st.integers(0, 2**31 - 1))
    return block_size, n_blocks, d_model, d_lowrank, controller, tuple(lead), seed


@settings(max_examples=60, deadline=None)
@given(sparse_ff_case())
def test_decode_equals_eval_forward(case):
    block_size, n_blocks, d_model, d_lowrank, controller, lead, seed = case
    torch.manual_seed(seed)
    ff = SparseFF(d_model, block_size * n_blocks, block_size, d_lowrank, controller=controller).eval()
    with torch.no_grad():
        ff.b2.normal_()  # a non-zero bias must be added exactly once on both paths
    x = torch.randn(*lead, d_model)
    with torch.no_grad():
        dense = ff(x)
        sparse = ff.decode(x)
    assert sparse.shape == dense.shape == (*lead, d_model)
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("d_model,d_ff,block_size", [(1024, 4096, 64), (256, 2048, 32)])
def test_decode_equals_eval_forward_at_realistic_width(d_model, d_ff, block_size):
    ff = SparseFF(d_model, d_ff, block_size).eval()
    for batch in (1, 3):
        x = torch.randn(batch, d_model)
        with torch.no_grad():
            torch.testing.assert_close(ff.decode(x), ff(x), atol=1e-5, rtol=1e-5)


def test_exactly_one_active_unit_per_block_in_eval():
    ff = SparseFF(32, 96, 8).eval()
    x = torch.randn(50, 32)
    mask = ff.mask(x)                                    # (50, 12, 8)
    assert mask.shape == (50, 12, 8)
    assert torch.equal(mask.sum(-1), torch.ones(50, 12))
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    idx = ff.selected(x)                                 # (50, 12)
    assert idx.shape == (50, 12)
    # selected unit b lies in block b, and it is the one the mask switches on
    assert torch.equal(idx // 8, torch.arange(12).expand(50, 12))
    assert torch.equal(mask.flatten(-2).argmax(-1, keepdim=True), idx[:, :1])
    on = mask.flatten(-2).nonzero()[:, 1].view(50, 12)
    assert torch.equal(on, idx)


def test_hidden_activation_has_at_most_one_nonzero_per_block():
    ff = SparseFF(16, 64, 16).eval()
    x = torch.randn(40, 16)
    h = torch.relu((x @ ff.w1.T).view(40, 4, 16) * ff.mask(x))
    assert ((h != 0).sum(-1) <= 1).all()


def test_training_gradients_reach_weights_and_controller():
    ff = SparseFF(16, 64, 8, d_lowrank=4).train()
    seen_hard = seen_soft = False
    for _ in range(40):
        ff.zero_grad()
        ff(torch.randn(10, 16)).pow(2).sum().backward()
        seen_hard |= ff.last_mask_hard is True
        seen_soft |= ff.last_mask_hard is False
        for name, p in ff.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"no gradient reached {name}"
    assert seen_hard and seen_soft


def test_hard_mask_values_are_one_hot_and_soft_mask_is_softmax():
    ff = SparseFF(16, 64, 8).train()
    x = torch.randn(5, 16)
    for _ in range(30):
        m = ff.mask(x)
        if ff.last_mask_hard:
            assert torch.allclose(m.sum(-1), torch.ones(5, 8))
            assert torch.allclose(m.max(-1).values, torch.ones(5, 8))
        else:
            torch.testing.assert_close(m, torch.softmax(ff.block_logits(x), -1))


def test_hard_soft_mix_happens_at_the_stated_rate():
    ff = SparseFF(8, 32, 4).train()
    x = torch.randn(2, 8)
    n = 4000
    hard = 0
    for _ in range(n):
        ff.mask(x)
        hard += ff.last_mask_hard
    rate = hard / n
    # 0.3 +- 5 standard deviations of a binomial proportion (sd ~ 0.0072)
    assert abs(rate - 0.3) < 0.036, rate


def test_gumbel_noise_scale_zero_picks_the_argmax():
    ff = SparseFF(8, 32, 4, hard_prob=1.0, noise_scale=0.0).train()
    x = torch.randn(20, 8)
    m = ff.mask(x)
    assert torch.equal(m.detach().argmax(-1), ff.block_logits(x).argmax(-1))


def test_the_training_draw_samples_softmax_of_logits_over_the_noise_scale():
    """The draw inverts the in-block CDF of softmax(logits / noise_scale) with one uniform number per block."""
    ff = SparseFF(4, 8, 4, hard_prob=1.0, noise_scale=0.5)
    logits = torch.tensor([[1.0, 0.0, -1.0, 0.5], [0.0, 0.0, 2.0, 0.0]]).expand(40000, 2, 4)
    torch.manual_seed(0)
    choice = ff._sample(logits)                                          # (40000, 2)
    q = torch.softmax(logits[0] / 0.5, dim=-1)                           # (2, 4)
    freq = torch.stack([torch.bincount(choice[:, b], minlength=4) for b in range(2)]) / 40000
    assert (freq - q).abs().max() < 5 * (0.25 / 40000) ** 0.5           # 5 standard deviations at most
    torch.manual_seed(0)                                                 # the same draws as counting cdf < u
    cdf = torch.softmax(logits / 0.5, dim=-1).cumsum(-1)
    u = torch.rand(40000, 2, 1)
    counted = (cdf < u).sum(-1).clamp_max(3)
    assert (counted == choice).float().mean() > 0.999                    # cumsum and matmul round differently


def test_unselected_units_get_no_gradient_through_w1_with_hard_mask():
    ff = SparseFF(8, 32, 8, hard_prob=1.0).train()
    x = torch.randn(1, 8)
    torch.manual_seed(3)
    ff(x).sum().backward()
    rows_with_grad = (ff.w1.grad.abs().sum(-1) > 0).nonzero().flatten()
    assert len(rows_with_grad) <= ff.n_blocks


def test_gradient_reaching_the_hard_mask_is_that_of_the_mask_before_the_relu():
    """``relu((x W1) * m)``: the mask's gradient is ``relu'(a) a dL/dh`` at the chosen unit of a block and 0 at the
    others (relu'(0) = 0). Masking after the ReLU, ``relu(a) * m``, would send ``relu(a) dL/dh`` to every unit,
    chosen or not, and so to the controller of units that never ran."""
    torch.manual_seed(3)
    ff = SparseFF(8, 32, 4, hard_prob=1.0).train()
    ff.train_path = "pytorch"                 # the readable path, whose mask this test sees (tests/test_fused_train.py
    x, g = torch.randn(6, 8), torch.randn(6, 8)  # checks the fused path's gradients against it)
    seen = {}
    mask = ff.mask

    def keep(x):
        m = mask(x)
        m.retain_grad()
        seen["m"] = m
        return m

    ff.mask = keep                                                     # the same call, its mask kept
    (ff(x) * g).sum().backward()
    m = seen["m"]                                                      # (6, n_blocks, block_size), one-hot
    assert ff.last_mask_hard and torch.equal(m.sum(-1), torch.ones(6, ff.n_blocks))
    a = (x @ ff.w1.detach().T).unflatten(-1, (ff.n_blocks, ff.block_size))   # x W1 per block
    dh = (g @ ff.w2.detach().T).unflatten(-1, (ff.n_blocks, ff.block_size))  # dL/d relu(...)
    before = torch.where(m > 0, (a > 0) * a * dh, torch.zeros(()))
    after = torch.relu(a) * dh
    torch.testing.assert_close(m.grad, before)
    assert (before - after).abs().max() > 1e-3                         # the two orders are told apart here


def test_dense_ff_matches_formula():
    ff = DenseFF(12, 40).eval()
    x = torch.randn(3, 7, 12)
    expected = torch.relu(x @ ff.w1.weight.T + ff.w1.bias) @ ff.w2.weight.T + ff.w2.bias
    torch.testing.assert_close(ff(x), expected)
    torch.testing.assert_close(ff.decode(x), expected)


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(d_model=16, d_ff=100, block_size=16), "d_ff=100, block_size=16"),
        (dict(d_model=0, d_ff=64, block_size=16), "d_model=0"),
        (dict(d_model=16, d_ff=-64, block_size=16), "d_ff=-64"),
        (dict(d_model=16, d_ff=64, block_size=0), "block_size=0"),
        (dict(d_model=16, d_ff=64, block_size=16, d_lowrank=0), "d_lowrank=0"),
        (dict(d_model=16, d_ff=64, block_size=16, d_lowrank=-3), "d_lowrank=-3"),
        (dict(d_model=16, d_ff=64, block_size=16, dropout=1.5), "dropout=1.5"),
        (dict(d_model=16, d_ff=64, block_size=16, controller="magic"), "controller='magic'"),
        (dict(d_model=2.5, d_ff=64, block_size=16), "d_model=2.5"),
    ],
)
def test_bad_arguments_raise_value_error_naming_them(kwargs, needle):
    with pytest.raises(ValueError) as err:
        SparseFF(**kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize("method", ["forward", "decode", "selected"])
def test_wrong_input_width_is_rejected(method):
    ff = SparseFF(16, 64, 16).eval()
    with pytest.raises(ValueError, match=r"d_model=16.*\(3, 15\)"):
        getattr(ff, method)(torch.randn(3, 15))


def test_dense_ff_bad_arguments():
    with pytest.raises(ValueError, match="d_ff=0"):
        DenseFF(8, 0)
    with pytest.raises(ValueError, match=r"d_model=8"):
        DenseFF(8, 16)(torch.randn(2, 9))


def test_default_d_lowrank_is_number_of_blocks():
    assert SparseFF(32, 256, 16).d_lowrank == 16


def test_cost_model_matches_the_reference_example():
    # d=1024, d_ff=4096, N=64, d_lowrank=64: about 18x fewer multiply-adds
    dense = dense_ff_cost(1024, 4096).macs
    sparse = sparse_ff_cost(1024, 4096, 64, 64).macs
    assert dense == 2 * 1024 * 4096
    assert sparse == 1024 * 64 + 64 * 4096 + 2 * 1024 * 64
    assert 17.5 < dense / sparse < 18.5
    assert bytes_limit_ratio(4096, 16384, 64, 128) > 25


@pytest.mark.parametrize("chunk_rows", [1, 3, 7, 1000])
def test_decode_gathers_w1_rows_in_chunks_exactly(chunk_rows):
    """One token's selected W1 rows are gathered a chunk at a time into a reused buffer; any chunk size is exact."""
    ff = SparseFF(16, 64, 4).eval()                                  # 16 selected rows per token
    ff.GATHER_CHUNK_BYTES = chunk_rows * 16 * 4
    for _ in range(3):                                               # the buffer is reused across calls
        x = torch.randn(1, 16)
        with torch.no_grad():
            torch.testing.assert_close(ff.decode(x), ff(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("controller", ["lowrank", "full", "mlp"])
def test_active_params_per_token_match_the_cost_formulas(controller):
    ff = SparseFF(24, 96, 8, 6, controller=controller)
    assert ff.active_params_per_token() == sparse_ff_cost(24, 96, 8, 6, controller).weight_params
    assert ff.num_params() > ff.active_params_per_token()
    dense = DenseFF(24, 96)
    assert dense.active_params_per_token() == dense.num_params() == dense_ff_cost(24, 96).weight_params


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(noise_scale=float("nan")), "noise_scale=nan"),
        (dict(noise_scale="0.1"), "noise_scale='0.1'"),
        (dict(noise_scale=-0.5), "noise_scale=-0.5"),
        (dict(hard_prob=float("nan")), "hard_prob=nan"),
        (dict(hard_prob="0.3"), "hard_prob='0.3'"),
        (dict(hard_prob=1.5), "hard_prob=1.5"),
    ],
)
def test_selection_arguments_nan_or_strings_raise_value_error_naming_them(kwargs, needle):
    with pytest.raises(ValueError) as err:
        SparseFF(8, 32, 4, **kwargs)
    assert needle in str(err.value)


@pytest.mark.parametrize("method", ["forward", "decode", "selected"])
@pytest.mark.parametrize("shape", [(16,), (3, 16)])
def test_input_of_another_dtype_is_refused_naming_both(method, shape):
    ff = SparseFF(16, 64, 16).eval()
    with pytest.raises(ValueError, match=r"x has dtype torch.float64 but the layer's weights are torch.float32"):
        getattr(ff, method)(torch.randn(*shape, dtype=torch.float64))
    ff64 = SparseFF(16, 64, 16).double().eval()            # the advice works: the layer converted
    assert getattr(ff64, method)(torch.randn(*shape, dtype=torch.float64)).dtype in (torch.float64, torch.int64)


def test_two_threads_decoding_with_one_layer_get_their_own_results():
    """decode's one-token path gathers W1 rows into a scratch buffer: each thread must have its own."""
    import threading

    torch.manual_seed(0)
    ff = SparseFF(256, 4096, 4).eval()
    xs = [torch.randn(256), torch.randn(256)]
    with torch.no_grad():
        expected = [ff.decode(x) for x in xs]
    errors, start = [], threading.Barrier(2)

    def work(i):
        start.wait()
        with torch.no_grad():
            for _ in range(300):
                if not torch.equal(ff.decode(xs[i]), expected[i]):
                    errors.append(i)
                    return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, f"thread(s) {errors} got another thread's rows"


# -- scale_by_prob: the reference's multiply_by_controller_output ----------------------------------------------


@settings(max_examples=40, deadline=None)
@given(sparse_ff_case())
def test_scale_by_prob_decode_equals_eval_forward(case):
    block_size, n_blocks, d_model, d_lowrank, controller, lead, seed = case
    torch.manual_seed(seed)
    ff = SparseFF(d_model, block_size * n_blocks, block_size, d_lowrank, controller=controller,
                  scale_by_prob=True).eval()
    x = torch.randn(*lead, d_model)
    with torch.no_grad():
        torch.testing.assert_close(ff.decode(x), ff(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("tokens", [1, 5, 40])     # one token, few tokens, more tokens than block_size (8)
def test_scale_by_prob_scales_each_chosen_unit_by_its_probability(tokens):
    torch.manual_seed(0)
    ff = SparseFF(16, 64, 8, scale_by_prob=True).eval()
    plain = SparseFF(16, 64, 8).eval()
    plain.load_state_dict(ff.state_dict())
    x = torch.randn(tokens, 16)
    with torch.no_grad():
        p = torch.softmax(ff.block_logits(x), -1)                    # (tokens, 8 blocks, 8)
        chosen = p.max(-1).values.flatten()                           # (tokens * 8,)
        h_plain = torch.relu(x @ ff.w1.t()).view(tokens, 8, 8) * plain.mask(x)
        expected = (h_plain * p).flatten(-2) @ ff.w2 + ff.b2
        torch.testing.assert_close(ff(x), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ff.decode(x), expected, atol=1e-5, rtol=1e-5)
        mask = ff.mask(x).flatten()
        torch.testing.assert_close(mask[mask != 0], chosen)           # the chosen unit carries its probability
        assert not torch.allclose(ff(x), plain(x))                   # and the option changes the output


def test_scale_by_prob_hard_training_call_gives_the_controller_a_gradient_through_the_value():
    torch.manual_seed(0)
    ff = SparseFF(16, 64, 8, scale_by_prob=True, hard_prob=1.0).train()
    x = torch.randn(6, 16)
    m = ff.mask(x)
    assert ff.last_mask_hard
    assert torch.equal((m > 0).sum(-1), torch.ones(6, 8, dtype=torch.long))   # one unit per block
    p = torch.softmax(ff.block_logits(x), -1)
    torch.testing.assert_close(m[m > 0], p[m > 0])                              # the chosen unit's probability
    ff(x).square().sum().backward()
    assert ff.controller.c2.bias.grad.abs().sum() > 0


def test_scale_by_prob_must_be_a_bool():
    with pytest.raises(ValueError, match=r"scale_by_prob.*'yes'"):
        SparseFF(16, 64, 8, scale_by_prob="yes")
