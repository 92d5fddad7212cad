"""The ONNX export of the decoding step (sparse_tutorial.onnx_engine) and ``bench generate --engine``."""
import importlib.util

import numpy as np
import pandas as pd
import pytest
import torch

from sparse_tutorial import bench, onnx_engine
from sparse_tutorial.bench import cli
from sparse_tutorial.bench.engines import bytes_floor, engine_generate
from sparse_tutorial.layers import sparse_ff_kernel
from sparse_tutorial.model import ModelConfig, TransformerLM

pytestmark = pytest.mark.skipif(not onnx_engine.available(), reason=str(onnx_engine.unavailable_reason()))


def tiny(**kw):
    base = dict(vocab_size=40, context_length=32, d_model=32, n_heads=2, n_layers=2, d_ff=128, ff_block_size=8)
    base.update(kw)
    torch.manual_seed(0)
    return TransformerLM(ModelConfig(**base)).eval()


def pytorch_steps(model, prompt, n):
    """PyTorch's greedy tokens and the last position's logits after the prompt and after each step."""
    cache, logits_seen = model.new_cache(), []
    with torch.no_grad():
        logits, _ = model(prompt, cache=cache)
        idx = prompt
        for _ in range(n):
            logits_seen.append(logits[:, -1].numpy())
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], 1)
            logits, _ = model(nxt, cache=cache)
    return idx.numpy(), logits_seen


@pytest.mark.parametrize("kinds, batch", [
    (dict(ff="dense"), 1), (dict(ff="sparse"), 1), (dict(ff="sparse", qkv="conv", qkv_modules=4), 1),
    (dict(ff="sparse", qkv="conv", qkv_modules=4), 2),
    (dict(ff="sparse", ff_scale_by_prob=True, qkv="multiplicative", qkv_modules=4), 1)])
def test_onnx_runtime_decodes_token_by_token_as_pytorch(kinds, batch, tmp_path):
    model = tiny(**kinds)
    decoder = onnx_engine.export_decoder(model, batch=batch, directory=tmp_path)
    prompt = torch.randint(0, 40, (batch, 5))
    tokens, logits = decoder.generate(prompt.numpy(), 12)
    ref_tokens, ref_logits = pytorch_steps(model, prompt, 12)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert len(logits) == len(ref_logits) == 12
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert np.abs(a - b).max() < 1e-4, f"step {step}"
    assert len(decoder.per_token) == 11 and min(decoder.per_token) > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompt.onnx", "step.onnx"]


def test_the_state_is_every_layers_keys_values_and_convolution_inputs(tmp_path):
    model = tiny(ff="sparse", qkv="conv", qkv_modules=4)
    assert onnx_engine.state_names(model) == ["k0", "v0", "conv0", "k1", "v1", "conv1"]
    decoder = onnx_engine.export_decoder(model, directory=tmp_path)
    _, state = decoder.prefill(np.zeros((1, 6), np.int64))
    cache = model.new_cache()
    with torch.no_grad():
        model(torch.zeros(1, 6, dtype=torch.long), cache=cache)
    for name, tensor in zip(decoder.names, state):
        layer = cache.layers[int(name[-1])]
        ref = {"k": layer.k, "v": layer.v, "c": layer.state.get("conv_inputs")}[name[0]]
        assert tensor.shape == tuple(ref.shape)
        assert np.abs(tensor - ref.numpy()).max() < 1e-5


def test_the_export_leaves_the_layers_decode_path_as_it_found_it(tmp_path):
    model = tiny(ff="sparse")
    model.blocks[1].ff.decode_path = "pytorch"
    onnx_engine.export_decoder(model, directory=tmp_path)
    assert [b.ff.decode_path for b in model.blocks] == ["auto", "pytorch"]


@pytest.mark.parametrize("kw, field", [(dict(qkv="lsh"), "qkv"), (dict(reversible=True), "reversible"),
                                       (dict(sru_dim=4), "sru_dim")])
def test_an_unsupported_model_is_refused_by_name(kw, field, tmp_path):
    with pytest.raises(ValueError, match=field):
        onnx_engine.export_decoder(tiny(**kw), directory=tmp_path)
    assert not any(tmp_path.iterdir())                                   # nothing half-written


