"""Executing tasks: one run at a time on a training thread of this process, and the queue loop.

``execute_task`` runs one claimed task through the in-process trainer (``sage_ft.training``) and
keeps its row current: an event listener records progress in memory, and a watcher thread writes it
to the database at most once a second and checks for a cancel request from another process (the
CLI, a second app). Whatever the run does - raise, fail, get cancelled - the row ends in a final
state, the memory is released and the queue moves on.
"""

from __future__ import annotations

import gc
import json
import logging
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from sqlalchemy import delete, select, text, update

from sage_ft.config import ConfigError, TrainConfig
from sage_ft.events import EventEmitter, Preparation
from sage_ft.tasks import rundir
from sage_ft.tasks.checkpoints import checkpoint_problem
from sage_ft.tasks.procinfo import ProcessIdentity, current_identity
from sage_ft.tasks.status import TaskStatus
from sage_ft.tasks.store import TaskRecord, TaskStore, WorkerRecord
from sage_ft.tasks.task import PREPARING_KEYS, Task, preparation_metrics

log = logging.getLogger(__name__)

FLUSH_INTERVAL_S = 1.0  # at most one progress write per second per run
HEARTBEAT_INTERVAL_S = 5.0
Notify = Callable[[dict[str, Any]], None]

# Task ids being executed by some manager of *this* process: recovery uses it to tell a live run of
# this process from a row left "running" by a previous process that had the same pid.
# Claiming a task and registering it here happen under LOCAL_RUNS_LOCK, which recovery also holds.
LOCAL_RUNS: set[int] = set()
LOCAL_RUNS_LOCK = threading.RLock()


@dataclass
class TaskOutcome:
    """How a task's run ended (``RunResult`` fields plus the status written to the row)."""

    status: TaskStatus
    output_dir: str
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None


