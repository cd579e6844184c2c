"""Pause in the web UI, the Train tab's Task box, and the UI's own wording of task refusals, through
the real HTTP API (gradio_client) against the launched app, with real runs on the demo model.

A paused run (``TaskManager.pause``) showed as '🔄 running · 0%' with its last speed and ETA, the
task queued behind it said nothing, and only the CLI could unpause it; the Task box rounded '2.5' to
task 2; refusals named CLI commands ('see `sage-ft tasks list`', '`sage-ft tasks cancel 12`').
"""

from __future__ import annotations

import html
import re
import time
from pathlib import Path

import pytest

from sage_ft.tasks import TaskError, TaskStatus
from tests.fixtures_data import memorize_rows, write_jsonl
from tests.fixtures_tasks import tiny_task_config
from tests.fixtures_webui import file_buttons, on, start_webui, state_buttons

TOTAL = 3000  # far more steps than the test lasts: the run is still going when it is paused


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return write_jsonl(memorize_rows() * 2, tmp_path_factory.mktemp("pause") / "pause.jsonl")


@pytest.fixture(scope="module")
def idle_app(demo_model, tmp_path_factory):
    """An app whose queue never starts anything: queued tasks stay queued while the test looks."""
    app = start_webui(tmp_path_factory.mktemp("idle-app"), start_worker=False)
    yield app
    app.close()


def _text(value) -> str:
    return html.unescape(value if isinstance(value, str) else str(value))


def _table(app, task_id) -> dict[int, str]:
    """Status column of the task table by id, as a freshly opened page gets it (no version or stamp
    given: the tick sends all)."""
    client = app.client()
    try:
        table = client.predict(None, None, task_id, [], False, 0.6, "en", api_name="/monitor_tick")[0]
    finally:
        client.close()
    return {row[0]: row[1] for row in table["data"]}


def _buttons(app, task_id) -> tuple[dict, dict]:
    """The ⏸ Pause and ▶ Unpause updates the Monitor's details send with a task."""
    buttons = state_buttons(app, task_id)
    return buttons["pause"], buttons["unpause"]


def _wait(what, timeout: float = 120.0, poll: float = 0.3):
    """``what()`` once it is truthy (the machine is shared: waits, never timing assertions)."""
    deadline = time.monotonic() + timeout
    while True:
        got = what()
        if got:
            return got
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(poll)


def _held_step(output_dir: str) -> int | None:
    """The step a paused run holds at, as its own log says it ('paused at step N')."""
    log = Path(output_dir) / "logs.txt"
    found = re.findall(r"paused at step (\d+)", log.read_text(encoding="utf-8")) if log.is_file() else []
    return int(found[-1]) if found else None


