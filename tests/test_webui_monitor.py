"""Monitoring tab and task controls through the real HTTP API: live details and charts of real
runs, overlay, downloads, cancel/resume from both tabs, delete, re-attach after a reload."""

from __future__ import annotations

import html
import json
import time
from pathlib import Path
from typing import Any

import pytest

from sage_ft.tasks import TaskStatus, rundir
from tests.fixtures_data import memorize_rows, write_jsonl
from tests.fixtures_tasks import tiny_task_config, wait_for
from tests.fixtures_webui import file_buttons, form_args, on, state_buttons

TINY = {"max_steps": 4, "cutoff_len": 64, "per_device_train_batch_size": 2, "save_steps": 2,
        "learning_rate": 1e-3, "packing": False}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> str:
    return str(write_jsonl(memorize_rows() * 2, tmp_path_factory.mktemp("mon") / "mon.jsonl"))


@pytest.fixture(scope="module")
def finished(webui, webui_client, dataset) -> list[int]:
    """Two completed runs (different learning rates) started from the form."""
    ids = []
    for lr in (1e-3, 5e-4):
        task_id, _, _ = webui_client.predict("en", *form_args(dataset=dataset, **{**TINY, "learning_rate": lr}),
                                             api_name="/start")
        ids.append(task_id)
    for task_id in ids:
        assert webui.services.tasks.wait(task_id, timeout=300).status is TaskStatus.COMPLETED
    return ids


def _traces(plot: dict) -> list[dict]:
    return json.loads(plot["plot"])["data"]


def test_details_and_charts_of_a_finished_run_stay_available(webui, webui_client, finished):
    task_id = finished[0]
    out = webui_client.predict(task_id, [], False, 0.6, "en", api_name="/task_details")
    progress, loss, evals, lr, config_yaml, log_tail, checkpoints, metrics, paths_md, resume_from = out
    assert resume_from["visible"] is False  # a completed run: nothing to resume
    assert on(state_buttons(webui, task_id)) == {"retry", "delete"}  # Retry runs it again as a copy
    assert on(file_buttons(webui, task_id)) == {"download", "use_chat", "download_log"}
    assert "completed" in progress and "100%" in progress and "step 4/4" in progress
    names = [t["name"] for t in _traces(loss)]
    assert any("(raw)" in n for n in names) and any("(smoothed)" in n for n in names)
    raw = next(t for t in _traces(loss) if "(raw)" in t["name"])
    assert len(raw["x"]) == 4
    assert _traces(lr) and "learning_rate: 0.001" in config_yaml
    assert "checkpoint-4" in checkpoints or "checkpoint-2" in checkpoints
    assert log_tail.strip() and "loss" in metrics and "lora" in paths_md
    shown = [v for v in metrics.values() if isinstance(v, float)]  # to 4 significant digits, for reading
    assert shown and all(v == float(f"{v:.4g}") for v in shown), metrics


def test_overlay_log_scale_and_table(webui_client, finished):
    first, second = finished
    out = webui_client.predict(first, [second], True, 0.0, "en", api_name="/task_details")
    loss = out[1]
    figure = json.loads(loss["plot"])
    assert {f"#{first}", f"#{second}"} <= {t["name"].split(" ")[0] for t in figure["data"]}
    assert figure["layout"]["yaxis"]["type"] == "log"
    tick = webui_client.predict(None, None, first, [], False, 0.6, "en", api_name="/monitor_tick")
    table = tick[0]
    ids = [row[0] for row in table["data"]]
    assert first in ids and second in ids
    assert "Progress" in table["headers"] and any("completed" in str(row[1]) for row in table["data"])


def test_retry_of_a_completed_run_queues_its_config_again(webui, webui_client, finished):
    """🔁 Retry on a finished run runs the same config again (a new task); it said "retry is for failed,
    cancelled or interrupted tasks (use clone ...)", naming a command the page does not have."""
    message, new_id = webui_client.predict(finished[1], "en", api_name="/task_retry")
    assert new_id not in finished and "a fresh run with the same config" in message
    again = webui.services.tasks.task(new_id)
    assert again.parent_id == finished[1] and again.config.learning_rate == 5e-4
    assert webui.services.tasks.wait(new_id, timeout=300).status is TaskStatus.COMPLETED


