"""``TaskManager``: the one API over the task store and queue, shared by the web UI, CLI and tests.

Every operation is a short database transaction, so any number of managers (the app, a CLI call,
a second app) can work on one database at once; state changes that could race are single guarded
UPDATE/DELETE statements (``... WHERE status = 'queued'``), never read-then-write.
"""

from __future__ import annotations

import atexit
import dataclasses
import json
import logging
import re
import shutil
import threading
import time
import weakref
import zipfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from sqlalchemy import case, delete, func, select, update

from sage_ft import paths
from sage_ft.atomic import output_path_problem
from sage_ft.config import ConfigError, TrainConfig, unknown_key_warning
from sage_ft.data.load import FILE_TYPES
from sage_ft.estimate import quantization_problem
from sage_ft.events import Preparation, read_events
from sage_ft.tasks import rundir
from sage_ft.tasks.checkpoints import checkpoint_problem
from sage_ft.tasks.procinfo import ProcessIdentity, current_identity, end_process_tree
from sage_ft.tasks.status import CANCELLED_AT_ONCE_STATES, RESUMABLE_STATES, TaskStatus
from sage_ft.tasks.store import TaskRecord, TaskStore, WorkerRecord
from sage_ft.tasks.task import (
    Task,
    TaskDetail,
    TaskError,
    TaskNotFound,
    TaskRefused,
    TaskStateError,
    preparation_metrics,
)
from sage_ft.tasks.worker import LOCAL_RUNS, LOCAL_RUNS_LOCK, QueueWorker, TaskRun, claim_next

log = logging.getLogger(__name__)

SOURCES = ("ui", "cli", "api")
DOWNLOADABLE = {"lora": "lora", "merged": "merged_model"}
_COPY_SUFFIX = re.compile(r"(?: \(copy(?: \d+)?\))+$")  # what clone adds to a name
Subscriber = Callable[[dict[str, Any]], None]


