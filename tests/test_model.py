"""TransformerLM basics the later chapters rely on: config errors, context limits, the FF path choice."""
import pytest
import torch

from sparse_tutorial.layers import SparseFF
from sparse_tutorial.model import ModelConfig, TransformerLM


def tiny(ff="sparse", **kw):
    base = dict(vocab_size=11, context_length=16, d_model=16, n_heads=2, n_layers=2, d_ff=64, ff_block_size=8, ff=ff)
    base.update(kw)
    return ModelConfig(**base)


@pytest.mark.parametrize(
    "kw,needle",
    [
        (dict(ff="bogus"), "ff='bogus'"),
        (dict(qkv="reformer"), "qkv='reformer'"),
        (dict(d_model=15), "d_model=15, n_heads=2"),
        (dict(d_ff=60), "d_ff=60, ff_block_size=8"),
        (dict(n_layers=0), "n_layers=0"),
        (dict(dropout=1.0), "dropout=1.0"),
    ],
)
def test_bad_config_is_refused(kw, needle):
    with pytest.raises(ValueError) as err:
        tiny(**kw)
    assert needle in str(err.value)


def test_forward_beyond_context_is_refused_with_advice():
    model = TransformerLM(tiny()).eval()
    with pytest.raises(ValueError, match="context_length=16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    cache = model.new_cache()
    model(torch.zeros(1, 10, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="10 cached \\+ 7 new"):
        model(torch.zeros(1, 7, dtype=torch.long), cache=cache)


def test_generate_argument_errors():
    model = TransformerLM(tiny()).eval()
    idx = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="max_new_tokens=-1"):
        model.generate(idx, -1)
    with pytest.raises(ValueError, match="temperature=0"):
        model.generate(idx, 2, temperature=0)
    with pytest.raises(ValueError, match="shape \\(3,\\)"):
        model.generate(torch.zeros(3, dtype=torch.long), 2)


def test_sparse_decode_path_is_chosen_by_token_count(monkeypatch):
    model = TransformerLM(tiny()).eval()
    calls = []
    original = SparseFF.decode

    def spy(self, x):
        calls.append(x.shape[0] * x.shape[1])
        return original(self, x)

    monkeypatch.setattr(SparseFF, "decode", spy)
    idx = torch.randint(0, 11, (2, 5))
    model.sparse_decode_max_rows = 4
    model(idx[:, :1])                    # 2 rows <= 4: sparse decode in both layers
    assert calls == [2, 2]
    calls.clear()
    model(idx)                           # 10 rows > 4: dense-masked path
    assert calls == []
    model.train()
    model(idx[:, :1])                    # never in training
    assert calls == []
    with pytest.raises(ValueError, match="-1"):
        model.sparse_decode_max_rows = -1


def test_both_ff_paths_give_the_same_logits():
    model = TransformerLM(tiny()).eval()
    idx = torch.randint(0, 11, (3, 9))
    with torch.no_grad():
        model.sparse_decode_max_rows = 0
        dense_path, _ = model(idx)
        model.sparse_decode_max_rows = 10_000
        sparse_path, _ = model(idx)
    torch.testing.assert_close(sparse_path, dense_path, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kw,needle", [
    (dict(ff="dense", d_lowrank=0), "d_lowrank=0"), (dict(ff="dense", d_lowrank=2.5), "d_lowrank=2.5"),
    (dict(ff="dense", controller="magic"), "controller='magic'"),
    (dict(ff="sparse", controller=["lowrank"]), "controller=['lowrank']"),
])
def test_model_config_checks_controller_fields_whatever_the_ff_kind(kw, needle):
    with pytest.raises(ValueError) as err:
        tiny(**kw)
    assert needle in str(err.value)


@pytest.mark.parametrize("kw,needle", [(dict(top_k=0), "top_k=0"), (dict(top_k=-1), "top_k=-1"),
                                       (dict(top_k=2.5), "top_k=2.5"),
                                       (dict(temperature=float("nan")), "temperature=nan"),
                                       (dict(temperature="1"), "temperature='1'")])
def test_generate_sampling_arguments_are_named(kw, needle):
    model = TransformerLM(tiny()).eval()
    with pytest.raises(ValueError) as err:
        model.generate(torch.zeros(1, 3, dtype=torch.long), 2, **kw)
    assert needle in str(err.value)


@pytest.mark.parametrize("qkv", ["dense", "multiplicative", "conv"])
def test_a_new_batch_size_against_a_filled_cache_is_named(qkv):
    model = TransformerLM(tiny(qkv=qkv, qkv_modules=4)).eval()
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 3, dtype=torch.long), cache=cache)
        with pytest.raises(ValueError, match=r"batch of 1 sequences, got a batch of 2; use a new cache"):
            model(torch.zeros(2, 1, dtype=torch.long), cache=cache)
        assert cache.length == 3
        model(torch.zeros(1, 1, dtype=torch.long), cache=cache)   # the cache is still usable
    assert cache.length == 4
