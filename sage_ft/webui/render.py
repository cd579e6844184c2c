"""HTML/text pieces shown by several tabs: progress bars, task rows, chat-turn previews.

Pure functions of core snapshots (``Task``, conversations; ``paused_ahead`` alone reads the task list);
every user-provided string is escaped.
"""

from __future__ import annotations

import html
import time
from collections.abc import Sequence
from typing import Any

from sage_ft.tasks import Task, TaskError, TaskNotFound, TaskStatus
from sage_ft.tasks.task import TaskStateError
from sage_ft.webui import i18n


def duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def clock(ts: float | None) -> str:
    if not ts:
        return ""
    fmt = "%H:%M:%S" if time.time() - ts < 86400 else "%Y-%m-%d %H:%M"
    return time.strftime(fmt, time.localtime(ts))


def number(value: Any, digits: int = 4) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value:.{digits}g}"
    return ""


def readable_metrics(metrics: dict[str, Any], digits: int = 4) -> dict[str, Any]:
    """The run's latest metrics for reading: floats to ``digits`` significant digits
    (0.27586206896551724 -> 0.2759); the stored values stay exact."""
    return {key: float(number(value, digits)) if isinstance(value, float) else value
            for key, value in metrics.items()}


def cancel_message(task: Task, lang: str) -> str:
    """What a cancel did, so nobody has to guess whether work was lost: a running task stops after
    its step with its adapter kept; one still preparing stops at once, with nothing trained, or, when
    resumed, with the checkpoints of its earlier attempts kept; a queued one that never ran left the
    queue with nothing trained; an interrupted (or re-queued) one keeps its checkpoints and can still
    be resumed."""
    if task.status.value == "running":
        if not preparing_text(task, lang):
            return i18n.t("alert.cancel_requested", lang, id=task.id)
        resumed = task.resume_checkpoint is not None
        return i18n.t("alert.cancel_preparing_resumed" if resumed else "alert.cancel_preparing", lang, id=task.id)
    return i18n.t("alert.task_cancel" if task.started_at else "alert.cancel_queued", lang, id=task.id)


def is_paused(task: Task) -> bool:
    """Held between two steps by a pause (``TaskManager.pause``); its status stays running."""
    return task.paused and task.status is TaskStatus.RUNNING


def allowed_actions(task: Task | None, has_checkpoint: bool) -> dict[str, bool]:
    """Which task actions the task's state allows, so a page can turn off the buttons for the others
    instead of refusing after a click (the Monitor's and the Train tab's buttons both follow this):
    cancel a queued, running or interrupted task; resume a failed, cancelled or interrupted one with an
    intact checkpoint (``has_checkpoint``); retry any finished one (a completed one runs again as a
    copy); delete any that is not running. None (no task picked): nothing."""
    if task is None:
        return dict.fromkeys(("cancel", "resume", "retry", "delete"), False)
    return {"cancel": task.status.is_cancellable, "resume": task.status.is_resumable and has_checkpoint,
            "retry": task.status.is_final, "delete": task.status is not TaskStatus.RUNNING}


def status_text(task: Task, lang: str, paused_ahead: Task | None = None) -> str:
    """'🔄 running ⏸ paused' as the CLI's list says it; a queued task behind a paused one says so
    (``paused_ahead``: the paused running task, or None; ignored for a task that is not queued)."""
    text = f"{task.icon} {i18n.t(f'status.{task.status.value}', lang)}"
    if is_paused(task):
        text += f" ⏸ {i18n.t('status.paused', lang)}"
    elif paused_ahead is not None and task.status is TaskStatus.QUEUED:
        text += f" · {i18n.t('mon.waits_for_paused', lang, id=paused_ahead.id)}"
    return text


def paused_running(tasks: Sequence[Task]) -> Task | None:
    """The paused running task among ``tasks``: the queue waits for it until it is unpaused."""
    return next((t for t in tasks if is_paused(t)), None)