def test_downloads_of_adapter_and_log(webui_client, finished):
    message, file_update = webui_client.predict(finished[0], "en", api_name="/task_download")
    assert message.startswith("Ready") and Path(file_update["value"]).suffix == ".zip"
    message, file_update = webui_client.predict(finished[0], "en", api_name="/task_download_log")
    assert Path(file_update["value"]).read_text(encoding="utf-8").strip()


def test_cancel_resume_delete_and_reattach(webui, webui_client, dataset):
    long = {**TINY, "max_steps": 400, "save_steps": 2, "save_total_limit": 1}
    task_id, _, _ = webui_client.predict("en", *form_args(dataset=dataset, **long), api_name="/start")
    webui.services.tasks.wait(task_id, timeout=120, until={TaskStatus.RUNNING})
    deadline = time.monotonic() + 120  # a checkpoint to resume from
    while not list(Path(webui.services.tasks.task(task_id).output_dir).glob("checkpoint-*")):
        assert time.monotonic() < deadline, "no checkpoint written"
        time.sleep(0.3)
    # a reloaded page re-attaches to the running task
    attached, progress, *_ = webui_client.predict("en", api_name="/reattach")
    assert attached == task_id and "running" in progress
    _, message, _ = webui_client.predict(task_id, "en", api_name="/cancel")
    assert f"#{task_id}" in message and "the adapter trained so far is kept" in message
    cancelled_at = webui.services.tasks.wait(task_id, timeout=120)
    assert cancelled_at.status is TaskStatus.CANCELLED
    message, selected = webui_client.predict(task_id, "en", api_name="/task_resume")
    assert selected == task_id and "continue" in message, message
    wait_for(lambda: (task := webui.services.tasks.task(task_id)).status is TaskStatus.RUNNING
             and task.step > cancelled_at.step, timeout=120, what="the resumed run's steps")
    message, _ = webui_client.predict(task_id, "en", api_name="/task_cancel")
    assert "Cancel requested" in message
    assert webui.services.tasks.wait(task_id, timeout=120).status is TaskStatus.CANCELLED
    message, _ = webui_client.predict(task_id, "en", api_name="/task_delete")
    assert "removed" in message
    assert task_id not in [t.id for t in webui.services.tasks.list()]
    message, _ = webui_client.predict(task_id, "en", api_name="/task_cancel")
    assert f"There is no task #{task_id} (deleted?); pick one from the task list" in message
    assert "sage-ft" not in message  # the page's way, not the CLI's ('see `sage-ft tasks list`')


def test_resume_from_an_older_checkpoint_picked_in_the_monitor(webui, webui_client, dataset):
    """The Monitor's Resume went on from the newest checkpoint only (picking one was CLI-only): the
    picker offers the intact ones, newest first by default; an older pick sets the newer ones aside."""
    task_id, _, _ = webui_client.predict("en", *form_args(dataset=dataset, **{**TINY, "max_steps": 400}),
                                         api_name="/start")
    out_dir = Path(webui.services.tasks.wait(task_id, timeout=120, until={TaskStatus.RUNNING}).output_dir)
    deadline = time.monotonic() + 120
    while len(rundir.checkpoint_folders(out_dir)) < 2:
        assert time.monotonic() < deadline, "two checkpoints were not written"
        time.sleep(0.3)
    webui_client.predict(task_id, "en", api_name="/task_cancel")
    assert webui.services.tasks.wait(task_id, timeout=120).status is TaskStatus.CANCELLED
    names = [p.name for p in rundir.checkpoint_folders(out_dir)]  # oldest first
    picker = webui_client.predict(task_id, [], False, 0.6, "en", api_name="/task_details")[-1]
    assert picker["visible"] and picker["value"] == ""
    assert on(state_buttons(webui, task_id)) == {"resume", "retry", "delete"}
    assert on(file_buttons(webui, task_id)) == {"download", "use_chat", "download_log"}  # a cancel keeps the adapter
    assert picker["choices"] == [[f"the newest intact checkpoint ({names[-1]})", ""],
                                 *([n, n] for n in reversed(names[:-1]))], picker
    message, selected = webui_client.predict(task_id, "en", names[0], api_name="/task_resume")
    assert selected == task_id and f"will continue from {names[0]}" in message, message
    assert "superseded" in message and names[-1] in message  # where the newer ones went
    assert [p.name for p in out_dir.glob("checkpoint-*")] == [names[0]]
    assert names[-1] in [p.name for p in (out_dir / "superseded").iterdir()]
    webui.services.tasks.cancel(task_id)
    assert webui.services.tasks.wait(task_id, timeout=120).status is TaskStatus.CANCELLED