class TaskRun:
    """One task executing in this process; ``cancel()`` and ``interrupt()`` are thread-safe."""

    def __init__(self, store: TaskStore, task: Task, notify: Notify | None = None, arbiter: Any = None):
        self.store = store
        self.task = task
        self._notify = notify or (lambda _event: None)
        self.arbiter = arbiter  # see TaskManager(arbiter=...) and sage_ft.tasks.arbitration
        self._lock = threading.Lock()
        self._run: Any = None
        self._cancel_reason: str | None = None  # "cancel" (user) or "interrupt" (app shutting down)
        self._paused = bool(task.paused)
        # Held while a pause is set and while the watcher reads the row's flag and applies it: read and
        # applied apart, a row read just before a pause was written undid that pause until the next
        # poll (a short run could end unheld). ``TaskManager`` writes the row first, then calls here.
        self._pause_lock = threading.Lock()
        self._finished = threading.Event()
        self._pending: dict[str, Any] = {}

    # ------------------------------------------------------------------ control
    def cancel(self) -> None:
        self._stop("cancel")

    def interrupt(self) -> None:
        """Stop because the app is shutting down: the task ends interrupted (resumable), not cancelled."""
        self._stop("interrupt")

    def _stop(self, reason: str) -> None:
        with self._lock:
            self._cancel_reason = self._cancel_reason or reason
            run = self._run
        if run is not None:
            run.cancel()

    def pause(self) -> None:
        """Hold the run between two steps (see ``TaskManager.pause``)."""
        with self._pause_lock:
            self._set_paused(True)

    def unpause(self) -> None:
        with self._pause_lock:
            self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        with self._lock:
            self._paused = paused
            run = self._run
        action = getattr(run, "pause" if paused else "resume", None) if run is not None else None
        if action is not None:
            action()
            log.info("task %s %s", self.task.id, "paused" if paused else "continues")

    def state(self) -> dict[str, Any]:
        with self._lock:
            run = self._run
        try:
            return dict(run.get_current_state()) if run is not None else {}
        except Exception:  # a state query must never disturb the run
            return {}

    # ------------------------------------------------------------------ execution
    def execute(self) -> TaskOutcome:
        with LOCAL_RUNS_LOCK:
            LOCAL_RUNS.add(self.task.id)
        try:
            watcher = threading.Thread(target=self._watch, name=f"task-{self.task.id}-watch", daemon=True)
            watcher.start()
            try:
                outcome = self._execute()
            finally:
                self._finished.set()
                watcher.join(timeout=10)
                with self._lock:
                    self._run = None
                release_memory()
            self._finish(outcome)
            return outcome
        finally:
            with LOCAL_RUNS_LOCK:
                LOCAL_RUNS.discard(self.task.id)

    def _execute(self) -> TaskOutcome:
        output_dir = self.task.output_dir
        try:
            config = self._run_config()
            problem = self._preflight(config)
        except Exception as exc:
            return self._failed(exc)
        if problem:
            return TaskOutcome(TaskStatus.FAILED, output_dir, error=problem)
        arbiter_message = self._call_arbiter("before_run", config)
        try:
            return self._train(config, arbiter_message)
        finally:
            self._call_arbiter("after_run", config)

    def _failed(self, exc: Exception) -> TaskOutcome:
        from sage_ft.training.run import describe_failure, is_explained

        if is_explained(exc):  # its message says what to do; a traceback would only bury it
            log.error("task %s failed: %s", self.task.id, exc)
        else:
            log.exception("task %s failed", self.task.id)
            self._append_log(traceback.format_exc())
        return TaskOutcome(TaskStatus.FAILED, self.task.output_dir, error=describe_failure(exc))

    def _call_arbiter(self, hook: str, config: TrainConfig) -> str | None:
        """``arbiter.before_run``/``after_run``; whatever it does, the run and the worker go on."""
        fn = getattr(self.arbiter, hook, None)
        if fn is None:
            return None
        try:
            message = fn(config)
        except Exception:
            log.exception("task %s: memory arbiter %s failed; the run goes on", self.task.id, hook)
            return None
        if message:
            message = str(message)
            log.info("task %s: %s", self.task.id, message)
            self._notify({"type": "arbiter", "task_id": self.task.id, "hook": hook, "message": message})
        return message or None

    def _train(self, config: TrainConfig, arbiter_message: str | None) -> TaskOutcome:
        output_dir = self.task.output_dir
        try:
            from sage_ft.training.launcher import needs_multi_process

            if needs_multi_process(config):
                return self._execute_multi(config)
            from sage_ft.training import FineTuneRun

            emitter = EventEmitter(Path(output_dir) / "events.jsonl")
            emitter.on("*", self._on_event)
            run = FineTuneRun(config, emitter=emitter)
            if arbiter_message:  # in the run's events, so every client (any process) can show it
                emitter.emit("log", level="info", source="memory", message=arbiter_message)
            with self._pause_lock:  # (an unpause between the two must not leave the run held)
                with self._lock:
                    self._run = run
                    reason = self._cancel_reason
                if self._paused:  # paused before the trainer existed: it stops after its first step
                    run.pause()
            if reason:  # cancelled before the trainer existed
                run.cancel()
            result = run.run()
            status = TaskStatus(result.status)
            if status is TaskStatus.CANCELLED and self._cancel_reason == "interrupt":
                status = TaskStatus.INTERRUPTED
            return TaskOutcome(status, str(result.output_dir or output_dir), dict(result.metrics or {}), result.error)
        except Exception as exc:  # a run that raises never takes the app down
            return self._failed(exc)

    def _execute_multi(self, config: TrainConfig) -> TaskOutcome:
        """A data-parallel run: ``accelerate launch`` child process (own process group), followed
        through its events file; its pid + start time are recorded so a restarted app can end it."""
        from sage_ft.events import read_events
        from sage_ft.training.launcher import launch_multi
        from sage_ft.training.meta import read_meta

        handle = launch_multi(config)
        control = _MultiProcessControl(handle)
        with self._lock:
            self._run = control
            reason = self._cancel_reason
        if reason:
            control.cancel()
        self._record_child(handle.pid)
        offset = 0
        while True:
            exit_code = handle.poll()
            events, offset = read_events(handle.events_path, offset)
            for event in events:
                self._on_event(event)
            if exit_code is not None:
                break
            time.sleep(0.5)
        control.join()
        if handle.end_all():
            log.warning("task %s: ended training processes left running after the launcher exited", self.task.id)
        meta = read_meta(handle.output_dir)
        status = meta.get("status")
        if exit_code != 0 and self._cancel_reason is None:
            return self._multi_failed(handle, exit_code, meta)
        if status not in ("completed", "failed", "cancelled"):
            return TaskOutcome(TaskStatus.FAILED, str(handle.output_dir),
                               error=f"the training processes exited with code {exit_code} before finishing; "
                                     f"see {handle.log_path}")
        outcome = TaskStatus(status)
        if outcome is TaskStatus.CANCELLED and self._cancel_reason == "interrupt":
            outcome = TaskStatus.INTERRUPTED
        return TaskOutcome(outcome, str(handle.output_dir), dict(meta.get("metrics") or {}), meta.get("error"))

    def _multi_failed(self, handle: Any, exit_code: int, meta: dict[str, Any]) -> TaskOutcome:
        """A data-parallel run that ended badly without being asked to stop (a rank crashed or was
        killed, the launcher died): the root cause first, then what rank 0 reported, and the
        launcher's log tail copied into the task log so the UI shows it."""
        reason = handle.failure_reason(exit_code)
        if meta.get("error"):
            reason += f" (rank 0 then reported: {meta['error']})"
        self._append_log(f"\n--- {LAUNCHER_LOG_TITLE} ({handle.log_path}) ---\n{handle.log_tail()}\n")
        self._append_log(f"failed: {reason}\n")
        metrics = {k: v for k, v in (meta.get("metrics") or {}).items() if _is_scalar(v)}
        return TaskOutcome(TaskStatus.FAILED, str(handle.output_dir), metrics, reason)

    def _record_child(self, pid: int) -> None:
        from sage_ft.tasks.procinfo import identity_of

        ident = identity_of(pid)
        if ident is None:
            return
        with self.store.write() as s:
            s.execute(update(TaskRecord).where(TaskRecord.id == self.task.id)
                      .values(child_pid=ident.pid, child_start_time=ident.start_time, updated_at=time.time()))

    def _run_config(self) -> TrainConfig:
        """The frozen config, pointed at the task's output dir (and its checkpoint when resuming)."""
        data = yaml.safe_load(self.task.config_yaml) or {}
        data["output_dir"] = self.task.output_dir
        data["resume_from_checkpoint"] = self.task.resume_checkpoint
        try:
            return TrainConfig.from_dict(data)[0]
        except ConfigError as exc:
            raise ValueError(f"the stored config of task {self.task.id} is no longer valid: {exc}") from None

    def _preflight(self, config: TrainConfig) -> str | None:
        """Problems that appeared after queuing (a dataset file deleted or changed), found cheaply."""
        from sage_ft.data.load import split_paths

        if config.resume_from_checkpoint:  # checked when it was queued again; a disk can fail since
            checkpoint = Path(config.resume_from_checkpoint)
            damage = checkpoint_problem(checkpoint) if checkpoint.is_dir() else "the folder is gone"
            if damage:
                return (f"{checkpoint.name} in {checkpoint.parent} is damaged ({damage}); "
                        f"`sage-ft tasks resume {self.task.id}` continues from the newest intact checkpoint")
        files = split_paths(config.dataset)
        missing = [str(p) for p in files if not p.is_file()]
        if missing:
            return (f"dataset file {', '.join(missing)} no longer exists (it was there when task {self.task.id} "
                    "was queued); restore it, or clone the task with another dataset")
        fingerprint = rundir.fingerprint_files(files)
        if self.task.dataset_fingerprint and fingerprint != self.task.dataset_fingerprint:
            log.warning("task %s: dataset changed since it was queued; recording the new fingerprint", self.task.id)
            self._append_log(f"note: dataset {config.dataset} changed since the task was queued "
                             f"(sha256 {self.task.dataset_fingerprint[:12]} -> {fingerprint[:12]})\n")
            with self.store.write() as s:
                s.execute(update(TaskRecord).where(TaskRecord.id == self.task.id)
                          .values(dataset_fingerprint=fingerprint, updated_at=time.time()))
        return None

    def _append_log(self, text_: str) -> None:
        try:
            path = Path(self.task.output_dir) / "logs.txt"
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a", encoding="utf-8") as fh:
                fh.write(text_)
        except OSError:
            log.warning("could not write to the log of task %s", self.task.id)

    # ------------------------------------------------------------------ progress
    def _on_event(self, event: dict[str, Any]) -> None:
        """Runs on the training thread for every event: remember what the row should show."""
        kind = event.get("event")
        with self._lock:
            pending = self._pending
            if kind in ("metric_update", "batch_end", "training_start", "epoch_end"):
                if isinstance(event.get("step"), int):
                    pending["step"] = event["step"]
                if isinstance(event.get("total_steps"), int) and event["total_steps"] > 0:
                    pending["total_steps"] = event["total_steps"]
            if kind == "metric_update":
                metrics = {k: v for k, v in event.items() if k not in _NOT_METRICS and _is_scalar(v)}
                pending["metrics"] = {**pending.get("metrics", {}), **metrics}
            if kind in ("preparing", "training_start"):  # before the first step: shown instead of "step 0/?"
                preparation = Preparation.of_event(event) if kind == "preparing" else None
                pending["metrics"] = {**pending.get("metrics", {}), **preparation_metrics(preparation)}
            if kind == "checkpoint_saved" and event.get("path"):
                pending["resume_checkpoint"] = str(event["path"])
            if event.get("child_pid"):
                pending["child_pid"] = int(event["child_pid"])
                pending["child_start_time"] = event.get("child_start_time")
        self._notify({"type": "event", "task_id": self.task.id, **event})

    def _watch(self) -> None:
        """Flush progress to the row (<= 1 write/s) and honour cancel and pause requests from other
        processes (flags in the row)."""
        while not self._finished.wait(FLUSH_INTERVAL_S):
            try:
                self._flush()
                with self._pause_lock:  # read and applied as one step (see __init__)
                    cancel, paused = self._requested()
                    if paused != self._paused:
                        self._set_paused(paused)
                if self._cancel_reason is None and cancel:
                    log.info("task %s: cancel requested through the database", self.task.id)
                    self.cancel()
            except Exception:  # the database being busy must not stop the run
                log.exception("task %s: progress update failed", self.task.id)

    def _requested(self) -> tuple[bool, bool]:
        """(cancel requested, paused) as the row says now."""
        with self.store.read() as s:
            row = s.execute(select(TaskRecord.cancel_requested, TaskRecord.paused)
                            .where(TaskRecord.id == self.task.id)).first()
        return (bool(row[0]), bool(row[1])) if row else (False, False)

    def _flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        state = self.state()
        live = {k: state[k] for k in ("tokens_per_second", "eta_seconds") if _is_scalar(state.get(k))}
        if live and pending:  # only alongside real progress, so an idle run does not write every second
            pending["metrics"] = {**pending.get("metrics", {}), **live}
        if not pending:
            return
        values: dict[str, Any] = {"updated_at": time.time()}
        for key in ("step", "total_steps", "resume_checkpoint", "child_pid"):
            if key in pending:
                values[key] = pending[key]
        if "child_pid" in pending:
            from sage_ft.tasks.procinfo import identity_of

            ident = identity_of(pending["child_pid"])
            values["child_start_time"] = pending.get("child_start_time") or (ident.start_time if ident else None)
        with self.store.write() as s:
            if "metrics" in pending:
                current = s.scalar(select(TaskRecord.last_metrics).where(TaskRecord.id == self.task.id))
                merged = {key: value for key, value in {**json.loads(current or "{}"), **pending["metrics"]}.items()
                          if value is not None}  # None: a key that no longer applies (the preparing ones)
                values["last_metrics"] = json.dumps(merged, default=str)
            s.execute(update(TaskRecord).where(TaskRecord.id == self.task.id).values(**values))

    def _finish(self, outcome: TaskOutcome) -> None:
        try:
            self._flush()
        except Exception:
            log.exception("task %s: last progress update failed", self.task.id)
        checkpoint = rundir.last_checkpoint(outcome.output_dir)
        now = time.time()
        with self.store.write() as s:
            rec = s.get(TaskRecord, self.task.id)
            if rec is None:  # deleted meanwhile (only possible by hand): nothing to record
                return
            metrics = {**json.loads(rec.last_metrics or "{}"),
                       **{k: v for k, v in outcome.metrics.items() if _is_scalar(v) and k not in _NOT_METRICS}}
            for key in ("eta_seconds", *PREPARING_KEYS):
                metrics.pop(key, None)
            rec.status = outcome.status.value
            rec.finished_at = now
            rec.updated_at = now
            rec.error = outcome.error
            rec.last_metrics = json.dumps(metrics, default=str)
            rec.resume_checkpoint = str(checkpoint) if checkpoint else None
            rec.cancel_requested = False
            rec.paused = False
            if rec.active_since is not None:
                rec.active_seconds = (rec.active_seconds or 0.0) + max(0.0, now - rec.active_since)
                rec.active_since = None
            rec.child_pid = rec.child_start_time = None
            if outcome.status is TaskStatus.COMPLETED and rec.total_steps:
                rec.step = rec.total_steps
        if outcome.status is TaskStatus.INTERRUPTED:  # the trainer wrote "cancelled"; the app stopped it
            rundir.mark_meta_interrupted(outcome.output_dir, outcome.error or "interrupted: the app shut down "
                                         "while the task was running; resume continues from its last checkpoint")
        log.info("task %s ended %s%s", self.task.id, outcome.status.value, f": {outcome.error}" if outcome.error else "")
        self._notify({"type": "status", "task_id": self.task.id, "status": outcome.status.value,
                      "error": outcome.error})


