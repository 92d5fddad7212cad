"""The sentences chapters print from their numbers: they carry the numbers, and fit the page."""
import pandas as pd

from sparse_tutorial.studies import readings


def sweep(times):
    return pd.DataFrame({"batch": [1, 2, 4][:len(times)], "µs per token": times,
                         "weight bytes": [8e6] * len(times), "FLOPs": [4e6] * len(times)})


def test_lines_fit_the_column():
    text = readings.batch_sweep(sweep([100.0, 120.0, 30.0]))
    assert max(map(len, text.splitlines())) <= readings.WIDTH
    assert "went UP when the batch grew to [2]" in text and "3.3x less" in text


def test_a_sweep_that_falls_every_step_says_so():
    assert "fell at every step" in readings.batch_sweep(sweep([100.0, 60.0, 30.0]))
    assert "did NOT fall" in readings.batch_sweep(sweep([10.0, 60.0, 30.0]))


def test_batch1_prediction_is_bytes_over_bandwidth():
    p = readings.batch1_prediction(sweep([500.0]), bandwidth_gbs=20.0, peak_gflops=100.0)
    assert p["predicted µs"] == 400.0 and p["measured / predicted"] == 1.25
    assert "8.0 MB of weights / 20.0 GB/s = 400 µs" in readings.batch1_sentence(p).replace("\n", " ")


def test_bytes_limits_match_the_costs():
    from sparse_tutorial.measure.costs import bytes_limit_ratio
    table = readings.bytes_limits(20.0, [("800M", 1024, 4096, 64, 64)])
    assert table.loc["800M", "limit (x)"] == bytes_limit_ratio(1024, 4096, 64, 64)
    assert table.loc["800M", "dense MB"] / table.loc["800M", "sparse MB"] == table.loc["800M", "limit (x)"]


def test_qkv_training_reads_cost_from_the_numbers():
    results = pd.DataFrame({"val loss": [2.0, 2.1], "s / step (here)": [1.0, 0.5]},
                           index=["dense", "sparse FF + sparse QKV"])
    text = readings.qkv_training(results, 10, 8, 32).replace("\n", " ")
    assert "0.100 nats above" in text and "0.50x" in text and "cheaper to train here" in text
    results["s / step (here)"] = [1.0, 1.5]
    assert "NOT cheaper" in readings.qkv_training(results, 10, 8, 32).replace("\n", " ")
