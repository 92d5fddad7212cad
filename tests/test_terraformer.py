"""Chapter 7's parts: reversible streams, the SRU branch, the multiplicative output layer ("sparse loss")."""
import pytest
import torch

from sparse_tutorial.layers.reversible import ReversibleStack, reversible_forward
from sparse_tutorial.layers.sru import SRU, SRUBranch, sru_scan
from sparse_tutorial.measure.memory import saved_activation_bytes
from sparse_tutorial.model import ModelConfig, TransformerLM


def cfg(**kw):
    base = dict(vocab_size=30, context_length=24, d_model=16, n_heads=2, n_layers=3, d_ff=32, ff_block_size=8)
    base.update(kw)
    return ModelConfig(**base)


def grads_of(model, idx, seed):
    model.zero_grad()
    torch.manual_seed(seed)
    _, loss = model(idx, idx)
    loss.backward()
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("ff", ["dense", "sparse"])
@pytest.mark.parametrize("extra", [{}, dict(sru_dim=4, loss_modules=4, dropout=0.1)])
def test_reversible_gradients_equal_those_of_the_same_stack_with_ordinary_autograd(ff, extra):
    torch.manual_seed(0)
    model = TransformerLM(cfg(ff=ff, reversible=True, **extra)).train()
    idx = torch.randint(0, 30, (3, 24))
    loss_saving, g_saving = grads_of(model, idx, seed=5)          # the sparse FF's draws replayed in backward
    model.memory_saving = False
    loss_plain, g_plain = grads_of(model, idx, seed=5)
    assert loss_saving == loss_plain
    assert g_saving.keys() == g_plain.keys() and len(g_plain) == len(list(model.parameters()))
    for name, g in g_plain.items():
        torch.testing.assert_close(g_saving[name], g, rtol=1e-4, atol=1e-5, msg=name)


def test_the_inputs_are_rebuilt_from_the_outputs_almost_exactly():
    torch.manual_seed(0)
    model = TransformerLM(cfg(ff="sparse", reversible=True)).eval()
    subs = model.reversible_sublayers()
    x = torch.randn(2, 24, 16)
    with torch.no_grad():
        p, q = reversible_forward(subs, x, x)
        for f in reversed(subs):                                    # (p, q) = (b, a + F(b)) -> (a, b)
            p, q = q - f(p), p
    assert (p - x).abs().max() < 1e-5 and (q - x).abs().max() < 1e-5


def test_reversible_activation_memory_does_not_grow_with_depth():
    idx = torch.randint(0, 30, (4, 24))
    plain, saving = [], []
    for layers in (2, 4, 8):
        for rev, out in ((False, plain), (True, saving)):
            model = TransformerLM(cfg(ff="sparse", n_layers=layers, reversible=rev)).train()
            out.append(saved_activation_bytes(model, idx, idx))
    assert saving[0] == saving[1] == saving[2]
    assert plain[0] < plain[1] < plain[2] and saving[0] < plain[0]


def test_a_reversible_stack_needs_each_sublayers_parameters():
    with pytest.raises(ValueError, match="params"):
        ReversibleStack([lambda x: x])


def test_sru_scan_is_the_recurrence_and_pieces_give_the_whole():
    torch.manual_seed(0)
    f, x = torch.rand(2, 7, 3), torch.randn(2, 7, 3)
    c, want = torch.zeros(2, 3), []
    for t in range(7):
        c = f[:, t] * c + (1 - f[:, t]) * x[:, t]
        want.append(c)
    torch.testing.assert_close(sru_scan(f, x), torch.stack(want, 1))
    branch = SRUBranch(8, 4)
    u = torch.randn(2, 7, 8)
    state: dict = {}
    pieces = torch.cat([branch(u[:, :3], state), branch(u[:, 3:4], state), branch(u[:, 4:], state)], 1)
    torch.testing.assert_close(pieces, branch(u), rtol=1e-5, atol=1e-6)
    h, c_last = SRU(4)(torch.randn(1, 5, 4))
    assert h.shape == (1, 5, 4) and c_last.shape == (1, 4)


@pytest.mark.parametrize("extra", [dict(sru_dim=4), dict(reversible=True, sru_dim=4, loss_modules=4),
                                   dict(reversible=True, ff="sparse")])
def test_cached_decoding_equals_the_full_forward_with_the_new_parts(extra):
    torch.manual_seed(0)
    model = TransformerLM(cfg(**extra)).eval()
    idx = torch.randint(0, 30, (2, 20))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache()
        steps = [model(idx[:, :5], cache=cache)[0]] + [model(idx[:, t:t + 1], cache=cache)[0] for t in range(5, 20)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-5)
    out = model.generate(idx[:, :4], 8, greedy=True)
    assert torch.equal(out, model.generate(idx[:, :4], 8, greedy=True, use_cache=False))


