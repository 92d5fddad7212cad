"""The quality study (chapter 3, "Closing the gap"): its command, its CSV, resuming, the gap table, the levers."""
from __future__ import annotations

import pandas as pd
import pytest
import torch

from sparse_tutorial.data import TextData
from sparse_tutorial.layers import SparseFF
from sparse_tutorial.model import TransformerLM, book_config
from sparse_tutorial.studies import gap, quality
from sparse_tutorial.train import TrainConfig, book_train_config, hard_prob_at, train_lm
from test_train import toy_data


@pytest.fixture
def tiny_text() -> TextData:
    """The small corpus of the training tests (no data folder needed)."""
    return toy_data()


@pytest.fixture
def tiny_study(tmp_path, tiny_text, monkeypatch):
    """The study on the tiny corpus of conftest (fast mode), writing to a temporary CSV."""
    monkeypatch.setattr(gap, "load_tiny_shakespeare", lambda: tiny_text)
    return tmp_path / "results" / "quality.csv"


def test_study_command_writes_provenance_and_rows_then_resumes(tiny_study, capsys):
    argv = ["quality", "--grid", "levers", "--levers", "dense", "sparse", "--steps", "4", "--seeds", "0", "1",
            "--out", str(tiny_study)]
    table = gap.main(argv)
    rows, header = gap.read_study(tiny_study)
    assert [line.split(":")[0] for line in header] == ["command", "machine", "date", "version", "torch threads"]
    assert "--levers dense sparse" in header[0]
    assert len(rows) == 4 and set(rows.lever) == {"dense", "sparse"} and set(rows.seed) == {0, 1}
    assert rows.val_loss.between(0, 20).all() and (rows.steps == 4).all()
    assert set(table.lever) == {"dense", "sparse"}
    assert table.set_index("lever").loc["dense", "gap %"] == 0
    assert "gap %" in capsys.readouterr().out
    mtime = tiny_study.stat().st_mtime_ns
    gap.main(argv)                                        # everything is there: nothing is trained or written
    assert tiny_study.stat().st_mtime_ns == mtime
    gap.main(argv[:-2] + ["--seeds", "2", "--out", str(tiny_study)])  # a new seed: only its two runs
    rows, header2 = gap.read_study(tiny_study)
    assert len(rows) == 6 and header2[:5] == header               # the first command's provenance stays
    assert [line.split(":")[0] for line in header2[5:]] == ["command", "date"]
    assert header2[5].endswith("--seeds 2 --out " + str(tiny_study))   # the second command is listed too
    gap.main(argv[:-2] + ["--seeds", "2", "--out", str(tiny_study)])
    assert gap.read_study(tiny_study)[1] == header2                 # nothing new to train: no new line
    assert rows.val_loss.notna().all()


def test_provenance_caption_names_one_command_or_counts_several():
    one = ["command: python -m sparse_tutorial.studies quality --steps 4", "machine: M", "date: 2026-01-02T10:00",
           "version: v"]
    assert gap.provenance_caption(one) == ("recorded by `python -m sparse_tutorial.studies quality --steps 4` on M, "
                                           "2026-01-02 (v)")
    two = one + ["command: python -m sparse_tutorial.studies quality --steps 8", "date: 2026-01-05T09:00"]
    assert gap.provenance_caption(two) == (
        "recorded by 2 commands (listed at the top of the CSV), the first "
        "`python -m sparse_tutorial.studies quality --steps 4`, on M, 2026-01-02 to 2026-01-05 (v)")


def test_gap_table_compares_each_seed_with_its_own_dense_run():
    rows = pd.DataFrame([
        dict(grid="g", lever="dense", seed=0, steps=10, ff="dense", val_loss=2.0),
        dict(grid="g", lever="dense", seed=1, steps=10, ff="dense", val_loss=1.0),
        dict(grid="g", lever="sparse", seed=0, steps=10, ff="sparse", val_loss=2.2),
        dict(grid="g", lever="sparse", seed=1, steps=10, ff="sparse", val_loss=1.05),
        dict(grid="w", lever="dense d64", seed=0, steps=10, ff="dense", val_loss=3.0),
        dict(grid="w", lever="sparse d64", seed=0, steps=10, ff="sparse", val_loss=3.3),
    ])
    table = gap.gap_table(rows).set_index("lever")
    assert table.loc["sparse", "gap %"] == pytest.approx(7.5)       # mean of +10% and +5%, not of the means
    assert table.loc["sparse", "spread %"] == pytest.approx(100 * 1.15 / 1.625, abs=0.01)
    assert table.loc["sparse", "gap range"] == pytest.approx(5.0)   # +10% and +5%: the seeds disagree by 5 points
    assert table.loc["sparse d64", "gap %"] == pytest.approx(10.0)  # compared with dense d64, not dense


