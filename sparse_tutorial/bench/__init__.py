"""Chapter 5's measurements, as functions (the notebook calls them) and as a command that prints tables.

    python -m sparse_tutorial.bench bandwidth
    python -m sparse_tutorial.bench ff --d-model 4096 --d-ff 16384 --block-size 64 --d-lowrank 128
    python -m sparse_tutorial.bench ff --d-model 256 512 1024 2048 4096        # a width sweep, d_ff = 4 d_model
    python -m sparse_tutorial.bench ff --kind sparse moe pkm --d-model 512 2048  # every FF kind against dense
    python -m sparse_tutorial.bench block --shape 800m 17b
    python -m sparse_tutorial.bench block --step eager lean                    # module calls against the lean step
    python -m sparse_tutorial.bench generate --batch-sizes 1 8 64
    python -m sparse_tutorial.bench generate --engine pytorch lean onnxruntime   # the lean step, ONNX Runtime
    python -m sparse_tutorial.bench generate --engine pytorch compile          # torch.compile (a C++ compiler)
    python -m sparse_tutorial.bench crossover                                  # where the gather path stops paying
    python -m sparse_tutorial.bench threads                                    # 1 thread against 2, with spreads
    python -m sparse_tutorial.bench parts --shape 17b                          # one block, part by part, with floors
    python -m sparse_tutorial.bench qkv --d-model 384 1024 2048                # the conv QKV step, each path
    python -m sparse_tutorial.bench train
    python -m sparse_tutorial.bench attention --lengths 1024 4096 16384             # full against LSH attention
    python -m sparse_tutorial.bench long --context 512 4096                     # decoding after a long prompt
    python -m sparse_tutorial.bench quant

``ff``, ``block``, ``generate`` and ``qkv`` take ``--path pytorch|fused``: the sparse FF's decode and the
convolution QKV's step in PyTorch calls or in their one-call kernels (default: the best available, :mod:`.paths`);
tables and JSON name the path timed.
Add ``--json`` for one JSON object on stdout instead of the table, ``--threads N`` to set torch's thread
count (default 1, the setting of chapter 5; with two threads on a two-core machine that also runs other
programs, a batch-1 decoding step measured many times slower). Every command also writes its table as ``_build/bench/<command>.csv`` (``--out-dir`` to change).

Method, the same everywhere:

* warm-up calls first, then the median over ``repeats`` timed calls;
* the variants of one comparison live in the same process and are called round-robin (dense, sparse,
  dense, sparse, ...), so a noisy neighbour slows all of them alike; ratios come from one run;
* single layers and blocks are timed **with a cold cache**: before every timed call a buffer of four times
  the last-level cache is read, evicting the weights. A decoding model reads each layer's weights once per
  token and the other layers evict them before the next token, so a layer that fits in the cache must not be
  timed from the cache. Whole models are timed as they are (their own layers do the evicting);
* with one torch thread the clock is the thread's **CPU time** (``time.thread_time``), otherwise wall time.
  On a machine shared with other programs the operating system pauses our thread for theirs; wall time then
  grows with the length of a call (a 400 ms call is always interrupted, a 50 µs one rarely), which distorts
  ratios. A single thread's CPU time counts only the time it ran, memory stalls included;
* the machine (CPU model, torch threads, clock) goes into every result.

Modules, by what they measure: :mod:`.machine` (bandwidth), :mod:`.ff` (one FF layer), :mod:`.block` (one
block, the paper's four variants), :mod:`.whole_model` (prefill, decoding, the gather/masked crossover),
:mod:`.engines` (decoding in eager PyTorch, its lean step, TorchScript, ONNX Runtime and ``torch.compile``; the
bytes each variant's step reads), :mod:`.training` (a training step), :mod:`.int8` (int8 weights against sparsity), :mod:`.long` (long sequences: attention by length, decoding after a long prompt), :mod:`.targets` (the
chapter's goals), :mod:`.paths` (the sparse FF's decode paths), :mod:`.threads` (thread counts side by side), :mod:`.parts` (one block part by part, the convolution QKV's step by path); :mod:`.harness` holds the timing machinery they share and :mod:`.cli` the command.
"""
from .block import BLOCK_SHAPES, BLOCK_VARIANTS, PAPER_BLOCK_MS, STEPS, block_config, block_decode, paper_speedup
from .block import block_bytes, bytes_verdicts, main_rows
from .block import bytes_table as block_bytes_table
from .block import path_table as block_path_table
from .cli import main
from .engines import DEFAULT_ENGINES, ENGINES, bytes_floor, bytes_limits, engine_generate, step_weight_bytes
from .ff import ff_kinds, ff_layer, ff_rows, ff_sweep
from .ff import path_table as ff_path_table
from .harness import DEFAULT_CSV_DIR, clock, clock_name, interleaved, num_threads, write_csv
from .int8 import quant_bench
from .long import LONG_VARIANTS, attention_lengths, long_config, long_decode
from .machine import bandwidth
from .paths import PATHS, available_paths, best_path
from .targets import target_table
from .parts import block_floors, block_parts, qkv_step
from .threads import threads_compare, threads_table, threads_verdicts
from .training import train_step
from .whole_model import MODEL_VARIANTS, crossover, forward_tokens, generate_bench, model_config

__all__ = [
    "BLOCK_SHAPES", "BLOCK_VARIANTS", "PAPER_BLOCK_MS", "MODEL_VARIANTS", "DEFAULT_CSV_DIR",
    "num_threads", "clock", "clock_name", "interleaved", "bandwidth", "ff_layer", "ff_kinds", "ff_sweep", "ff_rows", "block_config", "block_decode", "STEPS",
    "paper_speedup",
    "model_config", "generate_bench", "forward_tokens", "crossover", "train_step", "quant_bench",
    "write_csv", "target_table", "LONG_VARIANTS", "attention_lengths", "long_config", "long_decode", "main", "block_parts", "block_floors", "threads_compare", "threads_verdicts", "threads_table", "PATHS", "best_path", "available_paths", "ff_path_table", "block_path_table", "main_rows",
    "block_bytes", "block_bytes_table", "bytes_verdicts", "ENGINES", "DEFAULT_ENGINES", "engine_generate", "bytes_floor", "bytes_limits", "step_weight_bytes", "qkv_step",
]
