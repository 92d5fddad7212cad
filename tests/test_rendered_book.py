"""The rendered book, in a real browser: every page loads cleanly offline, and every slider works with no kernel.

Serves the built site (``_build/html``, or ``$BOOK_HTML_DIR``) on 127.0.0.1 and drives a headless Chromium
(Debian's ``chromium``; ``$CHROMIUM`` names another binary) through Playwright. For every page:

* no console error, no uncaught exception, no failed request, no HTTP error, no request to another host
  (the book serves its own JavaScript, fonts and MathJax);
* no broken image; saved widgets render; math is typeset;
* every kernel-free slider (``sparse_tutorial.studies.interactive.slider_figure``) is moved through all its positions
  with the keyboard, and each move must change the picture shown; every text slider
  (``sparse_tutorial.studies.text_slider.slider_text``) likewise, and each move must change the text shown;
* the page's layout fits its text column at 1280 px: no table and no code cell (input or output) is wider than
  the column (``LAYOUT_JS``: a table's right edge, and a code block's ``scrollWidth`` against its ``clientWidth``,
  so a block that hides or scrolls part of a line fails too);
* no heading carries a hand-typed number on top of the book's own ("5.3. 2. The paper's ...");
* every static figure has a numbered caption (MyST-NB ``mystnb: figure`` cell metadata: ``<figure>`` with a
  ``figcaption`` and its "Fig. X.Y" number). Slider figures are widgets, which MyST-NB cannot caption; the prose
  before each one introduces it;
* a full-page screenshot goes to ``_build/screenshots/`` (or ``$BOOK_SCREENSHOTS_DIR``).

Each page gets its own browser context (no cookies, storage or cache shared between pages).

The test never waits for Playwright's "networkidle". That state is lost for good when a page is quiet for 500 ms
before its ``load`` event and then makes a request that ends before ``load`` (a slow first parse of a chapter,
then its fonts): Playwright drops "networkidle" at ``load`` and never fires it again, and the wait times out.
This made ``make test`` fail at random on fresh machines (``test_quiet_wait_survives_early_idle`` has such a page).
Instead the test waits for what it checks (document and fonts loaded, widgets rendered, math typeset, images
decoded) and for its own count of the page's open requests to stay at zero; a timeout names the page and the
requests still open.

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
import time
from pathlib import Path
from urllib.parse import urlparse

import pytest

from sparse_tutorial.studies.interactive import SLIDER_CLASS
from sparse_tutorial.studies.text_slider import TEXT_SLIDER_CLASS

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
PAGE_TIMEOUT_MS = 30_000


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
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(  # on CI a skip would hide a failure
            f"no built book at {HTML}: run `make test` (or `make book`) first, or set BOOK_HTML_DIR")

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
def browser():
    """A headless Chromium (a fresh temporary profile), or a skip that says how to install one."""
    chromium = find_chromium()
    if chromium is None:
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(  # on CI a skip would hide a failure
            "the browser test needs Chromium: `apt-get install -y chromium` as root (`make test` does "
            "this when it runs as root), or set CHROMIUM=/path/to/chromium")
    sync_api = pytest.importorskip("playwright.sync_api", reason="pip install playwright (see requirements.txt)")
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=chromium, headless=True, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()


@pytest.fixture
def context(browser):
    """A new browser context for each test: no state leaks from one page to the next."""
    ctx = browser.new_context(viewport={"width": 1280, "height": 900}, service_workers="block")
    ctx.set_default_timeout(PAGE_TIMEOUT_MS)
    try:
        yield ctx
    finally:
        ctx.close()


class Requests:
    """The page's open requests, counted from Playwright's request events (our own "network idle")."""

    def __init__(self, page):
        self.page = page
        self.open: dict[int, tuple[str, str, float]] = {}   # id -> (resource type, url, start time)
        self.last_change = time.monotonic()
        page.on("request", self._start)
        page.on("requestfinished", self._end)
        page.on("requestfailed", self._end)

    def _start(self, request) -> None:
        self.open[id(request)] = (request.resource_type, request.url, time.monotonic())
        self.last_change = time.monotonic()

    def _end(self, request) -> None:
        self.open.pop(id(request), None)
        self.last_change = time.monotonic()

    def wait_quiet(self, when: str, quiet_s: float = 0.5, timeout_s: float = PAGE_TIMEOUT_MS / 1000) -> list[str]:
        """Wait until no request has been open for ``quiet_s``; on timeout, name every request still open."""
        deadline = time.monotonic() + timeout_s
        while self.open or time.monotonic() - self.last_change < quiet_s:
            if time.monotonic() > deadline:
                now = time.monotonic()
                still = [f"{kind} {url[:120]} (open {now - t0:.1f} s)" for kind, url, t0 in self.open.values()]
                return [f"{when}: requests still open after {timeout_s:.0f} s: " + "; ".join(still or ["none"])]
            self.page.wait_for_timeout(50)   # lets Playwright deliver the page's events
        return []


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
DOCUMENT_READY_JS = """async () => { await document.fonts.ready; return document.readyState === 'complete' }"""

#: Tables and code blocks wider than the text column. A table is measured by its right edge against the column's
#: (a wrapper that scrolls or clips it does not hide it); a code block (``pre``, a cell's input or printed output)
#: by ``scrollWidth`` against ``clientWidth`` (its lines run past its own box, which the theme clips or scrolls)
#: and by its right edge. One pixel of slack absorbs sub-pixel rounding.
LAYOUT_JS = """() => {
    const column = document.querySelector('article.bd-article') || document.querySelector('main');
    if (!column) return ['no article column found'];
    const right = column.getBoundingClientRect().right;
    const where = el => {
        const cell = el.closest('.cell');
        const heading = [...document.querySelectorAll('h1, h2, h3')]
            .filter(h => h.compareDocumentPosition(el) & Node.DOCUMENT_POSITION_FOLLOWING).pop();
        return (cell && cell.id ? 'cell ' + cell.id + ', ' : '')
            + 'under "' + (heading ? heading.textContent.replace('#', '').trim().slice(0, 60) : 'top') + '"';
    };
    const wide = [];
    for (const table of column.querySelectorAll('table')) {
        if (table.closest('.sparse-slider-figure')) continue;
        const r = table.getBoundingClientRect();
        if (r.width > 0 && r.right > right + 1)
            wide.push(`table ${Math.round(r.right - right)} px past the column (${where(table)}): `
                      + table.textContent.trim().replace(/\\s+/g, ' ').slice(0, 80));
    }
    for (const pre of column.querySelectorAll('pre')) {
        const r = pre.getBoundingClientRect();
        if (r.width === 0) continue;
        const longest = Math.max(...pre.textContent.split('\\n').map(l => l.length));
        if (pre.scrollWidth > pre.clientWidth + 1 || r.right > right + 1)
            wide.push(`code block ${pre.scrollWidth - pre.clientWidth} px wider than its box, longest line `
                      + `${longest} characters (${where(pre)}): `
                      + pre.textContent.split('\\n').find(l => l.length === longest).trim().slice(0, 80));
    }
    return wide;
}"""
#: A heading whose own text starts with a number ("2. The paper's ...", "3) ...", "1.2 ..."): on a numbered page
#: it is numbered twice, and on an unnumbered one it competes with the book's numbering.
HAND_NUMBERED = re.compile(r"^\d+(\.\d+)*[.)]?\s+\S")
HEADINGS_JS = """() => [...document.querySelectorAll('article h1, article h2, article h3, article h4')].map(h => {
    const c = h.cloneNode(true);
    c.querySelectorAll('.section-number, .headerlink').forEach(e => e.remove());
    return c.textContent.trim();
})"""
#: Static figures without a numbered caption. Images inside widgets (slider figures) are left out.
UNCAPTIONED_JS = """() => [...document.querySelectorAll('article img')]
    .filter(img => !img.closest('.jupyter-widgets, .sparse-slider-figure, .widget-box'))
    .filter(img => {
        const fig = img.closest('figure');
        const cap = fig && fig.querySelector('figcaption');
        return !(cap && cap.querySelector('.caption-number') && cap.textContent.trim().length > 12);
    })
    .map(img => {
        const heading = [...document.querySelectorAll('h1, h2, h3')]
            .filter(h => h.compareDocumentPosition(img) & Node.DOCUMENT_POSITION_FOLLOWING).pop();
        return 'under "' + (heading ? heading.textContent.replace('#', '').trim().slice(0, 60) : 'top') + '": '
            + img.getAttribute('src').slice(0, 80);
    })"""


def hand_numbered(headings: list[str]) -> list[str]:
    """The headings that carry a hand-typed number."""
    return [h for h in headings if HAND_NUMBERED.match(h)]


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


SHOWN_TEXT_JS = """el => [...el.querySelectorAll('pre.sparse-slider-sample')]
    .filter(p => p.offsetParent !== null).map(p => p.textContent).join('\\n')"""


def check_text_slider(page, box, number: int) -> list[str]:
    """Move a text slider through every position with the keyboard; each move must change the text shown."""
    handle = box.query_selector(".noUi-handle")
    if handle is None:
        return [f"text slider {number}: no slider handle rendered"]
    n = int(float(handle.get_attribute("aria-valuemax"))) + 1
    handle.focus()
    page.keyboard.press("Home")
    for _ in range(n):
        page.keyboard.press("ArrowLeft")
    before = page.evaluate(SHOWN_TEXT_JS, box)
    if not before.strip():
        return [f"text slider {number}: no text shown"]
    for position in range(1, n):
        page.keyboard.press("ArrowRight")
        try:
            page.wait_for_function(f"([el, old]) => {{ const t = ({SHOWN_TEXT_JS})(el); return t && t !== old }}",
                                   arg=[box, before], timeout=5_000)
        except Exception:
            return [f"text slider {number}: moving to position {position} did not change the text"]
        before = page.evaluate(SHOWN_TEXT_JS, box)
    return []


@pytest.mark.parametrize("page_path", book_pages())
def test_page_in_browser(page_path, site, context):
    html = (HTML / page_path).read_text(encoding="utf-8", errors="replace")
    if (redirect := REDIRECT.search(html)) is not None:  # e.g. index.html -> the first page
        target = (HTML / page_path).parent / redirect.group(1).split("#")[0]
        assert target.is_file(), f"{page_path} redirects to a missing page {redirect.group(1)}"
        return
    page = context.new_page()
    problems = watch(page, site)
    requests = Requests(page)
    try:
        page.goto(f"{site}/{page_path}", wait_until="load")
        if not page.evaluate(DOCUMENT_READY_JS):
            problems.append("the document did not finish loading")
        problems += requests.wait_quiet("after load")
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
        problems += [f"too wide for the text column: {w}" for w in page.evaluate(LAYOUT_JS)]
        problems += [f"heading numbered twice (a hand-typed number): {h!r}"
                     for h in hand_numbered(page.evaluate(HEADINGS_JS))]
        problems += [f"figure without a numbered caption: {f}" for f in page.evaluate(UNCAPTIONED_JS)]
        SHOTS.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(SHOTS / (page_path.replace("/", "__").removesuffix(".html") + ".png")),
                        full_page=True)
        sliders = page.query_selector_all(f".{SLIDER_CLASS}")
        for number, slider in enumerate(sliders, start=1):
            slider.scroll_into_view_if_needed()
            problems += check_slider(page, slider, number)
        for number, box in enumerate(page.query_selector_all(f".{TEXT_SLIDER_CLASS}"), start=1):
            box.scroll_into_view_if_needed()
            problems += check_text_slider(page, box, number)
        problems += requests.wait_quiet("after the sliders")  # late failures and errors are still caught
    finally:
        page.close()
    assert not problems, f"{page_path}:\n  " + "\n  ".join(problems)


#: A page that is quiet for over 500 ms before ``load``, then makes a request that ends before ``load``: the
#: order of events by which a chapter page lost Playwright's "networkidle" on a slow first run.
EARLY_IDLE_PAGE = {
    "/": b'<html><head><script defer src="/slow.js"></script></head><body><p>early idle</p></body></html>',
    "/slow.js": b'let t = Date.now(); while (Date.now() - t < 1200) {}\n'
                b'const x = new XMLHttpRequest(); x.open("GET", "/data.txt", false); x.send();\n',
    "/data.txt": b"ok",
    "/hangs": b'<html><body><script>fetch("/slow-resource")</script></body></html>',
}


@pytest.fixture(scope="module")
def early_idle_site():
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/slow-resource":
                time.sleep(4)
            body = EARLY_IDLE_PAGE.get(self.path, b"slow" if self.path == "/slow-resource" else None)
            try:
                self.send_response(200 if body else 404)
                self.end_headers()
                self.wfile.write(body or b"")
            except (BrokenPipeError, ConnectionResetError):  # the test closed the page first
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_quiet_wait_survives_early_idle(early_idle_site, context):
    """The page on which Playwright's "networkidle" never came (Playwright 1.65): our own wait returns.

    A wait for "networkidle" here times out; ``Requests.wait_quiet`` sees the request end and returns.
    """
    page = context.new_page()
    requests = Requests(page)
    try:
        page.goto(early_idle_site + "/", wait_until="load")
        assert page.evaluate("document.readyState") == "complete"
        assert requests.wait_quiet("early-idle page", timeout_s=10) == []
        assert page.evaluate("document.body.textContent").strip() == "early idle"
    finally:
        page.close()


def test_quiet_wait_names_the_request_still_open(early_idle_site, context):
    """A page whose request outlasts the wait: the failure names the page's open request."""
    page = context.new_page()
    requests = Requests(page)
    try:
        page.goto(early_idle_site + "/hangs", wait_until="load")
        problems = requests.wait_quiet("hanging page", timeout_s=1)
        assert len(problems) == 1 and "/slow-resource" in problems[0] and "fetch" in problems[0], problems
    finally:
        page.close()