class TaskManager:
    """Create, follow and control fine-tuning tasks (see the method docstrings).

    ``start_worker=True`` (the app) runs queued tasks one at a time on a training thread of this
    process; ``start_worker=False`` (CLI commands) only reads and changes the store. Every manager
    marks tasks whose process died as interrupted when it opens the database.

    ``arbiter`` (optional, duck-typed) shares memory with other users of the device, e.g. the chat
    server: ``arbiter.before_run(config) -> str | None`` is called before each run this manager
    executes (a returned message is shown to the user: it goes to subscribers as
    ``{"type": "arbiter", ...}`` and into the run's events as a ``log`` event), and
    ``arbiter.after_run(config)`` after it, whatever the outcome. An exception from either is
    logged and never stops the run or the worker. See ``sage_ft.tasks.arbitration.ServingArbiter``.
    """

    def __init__(self, db_path: str | Path | None = None, start_worker: bool = True, max_running: int = 1,
                 arbiter: Any = None):
        self.store = TaskStore(db_path)
        self.max_running = max_running
        self.arbiter = arbiter
        self._subscribers: list[Subscriber] = []
        self._sub_lock = threading.Lock()
        self._foreground: dict[int, TaskRun] = {}
        self._worker: QueueWorker | None = None
        self._closed = False
        self.recover()
        if start_worker:
            self.start_worker()
        self_ref = weakref.ref(self)
        self._atexit = lambda: (m := self_ref()) is not None and m.shutdown(timeout=10)
        atexit.register(self._atexit)

    # ================================================================== creating tasks
    def create(self, config: TrainConfig | dict[str, Any], name: str | None = None, source: str = "ui",
               *, parent_id: int | None = None) -> Task:
        """Validate the config, dataset and model, then queue the task; ``TaskRefused`` says why not.

        Nothing is written on refusal. The config is frozen (YAML snapshot, output_dir resolved) and
        never changes afterwards; resume/retry/clone all start from it.
        """
        checked = self._validate(config)
        return self._insert(checked, name, source, TaskStatus.QUEUED, parent_id)

    def validate(self, config: TrainConfig | dict[str, Any]) -> TrainConfig:
        """The checks ``create`` makes (config, model files, output folder, dataset), without queuing:
        returns the validated config or raises ``TaskRefused`` listing every problem. The UI calls
        it before its memory-fit warning, so a config that cannot run at all says why first."""
        return self._validate(config).config

    def _validate(self, config: TrainConfig | dict[str, Any]) -> _Checked:
        try:
            if isinstance(config, TrainConfig):
                config = dataclasses.replace(config)
                config.validate()
            elif isinstance(config, dict):
                config, unknown = TrainConfig.from_dict(config)
                for key in unknown:
                    log.warning("%s", unknown_key_warning(key))
            else:
                raise TaskRefused([f"config: expected a TrainConfig or a dict, got {type(config).__name__}"])
        except ConfigError as exc:
            raise TaskRefused(exc.problems) from None
        resume, resume_problems = _resume_point(config)
        if resume is not None:  # continuing a run folder from the CLI: the folder is the checkpoint's
            config = dataclasses.replace(config, output_dir=str(resume.parent))
        problems = resume_problems + _model_problems(config) + _output_dir_problems(config)
        problems += [p for p in (quantization_problem(config),) if p]
        files: list[Path] = []
        fingerprint = ""
        if not config.datasets:
            problems.append(f"dataset: empty; give one or more {FILE_TYPES} files (comma separated)")
        else:
            data_problems, files = _dataset_problems(config)
            problems += data_problems
            if not data_problems:
                fingerprint = rundir.fingerprint_files(files)
        if problems:
            raise TaskRefused(problems)
        return _Checked(config, files, fingerprint, resume)

    def _insert(self, checked: _Checked, name: str | None, source: str, status: TaskStatus,
                parent_id: int | None, owner: ProcessIdentity | None = None) -> Task:
        config, files = checked.config, checked.files
        if source not in SOURCES:
            raise TaskRefused([f"source: {source!r} is not one of {', '.join(SOURCES)}"])
        name = (name or config.run_name or _default_name(config)).strip()[:200]
        now = time.time()
        with self.store.write() as s:
            explicit_dir = config.output_dir.strip()
            if explicit_dir:
                clash = s.scalar(select(TaskRecord.id).where(
                    TaskRecord.output_dir == str(Path(explicit_dir).expanduser().resolve()),
                    TaskRecord.status.in_([TaskStatus.QUEUED.value, TaskStatus.RUNNING.value])))
                if clash:
                    raise TaskRefused([f"output_dir: {explicit_dir} is already used by task {clash}, which is "
                                       "queued or running; choose another folder"])
            position = (s.scalar(select(func.max(TaskRecord.position))) or 0) + 1
            rec = TaskRecord(name=name, status=status.value, source=source, created_at=now, updated_at=now,
                             config_yaml="", dataset=",".join(str(f.resolve()) for f in files),
                             dataset_fingerprint=checked.fingerprint, output_dir="", position=position,
                             resume_checkpoint=str(checked.resume) if checked.resume else None, parent_id=parent_id, last_metrics="{}", step=0, total_steps=0, attempts=1,
                             cancel_requested=False)
            if owner is not None:
                rec.pid, rec.pid_start_time, rec.started_at, rec.active_since = owner.pid, owner.start_time, now, now
            s.add(rec)
            s.flush()  # assigns the id, which names the run folder
            out = Path(explicit_dir).expanduser().resolve() if explicit_dir else _new_run_dir(rec.id, name)
            frozen = dataclasses.replace(config, output_dir=str(out), resume_from_checkpoint=None,
                                         dataset=rec.dataset)
            rec.output_dir = str(out)
            rec.config_yaml = frozen.to_yaml()
            task = Task.from_record(rec)
        self._notify({"type": "status", "task_id": task.id, "status": task.status.value})
        if self._worker is not None and status is TaskStatus.QUEUED:
            self._worker.wake()
        return task

    def run_foreground(self, config: TrainConfig | dict[str, Any], name: str | None = None,
                       on_event: Subscriber | None = None, on_start: Callable[[Task], None] | None = None
                       ) -> ForegroundResult:
        """Run a task in this thread now (``sage-ft train``), registered as source=cli.

        The row is created already running under this process's pid, kept current like a queued
        run's, and visible to a running web UI, which can also cancel or pause it. ``on_start(task)``
        is called once the row exists (before the model loads). Returns the trainer's
        ``RunResult``-like outcome (``status``, ``output_dir``, ``metrics``, ``error``, ``task_id``).
        A KeyboardInterrupt escaping the run (a second Ctrl-C) leaves the task interrupted
        (resumable) and is re-raised; a first Ctrl-C should call ``cancel(task.id)`` instead.
        """
        checked = self._validate(config)
        with LOCAL_RUNS_LOCK:  # registered before any recover() can see the running row
            task = self._insert(checked, name, "cli", TaskStatus.RUNNING, None, owner=current_identity())
            LOCAL_RUNS.add(task.id)

        def notify(event: dict[str, Any]) -> None:
            self._notify(event)
            if on_event is not None:
                on_event(event)

        run = TaskRun(self.store, task, notify, self.arbiter)
        self._foreground[task.id] = run
        try:
            if on_start is not None:
                on_start(task)
            outcome = run.execute()
        except KeyboardInterrupt:
            run.interrupt()
            self._mark_interrupted(task.id, "stopped with Ctrl-C")
            raise
        finally:
            self._foreground.pop(task.id, None)
            with LOCAL_RUNS_LOCK:
                LOCAL_RUNS.discard(task.id)
        return ForegroundResult(outcome.status.value, Path(outcome.output_dir), outcome.metrics, outcome.error,
                                task.id)

    # ================================================================== reading
    def list(self, statuses: Iterable[TaskStatus | str] | None = None) -> list[Task]:
        """All tasks, newest first (``statuses`` filters)."""
        query = select(TaskRecord).order_by(TaskRecord.id.desc())
        if statuses is not None:
            query = query.where(TaskRecord.status.in_([TaskStatus(s).value for s in statuses]))
        with self.store.read() as s:
            return [Task.from_record(r) for r in s.scalars(query)]

    def queue(self) -> list[Task]:
        """Queued tasks in the order they will start."""
        with self.store.read() as s:
            rows = s.scalars(select(TaskRecord).where(TaskRecord.status == TaskStatus.QUEUED.value)
                             .order_by(TaskRecord.position, TaskRecord.id))
            return [Task.from_record(r) for r in rows]

    def task(self, task_id: int) -> Task:
        """The row only (cheap); ``get`` adds what the run directory holds."""
        with self.store.read() as s:
            rec = s.get(TaskRecord, int(task_id))
            if rec is None:
                raise TaskNotFound(task_id)
            return Task.from_record(rec)

    def get(self, task_id: int, log_lines: int = 50) -> TaskDetail:
        """Config, metrics history (from events.jsonl), log tail, checkpoints, queue position and
        estimated start (queued), remaining time (running)."""
        task = self.task(task_id)
        base = {f.name: getattr(task, f.name) for f in dataclasses.fields(Task)}
        position = start = eta = None
        if task.status is TaskStatus.QUEUED:
            for index, (queued, when) in enumerate(self._queue_estimates(), start=1):
                if queued.id == task.id:
                    position, start = index, when
                    break
        elif task.status is TaskStatus.RUNNING:
            eta = self._remaining_s(task)
        return TaskDetail(**base, metrics_history=rundir.metrics_history(task.output_dir),
                          log_tail=rundir.log_tail(task.output_dir, log_lines),
                          checkpoints=[str(p) for p in rundir.checkpoints(task.output_dir)],
                          damaged_checkpoints={str(p): problem for p in rundir.checkpoint_folders(task.output_dir)
                                               if (problem := checkpoint_problem(p))},
                          queue_position=position, estimated_start=start, eta_seconds=eta)

    def events(self, task_id: int, offset: int = 0) -> tuple[list[dict[str, Any]], int]:
        """Events of a task's run appended since byte ``offset`` (live charts, any process)."""
        return read_events(Path(self.task(task_id).output_dir) / "events.jsonl", offset)

    def version(self) -> str:
        """Changes whenever any row is added, changed or deleted, by any process (one cheap query)."""
        with self.store.read() as s:
            count, last, top = s.execute(select(func.count(TaskRecord.id), func.max(TaskRecord.updated_at),
                                                func.max(TaskRecord.id))).one()
        return f"{count}:{last or 0:.6f}:{top or 0}"

    def poll(self, since: str | None = None) -> tuple[str, list[Task] | None]:
        """Cheap change check for a UI timer: ``(version, tasks)``, ``tasks`` None when unchanged.

        ``version`` changes whenever any row is added, changed or deleted, by any process.
        """
        version = self.version()
        if version == since:
            return version, None
        return version, self.list()

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn(event)`` for every status change and training event of runs in this process.

        Events are dicts with ``type`` ("status" or "event") and ``task_id``; they arrive on the
        training thread, so ``fn`` must be quick. Returns a function that unsubscribes.
        """
        with self._sub_lock:
            self._subscribers.append(fn)

        def unsubscribe() -> None:
            with self._sub_lock:
                if fn in self._subscribers:
                    self._subscribers.remove(fn)
        return unsubscribe

    def _notify(self, event: dict[str, Any]) -> None:
        with self._sub_lock:
            subscribers = list(self._subscribers)
        for fn in subscribers:
            try:
                fn(event)
            except Exception:
                log.exception("task subscriber %r failed", fn)

    def compare(self, task_ids: Iterable[int]) -> dict[str, Any]:
        """Side by side: each task's final metrics and loss curves, and the config keys that differ."""
        tasks = [self.task(i) for i in task_ids]
        configs = {t.id: t.config_dict for t in tasks}
        keys = sorted({k for c in configs.values() for k in c} - {"output_dir", "run_name"})
        differing = {k: {t.id: configs[t.id].get(k) for t in tasks} for k in keys
                     if len({json.dumps(configs[t.id].get(k), default=str) for t in tasks}) > 1}
        curves = {}
        for t in tasks:
            history = rundir.metrics_history(t.output_dir)
            curves[t.id] = {metric: [(e["step"], e[metric]) for e in history
                                     if isinstance(e.get(metric), (int, float)) and "step" in e]
                            for metric in ("loss", "eval_loss", "learning_rate")}
        return {
            "tasks": [{"id": t.id, "name": t.name, "status": t.status.value, "icon": t.icon, "steps": t.total_steps,
                       "duration_s": t.duration_s, "metrics": t.last_metrics} for t in tasks],
            "config_diff": differing,
            "curves": curves,
        }

    def workers(self) -> list[dict[str, Any]]:
        """Live queue workers on this database (the app, ``sage-ft tasks work``)."""
        with self.store.read() as s:
            rows = list(s.scalars(select(WorkerRecord)))
        return [{"pid": r.pid, "started_at": r.started_at, "heartbeat_at": r.heartbeat_at,
                 "current_task_id": r.current_task_id}
                for r in rows if ProcessIdentity(r.pid, r.start_time).is_alive()]

    # ================================================================== changing tasks
    def cancel(self, task_id: int) -> Task:
        """Queued: leaves the queue at once (cancelled). Running: asks the run to stop after the
        current step (any process); the adapter trained so far is kept and the status becomes
        cancelled when it has stopped. Interrupted: becomes cancelled (still resumable).

        The task returned says whether a running one had begun its steps (``Task.preparation``), so
        that the caller can say what the cancel keeps. That is read from the run's events, written as
        they happen: the row, written once a second by the process that runs the task (this one or a
        CLI's), can be a stage behind."""
        task_id = int(task_id)
        now = time.time()
        with self.store.write() as s:
            done = s.execute(update(TaskRecord).where(
                TaskRecord.id == task_id,
                TaskRecord.status.in_([st.value for st in CANCELLED_AT_ONCE_STATES]))
                .values(status=TaskStatus.CANCELLED.value, finished_at=now, updated_at=now)).rowcount
            if not done:
                done = s.execute(update(TaskRecord).where(TaskRecord.id == task_id,
                                                          TaskRecord.status == TaskStatus.RUNNING.value)
                                 .values(cancel_requested=True, updated_at=now)).rowcount
                if done:
                    self._local_run(task_id, lambda run: run.cancel())
        task = self.task(task_id)
        if not done:
            raise TaskError(f"task {task_id} is already {task.status.value}; nothing to cancel")
        stage = rundir.stage_since(task.output_dir, task.active_since) if task.active_since is not None else None
        if task.status is TaskStatus.RUNNING and stage is not None:  # the run's own events: the row can lag
            preparation = Preparation.of_event(stage) if stage["event"] == "preparing" else None
            metrics = {**task.last_metrics, **preparation_metrics(preparation)}
            task = dataclasses.replace(task, last_metrics={k: v for k, v in metrics.items() if v is not None})
        self._notify({"type": "status", "task_id": task_id, "status": task.status.value})
        return task

    def pause(self, task_id: int) -> Task:
        """Hold a running task between two optimizer steps until ``unpause`` (from any process: a
        database flag its running process checks about once a second). The status stays running
        and ``Task.paused`` becomes True; the run keeps its memory. Cancel still works while paused.
        Data-parallel (multi-process) runs cannot be paused: cancel and resume them instead."""
        return self._set_paused(int(task_id), True)

    def unpause(self, task_id: int) -> Task:
        """Let a paused task continue from the step where it stopped."""
        return self._set_paused(int(task_id), False)

    def _set_paused(self, task_id: int, paused: bool) -> Task:
        from sage_ft.training.launcher import needs_multi_process

        task = self.task(task_id)
        verb = "paused" if paused else "unpaused"
        if task.status is not TaskStatus.RUNNING:
            raise TaskError(f"task {task_id} is {task.status.value}; only a running task can be {verb}")
        if paused and needs_multi_process(task.config):
            raise TaskStateError(f"task {task_id} is a multi-process run, which cannot be paused; cancel it and "
                                 f"resume it later (`sage-ft tasks resume {task_id}` continues from its last "
                                 "checkpoint)", task_id=task_id, action="pause", status=task.status.value,
                                 reason="multi_process")
        now = time.time()
        with self.store.write() as s:
            done = s.execute(update(TaskRecord).where(TaskRecord.id == task_id,
                                                      TaskRecord.status == TaskStatus.RUNNING.value)
                             .values(paused=paused, updated_at=now, **_pause_clock(paused, now))).rowcount
        if not done:
            raise TaskError(f"task {task_id} ended meanwhile; nothing to {verb[:-1]}")
        self._local_run(task_id, lambda run: run.pause() if paused else run.unpause())
        task = self.task(task_id)
        self._notify({"type": "status", "task_id": task_id, "status": task.status.value, "paused": task.paused})
        return task

    def delete(self, task_id: int, remove_files: bool = False) -> None:
        """Remove a task that is not running (a queued one leaves the queue). With ``remove_files``
        its run folder goes too - only if it looks like a run folder (events/logs/meta inside)."""
        task = self.task(task_id)
        with self.store.write() as s:
            gone = s.execute(delete(TaskRecord).where(TaskRecord.id == task.id,
                                                      TaskRecord.status != TaskStatus.RUNNING.value)).rowcount
        if not gone:
            raise TaskStateError(f"task {task.id} is running; cancel it first (`sage-ft tasks cancel {task.id}`)",
                                 task_id=task.id, action="delete", status=TaskStatus.RUNNING.value, reason="running")
        if remove_files and task.output_dir and Path(task.output_dir).exists():
            out = Path(task.output_dir)
            if rundir.looks_like_run_dir(out):
                shutil.rmtree(out, ignore_errors=True)
            else:
                log.warning("not removing %s: it does not look like a sage-ft run folder", out)
        self._notify({"type": "status", "task_id": task.id, "status": "deleted"})

    def resume(self, task_id: int, checkpoint: int | str | None = None) -> Task:
        """Re-queue an interrupted, cancelled or failed task to continue from its newest intact
        checkpoint, in the same output folder, with the same frozen config (so the same total steps).

        A damaged checkpoint (``checkpoints.checkpoint_problem``) is never resumed from: the newest
        intact one is used, and the ones passed over are named in the task's message (its ``error``
        until it starts) and its log. ``checkpoint`` (``30`` or ``"checkpoint-30"``) picks one
        instead; an unknown or damaged one is refused. Checkpoints newer than the one picked belong
        to the attempt being abandoned: they move to ``<run>/superseded/`` so a later resume never
        jumps back onto that attempt."""
        task = self.task(task_id)
        if task.status not in RESUMABLE_STATES:
            raise TaskError(f"task {task.id} is {task.status.value}; only interrupted, cancelled or failed "
                            "tasks can be resumed")
        chosen, note = _resume_checkpoint(task, checkpoint)
        moved = _set_aside_newer_checkpoints(task.output_dir, chosen)
        if moved:
            note = (f"{note}; " if note else "") + (f"{', '.join(moved)} (newer than {chosen.name}) moved to "
                                                    f"{Path(task.output_dir) / 'superseded'}")
        now = time.time()
        with self.store.write() as s:
            position = (s.scalar(select(func.max(TaskRecord.position))) or 0) + 1
            done = s.execute(update(TaskRecord).where(TaskRecord.id == task.id,
                                                      TaskRecord.status.in_([st.value for st in RESUMABLE_STATES]))
                             .values(status=TaskStatus.QUEUED.value, resume_checkpoint=str(chosen),
                                     position=position, error=note, finished_at=None, cancel_requested=False,
                                     paused=False,
                                     attempts=TaskRecord.attempts + 1, updated_at=now)).rowcount
            requeued = Task.from_record(s.get(TaskRecord, task.id)) if done else None
        if requeued is None:
            raise TaskError(f"task {task.id} changed state meanwhile; try again")
        if note:
            log.warning("task %s: %s", task.id, note)
            rundir.append_run_log(task.output_dir, f"resume: {note}")
        if self._worker is not None:
            self._worker.wake()
        self._notify({"type": "status", "task_id": task.id, "status": TaskStatus.QUEUED.value})
        return requeued

    def retry(self, task_id: int) -> Task:
        """A new queued task with the failed/cancelled/interrupted task's frozen config, from scratch
        (new output folder); the old task stays as a record."""
        task = self.task(task_id)
        if task.status not in RESUMABLE_STATES:
            raise TaskStateError(f"task {task.id} is {task.status.value}; retry is for failed, cancelled or "
                                 f"interrupted tasks (`sage-ft tasks clone {task.id}` runs a finished config again)",
                                 task_id=task.id, action="retry", status=task.status.value, reason="state")
        return self.clone(task.id, name=task.name)

    def clone(self, task_id: int, overrides: dict[str, Any] | None = None, name: str | None = None) -> Task:
        """A new queued task from a task's frozen config, with ``overrides`` applied (a new output
        folder unless ``overrides`` names one). Its name (and folder): ``name``, else a ``run_name``
        override, else the original's name as a numbered copy ('x (copy)', 'x (copy 2)', … - a copy
        of 'x (copy)' is another copy of x, never 'x (copy) (copy)')."""
        task = self.task(task_id)
        overrides = dict(overrides or {})
        name = (name or str(overrides.get("run_name") or "").strip() or self._copy_name(task.name)).strip()
        data = {**task.config_dict, "output_dir": "", "resume_from_checkpoint": None, **overrides}
        if data.get("run_name"):  # the config's name (meta, reports) follows the task's
            data["run_name"] = name
        return self.create(data, name=name, source=task.source, parent_id=task.id)

    def _copy_name(self, name: str) -> str:
        """The first free 'base (copy)', 'base (copy 2)', … where base is ``name`` without its copy suffix."""
        base = _COPY_SUFFIX.sub("", name) or name
        with self.store.read() as s:
            taken = set(s.scalars(select(TaskRecord.name).where(TaskRecord.name.like(f"{base} (copy%"))))
        n = 1
        while (candidate := f"{base} (copy)" if n == 1 else f"{base} (copy {n})") in taken:
            n += 1
        return candidate

    def download(self, task_id: int, what: str = "lora") -> Path:
        """A zip of the task's ``lora/`` (or ``merged_model/`` for ``what="merged"``) plus
        finetune_meta.json and config.yaml, written under the data home's exports/."""
        if what not in DOWNLOADABLE:
            raise TaskError(f"download: {what!r} is not one of {', '.join(DOWNLOADABLE)}")
        task = self.task(task_id)
        out = Path(task.output_dir)
        source = out / DOWNLOADABLE[what]
        if not source.is_dir() or not any(source.iterdir()):
            hint = "enable merge_lora or run `sage-ft export`" if what == "merged" else "the run saved no adapter yet"
            raise TaskError(f"task {task.id} has no {DOWNLOADABLE[what]}/ in {out} ({hint})")
        target = paths.exports_dir() / f"task-{task.id}-{_slug(task.name)}-{what}.zip"
        tmp = target.with_suffix(".zip.tmp")
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_DEFLATED) as zf:
            for file in sorted(source.rglob("*")):
                if file.is_file():
                    zf.write(file, f"{DOWNLOADABLE[what]}/{file.relative_to(source)}")
            for extra in ("finetune_meta.json", "config.yaml"):
                if (out / extra).is_file():
                    zf.write(out / extra, extra)
        tmp.replace(target)
        return target

    def record_child_process(self, task_id: int, pid: int) -> None:
        """Remember a worker child process of a running task (the multi-GPU launcher calls this, or
        emits any event with ``child_pid``), so that if the app dies it is ended on the next start."""
        from sage_ft.tasks.procinfo import identity_of

        ident = identity_of(pid)
        if ident is None:
            raise TaskError(f"process {pid} does not exist")
        with self.store.write() as s:
            done = s.execute(update(TaskRecord).where(TaskRecord.id == int(task_id),
                                                      TaskRecord.status == TaskStatus.RUNNING.value)
                             .values(child_pid=ident.pid, child_start_time=ident.start_time,
                                     updated_at=time.time())).rowcount
        if not done:
            raise TaskError(f"task {task_id} is not running; only a running task has worker processes")

    def wait(self, task_id: int, timeout: float | None = None, poll_s: float = 0.2,
             until: Iterable[TaskStatus] | None = None) -> Task:
        """Block until the task reaches one of ``until`` (default: any final state); returns it.
        Raises ``TimeoutError`` naming its status when ``timeout`` passes first."""
        wanted = set(until) if until is not None else {s for s in TaskStatus if s.is_final}
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            task = self.task(task_id)
            if task.status in wanted:
                return task
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"task {task_id} is still {task.status.value} after {timeout:.0f} s")
            time.sleep(poll_s)

    # ================================================================== queue worker and recovery
    def set_arbiter(self, arbiter: Any) -> None:
        """Install (or remove, with None) the memory arbiter for the runs that start from now on
        (the app creates its chat server after the task manager)."""
        self.arbiter = arbiter
        if self._worker is not None:
            self._worker.arbiter = arbiter

    def start_worker(self) -> None:
        if self._worker is None or not self._worker.is_alive():
            self._worker = QueueWorker(self.store, self._notify, self.recover, self.max_running, arbiter=self.arbiter)
            self._worker.start()

    def process_queue(self, until_empty: bool = True, poll_s: float = 1.0) -> int:
        """Run queued tasks in this thread (``sage-ft tasks work``); returns how many ran."""
        ran = 0
        me = current_identity()
        while True:
            self.recover()
            task_id = claim_next(self.store, me, self.max_running)
            if task_id is None:
                if until_empty and not self.queue():
                    return ran
                time.sleep(poll_s)
                continue
            TaskRun(self.store, self.task(task_id), self._notify, self.arbiter).execute()
            ran += 1

    def recover(self) -> list[int]:
        """Mark tasks whose process is gone as interrupted (with their last checkpoint) and end the
        worker child processes they left behind; returns the ids marked. Safe to call any time."""
        with LOCAL_RUNS_LOCK:
            return self._recover()

    def _recover(self) -> list[int]:
        me = current_identity()
        with self.store.read() as s:
            running = list(s.scalars(select(TaskRecord).where(TaskRecord.status == TaskStatus.RUNNING.value)))
            dead_workers = [(w.pid, w.start_time) for w in s.scalars(select(WorkerRecord))
                            if not ProcessIdentity(w.pid, w.start_time).is_alive()]
        marked = []
        for rec in running:
            owner = ProcessIdentity(rec.pid, rec.pid_start_time or 0.0) if rec.pid else None
            if owner is not None and owner.is_alive() and (owner != me or rec.id in LOCAL_RUNS):
                continue
            if rec.child_pid:
                end_process_tree(ProcessIdentity(rec.child_pid, rec.child_start_time or 0.0))
            who = f"process {rec.pid}" if rec.pid else "its process"
            if self._mark_interrupted(rec.id, f"{who} stopped while the task was running", expect_pid=rec.pid):
                marked.append(rec.id)
        if dead_workers:
            with self.store.write() as s:
                for pid, start in dead_workers:
                    s.execute(delete(WorkerRecord).where(WorkerRecord.pid == pid, WorkerRecord.start_time == start))
        return marked

    def _mark_interrupted(self, task_id: int, why: str, expect_pid: int | None = None) -> bool:
        task = self.task(task_id)
        checkpoint = rundir.last_checkpoint(task.output_dir)
        hint = (f"resume continues from {checkpoint.name}" if checkpoint
                else "no checkpoint was saved; retry starts it again")
        # progress is written every few seconds, a checkpoint when it is complete: show at least its step
        saved = rundir.checkpoint_step(checkpoint) if checkpoint else 0
        now = time.time()
        condition = [TaskRecord.id == task_id, TaskRecord.status == TaskStatus.RUNNING.value]
        if expect_pid is not None:
            condition.append(TaskRecord.pid == expect_pid)
        with self.store.write() as s:
            done = s.execute(update(TaskRecord).where(*condition).values(
                status=TaskStatus.INTERRUPTED.value, finished_at=now, updated_at=now,
                error=f"interrupted: {why}; {hint}", resume_checkpoint=str(checkpoint) if checkpoint else None,
                cancel_requested=False, paused=False, child_pid=None, child_start_time=None, active_since=None,
                # the stretch ended when the dead process last wrote progress, not when this noticed
                active_seconds=TaskRecord.active_seconds + func.coalesce(
                    func.max(0.0, func.min(now, TaskRecord.updated_at) - TaskRecord.active_since), 0.0),
                step=case((TaskRecord.step < saved, saved), else_=TaskRecord.step))).rowcount
        if done:
            log.warning("task %s interrupted: %s", task_id, why)
            rundir.mark_meta_interrupted(task.output_dir, f"interrupted: {why}; {hint}")
            self._notify({"type": "status", "task_id": task_id, "status": TaskStatus.INTERRUPTED.value})
        return bool(done)

    def _local_run(self, task_id: int, action: Callable[[TaskRun], None]) -> None:
        """Apply ``action`` at once when this manager runs the task (others see the DB flag within 1 s)."""
        runs = [r for r in (self._worker.active if self._worker else None, self._foreground.get(task_id))
                if r is not None and r.task.id == task_id]
        for run in runs:
            action(run)

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the worker; a task it is running ends interrupted (resumable). Idempotent."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self._atexit)
        if self._worker is not None:
            self._worker.stop(timeout)
        for run in list(self._foreground.values()):
            run.interrupt()
        self.store.close()

    def __enter__(self) -> TaskManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    # ================================================================== estimates
    def _remaining_s(self, task: Task) -> float | None:
        eta = task.last_metrics.get("eta_seconds")
        if isinstance(eta, (int, float)):
            return float(eta)
        if task.duration_s and task.step and task.total_steps:
            return task.duration_s / task.step * (task.total_steps - task.step)
        return None

    def _queue_estimates(self) -> list[tuple[Task, float | None]]:
        """Each queued task with its estimated start time (None once any duration ahead is unknown)."""
        queued = self.queue()
        running = self.list([TaskStatus.RUNNING])
        per_step, per_task = self._history_rates()
        now = time.time()
        clock: float | None = now
        for task in running:
            left = self._remaining_s(task)
            clock = None if left is None or clock is None else clock + left / max(1, self.max_running)
        estimates = []
        for task in queued:
            estimates.append((task, clock))
            steps = task.config_dict.get("max_steps", -1)
            duration = (per_step * steps if per_step and isinstance(steps, int) and steps > 0 else per_task)
            clock = None if clock is None or duration is None else clock + duration
        return estimates

    def _history_rates(self) -> tuple[float | None, float | None]:
        """Mean seconds per step and per task of the last completed tasks."""
        with self.store.read() as s:
            rows = s.execute(select(TaskRecord.active_seconds, TaskRecord.total_steps)
                             .where(TaskRecord.status == TaskStatus.COMPLETED.value, TaskRecord.active_seconds > 0)
                             .order_by(TaskRecord.finished_at.desc()).limit(20)).all()
        durations = [seconds for seconds, _ in rows]
        steps = [seconds / n for seconds, n in rows if n]
        return (sum(steps) / len(steps) if steps else None, sum(durations) / len(durations) if durations else None)


