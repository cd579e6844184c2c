"""Shared fixtures of the webui area (owned by that area).

- ``start_webui(tmp, ...)``: the real app (build_app + launch_app) on a free loopback port with its own
  task database; returns a ``WebUI`` (url, services, demo) to ``close()``.
- ``webui`` (module scope): a local app with a training worker; ``webui_client``: a gradio_client on it.
- ``form_args(**overrides)``: the Train form's values (TrainConfig field order) for ``/start`` etc.
"""

from __future__ import annotations

import signal
import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sage_ft.config import TrainConfig


def stop_app_process(proc: subprocess.Popen) -> None:
    """End a `python webui.py` child like Ctrl+C does (its clean shutdown), killing it after 60 s."""
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class WebUI:
    url: str
    services: Any
    demo: Any

    def client(self, **kwargs: Any):
        from gradio_client import Client

        return Client(self.url, verbose=False, **kwargs)

    def close(self) -> None:
        self.demo.close()
        self.services.tasks.shutdown(timeout=60)
        self.services.shutdown()


def start_webui(tmp: Path, *, start_worker: bool = True, exposed: bool = False, guard: Any = None,
                lang: str | None = "en", max_upload_bytes: int | None = None, server: Any = None) -> WebUI:
    """The web app on a free port, over a data home in ``tmp``. ``server``: its chat server (a
    ``ServerManager``), set before the page is built as ``python webui.py`` does; None is ``--no-llm``."""
    from sage_ft.tasks import TaskManager
    from sage_ft.webui.app import build_app, launch_app
    from sage_ft.webui.services import AppServices
    from sage_ft.webui.uploads import PathGuard

    tmp.mkdir(parents=True, exist_ok=True)
    services = AppServices(tasks=TaskManager(tmp / "tasks.db", start_worker=start_worker),
                           guard=PathGuard.for_share() if exposed else PathGuard(), default_lang=lang,
                           configs_dir=tmp / "configs", server=server, llm_disabled=server is None)
    if max_upload_bytes is not None:
        services.max_upload_bytes = max_upload_bytes
    demo = build_app(services, lang)
    _, url, _ = launch_app(demo, port=free_port(), guard=guard, prevent_thread_lock=True, quiet=True)
    return WebUI(url=url, services=services, demo=demo)


def state_buttons(app: WebUI, task_id: Any) -> dict[str, dict]:
    """The Monitor's state-following buttons (``monitor_tab.STATE_BUTTONS``) as its details set them
    for ``task_id``. Buttons are not API outputs, so the details handler is asked in-process; the
    browser tests see them on the page. The Train tab's Cancel and Resume, for the same task in its
    Task box, must be on exactly where the Monitor's are (one rule: ``render.allowed_actions``)."""
    from sage_ft.webui import monitor_tab, train_tab

    buttons = _detail_buttons(app, task_id, monitor_tab.STATE_BUTTONS)
    train = dict(zip(("cancel", "resume"), train_tab.progress_tick(app.services, task_id, None, "en")[2:], strict=True))
    assert on(train) == on(buttons) & {"cancel", "resume"}, (task_id, train, buttons)
    return buttons


def file_buttons(app: WebUI, task_id: Any) -> dict[str, dict]:
    """The Monitor's ⬇️ Download adapter, 💬 Use as chat backend and ⬇️ Download full log
    (``monitor_tab.FILE_BUTTONS``) as its details set them for ``task_id`` (in-process, like ``state_buttons``)."""
    from sage_ft.webui import monitor_tab

    return _detail_buttons(app, task_id, monitor_tab.FILE_BUTTONS)


def _detail_buttons(app: WebUI, task_id: Any, names: tuple[str, ...]) -> dict[str, dict]:
    from sage_ft.webui import monitor_tab

    details = dict(zip(monitor_tab.DETAILS, monitor_tab.task_details(app.services, task_id, [], False, 0.6, "en")[1:],
                       strict=True))
    return {name: details[name] for name in names}


def on(buttons: dict[str, dict]) -> set[str]:
    """The buttons among ``buttons`` that can be clicked (shown and on)."""
    return {name for name, update in buttons.items()
            if update.get("interactive", True) and update.get("visible", True)}


def form_args(**overrides: Any) -> list[Any]:
    """Form values in ``TrainConfig`` field order: defaults, then ``overrides``."""
    values = {**TrainConfig().to_dict(), **overrides}
    unknown = set(overrides) - set(values) | (set(overrides) - set(TrainConfig.field_names()))
    if unknown:
        raise KeyError(f"not config fields: {sorted(unknown)}")
    from sage_ft.webui.form import display_value

    return [display_value(name, values[name]) for name in TrainConfig.field_names()]


@pytest.fixture(scope="module")
def webui(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[WebUI]:
    app = start_webui(tmp_path_factory.mktemp("webui"))
    yield app
    app.close()


@pytest.fixture(scope="module")
def webui_client(webui: WebUI):
    return webui.client()