def test_every_chapter_has_an_interactive_figure(site):
    # the numbered chapters; the back matter's notebook page (the paper's claims) is a table, not a chapter
    chapters = sorted((HTML / "notebooks").glob("[0-9]*.html")) if (HTML / "notebooks").is_dir() else []
    assert chapters, f"no chapter pages under {HTML / 'notebooks'}"
    missing = [p.name for p in chapters
               if not any(c in p.read_text(encoding="utf-8", errors="replace") for c in (SLIDER_CLASS, TEXT_SLIDER_CLASS))]
    assert not missing, f"chapters with no slider_figure or slider_text: {missing}"


def test_hand_numbered_headings_are_found():
    """The rule behind the heading check: a typed number is found, the book's own words are not."""
    assert hand_numbered(["2. The paper's decoding table, per block", "3) Where", "1.2 Widths"]) == [
        "2. The paper's decoding table, per block", "3) Where", "1.2 Widths"]
    assert hand_numbered(["The dense FF layer", "17B: a block", "2-D convolutions", "int8 weights"]) == []


#: A page with each layout fault the page test looks for, and the same content laid out well.
LAYOUT_PAGE = """<html><body><div class="bd-main"><article class="bd-article" style="width: 600px">
<h2><span class="section-number">5.3. </span>2. The paper's table</h2>
<div class="cell" id="wide-code"><pre style="overflow: auto">{code}</pre></div>
<div style="overflow: auto"><table><tr>{cells}</tr></table></div>
<figure><img src="data:image/png;base64,{png}"></figure>
<figure><img src="data:image/png;base64,{png}"><figcaption><span class="caption-number">Fig. 1.1 </span>
A captioned figure.</figcaption></figure>
</article></div></body></html>"""
PNG_1PX = ("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0gAAAABJRU5ErkJggg==")