def test_text_typed_into_the_task_picker_is_named_not_a_crash(webui_client, finished):
    """The picker takes typing: "abc" raised ValueError in every handler and in the page tick (the task
    table froze until another task was picked); "#7 name", as the list writes it, is that task."""
    out = webui_client.predict("abc", ["xyz"], False, 0.6, "en", api_name="/task_details")
    assert "no task 'abc'; pick one from the task list" in html.unescape(out[0])
    assert "no task 'abc'" in html.unescape(webui_client.predict("abc", "en", api_name="/task_use_chat"))
    message, _ = webui_client.predict("abc", "en", api_name="/task_retry")
    assert "no task 'abc'" in html.unescape(message)
    table = webui_client.predict(None, None, "abc", [], False, 0.6, "en", api_name="/monitor_tick")[0]  # in full
    assert finished[0] in [row[0] for row in table["data"]]
    out = webui_client.predict(f"#{finished[0]} some name", [], False, 0.6, "en", api_name="/task_details")
    assert "completed" in out[0]


def test_a_download_is_no_longer_offered_once_another_task_is_picked(webui, webui_client, finished):
    """'Download full log' of one task stayed offered after another task was picked: changing the pick
    takes the file away (the browser test clicks through it; here the page's own wiring is checked)."""
    message, file_update = webui_client.predict(finished[0], "en", api_name="/task_download_log")
    assert file_update["visible"] and Path(file_update["value"]).name == f"task-{finished[0]}-logs.txt"
    reg = webui.demo.registry
    picker, offered = reg["mon.task"]._id, reg["mon.file"]._id
    on_pick = [fn for fn in webui.demo.fns.values() if (picker, "change") in [tuple(t) for t in fn.targets]
               and offered in [c._id for c in fn.outputs]]
    assert len(on_pick) == 1, "picking another task must clear the offered file"
    cleared = on_pick[0].fn(*[None for _ in on_pick[0].inputs])
    assert cleared["visible"] is False and cleared["value"] is None


def test_actions_without_a_selection_and_chat_disabled(webui_client, finished):
    message, _ = webui_client.predict(None, "en", api_name="/task_cancel")
    assert "Select a task first" in message
    assert "chat server is off" in webui_client.predict(finished[0], "en", api_name="/task_use_chat")


def test_top_bar_status_and_train_progress(webui_client, finished):
    status = webui_client.predict("en", api_name="/top_status")
    assert "chat server off" in status and ("CPU" in status or "GPU" in status)
    assert "completed" in webui_client.predict(finished[0], "zh", api_name="/train_progress") or \
        "已完成" in webui_client.predict(finished[0], "zh", api_name="/train_progress")


def test_recommender_fills_the_form_and_start_blocks_what_cannot_fit(webui, webui_client, dataset):
    *values, fit = webui_client.predict("en", *form_args(dataset=dataset), api_name="/recommend")
    assert fit.startswith("✅") and "estimated peak" in fit
    huge = {"per_device_train_batch_size": 4096, "cutoff_len": 2048}  # within the context, beyond RAM
    before = len(webui.services.tasks.list())
    task_id, message, _ = webui_client.predict("en", *form_args(dataset=dataset, **huge), api_name="/start")
    assert not isinstance(task_id, int)
    assert "will not fit" in message and "Recommend for my hardware" in message
    assert len(webui.services.tasks.list()) == before


