"""Source listings in the book: the package's own code, pulled with ``inspect`` and wrapped to the page.

The package is written at 120 columns; a page of the book shows about 85 (see ``book/_static/book.css``). Left to
the browser, a long line would wrap wherever the column ends, in the middle of a name or a comment. :func:`wrap_source`
breaks it the way a person would, and keeps the code the same program:

* a comment is rewrapped at word boundaries, each piece a ``#`` line; a comment that ends a line of code moves to
  its own line above that code;
* a line of a docstring (or any string spanning lines) is rewrapped at spaces, with its indentation;
* a line of code is broken after a comma or an opening bracket that sits inside brackets, where Python continues
  the line by itself; the continuation is indented 8 spaces more.

A line that has no such place (a long string, say) stays whole, and the page wraps it. The tests check that the
wrapped code parses to the same program as the original (docstrings compared with their whitespace collapsed).
"""
from __future__ import annotations

import inspect
import io
import textwrap
import tokenize

__all__ = ["WIDTH", "wrap_source", "source_of", "show_source"]

#: columns of code the book's page shows whole
WIDTH = 85

_OPEN, _CLOSE = "([{", ")]}"


def _line_facts(source: str) -> tuple[dict[int, int], dict[int, list[tuple[int, int, bool]]], set[int]]:
    """Per physical line (1-based): the column where a comment starts; the places after which the line may be
    broken, as ``(column, bracket depth, after a comma)``; and the lines of triple-quoted strings that start a
    statement (docstrings), which may be rewrapped."""
    comments: dict[int, int] = {}
    breaks: dict[int, list[tuple[int, int, bool]]] = {}
    docs: set[int] = set()
    depth = 0
    lines = source.splitlines()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        (r0, c0), (r1, c1) = tok.start, tok.end
        if tok.type == tokenize.COMMENT:
            comments[r0] = c0
        elif tok.type == tokenize.STRING and tok.string.endswith(('"""', "'''")) and not lines[r0 - 1][:c0].strip():
            docs.update(range(r0, r1 + 1))
        elif tok.type == tokenize.OP:
            if tok.string in _OPEN:
                depth += 1
                breaks.setdefault(r0, []).append((c1, depth, False))
            elif tok.string in _CLOSE:
                depth -= 1
            elif tok.string == "," and depth > 0:
                breaks.setdefault(r0, []).append((c1, depth, True))
    return comments, breaks, docs


def _indent(line: str) -> str:
    return line[: len(line) - len(line.lstrip())]


def _comment_lines(indent: str, text: str, width: int) -> list[str]:
    body = text.lstrip("#").strip()
    return textwrap.wrap(body, width, initial_indent=indent + "# ", subsequent_indent=indent + "# ",
                         break_long_words=False, break_on_hyphens=False) or [indent + "#"]


def _break_code(line: str, cuts: list[tuple[int, int, bool]], width: int) -> list[str]:
    """``line`` cut at some of ``cuts`` so that each piece fits ``width`` where a cut allows: after a comma of the
    outermost bracket that fits, the rightmost of those; after an opening bracket only where no comma fits; a
    piece at least half the page long where a cut allows."""
    cont = _indent(line) + " " * 8
    pieces, start, prefix = [], 0, ""
    while len(prefix) + len(line) - start > width:
        fits = [c for c in cuts if start < c[0] and len(prefix) + c[0] - start <= width and line[c[0]:].strip()]
        if not fits:
            break
        long_enough = [c for c in fits if len(prefix) + c[0] - start >= width // 2]
        fits = long_enough or fits                      # no first piece shorter than half the page, if avoidable
        commas = [c for c in fits if c[2]]
        if commas:
            top = min(c[1] for c in commas)
            cut = max(c[0] for c in commas if c[1] == top)
        else:
            cut = max(c[0] for c in fits)
        pieces.append(prefix + line[start:cut].rstrip())
        start = cut + len(line[cut:]) - len(line[cut:].lstrip())       # skip the spaces after the cut
        prefix = cont
    pieces.append(prefix + line[start:])
    return pieces


def _reflow_string_lines(lines: list[str], width: int) -> list[str]:
    """Lines of a docstring rewrapped where one is too long: each paragraph (a run of lines with the same indent,
    a list item with its deeper continuation) is rejoined and wrapped at spaces; the rest is kept."""
    out, i = [], 0
    while i < len(lines):
        first = lines[i]
        if not first.strip():
            out.append(first)
            i += 1
            continue
        indent = _indent(first)
        item = first.strip()[:2] in ("* ", "- ") or first.strip()[:1].isdigit() and ". " in first.strip()[:4]
        hang = indent + " " * (first.strip().index(" ") + 1) if item else indent
        j = i + 1
        while j < len(lines) and lines[j].strip() and _indent(lines[j]) == hang and \
                lines[j].strip()[:2] not in ("* ", "- ") and lines[j].strip() not in ('"""', "\'\'\'"):
            j += 1
        para = lines[i:j]
        if any(len(p) > width for p in para):
            text = " ".join(p.strip() for p in para)
            out += textwrap.wrap(text, width, initial_indent=indent, subsequent_indent=hang,
                                 break_long_words=False, break_on_hyphens=False)
        else:
            out += para
        i = j
    return out


def wrap_source(source: str, width: int = WIDTH) -> str:
    """``source`` (Python code, dedented) with every line longer than ``width`` broken as the module docstring
    says; lines that fit are unchanged."""
    if width < 20:
        raise ValueError(f"width must be at least 20 columns, got width={width}")
    comments, breaks, docs = _line_facts(source)
    lines = source.splitlines()
    out: list[str] = []
    row = 1
    while row <= len(lines):
        line = lines[row - 1]
        if row in docs:                                                     # a whole docstring at once
            end = row
            while end + 1 in docs:
                end += 1
            out += _reflow_string_lines(lines[row - 1:end], width)
            row = end + 1
            continue
        if len(line) <= width:
            out.append(line)
        elif row in comments and not line[: comments[row]].strip():         # a line that is only a comment
            out += _comment_lines(_indent(line), line[comments[row]:], width)
        else:
            code = line
            if row in comments:                                             # a trailing comment goes above
                code = line[: comments[row]].rstrip()
                out += _comment_lines(_indent(line), line[comments[row]:], width)
            out += _break_code(code, [c for c in breaks.get(row, []) if c[0] < len(code)], width)
        row += 1
    return "\n".join(out) + ("\n" if source.endswith("\n") else "")


def source_of(obj, width: int = WIDTH) -> str:
    """The package's source of ``obj`` (a function, method or class), dedented and wrapped to ``width``."""
    return wrap_source(textwrap.dedent(inspect.getsource(obj)), width)


def show_source(*objs, width: int = WIDTH):
    """The source of each of ``objs`` as one highlighted code block (an ``IPython.display.Code``), wrapped to the
    page by :func:`source_of`; pulled from the package when the chapter runs, so it cannot drift."""
    from IPython.display import Code
    if not objs:
        raise ValueError("show_source needs at least one function, method or class")
    return Code("\n\n".join(source_of(o, width).rstrip("\n") for o in objs) + "\n", language="python")
