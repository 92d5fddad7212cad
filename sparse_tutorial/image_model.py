"""The small image experiment of chapter 3: ``784 -> 100 -> FF(100 -> 400 -> 100) -> 10``.

An earlier small PyTorch project tested sparse FF on MNIST with this network and 1/50 of the FF units
active (block size 50: 8 of 400 units per image). Chapter 3 repeats it on Fashion-MNIST (MNIST by
changing one name) with the paper's controller, and trains a dense and a sparse network with the same
steps, batch, optimizer and seed.

The book's default block size is 10 (40 of 400 units, 1/10 of the FF), not the earlier project's 50. The
recorded image study (``python -m sparse_tutorial.studies image --epochs 8 --seeds 0 1 2``,
``results/image_gap.csv``) put N 50 about 2 points of test accuracy below dense and N 10 within the one-point
target on the mean of three seeds; chapter 3 prints the recorded table. ``ImageConfig(block_size=50)`` is the
earlier project's network.

The images are loaded once into memory as tensors (:func:`image_tensors`), so the time per epoch
measures the network, not image decoding.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from .layers.dense import DenseFF
from .layers.sparse_ff import SparseFF

__all__ = ["ImageConfig", "ImageNet", "ImageData", "image_tensors", "train_image_model", "accuracy"]

# Mean and std of the training pixels (in [0, 1]), the same constants as sparse_tutorial.data.
_NORMALISE = {"fashion-mnist": (0.2860, 0.3530), "mnist": (0.1307, 0.3081)}


@dataclass
class ImageConfig:
    d_in: int = 784
    d_model: int = 100
    d_ff: int = 400
    n_classes: int = 10
    ff: str = "dense"              # "dense" | "sparse"
    block_size: int = 10           # units per block: 400 / 10 = 40 active units (1/10 of the FF; the earlier
    #                                project's 50 keeps 8, see the module docstring)
    d_lowrank: int | None = None   # controller rank; None -> d_ff // block_size
    controller: str = "lowrank"
    hard_prob: float = 0.3         # share of training calls with the hard mask (SparseFF's hard_prob)
    scale_by_prob: bool = False    # SparseFF's scale_by_prob (the reference's multiply_by_controller_output)

    def __post_init__(self):
        for name in ("d_in", "d_model", "d_ff", "n_classes", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {name}={value!r}")
        if self.ff not in ("dense", "sparse"):
            raise ValueError(f"ff must be 'dense' or 'sparse', got ff={self.ff!r}")
        if self.ff == "sparse" and self.d_ff % self.block_size:
            raise ValueError(f"d_ff must be divisible by block_size, got d_ff={self.d_ff}, "
                             f"block_size={self.block_size}")

    def to_dict(self) -> dict:
        return asdict(self)


class ImageNet(nn.Module):
    """``Linear(784 -> 100) -> FF(100 -> 400 -> 100) -> Linear(100 -> 10)``; the FF is dense or sparse."""

    def __init__(self, cfg: ImageConfig):
        super().__init__()
        self.cfg = cfg
        self.inp = nn.Linear(cfg.d_in, cfg.d_model)
        if cfg.ff == "dense":
            self.ff = DenseFF(cfg.d_model, cfg.d_ff)
        else:
            self.ff = SparseFF(cfg.d_model, cfg.d_ff, cfg.block_size, cfg.d_lowrank, controller=cfg.controller,
                               hard_prob=cfg.hard_prob, scale_by_prob=cfg.scale_by_prob)
        self.out = nn.Linear(cfg.d_model, cfg.n_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.inp(images.flatten(1))   # (B, 784) -> (B, d_model)
        x = self.ff(x)                    # (B, d_model)
        return self.out(x)                # (B, n_classes) logits

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


@dataclass
class ImageData:
    """Normalised images ``(N, 784)`` float32 and labels ``(N,)`` int64, train and test."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def image_tensors(name: str = "fashion-mnist", train_subset: int | None = None,
                  test_subset: int | None = None) -> ImageData:
    """Load ``"fashion-mnist"`` or ``"mnist"`` (see :func:`sparse_tutorial.data.image_datasets`) as tensors.

    ``*_subset`` keeps the first examples only (fast runs).
    """
    from .data import image_datasets

    key = name.lower()
    if key not in _NORMALISE:
        raise ValueError(f"name must be one of {sorted(_NORMALISE)}, got name={name!r}")
    for arg, value in (("train_subset", train_subset), ("test_subset", test_subset)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{arg} must be a positive integer or None, got {arg}={value!r}")
    train, test = image_datasets(key)
    mean, std = _NORMALISE[key]

    def convert(ds, n):
        x, y = ds.data, torch.as_tensor(ds.targets)
        if n is not None:
            x, y = x[:n], y[:n]
        x = (x.reshape(len(x), -1).float() / 255.0 - mean) / std
        return x.contiguous(), y.long()

    x_train, y_train = convert(train, train_subset)
    x_test, y_test = convert(test, test_subset)
    return ImageData(key, x_train, y_train, x_test, y_test)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 2000) -> float:
    """Fraction of correct predictions in eval mode (hard one-hot masks for a sparse FF)."""
    was_training = model.training
    model.eval()
    correct = sum((model(x[i:i + batch_size]).argmax(-1) == y[i:i + batch_size]).sum().item()
                  for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / len(x)


def train_image_model(model: ImageNet, data: ImageData, *, epochs: int = 5, batch_size: int = 128,
                      lr: float = 1e-3, seed: int = 0, progress: bool = True,
                      desc: str | None = None) -> pd.DataFrame:
    """Adam on shuffled mini-batches; one history row per epoch.

    Columns: ``epoch``, ``train_loss`` (mean over the epoch's batches), ``train_acc`` and ``test_acc``
    (eval mode, after the epoch), ``sec_per_epoch`` (training time only, evaluation excluded).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be a positive integer, got epochs={epochs!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got batch_size={batch_size!r}")
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    n = len(data.x_train)
    rows = []
    bar = tqdm(range(epochs), desc=desc or f"{model.cfg.ff} FF", disable=not progress)
    for epoch in bar:
        model.train()
        order = torch.randperm(n, generator=g)
        t0, total, batches = time.perf_counter(), 0.0, 0
        for i in range(0, n, batch_size):
            idx = order[i:i + batch_size]
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item()
            batches += 1
        seconds = time.perf_counter() - t0
        rows.append(dict(epoch=epoch + 1, train_loss=total / batches,
                         train_acc=accuracy(model, data.x_train, data.y_train),
                         test_acc=accuracy(model, data.x_test, data.y_test), sec_per_epoch=seconds))
        bar.set_postfix(test_acc=f"{rows[-1]['test_acc']:.3f}")
    model.eval()
    return pd.DataFrame(rows)