def _is_skip(value) -> bool:
    return value == {"__type__": "update"}


def test_page_tick_is_one_event_that_skips_what_did_not_change(webui, finished):
    """The page timer fires one handler; a second tick with nothing changed sends no heavy output again."""
    reg = webui.demo.registry
    timer = reg["top.timer"]
    ticks = [f for f in webui.demo.fns.values() if (timer._id, "tick") in [tuple(t) for t in f.targets]]
    assert len(ticks) == 1, "every tab must share the one page tick"
    tick = ticks[0]
    # it fires whether or not the last tick has answered: under "once", one answer lost froze the page
    assert tick.trigger_mode == "multiple" and tick.concurrency_limit is None
    # what it compares with (its fingerprints, fed back) is held by the page, so each arrives in the message
    # that draws what it describes: a gr.State is stored on the server apart from that message, and a tick in
    # flight at a click drew its older details last while the click's stamp was stored last (CI, 3 runs)
    stamps = [reg[k] for k in ("top.stamp", "train.stamp", "mon.version", "mon.stamp", "chat.banner_stamp")]
    assert all(c in tick.inputs and c in tick.outputs for c in stamps)
    assert [c for c in tick.inputs if c.stateful] == []
    given = {reg["top.lang"]._id: "en", reg["train.task_id"]._id: finished[0], reg["mon.task"]._id: finished[0],
             reg["mon.compare"]._id: [], reg["mon.log_y"]._id: False, reg["mon.smoothing"]._id: 0.6}
    values = {c._id: given.get(c._id) for c in tick.inputs}

    def run() -> dict[int, object]:
        out = dict(zip([c._id for c in tick.outputs], tick.fn(*[values[c._id] for c in tick.inputs]), strict=True))
        for c in tick.inputs:  # the page keeps what its states were set to
            if c._id in out and isinstance(c, type(reg["mon.stamp"])) and not _is_skip(out[c._id]):
                values[c._id] = out[c._id]
        return out

    heavy = ["train.progress", "mon.table", "mon.task", "mon.compare", "mon.progress", "mon.loss", "mon.eval",
             "mon.lr", "mon.config", "mon.log", "mon.checkpoints", "mon.metrics", "mon.paths", "chat.banner"]
    first = run()
    assert "completed" in first[reg["train.progress"]._id] and "completed" in first[reg["mon.progress"]._id]
    assert json.loads(first[reg["mon.loss"]._id].plot)["data"] and first[reg["mon.log"]._id].strip()
    assert [row[0] for row in first[reg["mon.table"]._id]["data"]][-2:] == sorted(finished, reverse=True)
    second = run()
    assert [k for k in heavy if not _is_skip(second[reg[k]._id])] == []
    # a change shows on the next tick: another language redraws the progress bar in it
    values[reg["top.lang"]._id] = "zh"
    third = run()
    assert "已完成" in third[reg["train.progress"]._id]


def test_an_event_that_draws_a_ticked_display_without_its_stamp_empties_the_stamp_after(webui):
    """A Start, Cancel or Resume draws the Train tab's bar, a page load re-attaches, a language change
    relabels the Monitor's table, Pause and Unpause trade the Monitor's buttons: none writes the stamp
    the tick compares with, and its answer may land after a tick that drew a newer state with its stamp
    (CI: the bar stayed on "running" after a cancel, every later tick skipping). Each is followed by an
    event that empties that stamp, so the next tick draws."""
    from sage_ft.webui import monitor_tab

    reg = webui.demo.registry
    fns = list(webui.demo.fns.values())
    api_only = reg["top.api"]._id  # an inactive timer: endpoints for API clients, never fired by the page
    ticked = {"train.stamp": ["train.progress", "train.cancel", "train.resume"],
              "mon.stamp": [f"mon.{name}" for name in monitor_tab.DETAILS]}
    for stamp, displays in ticked.items():
        drawers = [f for f in fns if any(reg[d] in f.outputs for d in displays) and reg[stamp] not in f.outputs
                   and (api_only, "tick") not in [tuple(t) for t in f.targets]
                   and f.api_name != "set_lang"]  # labels only: no state
        assert len(drawers) >= 4, [f.api_name for f in drawers]
        for f in drawers:
            assert any(g.trigger_after == f._id and reg[stamp] in g.outputs and not g.inputs for g in fns), \
                (stamp, f.api_name)