@pytest.mark.parametrize("kw", [dict(batch=0), dict(batch=True), dict(threads=0)])
def test_bad_arguments_name_themselves(kw, tmp_path):
    with pytest.raises(ValueError, match=next(iter(kw))):
        onnx_engine.export_decoder(tiny(), directory=tmp_path, **kw)


def test_a_prompt_too_long_for_the_context_or_too_short_for_the_step_is_refused(tmp_path):
    decoder = onnx_engine.export_decoder(tiny(), directory=tmp_path)
    with pytest.raises(ValueError, match="context_length=32"):
        decoder.generate(np.zeros((1, 30), np.int64), 5)
    with pytest.raises(ValueError, match="time >= 2"):
        decoder.generate(np.zeros((1, 1), np.int64), 5)


def test_a_failed_export_leaves_no_file(tmp_path, monkeypatch):
    def fail_second(graph, args, path, *rest):
        path.write_bytes(b"partial")
        if path.name == "step.onnx":
            raise RuntimeError("planted")
    monkeypatch.setattr(onnx_engine, "_export", fail_second)
    with pytest.raises(RuntimeError, match="planted"):
        onnx_engine.export_decoder(tiny(), directory=tmp_path)
    assert not any(tmp_path.iterdir())


def test_without_the_packages_the_engine_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name, *a))
    assert not onnx_engine.available()
    assert "pip install onnxruntime" in onnx_engine.unavailable_reason()
    with pytest.raises(RuntimeError, match="pip install onnxruntime"):
        onnx_engine.export_decoder(tiny())
    with pytest.raises(ValueError, match="onnxruntime"):
        engine_generate(["dense"], engines=["onnxruntime"], d_model=64, n_layers=1, prompt_len=4, new_tokens=2,
                        context_length=16, repeats=1, warmup=0, progress=False)


def test_engine_bench_checks_every_step_against_pytorch():
    df = engine_generate(["dense", "sparse FF"], d_model=64, n_layers=1, prompt_len=6, new_tokens=3,
                         context_length=16, repeats=2, warmup=0, progress=False)
    assert list(df["engine"]) == ["pytorch", "lean", "torchscript", "onnxruntime"] * 2
    assert (df["max |logit diff|"] < 1e-4).all()
    if sparse_ff_kernel.available():                   # the lean step runs eager PyTorch's fused kernels
        assert list(df.loc[df["variant"] == "sparse FF", "step path"].iloc[:2]) == ["fused", "fused"]
    assert (df.loc[df["engine"] == "pytorch", "max |logit diff|"] == 0).all()
    assert (df["decode µs per token"] > 0).all()
    dense = df[df["variant"] == "dense"].set_index("engine")["decode µs per token"]
    for _, row in df.iterrows():
        own = dense[row["engine"]]
        assert row["speed-up (dense / variant)"] == pytest.approx(own / row["decode µs per token"])
        assert row["speed-up vs fastest dense"] == pytest.approx(dense.min() / row["decode µs per token"])


@pytest.mark.parametrize("kw, match", [(dict(engines=["tensorrt"]), "engine"), (dict(engines=[]), "engines"),
                                       (dict(engines=["pytorch", "pytorch"]), "engines"),
                                       (dict(new_tokens=20), "context_length")])
def test_engine_bench_refuses_bad_arguments(kw, match):
    args = dict(d_model=64, n_layers=1, prompt_len=4, new_tokens=2, context_length=16, repeats=1, warmup=0,
                progress=False)
    args.update(kw)
    with pytest.raises(ValueError, match=match):
        engine_generate(["dense"], **args)


def test_cli_times_one_batch_size_per_engine_run(capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["generate", "--engine", "onnxruntime", "--batch-sizes", "1", "8", "--no-csv"])
    assert e.value.code == 2
    assert "one batch size" in capsys.readouterr().err


def engine_table():
    rows = [("dense", "pytorch", 6000.0), ("dense", "onnxruntime", 3000.0), ("sparse FF", "pytorch", 3000.0),
            ("sparse FF", "onnxruntime", 1500.0), ("sparse FF + QKV", "pytorch", 2000.0),
            ("sparse FF + QKV", "onnxruntime", 1000.0)]
    df = pd.DataFrame(rows, columns=["variant", "engine", "decode µs per token"])
    df["speed-up vs fastest dense"] = 3000.0 / df["decode µs per token"]
    return df.assign(batch=1, d_model=384, n_layers=6, context_length=256, prompt_len=100, new_tokens=20)


