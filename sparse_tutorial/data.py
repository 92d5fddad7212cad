"""Datasets of the book: Tiny Shakespeare (character level) and Fashion-MNIST / MNIST.

Where a file is looked for, in order:

1. ``$SPARSE_TUTORIAL_DATA`` (torchvision's layout: ``<dir>/FashionMNIST/raw/...``,
   ``<dir>/tinyshakespeare/input.txt``);
2. the cache folder (``~/.cache/sparse_tutorial``, or ``$SPARSE_TUTORIAL_CACHE``);
3. a download from the public URL into the cache, checked against its MD5 and written atomically
   (temporary file + rename), so a failed or corrupt download never leaves a file a later run would trust.

Offline with no data, :class:`DataUnavailableError` names the file, the URL and the variable to set.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import torch

from . import config

__all__ = [
    "DataUnavailableError",
    "CharVocab",
    "TextData",
    "download",
    "tiny_shakespeare_path",
    "load_tiny_shakespeare",
    "image_datasets",
    "image_loaders",
    "fetch",
]

TINY_SHAKESPEARE_URL = (
    "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt"
)
TINY_SHAKESPEARE_MD5 = "6fb458f1232090904fb40fe944165e91"


class DataUnavailableError(RuntimeError):
    """A dataset is neither on disk nor downloadable; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# Download with checksum, atomically
# --------------------------------------------------------------------------------------------------


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _data_dir_note() -> str:
    """Where ``SPARSE_TUTORIAL_DATA`` pointed, for the offline errors."""
    env_dir = config.data_dir()
    return "SPARSE_TUTORIAL_DATA is unset" if env_dir is None else f"SPARSE_TUTORIAL_DATA={env_dir}"


@contextlib.contextmanager
def _remove_new_empty_folders(folder: Path):
    """On an error, remove the folders up to ``folder`` that did not exist before and are still empty."""
    folder = Path(folder)
    missing = [p for p in [folder, *folder.parents] if not p.exists()]   # deepest first
    try:
        yield
    except BaseException:
        for p in missing:
            with contextlib.suppress(OSError):                            # not empty, or already gone
                p.rmdir()
        raise


def download(url: str, dest: Path, md5: str, *, timeout: float = 30.0) -> Path:
    """Download ``url`` to ``dest`` if it checks against ``md5``; nothing is left at ``dest`` otherwise.

    The bytes go to a temporary file in the same folder, are checked, and only then renamed to ``dest``.
    """
    dest = Path(dest)
    with _remove_new_empty_folders(dest.parent):
        return _download(url, dest, md5, timeout)


def _download(url: str, dest: Path, md5: str, timeout: float) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
            for chunk in iter(lambda: response.read(1 << 20), b""):
                out.write(chunk)
        got = _md5(tmp)
        if got != md5:
            raise DataUnavailableError(
                f"downloaded {url} but its MD5 is {got}, expected {md5}; the file was discarded. "
                f"Download it by hand into {dest} or set SPARSE_TUTORIAL_DATA to a folder that has it."
            )
        os.replace(tmp, dest)
        return dest
    except DataUnavailableError:
        raise
    except Exception as err:  # network down, DNS failure, HTTP error, disk full ...
        raise DataUnavailableError(
            f"could not find {dest.name} locally and could not download it from {url} ({err}). "
            f"Set SPARSE_TUTORIAL_DATA to a folder containing {dest.parent.name}/{dest.name} "
            f"({_data_dir_note()}), or place the file at {dest}."
        ) from err
    finally:
        tmp.unlink(missing_ok=True)


def _find_or_download(relative: str, url: str, md5: str) -> Path:
    """Look in ``$SPARSE_TUTORIAL_DATA``, then the cache; otherwise download into the cache."""
    env_dir = config.data_dir()
    if env_dir is not None and (env_dir / relative).is_file():
        return env_dir / relative
    cached = config.cache_dir() / relative
    if cached.is_file():
        return cached
    return download(url, cached, md5)