class _MultiProcessControl:
    """``cancel``/``get_current_state`` of a launched multi-process run, like ``FineTuneRun``'s."""

    GRACE_S = 60.0

    def __init__(self, handle: Any):
        self.handle = handle
        self._stopper: threading.Thread | None = None

    def cancel(self) -> None:
        """Every rank stops after its step; the process group is killed if it does not within the grace."""
        if self._stopper is None:
            self._stopper = threading.Thread(target=self.handle.cancel, args=(self.GRACE_S,), daemon=True,
                                             name="multi-process-cancel")
            self._stopper.start()

    def join(self) -> None:
        if self._stopper is not None:
            self._stopper.join(self.GRACE_S + 30)

    def get_current_state(self) -> dict[str, Any]:
        return {}


LAUNCHER_LOG_TITLE = "last lines of the data-parallel launcher's log"
_NOT_METRICS = frozenset({"event", "time", "step", "total_steps", "global_step"})


def _is_scalar(value: Any) -> bool:
    """A metric value worth keeping (None never overwrites a real value)."""
    return isinstance(value, (int, float, str, bool))


def release_memory() -> None:
    """Give the trainer's memory back (model, optimizer, CUDA cache) so a served model can use it."""
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None:
        try:
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except Exception:
            log.debug("torch.cuda.empty_cache failed", exc_info=True)
    try:  # return freed heap pages to the OS (glibc keeps them otherwise and RSS stays high)
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------ the queue
def claim_next(store: TaskStore, owner: ProcessIdentity, max_running: int = 1) -> int | None:
    """Atomically move the first queued task to running for ``owner``; None when nothing may start.

    One UPDATE in a BEGIN IMMEDIATE transaction: two workers (threads or processes) can never claim
    the same task, and at most ``max_running`` tasks run at once on this database.
    """
    now = time.time()
    with LOCAL_RUNS_LOCK, store.write() as s:
        row = s.execute(text("""
            UPDATE tasks SET status = 'running', pid = :pid, pid_start_time = :start,
                   started_at = COALESCE(started_at, :now), active_since = :now, updated_at = :now, finished_at = NULL, error = NULL, cancel_requested = 0, paused = 0
             WHERE id = (SELECT id FROM tasks WHERE status = 'queued' ORDER BY position, id LIMIT 1)
               AND status = 'queued'
               AND (SELECT count(*) FROM tasks WHERE status = 'running') < :max_running
            RETURNING id"""), {"pid": owner.pid, "start": owner.start_time, "now": now,
                               "max_running": max_running}).first()
        if row is None:
            return None
        LOCAL_RUNS.add(int(row[0]))
    return int(row[0])


