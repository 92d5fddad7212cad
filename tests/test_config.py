"""The run-size switch is read in exactly one place, and bad values are refused."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_fast_flag_is_read_only_in_config_module():
    readers = []
    for path in list((ROOT / "sparse_tutorial").rglob("*.py")) + list((ROOT / "notebooks").glob("*.ipynb")):
        if re.search(r"SPARSE_TUTORIAL_FAST", path.read_text(encoding="utf-8")) and re.search(
            r"environ|getenv", path.read_text(encoding="utf-8")
        ):
            readers.append(path.relative_to(ROOT).as_posix())
    assert readers == ["sparse_tutorial/config.py"], readers


def _fast_value(env_value: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "import sparse_tutorial.config as c; print(c.FAST, c.pick(1, 2))"],
        env={"SPARSE_TUTORIAL_FAST": env_value, "PATH": "/usr/bin:/bin"},
        capture_output=True, text=True,
    )


def test_fast_flag_values():
    assert _fast_value("1").stdout.split() == ["True", "2"]
    assert _fast_value("0").stdout.split() == ["False", "1"]
    assert _fast_value("").stdout.split() == ["False", "1"]


def test_bad_fast_flag_is_refused_with_a_clear_message():
    res = _fast_value("maybe")
    assert res.returncode != 0
    assert "SPARSE_TUTORIAL_FAST='maybe'" in res.stderr
