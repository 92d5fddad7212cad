"""Checkpoints: round trip gives identical logits, a mismatched config is refused, train_or_load reuses."""
import pytest
import torch

from sparse_tutorial.checkpoint import (CheckpointMismatchError, CheckpointUnreadableError, checkpoint_path,
                                     load_checkpoint, save_checkpoint)
from sparse_tutorial.run import train_or_load
from sparse_tutorial.model import ModelConfig, TransformerLM
from sparse_tutorial.train import TrainConfig

from test_train import toy_data


def cfg(ff="sparse", **kw):
    base = dict(vocab_size=30, context_length=16, d_model=16, n_heads=2, n_layers=1, d_ff=32, ff_block_size=8,
                ff=ff)
    base.update(kw)
    return ModelConfig(**base)


TC = TrainConfig(steps=3, batch_size=2, eval_every=3, eval_batches=1)


@pytest.mark.parametrize("ff", ["dense", "sparse"])
def test_round_trip_gives_identical_logits(tmp_path, ff):
    model = TransformerLM(cfg(ff)).eval()
    path = save_checkpoint(model, TC, path=tmp_path / "m.pt")
    loaded, history = load_checkpoint(path, cfg(ff), TC)
    idx = torch.randint(0, 30, (2, 16))
    assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert history is None and not loaded.training
    assert [p.name for p in tmp_path.iterdir()] == ["m.pt"]  # no temporary file left behind


@pytest.mark.parametrize("other", [cfg(d_ff=64), cfg(ff="dense"), cfg(ff_block_size=4)])
def test_mismatched_model_config_is_refused(tmp_path, other):
    path = save_checkpoint(TransformerLM(cfg()), TC, path=tmp_path / "m.pt")
    with pytest.raises(CheckpointMismatchError, match="refusing to load"):
        load_checkpoint(path, other, TC)


def test_mismatched_train_config_is_refused_and_named(tmp_path):
    path = save_checkpoint(TransformerLM(cfg()), TC, path=tmp_path / "m.pt")
    with pytest.raises(CheckpointMismatchError, match=r"train\.steps: checkpoint has 3, requested 4"):
        load_checkpoint(path, cfg(), TrainConfig(steps=4, batch_size=2, eval_every=3, eval_batches=1))


def test_path_encodes_the_config(tmp_path):
    a, b = checkpoint_path(cfg(), TC, tmp_path), checkpoint_path(cfg(d_ff=64), TC, tmp_path)
    assert a != b and a.parent == tmp_path
    assert "sparseff" in a.name and "ff32" in a.name and "3steps" in a.name
    assert checkpoint_path(cfg(), TC, tmp_path) == a


def test_fields_added_later_keep_old_keys_at_their_defaults_and_count_when_set(tmp_path):
    """A checkpoint written before chapter 7's fields existed has the same key as one written now; setting one
    of them changes the key."""
    import hashlib
    import json

    from sparse_tutorial.checkpoint import LATER_FIELDS
    old_model = {k: v for k, v in cfg().to_dict().items() if k not in LATER_FIELDS}      # the key before them
    from sparse_tutorial.checkpoint import _layout
    old_key = {"model": old_model, "train": TC.to_dict(), "layout": {"parameters": _layout(cfg())}}
    digest = hashlib.sha1(json.dumps(old_key, sort_keys=True).encode()).hexdigest()[:10]
    assert checkpoint_path(cfg(), TC, tmp_path).name.endswith(f"-{digest}.pt")
    assert checkpoint_path(cfg(lsh_window=64), TC, tmp_path) != checkpoint_path(cfg(), TC, tmp_path)