# --------------------------------------------------------------------------------------------------
# Tiny Shakespeare, character level
# --------------------------------------------------------------------------------------------------


class CharVocab:
    """Character vocabulary: the sorted set of characters of a text, with encode/decode."""

    def __init__(self, text: str):
        self.chars: list[str] = sorted(set(text))
        self.stoi = {ch: i for i, ch in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        missing = sorted(set(text) - self.stoi.keys())
        if missing:
            raise ValueError(f"text contains characters outside the vocabulary: {missing!r}")
        return [self.stoi[ch] for ch in text]

    def decode(self, ids) -> str:
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        return "".join(self.chars[i] for i in ids)


@dataclass
class TextData:
    """A character-level corpus split 90/10 into train and validation token tensors."""

    vocab: CharVocab
    train: torch.Tensor  # (N_train,) int64
    val: torch.Tensor    # (N_val,) int64

    def get_batch(self, split: str, batch_size: int, context_length: int,
                  generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows: inputs ``(B, T)`` and next-character targets ``(B, T)``."""
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', got split={split!r}")
        data = self.train if split == "train" else self.val
        if context_length >= len(data):
            raise ValueError(
                f"context_length={context_length} must be shorter than the {split} split ({len(data)} tokens)"
            )
        starts = torch.randint(len(data) - context_length, (batch_size,), generator=generator)
        offsets = torch.arange(context_length)
        x = data[starts[:, None] + offsets]
        y = data[starts[:, None] + offsets + 1]
        return x, y


def tiny_shakespeare_path() -> Path:
    """The path of ``tinyshakespeare/input.txt``, downloading it if needed."""
    return _find_or_download("tinyshakespeare/input.txt", TINY_SHAKESPEARE_URL, TINY_SHAKESPEARE_MD5)


def load_tiny_shakespeare(val_fraction: float = 0.1) -> TextData:
    """Tiny Shakespeare as character tokens, the first 90% for training and the last 10% for validation."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got val_fraction={val_fraction!r}")
    text = tiny_shakespeare_path().read_text(encoding="utf-8")
    vocab = CharVocab(text)
    ids = torch.tensor(vocab.encode(text), dtype=torch.long)
    n_train = int(len(ids) * (1.0 - val_fraction))
    return TextData(vocab=vocab, train=ids[:n_train], val=ids[n_train:])


# --------------------------------------------------------------------------------------------------
# Fashion-MNIST and MNIST through torchvision
# --------------------------------------------------------------------------------------------------

_IMAGE_DATASETS = {"fashion-mnist": "FashionMNIST", "mnist": "MNIST"}
_IMAGE_FILES = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"]


def _image_root(folder: str) -> Path | None:
    """The root under which ``<folder>/raw`` holds all four IDX files, or None.

    torchvision reads only the uncompressed files. A folder with the ``.gz`` files it downloads (some of them or
    all) counts too: the compressed ones are unpacked into the cache folder (atomically), which is then the root.
    """
    for root in [config.data_dir(), config.cache_dir()]:
        if root is None:
            continue
        raw = root / folder / "raw"
        if all((raw / name).is_file() for name in _IMAGE_FILES):
            return root
        if all((raw / name).is_file() or (raw / f"{name}.gz").is_file() for name in _IMAGE_FILES):
            cache_raw = config.cache_dir() / folder / "raw"
            with _remove_new_empty_folders(cache_raw):
                cache_raw.mkdir(parents=True, exist_ok=True)
                for name in _IMAGE_FILES:
                    if not (cache_raw / name).is_file():
                        _gunzip_or_copy(raw / name if (raw / name).is_file() else raw / f"{name}.gz",
                                        cache_raw / name)
            return config.cache_dir()
    return None


def _gunzip_or_copy(src: Path, dest: Path) -> None:
    """Write ``src`` (unpacked when it ends in ``.gz``) to ``dest`` through a temporary file and a rename."""
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".part", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out, (gzip.open(src, "rb") if src.suffix == ".gz" else open(src, "rb")) as f:
            shutil.copyfileobj(f, out, 1 << 20)
        os.replace(tmp, dest)
    finally:
        Path(tmp).unlink(missing_ok=True)


def image_datasets(name: str = "fashion-mnist"):
    """Train and test sets of ``"fashion-mnist"`` or ``"mnist"``: images as ``(1, 28, 28)`` float tensors.

    Pixels are scaled to [0, 1] and normalised with the training set's mean and std.
    """
    from torchvision import datasets, transforms  # imported here: only the image chapters need it

    key = name.lower()
    if key not in _IMAGE_DATASETS:
        raise ValueError(f"name must be one of {sorted(_IMAGE_DATASETS)}, got name={name!r}")
    folder = _IMAGE_DATASETS[key]
    cls = getattr(datasets, folder)
    root = _image_root(folder)
    download = root is None
    if root is None:
        root = config.cache_dir()
    tf = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.2860,), (0.3530,))
                             if key == "fashion-mnist" else transforms.Normalize((0.1307,), (0.3081,))])
    try:
        with _remove_new_empty_folders(root / folder / "raw"):            # a failed download leaves no folders
            train = cls(root=str(root), train=True, download=download, transform=tf)
            test = cls(root=str(root), train=False, download=download, transform=tf)
    except Exception as err:
        raise DataUnavailableError(
            f"{folder} is not in $SPARSE_TUTORIAL_DATA ({_data_dir_note()}) or {config.cache_dir()} and "
            f"torchvision could not download it ({err}). Set SPARSE_TUTORIAL_DATA to a folder with {folder}/raw/"
            f"{{{','.join(_IMAGE_FILES)}}} (or their .gz files)."
        ) from err
    return train, test