@dataclasses.dataclass
class ForegroundResult:
    """``run_foreground``'s answer: the trainer's RunResult fields plus the task id."""

    status: str
    output_dir: Path
    metrics: dict[str, Any]
    error: str | None
    task_id: int


@dataclasses.dataclass(frozen=True)
class _Checked:
    """A config that passed ``create``'s checks, with what the checks found."""

    config: TrainConfig
    files: list[Path]
    fingerprint: str
    resume: Path | None  # checkpoint to continue from (a config with resume_from_checkpoint set)


# ====================================================================== validation helpers
def _resume_point(config: TrainConfig) -> tuple[Path | None, list[str]]:
    """The checkpoint a config asks to resume from ('last' or a path), or the problem with it."""
    resume = (config.resume_from_checkpoint or "").strip()
    if not resume:
        return None, []
    if resume == "last":
        if not config.output_dir.strip():
            return None, ["resume_from_checkpoint: 'last' needs output_dir set to the run folder to continue"]
        choice = rundir.resume_choice(Path(config.output_dir).expanduser())
        if choice.checkpoint is None:
            damaged = f" ({choice.note})" if choice.note else ""
            return None, [f"resume_from_checkpoint: no intact checkpoint-N folder in {config.output_dir}{damaged}"]
        if choice.note:
            log.warning("resume_from_checkpoint: last: %s", choice.note)
        return choice.checkpoint.resolve(), []
    path = Path(resume).expanduser().resolve()
    if not path.is_dir():
        return None, [f"resume_from_checkpoint: {path} is not a checkpoint folder"]
    problem = checkpoint_problem(path)
    if problem:
        return None, [f"resume_from_checkpoint: {path} is damaged ({problem}); give another checkpoint-N folder, "
                      "or 'last' for the newest intact one"]
    if config.output_dir.strip() and Path(config.output_dir).expanduser().resolve() != path.parent:
        return None, [f"resume_from_checkpoint: {path} is not inside output_dir {config.output_dir}; "
                      "a run continues in its own folder"]
    return path, []