def paused_ahead(manager: Any, task: Task | None) -> Task | None:
    """For a queued ``task``, the paused running task it waits for (one cheap query); else None."""
    if task is None or task.status is not TaskStatus.QUEUED:
        return None
    return paused_running(manager.list([TaskStatus.RUNNING]))


def task_error_text(exc: TaskError, lang: str) -> str:
    """A task refusal in the page's words: the core's messages end in a CLI command ('see `sage-ft tasks
    list`', 'cancel it first (`sage-ft tasks cancel 12`)'), which the CLI prints as they are; here the
    hint names the page's task list and buttons, from the exception's fields."""
    buttons = {name: i18n.t(f"mon.{name}", lang) for name in ("cancel", "resume", "retry", "unpause")}
    if isinstance(exc, TaskNotFound) and exc.task_id is not None:
        return i18n.t("alert.task_not_found", lang, id=exc.task_id)
    if isinstance(exc, TaskStateError):
        key = f"alert.refused.{exc.action}.{exc.reason}"
        if key in i18n.strings(i18n.DEFAULT_LANG):
            return i18n.t(key, lang, id=exc.task_id, status=i18n.t(f"status.{exc.status}", lang), **buttons)
    return str(exc)


def task_row(task: Task, lang: str, paused_ahead: Task | None = None) -> list[Any]:
    """One row of the task table (see ``table_headers``); ``paused_ahead`` as in ``status_text``."""
    m = task.last_metrics
    epoch = m.get("epoch", m.get("current_epoch"))
    config = task.config_dict
    dataset = ", ".join(p.rsplit("/", 1)[-1] for p in task.dataset.split(",") if p) or config.get("dataset", "")
    return [task.id, status_text(task, lang, paused_ahead), task.name, str(config.get("model_name_or_path", "")), dataset,
            f"{task.progress * 100:.0f}%", number(epoch, 3),
            i18n.t("mon.preparing.short", lang) if preparing_text(task, lang) else f"{task.step}/{task.total_steps or '?'}",
            number(m.get("loss")), clock(task.started_at), duration(task.duration_s)]


TABLE_COLUMNS = ("id", "status", "name", "model", "dataset", "progress", "epoch", "step", "loss", "started",
                 "duration")


def table_headers(lang: str) -> list[str]:
    return [i18n.t(f"mon.col.{c}", lang) for c in TABLE_COLUMNS]


def progress_note(text: str) -> str:
    """The progress box with a sentence instead of a task (none picked, or what was typed names none)."""
    return f'<div class="sage-progress empty">{html.escape(text)}</div>'


def progress_html(task: Task | None, lang: str, eta_s: float | None = None, paused_ahead: Task | None = None) -> str:
    """A progress bar with step/total, epoch, tokens/s and ETA (or the queue/final state). A paused task
    says where it holds and shows no speed or ETA (nothing moves); a queued task behind it
    (``paused_ahead``) says it waits for that one, and no start time."""
    if task is None:
        return progress_note(i18n.t("mon.no_task", lang))
    m = task.last_metrics
    pct = task.progress * 100
    epoch = m.get("epoch", m.get("current_epoch"))
    tps = m.get("tokens_per_second")
    eta = eta_s if eta_s is not None else m.get("eta_seconds")
    paused = is_paused(task)
    bits = [f'{i18n.t("mon.step", lang)} {task.step}/{task.total_steps or "?"}']
    if task.status.value == "queued":  # what a queued task waits for, not "step 0/?"
        bits = _queue_bits(task, lang, paused_ahead)
    elif paused:
        bits = [i18n.t("mon.paused_at", lang, step=task.step, total=task.total_steps or "?",
                       unpause=i18n.t("mon.unpause", lang))]
    elif preparing := preparing_text(task, lang):  # what it does before its first step, not "step 0/?"
        bits = [preparing]
    if epoch is not None:
        bits.append(f'{i18n.t("mon.epoch", lang)} {number(epoch, 3)}')
    if isinstance(tps, (int, float)) and not paused:
        bits.append(f"{tps:,.0f} tok/s")
    if task.status.value == "running" and not paused and isinstance(eta, (int, float)):
        bits.append(f'{i18n.t("mon.eta", lang)} {duration(eta)}')
    if isinstance(m.get("loss"), (int, float)):
        bits.append(f'loss {number(m["loss"])}')
    error = f'<div class="err">{html.escape(task.error)}</div>' if task.error else ""
    state = f"status-{task.status.value}" + (" paused" if paused else "")
    return (f'<div class="sage-progress {state}" data-task="{task.id}" data-step="{task.step}"'
            f' data-paused="{str(paused).lower()}">'
            f'<div class="head"><b>#{task.id} {html.escape(task.name)}</b> · '
            f'{html.escape(status_text(task, lang, paused_ahead))} · {pct:.0f}%</div>'
            f'<div class="bar"><div class="fill" style="width:{pct:.1f}%"></div></div>'
            f'<div class="meta">{html.escape(" · ".join(bits))}</div>{error}</div>')