def test_the_multiplicative_output_layer_has_the_formula_parameters_and_the_vocabulary_width():
    d, vocab, s = 16, 30, 4
    model = TransformerLM(cfg(loss_modules=s))
    padded = 32                                                        # 30 rounded up to a multiple of S = 4
    assert sum(p.numel() for p in model.head.parameters()) == s * d + d * (padded // s) + padded
    from sparse_tutorial.layers import MultiplicativeDense
    assert isinstance(model.head, MultiplicativeDense)                  # not the tied dense head
    assert isinstance(TransformerLM(cfg()).head, torch.nn.Linear)
    logits, _ = model(torch.randint(0, vocab, (2, 5)))
    assert logits.shape == (2, 5, vocab)


@pytest.mark.parametrize("kw,needle", [(dict(reversible=1), "reversible=1"), (dict(sru_dim=0), "sru_dim=0"),
                                       (dict(loss_modules=31), "loss_modules"), (dict(loss_modules=2.0), "loss_modules"),
                                       (dict(reversible=True, ff="moe"), "moe")])
def test_bad_chapter_7_options_are_named(kw, needle):
    with pytest.raises(ValueError, match=needle):
        cfg(**kw)


def test_terraformer_config_turns_every_part_on_and_accepts_overrides():
    from sparse_tutorial.model import terraformer_config
    c = terraformer_config(vocab_size=30, context_length=40)
    assert (c.ff, c.qkv, c.reversible, c.vocab_size, c.context_length) == ("sparse", "lsh", True, 30, 40)
    assert c.sru_dim and c.loss_modules
    model = TransformerLM(c).eval()
    idx = torch.randint(0, 30, (1, 12))
    with torch.no_grad():
        full, _ = model(idx)
        cache = model.new_cache()
        steps = torch.cat([model(idx[:, :4], cache=cache)[0]] +
                          [model(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 12)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-4, atol=1e-5)


def test_long_benchmarks_give_one_row_per_length_and_model(capsys, tmp_path):
    import json

    from sparse_tutorial import bench
    att = bench.attention_lengths([16, 40], d_model=16, n_heads=2, window=8, repeats=1, progress=False)
    assert att["T"].tolist() == [16, 40]
    assert att["full scores MB"].iloc[1] == 4 * 2 * 40 * 41 / 2 / 1e6
    assert att["LSH scores MB"].iloc[1] == 4 * 2 * 2 * 40 * 2 * 8 / 1e6
    assert (att["LSH speed-up"] == att["full ms"] / att["LSH ms"]).all()
    dec = bench.long_decode([8, 16], d_model=32, n_layers=1, new_tokens=2, repeats=1, progress=False)
    assert dec["variant"].tolist() == list(bench.LONG_VARIANTS) * 2 and dec["P"].tolist() == [8] * 4 + [16] * 4
    assert (dec[dec["variant"] == "dense"]["speed-up"] == 1).all()
    assert bench.long_config("Terraformer").reversible and bench.long_config("LSH attention").qkv == "lsh"
    with pytest.raises(ValueError, match="variant"):
        bench.long_decode([8], ["gpu"])
    status = bench.main(["long", "--context", "8", "--variants", "dense", "Terraformer", "--new-tokens", "1",
                         "--repeats", "1", "--json", "--out-dir", str(tmp_path), "--threads", "1"])
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert status == 0 and [r["variant"] for r in rows] == ["dense", "Terraformer"]


def test_long_context_study_helpers_read_their_numbers():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from sparse_tutorial.studies import long_context as lc
    depth = lc.memory_by_depth([1, 2], batch=2, vocab_size=30, context_length=16, d_model=16, n_heads=2, d_ff=32,
                               ff_block_size=8, ff="sparse")
    assert depth["reversible / shallowest"].tolist() == [1.0, 1.0] and depth["ordinary / shallowest"].iloc[1] > 1.5
    plt.close(lc.memory_figure(depth))
    att = pd.DataFrame({"T": [64, 128, 256], "full ms": [1.0, 3.0, 9.0], "LSH ms": [2.0, 2.5, 3.0],
                        "full scores MB": [1, 2, 3], "LSH scores MB": [1, 1, 1]})
    att["LSH speed-up"] = att["full ms"] / att["LSH ms"]
    assert lc.crossover_sentence(att).startswith("In this run LSH attention was faster than full attention "
                                                 "from T = 128 on, and at every longer length measured")
    slow = att.assign(**{"LSH speed-up": [0.5, 0.6, 0.7]})
    assert "not faster than full attention at any length" in lc.crossover_sentence(slow)
    for f in (lc.attention_scaling_figure(att), lc.attention_figure(att, 128)):
        plt.close(f)
    dec = pd.DataFrame({"P": [8, 8, 64, 64], "variant": ["dense", "T", "dense", "T"],
                        "ms per token": [1.0, 0.5, 4.0, 0.5], "speed-up": [1.0, 2.0, 1.0, 8.0]})
    assert lc.decode_sentences(dec) == ["In this run, T: 2.00x dense's speed per token after 8 tokens, 8.00x after 64."]
    plt.close(lc.decode_figure(dec))
    with pytest.raises(ValueError, match="label"):
        lc.long_run_config("bert", 30)
