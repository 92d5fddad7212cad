import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def shared_data(monkeypatch):
    """Point SPARSE_TUTORIAL_DATA at the offline data folder, or skip when it is not there."""
    folder = Path(os.environ.get("SPARSE_TUTORIAL_DATA") or SHARED_DATA)
    if not (folder / "tinyshakespeare" / "input.txt").is_file():
        pytest.skip(f"no offline data at {folder}; set SPARSE_TUTORIAL_DATA")
    monkeypatch.setenv("SPARSE_TUTORIAL_DATA", str(folder))
    return folder
