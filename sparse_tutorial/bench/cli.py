"""The command ``python -m sparse_tutorial.bench COMMAND``: one subcommand per measurement, a table or JSON.

Every command also writes its table as ``_build/bench/<command>.csv`` (``--out-dir`` to change).
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import pandas as pd

from ..config import pick
from ..layers.registry import FF_KINDS
from ..measure.timing import machine_info
from .block import BLOCK_SHAPES, BLOCK_VARIANTS, STEPS, block_decode
from .engines import ENGINES, engine_generate
from .ff import ff_kinds, ff_layer
from .harness import DEFAULT_CSV_DIR, clock_name, num_threads, write_csv
from .int8 import quant_bench
from .long import LONG_VARIANTS, attention_lengths, long_decode
from .machine import bandwidth
from .paths import PATHS, available_paths, check_paths
from .parts import block_floors, block_parts, qkv_step
from .threads import threads_compare
from .training import train_step
from .whole_model import MODEL_VARIANTS, all_variants, crossover, generate_bench

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m sparse_tutorial.bench",
                                description="Reproduce chapter 5's measurements (tables; --json for JSON).")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    common.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1, as chapter 5: at batch 1 a token is a chain of small "
                             "operations, and with more threads each waits for the slowest thread, which on a "
                             "machine shared with other programs dominates; one thread is also timed by its own "
                             "CPU time, see the module docstring)")
    common.add_argument("--repeats", type=int, default=None, help="timed repeats (median)")
    common.add_argument("--out-dir", default=str(DEFAULT_CSV_DIR), help="folder for the CSV table")
    common.add_argument("--no-csv", action="store_true", help="do not write the CSV table")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    path = argparse.ArgumentParser(add_help=False)
    path.add_argument("--path", choices=PATHS, nargs="+", default=None,
                      help="the sparse FF decode path: 'pytorch' (SparseFF.decode in PyTorch calls) or 'fused' (its "
                           "one-call Numba kernel); default: the best available here (fused when Numba is "
                           "installed). Two paths time both in one run, the first in the main columns. The JSON "
                           "output names the (first) path in 'path', all in 'paths'")

    s = sub.add_parser("bandwidth", parents=[common], help="memory bandwidth (GB/s)")
    s.add_argument("--size-mb", type=int, default=None)

    s = sub.add_parser("ff", parents=[common, path], help="one FF layer: dense forward vs SparseFF.decode")
    s.add_argument("--d-model", type=int, nargs="+", default=[pick(default=4096, fast=512)])
    s.add_argument("--d-ff", type=int, nargs="+", default=None, help="default: 4 x d-model")
    s.add_argument("--block-size", type=int, default=64)
    s.add_argument("--d-lowrank", type=int, default=None, help="default: d_ff / block-size")
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--kind", nargs="+", default=None, choices=sorted(FF_KINDS),
                   help="time these registered FF kinds' decode (layer.decode, one token) against dense, each with "
                        "the defaults of a model of this width (chapter 6), instead of the sparse FF's paths")

    s = sub.add_parser("block", parents=[common, path], help="one Transformer block, the paper's four variants")
    s.add_argument("--shape", nargs="+", default=["800m"], choices=sorted(BLOCK_SHAPES))
    s.add_argument("--variants", nargs="+", default=list(BLOCK_VARIANTS), choices=list(BLOCK_VARIANTS))
    s.add_argument("--cache-len", type=int, default=128)
    s.add_argument("--step", nargs="+", default=["eager"], choices=list(STEPS),
                   help="'eager' calls the block's modules (as the model's forward does), 'lean' its bound step "
                        "(Block.step_function, the lean decoder's); every variant alike; two steps time both, "
                        "one after the other (default: eager)")

    s = sub.add_parser("generate", parents=[common, path], help="whole model: prefill and per-token decode")
    s.add_argument("--batch-sizes", type=int, nargs="+", default=None, help="default: 1 8 64 (fast: 1 8)")
    s.add_argument("--d-model", type=int, default=384)
    s.add_argument("--n-layers", type=int, default=6)
    s.add_argument("--prompt-len", type=int, default=None, help="default: 100 (fast: 32)")
    s.add_argument("--new-tokens", type=int, default=None, help="default: 20 (fast: 8)")
    s.add_argument("--variants", nargs="+", default=list(MODEL_VARIANTS), choices=list(all_variants()),
                   help="chapter 5's variants by default; every registered FF kind is one too, e.g. 'moe FF'")
    s.add_argument("--sparse-decode-max-rows", type=int, default=None)
    s.add_argument("--engine", nargs="+", default=["pytorch"], choices=list(ENGINES),
                   help="'lean' runs eager PyTorch's kernels with the per-call Python done once "
                        "(sparse_tutorial.lean_decode), 'torchscript' traces each model's decoding step with "
                        "torch.jit.trace, 'onnxruntime' "
                        "exports it to ONNX and runs it in ONNX Runtime, 'compile' compiles it with "
                        "torch.compile (needs a C++ compiler; tens of seconds a model); each is timed beside "
                        "eager PyTorch, every step's logits checked against it (one batch size; the 'fused' "
                        "paths are eager PyTorch's and the lean step's only)")

    s = sub.add_parser("threads", parents=[common, path],
                       help="1 thread against 2 (wall time, median and quartiles): FF layer and block")
    s.add_argument("--counts", type=int, nargs="+", default=[1, 2], help="thread counts to compare")
    s.add_argument("--ff", type=int, nargs=4, default=[4096, 16384, 64, 128],
                   metavar=("D_MODEL", "D_FF", "N", "D_LOWRANK"), help="the FF layer timed")
    s.add_argument("--shape", default="800m", choices=sorted(BLOCK_SHAPES), help="the block timed")

    s = sub.add_parser("parts", parents=[common],
                       help="one block's decoding step part by part: time, bytes, GB/s and floor of each")
    s.add_argument("--shape", default="800m", choices=sorted(BLOCK_SHAPES))
    s.add_argument("--variants", nargs="+", default=list(BLOCK_VARIANTS), choices=list(BLOCK_VARIANTS))
    s.add_argument("--cache-len", type=int, default=128)

    s = sub.add_parser("qkv", parents=[common, path],
                       help="the convolution QKV's decoding step on each path (PyTorch, fused kernel), by width")
    s.add_argument("--d-model", type=int, nargs="+", default=[384, 1024, 2048])
    s.add_argument("--cache-len", type=int, default=128)

    s = sub.add_parser("crossover", parents=[common], help="decode vs dense-masked sparse FF, by batch size")
    s.add_argument("--batch-sizes", type=int, nargs="+", default=pick(default=[1, 4, 16, 64, 128, 256],
                                                                       fast=[1, 16, 64]))
    s.add_argument("--d-model", type=int, default=384)
    s.add_argument("--n-layers", type=int, default=6)

    s = sub.add_parser("train", parents=[common, path], help="seconds per training step, dense vs sparse (--path: "
                       "the sparse FF's training path, SparseFF.train_path)")
    s.add_argument("--d-model", type=int, default=pick(default=128, fast=64))
    s.add_argument("--n-layers", type=int, default=pick(default=4, fast=2))
    s.add_argument("--batch-size", type=int, default=pick(default=32, fast=8))
    s.add_argument("--context-length", type=int, default=pick(default=128, fast=64))
    s.add_argument("--block-size", type=int, default=32, help="the sparse FF's block size N (the book's: 32)")
    s.add_argument("--d-lowrank", type=int, default=None,
                   help="the controller's rank (default: d_ff / block-size, the reference's)")

    s = sub.add_parser("attention", parents=[common], help="one attention layer: full against LSH, by length")
    s.add_argument("--lengths", type=int, nargs="+", default=None, help="default: 512 ... 16384 (fast: 128 ... 1024)")
    s.add_argument("--window", type=int, default=32)
    s.add_argument("--hashes", type=int, default=2)

    s = sub.add_parser("long", parents=[common], help="whole models decoding after a long prompt (chapter 7)")
    s.add_argument("--context", type=int, nargs="+", default=None, help="prompt lengths; default: 512 1024 2048 4096")
    s.add_argument("--variants", nargs="+", default=list(LONG_VARIANTS), choices=list(LONG_VARIANTS))
    s.add_argument("--new-tokens", type=int, default=None)

    s = sub.add_parser("quant", parents=[common], help="int8 weights vs sparse FF, per-token decode")
    s.add_argument("--batch-sizes", type=int, nargs="+", default=[1])
    s.add_argument("--d-model", type=int, default=384)
    s.add_argument("--n-layers", type=int, default=6)
    return p


def _run(args) -> pd.DataFrame:
    c = args.command
    if c == "bandwidth":
        return bandwidth(args.size_mb, args.repeats)
    if c == "ff" and args.kind:
        if args.d_ff or args.d_lowrank or args.batch != 1:
            raise ValueError("--kind times d_ff = 4 x d_model at batch 1 with each kind's defaults; it takes "
                             f"no --d-ff, --d-lowrank or --batch, got d_ff={args.d_ff}, "
                             f"d_lowrank={args.d_lowrank}, batch={args.batch}")
        return ff_kinds(args.d_model, args.kind, block_size=args.block_size, repeats=args.repeats, progress=False)
    if c == "ff":
        d_ffs = args.d_ff or [4 * d for d in args.d_model]
        if len(d_ffs) == 1 and len(args.d_model) > 1:
            d_ffs = d_ffs * len(args.d_model)
        if len(d_ffs) != len(args.d_model):
            raise ValueError(f"--d-ff takes one value or one per --d-model, got d_ff={d_ffs} for "
                             f"d_model={args.d_model}")
        rows = [ff_layer(d, f, args.block_size, args.d_lowrank, batch=args.batch, repeats=args.repeats,
                         paths=args.paths) for d, f in zip(args.d_model, d_ffs)]
        return pd.DataFrame(rows)
    if c == "block":
        return pd.concat([block_decode(s, args.variants, cache_len=args.cache_len, repeats=args.repeats,
                                       progress=False, paths=args.paths, step=st)
                          for s in args.shape for st in args.step], ignore_index=True)
    if c == "generate" and args.engine != ["pytorch"]:
        batches = args.batch_sizes or [1]
        if len(batches) != 1 or args.sparse_decode_max_rows is not None:
            raise ValueError(f"--engine other than pytorch times one batch size with the models' own "
                             f"decode rule; got batch sizes {batches}, "
                             f"sparse_decode_max_rows={args.sparse_decode_max_rows}")
        return engine_generate(args.variants, engines=args.engine, batch=batches[0], d_model=args.d_model,
                               n_layers=args.n_layers, prompt_len=args.prompt_len or pick(default=100, fast=32),
                               new_tokens=args.new_tokens or pick(default=20, fast=8),
                               repeats=args.repeats or pick(default=5, fast=2), progress=False,
                               path=args.paths[0])
    if c == "generate":
        return generate_bench(args.batch_sizes, d_model=args.d_model, n_layers=args.n_layers,
                              prompt_len=args.prompt_len, new_tokens=args.new_tokens, variants=args.variants,
                              sparse_decode_max_rows=args.sparse_decode_max_rows, repeats=args.repeats,
                              progress=False, paths=args.paths)
    if c == "qkv":
        return qkv_step(args.d_model, cache_len=args.cache_len, paths=args.paths, repeats=args.repeats)
    if c == "parts":
        return block_parts(args.shape, args.variants, cache_len=args.cache_len, repeats=args.repeats)
    if c == "threads":
        return threads_compare(args.counts, ff_shape=args.ff, block_shape=args.shape, repeats=args.repeats,
                               paths=args.paths)
    if c == "crossover":
        return crossover(args.batch_sizes, d_model=args.d_model, n_layers=args.n_layers, repeats=args.repeats,
                         progress=False)
    if c == "train":
        return train_step(args.d_model, args.n_layers, batch_size=args.batch_size,
                          context_length=args.context_length, block_size=args.block_size,
                          d_lowrank=args.d_lowrank, repeats=args.repeats, paths=args.paths,
                          progress=False)
    if c == "attention":
        lengths = args.lengths or pick(default=[512, 1024, 2048, 4096, 8192, 16384], fast=[128, 256, 512, 1024])
        return attention_lengths(lengths, window=args.window, n_hashes=args.hashes, repeats=args.repeats,
                                 progress=False)
    if c == "long":
        return long_decode(args.context or pick(default=[512, 1024, 2048, 4096], fast=[64, 256]), args.variants,
                           new_tokens=args.new_tokens, repeats=args.repeats, progress=False)
    if c == "quant":
        return quant_bench(args.batch_sizes, d_model=args.d_model, n_layers=args.n_layers, repeats=args.repeats,
                           progress=False)
    raise ValueError(f"unknown command {c!r}")  # argparse prevents this


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m sparse_tutorial.bench``; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if hasattr(args, "path"):
            # None -> [the best available]; the qkv command compares the paths: every one available
            args.paths = check_paths(args.path if args.path or args.command != "qkv" else available_paths())
        with num_threads(args.threads):
            t0 = time.perf_counter()
            df = _run(args)
            elapsed = time.perf_counter() - t0
            machine = {**machine_info(), "clock": clock_name()}
    except ValueError as e:
        parser.error(str(e))                                  # exit status 2 with the message on stderr
    csv = None if args.no_csv else str(write_csv(df, args.command, args.out_dir))
    # parts: each variant's whole block beside its floor, and the speed-ups measured and at the floors
    floors = block_floors(df) if args.command == "parts" else None
    if args.json:
        print(json.dumps({"command": args.command, "machine": machine, "seconds": elapsed, "csv": csv,
                          "path": args.paths[0] if hasattr(args, "paths") else None,
                          "paths": args.paths if hasattr(args, "paths") else None,
                          "rows": json.loads(df.to_json(orient="records")),
                          **({"floors": json.loads(floors.to_json(orient="records"))} if floors is not None
                             else {})}))
    else:
        shown = df.drop(columns=[c for c in ("cpu", "threads", "clock") if c in df.columns])
        with pd.option_context("display.width", 200, "display.max_columns", 30, "display.float_format",
                               "{:.4g}".format):
            print(f"{args.command}: {machine['cpu']}, {machine['logical cores']} logical cores, torch "
                  f"{machine['torch']} with {machine['torch threads']} threads, timed by {machine['clock']} "
                  f"({elapsed:.1f} s)"
                  + (f", sparse FF {'training' if args.command == 'train' else 'decode'} path: "
                     f"{' and '.join(args.paths)}" if hasattr(args, "paths") else ""))
            print(shown.to_string(index=False))
            if floors is not None:
                print("\nfloors (each part at the slower of its bytes at the streaming bandwidth and its warm time):")
                print(floors.to_string(index=False))
            if csv:
                print(f"written: {csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
