"""Monitoring tab: the task table, one task's details (progress, charts, log, checkpoints, paths)
and actions, and an overlay of several runs' curves.

Everything is read from the task store and the runs' ``events.jsonl``/``logs.txt`` through the
``TaskManager``, so a refreshed page, a second browser or a restarted app shows the same thing,
and finished runs keep their charts. The shared timer polls with ``TaskManager.poll`` (one cheap
query) and redraws details only when the selected task changed.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import html
import json
import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gradio as gr
from gradio.components.plot import PlotData

from sage_ft.tasks import TaskError, TaskStatus
from sage_ft.tasks.status import RESUMABLE_STATES
from sage_ft.webui import charts, chat_tab, i18n, render
from sage_ft.webui.components import Registry, forget_stamps, page_stamp
from sage_ft.webui.services import AppServices, task_id_of
from sage_ft.webui.topbar import TickPart

log = logging.getLogger(__name__)
LOG_LINES = 200


def build(reg: Registry, services: AppServices, lang: str) -> None:
    reg.add("mon.version", page_stamp(), kind="none")
    reg.add("mon.stamp", page_stamp(), kind="none")
    reg.add("mon.table", gr.Dataframe(headers=render.table_headers(lang), value=[], interactive=False,
                                      label=i18n.t("mon.table", lang), elem_id="task-table", max_height=320,
                                      wrap=True))
    with gr.Row():
        reg.add("mon.task", gr.Dropdown(choices=[], value=None, label=i18n.t("mon.task", lang), scale=2, allow_custom_value=True,
                                        elem_id="task-select"))
        reg.add("mon.compare", gr.Dropdown(choices=[], value=[], multiselect=True, scale=3, allow_custom_value=True,
                                           label=i18n.t("mon.compare", lang),
                                           info=i18n.t("mon.compare.info", lang)), kind="label_info")
    reg.add("mon.progress", gr.HTML(render.progress_html(None, lang), elem_id="mon-progress"), kind="none")
    with gr.Row():
        for action in ("cancel", "pause", "unpause", "resume", "retry", "delete", "download", "use_chat"):
            variant = "stop" if action in ("cancel", "delete") else "secondary"
            reg.add(f"mon.{action}", gr.Button(i18n.t(f"mon.{action}", lang), variant=variant, size="sm",
                                               **INITIAL_BUTTONS.get(action, {})))
    reg.add("mon.resume_from", gr.Dropdown(choices=[], value=None, label=i18n.t("mon.resume_from", lang), visible=False,
                                           info=i18n.t("mon.resume_from.info", lang), elem_id="resume-from"),
            kind="label_info")
    reg.add("mon.message", gr.Markdown(""), kind="none")
    reg.add("mon.file", gr.File(label=i18n.t("mon.file", lang), visible=False, interactive=False, elem_id="task-file"))
    with gr.Row():
        reg.add("mon.log_y", gr.Checkbox(value=False, label=i18n.t("mon.log_y", lang)))
        reg.add("mon.smoothing", gr.Slider(0, 0.99, value=0.6, step=0.01, label=i18n.t("mon.smoothing", lang)))
    with gr.Row():
        reg.add("mon.loss", gr.Plot(label=i18n.t("mon.loss", lang), elem_id="loss-chart"))
        reg.add("mon.eval", gr.Plot(label=i18n.t("mon.eval", lang)))
        reg.add("mon.lr", gr.Plot(label=i18n.t("mon.lr", lang)))
    with reg.add("mon.details", gr.Accordion(i18n.t("mon.details", lang), open=True)):
        with gr.Row():
            with gr.Column(scale=3):
                reg.add("mon.log", gr.Textbox(label=i18n.t("mon.log", lang), lines=14, max_lines=14, autoscroll=True,
                                              interactive=False, elem_id="task-log"))
                reg.add("mon.download_log", gr.Button(i18n.t("mon.download_log", lang), size="sm"))
            with gr.Column(scale=2):
                reg.add("mon.paths", gr.Markdown(""), kind="none")
                reg.add("mon.checkpoints", gr.Markdown(""), kind="none")
                reg.add("mon.metrics", gr.JSON(label=i18n.t("mon.metrics", lang)))
        reg.add("mon.config", gr.Code(label=i18n.t("mon.config", lang), language="yaml", interactive=False,
                                      lines=6, max_lines=16))


# The task actions whose buttons follow the picked task's state (``action_buttons``), and those that
# follow what its run folder holds (``file_buttons``).
STATE_BUTTONS = ("cancel", "pause", "unpause", "resume", "retry", "delete")
FILE_BUTTONS = ("download", "use_chat", "download_log")
DETAILS = ("progress", "loss", "eval", "lr", "config", "log", "checkpoints", "metrics", "paths", *STATE_BUTTONS,
           *FILE_BUTTONS, "resume_from")
# Before a task is picked: all off, Unpause hidden (see pause_buttons).
INITIAL_BUTTONS = {**{action: {"interactive": False} for action in (*STATE_BUTTONS, *FILE_BUTTONS)},
                   "unpause": {"visible": False}}


def pause_buttons(task: Any) -> list[Any]:
    """⏸ Pause for a running task, ▶ Unpause (in its place) for a paused one; for any other task, or
    none, Pause stays in sight but off."""
    running = task is not None and task.status is TaskStatus.RUNNING
    paused = running and render.is_paused(task)
    return [gr.update(visible=not paused, interactive=running and not paused),
            gr.update(visible=paused, interactive=paused)]


def action_buttons(task: Any) -> list[Any]:
    """The buttons of ``STATE_BUTTONS``, on only where the task's state allows the action
    (``render.allowed_actions``; ``task`` is a ``TaskDetail``, which lists the intact checkpoints)."""
    allowed = render.allowed_actions(task, bool(getattr(task, "checkpoints", None)))
    return [gr.update(interactive=allowed["cancel"]), *pause_buttons(task), gr.update(interactive=allowed["resume"]),
            gr.update(interactive=allowed["retry"]), gr.update(interactive=allowed["delete"])]


def file_buttons(task: Any) -> list[Any]:
    """The buttons of ``FILE_BUTTONS``. ⬇️ Download adapter: on once the run has saved its adapter
    (``lora/``). 💬 Use as chat backend: also for a completed run without one (a full fine-tune serves
    its own folder). ⬇️ Download full log: once the run has a log. All off with no task."""
    def has(name: str) -> bool:
        return task is not None and bool(task.output_dir) and (Path(task.output_dir) / name).exists()

    adapter, completed = has("lora"), task is not None and task.status is TaskStatus.COMPLETED
    return [gr.update(interactive=adapter), gr.update(interactive=adapter or completed),
            gr.update(interactive=has("logs.txt"))]


def resume_from(task: Any, lang: str) -> Any:
    """The Resume picker, shown for a task that can be resumed and has a checkpoint: the newest intact
    one (the default, ``""``) or any older intact one (``TaskManager.resume``'s ``checkpoint``); damaged
    ones are not offered. Its pick goes back to the default whenever another task's details are drawn."""
    intact = [Path(c).name for c in getattr(task, "checkpoints", None) or []]
    if task is None or task.status not in RESUMABLE_STATES or not intact:
        return gr.update(visible=False, choices=[], value=None)
    newest = (i18n.t("mon.resume_newest", lang, name=intact[-1]), "")
    return gr.update(visible=True, choices=[newest, *((name, name) for name in reversed(intact[:-1]))], value="")


def detail_outputs(reg: Registry) -> list[Any]:
    return [reg[f"mon.{n}"] for n in DETAILS]


def wire(reg: Registry, services: AppServices) -> TickPart:
    lang = reg["top.lang"]
    view = [reg["mon.task"], reg["mon.compare"], reg["mon.log_y"], reg["mon.smoothing"], lang]
    table_out = [reg["mon.table"], reg["mon.version"], reg["mon.task"], reg["mon.compare"]]
    # an API client passes the version and stamp its last answer gave (or none: all is sent), as the page does
    reg["top.api"].tick(lambda ver, stamp, *v: tick(services, ver, stamp, *v),
                        [reg["mon.version"], reg["mon.stamp"], *view],
                        [*table_out, reg["mon.stamp"], *detail_outputs(reg)], api_name="monitor_tick",
                        concurrency_limit=None, show_progress="hidden")
    reg["mon.table"].select(select_row, [reg["mon.table"]], reg["mon.task"], api_name=False)
    details = lambda *v: task_details(services, *v)  # noqa: E731
    # the smoothing slider's `input` (each move; always_last coalesces a drag): arrow keys fire no `release`
    gr.on([reg["mon.task"].change, reg["mon.compare"].change, reg["mon.log_y"].change, reg["mon.smoothing"].input],
          details, view, [reg["mon.stamp"], *detail_outputs(reg)], api_name=False, show_progress="hidden",
          trigger_mode="always_last")
    reg["top.api"].tick(lambda *v: details(*v)[1:], view, detail_outputs(reg), api_name="task_details",
                        concurrency_limit=None, show_progress="hidden")  # the same, without the page's stamp
    relabelled = lang.change(lambda lg, tid: _relabel_table(services, lg, tid), [lang, reg["mon.task"]],
                             [*table_out, reg["mon.progress"]], api_name=False)
    forget_stamps(relabelled, reg["mon.stamp"])
    for action in ("cancel", "resume", "retry", "delete"):
        extra = [reg["mon.resume_from"]] if action == "resume" else []
        reg[f"mon.{action}"].click(_action_handler(services, action), [reg["mon.task"], lang, *extra],
                                   [reg["mon.message"], reg["mon.task"]], api_name=f"task_{action}")
    for action in ("pause", "unpause"):  # the buttons trade places at once, not on the next tick
        paused = reg[f"mon.{action}"].click(_pause_handler(services, action), [reg["mon.task"], lang],
                                            [reg["mon.message"], reg["mon.task"], reg["mon.pause"],
                                             reg["mon.unpause"]], api_name=f"task_{action}")
        forget_stamps(paused, reg["mon.stamp"])
    # a file offered for one task must not stay on offer once another is picked
    reg["mon.task"].change(lambda: gr.update(value=None, visible=False), None, reg["mon.file"], api_name=False,
                           show_progress="hidden")
    reg["mon.download"].click(lambda tid, lg: download(services, tid, lg), [reg["mon.task"], lang],
                              [reg["mon.message"], reg["mon.file"]], api_name="task_download")
    reg["mon.download_log"].click(lambda tid, lg: download_log(services, tid, lg), [reg["mon.task"], lang],
                                  [reg["mon.message"], reg["mon.file"]], api_name="task_download_log")
    reg["mon.use_chat"].click(functools.partial(use_as_chat, services), [reg["mon.task"], lang],
                              reg["mon.message"], api_name="task_use_chat", concurrency_limit=None)
    view_ids = ("mon.task", "mon.compare", "mon.log_y", "mon.smoothing", "top.lang")
    outputs = ("mon.table", "mon.version", "mon.task", "mon.compare", "mon.stamp",
               *(f"mon.{n}" for n in DETAILS))
    return TickPart(("mon.version", "mon.stamp", *view_ids), outputs,
                    lambda ver, stamp, *v: tick(services, ver, stamp, *v))


# ====================================================================== handlers
def refresh(services: AppServices, version: str | None, lang: str) -> tuple[Any, Any, Any, Any]:
    """Table, version, and the choices of the task pickers (``gr.skip`` for each that did not change).

    The page's version is the task store's version plus a fingerprint of the pickers' choices: during
    a run the table changes every second, the choices only when a task is added, renamed or deleted
    (re-sending them each tick would re-render an open dropdown under the user's cursor)."""
    store_version, _, picked = (version or "").partition("|")
    new_store_version, tasks = services.tasks.poll(store_version or None)
    if tasks is None:
        return gr.skip(), gr.skip(), gr.skip(), gr.skip()
    blocker = render.paused_running(tasks)  # queued tasks wait for it: their rows say so
    rows = [render.task_row(t, lang, blocker) for t in tasks]
    choices = [(f"#{t.id} {t.name}", t.id) for t in tasks]
    table = {"headers": render.table_headers(lang), "data": rows}
    fingerprint = hashlib.sha1(json.dumps(choices).encode()).hexdigest()[:12]
    pickers = gr.skip() if fingerprint == picked else gr.update(choices=choices)
    return table, f"{new_store_version}|{fingerprint}", pickers, pickers


def tick(services: AppServices, version: str | None, stamp: str | None, task_id: Any, compare: list[Any],
         log_y: bool, smoothing: float, lang: str) -> list[Any]:
    table = list(refresh(services, version, lang))
    if task_id in (None, ""):
        return [*table, gr.skip(), _unpicked_on_change(table[2], lang), *([gr.skip()] * (len(DETAILS) - 1))]
    try:
        new_stamp = _stamp(services, task_id, compare, log_y, smoothing, lang)
    except TaskError:  # typed text that names no task: the details already say so
        return [*table, gr.skip(), *([gr.skip()] * len(DETAILS))]
    if new_stamp == stamp:
        return [*table, gr.skip(), *([gr.skip()] * len(DETAILS))]
    return [*table, *task_details(services, task_id, compare, log_y, smoothing, lang)]


def unpicked_progress(has_tasks: bool, lang: str) -> str:
    """The progress box with no task picked: whether there is anything to pick, and if not, how a run
    gets there (an empty list left unexplained is what LLaMA-Factory users report, #9060)."""
    if has_tasks:
        return render.progress_html(None, lang)
    return render.progress_note(i18n.t("mon.no_tasks", lang))


def _unpicked_on_change(pickers: Any, lang: str) -> Any:
    """``unpicked_progress`` when the pickers' choices changed (a task was added or removed, or the
    language changed), else skipped (it is not redrawn every tick)."""
    if not isinstance(pickers, dict) or "choices" not in pickers:  # gr.skip() is a dict too
        return gr.skip()
    return unpicked_progress(bool(pickers["choices"]), lang)


def _relabel_table(services: AppServices, lang: str, task_id: Any) -> list[Any]:
    """The table and pickers in a newly picked language (and the progress box, when no task is picked:
    a picked task's details follow on the next tick, whose stamp has the language in it)."""
    table = list(refresh(services, None, lang))
    return [*table, _unpicked_on_change(table[2], lang) if task_id in (None, "") else gr.skip()]


def _stamp(services: AppServices, task_id: Any, compare: list[Any], log_y: bool, smoothing: float, lang: str) -> str:
    """Changes whenever anything the details show could have changed."""
    selected = task_id_of(task_id)
    ids = [selected]
    for other in compare or []:
        if str(other) == str(task_id):
            continue
        with contextlib.suppress(TaskError):  # typed text among the overlays: not a task, not shown
            ids.append(task_id_of(other))
    parts = []
    for i in ids:
        try:
            task = services.tasks.task(i)
            parts.append(f"{i}@{task.updated_at}")
        except TaskError:
            parts.append(f"{i}@gone")
            continue
        if i == selected:
            parts.append(services.queue_stamp(task))
    return json.dumps([parts, bool(log_y), float(smoothing or 0), lang])


def select_row(table: Any, evt: gr.SelectData) -> Any:
    row = evt.row_value if getattr(evt, "row_value", None) is not None else None
    if not row:
        return gr.skip()
    try:
        return int(row[0])
    except (TypeError, ValueError):
        return gr.skip()


def task_details(services: AppServices, task_id: Any, compare: list[Any], log_y: bool, smoothing: float,
                 lang: str) -> list[Any]:
    """Progress, three charts (with overlays), frozen config, log tail, checkpoints, metrics, paths.

    Built once per change for all pages: the result is cached under its stamp (which changes with any
    of the shown tasks' rows, the view options and the language), charts already serialised."""
    if task_id in (None, ""):
        return _task_details(services, task_id, compare, log_y, smoothing, lang)
    try:
        stamp = _stamp(services, task_id, compare, log_y, smoothing, lang)
    except TaskError:  # typed text that names no task: said in the progress box
        return _task_details(services, task_id, compare, log_y, smoothing, lang)
    with _DETAILS_LOCK:
        cached = _DETAILS_CACHE.get((id(services), stamp))
    if cached is not None:  # updates as copies: gradio pops keys from the dicts it sends
        return [dict(v) if isinstance(v, dict) else v for v in cached]
    out = _task_details(services, task_id, compare, log_y, smoothing, lang, stamp)
    out[2:5] = [_plot_data(fig) for fig in out[2:5]]
    with _DETAILS_LOCK:
        _DETAILS_CACHE[(id(services), stamp)] = out
        while len(_DETAILS_CACHE) > 16:
            _DETAILS_CACHE.pop(next(iter(_DETAILS_CACHE)))
    return [dict(v) if isinstance(v, dict) else v for v in out]


_DETAILS_CACHE: dict[tuple[int, str], list[Any]] = {}
_DETAILS_LOCK = threading.Lock()


def _plot_data(fig: charts.Figure | None) -> Any:
    """A chart as gradio's serialised ``PlotData`` (to JSON once, not once per page)."""
    return None if fig is None else PlotData(type="plotly", plot=charts.to_json(fig))


def _task_details(services: AppServices, task_id: Any, compare: list[Any], log_y: bool, smoothing: float,
                  lang: str, stamp: str | None = None) -> list[Any]:
    empty = [None, render.progress_html(None, lang), None, None, None, "", "", "", None, "", *action_buttons(None),
             *file_buttons(None), resume_from(None, lang)]
    if task_id in (None, ""):
        return [None, unpicked_progress(bool(services.tasks.list()), lang), *empty[2:]]
    try:
        detail = services.tasks.get(task_id_of(task_id), log_lines=LOG_LINES)
    except TaskError as exc:
        return [None, render.progress_note(render.task_error_text(exc, lang)), *empty[2:]]
    runs = [(f"#{detail.id} {detail.name}", detail.metrics_history)]
    for other in compare or []:
        if str(other) == str(detail.id):
            continue
        try:
            o = services.tasks.get(task_id_of(other), log_lines=1)
            runs.append((f"#{o.id} {o.name}", o.metrics_history))
        except TaskError:
            continue
    empty_text = i18n.t("mon.no_data", lang)
    smoothing = float(smoothing or 0)
    loss = charts.loss_figure(runs, log_y=bool(log_y), smoothing=smoothing, title=i18n.t("mon.loss", lang),
                              empty_text=empty_text)
    evals = charts.metric_figure(runs, "eval_loss", title=i18n.t("mon.eval", lang), log_y=bool(log_y),
                                 empty_text=i18n.t("mon.no_eval", lang))
    lr = charts.metric_figure(runs, "learning_rate", title=i18n.t("mon.lr", lang), empty_text=empty_text)
    out = Path(detail.output_dir)
    checkpoints = "\n".join(f"- `{Path(c).name}`" for c in detail.checkpoints) or i18n.t("mon.no_checkpoints", lang)
    adapter = out / "lora"
    paths_md = (f"**{i18n.t('mon.output', lang)}**: `{out}`\n\n"
                f"**{i18n.t('mon.adapter', lang)}**: `{adapter}`"
                + (" ✅" if adapter.is_dir() else f" ({i18n.t('mon.not_yet', lang)})"))
    stamp = stamp or _stamp(services, task_id, compare, log_y, smoothing, lang)
    progress = render.progress_html(detail, lang, detail.eta_seconds, render.paused_ahead(services.tasks, detail))
    return [stamp, progress, loss, evals, lr, detail.config_yaml,
            detail.log_tail, f"**{i18n.t('mon.checkpoints', lang)}**\n\n{checkpoints}",
            render.readable_metrics(_still_true(detail)), paths_md, *action_buttons(detail), *file_buttons(detail),
            resume_from(detail, lang)]


LIVE_METRICS = ("eta_seconds", "tokens_per_second")  # the speed of the moment: none while a run is paused


def _still_true(task: Any) -> dict[str, Any]:
    """The latest metrics less those a pause made stale (a paused run kept showing its ETA)."""
    if not render.is_paused(task):
        return task.last_metrics
    return {key: value for key, value in task.last_metrics.items() if key not in LIVE_METRICS}


def _action_handler(services: AppServices, action: str):
    def handler(task_id: Any, lang: str, checkpoint: str | None = None) -> tuple[str, Any]:
        if task_id in (None, ""):
            gr.Warning(i18n.t("alert.no_task", lang))
            return f"⚠️ {i18n.t('alert.no_task', lang)}", gr.skip()
        try:
            selected = task_id_of(task_id)
            if action == "delete":
                task = services.tasks.task(selected)
                had_files = Path(task.output_dir).exists()
                services.tasks.delete(selected)
                text = i18n.t("alert.deleted" if had_files else "alert.deleted_no_files", lang, id=task.id,
                              path=task.output_dir)
                gr.Info(text)
                return text, None
            if action == "retry" and services.tasks.task(selected).status is TaskStatus.COMPLETED:
                task = services.tasks.clone(selected)  # a finished run: the same config, run again
            elif action == "resume" and checkpoint:
                return _resumed_from(services.tasks.resume(selected, checkpoint=checkpoint), checkpoint, lang)
            else:
                task = getattr(services.tasks, action)(selected)
        except TaskError as exc:
            return _refused(exc, lang), gr.skip()
        text = render.cancel_message(task, lang) if action == "cancel" else i18n.t(f"alert.task_{action}", lang,
                                                                                  id=task.id)
        gr.Info(text)
        return text, task.id
    return handler


def _resumed_from(task: Any, checkpoint: str, lang: str) -> tuple[str, Any]:
    """Resumed from the checkpoint picked: said so, with the core's note on the newer checkpoints it
    set aside (where they went: nothing was deleted)."""
    text = i18n.t("alert.task_resume_from", lang, id=task.id, checkpoint=checkpoint)
    gr.Info(text)
    return (f"{text}\n\n{html.escape(task.error)}" if task.error else text), task.id


def _pause_handler(services: AppServices, action: str):
    """⏸ Pause / ▶ Unpause: the core's pause (any process's run holds within a second); the two buttons
    trade places at once."""
    def handler(task_id: Any, lang: str) -> tuple[Any, ...]:
        if task_id in (None, ""):
            gr.Warning(i18n.t("alert.no_task", lang))
            return f"⚠️ {i18n.t('alert.no_task', lang)}", gr.skip(), gr.skip(), gr.skip()
        try:
            task = getattr(services.tasks, action)(task_id_of(task_id))
        except TaskError as exc:
            with contextlib.suppress(TaskError):  # the buttons follow the state that refused it
                return _refused(exc, lang), gr.skip(), *pause_buttons(services.tasks.task(task_id_of(task_id)))
            return _refused(exc, lang), gr.skip(), gr.skip(), gr.skip()
        text = i18n.t(f"alert.task_{action}", lang, id=task.id, unpause=i18n.t("mon.unpause", lang))
        gr.Info(text)
        return text, task.id, *pause_buttons(task)
    return handler


def _refused(exc: TaskError, lang: str) -> str:
    """A refusal as a toast and as the message line, in the page's words (``render.task_error_text``)."""
    text = render.task_error_text(exc, lang)
    gr.Warning(text)
    return f"⚠️ {html.escape(text)}"


def download(services: AppServices, task_id: Any, lang: str) -> tuple[str, Any]:
    if task_id in (None, ""):
        return f"⚠️ {i18n.t('alert.no_task', lang)}", gr.skip()
    try:
        archive = services.tasks.download(task_id_of(task_id))
    except TaskError as exc:
        return _refused(exc, lang), gr.update(value=None, visible=False)
    except OSError as exc:
        gr.Warning(str(exc))
        return f"⚠️ {html.escape(str(exc))}", gr.update(value=None, visible=False)
    staged = services.stage_download(archive)
    return i18n.t("alert.download_ready", lang, name=Path(archive).name), gr.update(value=staged, visible=True)


def download_log(services: AppServices, task_id: Any, lang: str) -> tuple[str, Any]:
    if task_id in (None, ""):
        return f"⚠️ {i18n.t('alert.no_task', lang)}", gr.skip()
    try:
        task = services.tasks.task(task_id_of(task_id))
    except TaskError as exc:
        return _refused(exc, lang), gr.update(value=None, visible=False)
    logs = Path(task.output_dir) / "logs.txt"
    if not logs.is_file():
        return i18n.t("alert.no_log", lang), gr.update(value=None, visible=False)
    staged = services.stage_download(logs, f"task-{task.id}-logs.txt")
    return i18n.t("alert.download_ready", lang, name=Path(staged).name), gr.update(value=staged, visible=True)


def use_as_chat(services: AppServices, task_id: Any, lang: str) -> Iterator[str]:
    """Serve the task's adapter (Chat tab's switch: progress, then exactly one of ✅ / ⚠️ / ❌)."""
    if task_id in (None, ""):
        yield f"⚠️ {i18n.t('alert.no_task', lang)}"
        return
    try:
        task = services.tasks.task(task_id_of(task_id))
    except TaskError as exc:
        yield _refused(exc, lang)
        return
    if task.status is not TaskStatus.COMPLETED and not (Path(task.output_dir) / "lora").is_dir():
        key = "alert.no_adapter_ended" if task.status.is_final else "alert.no_adapter"
        text = i18n.t(key, lang, id=task.id, status=task.status.label)
        gr.Warning(text)
        yield f"⚠️ {html.escape(text)}"
        return
    for text, _ in chat_tab.switch_steps(services, task.output_dir, lang, label=f"#{task.id} {task.name}"):
        yield text
