"""Mixture of Experts and Product-Key Memory (chapter 6): what the shared contract tests do not cover."""
import pytest
import torch

from sparse_tutorial.layers import MoEFF, ProductKeyMemory
from sparse_tutorial.model import TransformerLM, book_config


def test_pkm_product_search_finds_the_best_slots_of_all():
    torch.manual_seed(0)
    pkm = ProductKeyMemory(16, n_keys=9, top_k=4, heads=3, d_key=8).eval()
    x = torch.randn(50, 16)
    slot, scores = pkm.slots(x)                                     # (B, H, k)
    q = pkm.query(x).view(50, 3, 2, 4)
    full = (torch.einsum("bhd,hnd->bhn", q[:, :, 0], pkm.keys1).unsqueeze(-1)
            + torch.einsum("bhd,hnd->bhn", q[:, :, 1], pkm.keys2).unsqueeze(-2)).flatten(-2)  # all 81 slots
    want_scores, want_slots = full.topk(4, dim=-1)
    torch.testing.assert_close(scores, want_scores)
    assert torch.equal(slot.sort(-1).values, want_slots.sort(-1).values)


def test_pkm_reads_only_the_chosen_values():
    pkm = ProductKeyMemory(8, n_keys=6, top_k=2, heads=2, d_key=4)
    x = torch.randn(3, 8)
    pkm(x).sum().backward()
    touched = (pkm.values.grad.abs().sum(-1) > 0).sum().item()
    assert 0 < touched <= 3 * 2 * 2                                 # tokens x heads x top_k rows at most


def test_moe_sends_each_token_to_top_k_experts_with_gates_summing_to_one():
    torch.manual_seed(0)
    moe = MoEFF(16, 64, n_experts=4, top_k=2).eval()
    probs, experts, gates = moe.route(torch.randn(10, 16))
    assert experts.shape == (10, 2) and (experts[:, 0] != experts[:, 1]).all()
    torch.testing.assert_close(gates.sum(-1), torch.ones(10))
    x = torch.randn(1, 16)
    _, (e0, e1), (g0, g1) = (t[0] if t.dim() > 1 else t for t in moe.route(x))
    by_hand = g0 * moe._expert(e0.item(), x) + g1 * moe._expert(e1.item(), x)
    torch.testing.assert_close(moe(x), by_hand)


def test_moe_balance_loss_is_one_when_even_and_e_when_all_tokens_go_to_one_expert():
    moe = MoEFF(8, 32, n_experts=4)
    even_probs = torch.full((8, 4), 0.25)
    even_first = torch.arange(8).remainder(4).unsqueeze(-1)
    assert moe._balance_loss(even_probs, even_first).item() == pytest.approx(1.0)
    one = torch.zeros(8, 4)
    one[:, 2] = 1.0
    assert moe._balance_loss(one, torch.full((8, 1), 2)).item() == pytest.approx(4.0)


def test_moe_aux_loss_reaches_the_training_loss_and_is_none_in_eval():
    cfg = book_config("moe", vocab_size=20)
    model = TransformerLM(cfg).train()
    idx = torch.randint(0, 20, (2, 8))
    model(idx, idx)
    aux = [b.ff.aux_loss for b in model.blocks]
    assert all(a is not None and a.item() > 0 for a in aux)
    model.eval()
    model(idx, idx)
    assert all(b.ff.aux_loss is None for b in model.blocks)


@pytest.mark.parametrize("kwargs, message", [
    (dict(d_ff=30, n_experts=4), "d_ff must be divisible by n_experts"),
    (dict(top_k=5), "top_k must be at most n_experts=4"),
    (dict(router_noise=float("nan")), "router_noise must be a finite number"),
    (dict(n_experts=0), "n_experts must be a positive integer"),
])
def test_moe_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MoEFF(**{"d_model": 8, "d_ff": 32, **kwargs})


@pytest.mark.parametrize("kwargs, message", [
    (dict(top_k=7), "top_k must be at most n_keys=6"),
    (dict(d_key=5), "d_key must be even"),
    (dict(heads=0), "heads must be a positive integer"),
])
def test_pkm_bad_arguments_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ProductKeyMemory(**{"d_model": 8, "n_keys": 6, "top_k": 2, **kwargs})


def test_layer_width_verdicts_and_figure_come_from_the_numbers():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from sparse_tutorial.studies import relatives
    rows = [(256, "dense", 1.0, 1.0), (256, "moe", 0.8, 4.0), (256, "pkm", 0.5, 20.0),
            (1024, "dense", 1.0, 1.0), (1024, "moe", 2.0, 4.0), (1024, "pkm", 0.9, 40.0)]
    df = pd.DataFrame(rows, columns=["d_model", "kind", "speed-up", "bytes x"])
    moe, pkm = relatives.layer_width_verdicts(df)
    assert moe == "moe: faster than dense from d_model 1024; at d_model 1024 2.00x, 0.50 of the 4.0x its bytes allow."
    assert pkm.startswith("pkm: not faster than dense at any width measured; at d_model 1024 0.90x")
    fig = relatives.layer_width_figure(df)
    labels = [line.get_label() for line in fig.axes[0].lines]
    assert labels[:4] == ["moe: measured", "moe: bytes allow", "pkm: measured", "pkm: bytes allow"]
    plt.close(fig)
