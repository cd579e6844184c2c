"""CLI command group ``sage-ft tasks``: list, show, cancel, pause, unpause, delete, resume, retry, clone, work.

A thin client of ``sage_ft.tasks.TaskManager`` on the same database as the web UI, so what it shows
and changes is what the UI shows. Exit codes: 0 = done, 1 = refused or unknown id (reason on
stderr, never a stack trace).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from sage_ft.tasks.status import TaskStatus


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``tasks`` and its sub-commands to the `sage-ft` parser."""
    tasks = sub.add_parser("tasks", help="list and control fine-tuning tasks (the same queue the web UI shows)",
                           description="List, inspect and control the fine-tuning tasks stored in the data "
                                       "home's task database.")
    tasks.add_argument("--db", default=None, metavar="PATH", help="task database (default: <data home>/sage_ft.db)")
    tasks.set_defaults(handler=lambda args: (tasks.print_help(), 2)[1])
    cmds = tasks.add_subparsers(dest="tasks_command", metavar="ACTION")

    ls = cmds.add_parser("list", help="all tasks, newest first")
    ls.add_argument("--status", action="append", choices=[s.value for s in TaskStatus],
                    help="only tasks in this state (repeatable)")
    ls.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    ls.set_defaults(handler=_list)

    show = cmds.add_parser("show", help="one task: config, progress, metrics, checkpoints, log tail")
    show.add_argument("id", type=task_id)
    show.add_argument("--json", action="store_true", help="print JSON (for scripts)")
    show.add_argument("--log-lines", type=int, default=20, metavar="N", help="log lines to show (default 20)")
    show.set_defaults(handler=_show)

    cancel = cmds.add_parser("cancel", help="remove a queued task from the queue, or stop a running one")
    cancel.add_argument("id", type=task_id)
    cancel.add_argument("--wait", action="store_true", help="wait until a running task has stopped")
    cancel.set_defaults(handler=_cancel)

    for name, help_text, handler in (
            ("pause", "hold a running task between two steps (it keeps its memory)", _pause),
            ("unpause", "let a paused task continue", _unpause),
            ("retry", "queue a failed/cancelled/interrupted task again from scratch (new task)", _retry)):
        command = cmds.add_parser(name, help=help_text)  # commands that take just a task id
        command.add_argument("id", type=task_id)
        command.set_defaults(handler=handler)

    resume = cmds.add_parser("resume", help="re-queue an interrupted/cancelled/failed task from its newest intact "
                                            "checkpoint")
    resume.add_argument("id", type=task_id)
    resume.add_argument("--checkpoint", metavar="N", default=None,
                        help="continue from checkpoint-N instead (see `sage-ft tasks show ID`)")
    resume.set_defaults(handler=_resume)

    clone = cmds.add_parser("clone", help="queue a new task with a task's config (any state), changed by --set")
    clone.add_argument("id", type=task_id)
    clone.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="change a config value (repeatable), e.g. --set learning_rate=1e-4")
    clone.set_defaults(handler=_clone)

    delete = cmds.add_parser("delete", help="delete a task that is not running")
    delete.add_argument("id", type=task_id)
    delete.add_argument("--files", action="store_true", help="also delete its run folder (adapter, checkpoints)")
    delete.set_defaults(handler=_delete)

    work = cmds.add_parser("work", help="run queued tasks in this terminal (when the web UI is not running)")
    work.add_argument("--until-empty", action="store_true", help="exit when the queue is empty")
    work.set_defaults(handler=_work)


