"""The built documentation site, in a real headless Chromium.

The site is built once per session (`mkdocs build --strict`; test_docs.py
reuses the build), served from 127.0.0.1, and every page is loaded: no
console error, no failed or outside request, no broken image. Search finds
the API pages. Screenshots of two pages are saved; pytest's summary names
their folder. Needs Debian's chromium (or $KERAS_EMA_CHROMIUM); skipped without
it, unless $KERAS_EMA_REQUIRE_BROWSER=1 (CI), where it fails.
"""

from __future__ import annotations

import dataclasses
import functools
import http.server
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from urllib.parse import urlsplit

import pytest

pytestmark = pytest.mark.backend(
    "tensorflow", reason="the site does not depend on the backend; checked once"
)

REPO = pathlib.Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@dataclasses.dataclass
class SiteBuild:
    """The output of `mkdocs build --strict` into `site_dir`."""

    site_dir: pathlib.Path
    returncode: int
    output: str


_BUILD: list[SiteBuild] = []


def build_site(tmp_path_factory) -> SiteBuild:
    """Builds the site (once per session, whichever module asks first)."""
    if not _BUILD:
        site_dir = tmp_path_factory.mktemp("site")
        result = subprocess.run(
            [sys.executable, "-m", "mkdocs", "build", "--strict", "-d", site_dir],
            cwd=REPO,
            env=dict(os.environ, NO_MKDOCS_2_WARNING="1"),
            capture_output=True,
            text=True,
            timeout=300,
        )
        _BUILD.append(
            SiteBuild(site_dir, result.returncode, result.stdout + result.stderr)
        )
    return _BUILD[0]


@pytest.fixture(scope="session")
def site_build(tmp_path_factory) -> SiteBuild:
    return build_site(tmp_path_factory)


@pytest.fixture(scope="session")
def chromium() -> str:
    """The Chromium to drive; skips (fails on CI) when it or playwright is missing."""
    path = os.environ.get("KERAS_EMA_CHROMIUM", "/usr/bin/chromium")
    missing = None
    if not os.path.exists(path):
        missing = f"no Chromium at {path}: install Debian's chromium package"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        missing = "the playwright Python package is not installed"
    if missing and os.environ.get("KERAS_EMA_REQUIRE_BROWSER") == "1":
        pytest.fail(missing)
    if missing:
        pytest.skip(missing)
    return path


@pytest.fixture(scope="session")
def site_url(chromium, site_build):
    """The built site, served on 127.0.0.1; its base URL."""
    if not (site_build.site_dir / "index.html").exists():
        pytest.fail(f"mkdocs wrote no site:\n{site_build.output}")
    if site_build.returncode != 0:
        warnings.warn(
            "mkdocs build --strict failed (test_mkdocs_build_strict shows why); "
            "checking the pages it wrote anyway",
            stacklevel=1,
        )

    class Handler(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True

        def handle_error(self, request, client_address):
            # The browser drops connections when it leaves a page.
            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    handler = functools.partial(Handler, directory=str(site_build.site_dir))
    server = Server(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def browser(chromium):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    yield context.new_page()
    context.close()


def site_pages(site_dir: pathlib.Path) -> list[str]:
    """The site's pages, as paths relative to its root (no 404, no search)."""
    pages = []
    for html in sorted(site_dir.rglob("*.html")):
        rel = html.relative_to(site_dir).as_posix()
        if rel == "404.html" or rel.startswith(("search/", "assets/")):
            continue
        pages.append(rel.removesuffix("index.html"))
    return pages


def test_every_page_loads_cleanly(page, site_build, site_url):
    """No console error, page error, failed or outside request, broken image."""
    problems: dict[str, list[str]] = {}  # problem -> the pages showing it
    local, current, origin = urlsplit(site_url).netloc, [""], {}

    def note(what, where=None):
        where, pages = where or current[0] or "/", problems.setdefault(what, [])
        if where not in pages:
            pages.append(where)

    def on_request(request):
        origin[request] = current[0]
        if urlsplit(request.url).scheme in ("http", "https", "ws", "wss") and (
            urlsplit(request.url).netloc != local
        ):
            note(f"request outside the site: {request.url}")

    def on_failed(request):
        # An abort is the browser's choice (leaving the page, or dropping a
        # favicon fetch under load), not the site's: a missing file shows as
        # an HTTP error above, a broken image by its naturalWidth below.
        if request.failure == "net::ERR_ABORTED":
            return
        note(f"request failed ({request.failure}): {request.url}", origin.get(request))

    def on_response(response):
        if response.status >= 400 and urlsplit(response.url).netloc == local:
            note(f"HTTP {response.status}: {response.url}")

    page.on("console", lambda m: m.type == "error" and note(f"console: {m.text}"))
    page.on("pageerror", lambda e: note(f"page error: {e}"))
    page.on("request", on_request)
    page.on("requestfailed", on_failed)
    page.on("response", on_response)
    pages = site_pages(site_build.site_dir)
    assert pages, "the built site has no pages"
    for path in pages:
        current[0] = path
        page.goto(site_url + path, wait_until="load")
        for src in page.eval_on_selector_all(
            "img",
            "imgs => imgs.filter(i => i.naturalWidth === 0)"
            ".map(i => i.getAttribute('src'))",
        ):
            note(f"broken image: {src}")
    report = [
        f"{what}\n    on {len(where)} page(s): {', '.join(where[:5])}"
        + (" ..." if len(where) > 5 else "")
        for what, where in problems.items()
    ]
    assert not report, (
        f"{len(report)} problems on the {len(pages)} pages of the site:\n"
        + "\n".join(report)
    )


def test_search_finds_the_api_page(page, site_url):
    page.goto(site_url, wait_until="load")
    page.keyboard.press("/")
    search = page.locator("input.md-search__input")
    search.wait_for(state="visible", timeout=5000)
    items = page.locator(".md-search-result__item")
    # On a busy machine the theme may attach its input handler after the
    # first keystrokes (the query is then never run): type again until the
    # results come, for up to 30 s.
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    deadline = time.monotonic() + 30
    while True:
        search.fill("")
        search.press_sequentially("EMAOptimizer")
        try:
            items.first.wait_for(timeout=3000)
            break
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                meta = page.locator(".md-search-result__meta").inner_text()
                message = f"no search results after 30 s: {meta!r}"
                raise AssertionError(message) from None
    hrefs = page.eval_on_selector_all(
        ".md-search-result__item a", "links => links.map(a => a.href)"
    )
    assert any("api/EMAOptimizer" in h for h in hrefs), (
        f"no search result for EMAOptimizer links to its API page: {hrefs}"
    )


def test_screenshots(page, site_url, record_property):
    """Saves them to a new temporary folder, which pytest's summary names
    (conftest.py; this works under pytest-xdist too)."""
    out = pathlib.Path(tempfile.mkdtemp(prefix="keras_ema_site_"))
    for name, path in [("front", ""), ("EMAOptimizer", "api/EMAOptimizer/")]:
        response = page.goto(site_url + path, wait_until="load")
        assert response is not None and response.ok, f"{path}: {response}"
        page.screenshot(path=out / f"{name}.png", full_page=True)
    record_property("screenshots", str(out))