def test_train_or_load_trains_once_then_loads(tmp_path):
    data = toy_data()
    c = cfg(vocab_size=len(data.vocab))
    m1, h1, loaded1 = train_or_load(c, TC, data, progress=False, folder=tmp_path)
    m2, h2, loaded2 = train_or_load(c, TC, data, progress=False, folder=tmp_path)
    assert (loaded1, loaded2) == (False, True)
    assert h1.equals(h2)
    idx = torch.randint(0, len(data.vocab), (1, 16))
    assert torch.equal(m1(idx)[0], m2(idx)[0])


def test_train_or_load_refuses_a_wrong_file_at_the_path(tmp_path):
    data = toy_data()
    c = cfg(vocab_size=len(data.vocab))
    wrong = TransformerLM(cfg(vocab_size=len(data.vocab), d_ff=64))
    save_checkpoint(wrong, TC, path=checkpoint_path(c, TC, tmp_path))
    with pytest.raises(CheckpointMismatchError):
        train_or_load(c, TC, data, progress=False, folder=tmp_path)


def test_checkpoint_from_an_older_model_layout_is_refused(tmp_path):
    """A file written when the code built other parameters is not loaded, even with an equal config."""
    path = save_checkpoint(TransformerLM(cfg()), TC, path=tmp_path / "m.pt")
    payload = torch.load(path, weights_only=True)
    payload["key"]["layout"]["parameters"] = "0" * 12
    torch.save(payload, path)
    with pytest.raises(CheckpointMismatchError, match="layout.parameters"):
        load_checkpoint(path, cfg(), TC)


# -- files that are not checkpoints: one clear error naming the file; train_or_load retrains ------------------

class _SideEffect:
    """Unpickling this runs ``Path.touch`` on a marker file: the side effect a safe loader must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        import pathlib
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def _write_bad(kind, path, c):
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        save_checkpoint(TransformerLM(c), TC, path=path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif kind == "garbage":
        path.write_bytes(b"this is not a checkpoint\n" * 40)
    elif kind == "tensor":
        torch.save(torch.zeros(3), path)
    elif kind == "bad-state":  # the right key, tensors of the wrong shapes
        save_checkpoint(TransformerLM(c), TC, path=path)
        payload = torch.load(path, weights_only=True)
        payload["state_dict"] = {k: torch.zeros(1) for k in payload["state_dict"]}
        torch.save(payload, path)


BAD_KINDS = ["empty", "truncated", "garbage", "tensor", "bad-state"]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_unreadable_file_gives_one_clear_error_naming_it(tmp_path, kind):
    path = tmp_path / "m.pt"
    _write_bad(kind, path, cfg())
    with pytest.raises(CheckpointUnreadableError) as err:
        load_checkpoint(path, cfg(), TC)
    msg = str(err.value)
    assert str(path) in msg and "retrain" in msg.lower() and "sparse_tutorial.train" in msg


def test_a_pickled_object_is_refused_and_never_run(tmp_path):
    marker = tmp_path / "side-effect-ran"
    path = tmp_path / "m.pt"
    torch.save({"key": {}, "state_dict": {}, "history": _SideEffect(marker)}, path)
    with pytest.raises(CheckpointUnreadableError, match="m.pt"):
        load_checkpoint(path, cfg(), TC)
    assert not marker.exists(), "loading ran code from the file"
    torch.load(path, weights_only=False)          # the plant is real: an unsafe load does run it
    assert marker.exists()


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_train_or_load_warns_retrains_and_replaces_an_unreadable_file(tmp_path, kind):
    data = toy_data()
    c = cfg(vocab_size=len(data.vocab))
    path = checkpoint_path(c, TC, tmp_path)
    _write_bad(kind, path, c)
    with pytest.warns(UserWarning, match="cannot be read"):
        _, _, loaded = train_or_load(c, TC, data, progress=False, folder=tmp_path)
    assert loaded is False
    load_checkpoint(path, c, TC)                   # replaced by a good checkpoint
    assert [p.name for p in tmp_path.iterdir()] == [path.name]
    assert train_or_load(c, TC, data, progress=False, folder=tmp_path)[2] is True
