"""Sliders that work with a kernel *and* on the static, rendered book.

:func:`slider_figure` draws a matplotlib figure for every value of one parameter up front, and shows a
slider linked (in the browser, with ``jslink``) to a stack of the rendered images. On the static HTML page,
with no kernel, moving the slider switches images; in JupyterLab, Colab or Binder the same widget works,
and a value typed outside the precomputed set is drawn live by the kernel.
"""
from __future__ import annotations

import io
from typing import Callable, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["slider_figure", "figure_png"]


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes and close it (so the notebook does not also print it)."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def slider_figure(draw: Callable[[object], Figure], name: str, values: Sequence, *,
                  value=None, description: str | None = None, dpi: int = 100):
    """A slider over ``values`` of parameter ``name`` that switches between figures ``draw(v)``.

    Args:
        draw: function of one value returning a matplotlib Figure (it need not close it).
        name: the parameter's name, shown as the slider's label unless ``description`` is given.
        values: the values to precompute, in slider order.
        value: the value shown first (default: the first).

    Returns an ipywidgets ``VBox``; make it the last expression of a cell to display it.
    """
    import ipywidgets as widgets

    values = list(values)
    if not values:
        raise ValueError(f"values must not be empty for slider {name!r}")
    if value is None:
        value = values[0]
    if value not in values:
        raise ValueError(f"value={value!r} is not one of the slider's values {values!r}")
    images = [widgets.Image(value=figure_png(draw(v), dpi=dpi), format="png",
                            layout=widgets.Layout(max_width="100%", height="auto")) for v in values]
    slider = widgets.SelectionSlider(options=[(str(v), v) for v in values], value=value,
                                     description=description or name, continuous_update=True,
                                     style={"description_width": "initial"},
                                     layout=widgets.Layout(width="60%"))
    stack = widgets.Stack(children=images, selected_index=values.index(value))
    widgets.jslink((slider, "index"), (stack, "selected_index"))
    return widgets.VBox([slider, stack])
