"""Training loop and CLI: shapes, a few steps lower the loss for both FF kinds, the CLI's last line."""
import io
from contextlib import redirect_stdout

import pandas as pd
import pytest
import torch

from sparse_tutorial.data import CharVocab, TextData
from sparse_tutorial.model import ModelConfig, TransformerLM
from sparse_tutorial.run import main
from sparse_tutorial.train import TrainConfig, compare_step_times, estimate_loss, train_lm


def toy_data() -> TextData:
    """A small, very predictable corpus: a repeated sentence."""
    text = "the quick brown fox jumps over the lazy dog. " * 60
    vocab = CharVocab(text)
    ids = torch.tensor(vocab.encode(text))
    n = int(len(ids) * 0.9)
    return TextData(vocab, ids[:n], ids[n:])


def tiny(ff: str, vocab: int) -> ModelConfig:
    return ModelConfig(vocab_size=vocab, context_length=16, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                       ff_block_size=8, ff=ff)


@pytest.mark.parametrize("ff", ["dense", "sparse"])
def test_forward_shapes(ff):
    model = TransformerLM(tiny(ff, 11))
    idx = torch.randint(0, 11, (3, 16))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 16, 11)
    assert loss.shape == () and torch.isfinite(loss)
    logits, loss = model(idx[:, :5])
    assert logits.shape == (3, 5, 11) and loss is None


@pytest.mark.parametrize("ff", ["dense", "sparse"])
def test_a_few_steps_lower_the_loss(ff):
    data = toy_data()
    torch.manual_seed(0)
    model = TransformerLM(tiny(ff, len(data.vocab)))
    before = estimate_loss(model, data, batch_size=8, batches=4)
    tc = TrainConfig(steps=40, batch_size=8, lr=3e-3, warmup_steps=5, eval_every=20, eval_batches=4)
    history = train_lm(model, data, tc, progress=False)
    after = estimate_loss(model, data, batch_size=8, batches=4)
    assert list(history.columns) == ["step", "train_loss", "val_loss", "lr", "sec_per_step"]
    assert history["step"].tolist() == [20, 40]
    assert after["train"] < before["train"] - 0.5, (before, after)
    assert after["val"] < before["val"] - 0.5, (before, after)
    assert not model.training


def test_train_config_refuses_bad_values():
    with pytest.raises(ValueError, match="steps=0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="lr=-1"):
        TrainConfig(lr=-1)


def test_compare_step_times_table():
    data = toy_data()
    cfgs = {"dense": tiny("dense", len(data.vocab)), "sparse": tiny("sparse", len(data.vocab))}
    table = compare_step_times(cfgs, data, TrainConfig(batch_size=4), steps=3, warmup=1, progress=False)
    assert isinstance(table, pd.DataFrame)
    assert (table["IQR / median"] >= 0).all() and table["IQR / median"].notna().all()
    assert table["model"].tolist() == ["dense", "sparse"]
    assert (table["seconds per step"] > 0).all()
    assert table["ratio to dense"].iloc[0] == 1.0
    with pytest.raises(ValueError, match="steps=0"):
        compare_step_times(cfgs, data, TrainConfig(), steps=0)


@pytest.mark.parametrize("ff", ["dense", "sparse"])
def test_cli_last_line_is_the_val_loss(shared_data, ff):
    out = io.StringIO()
    with redirect_stdout(out):
        val = main(["--ff", ff, "--steps", "2", "--batch-size", "2", "--no-progress"])
    last = out.getvalue().strip().splitlines()[-1]
    assert last == f"final val loss {val:.4f}"
    assert 0 < val < 10


def test_cli_block_size_reaches_the_model(shared_data, monkeypatch):
    import sparse_tutorial.run as run_mod

    seen = []
    real = run_mod.train_lm
    monkeypatch.setattr(run_mod, "train_lm", lambda model, *a, **k: seen.append(model.cfg) or real(model, *a, **k))
    with redirect_stdout(io.StringIO()):
        main(["--ff", "sparse", "--block-size", "8", "--steps", "1", "--batch-size", "2", "--no-progress"])
    assert seen[0].ff_block_size == 8


def test_cli_bad_block_size_is_refused(shared_data):
    with pytest.raises(ValueError, match="ff_block_size"):
        main(["--ff", "sparse", "--block-size", "7", "--steps", "1", "--no-progress"])


@pytest.mark.parametrize("kw,needle", [
    (dict(grad_clip=-1), "grad_clip=-1"), (dict(grad_clip=float("nan")), "grad_clip=nan"),
    (dict(warmup_steps=-5), "warmup_steps=-5"), (dict(warmup_steps=2.5), "warmup_steps=2.5"),
    (dict(min_lr_ratio=1.5), "min_lr_ratio=1.5"), (dict(min_lr_ratio=-0.1), "min_lr_ratio=-0.1"),
    (dict(weight_decay=-0.1), "weight_decay=-0.1"), (dict(lr=float("nan")), "lr=nan"), (dict(lr="1e-3"), "lr='1e-3'"),
])
def test_train_config_refuses_values_that_would_train_wrongly(kw, needle):
    with pytest.raises(ValueError) as err:
        TrainConfig(**kw)
    assert needle in str(err.value)


def test_train_config_accepts_the_edges():
    TrainConfig(grad_clip=0, warmup_steps=0, min_lr_ratio=0.0, weight_decay=0.0)
    TrainConfig(min_lr_ratio=1.0)