@pytest.mark.parametrize("faulty", [True, False])
def test_layout_checks_find_planted_faults(context, faulty):
    """Wide code, a wide table, a twice-numbered heading and an uncaptioned figure are each reported; the same
    page without them passes."""
    page = context.new_page()
    try:
        html = LAYOUT_PAGE.format(code="x = 1  # " + "y" * (150 if faulty else 20),
                                  cells="<td>a long column name</td>" * (12 if faulty else 2), png=PNG_1PX)
        if not faulty:
            html = (html.replace("2. The paper's table", "The paper's table")
                    .replace('<figure><img src="data:image/png;base64,' + PNG_1PX + '"></figure>', ""))
        page.set_content(html)
        wide = page.evaluate(LAYOUT_JS)
        headings = hand_numbered(page.evaluate(HEADINGS_JS))
        uncaptioned = page.evaluate(UNCAPTIONED_JS)
    finally:
        page.close()
    if faulty:
        assert [w.split(" ")[0] for w in wide] == ["table", "code"], wide
        assert "longest line 159 characters" in wide[1] and "cell wide-code" in wide[1], wide
        assert headings == ["2. The paper's table"]
        assert len(uncaptioned) == 1, uncaptioned
    else:
        assert (wide, headings, uncaptioned) == ([], [], [])