def _pause_clock(paused: bool, now: float) -> dict[str, Any]:
    """The row's training clock on pause (the stretch so far is banked) and unpause (a new one starts)."""
    if paused:
        return {"active_seconds": TaskRecord.active_seconds + func.coalesce(now - TaskRecord.active_since, 0.0),
                "active_since": None}
    return {"active_since": func.coalesce(TaskRecord.active_since, now)}


def _resume_checkpoint(task: Task, wanted: int | str | None) -> tuple[Path, str | None]:
    """The checkpoint ``resume`` continues from and the note naming the damaged ones passed over,
    or ``TaskError`` saying why there is none."""
    out = task.output_dir
    if wanted is None:
        choice = rundir.resume_choice(out)
        if choice.checkpoint is not None:
            return choice.checkpoint, choice.note
        if choice.damaged:
            raise TaskStateError(f"task {task.id} cannot be resumed: no checkpoint in {out} is intact "
                                 f"({choice.note}); start it again with `sage-ft tasks retry {task.id}`",
                                 task_id=task.id, action="resume", status=task.status.value,
                                 reason="no_intact_checkpoint")
        raise TaskStateError(f"task {task.id} has no checkpoint in {out} to resume from; "
                             f"use retry to start it again (`sage-ft tasks retry {task.id}`)", task_id=task.id,
                             action="resume", status=task.status.value, reason="no_checkpoint")
    match = re.fullmatch(r"(?:checkpoint-)?(\d+)", str(wanted).strip())
    if match is None:
        raise TaskError(f"{wanted!r} is not a checkpoint; give its step, e.g. 30 for checkpoint-30")
    step = int(match.group(1))
    folders = rundir.checkpoint_folders(out)
    intact = [p.name for p in rundir.checkpoints(out)]
    others = f"its intact checkpoints: {', '.join(intact)}" if intact else "it has no intact checkpoint"
    picked = next((p for p in folders if rundir.checkpoint_step(p) == step), None)
    if picked is None:
        raise TaskError(f"task {task.id} has no checkpoint-{step} in {out} ({others})")
    problem = checkpoint_problem(picked)
    if problem:
        raise TaskError(f"checkpoint-{step} of task {task.id} is damaged ({problem}); pick another ({others}), "
                        f"or leave the checkpoint out to continue from the newest intact one")
    return picked, None


