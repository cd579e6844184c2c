"""The browser tests' Chromium (Debian's, never a downloaded one), and what its pages said.

``browser`` is a headless Chromium for one test. Every page it opens is watched: console messages,
uncaught errors, failed requests and the Gradio queue calls (which event joined, which answered
with an error status), stamped with seconds since the browser started. When the test fails, that
journal is added to its report, so a CI failure of the kind "the page stopped updating" says whether
the page stopped sending its events, the server stopped answering, or Gradio lost the connection
(its "Connection Lost" path drops every later event of the page).
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import pytest

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
JOURNAL_LINES = 300  # the last ones are kept: about ten minutes of one page's 2-s timer
# How long a retrying assertion (``expect``) waits unless it names its own timeout (ms). Playwright's
# default, 5 s, is too short on this shared 2-core machine (a page restored after a reload takes a
# server round trip, queued behind the page's other load events). Set for every browser test by its
# fixture: ``expect.set_options`` is global to the worker, so a test setting it alone made the
# others' waits depend on which tests that worker had run before (a CI failure, 5 s after a reload).
EXPECT_TIMEOUT_MS = 30_000


class BrowserJournal:
    """The last ``JOURNAL_LINES`` things the watched pages did, one line each."""

    def __init__(self) -> None:
        self._started = time.monotonic()
        self._lines: deque[str] = deque(maxlen=JOURNAL_LINES)

    def add(self, text: str) -> None:
        self._lines.append(f"{time.monotonic() - self._started:8.1f}s {text}")

    def text(self) -> str:
        return "\n".join(self._lines) or "(nothing recorded)"

    def watch(self, context: Any) -> None:
        """Record what every page of the Playwright ``context`` says and asks the server."""
        context.on("console", lambda msg: self.add(f"console.{msg.type}: {msg.text[:300]}"))
        context.on("weberror", lambda err: self.add(f"page error: {err.error}"))
        context.on("requestfailed", self._failed)
        context.on("request", self._request)
        context.on("response", self._response)

    def _request(self, request: Any) -> None:
        if "/queue/join" in request.url:
            try:
                body = json.loads(request.post_data or "{}")
            except ValueError:
                body = {}
            self.add(f"event joined: fn {body.get('fn_index')} trigger {body.get('trigger_id')}")
        elif "/queue/data" in request.url:
            self.add("event stream opened")

    def _failed(self, request: Any) -> None:
        if "/queue/data" in request.url and "ERR_ABORTED" in str(request.failure):
            self.add("event stream closed")  # by the page, once it has no event waiting
        else:
            self.add(f"request failed: {request.method} {request.url} ({request.failure})")

    def _response(self, response: Any) -> None:
        if response.status >= 400:
            self.add(f"HTTP {response.status}: {response.request.method} {response.url}")


class WatchedBrowser:
    """A launched Chromium whose every context is watched by the test's journal (the Playwright
    ``Browser`` methods the tests use)."""

    def __init__(self, browser: Any, journal: BrowserJournal):
        self._browser, self.journal = browser, journal

    def new_context(self, **kwargs: Any) -> Any:
        context = self._browser.new_context(**kwargs)
        self.journal.watch(context)
        return context

    def new_page(self, **kwargs: Any) -> Any:
        return self.new_context(**kwargs).new_page()

    def close(self) -> None:
        if self._browser.is_connected():
            self._browser.close()


@pytest.fixture
def browser(request: pytest.FixtureRequest) -> Iterator[WatchedBrowser]:
    from playwright.sync_api import expect, sync_playwright

    expect.set_options(timeout=EXPECT_TIMEOUT_MS)
    journal = BrowserJournal()
    request.node.browser_journal = journal  # read by pytest_runtest_makereport when the test fails
    with sync_playwright() as pw:
        watched = WatchedBrowser(pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS), journal)
        try:
            yield watched
        finally:
            watched.close()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    journal = getattr(item, "browser_journal", None)
    if report.failed and journal is not None:
        report.sections.append(("browser journal (last lines)", journal.text()))