def task_id(text: str) -> int:
    """A task id as the task list shows it (7) or as the UI writes it (#7)."""
    from sage_ft.tasks.lookup import parse_task_id

    parsed = parse_task_id(text)
    if parsed is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a task id; give a number such as 7 (or #7)")
    return parsed


# ---------------------------------------------------------------------------------------- handlers
def _manager(args: argparse.Namespace, start_worker: bool = False):
    from sage_ft.tasks import TaskManager

    return TaskManager(args.db, start_worker=start_worker)


def _guarded(fn):
    """Run a handler; a refused operation or an unusable database becomes one line on stderr + exit 1."""
    def handler(args: argparse.Namespace) -> int:
        from sage_ft.tasks.store import SchemaError, StoreUnavailable
        from sage_ft.tasks.task import TaskError

        try:
            return fn(args)
        except (TaskError, SchemaError, StoreUnavailable) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    handler.__doc__ = fn.__doc__
    return handler


@_guarded
def _list(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        tasks = manager.list(args.status)
    if args.json:
        print(json.dumps([t.to_dict() for t in tasks], indent=1, ensure_ascii=False, default=str))
        return 0
    if not tasks:
        print("no tasks" + (f" with status {', '.join(args.status)}" if args.status else ""))
        return 0
    rows = [("ID", "STATUS", "PROGRESS", "LOSS", "CREATED", "SRC", "NAME")]
    for t in tasks:
        loss = t.last_metrics.get("loss")
        progress = "preparing" if t.preparation else f"{t.step}/{t.total_steps or '?'}"
        rows.append((str(t.id), t.status.label + (" ⏸ paused" if t.paused else ""), progress,
                     f"{loss:.4f}" if isinstance(loss, (int, float)) else "-", _when(t.created_at), t.source, t.name))
    widths = [max(_width(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    for row in rows:
        print("  ".join(cell + " " * (w - _width(cell)) for cell, w in zip(row, widths, strict=False)) + "  " + row[-1])
    return 0


@_guarded
def _show(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        detail = manager.get(args.id, log_lines=args.log_lines)
    if args.json:
        data = detail.to_dict()
        data.update(metrics_history=detail.metrics_history, log_tail=detail.log_tail, checkpoints=detail.checkpoints,
                    damaged_checkpoints=detail.damaged_checkpoints,
                    queue_position=detail.queue_position, estimated_start=detail.estimated_start,
                    eta_seconds=detail.eta_seconds)
        data.pop("config_yaml", None)
        print(json.dumps(data, indent=1, ensure_ascii=False, default=str))
        return 0
    lines = [f"Task {detail.id}: {detail.name}",
             f"  status:    {detail.status.label}" + (", ⏸ paused" if detail.paused else "")]
    if detail.error:
        lines.append(f"  reason:    {detail.error}")
    lines += [f"  source:    {detail.source}", f"  created:   {_when(detail.created_at)}"]
    if detail.started_at:
        lines.append(f"  started:   {_when(detail.started_at)}")
    if detail.finished_at:
        lines.append(f"  finished:  {_when(detail.finished_at)}")
    if detail.queue_position:
        start = _when(detail.estimated_start) if detail.estimated_start else "unknown"
        lines.append(f"  queue:     position {detail.queue_position}, estimated start {start}")
    lines.append(f"  progress:  {detail.preparation.text}" if detail.preparation else
                 f"  progress:  step {detail.step}/{detail.total_steps or '?'}"
                 + (f", about {detail.eta_seconds:.0f} s left" if detail.eta_seconds else ""))
    if detail.last_metrics:
        shown = {k: v for k, v in detail.last_metrics.items() if k in ("loss", "eval_loss", "learning_rate",
                                                                       "tokens_per_second", "final_loss")}
        lines.append("  metrics:   " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                 for k, v in shown.items()))
    lines += [f"  dataset:   {detail.dataset} (sha256 {detail.dataset_fingerprint[:12]})",
              f"  output:    {detail.output_dir}"]
    if detail.checkpoints:
        lines.append(f"  checkpoints: {', '.join(c.rsplit('/', 1)[-1] for c in detail.checkpoints)}")
    for folder, problem in detail.damaged_checkpoints.items():
        lines.append(f"  damaged:   {Path(folder).name} ({problem}); a resume passes over it")
    lines += ["", "Config:", *("  " + line for line in detail.config_yaml.splitlines())]
    if detail.log_tail:
        lines += ["", f"Log (last {args.log_lines} lines):", *("  " + line for line in detail.log_tail.splitlines())]
    print("\n".join(lines))
    return 0


@_guarded
def _cancel(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        task = manager.cancel(args.id)
        if task.status is TaskStatus.RUNNING:
            print(f"task {task.id}: stop requested; it stops after the current step (adapter kept)")
            if args.wait:
                task = manager.wait(task.id)
                print(f"task {task.id}: {task.status.label}")
        else:
            print(f"task {task.id}: {task.status.label}")
    return 0


@_guarded
def _pause(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        task = manager.pause(args.id)
    print(f"task {task.id}: pause requested; it holds after the current step (`sage-ft tasks unpause {task.id}` "
          "continues)")
    return 0


@_guarded
def _unpause(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        task = manager.unpause(args.id)
    print(f"task {task.id}: continues")
    return 0


@_guarded
def _delete(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        task = manager.task(args.id)
        had_files = Path(task.output_dir).exists()
        manager.delete(args.id, remove_files=args.files)
    if not had_files:  # queued and never started: there was no run folder to keep or remove
        print(f"task {task.id} deleted (it had not started: no files)")
    else:
        print(f"task {task.id} deleted" + (f" with its folder {task.output_dir}" if args.files else
                                          f"; its files stay in {task.output_dir}"))
    return 0


@_guarded
def _resume(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        task = manager.resume(args.id, checkpoint=args.checkpoint)
        if task.error:  # the damaged checkpoints passed over, the newer ones set aside
            print(f"note: {task.error}")
        print(f"task {task.id}: {task.status.label}, will continue from {task.resume_checkpoint}")
        _say_who_runs_it(manager)
    return 0


@_guarded
def _retry(args: argparse.Namespace) -> int:
    with _manager(args) as manager:
        task = manager.retry(args.id)
        print(f"task {task.id} queued (a new run of task {args.id}'s config)")
        _say_who_runs_it(manager)
    return 0


@_guarded
def _clone(args: argparse.Namespace) -> int:
    from sage_ft.config import ConfigError, parse_overrides

    try:
        overrides = parse_overrides(args.overrides)
    except ConfigError as exc:
        print(f"error: {'; '.join(exc.problems)}", file=sys.stderr)
        return 2
    with _manager(args) as manager:
        task = manager.clone(args.id, overrides=overrides)
        print(f"task {task.id} queued (a new run of task {args.id}'s config"
              + (f", with {', '.join(args.overrides)})" if args.overrides else ")"))
        _say_who_runs_it(manager)
    return 0


@_guarded
def _work(args: argparse.Namespace) -> int:
    """Run the queue here; Ctrl-C stops, and a task it was running becomes interrupted (resumable)."""
    manager = _manager(args, start_worker=True)
    print(f"working on the task queue of {manager.store.path} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(1)
            if args.until_empty and not manager.queue() and not manager.list([TaskStatus.RUNNING]):
                break
    except KeyboardInterrupt:
        print("stopping; a running task becomes interrupted and can be resumed", file=sys.stderr)
    finally:
        manager.shutdown()
    return 0


# ---------------------------------------------------------------------------------------- helpers
def _say_who_runs_it(manager: Any) -> None:
    workers = manager.workers()
    if workers:
        print(f"the app (pid {workers[0]['pid']}) will start it when its turn comes")
    else:
        print("no app is running to start it: open the web UI, or run `sage-ft tasks work`")


def _when(ts: float | None) -> str:
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S") if ts else "-"


def _width(text: str) -> int:
    """Columns ``text`` takes in a terminal: ✅ and CJK take two, and so does ⚠️ (U+26A0 made an emoji
    by the variation selector after it), which ``len`` counts as two characters of one column each."""
    import wcwidth

    width = wcwidth.wcswidth(text)
    return width if width >= 0 else len(text)  # a control character: no better guess