def _set_aside_newer_checkpoints(output_dir: str, chosen: Path) -> list[str]:
    """Move the intact checkpoints newer than ``chosen`` to ``<run>/superseded/`` (names moved).

    They hold the attempt a resume from an older checkpoint abandons; left in place, a resume
    after the next interruption would pick them again (the run only replaces each when it
    reaches its step). Damaged ones stay: they are never picked and the run replaces them too."""
    step = rundir.checkpoint_step(chosen)
    newer = [p for p in rundir.checkpoints(output_dir) if rundir.checkpoint_step(p) > step]
    moved = []
    for folder in newer:
        target = folder.parent / "superseded" / folder.name
        try:
            target.parent.mkdir(exist_ok=True)
            if target.exists():
                shutil.rmtree(target)
            folder.rename(target)
            moved.append(folder.name)
        except OSError as exc:
            log.warning("could not move %s aside: %s", folder, exc)
    return moved


def _model_problems(config: TrainConfig) -> list[str]:
    """Local model paths are checked now, with the config against the model's own files (context
    length, LoRA targets, chat template); hub ids are resolved when the run starts."""
    from sage_ft.models.preflight import model_config_problems

    name = config.model_name_or_path.strip()
    try:
        if name == "demo":
            from sage_ft.models.demo import is_demo_model

            demo = paths.demo_model_dir()
            return model_config_problems(config, demo) if is_demo_model(demo) else []
        if Path(name).expanduser().exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:
            from sage_ft.models.resolve import ModelError, resolve_model

            try:
                return model_config_problems(config, resolve_model(name))
            except ModelError as exc:
                return [f"model_name_or_path: {exc}"]
    except OSError as exc:  # e.g. a path longer than the file system allows
        return [f"model_name_or_path: {_short(name)} cannot be used as a path ({exc.strerror})"]
    return []