@pytest.mark.slow
def test_a_paused_run_shows_paused_everywhere_blocks_the_queue_and_unpauses(webui, webui_client, dataset):
    tasks = webui.services.tasks
    long = tasks.create(tiny_task_config(dataset, max_steps=TOTAL, save_steps=1000), name="long run")
    short = tasks.create(tiny_task_config(dataset, max_steps=3), name="short run")
    try:
        _wait(lambda: tasks.task(long.id).step >= 2)
        running = webui_client.predict(long.id, [], False, 0.6, "en", api_name="/task_details")
        assert "ETA" in running[0] and "⏸" not in running[0]  # what a pause must take away
        pause, unpause = _buttons(webui, long.id)
        assert pause["visible"] and pause["interactive"] and not unpause["visible"]
        assert on(state_buttons(webui, long.id)) == {"cancel", "pause"}  # no Delete, Retry or Resume while it runs
        assert on(file_buttons(webui, long.id)) == {"download_log"}  # no adapter saved yet

        message, selected = webui_client.predict(long.id, "en", api_name="/task_pause")
        assert f"Task #{long.id} pauses after its current step" in _text(message) and selected == long.id
        pause, unpause = _buttons(webui, long.id)
        assert not pause["visible"] and unpause["visible"] and unpause["interactive"]  # they trade places
        assert on(state_buttons(webui, long.id)) == {"cancel", "unpause"}
        held = _wait(lambda: _held_step(long.output_dir), timeout=60)

        def monitor_progress() -> str:
            return _text(webui_client.predict(long.id, [], False, 0.6, "en", api_name="/task_details")[0])

        # the Monitor's progress: paused at the step where it holds (not the one before), no speed, no ETA
        progress = _wait(lambda: (p := monitor_progress()) and f"after step {held}/{TOTAL}" in p and p, timeout=60)
        assert "🔄 running ⏸ paused" in progress and "data-paused=\"true\"" in progress
        assert "ETA" not in progress and "tok/s" not in progress and "Unpause" in progress
        metrics = webui_client.predict(long.id, [], False, 0.6, "en", api_name="/task_details")[7]
        assert "loss" in metrics and "eta_seconds" not in metrics and "tokens_per_second" not in metrics
        # the Train tab's progress, in both languages
        train = _text(webui_client.predict(long.id, "en", api_name="/train_progress"))
        assert "⏸ paused" in train and "ETA" not in train and "tok/s" not in train
        assert "已暂停" in _text(webui_client.predict(long.id, "zh", api_name="/train_progress"))
        # the table, and the queued task that waits for it says why
        status = _table(webui, long.id)
        assert status[long.id] == "🔄 running ⏸ paused"
        assert f"waits for #{long.id}, which is paused" in status[short.id]
        waiting = _text(webui_client.predict(short.id, [], False, 0.6, "en", api_name="/task_details")[0])
        assert f"waits for #{long.id}, which is paused" in waiting and "starts in" not in waiting
        assert "Position in the queue: 1" in waiting
        assert f"waits for #{long.id}" in _text(webui_client.predict(short.id, "en", api_name="/train_progress"))
        assert tasks.task(short.id).status is TaskStatus.QUEUED and tasks.task(long.id).step == held

        # refusals while it runs are worded for the page: its buttons, no CLI command
        message, _ = webui_client.predict(long.id, "en", api_name="/task_delete")
        assert f"Task #{long.id} is running: press ⏹ Cancel first" in _text(message) and "sage-ft" not in message
        message, _ = webui_client.predict(long.id, "en", api_name="/task_retry")
        assert "🔁 Retry runs a task again once it has ended" in _text(message) and "sage-ft" not in message
        message, *_ = webui_client.predict(long.id, "zh", api_name="/task_delete")
        assert "正在运行：请先点击 ⏹ 取消" in _text(message)
        assert "sage-ft tasks cancel" in str(pytest.raises(TaskError, tasks.delete, long.id).value)  # the CLI's

        message, _ = webui_client.predict(long.id, "en", api_name="/task_unpause")
        assert f"Task #{long.id} continues training" in _text(message)
        pause, unpause = _buttons(webui, long.id)
        assert pause["visible"] and pause["interactive"] and not unpause["visible"]
        _wait(lambda: tasks.task(long.id).step > held)  # it really trains again
        assert "⏸" not in _table(webui, long.id)[long.id]
        assert "⏸" not in _text(webui_client.predict(long.id, "en", api_name="/train_progress"))
    finally:
        for task in (long, short):
            if not tasks.task(task.id).status.is_final:
                tasks.cancel(task.id)
        tasks.wait(long.id, timeout=120)


