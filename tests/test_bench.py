"""The benchmark command's output structure (table and --json), its CSV files and its argument errors.

Tiny sizes only; nothing here checks a speed (machines are shared and noisy).
"""
import json
import re

import numpy as np
import pandas as pd
import pytest
import torch

from sparse_tutorial import bench
from sparse_tutorial.measure.quantize import quantize_int8, weight_bytes


def run(capsys, tmp_path, *args):
    """Run the command in-process; return (exit status, stdout)."""
    status = bench.main([*args, "--out-dir", str(tmp_path), "--threads", "1", "--repeats", "1"])
    return status, capsys.readouterr().out


def run_json(capsys, tmp_path, *args):
    status, out = run(capsys, tmp_path, *args, "--json")
    assert status == 0
    return json.loads(out)  # one JSON object and nothing else on stdout


TINY = {
    "bandwidth": ["bandwidth", "--size-mb", "4"],
    "ff": ["ff", "--d-model", "32", "64", "--block-size", "8"],
    "block": ["block", "--shape", "tiny", "--cache-len", "4"],
    "generate": ["generate", "--d-model", "64", "--n-layers", "1", "--batch-sizes", "1", "2",
                 "--prompt-len", "3", "--new-tokens", "2"],
    "crossover": ["crossover", "--d-model", "64", "--n-layers", "1", "--batch-sizes", "1", "3"],
    "train": ["train", "--d-model", "32", "--n-layers", "1", "--batch-size", "2", "--context-length", "8"],
    "quant": ["quant", "--d-model", "64", "--n-layers", "1"],
    "parts": ["parts", "--shape", "tiny", "--cache-len", "4"],
}
#: ``threads`` times its own thread counts, so it is left out of the tests above that expect one thread
THREADS_TINY = ["threads", "--counts", "1", "2", "--ff", "32", "64", "8", "4", "--shape", "tiny"]
COLUMNS = {
    "bandwidth": {"measure", "GB/s"},
    "ff": {"d_model", "dense s", "sparse s", "speed-up", "limit ratio", "share of limit"},
    "block": {"variant", "ms per token", "speed-up", "paper ms", "paper speed-up"},
    "generate": {"batch", "variant", "prefill ms", "decode ms per step", "decode speed-up (dense / variant)"},
    "crossover": {"batch", "dense ms", "sparse decode ms", "sparse masked ms", "decode / masked"},
    "train": {"dense s per step", "sparse s per step", "sparse / dense"},
    "quant": {"variant", "decode ms per step", "decode speed-up (dense / variant)"},
    "parts": {"variant", "part", "µs", "MB", "GB/s", "share", "warm µs", "floor µs", "bandwidth GB/s"},
}
ROWS = {"bandwidth": 2, "ff": 2, "block": 4, "generate": 6, "crossover": 2, "train": 1, "quant": 4,
        # four variants' parts with the whole block and the rest of it, and a fused kernel's row for each sparse
        # FF and each sparse QKV (both kernels come with Numba)
        "parts": 4 + 6 + 4 + 6 + 4 * 2 + 4 * bench.best_path().count("fused")}


@pytest.mark.parametrize("command", sorted(TINY))
def test_json_output_has_rows_machine_and_csv(command, capsys, tmp_path):
    out = run_json(capsys, tmp_path, *TINY[command])
    assert out["command"] == command
    assert out["machine"]["torch threads"] == 1
    assert len(out["rows"]) == ROWS[command]
    assert COLUMNS[command] <= set(out["rows"][0])
    for row in out["rows"]:
        assert row["threads"] == 1 and row["cpu"]
    csv = pd.read_csv(out["csv"])                     # the same table, written next to the others
    assert len(csv) == ROWS[command] and COLUMNS[command] <= set(csv.columns)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]   # no temp file left behind


@pytest.mark.parametrize("command", ["ff", "block"])
def test_table_output_is_readable(command, capsys, tmp_path):
    status, out = run(capsys, tmp_path, *TINY[command])
    assert status == 0
    lines = out.strip().splitlines()
    assert lines[0].startswith(f"{command}: ") and "threads" in lines[0]
    header = lines[1]
    for col in ("speed-up",):
        assert col in header
    assert lines[-1].startswith("written: ") and lines[-1].endswith(f"{command}.csv")


