"""The app's launch on a machine too busy to answer at once."""

from __future__ import annotations

import time

import httpx
from gradio import http_server

from tests.fixtures_webui import start_webui

HELD_S = 8.0  # how long the server cannot answer: more than the 3-s timeout of Gradio's check


def test_the_app_starts_when_its_own_server_answers_late(tmp_path, monkeypatch):
    """Gradio's launch asks its own server for a page (an HTTP HEAD with a 3-s timeout) and at the
    first timeout raised "When localhost is not accessible, a shareable link must be created", its
    server left running: a machine busy training could not start the app. Here the server's event
    loop is held for real for ``HELD_S`` as that check begins (a blocking call run on it), as a machine
    too busy to run it would; the launch waits for it (``app.LOCALHOST_CHECK_S``)."""
    servers: list[http_server.Server] = []
    held_at: list[float] = []
    run_in_thread, head = http_server.Server.run_in_thread, httpx.head

    def listen(server: http_server.Server) -> None:
        run_in_thread(server)
        servers.append(server)

    def head_of_a_held_server(url: str, **kwargs):
        if not held_at:
            held_at.append(time.monotonic())
            servers[0].servers[0].get_loop().call_soon_threadsafe(time.sleep, HELD_S)
        return head(url, **kwargs)

    monkeypatch.setattr(http_server.Server, "run_in_thread", listen)
    monkeypatch.setattr(httpx, "head", head_of_a_held_server)
    try:
        app = start_webui(tmp_path, start_worker=False)
    finally:
        monkeypatch.undo()
    try:
        assert held_at, "the launch never checked its server"
        assert time.monotonic() - held_at[0] >= HELD_S  # it waited for the held server
        page = httpx.get(app.url, timeout=30)
        assert page.status_code == 200 and "SAGE Fine-Tune Studio" in page.text
    finally:
        app.close()
