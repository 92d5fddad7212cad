"""Sliders that work with a kernel *and* on the static, rendered book.

One function, :func:`slider_figure`, builds both forms of an interactive figure from one ``draw(value)``:

* **No kernel (the rendered HTML book).** Every value's figure is drawn up front and stored as a PNG in a
  ``widgets.Stack`` of ``widgets.Image``. The slider's position is linked to the stack *in the browser*
  (``jslink``: slider ``index`` -> stack ``selected_index``), so moving the slider on the static page switches
  the picture with no Python running. The book serves the widget JavaScript itself (see ``_config.yml``).
* **With a kernel (JupyterLab, Colab, Binder).** The same link switches pictures instantly, and the kernel also
  watches the slider: after each move it calls ``draw(value)`` again (once the slider has rested for
  ``redraw_delay`` seconds) and replaces that frame, so the figure follows the notebook's current state (a
  model you retrained, a global you changed). To explore other values, call ``slider_figure`` again with them.

Layout of the returned widget::

    VBox (class "sparse-slider-figure")
    |-- SelectionSlider  options = [(str(v), v) for v in values]
    `-- Stack            children = [Image(draw(v) as PNG) for v in values]

Keep ``values`` short (a handful to a few dozen): every frame is stored in the page.
"""
from __future__ import annotations

import asyncio
import io
from typing import Callable, Sequence

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

__all__ = ["slider_figure", "linked_slider", "figure_png", "SLIDER_CLASS", "MAX_FRAMES"]

#: CSS class of every slider figure's outer box (the book's browser test looks for it).
SLIDER_CLASS = "sparse-slider-figure"
#: Most frames one slider may hold: each is a PNG stored in the page.
MAX_FRAMES = 48


def figure_png(fig: Figure, dpi: int = 100) -> bytes:
    """Render a figure to PNG bytes and close it (so the notebook does not also show it)."""
    if not isinstance(fig, Figure):
        raise ValueError(f"fig must be a matplotlib Figure, got {type(fig).__name__}: {fig!r}")
    if not (isinstance(dpi, (int, float)) and dpi > 0):
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    buf = io.BytesIO()
    try:
        fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    return buf.getvalue()


def _draw_png(draw: Callable[[object], Figure], v, name: str, dpi: int) -> bytes:
    fig = draw(v)
    if not isinstance(fig, Figure):
        if fig is not None and hasattr(fig, "figure"):  # an Axes was returned: accept its figure
            fig = fig.figure
        else:
            raise ValueError(f"draw({v!r}) for slider {name!r} must return a matplotlib Figure, "
                             f"got {type(fig).__name__}")
    return figure_png(fig, dpi=dpi)


def linked_slider(children: list, labels: list[str], values: list, value, description: str):
    """A ``SelectionSlider`` over ``values`` and a ``Stack`` of ``children``, linked in the browser (``jslink``:
    the slider's index picks the stack's child, with or without a kernel). Returns ``(slider, stack)``."""
    import ipywidgets as widgets

    slider = widgets.SelectionSlider(options=list(zip(labels, values)), value=value,
                                     description=description, continuous_update=True,
                                     style={"description_width": "initial"},
                                     layout=widgets.Layout(width="60%", min_width="18em"))
    stack = widgets.Stack(children=children, selected_index=values.index(value))
    widgets.jslink((slider, "index"), (stack, "selected_index"))
    return slider, stack


def slider_figure(draw: Callable[[object], Figure], name: str, values: Sequence,
                  value=None, description: str | None = None, *, dpi: int = 100,
                  redraw_delay: float = 0.3):
    """A slider over ``values`` of parameter ``name`` that switches between the figures ``draw(v)``.

    Args:
        draw: function of one value returning a matplotlib Figure (it need not close it).
        name: the parameter's name, shown as the slider's label unless ``description`` is given.
        values: the values to draw, in slider order (distinct, at most ``MAX_FRAMES``).
        value: the value shown first (default: the first of ``values``).
        description: the slider's label (default: ``name``).
        dpi: resolution of the stored PNG frames.
        redraw_delay: with a kernel, seconds the slider must rest before ``draw`` runs again.

    Returns an ipywidgets ``VBox`` (CSS class ``SLIDER_CLASS``); make it the last expression of a cell.
    It works on the static HTML page (frames switched in the browser) and, with a kernel, redraws live.

    Raises:
        ValueError: for an empty name, empty/duplicate/too many values, a ``value`` not in ``values``,
            a bad ``dpi``/``redraw_delay``, or a ``draw`` that does not return a Figure.
    """
    import ipywidgets as widgets

    if not callable(draw):
        raise ValueError(f"draw must be a function value -> matplotlib Figure, got {draw!r}")
    if not isinstance(name, str) or not name.strip():
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if isinstance(values, (str, bytes)):
        raise ValueError(f"values must be a sequence of values, got the string {values!r}")
    values = list(values)
    if not values:
        raise ValueError(f"values must not be empty for slider {name!r}")
    if len(values) > MAX_FRAMES:
        raise ValueError(f"values has {len(values)} entries for slider {name!r}; at most {MAX_FRAMES} "
                         "frames fit in a page: pick fewer")
    labels = [str(v) for v in values]
    if len(set(labels)) != len(labels):
        raise ValueError(f"values must be distinct (as shown on the slider) for slider {name!r}, got {values!r}")
    if value is None:
        value = values[0]
    if value not in values:
        raise ValueError(f"value={value!r} is not one of the slider's values {values!r}")
    if not (isinstance(dpi, (int, float)) and dpi > 0):
        raise ValueError(f"dpi must be a positive number, got {dpi!r}")
    if not (isinstance(redraw_delay, (int, float)) and redraw_delay >= 0):
        raise ValueError(f"redraw_delay must be a number of seconds >= 0, got {redraw_delay!r}")

    images = [widgets.Image(value=_draw_png(draw, v, name, dpi), format="png",
                            layout=widgets.Layout(max_width="100%", height="auto")) for v in values]
    slider, stack = linked_slider(images, labels, values, value, description or name)

    # With a kernel only (no Python runs on the static page): redraw the chosen frame from the current state.
    pending: list = []

    def redraw(index: int) -> None:
        if slider.index == index:  # the slider has not moved on meanwhile
            images[index].value = _draw_png(draw, values[index], name, dpi)

    def on_move(change) -> None:
        index = change["new"]
        if index is None:
            return
        for handle in pending:
            handle.cancel()
        pending.clear()
        try:
            loop = asyncio.get_running_loop()  # the kernel's event loop
        except RuntimeError:
            redraw(index)  # plain Python (scripts, tests): draw at once
            return
        pending.append(loop.call_later(redraw_delay, redraw, index))

    slider.observe(on_move, names="index")

    box = widgets.VBox([slider, stack])
    box.add_class(SLIDER_CLASS)
    return box