def test_tick_resends_task_pickers_only_when_the_task_list_changes(webui, webui_client, finished, dataset):
    """The table follows every progress write; the pickers' choices only a new, renamed or deleted task
    (re-sending them each tick re-renders an open dropdown under the user's cursor)."""
    def choices(tick):
        update = tick[2]
        return [c[1] if isinstance(c, (list, tuple)) else c for c in update["choices"]] \
            if isinstance(update, dict) and "choices" in update else None

    held: dict[int, Any] = {1: None, 4: None}  # the version and stamp, held as the page holds them

    def tick() -> Any:
        out = webui_client.predict(held[1], held[4], finished[0], [], False, 0.6, "en", api_name="/monitor_tick")
        held.update({i: out[i] for i in held if isinstance(out[i], str)})  # a skip leaves them as they were
        return out

    first = tick()
    assert set(finished) <= set(choices(first))
    queued = webui.services.tasks.create({"model_name_or_path": "demo", "dataset": dataset, "max_steps": 1},
                                         name="picker-check")
    try:
        second = tick()
        assert queued.id in choices(second)
    finally:
        webui.services.tasks.cancel(queued.id)  # its row changes; no task is added, renamed or deleted
    ended = webui.services.tasks.wait(queued.id, 120)
    third = tick()
    row = next(r for r in third[0]["data"] if r[0] == queued.id)
    assert ended.status.value in row[1]  # the table did follow the change
    assert choices(third) is None


def test_charts_are_valid_plotly_figures_with_gaps_for_nan():
    """The curves are built as plain plotly.js data (no per-tick validation); plotly itself must accept
    every property, a NaN loss must become a gap (JSON has no NaN), and an empty chart says so."""
    import plotly.graph_objects as go

    from sage_ft.webui import charts

    history = [{"event": "metric_update", "step": s, "loss": 2.0 / s, "learning_rate": 1e-4} for s in (1, 2, 3)]
    history.append({"event": "metric_update", "step": 4, "loss": float("nan")})
    loss = charts.loss_figure([("#1 a", history), ("#2 b", history[:2])], log_y=True, smoothing=0.5)
    empty = charts.metric_figure([("#1 a", history)], "eval_loss", title="eval", empty_text="no eval yet")
    for figure in (loss, empty, charts.metric_figure([("#1 a", history)], "learning_rate", title="lr")):
        go.Figure(figure)  # raises on any property plotly does not know
    data = json.loads(charts.to_json(loss))
    raw, smoothed = data["data"][0], data["data"][1]
    assert raw["y"][-1] is None and len(smoothed["x"]) == len(smoothed["y"]) == 3
    assert data["layout"]["yaxis"]["type"] == "log" and data["layout"]["template"]["layout"]
    assert json.loads(charts.to_json(empty))["layout"]["annotations"][0]["text"] == "no eval yet"


def test_a_queued_task_shows_its_place_and_follows_the_queue(idle_manager, task_dataset):
    """A queued task's progress bar says where it is in the queue (not "step 0/?"), and its details
    are redrawn when the tasks ahead of it move although the task itself did not change."""
    from sage_ft.webui import monitor_tab, render, train_tab
    from sage_ft.webui.services import AppServices

    services = AppServices(tasks=idle_manager)
    first, second = (idle_manager.create(tiny_task_config(task_dataset), name=n) for n in ("first", "second"))
    shown = render.progress_html(idle_manager.get(second.id), "en")
    assert "Position in the queue: 2" in shown and "step 0/?" not in shown
    stamp = monitor_tab._stamp(services, second.id, [], False, 0.6, "en")
    said = render.cancel_message(idle_manager.cancel(first.id), "en")
    assert "left the queue before it started; nothing was trained" in said  # nobody has to guess
    assert monitor_tab._stamp(services, second.id, [], False, 0.6, "en") != stamp
    assert "Position in the queue: 1" in render.progress_html(idle_manager.get(second.id), "en")
    shown, *_ = train_tab.progress_tick(services, second.id, None, "en")  # the Train tab's bar says it too
    assert "Position in the queue: 1" in shown
    assert "waiting for the trainer" in render.progress_html(idle_manager.task(second.id), "en")  # no detail
    assert "队列位置：1" in render.progress_html(idle_manager.get(second.id), "zh")


