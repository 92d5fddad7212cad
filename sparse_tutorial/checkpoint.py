"""Save and load trained language models, keyed by their configuration.

A checkpoint holds the state dict, the model and training configs and the training history. Its file
name encodes the config (readable part + hash), so chapter 4 and 5 find chapter 3's models when they
match. Loading a checkpoint whose config differs from the requested one is refused, never silent.
:func:`sparse_tutorial.run.train_or_load` loads one or trains and saves it.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import pandas as pd
import torch

from . import config as run_config
from .model import ModelConfig, TransformerLM
from .train import TrainConfig

__all__ = ["CheckpointMismatchError", "CheckpointUnreadableError", "checkpoint_path", "save_checkpoint",
           "load_checkpoint"]


class CheckpointMismatchError(ValueError):
    """The checkpoint on disk was made with another configuration than the one asked for."""


class CheckpointUnreadableError(ValueError):
    """The file is not a checkpoint this package wrote: truncated, empty, foreign, or refused by the safe loader.

    :func:`sparse_tutorial.run.train_or_load` treats such a file as absent: it warns, retrains and replaces it.
    """


def _layout(cfg: ModelConfig) -> str:
    """A digest of the parameter names and shapes the current code builds for ``cfg``.

    It changes when the model code changes (a renamed or reshaped parameter), so a checkpoint written by
    an older version of the package is never matched to the new code: it is retrained instead.
    """
    with torch.device("meta"):  # shapes only, no memory, no initialisation cost
        state = TransformerLM(cfg).state_dict()
    layout = ";".join(f"{name}:{tuple(t.shape)}" for name, t in state.items())
    return hashlib.sha1(layout.encode()).hexdigest()[:12]


#: Config fields added after checkpoints were first written (chapter 7's options). At their defaults they change
#: nothing about a model, so they are left out of its key: a checkpoint written before they existed stays valid.
LATER_FIELDS = ("lsh_hashes", "lsh_buckets", "lsh_window", "reversible", "sru_dim", "loss_modules")


def _key(cfg: ModelConfig, tc: TrainConfig) -> dict:
    defaults = ModelConfig.__dataclass_fields__
    model = {k: v for k, v in cfg.to_dict().items() if not (k in LATER_FIELDS and v == defaults[k].default)}
    return {"model": model, "train": tc.to_dict(), "layout": {"parameters": _layout(cfg)}}


def checkpoint_path(cfg: ModelConfig, tc: TrainConfig, folder: Path | None = None) -> Path:
    """``<cache>/checkpoints/lm-<ff>ff-<qkv>qkv-d<d>-L<layers>-<steps>steps-<hash>.pt``."""
    folder = Path(folder) if folder is not None else run_config.cache_dir() / "checkpoints"
    digest = hashlib.sha1(json.dumps(_key(cfg, tc), sort_keys=True).encode()).hexdigest()[:10]
    name = (f"lm-{cfg.ff}ff-{cfg.qkv}qkv-d{cfg.d_model}-L{cfg.n_layers}-ff{cfg.d_ff}-"
            f"{tc.steps}steps-{digest}.pt")
    return folder / name


def save_checkpoint(model: TransformerLM, tc: TrainConfig, history: pd.DataFrame | None = None,
                    path: Path | None = None) -> Path:
    """Write atomically (temporary file + rename) and return the path."""
    path = Path(path) if path is not None else checkpoint_path(model.cfg, tc)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"key": _key(model.cfg, tc), "state_dict": model.state_dict(),
               "history": None if history is None else history.to_dict(orient="list")}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return path


def load_checkpoint(path: Path, cfg: ModelConfig, tc: TrainConfig) -> tuple[TransformerLM, pd.DataFrame | None]:
    """Load a model saved with exactly ``cfg`` and ``tc``; raise :class:`CheckpointMismatchError` otherwise.

    The file is read with ``weights_only=True`` (tensors and plain containers only: a pickled object is refused,
    never run). A file that cannot be read as a checkpoint raises :class:`CheckpointUnreadableError` naming it.
    """
    path = Path(path)

    def unreadable(why: str) -> CheckpointUnreadableError:
        return CheckpointUnreadableError(
            f"checkpoint {path} cannot be read ({why}); it is truncated, empty or not a checkpoint of this "
            f"package. Delete it and retrain: train_or_load() retrains and replaces it, or run "
            f"python -m sparse_tutorial.train --save."
        )

    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, empty file, foreign bytes, a pickled object the safe loader refuses
        raise unreadable(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'}") from err
    if not isinstance(payload, dict) or not isinstance(payload.get("key"), dict) \
            or not isinstance(payload.get("state_dict"), dict):
        raise unreadable(f"it holds a {type(payload).__name__}, not a dict with 'key' and 'state_dict'")
    want = _key(cfg, tc)
    if payload.get("key") != want:
        got = payload.get("key", {})
        diffs = [f"{part}.{k}: checkpoint has {got.get(part, {}).get(k)!r}, requested {v!r}"
                 for part in ("model", "train", "layout") for k, v in want[part].items()
                 if got.get(part, {}).get(k) != v]
        raise CheckpointMismatchError(
            f"checkpoint {path} was saved with another configuration ({'; '.join(diffs) or 'unknown key'}); "
            f"refusing to load it. Train a model with this configuration or delete the file."
        )
    model = TransformerLM(cfg)
    try:
        model.load_state_dict(payload["state_dict"])
        history = None if payload.get("history") is None else pd.DataFrame(payload["history"])
    except Exception as err:  # the key matches but the tensors or the history do not
        raise unreadable(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else 'no message'}") from err
    model.eval()
    return model, history