def _output_dir_problems(config: TrainConfig) -> list[str]:
    if not config.output_dir.strip() or config.resume_from_checkpoint:
        return []
    out = Path(config.output_dir).expanduser()
    problem = output_path_problem(out)
    if problem is not None:
        return [f"output_dir: {problem}; choose another folder"]
    if out.exists() and not out.is_dir():
        return [f"output_dir: {out} is a file; give a folder"]
    if out.is_dir() and any(out.iterdir()) and not config.overwrite_output_dir:
        return [f"output_dir: {out} exists and is not empty; choose a new folder, leave it empty for an "
                "automatic one, or set overwrite_output_dir"]
    return []


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _dataset_problems(config: TrainConfig) -> tuple[list[str], list[Path]]:
    from sage_ft.data.load import DataError, load_dataset
    from sage_ft.training.inputs import load_run_eval_dataset

    files: list[Path] = []
    try:  # the run reads the same files: 'docs-sample', names in the data home, folders, Hub ids
        report = load_dataset(config.datasets, config.dataset_format, config.column_mapping, config.max_samples)
    except DataError as exc:
        return [f"dataset: {p}" for p in exc.problems], files
    if not report.ok:
        return [f"dataset: {config.dataset} has no usable rows\n{report.summary()}"], files
    try:
        eval_report = load_run_eval_dataset(config)
    except DataError as exc:
        return list(exc.problems), files
    # what the run reads, for the fingerprint a resume compares
    files = report.files + (eval_report.files if eval_report else [])
    rows = len(report.conversations)
    if config.held_out(rows) >= rows:  # the run would fail on it after loading the model
        return [f"val_size: {config.val_size:g} holds out {config.held_out(rows)} of the {rows} usable rows of "
                f"{config.dataset}, leaving none to train on; lower val_size"], files
    from sage_ft.data.cutoff import cutoff_problem  # every answer cut off: the run would fail after loading

    truncated = cutoff_problem(report, config)
    eval_truncated = cutoff_problem(eval_report, config) if eval_report else None
    return [p for p in (truncated, eval_truncated and f"eval_dataset: {eval_truncated}") if p], files


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")[:40] or "run"


def _default_name(config: TrainConfig) -> str:
    model = Path(config.model_name_or_path.rstrip("/")).name or "model"
    data = Path(config.datasets[0]).stem if config.datasets else "data"
    return f"{model} · {data}"


def _new_run_dir(task_id: int, name: str) -> Path:
    base = paths.runs_dir() / f"task-{task_id:04d}-{_slug(name)}"
    candidate, n = base, 1
    while candidate.exists():  # left over from a deleted database: never write into it
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