def test_long_runs_chart_every_spike_and_gap_in_bounded_points():
    """A 20,000-step run: each curve is thinned to about MAX_POINTS for the browser, but its ends, its
    highest spike, its lowest dip and a NaN gap all stay on the chart; short curves are untouched."""
    from sage_ft.webui import charts

    history = [{"event": "metric_update", "step": s, "loss": 2.0 + (s % 7) / 100, "learning_rate": 1e-4 / s}
               for s in range(1, 20_001)]
    history[12_344]["loss"], history[15_000]["loss"], history[3_000]["loss"] = 9.0, 0.5, float("nan")
    figure = json.loads(charts.to_json(charts.loss_figure([("#1 long", history)], smoothing=0.6)))
    raw, smoothed = figure["data"]
    for trace in (raw, smoothed):
        assert len(trace["x"]) <= 1.01 * charts.MAX_POINTS and trace["x"] == sorted(trace["x"])
        assert trace["x"][0] == 1 and trace["x"][-1] == 20_000
    points = dict(zip(raw["x"], raw["y"], strict=True))
    assert points[12_345] == 9.0 and points[15_001] == 0.5 and points[3_001] is None
    assert max(smoothed["y"]) > 2.5  # the smoothed curve is computed over every point, spike included
    lr = json.loads(charts.to_json(charts.metric_figure([("#1 long", history)], "learning_rate", title="lr")))
    assert len(lr["data"][0]["x"]) <= 1.01 * charts.MAX_POINTS and lr["data"][0]["y"][0] == 1e-4
    short = [{"event": "metric_update", "step": s, "loss": 1.0 / s} for s in range(1, 50)]
    assert json.loads(charts.to_json(charts.loss_figure([("#2 short", short)])))["data"][0]["x"] == list(range(1, 50))


def test_gradio_queue_does_not_busy_poll_while_idle(webui):
    """Gradio polls its empty queue every 1 ms on Linux (~4% of a core doing nothing, taken from the
    trainer on a small machine); the app slows that to 10 ms. Fails if a Gradio upgrade renames the
    attributes, so the tuning is not silently lost (bench/monitoring.py, docs/benchmarks.md)."""
    from sage_ft.webui.app import PROGRESS_IDLE_POLL_S, QUEUE_IDLE_POLL_S

    queue = webui.demo._queue
    assert queue.sleep_when_free == QUEUE_IDLE_POLL_S == 0.01
    assert queue.progress_update_sleep_when_free == PROGRESS_IDLE_POLL_S == 0.05


def test_sliders_moved_with_the_keyboard_take_effect(webui):
    """A slider's `release` fires on pointer-up or blur only: the arrow keys changed the Monitor's
    smoothing without redrawing the charts, and the Chat's settings without keeping them (the browser
    test checks that one across a reload). Both listen to `input`, the last of a drag winning."""
    reg = webui.demo.registry
    sliders = {reg["mon.smoothing"]._id: "mon.smoothing",
               **{reg[f"chat.{key}"]._id: f"chat.{key}" for key in ("temperature", "top_p", "max_tokens")}}
    heard: dict[str, set[str]] = {name: set() for name in sliders.values()}
    for fn in webui.demo.fns.values():
        for target_id, event in (tuple(t) for t in fn.targets):
            if target_id in sliders:
                heard[sliders[target_id]].add(event)
                if event == "input":
                    assert fn.trigger_mode == "always_last", sliders[target_id]
    assert all("input" in events and "release" not in events for events in heard.values()), heard
