"""Running the book's experiments: train a model or load it from a checkpoint, and the training command.

This module sits above :mod:`.train` and :mod:`.checkpoint` and uses both, so neither imports the other::

    python -m sparse_tutorial.train --ff sparse --steps 500 --save

(``python -m sparse_tutorial.train`` runs :func:`main`; so does ``python -m sparse_tutorial.run``.)
"""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import pandas as pd
import torch

from .checkpoint import CheckpointUnreadableError, checkpoint_path, load_checkpoint, save_checkpoint
from .data import TextData, load_tiny_shakespeare
from .layers.registry import FF_KINDS, QKV_KINDS
from .model import ModelConfig, TransformerLM, book_config, seed_config
from .train import TrainConfig, book_train_config, seed_train_config, train_lm

__all__ = ["train_or_load", "main"]


def train_or_load(cfg: ModelConfig, tc: TrainConfig, data: TextData, *, progress: bool = True,
                  folder: Path | None = None) -> tuple[TransformerLM, pd.DataFrame, bool]:
    """Load the matching checkpoint if one exists, else train and save. Returns ``(model, history, loaded)``.

    A file that cannot be read (truncated, empty, foreign) counts as absent: a warning names it, the model is
    retrained, and the new checkpoint replaces it atomically. A readable file saved with another configuration
    is refused (:class:`~sparse_tutorial.checkpoint.CheckpointMismatchError`), never overwritten.
    """
    path = checkpoint_path(cfg, tc, folder)
    if path.is_file():
        try:
            model, history = load_checkpoint(path, cfg, tc)
            return model, history, True
        except CheckpointUnreadableError as err:
            warnings.warn(f"{err} Retraining it now.", stacklevel=2)
    torch.manual_seed(tc.seed)
    model = TransformerLM(cfg)
    history = train_lm(model, data, tc, progress=progress)
    save_checkpoint(model, tc, history, path)
    return model, history, False


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(prog="python -m sparse_tutorial.train",
                                     description="Train a dense- or sparse-FF character model on Tiny Shakespeare.")
    parser.add_argument("--ff", choices=sorted(FF_KINDS), default="sparse")
    parser.add_argument("--qkv", choices=sorted(QKV_KINDS), default="dense")
    parser.add_argument("--preset", choices=["book", "seed"], default="book",
                        help="book: the chapter's laptop run; seed: d_model 384, 6 layers, context 256, 6000 steps")
    parser.add_argument("--block-size", type=int,
                        help="override the preset's FF block size N (d_ff / N units active per token)")
    parser.add_argument("--steps", type=int, help="override the preset's number of steps")
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument("--save", action="store_true", help="save a checkpoint into the cache folder")
    args = parser.parse_args(argv)

    overrides = {k: v for k, v in dict(steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                       seed=args.seed).items() if v is not None}
    data = load_tiny_shakespeare()
    make_cfg, make_tc = (book_config, book_train_config) if args.preset == "book" else (seed_config, seed_train_config)
    model_overrides = {} if args.block_size is None else {"ff_block_size": args.block_size}
    cfg: ModelConfig = make_cfg(ff=args.ff, qkv=args.qkv, vocab_size=len(data.vocab), **model_overrides)
    tc = make_tc(**overrides)
    torch.manual_seed(tc.seed)
    model = TransformerLM(cfg)
    print(f"{args.ff} FF, {args.qkv} QKV, {model.num_params():,} parameters, {tc.steps} steps, "
          f"{torch.get_num_threads()} threads")
    history = train_lm(model, data, tc, progress=not args.no_progress)
    print(history.to_string(index=False))
    if args.save:
        path = save_checkpoint(model, tc, history)
        print(f"saved {path}")
    val = float(history["val_loss"].iloc[-1])
    print(f"final val loss {val:.4f}")
    return val


if __name__ == "__main__":
    main()
