"""slider_figure: the widget tree the static page needs, the browser-side link, live redraws, argument errors."""
import asyncio

import ipywidgets as widgets
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402
from ipywidgets.embed import embed_data  # noqa: E402

from sparse_tutorial.studies.interactive import MAX_FRAMES, SLIDER_CLASS, figure_png, slider_figure  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def draw_line(v):
    fig, ax = plt.subplots(figsize=(2, 1.5))
    ax.plot([0, 1], [0, v])
    ax.set_title(f"v = {v}")
    return fig


def parts(box):
    slider, stack = box.children
    return slider, stack, list(stack.children)


def png(image):
    return bytes(image.value)


def test_structure_one_png_frame_per_value():
    open_before = plt.get_fignums()
    box = slider_figure(draw_line, "block size", [1, 2, 4, 8], value=4)
    assert isinstance(box, widgets.VBox)
    assert SLIDER_CLASS in box._dom_classes
    slider, stack, images = parts(box)
    assert isinstance(slider, widgets.SelectionSlider)
    assert isinstance(stack, widgets.Stack)
    assert slider.description == "block size"
    assert [label for label, _ in slider.options] == ["1", "2", "4", "8"]
    assert slider.value == 4 and slider.index == 2 and stack.selected_index == 2
    assert len(images) == 4 and all(isinstance(im, widgets.Image) for im in images)
    assert all(im.format == "png" and png(im).startswith(PNG_MAGIC) for im in images)
    assert len({png(im) for im in images}) == 4, "every value must have its own picture"
    assert plt.get_fignums() == open_before, "slider_figure must close the figures it draws"


def test_default_value_and_description():
    box = slider_figure(draw_line, "width", (3, 5), description="d_ff")
    slider, stack, _ = parts(box)
    assert slider.value == 3 and stack.selected_index == 0
    assert slider.description == "d_ff"


def test_browser_link_slider_index_to_stack_and_saved_state():
    box = slider_figure(draw_line, "modules", [1, 2, 3])
    slider, stack, images = parts(box)
    # Everything the static page needs is in the widget state saved with the notebook ...
    state = embed_data(views=[box])["manager_state"]["state"]
    for w in [box, slider, stack, *images]:
        assert w.model_id in state
    assert state[stack.model_id]["model_name"] == "StackModel"
    assert list(state[box.model_id]["state"]["children"]) == [f"IPY_MODEL_{slider.model_id}",
                                                              f"IPY_MODEL_{stack.model_id}"]
    # ... including exactly one browser-side link: slider index -> stack selected_index.
    links = [m["state"] for m in state.values() if m["model_name"] == "LinkModel"
             and list(m["state"]["source"]) == [f"IPY_MODEL_{slider.model_id}", "index"]]
    assert len(links) == 1, f"expected one jslink from the slider's index, found {len(links)}"
    assert list(links[0]["target"]) == [f"IPY_MODEL_{stack.model_id}", "selected_index"]


def test_kernel_move_redraws_current_state():
    """With a kernel the slider redraws the chosen frame from the notebook's current state."""
    scale = {"k": 1.0}

    def draw(v):
        return draw_line(v * scale["k"])

    box = slider_figure(draw, "batch size", [1, 2, 3])
    slider, _, images = parts(box)
    before = [png(im) for im in images]
    scale["k"] = 10.0  # the reader changes something draw reads
    slider.value = 3  # no event loop running here: the redraw happens at once
    assert png(images[2]) != before[2]
    assert png(images[0]) == before[0] and png(images[1]) == before[1]


def test_kernel_move_redraw_is_debounced_on_the_event_loop():
    calls = []

    def draw(v):
        calls.append(v)
        return draw_line(v)

    box = slider_figure(draw, "prompt length", [8, 16, 32, 64], redraw_delay=0.05)
    slider, _, _ = parts(box)
    calls.clear()

    async def drag():
        for v in (16, 32, 64):  # three quick moves, as when dragging
            slider.value = v
        await asyncio.sleep(0.2)

    asyncio.run(drag())
    assert calls == [64], f"only the final position should be redrawn, got {calls}"


def test_accepts_an_axes_from_draw():
    box = slider_figure(lambda v: draw_line(v).axes[0], "v", [1, 2])
    assert all(png(im).startswith(PNG_MAGIC) for im in parts(box)[2])


@pytest.mark.parametrize("kwargs, message", [
    (dict(values=[]), "values must not be empty"),
    (dict(values=[1, 2, 1]), "distinct"),
    (dict(values=[1, 2], value=3), "value=3"),
    (dict(values="abc"), "values must be a sequence"),
    (dict(values=list(range(MAX_FRAMES + 1))), "at most"),
    (dict(values=[1, 2], name=""), "name must be a non-empty string"),
    (dict(values=[1, 2], draw=42), "draw must be a function"),
    (dict(values=[1, 2], draw=lambda v: None), "must return a matplotlib Figure"),
    (dict(values=[1, 2], dpi=0), "dpi must be a positive number"),
    (dict(values=[1, 2], redraw_delay=-1), "redraw_delay"),
])
def test_bad_arguments_raise_value_error(kwargs, message):
    args = dict(draw=draw_line, name="block size")
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        slider_figure(args.pop("draw"), args.pop("name"), args.pop("values"), **args)


def test_figure_png_closes_and_checks():
    fig = draw_line(1)
    assert figure_png(fig).startswith(PNG_MAGIC)
    assert not plt.fignum_exists(fig.number)
    with pytest.raises(ValueError, match="matplotlib Figure"):
        figure_png("not a figure")
