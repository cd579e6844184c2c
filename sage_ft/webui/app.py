"""``build_app``: the Blocks page (top bar + one tab per module) over one set of ``AppServices``.

Tabs lay out and wire; the registry (``components.Registry``) lets one handler relabel the whole
page when the language changes. ``launch_app`` is the one place that calls ``Blocks.launch`` with
the security settings (login, upload size, no extra allowed paths, no run history in the browser).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from typing import Any

import gradio as gr

from sage_ft.webui import (
    chat_memory,
    chat_tab,
    export_tab,
    i18n,
    monitor_tab,
    render,
    topbar,
    train_tab,
)
from sage_ft.webui.auth import LoginGuard
from sage_ft.webui.components import Registry, forget_stamps
from sage_ft.webui.services import AppServices

log = logging.getLogger(__name__)

TABS = (("tab.train", train_tab), ("tab.monitor", monitor_tab), ("tab.chat", chat_tab), ("tab.export", export_tab))


def build_app(services: AppServices, lang: str | None = None) -> gr.Blocks:
    """The whole page. ``demo.registry`` holds the components by ``"tab.elem"`` id (tests use it)."""
    lang = i18n.normalize(lang or services.default_lang)
    reg = Registry()
    with gr.Blocks(title="SAGE Fine-Tune Studio") as demo:
        topbar.build(reg, services, lang)
        chat_memory.build_state(reg)
        with gr.Tabs(elem_id="main-tabs"):
            for tab_id, module in TABS:
                with reg.add(tab_id, gr.Tab(i18n.t(tab_id, lang), id=tab_id.split(".")[1],
                                            elem_id=tab_id.replace(".", "-"))):
                    module.build(reg, services, lang)
                reg[tab_id].select(None, None, None, js=render.RESIZE_CHARTS_JS, api_name=False, show_progress="hidden")
        parts = [topbar.wire(reg, services)]
        for _, module in TABS:
            part = module.wire(reg, services)
            if part is not None:  # the tab has something live to refresh on the page tick
                parts.append(part)
        topbar.wire_tick(reg, parts)
        localized = [e.component for e in reg.localized()]
        reg["top.lang"].change(lambda lg: reg.relabel(i18n.normalize(lg)), reg["top.lang"], localized,
                               api_name="set_lang", show_progress="hidden")
        reattach = demo.load(lambda lg: on_load(services, i18n.normalize(lg)), reg["top.lang"],
                             [reg["train.task_id"], reg["train.progress"], reg["mon.table"], reg["mon.version"],
                              reg["mon.task"], reg["mon.compare"], reg["mon.progress"]], api_name="reattach",
                             show_progress="hidden")
        forget_stamps(reattach, reg["train.stamp"], reg["mon.stamp"])
        fields = [reg[f"train.{n}"] for n in train_tab.FIELDS]
        demo.load(lambda lg, *v: train_tab.preview(lg, *v), [reg["top.lang"], *fields],
                  [reg["train.command"], reg["train.yaml"]], api_name=False, show_progress="hidden")
        demo.load(train_tab.restore_form, reg["train.draft"], fields, api_name=False, show_progress="hidden")
        # The page's language, in the browser alone (no round trip): the one picked last on this browser,
        # else (without --lang) the browser's own; setting it fires the change that relabels the page.
        # Not a gr.BrowserState: a third one, read by a load event, made the Chat settings' restore miss
        # its stored value now and then (the settings came back empty after a reload).
        demo.load(None, reg["top.lang"], reg["top.lang"], js=i18n.opening_lang_js(services.default_lang is None),
                  api_name=False, show_progress="hidden")
        reg["top.lang"].input(None, reg["top.lang"], None, js=i18n.KEEP_LANG_JS, api_name=False,
                              show_progress="hidden")
        demo.load(chat_memory.restore_chats, [reg["chat.saved"], reg["chat.settings_saved"], reg["top.lang"]],
                  [reg[f"chat.{name}"] for name in chat_memory.RESTORED],
                  api_name=False, show_progress="hidden")
    demo.registry = reg  # type: ignore[attr-defined]
    demo.services = services  # type: ignore[attr-defined]
    return demo


def on_load(services: AppServices, lang: str) -> list[Any]:
    """Re-attach a fresh page to the state kept in the core: the current task and the task list."""
    task_id, progress = train_tab.on_load(services, lang)
    table, version, choices, compare = monitor_tab.refresh(services, None, lang)
    return [task_id, progress, table, version, gr.update(choices=choices["choices"], value=task_id), compare,
            monitor_tab.unpicked_progress(bool(choices["choices"]), lang) if task_id is None else gr.skip()]


# Gradio's queue looks for new events every 1 ms and for progress to send every 10 ms while idle
# (on Linux): ~4.4% of a core spent doing nothing, taken from the training thread on a small machine
# (bench/ui_cost.py). Every 10 ms / 50 ms costs about a tenth of that, adds at most 10 ms before an
# event starts and sends progress bars 20 times a second (streamed chat tokens are not delayed).
QUEUE_IDLE_POLL_S = 0.01
PROGRESS_IDLE_POLL_S = 0.05
# How long launch waits for its own server to answer on localhost (seconds). Gradio sends one HEAD
# with a 3-s timeout and gives up at the first timeout, raising "When localhost is not accessible, a
# shareable link must be created", with its server left running: a machine busy training (or a test
# session under load) made the app fail to start with that misleading message.
LOCALHOST_CHECK_S = 60.0


def launch_app(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
               guard: LoginGuard | None = None, prevent_thread_lock: bool = False, quiet: bool = False,
               **extra: Any) -> tuple[Any, str, str | None]:
    """Launch with the app's security settings; returns (fastapi app, local url, share url or None)."""
    # Gradio's queue rebuilds a pandas summary of its last 10,000 events after every event by
    # default; each open page sends an event every 2 s, so that cost grew with the app's uptime
    # (about 8 ms per tick at 10,000 events, bench/monitoring.py). Every 200 events is plenty.
    os.environ.setdefault("GRADIO_ANALYTICS_CACHE_FREQUENCY", "200")
    _wait_longer_for_localhost()
    demo.queue(default_concurrency_limit=4)
    queue = getattr(demo, "_queue", None)  # private: tuned only where the attributes exist
    for attr, seconds in (("sleep_when_free", QUEUE_IDLE_POLL_S),
                          ("progress_update_sleep_when_free", PROGRESS_IDLE_POLL_S)):
        if isinstance(getattr(queue, attr, None), float):
            setattr(queue, attr, max(getattr(queue, attr), seconds))
    return demo.launch(
        server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock, quiet=quiet,
        auth=guard.check if guard else None, auth_message="SAGE Fine-Tune Studio" if guard else None,
        max_file_size=demo.services.max_upload_bytes, allowed_paths=[], run_history=False, show_error=False,
        css=render.CSS, js=render.JS, theme=gr.themes.Soft(), footer_links=["api", "settings"], **extra)


def _wait_longer_for_localhost() -> None:
    """Make Gradio's own "is my server reachable" check (``gradio.networking.url_ok``, called at
    launch) try again until ``LOCALHOST_CHECK_S`` has passed, instead of failing at its first 3-s
    timeout. Installed once per process; a server that really cannot be reached still fails, later."""
    from gradio import networking

    if getattr(networking.url_ok, "sage_ft_patient", False):
        return
    networking.url_ok = _patient(networking.url_ok, LOCALHOST_CHECK_S)


def _patient(url_ok: Callable[[str], bool], seconds: float) -> Callable[[str], bool]:
    def patient_url_ok(url: str) -> bool:
        deadline = time.monotonic() + seconds
        while not url_ok(url):
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.5)
        return True

    patient_url_ok.sage_ft_patient = True  # type: ignore[attr-defined]
    return patient_url_ok