def test_block_rows_are_the_papers_four_variants_with_its_ratios(capsys, tmp_path):
    rows = run_json(capsys, tmp_path, *TINY["block"])["rows"]
    assert [r["variant"] for r in rows] == list(bench.BLOCK_VARIANTS)
    assert rows[0]["speed-up"] == 1.0
    assert all(pd.isna(r["paper speed-up"]) for r in rows)          # the paper has no tiny shape


def test_paper_ratios_in_the_table_and_the_targets_come_from_the_papers_block_times(capsys, tmp_path, monkeypatch):
    planted = {"dense": 8.0, "sparse FF": 4.0, "sparse QKV": 10.0, "sparse FF + QKV": 0.5}
    monkeypatch.setitem(bench.PAPER_BLOCK_MS, "tiny", planted)
    rows = run_json(capsys, tmp_path, *TINY["block"])["rows"]
    assert {r["variant"]: r["paper speed-up"] for r in rows} == {"dense": 1.0, "sparse FF": 2.0,
                                                                   "sparse QKV": 0.8, "sparse FF + QKV": 16.0}
    monkeypatch.setitem(bench.PAPER_BLOCK_MS, "800m", {**bench.PAPER_BLOCK_MS["800m"], "sparse FF + QKV": 2.95})
    targets = list(bench.target_table()["target"])
    assert "800M block: sparse FF + QKV speed-up (paper's block times: 2.00x)" in targets   # 5.9 / 2.95
    assert "17B block: sparse FF + QKV speed-up (paper's block times: 41.50x)" in targets   # 581 / 14