def preparing_text(task: Task, lang: str) -> str | None:
    """What a running task does before its first step (``Task.preparation``); None once it trains."""
    prep = task.preparation
    if prep is None:
        return None
    if prep.phase == "tokenize" and prep.total is not None:
        return i18n.t("mon.preparing.tokenize", lang, done=f"{prep.done:,}", total=f"{prep.total:,}", pct=prep.percent)
    return i18n.t(f"mon.preparing.{prep.phase}", lang)


def _queue_bits(task: Task, lang: str, paused_ahead: Task | None = None) -> list[str]:
    """A queued task's place in the queue and expected start (a ``TaskDetail`` knows both); behind a
    paused task the start is unknown (the estimate counts the paused run as still going)."""
    position = getattr(task, "queue_position", None)
    start = getattr(task, "estimated_start", None)
    bits = [i18n.t("mon.queue_position", lang, n=position) if position else i18n.t("mon.queue_waiting", lang)]
    if paused_ahead is not None:  # the status already says whom it waits for
        return bits
    if isinstance(start, (int, float)):
        bits.append(i18n.t("mon.queue_starts_in", lang, t=duration(start - time.time())))
    return bits


def chat_preview_html(conversations: Sequence[Sequence[dict[str, str]]], lang: str, max_chars: int = 600) -> str:
    """The first rows of a dataset rendered as chat turns."""
    if not conversations:
        return f'<div class="sage-preview empty">{html.escape(i18n.t("data.no_preview", lang))}</div>'
    cards = []
    for n, conv in enumerate(conversations, 1):
        turns = []
        for msg in conv:
            role = str(msg.get("role", "?"))
            text = str(msg.get("content", ""))
            if len(text) > max_chars:
                text = text[:max_chars] + " …"
            shown = i18n.t(f"data.role.{role}", lang) if f"data.role.{role}" in i18n.strings(lang) else role
            turns.append(f'<div class="turn role-{html.escape(role)}"><span class="role">{html.escape(shown)}</span>'
                         f'<div class="text">{html.escape(text)}</div></div>')
        cards.append(f'<div class="conv"><div class="conv-title">{html.escape(i18n.t("data.row", lang, n=n))}</div>'
                     + "".join(turns) + "</div>")
    return '<div class="sage-preview">' + "".join(cards) + "</div>"


