"""Parameter accounting and FF traffic formulas, checked against real modules at small sizes."""
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparse_tutorial import DenseFF
from sparse_tutorial.model import Block, ModelConfig, TransformerLM, book_config, seed_config
from sparse_tutorial.measure.params import (PAPER_17B, PAPER_800M, BlockShape, attention_params, block_params,
                                    count_block_params, count_model_params, ff_bytes, ff_flops, ff_intensity,
                                    ff_params, model_params, param_table, roofline_seconds, shape_of)
from sparse_tutorial.measure.timing import dense_ff_batch_sweep, last_level_cache_bytes, measure_matmul_gflops


@st.composite
def small_config(draw):
    n_heads = draw(st.integers(1, 4))
    d_model = n_heads * draw(st.integers(1, 8))
    return ModelConfig(vocab_size=draw(st.integers(1, 40)), context_length=draw(st.integers(1, 16)),
                       d_model=d_model, n_heads=n_heads, n_layers=draw(st.integers(1, 3)),
                       d_ff=draw(st.integers(1, 64)))


@settings(max_examples=30, deadline=None)
@given(small_config())
def test_block_formula_matches_real_block(cfg):
    counted = count_block_params(Block(cfg))
    assert counted == block_params(cfg.d_model, cfg.d_ff)


@settings(max_examples=20, deadline=None)
@given(small_config())
def test_model_formula_matches_real_model(cfg):
    model = TransformerLM(cfg)
    assert count_model_params(model) == model_params(cfg)
    # the tied head is counted once
    assert model_params(cfg)["total"] == sum(p.numel() for p in model.parameters())


def test_book_and_seed_models_match():
    for cfg in (book_config(), seed_config()):
        assert count_block_params(Block(cfg)) == block_params(cfg.d_model, cfg.d_ff)


def test_known_values():
    # the paper's reference numbers for dense Q, K, V, O at d_model 1024 and 9216
    assert attention_params(1024) == 4_198_400
    assert attention_params(9216) == 339_775_488
    assert ff_params(3, 5) == sum(p.numel() for p in DenseFF(3, 5).parameters())
    p = block_params(PAPER_800M.d_model, PAPER_800M.d_ff)
    assert p.ff == 2 * 1024 * 4096 + 4096 + 1024
    assert p.ff_share == pytest.approx(p.ff / (p.ff + p.attention + 4 * 1024))
    assert 0.6 < p.ff_share < 0.7   # d_ff = 4 d_model puts about two thirds of a block in the FF layer


def test_param_table_rows_and_shares():
    table = param_table([shape_of(book_config(), "book"), PAPER_800M, PAPER_17B])
    assert list(table.index) == ["book", "paper 800M", "paper 17B"]
    total = table["attention (QKVO)"] + table["FF"] + table["LayerNorm"]
    assert (total == table["block total"]).all()
    assert table.loc["paper 17B", "block MB"] == pytest.approx(table.loc["paper 17B", "block total"] * 4 / 1e6)


def test_ff_traffic():
    d, f = 8, 32
    assert ff_flops(d, f, 3) == 3 * ff_flops(d, f, 1)
    assert ff_flops(d, f, 1) == 4 * d * f + 2 * f + d
    b1, b4 = ff_bytes(d, f, 1), ff_bytes(d, f, 4)
    assert b1["weights"] == b4["weights"] == 4 * ff_params(d, f)
    assert b4["activations"] == 4 * b1["activations"] == 4 * 4 * (2 * d + 2 * f)
    assert ff_bytes(d, f, 1, bytes_per_value=2)["weights"] == 2 * ff_params(d, f)
    # batch 1 at a realistic width: about 2 FLOPs per 4-byte weight
    assert ff_intensity(1024, 4096, 1) == pytest.approx(0.5, rel=0.01)
    intens = [ff_intensity(1024, 4096, b) for b in (1, 2, 4, 8, 64)]
    assert intens == sorted(intens)


def test_roofline_seconds():
    assert roofline_seconds(1e9, 1e9, peak_gflops=100, bandwidth_gbs=10) == pytest.approx(0.1)   # memory
    assert roofline_seconds(1e12, 1e9, peak_gflops=100, bandwidth_gbs=10) == pytest.approx(10.0)  # compute


@pytest.mark.parametrize("call, needle", [
    (lambda: attention_params(0), "d_model"),
    (lambda: ff_params(4, -1), "d_ff"),
    (lambda: ff_flops(4, 4, 0), "batch"),
    (lambda: BlockShape("x", d_model=10, d_ff=40, n_heads=3), "n_heads"),
    (lambda: param_table([(1024, 4096)]), "BlockShape"),
    (lambda: model_params(book_config(ff="sparse")), "dense"),
    (lambda: roofline_seconds(1, 1, 0, 1), "peak_gflops"),
    (lambda: measure_matmul_gflops(n=4), "n"),
    (lambda: dense_ff_batch_sweep(8, 16, []), "batch_sizes"),
    (lambda: dense_ff_batch_sweep(8, 16, [0]), "batch_sizes"),
])
def test_bad_arguments(call, needle):
    with pytest.raises(ValueError, match=needle):
        call()


def test_batch_sweep_columns():
    df = dense_ff_batch_sweep(8, 16, [1, 4], repeats=1, warmup=0, min_weight_bytes=1, progress=False)
    assert list(df["batch"]) == [1, 4]
    assert (df["n_layers"] == 1).all()
    assert df["FLOP/byte"].tolist() == [ff_intensity(8, 16, 1), ff_intensity(8, 16, 4)]
    assert (df["µs per token"] > 0).all()
    assert (df["IQR / median"] == 0).all()          # one repeat: no spread
    big = dense_ff_batch_sweep(8, 16, [1], repeats=1, warmup=0, min_weight_bytes=10 * ff_bytes(8, 16, 1)["weights"],
                               progress=False)
    assert big["n_layers"].iloc[0] == 10


def test_cache_size_is_positive_or_unknown():
    size = last_level_cache_bytes()
    assert size is None or size > 0
    assert measure_matmul_gflops(n=64, repeats=1) > 0
