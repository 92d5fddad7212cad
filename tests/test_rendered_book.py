"""The rendered book, in a real browser: every page loads cleanly offline, and every slider works with no kernel.

Serves the built site (``_build/html``, or ``$BOOK_HTML_DIR``) on 127.0.0.1 and drives a headless Chromium
(Debian's ``chromium``; ``$CHROMIUM`` names another binary) through Playwright. For every page:

* no console error, no uncaught exception, no failed request, no HTTP error, no request to another host
  (the book serves its own JavaScript, fonts and MathJax);
* no broken image; saved widgets render; math is typeset;
* every kernel-free slider (``sparse_tutorial.studies.interactive.slider_figure``) is moved through all its positions
  with the keyboard, and each move must change the picture shown;
* a full-page screenshot goes to ``_build/screenshots/`` (or ``$BOOK_SCREENSHOTS_DIR``).

``make test`` runs this after building the book. Standalone it skips, saying why, when there is no built book
or no Chromium.
"""
from __future__ import annotations

import functools
import http.server
import os
import re
import shutil
import threading
from pathlib import Path
from urllib.parse import urlparse

import pytest

from sparse_tutorial.studies.interactive import SLIDER_CLASS

ROOT = Path(__file__).resolve().parents[1]
HTML = Path(os.environ.get("BOOK_HTML_DIR") or ROOT / "_build" / "html").resolve()
SHOTS = Path(os.environ.get("BOOK_SCREENSHOTS_DIR") or HTML.parent / "screenshots")
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome-stable", "google-chrome")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-default-apps",
                 "--disable-extensions"]
NOT_PAGES = {"_static", "_sources", "_images", "vendor", "screenshots"}
REDIRECT = re.compile(r'http-equiv="refresh"\s+content="\d+;\s*url=([^"]+)"', re.IGNORECASE)
NO_BOOK = "no built book"


def book_pages() -> list[str]:
    if not (HTML / "index.html").is_file():
        return [NO_BOOK]
    return sorted(p.relative_to(HTML).as_posix() for p in HTML.rglob("*.html")
                  if p.relative_to(HTML).parts[0] not in NOT_PAGES)


def find_chromium() -> str | None:
    if os.environ.get("CHROMIUM"):
        return os.environ["CHROMIUM"]
    return next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)


@pytest.fixture(scope="module")
def site():
    """The built book, served on 127.0.0.1 (a free port) for the duration of this module."""
    if not (HTML / "index.html").is_file():
        pytest.skip(f"no built book at {HTML}: run `make test` (or `make book`) first, or set BOOK_HTML_DIR")

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(HTML)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def browser(site, tmp_path_factory):
    """A headless Chromium with a fresh profile, or a skip that says how to install one."""
    chromium = find_chromium()
    if chromium is None:
        pytest.skip("the browser test needs Chromium: `apt-get install -y chromium` as root (`make test` does "
                    "this when it runs as root), or set CHROMIUM=/path/to/chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (see requirements.txt)")
    with sync_api.sync_playwright() as playwright:
        context = playwright.chromium.launch_persistent_context(
            str(tmp_path_factory.mktemp("chromium-profile")), executable_path=chromium, headless=True,
            args=CHROMIUM_ARGS, viewport={"width": 1280, "height": 900}, service_workers="block")
        context.set_default_timeout(30_000)
        try:
            yield context
        finally:
            context.close()


def watch(page, site: str) -> list[str]:
    """Record every console error, page error, failed or foreign request of ``page``."""
    problems: list[str] = []
    local = urlparse(site).netloc

    def route(r):
        url = urlparse(r.request.url)
        if url.scheme in ("data", "blob") or url.netloc == local:
            r.continue_()
        else:
            problems.append(f"request to another host (the book must serve everything itself): {r.request.url}")
            r.abort()

    page.route("**/*", route)
    page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text} {m.location}"))
    page.on("pageerror", lambda e: problems.append(f"uncaught exception: {e} {(e.stack or '')[:600]}"))
    page.on("requestfailed", lambda r: problems.append(f"failed request: {r.url} ({r.failure})"))
    page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
    return problems


