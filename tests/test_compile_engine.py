"""The decoding step compiled with torch.compile (sparse_tutorial.onnx_engine.compile_decoder).

Compiling takes seconds per graph, so these tests compile few models: one per attention kind that has its own
cache state (dense keys and values; the convolution's inputs), each with sparse FF layers."""
import numpy as np
import pytest
import torch

from test_onnx_engine import pytorch_steps, tiny     # the same tiny models and eager reference as the ONNX tests

from sparse_tutorial import onnx_engine
from sparse_tutorial.bench import engine_generate

needs_compiler = pytest.mark.skipif(onnx_engine.compile_unavailable_reason() is not None,
                                    reason=str(onnx_engine.compile_unavailable_reason()))


@needs_compiler
@pytest.mark.parametrize("kinds, batch, prompt_len", [
    (dict(ff="sparse"), 1, 5), (dict(ff="sparse", qkv="conv", qkv_modules=4), 2, 9)])
def test_the_compiled_graphs_decode_token_by_token_as_eager_pytorch(kinds, batch, prompt_len):
    model = tiny(**kinds)
    decoder = onnx_engine.compile_decoder(model, batch=batch)
    prompt = torch.randint(0, 40, (batch, prompt_len))                   # not the compiled example's 4 tokens
    tokens, logits = decoder.generate(prompt.numpy(), 14)                # a cache of every length up to 22
    ref_tokens, ref_logits = pytorch_steps(model, prompt, 14)
    np.testing.assert_array_equal(tokens, ref_tokens)
    assert len(logits) == len(ref_logits) == 14
    for step, (a, b) in enumerate(zip(logits, ref_logits)):
        assert np.abs(a - b).max() < 1e-4, f"step {step}"
    # the model itself is untouched: its sparse FF layers keep their decode path
    assert [b.ff.decode_path for b in model.blocks] == ["auto", "auto"]


@needs_compiler
def test_generate_times_the_compile_engine_against_eager_pytorch():
    df = engine_generate(["dense"], engines=["pytorch", "compile"], d_model=64, n_layers=1, prompt_len=6,
                         new_tokens=3, context_length=16, qkv_modules=4, repeats=1, progress=False)
    row = df.set_index("engine").loc["compile"]
    assert row["max |logit diff|"] < 1e-4 and row["decode µs per token"] > 0


def test_a_machine_without_a_compiler_is_told_what_to_install(monkeypatch):
    monkeypatch.setattr(onnx_engine.shutil, "which", lambda name: None)
    assert "apt-get install g++" in onnx_engine.compile_unavailable_reason()


def test_a_machine_where_inductor_fails_gets_a_runtime_error_that_says_what_to_install(monkeypatch):
    def failing_compile(graph, **kw):
        def run(*args):
            raise OSError("g++: command not found")                       # what Inductor meets without one
        return run
    monkeypatch.setattr(torch, "compile", failing_compile)
    with pytest.raises(RuntimeError, match="C\\+\\+ compiler.*apt-get install g\\+\\+"):
        onnx_engine.compile_decoder(tiny(ff="sparse"))


@pytest.mark.parametrize("kw, field", [(dict(qkv="lsh"), "qkv"), (dict(reversible=True), "reversible")])
def test_an_unsupported_model_is_refused_by_name(kw, field):
    with pytest.raises(ValueError, match=field):
        onnx_engine.compile_decoder(tiny(**kw))


@pytest.mark.parametrize("kw", [dict(batch=0), dict(threads=0)])
def test_bad_arguments_name_themselves(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        onnx_engine.compile_decoder(tiny(), **kw)