def image_loaders(name: str = "fashion-mnist", batch_size: int = 128, train_subset: int | None = None,
                  test_subset: int | None = None, seed: int = 0):
    """DataLoaders for :func:`image_datasets`, optionally on the first ``*_subset`` examples (fast runs)."""
    from torch.utils.data import DataLoader, Subset

    train, test = image_datasets(name)
    if train_subset is not None:
        train = Subset(train, range(min(train_subset, len(train))))
    if test_subset is not None:
        test = Subset(test, range(min(test_subset, len(test))))
    g = torch.Generator().manual_seed(seed)
    return (DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            DataLoader(test, batch_size=1000, shuffle=False))


# --------------------------------------------------------------------------------------------------
# Everything at once, for CI's data cache: ``python -m sparse_tutorial.data FOLDER``
# --------------------------------------------------------------------------------------------------


def fetch(folder: Path) -> Path:
    """Download every data set the book uses into ``folder`` in torchvision's layout, each checked.

    Tiny Shakespeare goes through :func:`download` (MD5, atomic); Fashion-MNIST through torchvision, which checks
    each archive's MD5 and unpacks it. Files already there and intact are kept. Point ``SPARSE_TUTORIAL_DATA`` at
    ``folder`` afterwards (the CI workflow caches it).
    """
    from torchvision import datasets

    folder = Path(folder)
    text = folder / "tinyshakespeare" / "input.txt"
    if not (text.is_file() and _md5(text) == TINY_SHAKESPEARE_MD5):
        download(TINY_SHAKESPEARE_URL, text, TINY_SHAKESPEARE_MD5)
    for train in (True, False):
        datasets.FashionMNIST(root=str(folder), train=train, download=True)
    return folder


if __name__ == "__main__":
    import sys

    if len(sys.argv) != 2:
        sys.exit("usage: python -m sparse_tutorial.data FOLDER  (downloads the book's data sets, checked)")
    print(f"data sets in {fetch(Path(sys.argv[1]))}")