def test_pause_buttons_follow_the_selected_task(idle_app, dataset):
    """Nothing picked or a task that does not run: ⏸ Pause is in sight but off, ▶ Unpause hidden; pausing
    a queued task says why not and leaves the buttons so."""
    client = idle_app.client()
    tasks = idle_app.services.tasks
    queued = tasks.create(tiny_task_config(dataset))
    for picked in (None, queued.id):
        pause, unpause = _buttons(idle_app, picked)
        assert pause["visible"] and not pause["interactive"] and not unpause["visible"]
    message, _ = client.predict(queued.id, "en", api_name="/task_pause")
    assert "only a running task can be paused" in _text(message)
    from sage_ft.webui import monitor_tab

    *_, pause, unpause = monitor_tab._pause_handler(idle_app.services, "pause")(queued.id, "en")
    assert pause["visible"] and not pause["interactive"] and not unpause["visible"]
    message, _ = client.predict(None, "en", api_name="/task_unpause")
    assert "Select a task first" in message
    assert tasks.task(queued.id).paused is False


def test_the_task_buttons_offer_what_the_selected_task_allows(idle_app, dataset):
    """Cancel, Resume, Retry and Delete (and the downloads, Use as chat backend) were on for any task,
    and with none picked, and refused after the click; now only what the task's state (and its saved
    adapter) allows can be clicked (running and completed tasks: in test_a_paused_run_... and
    tests/test_webui_monitor.py)."""
    tasks = idle_app.services.tasks
    assert on(state_buttons(idle_app, None)) == set()
    assert on(file_buttons(idle_app, None)) == set()
    queued = tasks.create(tiny_task_config(dataset))
    assert on(state_buttons(idle_app, queued.id)) == {"cancel", "delete"}
    assert on(file_buttons(idle_app, queued.id)) == set()  # not started: no files
    never_ran = tasks.cancel(queued.id)  # cancelled before it started: nothing to resume from
    assert on(state_buttons(idle_app, never_ran.id)) == {"retry", "delete"}
    client = idle_app.client()
    message, again = client.predict(never_ran.id, "en", api_name="/task_retry")  # a fresh task, queued
    assert f"Task #{again} queued" in _text(message)
    assert on(state_buttons(idle_app, again)) == {"cancel", "delete"}
    message, _ = client.predict(never_ran.id, "en", api_name="/task_delete")
    assert f"Task #{never_ran.id} removed from the list" in _text(message)
    assert on(state_buttons(idle_app, never_ran.id)) == set()  # no such task any more: nothing on


def test_an_empty_task_list_says_how_to_start_a_run(tmp_path, dataset):
    """The Monitor of a new data home showed column headers and 'No task selected yet.' (an empty list
    left unexplained is what LLaMA-Factory users report, #9060); it now says how a run gets there, in
    the page's language, until there is a task to pick, and is not redrawn every tick."""
    from sage_ft.tasks import TaskManager
    from sage_ft.webui import monitor_tab
    from sage_ft.webui.services import AppServices

    tasks = TaskManager(tmp_path / "tasks.db", start_worker=False)
    services = AppServices(tasks=tasks, configs_dir=tmp_path / "configs", llm_disabled=True)
    progress_at = 4 + monitor_tab.DETAILS.index("progress") + 1  # table, version, two pickers, stamp, details

    def tick(version: str | None, lang: str = "en") -> tuple[str, object]:
        out = monitor_tab.tick(services, version, None, None, [], False, 0.6, lang)
        return out[1], out[progress_at]

    from sage_ft.webui.app import on_load

    no_runs = "No runs yet: start one on the 🚀 Train tab"
    assert no_runs in _text(on_load(services, "en")[-1])  # a page opened on it
    assert no_runs in _text(monitor_tab.task_details(services, None, [], False, 0.6, "en")[1])  # a pick cleared
    version, shown = tick(None)
    assert no_runs in _text(shown), shown
    assert tick(version)[1] == {"__type__": "update"}  # nothing changed: skipped
    assert "还没有运行" in _text(monitor_tab._relabel_table(services, "zh", None)[-1])
    tasks.create(tiny_task_config(dataset))
    _, shown = tick(version)
    assert "No task selected yet." in _text(shown), shown
    assert "No task selected yet." in _text(monitor_tab.task_details(services, None, [], False, 0.6, "en")[1])
    tasks.shutdown()


