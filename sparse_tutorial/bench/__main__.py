"""``python -m sparse_tutorial.bench COMMAND ...``: see :mod:`sparse_tutorial.bench.cli`."""
import sys

from .cli import main

sys.exit(main())