def test_no_csv_flag(capsys, tmp_path):
    out = run_json(capsys, tmp_path, *TINY["bandwidth"], "--no-csv")
    assert out["csv"] is None and not list(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["ff", "--d-model", "64", "--block-size", "7"], "d_ff must be divisible by block_size"),
    (["ff", "--d-model", "0"], "d_model must be a positive integer"),
    (["ff", "--d-model", "32", "64", "--d-ff", "128", "256", "512"], "--d-ff takes one value or one per"),
    (["generate", "--d-model", "100"], "d_model must be a multiple of 64"),
    (["generate", "--d-model", "64", "--prompt-len", "250", "--new-tokens", "10"], "context_length"),
    (["generate", "--d-model", "64", "--batch-sizes", "0"], "batch size must be a positive integer"),
    (["bandwidth", "--size-mb", "0"], "size_mb must be a positive integer"),
    (["bandwidth", "--threads", "0"], "threads must be a positive integer"),
    (["train", "--repeats", "0"], "repeats must be an integer >= 1"),
])
def test_bad_arguments_exit_2_with_a_clear_message(args, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        bench.main([*args, "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("args", [["block", "--shape", "70b"], ["nonsense"], ["block", "--variants", "fast"]])
def test_unknown_choices_are_refused(args, capsys):
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_functions_validate_their_arguments():
    with pytest.raises(ValueError, match="shape must be one of"):
        bench.block_config("8b", "dense")
    with pytest.raises(ValueError, match="variant must be one of"):
        bench.block_config("tiny", "sparse")
    with pytest.raises(ValueError, match="widths must not be empty"):
        bench.ff_sweep([])
    with pytest.raises(ValueError, match="threads must be a positive integer"):
        with bench.num_threads(-1):
            pass


def test_block_config_follows_the_paper():
    cfg = bench.block_config("17b", "sparse FF + QKV")
    assert (cfg.d_model, cfg.d_ff, cfg.ff_block_size, cfg.d_lowrank, cfg.qkv, cfg.qkv_modules) == \
        (9216, 65536, 256, 32, "conv", 64)
    dense = bench.block_config("800m", "dense")
    assert (dense.d_model, dense.n_heads, dense.d_ff, dense.ff, dense.qkv) == (1024, 16, 4096, "dense", "dense")
    assert bench.block_config("800m", "sparse QKV").d_ff == 6144


def test_ff_kind_times_every_registered_kind_against_dense(capsys, tmp_path):
    from sparse_tutorial.layers.registry import FF_KINDS
    out = run_json(capsys, tmp_path, "ff", "--kind", "moe", "pkm", "--d-model", "32", "64", "--block-size", "8")
    rows = pd.DataFrame(out["rows"])
    assert rows["kind"].tolist() == ["dense", "moe", "pkm"] * 2          # dense first: every speed-up's baseline
    assert rows["d_model"].tolist() == [32] * 3 + [64] * 3
    dense = rows[rows["kind"] == "dense"]
    assert (dense["speed-up"] == 1).all() and (dense["bytes x"] == 1).all()
    assert {"µs", "MB read", "IQR", "stored MB"} <= set(rows.columns)
    every = bench.ff_kinds([32], repeats=1, block_size=8, progress=False)
    assert every["kind"].tolist() == ["dense", *[k for k in FF_KINDS if k != "dense"]]
    sparse = every.set_index("kind").loc["sparse"]
    from sparse_tutorial.layers import SparseFF
    assert sparse["MB read"] == 4 * SparseFF(32, 128, 8).active_params_per_token() / 1e6
    with pytest.raises(ValueError, match="kind"):
        bench.ff_kinds([32], ["gpu"], repeats=1)
    with pytest.raises(SystemExit):
        bench.main(["ff", "--kind", "moe", "--d-ff", "64", "--d-model", "32", "--no-csv"])
    assert "--kind" in capsys.readouterr().err


def test_spread_is_the_interquartile_range_over_the_median_in_every_timing_table(monkeypatch):
    from sparse_tutorial.measure import timing
    assert timing.spread([1.0, 2.0, 3.0, 4.0, 5.0]) == pytest.approx((4.0 - 2.0) / 3.0)
    assert timing.spread([2.0]) == 0.0
    with pytest.raises(ValueError, match="samples"):
        timing.spread([])
    # the tables take their spread from the samples the harness recorded: 1, 2, 3, ... seconds per call
    ticks = iter(range(10_000))
    monkeypatch.setattr(bench.harness, "clock", lambda: lambda: float(next(ticks)) ** 2)
    row = bench.ff_layer(32, 64, 8, repeats=5, warmup=0, paths=["pytorch"], cold_cache=False)
    assert row["max IQR / median"] > 0.0
    block = bench.block_decode("tiny", ["dense"], cache_len=4, repeats=5, warmup=0, progress=False)
    assert block["IQR / median"].iloc[0] > 0.0
    assert bench.block_path_table(block)["IQR"].iloc[0] == block["IQR / median"].iloc[0]


def test_block_bytes_count_every_weight_of_dense_and_one_row_per_block_of_sparse():
    from sparse_tutorial.model import Block
    d, d_ff, n, cache = 1024, 4096, 64, 128
    dense = bench.block_bytes("800m", "dense", cache_len=cache)
    params = sum(p.numel() for p in Block(bench.block_config("800m", "dense")).parameters())
    kv = 2 * (cache + 1) * d
    assert dense["total"] == pytest.approx(4 * (params + kv) / 1e6)
    assert dense["FF"] == pytest.approx(4 * (2 * d * d_ff + d_ff + d) / 1e6)
    assert dense["KV cache"] == pytest.approx(4 * kv / 1e6)
    sparse = bench.block_bytes("800m", "sparse FF", cache_len=cache)
    assert sparse["FF"] == pytest.approx(4 * (2 * d * d_ff / n + d) / 1e6)          # 1/N of W1 and W2, plus b2
    rank = d_ff // n
    assert sparse["controller"] == pytest.approx(4 * (d * rank + rank * d_ff + d_ff) / 1e6)
    assert sparse["attention"] == dense["attention"]
    assert bench.block_bytes("17b", "sparse FF + QKV")["total"] < 50      # meta device: no 5 GB allocated
    with pytest.raises(ValueError, match="cache_len"):
        bench.block_bytes("800m", "dense", cache_len=0)


def test_bytes_table_puts_the_bytes_limit_beside_the_measured_speed_up():
    df = pd.DataFrame([{"shape": "800m", "variant": v, "path": None, "cache_len": 128,
                        "speed-up": s} for v, s in zip(bench.BLOCK_VARIANTS, [1.0, 2.0, 1.0, 3.0])])
    t = bench.block_bytes_table(df)
    total = {v: bench.block_bytes("800m", v)["total"] for v in bench.BLOCK_VARIANTS}
    assert t.loc["sparse FF + QKV", "bytes x"] == pytest.approx(total["dense"] / total["sparse FF + QKV"])
    assert t.loc["sparse FF", "share of bytes limit"] == pytest.approx(
        2.0 * total["sparse FF"] / total["dense"])


def test_num_threads_restores_the_setting():
    before = torch.get_num_threads()
    with bench.num_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_write_csv_is_atomic_and_creates_the_folder(tmp_path):
    path = bench.write_csv(pd.DataFrame({"a": [1, 2]}), "x", tmp_path / "new" / "dir")
    assert path.read_text().splitlines() == ["a", "1", "2"]
    assert [p.name for p in path.parent.iterdir()] == ["x.csv"]


def test_target_table_marks_met_missed_and_not_run():
    block = pd.DataFrame({"variant": list(bench.BLOCK_VARIANTS), "speed-up": [1.0, 2.5, 0.9, 3.0]})
    table = bench.target_table(block_800m=block, train=pd.DataFrame({"sparse / dense": [1.1]}))
    met = dict(zip(table["target"], table["met"]))
    assert met["800M block: sparse FF speed-up (paper's block times: 1.90x)"] == "yes"
    assert met["800M block: sparse FF + QKV speed-up (paper's block times: 3.11x)"] == "NO"
    assert met["training step: sparse time / dense time"] == "yes"
    assert met["17B block: sparse FF + QKV speed-up (paper's block times: 41.50x)"] == "not run"
    # several tables (paths, eager and lean steps): a block target takes the best row of the variant
    lean = pd.DataFrame({"variant": list(bench.BLOCK_VARIANTS), "speed-up": [1.0, 1.5, 0.9, 4.5]})
    table = bench.target_table(block_800m=pd.concat([block, lean]))
    met = dict(zip(table["target"], table["met"]))
    assert met["800M block: sparse FF + QKV speed-up (paper's block times: 3.11x)"] == "yes"
    assert dict(zip(table["target"], table["measured"]))["800M block: sparse FF speed-up (paper's block "
                                                         "times: 1.90x)"] == "2.50"


def test_quantized_model_decodes_like_the_float_model():
    from sparse_tutorial.model import TransformerLM

    model = TransformerLM(bench.model_config("sparse FF", d_model=64, n_layers=1)).eval()
    q = quantize_int8(model)
    assert weight_bytes(q) < weight_bytes(model)
    idx = torch.randint(0, 65, (2, 5))
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = q(idx)
    assert (a - b).abs().max() < 0.1           # int8 rounding, not a different computation
    assert model.blocks[0].attn.qkv.weight.dtype == torch.float32   # the original is untouched


# -- the sparse FF decode path (--path) -------------------------------------------------------------------------

PATH_COMMANDS = ["ff", "block", "generate"]


def sparse_rows(rows):
    return [r for r in rows if "sparse FF" in r.get("variant", "sparse FF")]


@pytest.mark.parametrize("command", PATH_COMMANDS)
@pytest.mark.parametrize("path", ["pytorch", "fused"])
def test_path_flag_times_that_path_and_json_names_it(command, path, capsys, tmp_path):
    from sparse_tutorial.layers import sparse_ff_kernel

    if path == "fused" and not sparse_ff_kernel.available():
        pytest.skip("numba is not installed")
    out = run_json(capsys, tmp_path, *TINY[command], "--path", path)
    assert out["path"] == path
    assert len(out["rows"]) == ROWS[command]                        # one path: the same rows as before
    for row in out["rows"]:
        assert row["path"] == (path if row in sparse_rows(out["rows"]) else None)
        if command != "ff":                                         # the decoding steps really took it
            assert row["step path"] == row["path"]


@pytest.mark.parametrize("command", PATH_COMMANDS)
def test_default_path_is_the_best_available(command, capsys, tmp_path, monkeypatch):
    from sparse_tutorial.layers import sparse_ff_kernel

    out = run_json(capsys, tmp_path, *TINY[command])
    assert out["path"] == bench.best_path() == ("fused" if sparse_ff_kernel.available() else "pytorch")
    monkeypatch.setattr(sparse_ff_kernel, "numba", None)            # no Numba: PyTorch, said so
    out = run_json(capsys, tmp_path, *TINY[command])
    assert out["path"] == "pytorch"
    assert {r["path"] for r in sparse_rows(out["rows"])} == {"pytorch"}


def test_path_fused_without_numba_exits_2_and_says_why(capsys, tmp_path, monkeypatch):
    from sparse_tutorial.layers import sparse_ff_kernel

    monkeypatch.setattr(sparse_ff_kernel, "numba", None)
    with pytest.raises(SystemExit) as e:
        bench.main([*TINY["ff"], "--path", "fused", "--out-dir", str(tmp_path)])
    assert e.value.code == 2
    assert "path='fused' is not available here: numba is not installed" in capsys.readouterr().err


def test_path_flag_refuses_unknown_paths(capsys):
    with pytest.raises(SystemExit) as e:
        bench.main([*TINY["ff"], "--path", "cuda"])
    assert e.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_two_paths_in_one_run(capsys, tmp_path):
    from sparse_tutorial.layers import sparse_ff_kernel

    if not sparse_ff_kernel.available():
        pytest.skip("numba is not installed")
    out = run_json(capsys, tmp_path, *TINY["block"], "--path", "fused", "pytorch")
    assert out["path"] == "fused" and out["paths"] == ["fused", "pytorch"]
    assert [(r["variant"], r["path"], r["step path"]) for r in out["rows"]][:3] == [
        ("dense", None, None), ("sparse FF", "fused", "fused"), ("sparse FF", "pytorch", "pytorch")]


def test_table_header_names_the_path(capsys, tmp_path):
    status, out = run(capsys, tmp_path, *TINY["ff"], "--path", "pytorch")
    assert status == 0 and "sparse FF decode path: pytorch" in out.splitlines()[0]


def test_functions_time_both_paths_in_one_run():
    from sparse_tutorial.layers import sparse_ff_kernel

    if not sparse_ff_kernel.available():
        pytest.skip("numba is not installed")
    row = bench.ff_layer(32, 64, 8, repeats=1, warmup=0, paths=["pytorch", "fused"])
    assert row["path"] == "pytorch" and row["sparse s"] == row["pytorch s"]
    assert {"fused s", "fused speed-up", "pytorch speed-up"} <= set(row)
    block = bench.block_decode("tiny", cache_len=4, repeats=1, progress=False, paths=["pytorch", "fused"])
    assert list(zip(block["variant"], block["path"].fillna("-"))) == [
        ("dense", "-"), ("sparse FF", "pytorch"), ("sparse FF", "fused"), ("sparse QKV", "-"),
        ("sparse FF + QKV", "pytorch"), ("sparse FF + QKV", "fused")]
    with pytest.raises(ValueError, match="paths must not repeat"):
        bench.ff_layer(32, 64, 8, repeats=1, paths=["fused", "fused"])
    with pytest.raises(ValueError, match="path must be one of"):
        bench.block_decode("tiny", paths=["gpu"])


def test_path_tables_put_the_paths_side_by_side(monkeypatch):
    from sparse_tutorial.layers import sparse_ff_kernel

    if not sparse_ff_kernel.available():
        pytest.skip("numba is not installed")
    assert bench.available_paths() == ["fused", "pytorch"]
    sweep = bench.ff_sweep([32], block_size=8, repeats=1, paths=["fused", "pytorch"], progress=False)
    table = bench.ff_path_table(sweep, gbps=10.0)
    assert list(table.columns) == ["d_model", "dense ms", "fused µs", "fused x", "pytorch µs", "pytorch x",
                                   "limit x", "bytes µs", "IQR"]
    assert table["fused µs"].iloc[0] == pytest.approx(sweep["fused s"].iloc[0] * 1e6)
    block = bench.block_decode("tiny", cache_len=4, repeats=1, progress=False, paths=["fused", "pytorch"])
    t = bench.block_path_table(block)
    assert list(t.index) == list(bench.BLOCK_VARIANTS)
    assert list(t.columns) == ["fused ms", "fused x", "pytorch ms", "pytorch x", "paper x", "IQR"]
    assert t.loc["dense", "fused ms"] == t.loc["dense", "pytorch ms"]          # one time, shown under both
    fused = block[(block["variant"] == "sparse FF") & (block["path"] == "fused")]["ms per token"].iloc[0]
    assert t.loc["sparse FF", "fused ms"] == fused
    main = bench.main_rows(block)
    assert list(main["variant"]) == list(bench.BLOCK_VARIANTS)
    assert set(main["path"].dropna()) == {"fused"}
    monkeypatch.setattr(sparse_ff_kernel, "numba", None)
    assert bench.available_paths() == ["pytorch"]


def test_threads_puts_thread_counts_side_by_side_on_wall_time(capsys, tmp_path):
    """One row per (measure, variant, path, thread count); every row on wall time, the thread count its own
    (the command's --threads does not apply); quartiles around the median; ratios against the first count."""
    out = run_json(capsys, tmp_path, *THREADS_TINY, "--path", "pytorch")
    rows = pd.DataFrame(out["rows"])
    assert {"measure", "variant", "path", "threads", "median ms", "q1 ms", "q3 ms", "spread %", "speed-up",
            "vs 1 thread"} <= set(rows.columns)
    assert set(rows["clock"]) == {"wall time"}
    assert sorted(rows["threads"].unique()) == [1, 2]
    assert (rows.groupby("threads").size() == 6).all()      # FF dense + sparse, block's four variants
    assert ((rows["q1 ms"] <= rows["median ms"]) & (rows["median ms"] <= rows["q3 ms"])).all()
    first = rows[rows["threads"] == 1]
    assert (first["vs 1 thread"] == 1.0).all()
    assert (rows[rows["variant"] == "dense"]["speed-up"] == 1.0).all()
    assert set(rows["path"].dropna()) == {"pytorch"}
    verdicts = bench.threads_verdicts(rows)
    assert len(verdicts) == 6 and all("against" in v for v in verdicts)


def test_parts_break_each_variant_into_its_parts_with_their_bytes(capsys, tmp_path):
    from sparse_tutorial.layers import sparse_ff_kernel

    rows = pd.DataFrame(run_json(capsys, tmp_path, *TINY["parts"])["rows"])
    by = {v: list(p["part"]) for v, p in rows.groupby("variant", sort=False)}
    fused = sparse_ff_kernel.available()
    ff_fused = ["sparse FF, fused (all three)"] if fused else []
    qkv_fused = ["sparse QKV, fused (all three)"] if fused else []
    whole = ["whole block", "rest of the block"]
    assert by["dense"] == ["QKV projection", "output projection", "attention over the cache", "dense FF", *whole]
    assert by["sparse FF + QKV"] == ["multiplicative layer", "convolution", "attention over the cache", *qkv_fused,
                                     "controller", "W1 rows", "W2 rows", *ff_fused, *whole]
    for v, part in rows.groupby("variant"):
        t = part.set_index("part")["µs"]
        share = part.set_index("part")["share"].dropna()
        assert share.sum() == pytest.approx(1.0)          # the parts the block runs and the rest make the block
        # the parts the block ran: with the kernels, the fused rows stand for the PyTorch parts they replace
        ran = [p for p in share.index if p != "rest of the block"]
        assert ("W1 rows" in ran) == (v.startswith("sparse FF") and not fused)
        assert ("sparse FF, fused (all three)" in ran) == (v.startswith("sparse FF") and fused)
        assert ("convolution" in ran) == (v.endswith("QKV") and not fused)
        assert t["rest of the block"] == pytest.approx(t["whole block"] - t[ran].sum())
        assert part.set_index("part").loc["whole block", "MB"] == pytest.approx(
            bench.block_bytes("tiny", v, cache_len=4)["total"])
        # each part's floor: the slower of its bytes at the bandwidth and its warm time; the block's, their sum
        p = part.set_index("part")
        bw = p["bandwidth GB/s"].iloc[0]
        assert bw > 0 and (p["bandwidth GB/s"] == bw).all()
        parts = p.drop(index=["whole block", "rest of the block"])
        assert (parts["warm µs"] > 0).all()
        expected = np.maximum(parts["MB"] / 1e3 / bw * 1e6, parts["warm µs"])
        np.testing.assert_allclose(parts["floor µs"], expected, rtol=1e-9)
        assert p.loc["whole block", "floor µs"] == pytest.approx(parts.loc[ran, "floor µs"].sum())
        assert np.isnan(p.loc["rest of the block", "floor µs"])
    cfg = bench.block_config("tiny", "sparse FF")
    w1 = rows[(rows["variant"] == "sparse FF") & (rows["part"] == "W1 rows")]["MB"].iloc[0]
    assert w1 == pytest.approx(cfg.d_ff // cfg.ff_block_size * cfg.d_model * 4 / 1e6)   # one row a block
    assert (rows["GB/s"] == rows["MB"] / 1e3 / (rows["µs"] / 1e6)).all() or \
        rows["GB/s"].round(6).equals((rows["MB"] / 1e3 / (rows["µs"] / 1e6)).round(6))


def test_parts_are_timed_warm_each_in_a_loop_of_its_own(monkeypatch):
    """Warm means the part's weights stay cached: called round-robin with the others, their bytes would evict its
    own, so each part gets a timing loop of its own (the cold round times them all together)."""
    from sparse_tutorial.bench import parts as parts_module

    calls = []
    real = parts_module.interleaved
    monkeypatch.setattr(parts_module, "interleaved",
                        lambda fns, **kw: calls.append((list(fns), kw.get("cold_cache", False))) or real(fns, **kw))
    table = bench.block_parts("tiny", ["sparse FF"], cache_len=4, repeats=1, warmup=0, bandwidth_gbs=10.0)
    warm = [names for names, cold in calls if not cold]
    parts = [p for p in table["part"] if p not in ("whole block", "rest of the block")]
    assert sorted(warm) == sorted([p] for p in parts)


def _parts_table(rows):
    """A block_parts-like table from (shape, variant, part, µs, floor µs) tuples."""
    return pd.DataFrame(rows, columns=["shape", "variant", "part", "µs", "floor µs"])


def test_block_floors_set_each_block_beside_its_floor_and_the_dense_block():
    W = bench.parts.WHOLE
    parts = _parts_table([("s", "dense", "dense FF", 80.0, 60.0), ("s", "dense", W, 100.0, 60.0),
                          ("s", "sparse FF", "controller", 3.0, 2.5), ("s", "sparse FF", "W1 rows", 4.0, 1.0),
                          ("s", "sparse FF", W, 10.0, 4.0), ("t", "sparse FF", W, 5.0, 2.0)])
    f = bench.block_floors(parts).set_index(["shape", "variant"])
    assert list(f.columns) == ["µs", "floor µs", "of floor", "speed-up", "speed-up at the floors",
                               "furthest part", "µs above floor"]
    assert f.loc[("s", "sparse FF"), "furthest part"] == "W1 rows"        # 3 µs above, the controller 0.5
    assert f.loc[("s", "sparse FF"), "µs above floor"] == pytest.approx(3.0)
    assert f.loc[("s", "dense"), "furthest part"] == "dense FF"           # the whole block is no part
    assert f.loc[("t", "sparse FF"), "furthest part"] is None
    assert f.loc[("s", "dense"), "speed-up"] == 1 and f.loc[("s", "dense"), "of floor"] == pytest.approx(100 / 60)
    assert f.loc[("s", "sparse FF"), "speed-up"] == pytest.approx(10.0)
    assert f.loc[("s", "sparse FF"), "speed-up at the floors"] == pytest.approx(15.0)
    assert f.loc[("s", "sparse FF"), "of floor"] == pytest.approx(2.5)
    assert np.isnan(f.loc[("t", "sparse FF"), "speed-up"])           # no dense block of that shape
    assert np.isnan(f.loc[("t", "sparse FF"), "speed-up at the floors"])


@pytest.mark.parametrize("bad", [pd.DataFrame({"part": ["x"]}), "table",
                                 _parts_table([("s", "dense", "dense FF", 1.0, 1.0)])])
def test_block_floors_refuse_a_table_that_is_not_block_parts(bad):
    with pytest.raises(ValueError, match="parts"):
        bench.block_floors(bad)


@pytest.mark.parametrize("bad", [0, -3.0, "20", True, float("nan")])
def test_block_parts_refuses_a_bandwidth_that_is_not_positive(bad):
    with pytest.raises(ValueError, match=re.escape(f"bandwidth_gbs={bad!r}")):
        bench.block_parts("tiny", ["dense"], cache_len=4, repeats=1, bandwidth_gbs=bad)


def test_a_timed_block_step_writes_into_the_caches_buffers_without_regrowing_them():
    """Each timed step of a sparse QKV block writes its position into the buffers in place, as a real decoding
    step does: copying the whole convolution state (or the keys) every call would be timed as part of the block."""
    import torch

    from sparse_tutorial.bench.block import _BlockStep, block_config

    step = _BlockStep(block_config("tiny", "sparse FF + QKV"), cache_len=8)
    with torch.inference_mode():
        step()
        buffers = [step.cache.state["conv_inputs"].data_ptr(), *(b.data_ptr() for b in step.cache.buffers())]
        for _ in range(3):
            step()
            assert [step.cache.state["conv_inputs"].data_ptr(),
                    *(b.data_ptr() for b in step.cache.buffers())] == buffers


@pytest.mark.parametrize("variant", ["dense", "sparse FF", "sparse QKV", "sparse FF + QKV"])
def test_the_lean_block_step_computes_what_the_block_does_on_the_same_cache(variant):
    """`bench block --step lean` times the block's bound step: the same output and the same cache state as the
    block itself, on every call (the cache reset between calls), without regrowing the buffers."""
    import torch

    from sparse_tutorial.bench.block import _BlockStep, block_config

    torch.manual_seed(0)
    eager = _BlockStep(block_config("tiny", variant), cache_len=8)
    torch.manual_seed(0)
    lean = _BlockStep(block_config("tiny", variant), cache_len=8, step="lean")
    with torch.inference_mode():
        eager(), lean()                                          # each takes the next of its (same) inputs
        buffers = [b.data_ptr() for b in lean.cache.buffers()]
        for _ in range(3):
            a, b = eager(), lean()
            torch.testing.assert_close(b, a.view(1, -1), atol=1e-5, rtol=0)
            torch.testing.assert_close(lean.cache.k, eager.cache.k, atol=1e-6, rtol=0)
            assert [b.data_ptr() for b in lean.cache.buffers()] == buffers
    # the lean decoder's stream: NumPy wherever the block offers it (float32 layer norms on the CPU)
    assert lean.stream == "numpy" and eager.stream is None
    with pytest.raises(ValueError, match="step"):
        bench.block_decode("tiny", step="compiled")


def test_train_times_every_training_path_it_is_given(capsys, tmp_path, monkeypatch):
    """`bench train --path fused pytorch`: the first path in the main columns, the other beside it, and the
    sparse models' layers really took those paths (the book's recipe: every call hard)."""
    from sparse_tutorial.bench import training
    from sparse_tutorial.layers import sparse_ff_kernel
    if not sparse_ff_kernel.available():
        pytest.skip("numba is not installed")
    taken = []
    original = training.sparse_ff_layers

    def spy(model):
        layers = original(model)
        taken.append(layers)
        return layers
    monkeypatch.setattr(training, "sparse_ff_layers", spy)
    out = run_json(capsys, tmp_path, *TINY["train"], "--path", "fused", "pytorch")
    row = out["rows"][0]
    assert out["paths"] == ["fused", "pytorch"] and row["path"] == "fused"
    assert row["sparse (pytorch) / dense"] == pytest.approx(row["sparse (pytorch) s per step"]
                                                            / row["dense s per step"])
    dense_layers, fused_layers, pytorch_layers = taken
    assert not dense_layers
    assert {(l.last_train_path, l.hard_prob) for l in fused_layers} == {("fused", 1.0)}
    assert {(l.last_train_path, l.hard_prob) for l in pytorch_layers} == {("pytorch", 1.0)}


def test_train_times_the_block_size_and_rank_it_is_given(capsys, tmp_path):
    """`bench train --block-size --d-lowrank`: the sparse model timed has them (default: N 32 and the reference's
    rank d_ff / N); a bad one is refused by name."""
    row = run_json(capsys, tmp_path, *TINY["train"])["rows"][0]
    assert (row["block_size"], row["d_lowrank"]) == (32, 128 // 32)           # d_ff = 4 x 32
    row = run_json(capsys, tmp_path, *TINY["train"], "--block-size", "2", "--d-lowrank", "4")["rows"][0]
    assert (row["block_size"], row["d_lowrank"]) == (2, 4)
    with pytest.raises(ValueError, match="d_lowrank must be a positive integer or None.*got d_lowrank=0"):
        bench.train_step(32, 1, batch_size=2, context_length=8, d_lowrank=0, repeats=1)
