"""Source listings: the package's code wrapped to the page stays the same program."""
import ast
import importlib
import inspect
import pkgutil
import re
import textwrap

import pytest

import sparse_tutorial
from sparse_tutorial.studies.listing import WIDTH, show_source, source_of, wrap_source


def _normalised(tree: ast.AST) -> str:
    """The AST dump with every string constant's whitespace collapsed (docstrings are rewrapped)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            node.value = " ".join(node.value.split())
    return ast.dump(tree)


def _modules():
    for info in pkgutil.walk_packages(sparse_tutorial.__path__, "sparse_tutorial."):
        if not info.name.endswith("__main__"):                # importing those would run the command
            yield importlib.import_module(info.name)


@pytest.mark.parametrize("width", [WIDTH, 60])
def test_every_module_of_the_package_wrapped_is_the_same_program(width):
    for module in _modules():
        source = inspect.getsource(module)
        wrapped = wrap_source(source, width)
        assert _normalised(ast.parse(wrapped)) == _normalised(ast.parse(source)), module.__name__


def test_comments_and_docstrings_fit_the_page_in_the_book_listings():
    from sparse_tutorial.layers import MoEFF, ProductKeyMemory, SparseFF, sparse_ff_kernel
    from sparse_tutorial.layers.qkv import ConvQKVAttention
    from sparse_tutorial.measure import timing
    shown = [timing.time_call, SparseFF.forward, SparseFF.decode, SparseFF.mask, ConvQKVAttention.heads,
             ConvQKVAttention.forward, MoEFF.route, MoEFF.forward, ProductKeyMemory.slots,
             *sparse_ff_kernel.KERNEL_SOURCE_FUNCTIONS]
    long_code = 0
    for fn in shown:
        text = source_of(fn)
        assert text == wrap_source(textwrap.dedent(inspect.getsource(fn)))
        for line in text.splitlines():
            if len(line) > WIDTH:
                assert "#" not in line and '"""' not in line, f"{fn.__qualname__}: {line!r}"
                long_code += 1
        # a moved comment keeps its words: every word of the original's comments is in the listing
        words = re.findall(r"#\s*(.*)", inspect.getsource(fn))
        assert " ".join(" ".join(words).split()) in " ".join(
            " ".join(re.findall(r"#\s*(.*)", text)).split()) or not words
    assert long_code <= 3          # only code without a place to break stays long (the page wraps it)


def test_a_trailing_comment_moves_above_its_line_and_code_breaks_after_a_comma():
    src = "x = f(alpha, beta, gamma)  # a comment that is long enough to need a line of its own\n"
    out = wrap_source(src, 30)
    lines = out.splitlines()
    assert lines[0].startswith("# a comment") and all(len(line) <= 30 for line in lines)
    assert "x = f(alpha, beta," in out and ast.dump(ast.parse(out)) == ast.dump(ast.parse(src))
    assert wrap_source("short = 1\n", 30) == "short = 1\n"
    with pytest.raises(ValueError, match="width=5"):
        wrap_source(src, 5)


def test_show_source_joins_listings_and_names_an_empty_call():
    from sparse_tutorial.layers import SparseFF
    code = show_source(SparseFF.mask, SparseFF.forward)
    assert "def mask" in code.data and "def forward" in code.data and "_StraightThrough" in code.data
    with pytest.raises(ValueError, match="at least one"):
        show_source()