def test_bytes_floor_reads_every_weight_and_the_mean_cache():
    from sparse_tutorial.bench import model_config

    floor = bytes_floor(engine_table(), read_gbps=10.0)
    weights = 4 * TransformerLM(model_config("dense")).num_params()
    kv = 4 * 2 * 6 * (100 + 21 / 2) * 384
    assert list(floor["engine"]) == ["pytorch", "onnxruntime"]
    assert floor["MB read per step"].iloc[0] == pytest.approx((weights + kv) / 1e6)
    assert floor["floor µs"].iloc[0] == pytest.approx((weights + kv) / 10e9 * 1e6)
    assert floor["time / floor"].iloc[1] == pytest.approx(3000.0 / floor["floor µs"].iloc[1])
    with pytest.raises(ValueError, match="read_gbps"):
        bytes_floor(engine_table(), read_gbps=0)


def test_target_table_takes_the_better_engine():
    df = engine_table()
    floor = pd.DataFrame({"engine": ["pytorch", "onnxruntime"], "time / floor": [2.4, 1.2]})
    met = bench.target_table(engines=df, floor=floor).set_index("target")
    rows = {t: r for t, r in met.iterrows() if "best engine" in t or "bytes floor" in t}
    assert [r["measured"] for r in rows.values()] == ["2.00", "3.00", "1.20"]
    assert [r["met"] for r in rows.values()] == ["NO", "NO", "yes"]
    assert set(bench.target_table().set_index("target").loc[list(rows), "met"]) == {"not run"}


def test_engine_bench_times_the_pytorch_path_it_is_given():
    df = engine_generate(["sparse FF"], engines=["pytorch"], d_model=64, n_layers=1, prompt_len=4, new_tokens=2,
                         context_length=16, repeats=1, warmup=0, progress=False, path="pytorch")
    assert list(df["engine"]) == ["pytorch"] and list(df["step path"]) == ["pytorch"]
    with pytest.raises(ValueError, match="path"):
        engine_generate(["dense"], engines=["pytorch"], d_model=64, n_layers=1, prompt_len=4, new_tokens=2,
                        context_length=16, repeats=1, warmup=0, progress=False, path="cuda")


def test_a_steps_bytes_count_one_row_in_n_of_the_sparse_ff_and_the_tied_head_once():
    from sparse_tutorial.bench.whole_model import model_config
    dense = TransformerLM(model_config("dense", 64, 2, context_length=16))
    sparse = TransformerLM(model_config("sparse FF", 64, 2, context_length=16, block_size=8))
    assert bench.step_weight_bytes(dense) == 4 * dense.num_params()          # every weight once, tied head too
    rows = sum(b.ff.w1.numel() + b.ff.w2.numel() for b in sparse.blocks)
    assert bench.step_weight_bytes(sparse) == pytest.approx(4 * (sparse.num_params() - rows + rows / 8))


def test_bytes_limits_put_each_variants_best_engine_against_what_its_bytes_allow():
    df = pd.DataFrame([dict(variant=v, engine=e, batch=1, d_model=64, n_layers=2, context_length=16,
                            prompt_len=6, new_tokens=3, **{"speed-up vs fastest dense": x})
                       for v, e, x in [("dense", "pytorch", 0.8), ("dense", "lean", 1.0),
                                       ("sparse FF", "pytorch", 1.2), ("sparse FF", "lean", 1.5)]])
    t = bench.bytes_limits(df)
    assert list(t.index) == ["dense", "sparse FF"] and t.loc["dense", "bytes x"] == 1.0
    assert t.loc["sparse FF", "bytes x"] == pytest.approx(t.loc["dense", "MB read per step"]
                                                          / t.loc["sparse FF", "MB read per step"])
    assert t.loc["sparse FF", "bytes x"] > 1.5
    assert (t.loc["sparse FF", "measured x"], t.loc["sparse FF", "best engine"]) == (1.5, "lean")
    assert t.loc["sparse FF", "share of bytes limit"] == pytest.approx(1.5 / t.loc["sparse FF", "bytes x"])