@pytest.mark.parametrize("argv, message", [
    (["quality", "--steps", "0"], "steps must be"),
    (["quality", "--seeds", "-1"], "seeds must be"),
    (["quality", "--levers", "bogus"], "unknown lever"),
])
def test_study_bad_arguments_name_them(tiny_study, argv, message, capsys):
    with pytest.raises(SystemExit):
        gap.main(argv + ["--out", str(tiny_study)])
    assert message in capsys.readouterr().err
    assert not tiny_study.exists()


def test_a_foreign_csv_is_refused_by_name(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="other.csv is not a quality-study CSV"):
        gap.read_study(path)


def test_hard_share_schedule_anneals_then_restores():
    tc = TrainConfig(steps=10, hard_prob_final=1.0, hard_anneal_start=0.5)
    shares = [hard_prob_at(s, tc, 0.3) for s in range(10)]
    assert shares[:5] == [0.3] * 5 and shares[-1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(shares[4:], shares[5:]))
    assert hard_prob_at(3, TrainConfig(steps=10), 0.3) == 0.3
    with pytest.raises(ValueError, match="hard_prob_final"):
        TrainConfig(hard_prob_final=1.5)
    with pytest.raises(ValueError, match="hard_anneal_start"):
        TrainConfig(hard_anneal_start=-0.1)


def test_train_lm_applies_the_schedule_and_keeps_the_configured_share(tiny_text, monkeypatch):
    cfg = book_config("sparse", vocab_size=len(tiny_text.vocab), ff_hard_prob=0.3)   # the reference's mix
    model = TransformerLM(cfg)
    seen = []
    original = SparseFF.forward

    def spy(self, x):              # forward: both training paths (fused and PyTorch) start here
        if self.training:
            seen.append(self.hard_prob)
        return original(self, x)

    monkeypatch.setattr(SparseFF, "forward", spy)
    tc = book_train_config(steps=6, eval_every=100, hard_prob_final=1.0, hard_anneal_start=0.5)
    train_lm(model, tiny_text, tc, progress=False)
    per_step = seen[::cfg.n_layers]
    assert per_step[0] == pytest.approx(0.3) and per_step[-1] == pytest.approx(1.0)
    assert all(m.hard_prob == 0.3 for m in model.modules() if isinstance(m, SparseFF))


def test_reference_init_draws_glorot_matrices_and_near_zero_biases():
    torch.manual_seed(0)
    ff = SparseFF(64, 256, 16, init="reference")
    bound = (6 / (64 + 256)) ** 0.5                    # Glorot-uniform bound of a 64 x 256 matrix
    assert ff.w1.abs().max() <= bound and ff.w1.abs().max() > 0.9 * bound
    assert ff.b2.abs().max() < 1e-4 and ff.controller.c2.bias.abs().max() < 1e-4
    torch_ff = SparseFF(64, 256, 16)
    assert torch_ff.controller.c2.bias.abs().max() > 1e-2   # nn.Linear's default bias range is much wider
    with pytest.raises(ValueError, match="init must be one of"):
        SparseFF(64, 256, 16, init="glorot")


def test_model_config_passes_the_levers_to_every_sparse_layer():
    cfg = book_config("sparse", ff_hard_prob=1.0, ff_noise_scale=0.0, ff_init="reference")
    layers = [m for m in TransformerLM(cfg).modules() if isinstance(m, SparseFF)]
    assert layers and all((m.hard_prob, m.noise_scale, m.init) == (1.0, 0.0, "reference") for m in layers)


