"""slider_text: one escaped <pre> page per value, linked to the slider in the browser, argument errors."""
import ipywidgets as widgets
import pytest
from ipywidgets.embed import embed_data

from sparse_tutorial.studies.interactive import MAX_FRAMES
from sparse_tutorial.studies.text_slider import TEXT_SLIDER_CLASS, slider_text


def test_one_escaped_page_per_value_and_the_link():
    box = slider_text(["ROMEO:\nAy <me>", "JULIET: & so"], "temperature", [0.5, 1.0], value=1.0)
    assert TEXT_SLIDER_CLASS in box._dom_classes
    slider, stack = box.children
    assert isinstance(slider, widgets.SelectionSlider) and isinstance(stack, widgets.Stack)
    assert slider.index == 1 and stack.selected_index == 1
    pages = [p.value for p in stack.children]
    assert "ROMEO:\nAy &lt;me&gt;</pre>" in pages[0] and "JULIET: &amp; so" in pages[1]
    state = embed_data(views=[box])["manager_state"]["state"]   # what the static page gets
    links = [m["state"] for m in state.values() if m["model_name"] == "LinkModel"
             and list(m["state"]["source"]) == [f"IPY_MODEL_{slider.model_id}", "index"]]
    assert len(links) == 1, "the browser needs a jslink from the slider's index to the stack's"
    assert list(links[0]["target"]) == [f"IPY_MODEL_{stack.model_id}", "selected_index"]


@pytest.mark.parametrize("texts, name, values, value, match", [
    (["a"], "", [1], None, "name"),
    (["a", "b"], "t", [1], None, "one string per value"),
    ([1], "t", [1], None, "one string per value"),
    (["a", "b"], "t", [1, "1"], None, "distinct"),
    (["a"], "t", [1], 2, "not one of"),
    ([], "t", [], None, "1 to"),
    (["a"] * (MAX_FRAMES + 1), "t", list(range(MAX_FRAMES + 1)), None, "1 to"),
    ("ab", "t", [1, 2], None, "sequences"),
])
def test_bad_arguments_are_named(texts, name, values, value, match):
    with pytest.raises(ValueError, match=match):
        slider_text(texts, name, values, value)