CSS = """
#topbar {align-items: center;}
#app-title h2 {margin: 0;}
.sage-status {display: flex; gap: 18px; flex-wrap: wrap; font-size: 0.92em; align-items: center;}
.sage-status .tag {background: #e0e7ff; color: #3730a3; border-radius: 6px; padding: 1px 6px; font-size: 0.85em;}
.sage-status .state-ready, .sage-status .state-running {color: #15803d;}
.sage-status .state-error, .sage-status .state-failed {color: #b91c1c;}
.sage-progress {border: 1px solid var(--border-color-primary); border-radius: 8px; padding: 8px 12px;}
.sage-progress .bar {height: 10px; background: var(--neutral-200); border-radius: 5px; margin: 6px 0; overflow: hidden;}
.sage-progress .fill {height: 100%; background: #2563eb; transition: width 0.6s;}
.sage-progress.status-completed .fill {background: #16a34a;}
.sage-progress.status-failed .fill {background: #dc2626;}
.sage-progress.paused .fill {background: #d97706;}
.sage-progress .meta {font-size: 0.9em; opacity: 0.85;}
.sage-progress .err {color: #b91c1c; font-size: 0.9em; white-space: pre-wrap;}
.sage-preview {max-height: 360px; overflow-y: auto;}
.sage-preview .conv {border: 1px solid var(--border-color-primary); border-radius: 8px; margin-bottom: 8px; padding: 6px;}
.sage-preview .conv-title {font-size: 0.8em; opacity: 0.7;}
.sage-preview .turn {margin: 4px 0; padding: 4px 8px; border-radius: 8px; white-space: pre-wrap;}
.sage-preview .role {font-size: 0.75em; font-weight: bold; text-transform: uppercase; opacity: 0.7;}
.sage-preview .role-user {background: var(--neutral-100);}
.sage-preview .role-assistant {background: #eef2ff;}
.sage-preview .role-system {background: #fef9c3;}
.fit-warning {border-left: 4px solid #dc2626; padding-left: 8px;}
#task-table th, #task-table th * {white-space: nowrap; word-break: keep-all; overflow-wrap: normal;}
#data-report pre {white-space: pre-wrap; overflow-wrap: anywhere;}
[id^="cfg-"] [data-testid="block-info"] {overflow-wrap: anywhere;}
"""

# A chart drawn while its tab was hidden (the Monitor's, as a run goes on while the Train tab shows)
# takes plotly's default width, 700 px, and is cut off in its narrower box once the tab shows: each
# chart on the page is redrawn at its box's size when a tab is picked (after the tab has been laid out).
RESIZE_CHARTS_JS = r"""
() => {
  setTimeout(() => {
    for (const plot of document.querySelectorAll('.js-plotly-plot')) {
      if (window.Plotly && plot.offsetWidth && plot._fullLayout && Math.abs(plot._fullLayout.width - plot.offsetWidth) > 1) {
        window.Plotly.Plots.resize(plot);
      }
    }
  }, 50);
}
"""

# Gradio's textbox autoscroll follows only a box already within 100 px of its bottom, so a log set
# in one piece (a page load, a reload, another task picked) opened at its first line, under the
# "Log (tail)" title. This keeps the run's and the chat server's logs at their newest line unless the
# reader has scrolled up, and scrolls again once a box in a hidden tab or accordion becomes visible.
# A chat reply starts with a "🤖 model" line (chat_messages.answered_by) that is for the screen: a copied
# reply is the reply alone, and a copied conversation names each reply's model in plain text.
JS = r"""
() => {
  const clip = navigator.clipboard;
  if (clip && clip.writeText) {
    const write = clip.writeText.bind(clip);
    const label = /<sub>🤖 ((?:\\.|[^<\\])*)<\/sub>\n\n/g;
    const first = new RegExp('^' + label.source);
    clip.writeText = (text) => write(typeof text !== 'string' ? text : text.replace(first, '')
      .replace(label, (_, name) => '🤖 ' + name.replace(/\\(.)/g, '$1') + '\n'));
  }
  const seen = new WeakMap();
  setInterval(() => {
    for (const box of document.querySelectorAll('#task-log textarea, #server-log textarea')) {
      const last = seen.get(box) || {length: -1, pinned: true};
      if (box.clientHeight === 0) { seen.set(box, {length: -1, pinned: last.pinned}); continue; }
      if (box.value.length !== last.length && last.pinned) box.scrollTop = box.scrollHeight;
      seen.set(box, {length: box.value.length,
                     pinned: box.scrollTop + box.clientHeight >= box.scrollHeight - 8});
    }
  }, 400);
}
"""
