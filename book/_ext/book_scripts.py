"""Sphinx extension of this book: each page lists each script once.

sphinx-thebe (loaded by Jupyter Book) registers an inline configuration script that Sphinx 7 then emits twice
on every page; the second copy throws ``Identifier 'THEBE_JS_URL' has already been declared`` in the browser.
Drop exact repeats (same source, same attributes, same inline body) from each page's script list.
"""
from __future__ import annotations

import os


def _key(script) -> tuple:
    if isinstance(script, str):  # old style: a bare file name
        return (script, "")
    filename = getattr(script, "filename", None)
    attributes = getattr(script, "attributes", {}) or {}
    return (os.fspath(filename) if filename else "", repr(sorted(attributes.items())))


def dedupe_scripts(app, pagename, templatename, context, doctree) -> None:
    scripts = context.get("script_files")
    if not scripts:
        return
    seen, unique = set(), []
    for script in scripts:
        if (key := _key(script)) not in seen:
            seen.add(key)
            unique.append(script)
    context["script_files"] = unique  # a new list: the builder's own list is left as it is


def setup(app):
    app.connect("html-page-context", dedupe_scripts, priority=900)  # after every extension added its scripts
    return {"parallel_read_safe": True, "parallel_write_safe": True}