def test_active_units_table_picks_the_always_hard_levers_and_their_block_sizes():
    table = pd.DataFrame([
        dict(grid="levers", lever="dense", steps=10, **{"gap %": 0.0}),
        dict(grid="levers", lever="always hard", steps=10, **{"gap %": 5.0}),
        dict(grid="levers", lever="N 4, always hard", steps=10, **{"gap %": 1.5}),
        dict(grid="levers", lever="N 8, always hard", steps=10, **{"gap %": 3.0}),
        dict(grid="levers", lever="N 8", steps=10, **{"gap %": 4.0}),
        dict(grid="levers", lever="scale by prob, always hard", steps=10, **{"gap %": 1.0}),
        dict(grid="blocks", lever="N 16, always hard", steps=10, **{"gap %": 1.0}),
    ])
    rows = pd.DataFrame([dict(grid="levers", lever=lever, block_size=n, d_ff=512, params=p)
                         for lever, n, p in [("dense", 32, 1000), ("always hard", 32, 1050),
                                             ("N 4, always hard", 4, 1400), ("N 8, always hard", 8, 1200),
                                             ("N 8", 8, 1200), ("scale by prob, always hard", 32, 1050)]])
    part = gap.active_units_table(table, rows)
    assert part["params / dense"].tolist() == [1.4, 1.2, 1.05]
    assert part["lever"].tolist() == ["N 4, always hard", "N 8, always hard", "always hard"]
    assert part["N"].tolist() == [4, 8, 32]
    assert part["active units"].tolist() == [128, 64, 16]
    assert gap.smallest_meeting(part, "N")["lever"] == "N 4, always hard"
    assert gap.smallest_meeting(part, "N", target=3.0)["lever"] == "N 8, always hard"
    assert gap.smallest_meeting(part, "N", target=1.0) is None


def test_blocks_table_keeps_the_blocks_grids_sparse_models_by_block_size():
    runs = [("blocks", "dense", 0, 1.0, 32, 1000), ("blocks", "N 64", 0, 1.2, 64, 1020),
            ("blocks", "N 8", 0, 1.05, 8, 1100), ("blocks", "N 8", 1, 1.155, 8, 1100),
            ("blocks", "dense", 1, 1.1, 32, 1000), ("levers", "dense", 0, 1.0, 32, 1000),
            ("levers", "N 8", 0, 2.0, 8, 9999), ("blocks", "N 8, always hard", 0, 1.0, 8, 1100)]
    rows = pd.DataFrame([dict(grid=grid, lever=lever, seed=seed, steps=10, ff="dense" if lever == "dense" else
                              "sparse", val_loss=loss, block_size=n, d_ff=512, params=p)
                         for grid, lever, seed, loss, n, p in runs])
    part = gap.blocks_table(gap.gap_table(rows), rows)
    assert part["lever"].tolist() == ["N 8", "N 64"]                  # by block size, not as the names sort
    assert part["N"].tolist() == [8, 64]
    assert part["active units"].tolist() == [64, 8]
    assert part["params / dense"].tolist() == [1.1, 1.02]             # the blocks grid's own rows and dense
    assert part["gap %"].tolist() == [pytest.approx(5.0), pytest.approx(20.0)]   # each seed against its dense
    assert part["seeds"].tolist() == [2, 1]
    assert gap.blocks_table(gap.gap_table(rows[rows.grid == "levers"]), rows).empty


def test_width_table_keeps_the_width_grids_sparse_models_by_width():
    rows = pd.DataFrame([
        dict(grid=grid, lever=lever, seed=seed, steps=10, ff="dense" if lever.startswith("dense") else "sparse",
             val_loss=loss)
        for grid, lever, seed, loss in [
            ("width", "dense d256", 0, 1.0), ("width", "sparse d256", 0, 1.05),
            ("width", "dense d64", 0, 2.0), ("width", "sparse d64", 0, 2.2),
            ("width", "dense d64", 1, 2.0), ("width", "sparse d64", 1, 2.1),
            ("levers", "dense", 0, 1.5), ("levers", "sparse", 0, 1.6)]])
    part = gap.width_table(gap.gap_table(rows))
    assert part["d_model"].tolist() == [64, 256]                  # by width, not as the lever names sort
    assert part["lever"].tolist() == ["sparse d64", "sparse d256"]
    assert part["gap %"].tolist() == [pytest.approx(7.5), pytest.approx(5.0)]    # each width against its own dense
    assert part["seeds"].tolist() == [2, 1]
    assert gap.width_table(gap.gap_table(rows[rows.grid == "levers"])).empty


# -- the image network's study -------------------------------------------------------------------------------


@pytest.fixture
def blob_images(monkeypatch):
    from test_image_model import blobs
    monkeypatch.setattr(gap, "image_tensors", lambda *a, **k: blobs(300))