BROKEN_IMAGES_JS = """async () => {
    const broken = [];
    for (const img of document.querySelectorAll('img[src]')) {
        img.loading = 'eager';
        try { await img.decode(); } catch (e) {}
        if (!(img.complete && img.naturalWidth > 0)) broken.push(img.getAttribute('src').slice(0, 120));
    }
    return broken;
}"""
WIDGETS_RENDERED_JS = """() => [...document.querySelectorAll('script[type="application/vnd.jupyter.widget-view+json"]')]
    .every(s => s.parentElement.querySelector('.lm-Widget, .widget-error') !== null)"""
MATH_TYPESET_JS = """() => document.querySelectorAll('mjx-container').length
    >= document.querySelectorAll('span.math, div.math').length"""


def shown_image(slider) -> tuple[str | None, bytes]:
    """The source and the pixels of the picture a slider figure shows now."""
    image = slider.query_selector("img")
    return image.get_attribute("src"), image.screenshot()


def check_slider(page, slider, number: int) -> list[str]:
    """Move the slider through every position with the keyboard; each move must change the picture."""
    problems = []
    handle = slider.query_selector(".noUi-handle")
    if handle is None or slider.query_selector("img") is None:
        return [f"slider {number}: no slider handle or no image rendered"]
    n = int(float(handle.get_attribute("aria-valuemax"))) + 1
    handle.focus()
    page.keyboard.press("Home")
    for _ in range(n):  # Home may not be bound: walk left to the start
        page.keyboard.press("ArrowLeft")
    if float(handle.get_attribute("aria-valuenow")) != 0:
        return [f"slider {number}: the keyboard does not move it to its first position"]
    page.wait_for_function("el => { const i = el.querySelector('img'); return i && i.complete }", arg=slider)
    before_src, before_png = shown_image(slider)
    for position in range(1, n):
        page.keyboard.press("ArrowRight")
        try:
            page.wait_for_function("([el, old]) => { const i = el.querySelector('img');"
                                   " return i && i.src !== old && i.complete && i.naturalWidth > 0 }",
                                   arg=[slider, before_src], timeout=5_000)
        except Exception:
            problems.append(f"slider {number}: moving to position {position} did not change the image")
            break
        after_src, after_png = shown_image(slider)
        if after_png == before_png:
            problems.append(f"slider {number}: the figure at position {position} looks the same as at "
                            f"position {position - 1}")
        before_src, before_png = after_src, after_png
    return problems


@pytest.mark.parametrize("page_path", book_pages())
def test_page_in_browser(page_path, site, browser):
    html = (HTML / page_path).read_text(encoding="utf-8", errors="replace")
    if (redirect := REDIRECT.search(html)) is not None:  # e.g. index.html -> the first page
        target = (HTML / page_path).parent / redirect.group(1).split("#")[0]
        assert target.is_file(), f"{page_path} redirects to a missing page {redirect.group(1)}"
        return
    page = browser.new_page()
    problems = watch(page, site)
    try:
        page.goto(f"{site}/{page_path}", wait_until="load")
        page.wait_for_load_state("networkidle")
        if 'application/vnd.jupyter.widget-view+json' in html:
            try:
                page.wait_for_function(WIDGETS_RENDERED_JS, timeout=20_000)
            except Exception:
                problems.append("saved widgets did not render")
            if page.get_by_text("Error displaying widget").count():
                problems.append("a widget shows 'Error displaying widget'")
        if page.locator("span.math, div.math").count():
            try:
                page.wait_for_function(MATH_TYPESET_JS, timeout=20_000)
            except Exception:
                problems.append("MathJax did not typeset the page's math")
        problems += [f"broken image: {src}" for src in page.evaluate(BROKEN_IMAGES_JS)]
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / (page_path.replace("/", "__").removesuffix(".html") + ".png")),
                        full_page=True)
        sliders = page.query_selector_all(f".{SLIDER_CLASS}")
        for number, slider in enumerate(sliders, start=1):
            slider.scroll_into_view_if_needed()
            problems += check_slider(page, slider, number)
        page.wait_for_load_state("networkidle")
    finally:
        page.close()
    assert not problems, f"{page_path}:\n  " + "\n  ".join(problems)


def test_every_chapter_has_an_interactive_figure(site):
    chapters = sorted(p for p in (HTML / "notebooks").glob("*.html")) if (HTML / "notebooks").is_dir() else []
    assert chapters, f"no chapter pages under {HTML / 'notebooks'}"
    missing = [p.name for p in chapters if SLIDER_CLASS not in p.read_text(encoding="utf-8", errors="replace")]
    assert not missing, f"chapters with no slider_figure: {missing}"