class QueueWorker(threading.Thread):
    """Starts the next queued task whenever none is running; wakes on ``wake()`` or every second.

    Polling (1 s) also picks up tasks queued by other processes (the CLI) without any signalling.
    """

    def __init__(self, store: TaskStore, notify: Notify, before_claim: Callable[[], None],
                 max_running: int = 1, poll_interval_s: float = 1.0, arbiter: Any = None):
        super().__init__(name="sage-ft-task-worker", daemon=True)
        self.store = store
        self.arbiter = arbiter
        self._notify = notify
        self._before_claim = before_claim
        self.max_running = max_running
        self.poll_interval_s = poll_interval_s
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._lock = threading.Lock()
        self.active: TaskRun | None = None
        self.identity = current_identity()
        self._last_heartbeat = 0.0

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float | None = 30.0) -> None:
        """Stop taking tasks; a running task is interrupted (resumable) and waited for."""
        self._stopping.set()
        with self._lock:
            active = self.active
        if active is not None:
            active.interrupt()
        self._wake.set()
        if self.is_alive():
            self.join(timeout)

    def run(self) -> None:
        try:
            while not self._stopping.is_set():
                try:
                    self._heartbeat()
                    self._before_claim()
                    task_id = claim_next(self.store, self.identity, self.max_running)
                except Exception:
                    log.exception("task queue: could not look for the next task")
                    task_id = None
                if task_id is None:
                    self._wake.wait(self.poll_interval_s)
                    self._wake.clear()
                    continue
                try:
                    self._run_task(task_id)
                except Exception:  # never let one task stop the queue; recover() settles its row
                    log.exception("task %s: the worker could not run it", task_id)
        finally:
            self._unregister()

    def _run_task(self, task_id: int) -> None:
        with self.store.read() as s:
            rec = s.get(TaskRecord, task_id)
            if rec is None:
                return
            task = Task.from_record(rec)
        run = TaskRun(self.store, task, self._notify, self.arbiter)
        with self._lock:
            self.active = run
        if self._stopping.is_set():
            run.interrupt()
        self._notify({"type": "status", "task_id": task_id, "status": TaskStatus.RUNNING.value})
        try:
            self._heartbeat(task_id, force=True)
            run.execute()
        except Exception:  # execute() already records failures; this guards the loop itself
            log.exception("task %s: unexpected error in the worker", task_id)
        finally:
            with self._lock:
                self.active = None
            try:
                self._heartbeat(None, force=True)
            except Exception:
                log.debug("worker heartbeat failed", exc_info=True)

    def _heartbeat(self, task_id: int | None = None, force: bool = False) -> None:
        now = time.time()
        if not force and now - self._last_heartbeat < HEARTBEAT_INTERVAL_S:
            return
        self._last_heartbeat = now
        with self.store.write() as s:
            rec = s.get(WorkerRecord, (self.identity.pid, self.identity.start_time))
            if rec is None:
                s.add(WorkerRecord(pid=self.identity.pid, start_time=self.identity.start_time, started_at=now,
                                   heartbeat_at=now, current_task_id=task_id))
            else:
                rec.heartbeat_at = now
                rec.current_task_id = task_id

    def _unregister(self) -> None:
        try:
            with self.store.write() as s:
                s.execute(delete(WorkerRecord).where(WorkerRecord.pid == self.identity.pid,
                                                     WorkerRecord.start_time == self.identity.start_time))
        except Exception:
            log.debug("could not remove the worker heartbeat row", exc_info=True)