def test_image_study_writes_provenance_and_rows_then_resumes(blob_images, tmp_path, capsys):
    out = tmp_path / "image.csv"
    table = gap.main(["image", "--levers", "dense", "sparse", "N 25", "--epochs", "1", "--seeds", "0",
                      "--out", str(out)])
    text = out.read_text()
    assert text.startswith("# command: python -m sparse_tutorial.studies image --levers dense sparse 'N 25'")
    assert "# machine: " in text and "# date: " in text and "# version: sparse_tutorial" in text
    rows, header = gap.read_study(out, gap.IMAGE_KEY)
    assert rows.lever.tolist() == ["dense", "sparse", "N 25"] and rows.block_size.tolist() == [50, 50, 25]
    assert table.set_index("lever").loc["dense", "gap (points)"] == 0
    before = out.read_text()
    gap.main(["image", "--levers", "dense", "sparse", "--epochs", "1", "--seeds", "0", "--out", str(out)])
    assert out.read_text() == before                                  # nothing new: the file is untouched
    gap.main(["image", "--levers", "dense", "--epochs", "1", "--seeds", "0", "1", "--out", str(out)])
    assert gap.read_study(out, gap.IMAGE_KEY)[0].seed.tolist() == [0, 0, 0, 1]


def test_image_gap_table_compares_each_seed_with_its_own_dense_run():
    rows = pd.DataFrame([dict(lever="dense", seed=0, epochs=8, test_acc=0.80),
                         dict(lever="dense", seed=1, epochs=8, test_acc=0.90),
                         dict(lever="sparse", seed=0, epochs=8, test_acc=0.79),
                         dict(lever="sparse", seed=1, epochs=8, test_acc=0.87),
                         dict(lever="sparse", seed=2, epochs=8, test_acc=0.50)])   # no dense twin: no gap
    t = gap.image_gap_table(rows).set_index("lever")
    assert t.loc["sparse", "gap (points)"] == pytest.approx(-2.0)      # mean of -1 and -3 (seeds 0 and 1)
    assert t.loc["sparse", "spread (points)"] == pytest.approx(37.0)
    assert t.loc["sparse", "test acc %"] == pytest.approx(72.0)


@pytest.mark.parametrize("argv,needle", [
    (["image", "--levers", "magic"], "unknown image lever(s) ['magic']"),
    (["image", "--epochs", "0"], "epochs=0"),
    (["image", "--seeds", "-1"], "seeds=[-1]"),
])
def test_image_study_bad_arguments_are_named(argv, needle, capsys, tmp_path, blob_images):
    with pytest.raises(SystemExit):
        gap.main(argv + ["--out", str(tmp_path / "x.csv")])
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "x.csv").exists()


def test_image_config_passes_the_selection_options_to_the_layer():
    from sparse_tutorial.image_model import ImageConfig, ImageNet
    ff = ImageNet(ImageConfig(ff="sparse", hard_prob=1.0, scale_by_prob=True)).ff
    assert ff.hard_prob == 1.0 and ff.scale_by_prob


def test_the_converted_lever_trains_dense_then_sparse_for_the_same_total_steps(tiny_study, monkeypatch):
    calls = []
    real = gap.train_lm

    def counting(model, data, tc, **kw):
        calls.append((model.cfg.ff, tc.steps))
        return real(model, data, tc, **kw)
    monkeypatch.setattr(gap, "train_lm", counting)
    gap.main(["quality", "--grid", "levers", "--levers", "converted at 2/3, always hard", "--steps", "6",
              "--seeds", "0", "--out", str(tiny_study)])
    assert calls == [("dense", 4), ("sparse", 2)]
    rows, _ = gap.read_study(tiny_study)
    assert rows.iloc[0].lever == "converted at 2/3, always hard" and "convert_at" in rows.iloc[0].train_overrides
    assert rows.iloc[0].ff == "sparse"


@pytest.mark.parametrize("block_size", [2, 4, 32])
def test_missed_target_remedies_suggest_what_applies_to_the_block_size(block_size):
    remedies = quality.missed_target_remedies({"sparse": 1.6, "dense": 1.5}, {"sparse": 0.86, "dense": 0.88}, 1.4,
                                              block_size=block_size, d_model=128)
    assert "+6.7%" in remedies[0] and "steps=" in remedies[0]
    # a smaller block only where there is one (a block of 1 would be the dense layer)
    assert ("ff_block_size=" in remedies[0]) == (block_size > 2)
    small = block_size < SparseFF.HARD_KERNEL_MIN_BLOCK
    assert ("keeps the dense layer's products" in remedies[2]) == small
    assert ("only the chosen units" in remedies[2]) == (not small)
