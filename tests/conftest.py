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
        # GitHub's workflow downloads the data (python -m sparse_tutorial.data .data): there a skip is a failure.
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(
            f"no offline data at {folder}; set SPARSE_TUTORIAL_DATA (python -m sparse_tutorial.data FOLDER fetches it)")
    monkeypatch.setenv("SPARSE_TUTORIAL_DATA", str(folder))
    return folder
