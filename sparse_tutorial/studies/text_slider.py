"""A kernel-free slider over texts: generated samples shown as text, not drawn into a figure.

:func:`slider_text` is :func:`~sparse_tutorial.studies.interactive.slider_figure`'s sibling for text. Every text
is computed up front and stored in the page as a ``<pre>`` block in an ipywidgets ``Stack``; the slider's index is
``jslink``-ed to the stack's, so on the static HTML page the browser switches the text with no kernel. The text
wraps at the column's edge and is selectable, unlike text drawn into a picture.

::

    VBox (class "sparse-slider-text")
    ├── SelectionSlider  (index) ──jslink──┐
    └── Stack            (selected_index) ◄┘
          └── HTML "<pre class='sparse-slider-sample'>…</pre>", one per value
"""
from __future__ import annotations

import html
from typing import Sequence

from .interactive import MAX_FRAMES, linked_slider

__all__ = ["slider_text", "TEXT_SLIDER_CLASS"]

#: CSS class of every text slider's outer box (the book's browser test looks for it).
TEXT_SLIDER_CLASS = "sparse-slider-text"
_PRE_STYLE = "white-space: pre-wrap; overflow-wrap: anywhere; margin: 0.4em 0; font-size: 0.85em"


def slider_text(texts: Sequence[str], name: str, values: Sequence, value=None,
                description: str | None = None):
    """A slider over ``values`` of parameter ``name`` that shows ``texts[i]`` for ``values[i]``.

    Returns an ipywidgets ``VBox`` (CSS class :data:`TEXT_SLIDER_CLASS`); make it the last expression of a cell.

    Raises:
        ValueError: for an empty name, empty/duplicate/too many values, texts that are not strings or not one
            per value, or a ``value`` not in ``values``.
    """
    import ipywidgets as widgets

    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if isinstance(values, (str, bytes)) or isinstance(texts, (str, bytes)):
        raise ValueError("values and texts must be sequences, not one string")
    values, texts = list(values), list(texts)
    if not values or len(values) > MAX_FRAMES:
        raise ValueError(f"slider {name!r} needs 1 to {MAX_FRAMES} values, got {len(values)}")
    if len(texts) != len(values) or not all(isinstance(t, str) for t in texts):
        raise ValueError(f"slider {name!r} needs one string per value: {len(values)} values, texts {texts!r:.80}")
    labels = [str(v) for v in values]
    if len(set(labels)) != len(labels):
        raise ValueError(f"values must be distinct (as shown on the slider) for slider {name!r}, got {values!r}")
    value = values[0] if value is None else value
    if value not in values:
        raise ValueError(f"value={value!r} is not one of the slider's values {values!r}")

    pages = [widgets.HTML(f"<pre class='sparse-slider-sample' style='{_PRE_STYLE}'>{html.escape(t)}</pre>")
             for t in texts]
    slider, stack = linked_slider(pages, labels, values, value, description or name)
    box = widgets.VBox([slider, stack])
    box.add_class(TEXT_SLIDER_CLASS)
    return box