def test_a_task_box_value_that_is_not_an_id_is_refused_not_rounded(idle_app, dataset):
    """'2.5' in the Train tab's Task box acted on task 2 (the box rounded); now the one task-id syntax
    ('7' or '#7', as the list writes ids) decides, and anything else is named."""
    client = idle_app.client()
    tasks = idle_app.services.tasks
    target = tasks.create(tiny_task_config(dataset), name="target")
    typed = target.id + 0.4  # what the box sends for a typed '1.4': it rounded to the target
    _, message, _ = client.predict(typed, "en", api_name="/cancel")
    assert f"'{typed}' is not a task id" in _text(message)
    _, message, _ = client.predict(typed, "zh", api_name="/resume")
    assert "不是任务编号" in _text(message)
    assert f"'{typed}' is not a task id" in _text(client.predict(typed, "en", api_name="/train_progress"))
    assert tasks.task(target.id).status is TaskStatus.QUEUED  # untouched
    task_id, message, progress = client.predict(target.id, "en", api_name="/cancel")  # a whole number: that task
    assert task_id == target.id and "left the queue" in _text(message) and "cancelled" in progress


def test_refusals_name_the_pages_way_not_cli_commands(idle_app):
    """'no task with id 999 (see `sage-ft tasks list`)' and '`sage-ft tasks retry N`' in the page: the
    page words them with its task list and buttons; the core (and so the CLI) keeps its own words."""
    client = idle_app.client()
    tasks = idle_app.services.tasks
    for said in (client.predict(999, "en", api_name="/task_cancel")[0],
                 client.predict(999, "en", api_name="/cancel")[1],
                 client.predict(999, [], False, 0.6, "en", api_name="/task_details")[0],
                 client.predict(999, "en", api_name="/train_progress"),
                 client.predict(999, "en", api_name="/task_download")[0],
                 client.predict(999, "en", api_name="/task_use_chat")):
        assert "There is no task #999" in _text(said) and "sage-ft" not in said, said
    assert "没有任务 #999" in _text(client.predict(999, "zh", api_name="/task_delete")[0])
    assert "sage-ft tasks list" in str(pytest.raises(TaskError, tasks.task, 999).value)


def test_resume_without_a_checkpoint_names_the_retry_button(idle_app, dataset):
    """'use retry to start it again (`sage-ft tasks retry N`)' from a page whose Retry is a button."""
    client = idle_app.client()
    tasks = idle_app.services.tasks
    never_ran = tasks.cancel(tasks.create(tiny_task_config(dataset)).id)  # cancelled before it started
    message, _ = client.predict(never_ran.id, "en", api_name="/task_resume")
    assert "saved no checkpoint to resume from: press 🔁 Retry" in _text(message) and "sage-ft" not in message
    _, message, _ = client.predict(never_ran.id, "en", api_name="/resume")  # the Train tab's Resume
    assert "press 🔁 Retry (Monitor tab)" in _text(message)
    assert "sage-ft tasks retry" in str(pytest.raises(TaskError, tasks.resume, never_ran.id).value)


def test_a_multi_process_refusal_has_the_pages_words_too():
    """The one refusal a CPU machine cannot make for real (pausing a multi-process run): each rule the core
    names has a sentence in both languages (a missing one would fall back to the CLI's words)."""
    from sage_ft.tasks.task import TaskStateError
    from sage_ft.webui import render

    cli = "task 5 is a multi-process run, which cannot be paused; … (`sage-ft tasks resume 5` …)"
    refusal = TaskStateError(cli, task_id=5, action="pause", status="running", reason="multi_process")
    assert render.task_error_text(refusal, "en").startswith("Task #5 is a multi-process run, which cannot be paused")
    assert "⏯ Resume" in render.task_error_text(refusal, "en") and "⏯ 继续" in render.task_error_text(refusal, "zh")
    other = TaskStateError(cli, task_id=5, action="pause", status="running", reason="a rule with no sentence")
    assert render.task_error_text(other, "en") == cli
