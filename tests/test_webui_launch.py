"""The app's launch on a machine too busy to answer at once."""

from __future__ import annotations

import sys
import threading
import time

import httpx

from tests.fixtures_webui import start_webui

# Busy threads: when the launching thread waits for the answer, the interpreter goes to one of the
# threads waiting for it, the server's or a busy one; with three busy ones, mostly a busy one.
HOGS = 3


def test_the_app_starts_when_its_own_server_answers_late(tmp_path, monkeypatch):
    """Gradio's launch asks its own server for a page (an HTTP HEAD with a 3-s timeout) and at the
    first timeout raised "When localhost is not accessible, a shareable link must be created", its
    server left running: a machine busy training could not start the app. Here the app's threads are
    starved for real as that HEAD is sent: busy threads keep the GIL for 4 s at a time
    (``sys.setswitchinterval``) for 8 s, so the server answers after the 3 s (in most runs: the
    launching thread may be the one kept waiting instead); the launch waits (``app.LOCALHOST_CHECK_S``)."""
    spinning = threading.Barrier(HOGS + 1)
    hogs = [threading.Thread(target=_busy_for, args=(8.0, spinning), daemon=True) for _ in range(HOGS)]
    real_head = httpx.head

    def head_on_a_busy_machine(url, **kwargs):
        if hogs[0].ident is None:
            for hog in hogs:
                hog.start()
            spinning.wait()  # they hold the interpreter as the request goes out
        return real_head(url, **kwargs)

    interval = sys.getswitchinterval()
    monkeypatch.setattr(httpx, "head", head_on_a_busy_machine)
    sys.setswitchinterval(4.0)
    try:
        app = start_webui(tmp_path, start_worker=False)
    finally:
        sys.setswitchinterval(interval)
        monkeypatch.undo()
    try:
        assert hogs[0].ident is not None, "the launch sent no HEAD"
        for hog in hogs:
            hog.join(timeout=60)
        page = httpx.get(app.url, timeout=30)
        assert page.status_code == 200 and "SAGE Fine-Tune Studio" in page.text
    finally:
        app.close()


def _busy_for(seconds: float, spinning: threading.Barrier) -> None:
    spinning.wait()
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        pass
